"""Golden tests for mixture-of-experts models against llmcompressor 0.14.0.1.

The fixtures come from tests/fixtures/make_golden_moe.py, run by hand beside
the peer. Each case is compressed by two routes: the peer's pre-save state
dict (per-expert weights and its qparams) with its config, and the fused
float weights of the transformers 5 model with the scheme. Both must give
the peer's bytes and config.

Mixtral differs from the peer in expert names only: the peer writes
``block_sparse_moe.experts.<e>.gate_proj`` (its linearized module names),
which vLLM's Mixtral loader does not read, while tensorpress writes the
``w1``/``w3``/``w2`` names that transformers 5 saves and vLLM loads. The
tests rename the peer's expert tensors before comparing bytes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from conftest import assert_same_tensors, without_version
from safetensors.torch import load_file

from tensorpress import CompressionOptions, compress_state_dict
from tensorpress.adapters.hf import save_pretrained
from tensorpress.errors import MissingTensorError

GOLDEN_MOE_DIR = Path(__file__).resolve().parent / "fixtures" / "golden_moe"
IGNORE = ["lm_head", "re:.*mlp.gate$"]
KV_CACHE_SCHEME = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}

CASES = [
    ("qwen3_moe", "W4A16"),
    ("qwen3_moe", "FP8_DYNAMIC"),
    ("qwen3_moe", "NVFP4A16"),
    ("mixtral", "W4A16"),
    ("mixtral", "NVFP4A16"),
]

# The peer's Mixtral expert names -> the names vLLM loads.
_MIXTRAL_SAVED = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_EXPERT_MODULE = re.compile(r"(\.experts\.\d+\.)(gate_proj|up_proj|down_proj)\.")


def load_model(architecture: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    folder = GOLDEN_MOE_DIR / f"{architecture}_input"
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)


def fused_state_dict(architecture: str) -> dict[str, torch.Tensor]:
    """Return the transformers 5 state dict, with experts as fused 3-D tensors."""
    return {name: tensor.detach() for name, tensor in load_model(architecture).state_dict().items()}


def peer_presave_state_dict(architecture: str, case: str) -> dict[str, torch.Tensor]:
    """Rebuild the peer's pre-save state dict: per-expert slices of the input plus its qparams."""
    fused = fused_state_dict(architecture)
    qparams = load_file(GOLDEN_MOE_DIR / case / "presave_qparams.safetensors")
    names = json.loads((GOLDEN_MOE_DIR / case / "presave_names.json").read_text())
    state_dict = {}
    for name in names:
        if name in qparams:
            state_dict[name] = qparams[name]
        elif name in fused:
            state_dict[name] = fused[name]
        else:
            state_dict[name] = _expert_slice(fused, name)
    return state_dict


