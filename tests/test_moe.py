"""Fused expert layouts, per-expert inputs, KV-cache scales and config pass-through."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

from tensorpress import CompressionOptions, compress_state_dict, decompress_state_dict
from tensorpress.errors import InvalidOptionsError, InvalidTensorError, MissingTensorError
from tensorpress.experts import (
    DEFAULT_LAYOUT,
    ExpertLayout,
    FusedTensor,
    expert_layout,
    layout_from_transformers,
    register_expert_layout,
    split_fused_experts,
)

EXPERTS, HIDDEN, INTERMEDIATE = 3, 256, 128


def fused_experts(seed: int = 0) -> dict[str, torch.Tensor]:
    """Return one Qwen3-MoE-style layer: fused experts, a router and an attention block."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "model.layers.0.self_attn.q_proj.weight": torch.randn(HIDDEN, HIDDEN, generator=generator),
        "model.layers.0.self_attn.k_proj.weight": torch.randn(64, HIDDEN, generator=generator),
        "model.layers.0.self_attn.v_proj.weight": torch.randn(64, HIDDEN, generator=generator),
        "model.layers.0.mlp.experts.gate_up_proj": torch.randn(
            EXPERTS, 2 * INTERMEDIATE, HIDDEN, generator=generator
        ),
        "model.layers.0.mlp.experts.down_proj": torch.randn(EXPERTS, HIDDEN, INTERMEDIATE, generator=generator),
        "model.layers.0.mlp.gate.weight": torch.randn(EXPERTS, HIDDEN, generator=generator),
    }


def per_expert(fused: dict[str, torch.Tensor], names: tuple[str, str, str]) -> dict[str, torch.Tensor]:
    """Return `fused` with experts as per-expert tensors named (gate, up, down)."""
    gate, up, down = names
    result = {}
    for name, tensor in fused.items():
        if name.endswith("gate_up_proj"):
            for index in range(EXPERTS):
                result[f"model.layers.0.mlp.experts.{index}.{gate}.weight"] = tensor[index, :INTERMEDIATE]
                result[f"model.layers.0.mlp.experts.{index}.{up}.weight"] = tensor[index, INTERMEDIATE:]
        elif name.endswith("experts.down_proj"):
            for index in range(EXPERTS):
                result[f"model.layers.0.mlp.experts.{index}.{down}.weight"] = tensor[index]
        else:
            result[name] = tensor
    return result


def w4a16() -> CompressionOptions:
    return CompressionOptions.for_scheme("W4A16", ignore=["re:.*mlp.gate$"])


def test_split_names_and_values() -> None:
    fused = fused_experts()

    view = split_fused_experts(fused, None)

    gate_up = fused["model.layers.0.mlp.experts.gate_up_proj"]
    down = fused["model.layers.0.mlp.experts.down_proj"]
    assert "model.layers.0.mlp.experts.gate_up_proj" not in view.state_dict
    assert view.split == 2
    for index in range(EXPERTS):
        prefix = f"model.layers.0.mlp.experts.{index}"
        assert torch.equal(view.state_dict[f"{prefix}.gate_proj.weight"], gate_up[index, :INTERMEDIATE])
        assert torch.equal(view.state_dict[f"{prefix}.up_proj.weight"], gate_up[index, INTERMEDIATE:])
        assert torch.equal(view.state_dict[f"{prefix}.down_proj.weight"], down[index])


def test_split_keeps_inputs_unchanged() -> None:
    fused = fused_experts()
    copies = {name: tensor.clone() for name, tensor in fused.items()}

    compress_state_dict(fused, w4a16())

    assert sorted(fused) == sorted(copies)
    assert all(torch.equal(fused[name], copies[name]) for name in copies)


def test_fused_and_per_expert_inputs_agree() -> None:
    fused = fused_experts()

    from_fused = compress_state_dict(fused, w4a16())
    from_per_expert = compress_state_dict(per_expert(fused, ("gate_proj", "up_proj", "down_proj")), w4a16())

    assert sorted(from_fused.tensors) == sorted(from_per_expert.tensors)
    for name, tensor in from_fused.tensors.items():
        assert torch.equal(tensor, from_per_expert.tensors[name]), name
    assert from_fused.config == from_per_expert.config


def test_router_listed_in_ignore() -> None:
    result = compress_state_dict(fused_experts(), w4a16())

    assert result.config["ignore"] == ["model.layers.0.mlp.gate"]
    assert result.tensors["model.layers.0.mlp.gate.weight"].dtype == torch.float32


