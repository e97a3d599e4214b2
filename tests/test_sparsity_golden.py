"""Golden sparse tests: tensorpress writes the bytes llmcompressor 0.10.0.4 writes.

The fixtures come from tests/fixtures/make_golden_sparse.py, run by hand
beside llmcompressor 0.10.0.4 and compressed-tensors 0.14.0.1, the last
releases with sparse compression; this suite only reads them. Every case
runs twice: from the input weights alone (qparams from min/max) and with
the qparams the peer computed before saving.

Three cases differ from the peer on purpose, and their tests show how.
With 2:4 and W4A16 the peer writes marlin-24, which vLLM no longer loads.
With a sparsity config without targets the peer labels dense tensors
sparse. With 2:4 and W8A8 the peer drops every int8 -128.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_same_tensors, without_version
from safetensors.torch import load_file

from tensorpress import CompressionOptions, compress_state_dict, decompress_state_dict
from tensorpress.sparsity import decompress_sparse_modules

GOLDEN_SPARSE_DIR = Path(__file__).resolve().parent / "fixtures" / "golden_sparse"

# Cases where tensorpress writes what the peer writes, byte for byte.
MATCHING_CASES = (
    "dense_24_stats",
    "FP8_DYNAMIC_24_stats",
    "dense_24_disable",
    "FP8_DYNAMIC_24_disable",
    "W8A8_24_disable",
    "FP8_DYNAMIC_24_default",
    "unstructured_stats",
    "unstructured_bitmask",
    "dense_24_explicit",
    "W4A16_24_frozen",
    "W4A16_24_pack",
)
ROUTES = ("min_max", "presave_qparams")


def case_folder(case: str) -> Path:
    return GOLDEN_SPARSE_DIR / case


def peer_tensors(case: str) -> dict[str, torch.Tensor]:
    """Return the peer's output tensors, following same_tensors_as.txt to the shared copy."""
    folder = case_folder(case)
    pointer = folder / "same_tensors_as.txt"
    if pointer.exists():
        folder = GOLDEN_SPARSE_DIR / pointer.read_text().strip()
    return load_file(folder / "model.safetensors")


def peer_config(case: str) -> dict:
    return json.loads((case_folder(case) / "config.json").read_text())["quantization_config"]


def input_name(case: str) -> str:
    return "input_unstructured" if case.startswith("unstructured") else "input_24"


def load_input(case: str, route: str) -> dict[str, torch.Tensor]:
    state_dict = load_file(GOLDEN_SPARSE_DIR / input_name(case) / "model.safetensors")
    if route == "presave_qparams":
        state_dict.update(load_file(case_folder(case) / "presave_qparams.safetensors"))
    return state_dict


def case_options(case: str) -> CompressionOptions:
    """Return the options that mirror the case's save_pretrained keyword arguments."""
    kwargs = json.loads((case_folder(case) / "save_kwargs.json").read_text())
    scheme = kwargs.pop("scheme")
    if scheme is None:
        return CompressionOptions(**kwargs)
    return CompressionOptions.for_scheme(scheme, targets=["Linear"], ignore=["lm_head"], **kwargs)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", MATCHING_CASES)
def test_sparse_case_matches_peer(case: str, route: str) -> None:
    result = compress_state_dict(load_input(case, route), case_options(case))

    assert_same_tensors(dict(result.tensors), peer_tensors(case))
    assert without_version(result.config) == without_version(peer_config(case))


def without_sparsity(options: CompressionOptions) -> CompressionOptions:
    return options.model_copy(
        update={"sparsity_config": None, "skip_sparsity_compression_stats": True}
    )


