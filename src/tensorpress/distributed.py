"""Split checkpoint compression over the ranks of a torch.distributed group.

Under ``torchrun --nproc_per_node=N -m tensorpress compress SRC DST ...``
every rank opens the same source folder and builds the same plan. Each rank
then compresses a disjoint set of modules, balanced by input bytes, into
its own spool file. The ranks exchange where their outputs lie, and each
rank writes a disjoint set of output shards: shard ``k`` (counting from 0)
goes to rank ``k % N``. After a barrier, rank 0 writes the index, config.json and
the copied files, and renames the folder into place. The shard split is
computed from the same tensors in the same order as in one process, so the
bytes equal a single-process run.

Fused NVFP4 partners (q/k/v, gate/up) share a global scale. A rank that
compresses any member of such a group reads the weights of all members,
wherever they sit, so the scale matches the single-process one.

Every rank writes into the same staging folder next to the output and reads
the other ranks' spool files, so all ranks need the source and the output's
parent folder on one shared file system. On one machine that always holds.

The group uses the gloo backend on CPU. Each step that can fail on one rank
only (compressing, writing) is followed by an exchange of errors, so a
failure on one rank raises on every rank instead of leaving the others
waiting in a collective.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from tensorpress.errors import CheckpointError
from tensorpress.writer import atomic_directory

__all__ = ["Ranks", "TorchRanks", "ranks_from_environment"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# A rank waits in a collective until the slowest rank finishes its share of
# the compression, which grows with the model. gloo's default of 30 minutes
# would abort long runs, so the wait limit is a day.
_COLLECTIVE_TIMEOUT = timedelta(hours=24)


class Ranks:
    """The processes that share one checkpoint compression: by default this process alone.

    `compress_checkpoint` and `decompress_checkpoint` call these methods at
    each step. This base class is the single-process case, where every
    collective is trivial; `TorchRanks` runs them over torch.distributed.
    """

    rank = 0
    world_size = 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, which writes the index and config and renames the folder."""
        return self.rank == 0

    def all_gather(self, value: T) -> list[T]:
        """Return every rank's `value`, in rank order."""
        return [value]

    def run(self, step: Callable[[], T], description: str) -> T:
        """Run `step` on this rank, then raise on every rank if it failed on any.

        Returns this rank's result. The rank whose step failed re-raises its
        own error; the others raise `CheckpointError` naming that rank.
        """
        error: Exception | None = None
        result: Any = None
        try:
            result = step()
        except Exception as caught:  # re-raised below, after the other ranks learn of it
            error = caught
        messages = self.all_gather(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        for rank, message in enumerate(messages):
            if message is not None:
                raise CheckpointError(f"rank {rank} of {self.world_size} failed to {description}: {message}")
        return result

    def assign_modules(self, sizes: Mapping[str, int]) -> set[str]:
        """Return the modules this rank compresses, from every module's input size in bytes.

        Modules are taken in `sizes`' order and each goes to the rank with
        the fewest bytes so far (the lowest rank on a tie), so every rank
        computes the same assignment.
        """
        loads = [0] * self.world_size
        owned = set()
        for module, size in sizes.items():
            target = min(range(self.world_size), key=lambda rank: (loads[rank], rank))
            loads[target] += size
            if target == self.rank:
                owned.add(module)
        return owned

    def writes_shard(self, number: int) -> bool:
        """Return whether this rank writes output shard `number` (counting from 0)."""
        return number % self.world_size == self.rank

    def spool_name(self, base: str) -> str:
        """Return this rank's spool file name inside the shared staging folder."""
        return base if self.world_size == 1 else f"{base}-rank{self.rank}"

    @contextmanager
    def output_directory(self, destination: str | os.PathLike[str]) -> Iterator[Path]:
        """Yield the staging folder that replaces `destination` once every rank succeeds.

        Rank 0 creates it with `atomic_directory` and sends its path to the
        other ranks. On success rank 0 renames it into place after all ranks
        are done; on error it is removed.
        """
        stack = ExitStack()

        def enter() -> str | None:
            return str(stack.enter_context(atomic_directory(destination))) if self.is_main else None

        created = self.run(enter, "create the output folder")
        staging = Path(self.all_gather(created)[0])
        try:
            yield staging
        except BaseException:
            stack.__exit__(*sys.exc_info())
            raise
        self.run(stack.close, "rename the output folder into place")


class TorchRanks(Ranks):
    """The ranks of the default torch.distributed process group."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def all_gather(self, value: T) -> list[T]:
        gathered: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(gathered, value)
        return gathered


@contextmanager
def ranks_from_environment() -> Iterator[Ranks | None]:
    """Yield `TorchRanks` when torchrun started this process, else None.

    torchrun sets ``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR`` and
    ``MASTER_PORT``. When ``WORLD_SIZE`` is above 1 and no process group
    exists yet, this starts a gloo group from those variables and destroys
    it on exit. An existing group is used as it is and left alone.

    Raises:
        CheckpointError: WORLD_SIZE is not an integer, or the group failed to start.
    """
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        world_size = int(text)
    except ValueError:
        raise CheckpointError(f"WORLD_SIZE={text!r} is not an integer; unset it or start the ranks with torchrun") from None
    if world_size <= 1:
        yield None
        return

    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        try:
            dist.init_process_group("gloo", timeout=_COLLECTIVE_TIMEOUT)
        except (RuntimeError, ValueError) as error:
            raise CheckpointError(
                f"starting the gloo process group of {world_size} ranks failed: {error}; check "
                "MASTER_ADDR, MASTER_PORT and RANK, or start the command with torchrun"
            ) from error
    try:
        ranks = TorchRanks()
        logger.info("rank %d of %d", ranks.rank, ranks.world_size)
        yield ranks
    finally:
        if created:
            dist.destroy_process_group()
