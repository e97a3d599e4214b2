"""Numpy, ml_dtypes and lazy inputs give the bytes of the torch path."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from tensorpress import (
    CompressionOptions,
    InvalidOptionsError,
    InvalidTensorError,
    compress_state_dict,
)
from tensorpress.arrays import as_tensor_mapping, to_numpy, to_tensor

from conftest import DTYPES, SCHEMES, assert_same_tensors, load_golden_input

NUMPY_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def numpy_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Return the state dict as numpy arrays, bfloat16 as ml_dtypes.bfloat16, by bytes."""
    arrays = {}
    for name, tensor in state_dict.items():
        if tensor.dtype == torch.bfloat16:
            arrays[name] = tensor.view(torch.uint16).numpy().copy().view(ml_dtypes.bfloat16)
        else:
            arrays[name] = tensor.numpy().copy()
    return arrays


def tensors_from_numpy(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Return numpy results as torch tensors with the same bytes, for assert_same_tensors."""
    return {name: to_tensor(name, array) for name, array in arrays.items()}


class CountingMapping(Mapping[str, np.ndarray]):
    """A lazy mapping that records every tensor it hands out."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.arrays = arrays
        self.loads: list[str] = []

    def __getitem__(self, name: str) -> np.ndarray:
        self.loads.append(name)
        return self.arrays[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.arrays)

    def __len__(self) -> int:
        return len(self.arrays)


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
@pytest.mark.parametrize("scheme", SCHEMES)
def test_numpy_input_matches_torch(scheme: str, dtype_name: str) -> None:
    state_dict = load_golden_input(tied=False, dtype=DTYPES[dtype_name])
    options = CompressionOptions.for_scheme(scheme, ignore=["lm_head"])
    expected = compress_state_dict(state_dict, options)

    arrays = numpy_state_dict(state_dict)
    assert all(array.dtype == NUMPY_DTYPES[dtype_name] for array in arrays.values())
    actual = compress_state_dict(arrays, options)

    assert list(actual.tensors) == list(expected.tensors)
    assert_same_tensors(dict(actual.tensors), dict(expected.tensors))
    assert actual.config == expected.config


@pytest.mark.parametrize("scheme", ["W4A16", "FP8_DYNAMIC", "NVFP4A16", "MXFP8A16"])
def test_numpy_output_matches_torch(scheme: str) -> None:
    state_dict = load_golden_input(tied=False, dtype=torch.bfloat16)
    options = CompressionOptions.for_scheme(scheme, ignore=["lm_head"])
    expected = compress_state_dict(state_dict, options)

    actual = compress_state_dict(numpy_state_dict(state_dict), options, return_type="numpy")

    assert all(isinstance(array, np.ndarray) for array in actual.tensors.values())
    assert list(actual.tensors) == list(expected.tensors)
    assert_same_tensors(tensors_from_numpy(actual.tensors), dict(expected.tensors))
    assert actual.config == expected.config


def test_numpy_output_uses_ml_dtypes() -> None:
    weights = {"proj.weight": torch.randn(32, 64, dtype=torch.bfloat16)}
    result = compress_state_dict(
        weights, CompressionOptions.for_scheme("FP8_DYNAMIC"), return_type="numpy"
    )

    assert result.tensors["proj.weight"].dtype == ml_dtypes.float8_e4m3fn
    assert result.tensors["proj.weight_scale"].dtype == ml_dtypes.bfloat16


def test_sparse_numpy_input_matches_torch() -> None:
    torch.manual_seed(0)
    weight = torch.randn(64, 128)
    weight.view(-1, 4)[:, :2] = 0  # 2:4 sparse rows
    state_dict = {"layer.proj.weight": weight, "layer.norm.weight": torch.ones(128)}
    options = CompressionOptions(sparsity_config={"format": "sparse-24-bitmask"})
    expected = compress_state_dict(state_dict, options)

    actual = compress_state_dict(numpy_state_dict(state_dict), options)

    assert "layer.proj.bitmask" in expected.tensors
    assert_same_tensors(dict(actual.tensors), dict(expected.tensors))
    assert actual.config == expected.config


@pytest.mark.parametrize("framework", ["pt", "np"])
def test_safe_open_input_matches_torch(tmp_path: Path, framework: str) -> None:
    state_dict = load_golden_input(tied=False, dtype=torch.float32)
    save_file(state_dict, tmp_path / "model.safetensors")
    options = CompressionOptions.for_scheme("NVFP4A16", ignore=["lm_head"])
    expected = compress_state_dict(state_dict, options)

    with safe_open(tmp_path / "model.safetensors", framework=framework) as handle:
        actual = compress_state_dict(handle, options)

    assert_same_tensors(dict(actual.tensors), dict(expected.tensors))
    assert actual.config == expected.config


def test_lazy_mapping_loads_on_access() -> None:
    state_dict = load_golden_input(tied=False, dtype=torch.float32)
    source = CountingMapping(numpy_state_dict(state_dict))
    options = CompressionOptions.for_scheme("W8A16", ignore=["lm_head"])

    mapping = as_tensor_mapping(source)
    assert "lm_head.weight" in mapping
    assert source.loads == []

    actual = compress_state_dict(source, options)

    assert_same_tensors(dict(actual.tensors), dict(compress_state_dict(state_dict, options).tensors))
    assert set(source.loads) == set(state_dict)


def test_torch_dict_returned_unchanged() -> None:
    state_dict = {"proj.weight": torch.randn(8, 16)}

    assert as_tensor_mapping(state_dict) is state_dict


def test_numpy_input_shares_memory() -> None:
    array = np.ones((4, 8), dtype=ml_dtypes.bfloat16)

    tensor = to_tensor("proj.weight", array)

    assert tensor.dtype == torch.bfloat16
    assert tensor.data_ptr() == array.ctypes.data
    passthrough = compress_state_dict({"norm.weight": array[0]}, return_type="numpy")
    assert np.shares_memory(passthrough.tensors["norm.weight"], array)


def test_flax_kernel_transpose_matches_torch() -> None:
    # Flax stores a Dense kernel as (in, out); its transpose is a strided view.
    kernel = np.random.default_rng(0).standard_normal((128, 64)).astype(np.float32)
    options = CompressionOptions.for_scheme("W4A16")

    actual = compress_state_dict({"proj.weight": kernel.T}, options)
    expected = compress_state_dict({"proj.weight": torch.from_numpy(kernel.T.copy())}, options)

    assert_same_tensors(dict(actual.tensors), dict(expected.tensors))


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=">f4").reshape(3, 4),
        np.arange(12, dtype=np.float32).reshape(3, 4)[::-1],
        np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2],
    ],
    ids=["big-endian", "negative-stride", "strided"],
)
def test_unusual_layouts_convert(array: np.ndarray) -> None:
    tensor = to_tensor("proj.weight", array)

    assert tensor.dtype == torch.float32
    assert tensor.tolist() == array.astype(np.float32).tolist()