@pytest.mark.parametrize("route", ROUTES)
def test_w8a8_24_keeps_int8_minimum(route: str) -> None:
    """The peer ranks int8 by abs() in int8, where -128 overflows, and drops every -128."""
    case = "W8A8_24_stats"
    state_dict = load_input(case, route)
    quantized = compress_state_dict(state_dict, without_sparsity(case_options(case))).tensors
    peer = peer_tensors(case)

    result = compress_state_dict(state_dict, case_options(case))

    assert without_version(result.config) == without_version(peer_config(case))
    assert sorted(result.tensors) == sorted(peer)
    ours = decompress_sparse_modules(result.tensors, result.config)
    theirs = decompress_sparse_modules(peer, peer_config(case))
    affected = 0
    for name, weight in quantized.items():
        if weight.dtype != torch.int8:
            continue
        assert torch.equal(ours[name], weight), name
        assert torch.equal(theirs[name], weight.masked_fill(weight == -128, 0)), name
        if bool((weight == -128).any()):
            affected += 1
            continue
        module = name.removesuffix(".weight")
        for local in ("compressed", "bitmask", "shape"):
            assert torch.equal(result.tensors[f"{module}.{local}"], peer[f"{module}.{local}"])
    assert affected > 0


@pytest.mark.parametrize("route", ROUTES)
def test_w4a16_24_writes_pack_quantized(route: str) -> None:
    """The peer writes marlin-24, which vLLM no longer loads; tensorpress writes pack-quantized."""
    case = "W4A16_24_stats"
    marlin_config = peer_config(case)
    assert marlin_config["format"] == "marlin-24"
    assert "model.layers.0.self_attn.q_proj.meta" in peer_tensors(case)

    result = compress_state_dict(load_input(case, route), case_options(case))

    # The bytes and config equal the peer's output with an explicit pack-quantized format.
    assert_same_tensors(dict(result.tensors), peer_tensors("W4A16_24_pack"))
    assert without_version(result.config) == without_version(peer_config("W4A16_24_pack"))
    expected = without_version(marlin_config)
    expected["format"] = "pack-quantized"
    expected["config_groups"]["group_0"]["format"] = "pack-quantized"
    assert without_version(result.config) == expected


@pytest.mark.parametrize("route", ROUTES)
def test_config_without_targets_compresses_sparse_layers(route: str) -> None:
    """The peer labels dense tensors sparse-24-bitmask; tensorpress compresses and counts."""
    case = "dense_24_no_targets"
    peer_sparsity = peer_config(case)["sparsity_config"]
    assert peer_sparsity["targets"] is None
    assert peer_sparsity["global_sparsity"] == 0.0
    assert "model.layers.0.self_attn.q_proj.weight" in peer_tensors(case)

    result = compress_state_dict(load_input(case, route), case_options(case))

    assert_same_tensors(dict(result.tensors), peer_tensors("dense_24_explicit"))
    sparsity = result.config["sparsity_config"]
    assert sparsity["targets"] == ["Linear"]
    assert sparsity["ignore"] == ["lm_head"]
    assert sparsity["global_sparsity"] == peer_config("dense_24_stats")["sparsity_config"][
        "global_sparsity"
    ]


@pytest.mark.parametrize(
    "case",
    ["dense_24_stats", "FP8_DYNAMIC_24_stats", "unstructured_bitmask"],
)
def test_peer_checkpoint_decompresses_like_ours(case: str) -> None:
    """Decompressing the peer's files gives what decompressing a quantized-only result gives."""
    plain = compress_state_dict(load_input(case, "min_max"), without_sparsity(case_options(case)))

    dense = decompress_state_dict(peer_tensors(case), peer_config(case))

    if plain.config is None:
        expected = dict(plain.tensors)
    else:
        expected = decompress_state_dict(plain.tensors, plain.config)
    # Pruned negative weights are -0.0 in the input and sparse formats store
    # +0.0 for them, so compare values (where -0.0 equals +0.0), not bytes.
    assert sorted(dense) == sorted(expected)
    for name, tensor in expected.items():
        assert dense[name].dtype == tensor.dtype, name
        assert torch.equal(dense[name], tensor), name
