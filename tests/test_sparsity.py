"""Sparse formats, sparsity inference and the sparsity options, without the peer."""

from __future__ import annotations

import logging

import numpy
import pytest
import torch

import tensorpress.sparsity as sparsity_module
from tensorpress import (
    CompressionOptions,
    InvalidOptionsError,
    InvalidTensorError,
    MissingTensorError,
    compress_state_dict,
    decompress_state_dict,
)
from tensorpress.compress import check_options
from tensorpress.formats.sparse import (
    compress_sparse_weight,
    decompress_sparse_weight,
    pack_bitmask,
    unpack_bitmask,
)
from tensorpress.sparsity import (
    detect_structure,
    follows_structure,
    infer_sparsity_structure,
    reduce_targets_and_ignore,
    sparsity_report,
)

SPARSE_24 = {"format": "sparse-24-bitmask", "targets": ["Linear"], "ignore": ["lm_head"]}


def prune_24(weight: torch.Tensor) -> torch.Tensor:
    """Zero the two smallest magnitudes of every group of four values."""
    groups = weight.reshape(-1, 4)
    kept = groups.abs().topk(2, dim=1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, kept, True)
    return (groups * mask).reshape(weight.shape)


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_model(seed: int = 0, pruned: bool = True, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Return one layer of seven projections (pruned 2:4 by default), a head, an embedding and a norm.

    Seven of eight Linear weights follow 2:4, above the 80 % that makes the
    inferred structure "2:4". Every weight has 128 columns, so that group
    size 128 fits.
    """
    generator = torch.Generator().manual_seed(seed)
    state_dict = {"embed_tokens.weight": torch.randn(32, 128, generator=generator)}
    for projection in PROJECTIONS:
        rows = 32 if projection == "up_proj" else 16
        weight = torch.randn(rows, 128, generator=generator)
        state_dict[f"layer.{projection}.weight"] = prune_24(weight) if pruned else weight
    state_dict["layer.norm.weight"] = torch.ones(128)
    state_dict["lm_head.weight"] = torch.randn(32, 128, generator=generator)
    return {name: tensor.to(dtype) for name, tensor in state_dict.items()}


# ---- bitmask packing ----


@pytest.mark.parametrize("columns", [1, 7, 8, 9, 16, 33])
def test_pack_bitmask_matches_numpy_little(columns: int) -> None:
    mask = torch.rand(5, columns, generator=torch.Generator().manual_seed(columns)) < 0.5

    packed = pack_bitmask(mask)

    expected = numpy.packbits(mask.numpy(), axis=-1, bitorder="little")
    assert packed.dtype == torch.uint8
    assert numpy.array_equal(packed.numpy(), expected)
    assert torch.equal(unpack_bitmask(packed, (5, columns)), mask)


# ---- sparse-24-bitmask ----


def test_sparse_24_rejects_dense_weight() -> None:
    weight = torch.ones(4, 8)

    with pytest.raises(InvalidTensorError, match=r"layer\.q_proj\.weight does not follow 2:4") as error:
        compress_sparse_weight("layer.q_proj.weight", weight, "sparse-24-bitmask")

    assert "row 0, columns 0 to 3" in str(error.value)
    assert "never prunes" in str(error.value)


def test_sparse_24_rejects_odd_columns() -> None:
    with pytest.raises(InvalidTensorError, match="6 columns"):
        compress_sparse_weight("proj.weight", torch.zeros(2, 6), "sparse-24-bitmask")


def test_sparse_formats_reject_1d_weight() -> None:
    with pytest.raises(InvalidTensorError, match="norm.weight has shape"):
        compress_sparse_weight("norm.weight", torch.zeros(8), "sparse-bitmask")


def test_sparse_formats_reject_packed_dtype() -> None:
    with pytest.raises(InvalidTensorError, match="torch.int32"):
        compress_sparse_weight("proj.weight", torch.zeros(4, 8, dtype=torch.int32), "sparse-bitmask")


def test_sparse_24_layout() -> None:
    weight = torch.tensor([[0.0, 3.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0]])

    tensors = compress_sparse_weight("proj.weight", weight, "sparse-24-bitmask")

    assert sorted(tensors) == ["bitmask", "compressed", "shape"]
    assert tensors["shape"].dtype == torch.int64
    assert tensors["shape"].tolist() == [[1], [8]]
    assert tensors["compressed"].shape == (1, 4)
    assert tensors["compressed"][0, :2].tolist() == [3.0, -1.0]
    assert torch.equal(decompress_sparse_weight("proj", tensors), weight)


def test_sparse_24_keeps_int8_minimum() -> None:
    weight = torch.tensor([[-128, 5, 0, 0], [0, 0, -128, 0]], dtype=torch.int8)

    tensors = compress_sparse_weight("proj.weight", weight, "sparse-24-bitmask")

    assert torch.equal(decompress_sparse_weight("proj", tensors), weight)


def test_sparse_bitmask_layout() -> None:
    weight = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 4.0]])

    tensors = compress_sparse_weight("proj.weight", weight, "sparse-bitmask")

    assert sorted(tensors) == ["bitmask", "compressed", "row_offsets", "shape"]
    assert tensors["shape"].tolist() == [2, 3]
    assert tensors["compressed"].tolist() == [2.0, 1.0, 4.0]
    assert tensors["row_offsets"].tolist() == [0, 1]
    assert torch.equal(decompress_sparse_weight("proj", tensors), weight)


def test_decompress_rejects_value_count_mismatch() -> None:
    tensors = compress_sparse_weight("proj.weight", torch.eye(4), "sparse-bitmask")
    tensors["compressed"] = tensors["compressed"][:-1]

    with pytest.raises(InvalidTensorError, match="proj.compressed contains 3 values"):
        decompress_sparse_weight("proj", tensors)


def test_decompress_requires_shape() -> None:
    tensors = compress_sparse_weight("proj.weight", torch.eye(4), "sparse-bitmask")
    del tensors["shape"]

    with pytest.raises(MissingTensorError, match="proj.shape is missing"):
        decompress_sparse_weight("proj", tensors)


# ---- structure and targets ----


def test_follows_structure_counts_zeros_per_group() -> None:
    weight = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0]])

    assert follows_structure(weight, "2:4")
    assert follows_structure(weight, "unstructured")
    assert not follows_structure(weight, "3:4")
    assert not follows_structure(torch.zeros(3), "2:4")


@pytest.mark.parametrize(
    ("row", "structure"),
    [
        ([1, 1, 0, 0, 0, 1, 1, 0], "2:4"),
        ([1, 0, 0, 0, 0, 0, 1, 0], "1:4"),
        ([1, 1, 1, 0, 0, 0, 0, 1], "4:8"),
        ([1, 1, 1, 1, 1, 0, 0, 0], "unstructured"),
    ],
)
def test_detect_structure(row: list[int], structure: str) -> None:
    assert detect_structure(torch.tensor([row], dtype=torch.float32)) == structure


def test_structure_needs_more_than_80_percent() -> None:
    linear = {f"l{index}": ("Linear",) for index in range(5)}
    state_dict = {f"l{index}.weight": prune_24(torch.randn(4, 8)) for index in range(4)}
    state_dict["l4.weight"] = torch.ones(4, 8)

    assert infer_sparsity_structure(state_dict, linear) == "unstructured"

    linear["l5"] = ("Linear",)
    state_dict["l5.weight"] = prune_24(torch.randn(4, 8))
    assert infer_sparsity_structure(state_dict, linear) == "2:4"


def test_other_nm_structures_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    weight = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]]).repeat(4, 1)
    state_dict = {"proj.weight": weight}

    with caplog.at_level(logging.INFO, logger="tensorpress.sparsity"):
        structure = infer_sparsity_structure(state_dict, {"proj": ("Linear",)})

    assert structure == "unstructured"
    assert "1 follow 4:8" in caplog.text


def test_reduce_targets_by_class_majority() -> None:
    targets, ignore = reduce_targets_and_ignore(
        {"Linear": ["a", "b", "c"], "Embedding": ["e"]},
        {"Linear": ["head"], "Embedding": ["f", "g"], "Norm": ["n"]},
    )

    assert targets == ["Linear", "e"]
    assert ignore == ["head", "f", "g"]


def test_reduce_targets_tie_picks_class() -> None:
    targets, ignore = reduce_targets_and_ignore({"Linear": ["a"]}, {"Linear": ["b"]})

    assert targets == ["Linear"]
    assert ignore == ["b"]


# ---- options ----


def test_structure_as_format_is_rejected() -> None:
    with pytest.raises(InvalidOptionsError, match="'2:4' is a sparsity structure, not a format"):
        CompressionOptions(sparsity_config={"format": "2:4"})


def test_marlin_24_format_is_rejected() -> None:
    with pytest.raises(InvalidOptionsError, match="vLLM no longer loads"):
        CompressionOptions.for_scheme("W4A16", quantization_format="marlin-24")


def test_marlin_24_config_group_is_rejected() -> None:
    options = CompressionOptions.for_scheme("W4A16")
    config = options.quantization.model_dump()
    config["config_groups"]["group_0"]["format"] = "marlin-24"

    with pytest.raises(InvalidOptionsError, match="group_0.*marlin-24"):
        compress_state_dict(tiny_model(), CompressionOptions(quantization=config))


def test_unknown_sparsity_key_is_rejected() -> None:
    with pytest.raises(InvalidOptionsError, match=r"unknown keys \['structure'\]"):
        CompressionOptions(sparsity_config={"format": "dense", "structure": "2:4"})


def test_sparse_24_with_unstructured_is_rejected() -> None:
    with pytest.raises(InvalidOptionsError, match="2:4 weights only"):
        CompressionOptions(
            sparsity_config={"format": "sparse-24-bitmask", "sparsity_structure": "unstructured"}
        )


def test_folder_route_rejects_sparsity() -> None:
    with pytest.raises(InvalidOptionsError, match="checkpoint folders"):
        check_options({"skip_sparsity_compression_stats": False})


# ---- compress_state_dict ----


def test_default_skip_reads_no_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(tensor: torch.Tensor) -> float:
        raise AssertionError("the default options must not measure sparsity")

    monkeypatch.setattr(sparsity_module, "tensor_sparsity", fail)
    monkeypatch.setattr(sparsity_module, "follows_structure", fail)

    result = compress_state_dict(tiny_model(), CompressionOptions.for_scheme("FP8_DYNAMIC"))

    assert result.config["sparsity_config"] == {}


def test_inferred_config_for_unquantized_24() -> None:
    result = compress_state_dict(tiny_model(), {"skip_sparsity_compression_stats": False})

    sparsity = result.config["sparsity_config"]
    assert sparsity["format"] == "sparse-24-bitmask"
    assert sparsity["sparsity_structure"] == "2:4"
    assert sparsity["targets"] == ["Linear"]
    assert sparsity["ignore"] == ["lm_head"]
    assert "layer.q_proj.compressed" in result.tensors
    assert "lm_head.weight" in result.tensors
    assert "config_groups" not in result.config


def test_global_sparsity_counts_every_tensor() -> None:
    state_dict = tiny_model()
    zeros = sum(int((tensor == 0).sum()) for tensor in state_dict.values())
    total = sum(tensor.numel() for tensor in state_dict.values())

    result = compress_state_dict(state_dict, {"skip_sparsity_compression_stats": False})

    assert result.config["sparsity_config"]["global_sparsity"] == pytest.approx(zeros / total)


def test_dense_model_gets_no_sparsity_config() -> None:
    result = compress_state_dict(
        tiny_model(pruned=False), {"skip_sparsity_compression_stats": False}
    )

    assert result.config is None


def test_disable_keeps_stats_and_dense_weights() -> None:
    state_dict = tiny_model()

    result = compress_state_dict(
        state_dict,
        {"skip_sparsity_compression_stats": False, "disable_sparse_compression": True},
    )

    sparsity = result.config["sparsity_config"]
    assert sparsity["format"] == "dense"
    assert sparsity["global_sparsity"] > 0.3
    assert sorted(result.tensors) == sorted(state_dict)


def test_weight_only_4_bit_stays_dense() -> None:
    options = CompressionOptions.for_scheme("W4A16", skip_sparsity_compression_stats=False)

    result = compress_state_dict(tiny_model(), options)

    assert result.config["format"] == "pack-quantized"
    assert result.config["sparsity_config"]["format"] == "dense"
    assert result.config["sparsity_config"]["sparsity_structure"] == "2:4"


def test_asymmetric_w8a8_stays_dense(caplog: pytest.LogCaptureFixture) -> None:
    options = CompressionOptions.for_scheme("W8A8", skip_sparsity_compression_stats=False)
    config = options.quantization.model_dump()
    config["config_groups"]["group_0"]["weights"]["symmetric"] = False

    with caplog.at_level(logging.WARNING, logger="tensorpress.sparsity"):
        result = compress_state_dict(
            tiny_model(),
            CompressionOptions(quantization=config, skip_sparsity_compression_stats=False),
        )

    assert result.config["sparsity_config"]["format"] == "dense"
    assert "asymmetric" in caplog.text


def test_explicit_24_config_rejects_unpruned_layer() -> None:
    config = {"format": "sparse-24-bitmask", "targets": ["Linear"]}

    with pytest.raises(InvalidTensorError, match=r"lm_head\.weight does not follow 2:4"):
        compress_state_dict(tiny_model(), {"sparsity_config": config})


def test_config_without_targets_infers_them() -> None:
    result = compress_state_dict(tiny_model(), {"sparsity_config": {"format": "sparse-24-bitmask"}})

    sparsity = result.config["sparsity_config"]
    assert sparsity["targets"] == ["Linear"]
    assert sparsity["ignore"] == ["lm_head"]
    assert sparsity["global_sparsity"] > 0.3
    assert "layer.up_proj.compressed" in result.tensors


def test_config_without_structure_infers_it() -> None:
    config = {"format": "sparse-bitmask", "targets": ["Linear"], "ignore": ["lm_head"]}

    result = compress_state_dict(tiny_model(), {"sparsity_config": config})

    assert result.config["sparsity_config"]["sparsity_structure"] == "2:4"
    assert result.config["sparsity_config"]["global_sparsity"] == 0.0


def test_save_compressed_false_writes_dense() -> None:
    state_dict = tiny_model()
    options = CompressionOptions.for_scheme(
        "FP8_DYNAMIC", sparsity_config=SPARSE_24, save_compressed=False
    )

    result = compress_state_dict(state_dict, options)

    assert result.config["quantization_status"] == "frozen"
    assert result.config["sparsity_config"]["format"] == "dense"
    assert torch.equal(result.tensors["layer.q_proj.weight"], state_dict["layer.q_proj.weight"])


@pytest.mark.parametrize("scheme", ["FP8_DYNAMIC", "W8A8"])
def test_stacked_roundtrip_matches_quantized_only(scheme: str) -> None:
    state_dict = tiny_model()
    quantized = compress_state_dict(state_dict, CompressionOptions.for_scheme(scheme))
    stacked = compress_state_dict(
        state_dict, CompressionOptions.for_scheme(scheme, sparsity_config=SPARSE_24)
    )

    assert "layer.q_proj.weight" not in stacked.tensors
    assert "layer.q_proj.weight_scale" in stacked.tensors
    dense = decompress_state_dict(stacked.tensors, stacked.config)
    expected = decompress_state_dict(quantized.tensors, quantized.config)
    assert sorted(dense) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(dense[name], tensor), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sparse_format", ["sparse-bitmask", "sparse-24-bitmask"])
def test_sparse_only_roundtrip(dtype: torch.dtype, sparse_format: str) -> None:
    state_dict = tiny_model(dtype=dtype)
    config = {"format": sparse_format, "targets": ["Linear"], "ignore": ["lm_head"]}

    result = compress_state_dict(state_dict, {"sparsity_config": config})
    dense = decompress_state_dict(result.tensors, result.config)

    assert sorted(dense) == sorted(state_dict)
    for name, tensor in state_dict.items():
        assert dense[name].dtype == tensor.dtype
        assert torch.equal(dense[name], tensor), name


# ---- report ----


def test_report_measures_sparse_layers() -> None:
    result = compress_state_dict(tiny_model(), {"sparsity_config": SPARSE_24})

    rows = {row.layer: row for row in sparsity_report(result.tensors, result.config)}

    up = rows["layer.up_proj"]
    assert up.format == "sparse-24-bitmask"
    assert up.structure == "2:4"
    assert up.shape == (32, 128)
    assert up.zeros >= 32 * 64
    assert up.bytes_before == 32 * 128 * 2
    # Values, then the bitmask (one bit per element), then the int64 shape.
    assert up.bytes_after == 32 * 64 * 2 + 32 * 16 + 2 * 8
    head = rows["lm_head"]
    assert head.format == "dense"
    assert head.bytes_before == head.bytes_after
    assert "layer.norm" not in rows


def test_explicit_sparse_format_on_packed_weights_becomes_dense() -> None:
    weight = torch.randn(8, 128)
    weight.view(8, 32, 4)[..., :2] = 0.0
    options = CompressionOptions.for_scheme(
        "W4A16", ignore=[], sparsity_config={"format": "sparse-24-bitmask"}
    )

    result = compress_state_dict({"proj.weight": weight}, options)

    assert result.config["sparsity_config"]["format"] == "dense"
    assert "proj.weight_packed" in result.tensors
