"""Module-level threads: same bytes for any worker count, ordered results, errors raised."""

from __future__ import annotations

import pytest
import torch

from tensorpress import CompressionOptions, compress_state_dict
from tensorpress.concurrency import map_in_order, resolve_workers
from tensorpress.errors import InvalidOptionsError


def _state_dict() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(6):
        tensors[f"layers.{layer}.proj.weight"] = torch.randn(48, 256, generator=generator).to(torch.bfloat16)
        tensors[f"layers.{layer}.norm.weight"] = torch.ones(256, dtype=torch.bfloat16)
    return tensors


def _raw_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("scheme", ["W4A16", "FP8_DYNAMIC", "NVFP4A16"])
def test_workers_give_same_bytes(scheme: str) -> None:
    options = CompressionOptions.for_scheme(scheme, ignore=[])
    serial = compress_state_dict(_state_dict(), options, workers=1)

    threaded = compress_state_dict(_state_dict(), options, workers=4)

    assert list(threaded.tensors) == list(serial.tensors)
    assert threaded.config == serial.config
    for name, tensor in serial.tensors.items():
        other = threaded.tensors[name]
        assert other.dtype == tensor.dtype
        assert torch.equal(_raw_bytes(other), _raw_bytes(tensor)), name


def test_map_in_order_keeps_order() -> None:
    items = [(index,) for index in range(20)]

    results = list(map_in_order(lambda index: index * index, iter(items), 3))

    assert results == [index * index for index in range(20)]


def test_map_in_order_raises_errors() -> None:
    def fail_on_five(index: int) -> int:
        if index == 5:
            raise ValueError("five")
        return index

    with pytest.raises(ValueError, match="five"):
        list(map_in_order(fail_on_five, [(index,) for index in range(10)], 2))


@pytest.mark.parametrize("workers", [0, -1, 1.5, True, "2"])
def test_invalid_workers_rejected(workers: object) -> None:
    with pytest.raises(InvalidOptionsError, match="workers must be a positive integer"):
        resolve_workers(workers)  # type: ignore[arg-type]


def test_default_workers_follow_torch_threads() -> None:
    assert resolve_workers(None) == torch.get_num_threads()
