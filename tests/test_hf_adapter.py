"""save_pretrained on real transformers models: peer equality, no mutation, files written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, apply_quantization_config
from conftest import DTYPES, GOLDEN_DIR, assert_same_tensors, load_golden_case, without_version
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.utils.quantization_config import CompressedTensorsConfig

from tensorpress import CompressionOptions, InvalidOptionsError, save_pretrained


def load_input_model(dtype: str = "float32", tied: bool = False) -> LlamaForCausalLM:
    folder = GOLDEN_DIR / ("model_tied" if tied else "model_untied")
    return AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype])


def scheme_config(scheme: str) -> QuantizationConfig:
    return CompressionOptions.for_scheme(scheme, ignore=["lm_head"]).quantization


def read_saved(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = load_file(folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    return tensors, config


@pytest.mark.parametrize("scheme", ["W4A16", "W8A8", "FP8_BLOCK", "NVFP4A16"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_save_pretrained_min_max_matches_peer(tmp_path: Path, scheme: str, dtype: str) -> None:
    peer_tensors, peer_config, _ = load_golden_case(f"{scheme}_{dtype}")
    model = load_input_model(dtype)

    save_pretrained(model, tmp_path / "out", quantization=scheme_config(scheme))

    tensors, config = read_saved(tmp_path / "out")
    assert_same_tensors(tensors, peer_tensors)
    assert without_version(config["quantization_config"]) == without_version(peer_config)


def attach_peer_schemes(model: torch.nn.Module, case: str) -> None:
    """Attach schemes and qparams as llmcompressor leaves them, without llmcompressor."""
    _, peer_config, qparams = load_golden_case(case)
    config = QuantizationConfig.model_validate(peer_config)
    config.quantization_status = QuantizationStatus.FROZEN
    apply_quantization_config(model, config, show_progress=False)
    for name, value in qparams.items():
        module_name, _, local = name.rpartition(".")
        module = model.get_submodule(module_name)
        setattr(module, local, torch.nn.Parameter(value.clone(), requires_grad=False))


@pytest.mark.parametrize("case", ["W4A16_ASYM_bfloat16", "NVFP4A16_float32", "FP8_DYNAMIC_bfloat16"])
def test_attached_schemes_match_peer(tmp_path: Path, case: str) -> None:
    peer_tensors, peer_config, _ = load_golden_case(case)
    model = load_input_model(case.rsplit("_", 1)[1])
    attach_peer_schemes(model, case)

    save_pretrained(model, tmp_path / "out")

    tensors, config = read_saved(tmp_path / "out")
    assert_same_tensors(tensors, peer_tensors)
    assert without_version(config["quantization_config"]) == without_version(peer_config)


def snapshot(model: torch.nn.Module) -> dict:
    return {
        "tensors": {name: tensor.detach().clone() for name, tensor in model.state_dict().items()},
        "modules": [(name, type(module), sorted(vars(module))) for name, module in model.named_modules()],
        "methods": {name: type(module).__dict__.get("forward") for name, module in model.named_modules()},
        "instance_attrs": {name: sorted(module.__dict__) for name, module in model.named_modules()},
        "config": model.config.to_dict(),
        "save_pretrained": model.save_pretrained,
    }


def test_model_unchanged_after_save(tmp_path: Path) -> None:
    model = load_input_model("bfloat16")
    attach_peer_schemes(model, "W4A16_ASYM_bfloat16")
    before = snapshot(model)

    save_pretrained(model, tmp_path / "out")

    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["instance_attrs"] == before["instance_attrs"]
    assert after["methods"] == before["methods"]
    assert after["config"] == before["config"]
    assert after["save_pretrained"] == before["save_pretrained"]
    assert "save_pretrained" not in vars(model)
    assert sorted(after["tensors"]) == sorted(before["tensors"])
    for name, tensor in before["tensors"].items():
        assert torch.equal(after["tensors"][name], tensor), name


def test_tied_model_matches_peer(tmp_path: Path) -> None:
    peer_tensors, peer_config, _ = load_golden_case("W4A16_tied_float32")
    model = load_input_model("float32", tied=True)

    save_pretrained(model, tmp_path / "out", quantization=scheme_config("W4A16"))

    tensors, config = read_saved(tmp_path / "out")
    assert "lm_head.weight" not in tensors
    assert_same_tensors(tensors, peer_tensors)
    assert without_version(config["quantization_config"]) == without_version(peer_config)
    assert config["tie_word_embeddings"] is True


def test_reload_with_transformers(tmp_path: Path) -> None:
    model = load_input_model("float32")
    save_pretrained(model, tmp_path / "out", quantization=scheme_config("W8A16"))
    input_ids = torch.tensor([[1, 5, 9, 13, 42]])

    reloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", quantization_config=CompressedTensorsConfig(run_compressed=False)
    )

    with torch.no_grad():
        expected = model(input_ids).logits
        actual = reloaded(input_ids).logits
    cosine = torch.nn.functional.cosine_similarity(expected.flatten(), actual.flatten(), dim=0)
    assert cosine > 0.999


def test_generation_config_written(tmp_path: Path) -> None:
    model = load_input_model("float32")

    save_pretrained(model, tmp_path / "out", quantization=scheme_config("W4A16"))

    assert (tmp_path / "out" / "generation_config.json").is_file()
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]


def test_shards_written_past_max_shard_size(tmp_path: Path) -> None:
    model = load_input_model("float32")

    save_pretrained(model, tmp_path / "out", quantization=scheme_config("W4A16"), max_shard_size="200KB")

    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted({file for file in index["weight_map"].values()})
    assert len(shards) > 1
    for shard in shards:
        assert (tmp_path / "out" / shard).is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", quantization_config=CompressedTensorsConfig(run_compressed=False)
    )
    assert reloaded.model.layers[0].self_attn.q_proj.weight.shape == (128, 128)


def test_existing_folder_keeps_other_files(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "tokenizer.json").write_text("{}")
    (folder / "model-00001-of-00009.safetensors").write_bytes(b"stale")
    model = load_input_model("float32")

    save_pretrained(model, folder, quantization=scheme_config("W4A16"))

    names = sorted(path.name for path in folder.iterdir())
    assert "tokenizer.json" in names
    assert "model-00001-of-00009.safetensors" not in names
    assert [path.name for path in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        ({"push_to_hub": True}, "push_to_hub"),
        ({"safe_serialization": False}, "safetensors"),
        ({"shard_size": "1GB"}, "unknown save_pretrained argument"),
    ],
)
def test_unsupported_arguments_rejected(tmp_path: Path, argument: dict, message: str) -> None:
    model = load_input_model("float32")

    with pytest.raises(InvalidOptionsError, match=message):
        save_pretrained(model, tmp_path / "out", **argument)

    assert not (tmp_path / "out").exists()


def test_dense_model_saved_without_quantization_config(tmp_path: Path) -> None:
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, vocab_size=32))

    result = save_pretrained(model, tmp_path / "out")

    _, config = read_saved(tmp_path / "out")
    assert result.config is None
    assert "quantization_config" not in config