def test_mixtral_saved_names() -> None:
    result = compress_state_dict(fused_experts(), w4a16(), model_type="mixtral")

    assert "model.layers.0.block_sparse_moe.experts.2.w1.weight_packed" in result.tensors
    assert "model.layers.0.block_sparse_moe.experts.2.w3.weight_packed" in result.tensors
    assert "model.layers.0.block_sparse_moe.experts.2.w2.weight_packed" in result.tensors
    assert not any(".mlp." in name for name in result.tensors)
    assert result.config["ignore"] == ["model.layers.0.block_sparse_moe.gate"]


def test_mixtral_checkpoint_names_accepted() -> None:
    # An older Mixtral checkpoint: per-expert w1/w3/w2 under block_sparse_moe.
    fused = fused_experts()
    saved = {
        name.replace(".mlp.", ".block_sparse_moe."): tensor
        for name, tensor in per_expert(fused, ("w1", "w3", "w2")).items()
    }

    from_saved = compress_state_dict(saved, w4a16(), model_type="mixtral")
    from_fused = compress_state_dict(fused, w4a16(), model_type="mixtral")

    assert sorted(from_saved.tensors) == sorted(from_fused.tensors)
    for name, tensor in from_fused.tensors.items():
        assert torch.equal(tensor, from_saved.tensors[name]), name
    assert from_saved.config == from_fused.config


def test_nvfp4_gate_up_share_global_scale() -> None:
    fused = fused_experts()
    options = CompressionOptions.for_scheme("NVFP4A16", ignore=["re:.*mlp.gate$"])

    result = compress_state_dict(fused, options)

    for index in range(EXPERTS):
        prefix = f"model.layers.0.mlp.experts.{index}"
        gate = result.tensors[f"{prefix}.gate_proj.weight_global_scale"]
        up = result.tensors[f"{prefix}.up_proj.weight_global_scale"]
        assert torch.equal(gate, up)
    first = result.tensors["model.layers.0.mlp.experts.0.gate_proj.weight_global_scale"]
    second = result.tensors["model.layers.0.mlp.experts.1.gate_proj.weight_global_scale"]
    assert not torch.equal(first, second)


def test_round_trip_through_decompress() -> None:
    fused = fused_experts()
    result = compress_state_dict(fused, CompressionOptions.for_scheme("W8A16", ignore=["re:.*mlp.gate$"]))

    dense = decompress_state_dict(result.tensors, result.config)

    gate = dense["model.layers.0.mlp.experts.1.gate_proj.weight"]
    expected = fused["model.layers.0.mlp.experts.gate_up_proj"][1, :INTERMEDIATE]
    assert gate.shape == expected.shape
    assert torch.allclose(gate.float(), expected, atol=0.05)


def test_transposed_layout_from_one_entry() -> None:
    # A new architecture stores experts transposed, under other names: one
    # registered entry is all it takes.
    layout = ExpertLayout(
        tensors=(
            FusedTensor("w13", ("gate_proj", "up_proj"), saved=("w1", "w3"), transposed=True),
            FusedTensor("w2", ("down_proj",), saved=("w2",), transposed=True),
        ),
        experts="moe",
        renames=((".ffn.", ".feed_forward."),),
    )
    register_expert_layout("toy_transposed_moe", layout)
    fused = fused_experts()
    gate_up = fused["model.layers.0.mlp.experts.gate_up_proj"]
    down = fused["model.layers.0.mlp.experts.down_proj"]
    toy = {
        "model.layers.0.ffn.moe.w13": gate_up.transpose(1, 2).contiguous(),
        "model.layers.0.ffn.moe.w2": down.transpose(1, 2).contiguous(),
    }
    reference = {
        "model.layers.0.mlp.experts.gate_up_proj": gate_up,
        "model.layers.0.mlp.experts.down_proj": down,
    }
    options = CompressionOptions.for_scheme("W4A16")

    result = compress_state_dict(toy, options, model_type="toy_transposed_moe")
    expected = compress_state_dict(reference, options, model_type="mixtral")

    renamed = {
        name.replace("block_sparse_moe.experts", "feed_forward.moe"): tensor
        for name, tensor in expected.tensors.items()
    }
    assert sorted(result.tensors) == sorted(renamed)
    for name, tensor in renamed.items():
        assert torch.equal(result.tensors[name], tensor), name