def _expert_slice(fused: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    match = re.fullmatch(r"(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight", name)
    assert match is not None, f"unexpected pre-save tensor {name}"
    prefix, index, projection = match[1], int(match[2]), match[3]
    if projection == "down_proj":
        return fused[f"{prefix}.down_proj"][index]
    gate_up = fused[f"{prefix}.gate_up_proj"][index]
    half = gate_up.shape[0] // 2
    return gate_up[:half] if projection == "gate_proj" else gate_up[half:]


def peer_output(architecture: str, case: str) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = load_file(GOLDEN_MOE_DIR / case / "model.safetensors")
    config = json.loads((GOLDEN_MOE_DIR / case / "config.json").read_text())["quantization_config"]
    if architecture == "mixtral":
        tensors = {
            _EXPERT_MODULE.sub(lambda m: f"{m[1]}{_MIXTRAL_SAVED[m[2]]}.", name): tensor
            for name, tensor in tensors.items()
        }
    return tensors, config


def scheme_options(scheme: str) -> CompressionOptions:
    return CompressionOptions.for_scheme(scheme, targets=["Linear"], ignore=IGNORE)


@pytest.mark.parametrize(("architecture", "scheme"), CASES)
def test_presave_state_dict_matches_peer(architecture: str, scheme: str) -> None:
    case = f"{architecture}_{scheme}"
    peer_tensors, peer_config = peer_output(architecture, case)
    state_dict = peer_presave_state_dict(architecture, case)

    result = compress_state_dict(
        state_dict, CompressionOptions(quantization=peer_config), model_type=architecture
    )

    assert_same_tensors(dict(result.tensors), peer_tensors)
    assert without_version(result.config) == without_version(peer_config)


@pytest.mark.parametrize(("architecture", "scheme"), CASES)
def test_fused_min_max_matches_peer(architecture: str, scheme: str) -> None:
    peer_tensors, peer_config = peer_output(architecture, f"{architecture}_{scheme}")

    result = compress_state_dict(
        fused_state_dict(architecture), scheme_options(scheme), model_type=architecture
    )

    assert_same_tensors(dict(result.tensors), peer_tensors)
    assert without_version(result.config) == without_version(peer_config)


@pytest.mark.parametrize("scheme", ["W4A16", "NVFP4A16"])
def test_qwen3_without_model_type(scheme: str) -> None:
    # transformers' default expert layout is Qwen3-MoE's, and its names need no renames.
    peer_tensors, peer_config = peer_output("qwen3_moe", f"qwen3_moe_{scheme}")

    result = compress_state_dict(fused_state_dict("qwen3_moe"), scheme_options(scheme))

    assert_same_tensors(dict(result.tensors), peer_tensors)
    assert without_version(result.config) == without_version(peer_config)


@pytest.mark.parametrize(("architecture", "scheme"), CASES)
def test_save_pretrained_matches_peer(architecture: str, scheme: str, tmp_path: Path) -> None:
    peer_tensors, peer_config = peer_output(architecture, f"{architecture}_{scheme}")
    model = load_model(architecture)

    save_pretrained(model, tmp_path, quantization=scheme_options(scheme).quantization)

    written = load_file(tmp_path / "model.safetensors")
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert_same_tensors(written, peer_tensors)
    assert without_version(config) == without_version(peer_config)


@pytest.mark.parametrize(("architecture", "scheme"), CASES)
def test_checkpoint_folder_matches_peer(architecture: str, scheme: str, tmp_path: Path) -> None:
    from tensorpress.checkpoint import compress_checkpoint

    peer_tensors, peer_config = peer_output(architecture, f"{architecture}_{scheme}")

    result = compress_checkpoint(GOLDEN_MOE_DIR / f"{architecture}_input", tmp_path / "out", scheme_options(scheme))

    written = load_file(tmp_path / "out" / "model.safetensors")
    assert_same_tensors(written, peer_tensors)
    assert without_version(result.config) == without_version(peer_config)


def test_kv_cache_presave_matches_peer() -> None:
    case = "qwen3_moe_FP8_DYNAMIC_KV"
    peer_tensors, peer_config = peer_output("qwen3_moe", case)
    state_dict = peer_presave_state_dict("qwen3_moe", case)

    result = compress_state_dict(
        state_dict, CompressionOptions(quantization=peer_config), model_type="qwen3_moe"
    )

    assert_same_tensors(dict(result.tensors), peer_tensors)
    assert without_version(result.config) == without_version(peer_config)


def test_kv_cache_min_max_with_calibrated_scales() -> None:
    case = "qwen3_moe_FP8_DYNAMIC_KV"
    peer_tensors, peer_config = peer_output("qwen3_moe", case)
    qparams = load_file(GOLDEN_MOE_DIR / case / "presave_qparams.safetensors")
    state_dict = fused_state_dict("qwen3_moe")
    state_dict |= {name: tensor for name, tensor in qparams.items() if name.endswith(("k_scale", "v_scale"))}
    options = scheme_options("FP8_DYNAMIC")
    quantization = options.quantization.model_copy(update={"kv_cache_scheme": QuantizationArgs(**KV_CACHE_SCHEME)})

    result = compress_state_dict(state_dict, CompressionOptions(quantization=quantization))

    assert_same_tensors(dict(result.tensors), peer_tensors)
    assert without_version(result.config) == without_version(peer_config)


def test_kv_cache_missing_scale_names_module() -> None:
    options = scheme_options("FP8_DYNAMIC")
    quantization = options.quantization.model_copy(update={"kv_cache_scheme": QuantizationArgs(**KV_CACHE_SCHEME)})

    with pytest.raises(MissingTensorError, match=r"attention module model\.layers\.0\.self_attn lacks k_scale, v_scale"):
        compress_state_dict(fused_state_dict("qwen3_moe"), CompressionOptions(quantization=quantization))
