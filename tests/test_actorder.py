"""Activation ordering: group scales picked per column through weight_g_idx."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.quantization.lifecycle.forward import fake_quantize

from tensorpress import CompressionOptions, InvalidTensorError, compress_state_dict, decompress_state_dict
from tensorpress.qparams import weight_qparams


def actorder_state_dict(scheme: str, seed: int = 0) -> tuple[dict[str, torch.Tensor], CompressionOptions]:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(16, 256, generator=generator)
    g_idx = (torch.randperm(256, generator=generator) // 128).to(torch.int32)
    options = CompressionOptions.for_scheme(scheme)
    args = options.quantization.config_groups["group_0"].weights
    grouped_columns = torch.argsort(g_idx, stable=True)
    qparams = weight_qparams(weight[:, grouped_columns], args)
    state_dict = {
        "layer.weight": weight,
        "layer.weight_scale": qparams["weight_scale"],
        "layer.weight_zero_point": qparams["weight_zero_point"],
        "layer.weight_g_idx": g_idx,
    }
    return state_dict, options


@pytest.mark.parametrize("scheme", ["W4A16", "W4A16_ASYM", "W8A16"])
def test_g_idx_round_trip_exact(scheme: str) -> None:
    state_dict, options = actorder_state_dict(scheme)
    args = options.quantization.config_groups["group_0"].weights.model_copy(update={"group_size": 1})
    columns = state_dict["layer.weight_g_idx"].long()
    expected = fake_quantize(
        state_dict["layer.weight"],
        state_dict["layer.weight_scale"][:, columns],
        state_dict["layer.weight_zero_point"][:, columns],
        args,
    )

    result = compress_state_dict(state_dict, options)
    dense = decompress_state_dict(result.tensors, result.config)

    assert torch.equal(result.tensors["layer.weight_g_idx"], state_dict["layer.weight_g_idx"])
    assert result.tensors["layer.weight_scale"].shape == (16, 2)
    assert torch.equal(dense["layer.weight"], expected)
    assert "layer.weight_g_idx" not in dense


def test_g_idx_out_of_range_rejected() -> None:
    state_dict, options = actorder_state_dict("W4A16")
    state_dict["layer.weight_g_idx"] = state_dict["layer.weight_g_idx"] + 5

    with pytest.raises(InvalidTensorError, match="weight_g_idx contains group indices outside"):
        compress_state_dict(state_dict, options)


def test_g_idx_wrong_length_rejected() -> None:
    state_dict, options = actorder_state_dict("W4A16")
    state_dict["layer.weight_g_idx"] = state_dict["layer.weight_g_idx"][:100]

    with pytest.raises(InvalidTensorError, match=r"shape \(256,\)"):
        compress_state_dict(state_dict, options)


def test_g_idx_config_declares_group_actorder() -> None:
    state_dict, options = actorder_state_dict("W4A16")
    state_dict["plain.weight"] = torch.randn(16, 256)
    plain_options = CompressionOptions.for_scheme("W4A16", ignore=[])

    result = compress_state_dict(state_dict, options)
    plain = compress_state_dict({"plain.weight": torch.randn(16, 256)}, plain_options)

    assert result.config["config_groups"]["group_0"]["weights"]["actorder"] == "group"
    assert plain.config["config_groups"]["group_0"]["weights"]["actorder"] is None


def test_group_actorder_config_round_trips() -> None:
    state_dict, options = actorder_state_dict("W4A16_ASYM")
    result = compress_state_dict(state_dict, options)

    reparsed = CompressionOptions(quantization=result.config)
    dense = decompress_state_dict(result.tensors, result.config)

    assert reparsed.quantization.config_groups["group_0"].weights.actorder is None
    assert dense["layer.weight"].shape == (16, 256)