def test_transposed_tensor_rejected_by_default() -> None:
    fused = fused_experts()
    fused["model.layers.0.mlp.experts.gate_up_proj"] = (
        fused["model.layers.0.mlp.experts.gate_up_proj"].transpose(1, 2).contiguous()
    )
    fused["model.layers.0.mlp.experts.down_proj"] = (
        fused["model.layers.0.mlp.experts.down_proj"].transpose(1, 2).contiguous()
    )

    with pytest.raises(InvalidTensorError, match=r"model\.layers\.0\.mlp\.experts: .* do not fit the layout"):
        compress_state_dict(fused, w4a16())


def test_missing_fused_partner_rejected() -> None:
    fused = fused_experts()
    del fused["model.layers.0.mlp.experts.down_proj"]

    with pytest.raises(InvalidTensorError, match=r"lacks \['down_proj'\]"):
        compress_state_dict(fused, w4a16())


def test_fused_qparams_rejected() -> None:
    fused = fused_experts()
    fused["model.layers.0.mlp.experts.gate_up_proj_scale"] = torch.ones(EXPERTS, 2 * INTERMEDIATE, 1)

    with pytest.raises(InvalidTensorError, match=r"gate_up_proj_scale is a qparam of a fused expert tensor"):
        compress_state_dict(fused, w4a16())


def test_fused_bias_split() -> None:
    fused = fused_experts()
    fused["model.layers.0.mlp.experts.gate_up_proj_bias"] = torch.arange(EXPERTS * 2 * INTERMEDIATE, dtype=torch.float32).reshape(EXPERTS, -1)

    view = split_fused_experts(fused, None)

    bias = view.state_dict["model.layers.0.mlp.experts.2.up_proj.bias"]
    assert torch.equal(bias, fused["model.layers.0.mlp.experts.gate_up_proj_bias"][2, INTERMEDIATE:])


def test_module_types_gain_expert_linears() -> None:
    module_types = {
        "model.layers.0.mlp": "Qwen3MoeSparseMoeBlock",
        "model.layers.0.mlp.experts": "Qwen3MoeExperts",
        "model.layers.0.mlp.gate": "Qwen3MoeTopKRouter",
    }

    view = split_fused_experts(fused_experts(), module_types)

    names = list(view.module_types)
    assert names[:3] == ["model.layers.0.mlp", "model.layers.0.mlp.experts", "model.layers.0.mlp.experts.0.up_proj"]
    assert view.module_types["model.layers.0.mlp.experts.2.down_proj"] == ("Linear", "Module")
    assert names[-1] == "model.layers.0.mlp.gate"


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen2_moe", "mixtral"])
def test_registered_layouts_match_transformers(model_type: str) -> None:
    pytest.importorskip("transformers")

    assert layout_from_transformers(model_type) == expert_layout(model_type)


def test_unregistered_layout_derived_from_transformers() -> None:
    pytest.importorskip("transformers")

    assert expert_layout("olmoe") == DEFAULT_LAYOUT
    assert layout_from_transformers("llama") is None


def test_layout_rejects_mismatched_names() -> None:
    with pytest.raises(InvalidOptionsError, match="one saved name per module"):
        FusedTensor("gate_up_proj", ("gate_proj", "up_proj"), saved=("w1",))


def kv_options(dynamic: bool | str = False) -> CompressionOptions:
    options = CompressionOptions.for_scheme("FP8_DYNAMIC", ignore=["re:.*mlp.gate$"])
    kv_args = QuantizationArgs(num_bits=8, type="float", strategy="tensor", dynamic=dynamic, symmetric=True)
    return CompressionOptions(quantization=options.quantization.model_copy(update={"kv_cache_scheme": kv_args}))


def test_kv_cache_scales_pass_through() -> None:
    state_dict = fused_experts()
    state_dict["model.layers.0.self_attn.k_scale"] = torch.tensor([0.5], dtype=torch.bfloat16)
    state_dict["model.layers.0.self_attn.v_scale"] = torch.tensor([0.25], dtype=torch.bfloat16)

    result = compress_state_dict(state_dict, kv_options())

    assert torch.equal(result.tensors["model.layers.0.self_attn.k_scale"], state_dict["model.layers.0.self_attn.k_scale"])
    assert result.tensors["model.layers.0.self_attn.v_scale"].dtype == torch.bfloat16
    assert result.config["kv_cache_scheme"]["dynamic"] is False
    assert result.config["kv_cache_scheme"]["observer"] is None


