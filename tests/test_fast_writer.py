"""write_safetensors_file writes exactly the bytes of safetensors' save_file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tensorpress.safetensors_file import write_safetensors_file

ALL_DTYPES = (
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.float8_e5m2,
    torch.float8_e4m3fn,
    torch.int16,
    torch.uint16,
    torch.float16,
    torch.bfloat16,
    torch.int32,
    torch.uint32,
    torch.float32,
    torch.float64,
    torch.int64,
    torch.uint64,
)


def _random_tensor(dtype: torch.dtype, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    raw = torch.randint(0, 256, (max(1, torch.Size(shape).numel()) * torch.empty(0, dtype=dtype).element_size(),), generator=generator, dtype=torch.uint8)
    values = raw.view(dtype)[: torch.Size(shape).numel()].reshape(shape)
    if dtype == torch.bool:
        values = values.view(torch.uint8).bitwise_and(1).view(torch.bool)
    return values.clone()


def _assert_same_file(tmp_path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> None:
    expected_path = tmp_path / "expected.safetensors"
    actual_path = tmp_path / "actual.safetensors"
    save_file(tensors, str(expected_path), metadata=metadata)

    write_safetensors_file(tensors, actual_path, metadata=metadata)

    assert actual_path.read_bytes() == expected_path.read_bytes()


def test_every_dtype_matches_save_file(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    tensors = {
        f"layer.{index}.{str(dtype).split('.')[-1]}": _random_tensor(dtype, (3, index + 1), generator)
        for index, dtype in enumerate(ALL_DTYPES)
    }

    _assert_same_file(tmp_path, tensors, {"format": "pt"})


@pytest.mark.parametrize("seed", range(8))
def test_random_names_and_shapes_match(tmp_path: Path, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    names = ["a", "b.weight", "é.unicode", 'quote"name', "tab\tname", "z", "model.layers.10.x", "model.layers.9.x"]
    tensors = {}
    for index, name in enumerate(names):
        dtype = ALL_DTYPES[int(torch.randint(0, len(ALL_DTYPES), (1,), generator=generator))]
        shape = tuple(int(size) for size in torch.randint(0, 5, (index % 4,), generator=generator))
        tensors[name] = _random_tensor(dtype, shape, generator)

    _assert_same_file(tmp_path, tensors, {"format": "pt"} if seed % 2 else None)


def test_empty_and_scalar_tensors_match(tmp_path: Path) -> None:
    tensors = {"empty": torch.zeros(0, 4), "scalar": torch.tensor(3.5), "other": torch.ones(2, dtype=torch.int64)}

    _assert_same_file(tmp_path, tensors, {"format": "pt"})


def test_written_file_loads_back(tmp_path: Path) -> None:
    tensors = {"packed": torch.arange(12, dtype=torch.int32).reshape(3, 4), "scale": torch.rand(3, 1).to(torch.bfloat16)}
    path = tmp_path / "model.safetensors"

    write_safetensors_file(tensors, path, metadata={"format": "pt"})

    loaded = load_file(path)
    assert sorted(loaded) == sorted(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor)


def test_several_metadata_keys_written_sorted(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"

    write_safetensors_file({"x": torch.ones(2)}, path, metadata={"zeta": "1", "alpha": "2"})

    raw = path.read_bytes()
    assert raw[8:].startswith(b'{"__metadata__":{"alpha":"2","zeta":"1"},')
