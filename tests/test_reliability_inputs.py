"""Bad inputs to compress_state_dict and decompress_state_dict raise named TensorpressErrors.

Each case checks the exception class and that the message names the tensor
or option at fault, so a caller can act on it without a traceback.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tensorpress import (
    CompressionOptions,
    InvalidOptionsError,
    InvalidTensorError,
    MissingTensorError,
    TensorpressError,
    UnsupportedFormatError,
    compress_state_dict,
    decompress_state_dict,
)


def compressed(scheme: str = "W4A16", rows: int = 16, columns: int = 128) -> tuple[dict, dict]:
    """Return (tensors, config) of one module "proj" compressed with `scheme`."""
    weight = torch.randn(rows, columns, generator=torch.Generator().manual_seed(0))
    result = compress_state_dict({"proj.weight": weight}, CompressionOptions.for_scheme(scheme))
    return dict(result.tensors), copy.deepcopy(result.config)


def static_input_options(symmetric: bool) -> CompressionOptions:
    """W8A8 with static per-tensor input activations (needs a calibrated input_scale)."""
    args = {"num_bits": 8, "type": "int", "strategy": "tensor", "symmetric": symmetric, "dynamic": False}
    weights = {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True, "dynamic": False}
    group = {"targets": ["Linear"], "weights": weights, "input_activations": args}
    return CompressionOptions(quantization={"config_groups": {"group_0": group}})


# ---- decompress_state_dict: configs that do not match the tensors ----------


def test_decompress_config_without_groups() -> None:
    tensors, _ = compressed()

    with pytest.raises(InvalidOptionsError, match="proj.weight_packed is a quantized tensor.*no config_groups"):
        decompress_state_dict(tensors, {"format": "pack-quantized", "quantization_status": "compressed"})


def test_decompress_empty_config() -> None:
    tensors, _ = compressed()

    with pytest.raises(InvalidOptionsError, match="no config_groups"):
        decompress_state_dict(tensors, {})


def test_decompress_module_not_targeted() -> None:
    tensors, config = compressed()
    config["ignore"] = ["proj"]

    with pytest.raises(InvalidOptionsError, match="no config group targets this module"):
        decompress_state_dict(tensors, config)


def test_decompress_unknown_top_level_format() -> None:
    tensors, config = compressed()
    config["format"] = "int3-quantized"

    with pytest.raises(UnsupportedFormatError, match="format 'int3-quantized' is unknown"):
        decompress_state_dict(tensors, config)


def test_decompress_top_level_format_applies_to_groups() -> None:
    # Older compressed-tensors releases wrote the format only at the top level.
    tensors, config = compressed("W8A8")
    del config["config_groups"]["group_0"]["format"]

    dense = decompress_state_dict(tensors, config)

    assert dense["proj.weight"].shape == (16, 128)


def test_decompress_frozen_status_on_compressed() -> None:
    tensors, config = compressed()
    config["quantization_status"] = "frozen"

    with pytest.raises(InvalidOptionsError, match="'frozen'.*proj.weight_packed is compressed"):
        decompress_state_dict(tensors, config)


def test_decompress_frozen_status_on_int8_weight() -> None:
    tensors, config = compressed("W8A8")
    config["quantization_status"] = "frozen"

    with pytest.raises(InvalidOptionsError, match=r"proj.weight \(dtype torch.int8\) is compressed"):
        decompress_state_dict(tensors, config)


def test_decompress_frozen_float_weights_pass() -> None:
    weight = torch.randn(16, 128)
    options = CompressionOptions.for_scheme("W4A16", save_compressed=False)
    result = compress_state_dict({"proj.weight": weight}, options)

    dense = decompress_state_dict(result.tensors, result.config)

    assert torch.equal(dense["proj.weight"], weight)
    assert sorted(dense) == ["proj.weight"]


# ---- decompress_state_dict: missing and malformed tensors -------------------


@pytest.mark.parametrize("name", ["weight_packed", "weight_scale", "weight_shape"])
def test_decompress_missing_tensor(name: str) -> None:
    tensors, config = compressed()
    del tensors[f"proj.{name}"]

    with pytest.raises(MissingTensorError, match=f"proj.{name} is missing"):
        decompress_state_dict(tensors, config)


def test_decompress_missing_fp8_scale() -> None:
    tensors, config = compressed("FP8_DYNAMIC")
    del tensors["proj.weight_scale"]

    with pytest.raises(MissingTensorError, match="proj.weight_scale is missing"):
        decompress_state_dict(tensors, config)


def test_decompress_float_weight_under_packed_format() -> None:
    tensors, config = compressed()
    del tensors["proj.weight_packed"]
    tensors["proj.weight"] = torch.randn(16, 128)

    with pytest.raises(MissingTensorError, match="proj.weight_packed is missing.*'frozen'"):
        decompress_state_dict(tensors, config)


@pytest.mark.parametrize(
    ("weight_shape", "message"),
    [
        (torch.tensor([16, 64]), "64 columns, which group_size 128 does not divide"),
        (torch.tensor([16, 256]), r"proj.weight_packed has shape \(16, 16\).*gives \(16, 32\)"),
        (torch.tensor([8, 128]), r"proj.weight_(packed|scale) has shape"),
        (torch.tensor([16.0, 128.0]), r"proj.weight_shape has dtype torch.float32"),
        (torch.tensor([[16, 128]]), r"proj.weight_shape has dtype torch.int64 and shape \(1, 2\)"),
        (torch.tensor([16, 128, 1]), r"proj.weight_shape .* shape \(3,\)"),
        (torch.tensor([-16, 128]), r"proj.weight_shape contains \[-16, 128\]"),
    ],
)
def test_decompress_wrong_weight_shape(weight_shape: torch.Tensor, message: str) -> None:
    tensors, config = compressed()
    tensors["proj.weight_shape"] = weight_shape

    with pytest.raises(InvalidTensorError, match=message):
        decompress_state_dict(tensors, config)


@pytest.mark.parametrize(
    ("scheme", "name", "replacement", "message"),
    [
        ("W4A16", "weight_scale", torch.ones(3, 1), r"proj.weight_scale has shape \(3, 1\)"),
        ("W4A16", "weight_scale", torch.ones(16, 1, dtype=torch.int32), "proj.weight_scale has dtype torch.int32"),
        ("W4A16", "weight_packed", torch.zeros(16, 16, dtype=torch.int64), "proj.weight_packed has dtype torch.int64"),
        ("W8A8", "weight", torch.zeros(16, 128, dtype=torch.int32), "proj.weight has dtype torch.int32"),
        ("FP8_DYNAMIC", "weight_scale", torch.ones(1), r"proj.weight_scale has shape \(1,\)"),
        ("NVFP4A16", "weight_global_scale", torch.ones(2), r"proj.weight_global_scale has shape \(2,\)"),
        ("NVFP4A16", "weight_packed", torch.zeros(16, 63, dtype=torch.uint8), "126 columns, which group_size 16 does not divide"),
        ("MXFP6A16", "weight_packed", torch.zeros(16, 95, dtype=torch.uint8), "never writes"),
        ("W4A16_ASYM", "weight_zero_point", torch.zeros(16, 1, dtype=torch.int32), r"proj.weight_zero_point has shape \(16, 1\)"),
    ],
)
def test_decompress_malformed_tensor(scheme: str, name: str, replacement: torch.Tensor, message: str) -> None:
    tensors, config = compressed(scheme)
    tensors[f"proj.{name}"] = replacement

    with pytest.raises(InvalidTensorError, match=message):
        decompress_state_dict(tensors, config)


def test_decompress_missing_global_scale() -> None:
    tensors, config = compressed("NVFP4A16")
    del tensors["proj.weight_global_scale"]

    with pytest.raises(MissingTensorError, match="proj.weight_global_scale is missing"):
        decompress_state_dict(tensors, config)


@pytest.mark.parametrize("dtype", ["float16", torch.int8, 16])
def test_decompress_invalid_dtype(dtype: object) -> None:
    tensors, config = compressed()

    with pytest.raises(InvalidOptionsError, match="dtype"):
        decompress_state_dict(tensors, config, dtype=dtype)  # type: ignore[arg-type]


def test_decompress_sparse_tensors_without_sparsity_config() -> None:
    weight = torch.randn(16, 128)
    weight[:, ::2] = 0
    options = CompressionOptions(sparsity_config={"format": "sparse-bitmask", "targets": ["Linear"]})
    result = compress_state_dict({"proj.weight": weight}, options)

    with pytest.raises(InvalidOptionsError, match="proj contains sparse-compressed tensors"):
        decompress_state_dict(result.tensors, {})


def test_decompress_g_idx_error_names_module() -> None:
    columns, group_size = 256, 128
    g_idx = torch.arange(columns) // group_size
    weight = torch.randn(16, columns)
    scale = weight.abs().unflatten(1, (-1, group_size)).amax(-1) / 7
    state_dict = {"layer.weight": weight, "layer.weight_scale": scale, "layer.weight_g_idx": g_idx}
    result = compress_state_dict(state_dict, CompressionOptions.for_scheme("W4A16"))
    tensors = dict(result.tensors)
    tensors["layer.weight_g_idx"] = g_idx + 5

    with pytest.raises(InvalidTensorError, match="layer.weight_g_idx contains group indices"):
        decompress_state_dict(tensors, result.config)


def test_decompress_good_tensors_still_round_trip() -> None:
    for scheme in ("W4A16", "W4A16_ASYM", "W8A8", "FP8_DYNAMIC", "FP8_BLOCK", "NVFP4A16", "MXFP4A16", "MXFP6A16"):
        tensors, config = compressed(scheme, rows=40, columns=384)

        dense = decompress_state_dict(tensors, config)

        assert dense["proj.weight"].shape == (40, 384), scheme


# ---- compress_state_dict: calibrated qparams with bad values ----------------


@pytest.mark.parametrize(
    ("value", "shown"),
    [(0.0, "0.0"), (float("nan"), "nan"), (-1.0, "-1.0"), (float("inf"), "inf")],
)
def test_weight_scale_not_positive(value: float, shown: str) -> None:
    state_dict = {"proj.weight": torch.randn(16, 128), "proj.weight_scale": torch.ones(16, 1)}
    state_dict["proj.weight_scale"][3, 0] = value
    options = CompressionOptions.for_scheme("W8A8")

    with pytest.raises(InvalidTensorError, match=f"proj.weight_scale contains 1 value.*first: {shown}"):
        compress_state_dict(state_dict, options)


@pytest.mark.parametrize("zero_point", [torch.full((16, 1), 8), torch.full((16, 1), -9), torch.full((16, 1), 0.5)])
def test_weight_zero_point_outside_range(zero_point: torch.Tensor) -> None:
    state_dict = {
        "proj.weight": torch.randn(16, 128),
        "proj.weight_scale": torch.ones(16, 1),
        "proj.weight_zero_point": zero_point,
    }

    with pytest.raises(InvalidTensorError, match=r"proj.weight_zero_point .* integers in \[-8, 7\]"):
        compress_state_dict(state_dict, CompressionOptions.for_scheme("W4A16_ASYM"))


def test_weight_global_scale_not_positive() -> None:
    weight = torch.randn(16, 128)
    state_dict = {
        "proj.weight": weight,
        "proj.weight_scale": torch.ones(16, 8),
        "proj.weight_global_scale": torch.tensor([-1.0]),
    }

    with pytest.raises(InvalidTensorError, match="proj.weight_global_scale contains 1 value"):
        compress_state_dict(state_dict, CompressionOptions.for_scheme("NVFP4A16"))


@pytest.mark.parametrize(
    ("input_scale", "message"),
    [
        (torch.ones(16), r"proj.input_scale has shape \(16,\).*one value"),
        (torch.tensor([-0.5]), "proj.input_scale contains 1 value"),
        (torch.tensor([0.0]), "proj.input_scale contains 1 value"),
        (torch.tensor([1], dtype=torch.int32), "proj.input_scale has dtype torch.int32"),
    ],
)
def test_input_scale_invalid(input_scale: torch.Tensor, message: str) -> None:
    state_dict = {"proj.weight": torch.randn(16, 128), "proj.input_scale": input_scale}

    with pytest.raises(InvalidTensorError, match=message):
        compress_state_dict(state_dict, static_input_options(symmetric=True))


def test_scalar_input_scale_accepted() -> None:
    state_dict = {"proj.weight": torch.randn(16, 128), "proj.input_scale": torch.tensor(0.02)}

    result = compress_state_dict(state_dict, static_input_options(symmetric=True))

    assert "proj.input_scale" in result.tensors


def test_static_asymmetric_input_needs_zero_point() -> None:
    state_dict = {"proj.weight": torch.randn(16, 128), "proj.input_scale": torch.tensor([0.02])}

    with pytest.raises(MissingTensorError, match="proj.input_zero_point is missing"):
        compress_state_dict(state_dict, static_input_options(symmetric=False))


def test_static_asymmetric_input_zero_point_range() -> None:
    state_dict = {
        "proj.weight": torch.randn(16, 128),
        "proj.input_scale": torch.tensor([0.02]),
        "proj.input_zero_point": torch.tensor([200], dtype=torch.int32),
    }

    with pytest.raises(InvalidTensorError, match=r"proj.input_zero_point .* \[-128, 127\]"):
        compress_state_dict(state_dict, static_input_options(symmetric=False))


def test_static_asymmetric_input_with_zero_point_passes() -> None:
    state_dict = {
        "proj.weight": torch.randn(16, 128),
        "proj.input_scale": torch.tensor([0.02]),
        "proj.input_zero_point": torch.tensor([3], dtype=torch.int8),
    }

    result = compress_state_dict(state_dict, static_input_options(symmetric=False))

    assert torch.equal(result.tensors["proj.input_zero_point"], torch.tensor([3], dtype=torch.int8))


def test_nvfp4_input_global_scale_not_positive() -> None:
    state_dict = {"proj.weight": torch.randn(16, 128), "proj.input_global_scale": torch.tensor([0.0])}

    with pytest.raises(InvalidTensorError, match="proj.input_global_scale contains 1 value"):
        compress_state_dict(state_dict, CompressionOptions.for_scheme("NVFP4"))


@pytest.mark.parametrize("scheme", ["W8A8", "W4A16", "FP8_DYNAMIC", "NVFP4A16"])
@pytest.mark.parametrize("shape", [(8, 0), (0, 128)])
def test_empty_weight_rejected(scheme: str, shape: tuple[int, int]) -> None:
    with pytest.raises(InvalidTensorError, match=r"proj.weight has shape .* no elements"):
        compress_state_dict({"proj.weight": torch.randn(*shape)}, CompressionOptions.for_scheme(scheme))


def test_every_error_is_a_tensorpress_error() -> None:
    for error in (InvalidOptionsError, InvalidTensorError, MissingTensorError, UnsupportedFormatError):
        assert issubclass(error, TensorpressError)