def test_read_only_array_does_not_warn() -> None:
    array = np.ones((4, 8), dtype=np.float32)
    array.flags.writeable = False

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensor = to_tensor("proj.weight", array)

    assert tensor.data_ptr() == array.ctypes.data


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.zeros((2, 2), dtype="V2"), "pip install ml_dtypes"),
        (np.zeros((2, 2), dtype=ml_dtypes.float4_e2m1fn), "cast it to float32"),
        (np.zeros((2, 2), dtype=ml_dtypes.int4), "cast it to float32"),
        (np.zeros((2, 2), dtype=object), "pass a numeric array"),
        (np.zeros((2, 2), dtype=np.longdouble), "pass a numeric array"),
    ],
    ids=["raw-bytes", "float4", "int4", "object", "longdouble"],
)
def test_unsupported_dtype_names_tensor_and_fix(array: np.ndarray, expected: str) -> None:
    if array.dtype == np.longdouble and np.dtype(np.longdouble).itemsize == 8:
        pytest.skip("longdouble is float64 on this platform")

    with pytest.raises(InvalidTensorError) as raised:
        compress_state_dict({"layer.proj.weight": array})

    assert "layer.proj.weight" in str(raised.value)
    assert expected in str(raised.value)


def test_lazy_value_of_wrong_type_names_tensor() -> None:
    source = CountingMapping({"layer.proj.weight": [[1.0, 2.0]]})  # type: ignore[dict-item]

    with pytest.raises(InvalidTensorError, match=r"layer\.proj\.weight: expected a torch.Tensor or numpy array, got list"):
        compress_state_dict(source)


def test_non_string_name_rejected() -> None:
    with pytest.raises(InvalidTensorError, match="is not a string"):
        compress_state_dict({0: np.ones(3, dtype=np.float32)})  # type: ignore[dict-item]


def test_non_mapping_rejected() -> None:
    with pytest.raises(InvalidTensorError, match="state_dict must be a mapping"):
        compress_state_dict([("proj.weight", np.ones(3))])  # type: ignore[arg-type]


def test_invalid_return_type_rejected() -> None:
    with pytest.raises(InvalidOptionsError, match="return_type='jax' is invalid"):
        compress_state_dict({"proj.weight": torch.ones(4, 4)}, return_type="jax")


def test_numpy_output_without_ml_dtypes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # makes the import fail
    weights = {"proj.weight": torch.randn(32, 128, dtype=torch.bfloat16)}

    with pytest.raises(InvalidTensorError) as raised:
        compress_state_dict(weights, CompressionOptions.for_scheme("W8A16"), return_type="numpy")

    assert "proj.weight_scale" in str(raised.value)
    assert "pip install ml_dtypes" in str(raised.value)


def test_numpy_output_of_float32_needs_no_ml_dtypes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)
    weights = {"proj.weight": torch.randn(32, 128)}

    result = compress_state_dict(weights, CompressionOptions.for_scheme("W8A8"), return_type="numpy")

    assert result.tensors["proj.weight"].dtype == np.int8
    assert result.tensors["proj.weight_scale"].dtype == np.float32


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 8),
    groups=st.integers(1, 3),
    dtype_name=st.sampled_from(["float32", "float16", "bfloat16"]),
    scheme=st.sampled_from(["W4A16", "W8A8", "FP8_DYNAMIC", "NVFP4A16"]),
    seed=st.integers(0, 2**16),
)
def test_numpy_round_trip_property(rows: int, groups: int, dtype_name: str, scheme: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows * 8, groups * 128, generator=generator).to(getattr(torch, dtype_name))
    options = CompressionOptions.for_scheme(scheme)
    expected = compress_state_dict({"proj.weight": weight}, options)

    actual = compress_state_dict(numpy_state_dict({"proj.weight": weight}), options, return_type="numpy")

    assert_same_tensors(tensors_from_numpy(actual.tensors), dict(expected.tensors))
    for name, array in actual.tensors.items():
        assert to_numpy(name, expected.tensors[name]).dtype == array.dtype
