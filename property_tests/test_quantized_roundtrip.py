"""Properties of every quantized format: exact round trip, no mutation, determinism."""

from __future__ import annotations

import torch
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tensorpress import CompressionOptions, compress_state_dict, decompress_state_dict
from tensorpress.qparams import global_scale_from_min_max, group_min_max, weight_qparams

# Weight-only presets cover every format's weight path; A8 variants add activation args.
SCHEMES = {
    "W4A16": "pack-quantized",
    "W4A16_ASYM": "pack-quantized",
    "W2A16": "pack-quantized",
    "W3A16": "pack-quantized",
    "W8A16": "pack-quantized",
    "W8A8": "int-quantized",
    "FP8_DYNAMIC": "float-quantized",
    "FP8_BLOCK": "float-quantized",
    "NVFP4A16": "nvfp4-pack-quantized",
    "MXFP4A16": "mxfp4-pack-quantized",
    "MXFP6A16": "mxfp6-pack-quantized",
    "MXFP8A16": "mxfp8-quantized",
}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PROPERTY_SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@st.composite
def weights(draw: st.DrawFn) -> torch.Tensor:
    """Draw a 2-D weight whose columns fit every group size used here (multiples of 128)."""
    rows = draw(st.integers(min_value=1, max_value=48))
    columns = 128 * draw(st.integers(min_value=1, max_value=3))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(min_value=0, max_value=2**31 - 1))
    kind = draw(st.sampled_from(["normal", "zeros", "ties", "extremes", "sparse"]))
    generator = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([1e-3, 0.02, 1.0, 30.0]))
    values = torch.randn(rows, columns, generator=generator) * scale
    if kind == "zeros":
        values = torch.zeros(rows, columns)
    elif kind == "ties":
        # Multiples of a half step land exactly between quantization levels.
        values = torch.randint(-16, 17, (rows, columns), generator=generator) * 0.5 * scale
    elif kind == "extremes":
        values[:, ::7] = scale * 1e3
        values[:, 3::11] = -scale * 1e3
    elif kind == "sparse":
        values[torch.rand(rows, columns, generator=generator) < 0.6] = 0.0
    return values.to(dtype)


def raw_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """Return the tensor's bytes; a fresh copy has standard strides even for size-1 dims."""
    return torch.empty(tensor.shape, dtype=tensor.dtype).copy_(tensor).reshape(-1).view(torch.uint8)


def fake_quantized(weight: torch.Tensor, scheme_name: str) -> torch.Tensor:
    """Quantize-dequantize `weight` with compressed-tensors' reference ops."""
    args = CompressionOptions.for_scheme(scheme_name).quantization.config_groups["group_0"].weights
    global_scale = None
    if args.strategy == "tensor_group":
        global_scale = global_scale_from_min_max([group_min_max(weight, args)])
    qparams = weight_qparams(weight, args, global_scale=global_scale)
    return fake_quantize(
        weight, qparams["weight_scale"], qparams["weight_zero_point"], args, global_scale
    )


@PROPERTY_SETTINGS
@given(weight=weights(), scheme=st.sampled_from(sorted(SCHEMES)))
def test_round_trip_equals_fake_quantize(weight: torch.Tensor, scheme: str) -> None:
    """decompress(compress(w)) equals compressed-tensors' fake-quantized w, exactly."""
    options = CompressionOptions.for_scheme(scheme, ignore=[])
    result = compress_state_dict({"layer.weight": weight}, options)
    assert result.config["format"] == SCHEMES[scheme]

    dense = decompress_state_dict(result.tensors, result.config, dtype=weight.dtype)

    expected = fake_quantized(weight, scheme)
    assert list(dense) == ["layer.weight"]
    assert dense["layer.weight"].dtype == weight.dtype
    assert torch.equal(dense["layer.weight"], expected)


@PROPERTY_SETTINGS
@given(weight=weights(), scheme=st.sampled_from(sorted(SCHEMES)))
def test_input_never_mutated(weight: torch.Tensor, scheme: str) -> None:
    """compress_state_dict leaves the caller's tensors and dict untouched."""
    state_dict = {"layer.weight": weight, "layer.bias": torch.ones(weight.shape[0])}
    before = {name: tensor.clone() for name, tensor in state_dict.items()}

    compress_state_dict(state_dict, CompressionOptions.for_scheme(scheme, ignore=[]))

    assert sorted(state_dict) == sorted(before)
    for name, tensor in before.items():
        assert torch.equal(state_dict[name], tensor)


@PROPERTY_SETTINGS
@given(weight=weights(), scheme=st.sampled_from(sorted(SCHEMES)))
def test_compressing_twice_gives_same_bytes(weight: torch.Tensor, scheme: str) -> None:
    """Two runs on the same input give identical tensors and config."""
    options = CompressionOptions.for_scheme(scheme, ignore=[])

    first = compress_state_dict({"layer.weight": weight}, options)
    second = compress_state_dict({"layer.weight": weight.clone()}, options)

    assert first.config == second.config
    assert sorted(first.tensors) == sorted(second.tensors)
    for name, tensor in first.tensors.items():
        other = second.tensors[name]
        assert tensor.dtype == other.dtype
        assert torch.equal(raw_bytes(tensor), raw_bytes(other))
