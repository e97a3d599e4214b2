"""Run per-module work on a thread pool, with results in input order.

torch releases the GIL inside its kernels, so threads compress several
modules at once on separate cores.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from tensorpress.errors import InvalidOptionsError

__all__ = ["map_in_order", "resolve_workers"]

Result = TypeVar("Result")


def resolve_workers(workers: int | None) -> int:
    """Return the thread count for `workers`; None means ``torch.get_num_threads()``.

    Raises:
        InvalidOptionsError: `workers` is not a positive integer or None.
    """
    if workers is None:
        return max(1, torch.get_num_threads())
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise InvalidOptionsError(
            f"workers must be a positive integer or None (one per torch thread), not {workers!r}"
        )
    return workers


def map_in_order(
    function: Callable[..., Result], items: Iterable[tuple[Any, ...]], workers: int
) -> Iterator[Result]:
    """Yield ``function(*item)`` for each item, in order, running up to `workers` at once.

    At most ``2 * workers`` items are taken from `items` ahead of the
    results consumed, which bounds the memory held by inputs in flight. An
    exception from `function` is raised when its result is reached.
    """
    if workers == 1:
        for item in items:
            yield function(*item)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tensorpress") as pool:
        pending: deque[Future[Result]] = deque()
        try:
            for item in items:
                pending.append(pool.submit(function, *item))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
