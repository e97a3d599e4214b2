"""The fast kernels give exactly compressed-tensors 0.20.1's bytes.

compressed-tensors is the oracle: every property compresses (or packs,
unpacks, decompresses) the same input with tensorpress.formats.fast and
with compressed-tensors' own code and compares raw bytes. Each property
also asserts that the fast path ran, so a silent fallback to
compressed-tensors cannot make it pass.
"""

from __future__ import annotations

import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tensorpress import CompressionOptions
from tensorpress.formats import fast, get_format
from tensorpress.formats.quantized import _compress_fast
from tensorpress.qparams import _flatten_weight, global_scale_from_min_max, group_min_max, weight_qparams

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PROPERTY_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
KINDS = ("normal", "zeros", "negative_zeros", "ties", "extremes", "sparse", "tiny")


def raw_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """Return the tensor's bytes; a fresh copy has standard strides even for size-1 dims."""
    return torch.empty(tensor.shape, dtype=tensor.dtype).copy_(tensor).reshape(-1).view(torch.uint8)


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(actual) == list(expected)
    for name, want in expected.items():
        got = actual[name]
        assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
        assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        assert torch.equal(raw_bytes(got), raw_bytes(want)), f"{name}: bytes differ"


@st.composite
def weights(draw: st.DrawFn, *, column_multiple: int, min_rows: int = 1) -> torch.Tensor:
    """Draw a 2-D weight: random, all zero, -0.0, ties, extremes, sparse or subnormal values."""
    rows = draw(st.integers(min_value=min_rows, max_value=min_rows + 72))
    columns = column_multiple * draw(st.integers(min_value=1, max_value=4))
    dtype = draw(st.sampled_from(DTYPES))
    kind = draw(st.sampled_from(KINDS))
    generator = torch.Generator().manual_seed(draw(st.integers(min_value=0, max_value=2**31 - 1)))
    scale = draw(st.sampled_from([1e-3, 0.02, 1.0, 30.0]))
    values = torch.randn(rows, columns, generator=generator) * scale
    if kind == "zeros":
        values = torch.zeros(rows, columns)
    elif kind == "negative_zeros":
        values[torch.rand(rows, columns, generator=generator) < 0.5] = -0.0
    elif kind == "ties":
        # Multiples of a half step land exactly between quantization levels.
        values = torch.randint(-16, 17, (rows, columns), generator=generator) * 0.5 * scale
    elif kind == "extremes":
        values[:, ::7] = scale * 1e3
        values[:, 3::11] = -scale * 1e3
    elif kind == "sparse":
        values[torch.rand(rows, columns, generator=generator) < 0.6] = 0.0
    elif kind == "tiny":
        values = values * 1e-30
    return values.to(dtype)


def int_scheme(num_bits: int, symmetric: bool, strategy: str, group_size: int | None) -> QuantizationScheme:
    args = QuantizationArgs(
        num_bits=num_bits,
        type="int",
        symmetric=symmetric,
        strategy=strategy,
        group_size=group_size if strategy == "group" else None,
    )
    return QuantizationScheme(targets=["Linear"], weights=args)


def preset_scheme(name: str) -> QuantizationScheme:
    return CompressionOptions.for_scheme(name).quantization.config_groups["group_0"]


def module_tensors(weight: torch.Tensor, scheme: QuantizationScheme) -> dict[str, torch.Tensor]:
    args = scheme.weights
    global_scale = None
    if args.strategy == "tensor_group":
        global_scale = global_scale_from_min_max([group_min_max(weight, args)])
    return {"weight": weight, **weight_qparams(weight, args, global_scale=global_scale)}


def compare_with_compressed_tensors(
    format_name: str, tensors: dict[str, torch.Tensor], scheme: QuantizationScheme
) -> dict[str, torch.Tensor]:
    compressor = BaseCompressor.get_value_from_registry(format_name)
    expected = dict(compressor.compress(dict(tensors), scheme))

    actual = _compress_fast(format_name, tensors, scheme)

    assert actual is not None, "the fast path fell back to compressed-tensors"
    assert_same_tensors(actual, expected)
    assert_same_tensors(get_format(format_name).compress(tensors, scheme), expected)
    return expected