def test_kv_cache_missing_v_scale() -> None:
    state_dict = fused_experts()
    state_dict["model.layers.0.self_attn.k_scale"] = torch.tensor([0.5])

    with pytest.raises(MissingTensorError, match=r"attention module model\.layers\.0\.self_attn lacks v_scale"):
        compress_state_dict(state_dict, kv_options())


def test_kv_cache_dynamic_needs_no_scales() -> None:
    result = compress_state_dict(fused_experts(), kv_options(dynamic=True))

    assert result.config["kv_cache_scheme"]["dynamic"] is True


def test_kv_cache_skips_non_attention_class() -> None:
    # A module with k_proj/v_proj children whose class is not attention needs no scales.
    module_types = {"model.layers.0.self_attn": ("CrossMixer", "Module")}

    result = compress_state_dict(fused_experts(), kv_options(), module_types=module_types)

    assert result.config["kv_cache_scheme"] is not None


TRANSFORM_CONFIG = {
    "config_groups": {
        "R1": {"type": "hadamard", "apply": [{"targets": ["Linear"], "location": "weight_input"}]}
    }
}


def test_transform_config_passes_through() -> None:
    options = CompressionOptions(quantization=w4a16().quantization, transform_config=TRANSFORM_CONFIG)

    result = compress_state_dict(fused_experts(), options)

    assert result.config["transform_config"] == TRANSFORM_CONFIG


def test_transform_config_from_quantization_dict() -> None:
    entry = compress_state_dict(fused_experts(), w4a16()).config
    entry["transform_config"] = TRANSFORM_CONFIG

    result = compress_state_dict(fused_experts(), CompressionOptions(quantization=entry))

    assert result.config["transform_config"] == TRANSFORM_CONFIG


def test_transform_config_rejects_list() -> None:
    with pytest.raises(InvalidOptionsError, match="transform_config must be a dict"):
        CompressionOptions(transform_config=["hadamard"])


def test_save_pretrained_attached_kv_scheme(tmp_path) -> None:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from tensorpress.adapters.hf import save_pretrained

    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        hidden_size=128, moe_intermediate_size=128, num_experts=2, num_experts_per_tok=1,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=64,
    )
    model = Qwen3MoeForCausalLM(config)
    kv_args = QuantizationArgs(num_bits=8, type="float", strategy="tensor", dynamic=False, symmetric=True)
    weights = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(num_bits=8, type="int", strategy="channel"))
    model.model.layers[0].self_attn.q_proj.quantization_scheme = weights
    attention = model.model.layers[0].self_attn
    attention.quantization_scheme = QuantizationScheme(targets=["re:.*self_attn$"], input_activations=kv_args)
    attention.register_parameter("k_scale", torch.nn.Parameter(torch.tensor([0.5]), requires_grad=False))
    attention.register_parameter("v_scale", torch.nn.Parameter(torch.tensor([0.25]), requires_grad=False))

    result = save_pretrained(model, tmp_path)

    assert result.config["kv_cache_scheme"]["num_bits"] == 8
    assert torch.equal(result.tensors["model.layers.0.self_attn.k_scale"], torch.tensor([0.5]))
    assert "model.layers.0.mlp.experts.1.down_proj.weight" in result.tensors


def test_lazy_source_with_fused_experts(tmp_path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    fused = fused_experts()
    save_file(fused, tmp_path / "model.safetensors")
    expected = compress_state_dict(fused, w4a16(), model_type="mixtral")

    with safe_open(tmp_path / "model.safetensors", framework="pt") as source:
        result = compress_state_dict(source, w4a16(), model_type="mixtral")

    assert sorted(result.tensors) == sorted(expected.tensors)
    for name, tensor in expected.tensors.items():
        assert torch.equal(result.tensors[name], tensor), name


def test_ignored_experts_in_peer_order() -> None:
    # llmcompressor registers each linearized expert's up_proj before gate_proj.
    options = CompressionOptions.for_scheme("W4A16", ignore=["re:.*mlp.gate$", "re:.*experts.1.*"])

    result = compress_state_dict(fused_experts(), options)

    assert result.config["ignore"] == [
        "model.layers.0.mlp.experts.1.up_proj",
        "model.layers.0.mlp.experts.1.gate_proj",
        "model.layers.0.mlp.experts.1.down_proj",
        "model.layers.0.mlp.gate",
    ]
