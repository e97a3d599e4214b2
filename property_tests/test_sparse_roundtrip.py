"""Properties of the sparse formats: bit-exact round trips for every dtype, no mutation."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tensorpress import CompressionOptions, compress_state_dict, decompress_state_dict
from tensorpress.formats.sparse import compress_sparse_weight, decompress_sparse_weight

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
VALUE_DTYPES = (*FLOAT_DTYPES, torch.float8_e4m3fn, torch.float8_e5m2, torch.int8)
INTEGER_VIEWS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
SPARSE_FORMATS = ("sparse-bitmask", "sparse-24-bitmask")
PROPERTY_SETTINGS = settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(INTEGER_VIEWS[tensor.element_size()])


def is_zero(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        tensor = tensor.to(torch.float32)
    return tensor == 0


@st.composite
def sparse_weights(draw: st.DrawFn, two_four: bool) -> torch.Tensor:
    """Draw a 2-D weight with zeros of both signs, NaN, infinities and subnormals.

    With `two_four`, at least two values of every group of four are zero.
    """
    rows = draw(st.integers(min_value=1, max_value=12))
    columns = 4 * draw(st.integers(min_value=1, max_value=10))
    if not two_four:
        columns -= draw(st.integers(min_value=0, max_value=3))
    dtype = draw(st.sampled_from(VALUE_DTYPES))
    generator = torch.Generator().manual_seed(draw(st.integers(min_value=0, max_value=2**31 - 1)))

    if dtype == torch.int8:
        values = torch.randint(-128, 128, (rows, columns), generator=generator, dtype=torch.int8)
    else:
        values = torch.randn(rows, columns, generator=generator, dtype=torch.float64)
        specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-42, -1e-300])
        picks = torch.rand(rows, columns, generator=generator) < 0.1
        choice = torch.randint(0, len(specials), (rows, columns), generator=generator)
        values = torch.where(picks, specials[choice], values).to(dtype)

    zero_fraction = draw(st.sampled_from([0.0, 0.3, 0.6, 1.0]))
    zeros = torch.rand(rows, columns, generator=generator) < zero_fraction
    if two_four:
        # Zero the two entries of each group with the smallest random scores.
        scores = torch.rand(rows, columns // 4, 4, generator=generator)
        pruned = torch.zeros_like(scores, dtype=torch.bool)
        pruned.scatter_(2, scores.topk(2, dim=2, largest=False).indices, True)
        zeros |= pruned.reshape(rows, columns)
    negative_zero = torch.rand(rows, columns, generator=generator) < 0.5
    zero_value = torch.zeros((), dtype=dtype)
    if dtype in FLOAT_DTYPES or dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        signed = torch.where(negative_zero, torch.tensor(-0.0), torch.tensor(0.0)).to(dtype)
        return torch.where(zeros, signed, values)
    return torch.where(zeros, zero_value, values)


def assert_round_trip(original: torch.Tensor, restored: torch.Tensor) -> None:
    """Assert equal bits everywhere except zeros, which may come back as +0.0."""
    assert restored.dtype == original.dtype
    assert restored.shape == original.shape
    zeros = is_zero(original)
    assert torch.equal(bits(restored)[~zeros], bits(original)[~zeros])
    assert bool(is_zero(restored)[zeros].all())


@PROPERTY_SETTINGS
@given(weight=sparse_weights(two_four=False))
def test_sparse_bitmask_round_trip(weight: torch.Tensor) -> None:
    before = bits(weight).clone()

    tensors = compress_sparse_weight("proj.weight", weight, "sparse-bitmask")
    restored = decompress_sparse_weight("proj", tensors)

    assert_round_trip(weight, restored)
    assert torch.equal(bits(weight), before)
    assert tensors["compressed"].numel() == int((~is_zero(weight)).sum())


@PROPERTY_SETTINGS
@given(weight=sparse_weights(two_four=True))
def test_sparse_24_round_trip(weight: torch.Tensor) -> None:
    before = bits(weight).clone()

    tensors = compress_sparse_weight("proj.weight", weight, "sparse-24-bitmask")
    restored = decompress_sparse_weight("proj", tensors)

    assert_round_trip(weight, restored)
    assert torch.equal(bits(weight), before)
    assert tuple(tensors["compressed"].shape) == (weight.shape[0], weight.shape[1] // 2)


@PROPERTY_SETTINGS
@given(weight=sparse_weights(two_four=True))
def test_sparse_24_is_deterministic(weight: torch.Tensor) -> None:
    first = compress_sparse_weight("proj.weight", weight, "sparse-24-bitmask")
    second = compress_sparse_weight("proj.weight", weight.clone(), "sparse-24-bitmask")

    for local, tensor in first.items():
        assert torch.equal(bits(tensor), bits(second[local])), local


@PROPERTY_SETTINGS
@given(
    weight=sparse_weights(two_four=True),
    sparse_format=st.sampled_from(SPARSE_FORMATS),
)
def test_state_dict_round_trip(weight: torch.Tensor, sparse_format: str) -> None:
    state_dict = {"layer.proj.weight": weight, "layer.proj.bias": torch.arange(weight.shape[0])}
    config = {"format": sparse_format, "targets": ["Linear"]}

    result = compress_state_dict(state_dict, CompressionOptions(sparsity_config=config))
    dense = decompress_state_dict(result.tensors, result.config)

    assert sorted(dense) == sorted(state_dict)
    assert_round_trip(weight, dense["layer.proj.weight"])
    assert torch.equal(dense["layer.proj.bias"], state_dict["layer.proj.bias"])