def compare_decompression(
    format_name: str, compressed: dict[str, torch.Tensor], scheme: QuantizationScheme
) -> None:
    compressor = BaseCompressor.get_value_from_registry(format_name)
    expected = compressor.decompress(dict(compressed), scheme)["weight"]

    actual = get_format(format_name).decompress(compressed, scheme, None)["weight"]

    assert actual.dtype == expected.dtype
    assert torch.equal(raw_bytes(actual), raw_bytes(expected))


@PROPERTY_SETTINGS
@given(
    num_bits=st.integers(min_value=1, max_value=8),
    rows=st.integers(min_value=1, max_value=40),
    columns=st.integers(min_value=1, max_value=300),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_pack_int32_matches_pack_to_int32(num_bits: int, rows: int, columns: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    low, high = -(1 << (num_bits - 1)), 1 << (num_bits - 1)
    values = torch.randint(low, high, (rows, columns), generator=generator, dtype=torch.int8)

    packed = fast.pack_int32(values, num_bits)

    expected = pack_to_int32(values, num_bits)
    assert packed is not None
    assert packed.dtype == torch.int32
    assert torch.equal(packed, expected)
    unpacked = fast.unpack_int32(expected, num_bits, columns)
    assert unpacked is not None
    assert torch.equal(unpacked, unpack_from_int32(expected, num_bits, torch.Size([rows, columns])))
    assert torch.equal(unpacked, values)


@PROPERTY_SETTINGS
@given(
    weight=weights(column_multiple=64),
    strategy=st.sampled_from(["channel", "group", "tensor_group"]),
    group_size=st.sampled_from([16, 32, 64]),
)
def test_group_min_max_matches_amin_amax(weight: torch.Tensor, strategy: str, group_size: int) -> None:
    args = QuantizationArgs(
        num_bits=4,
        type="float" if strategy == "tensor_group" else "int",
        strategy=strategy,
        group_size=None if strategy == "channel" else group_size,
    )
    observed = _flatten_weight(weight, args, "weight")

    reduced = fast.group_min_max(weight, args)

    assert reduced is not None
    assert torch.equal(reduced[0], torch.amin(observed, dim=(0, -1)))
    assert torch.equal(reduced[1], torch.amax(observed, dim=(0, -1)))
    assert reduced[0].dtype == weight.dtype


@PROPERTY_SETTINGS
@given(
    data=st.data(),
    num_bits=st.integers(min_value=2, max_value=8),
    symmetric=st.booleans(),
    strategy=st.sampled_from(["channel", "group", "tensor"]),
    group_size=st.sampled_from([16, 32, 64, 128]),
)
def test_pack_quantized_matches(
    data: st.DataObject, num_bits: int, symmetric: bool, strategy: str, group_size: int
) -> None:
    scheme = int_scheme(num_bits, symmetric, strategy, group_size)
    # Asymmetric zero points are packed along rows; compressed-tensors 0.20.1
    # cannot unpack a single packed row under torch 2.13, so use more rows.
    weight = data.draw(weights(column_multiple=128, min_rows=1 if symmetric else 33))
    tensors = module_tensors(weight, scheme)

    compressed = compare_with_compressed_tensors("pack-quantized", tensors, scheme)

    compare_decompression("pack-quantized", compressed, scheme)


@PROPERTY_SETTINGS
@given(
    data=st.data(),
    num_bits=st.integers(min_value=2, max_value=8),
    symmetric=st.booleans(),
    strategy=st.sampled_from(["channel", "group", "tensor"]),
    group_size=st.sampled_from([16, 32, 128]),
)
def test_naive_int_matches(
    data: st.DataObject, num_bits: int, symmetric: bool, strategy: str, group_size: int
) -> None:
    scheme = int_scheme(num_bits, symmetric, strategy, group_size)
    tensors = module_tensors(data.draw(weights(column_multiple=128)), scheme)

    compressed = compare_with_compressed_tensors("int-quantized", tensors, scheme)

    compare_decompression("int-quantized", compressed, scheme)


@PROPERTY_SETTINGS
@given(
    data=st.data(),
    preset=st.sampled_from(["W8A8", "W4A16", "W4A16_ASYM", "W8A16", "W2A16", "W3A16"]),
)
def test_int_presets_match(data: st.DataObject, preset: str) -> None:
    scheme = preset_scheme(preset)
    format_name = "int-quantized" if preset == "W8A8" else "pack-quantized"
    min_rows = 33 if preset.endswith("ASYM") else 1
    tensors = module_tensors(data.draw(weights(column_multiple=128, min_rows=min_rows)), scheme)

    compressed = compare_with_compressed_tensors(format_name, tensors, scheme)

    compare_decompression(format_name, compressed, scheme)


@PROPERTY_SETTINGS
@given(
    data=st.data(),
    strategy=st.sampled_from(["tensor", "channel", "group", "block"]),
)
def test_fp8_matches(data: st.DataObject, strategy: str) -> None:
    args = QuantizationArgs(
        num_bits=8,
        type="float",
        strategy=strategy,
        group_size=128 if strategy == "group" else None,
        block_structure=[16, 64] if strategy == "block" else None,
    )
    activations = QuantizationArgs(num_bits=8, type="float", strategy="token", dynamic=True)
    scheme = QuantizationScheme(targets=["Linear"], weights=args, input_activations=activations)
    weight = data.draw(weights(column_multiple=128, min_rows=16))
    rows = (weight.shape[0] // 16) * 16
    tensors = module_tensors(weight[:rows].contiguous(), scheme)

    compressed = compare_with_compressed_tensors("float-quantized", tensors, scheme)

    compare_decompression("float-quantized", compressed, scheme)


@PROPERTY_SETTINGS
@given(data=st.data(), preset=st.sampled_from(["FP8_DYNAMIC", "FP8"]))
def test_fp8_presets_match(data: st.DataObject, preset: str) -> None:
    scheme = preset_scheme(preset)
    tensors = module_tensors(data.draw(weights(column_multiple=32)), scheme)

    compressed = compare_with_compressed_tensors("float-quantized", tensors, scheme)

    compare_decompression("float-quantized", compressed, scheme)


@PROPERTY_SETTINGS
@given(data=st.data(), preset=st.sampled_from(["NVFP4A16", "MXFP4A16"]))
def test_fp4_matches(data: st.DataObject, preset: str) -> None:
    scheme = preset_scheme(preset)
    format_name = "nvfp4-pack-quantized" if preset == "NVFP4A16" else "mxfp4-pack-quantized"
    tensors = module_tensors(data.draw(weights(column_multiple=32)), scheme)

    compressed = compare_with_compressed_tensors(format_name, tensors, scheme)

    compare_decompression(format_name, compressed, scheme)


@PROPERTY_SETTINGS
@given(
    data=st.data(),
    num_bits=st.integers(min_value=2, max_value=8),
    exponent=st.integers(min_value=-12, max_value=4),
    dtype=st.sampled_from(DTYPES),
)
def test_exact_ties_match(data: st.DataObject, num_bits: int, exponent: int, dtype: torch.dtype) -> None:
    """Quotients that are exactly k + 0.5 round half to even in both implementations."""
    scheme = int_scheme(num_bits, True, "group", 32)
    rows = data.draw(st.integers(min_value=1, max_value=24))
    seed = data.draw(st.integers(min_value=0, max_value=2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    halves = torch.randint(-(1 << num_bits), 1 << num_bits, (rows, 64), generator=generator) + 0.5
    scale = torch.full((rows, 2), 2.0**exponent)
    tensors = {
        "weight": (halves * scale.repeat_interleave(32, dim=1)).to(dtype),
        "weight_scale": scale.to(dtype),
        "weight_zero_point": torch.zeros((rows, 2), dtype=torch.int8),
    }
    assume(bool(torch.isfinite(tensors["weight"]).all()))

    compressed = compare_with_compressed_tensors("pack-quantized", tensors, scheme)

    compare_decompression("pack-quantized", compressed, scheme)
