"""compress_checkpoint: folder to folder, byte-equal to the in-memory route."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import GOLDEN_DIR, SCHEMES, assert_same_tensors, load_golden_case, without_version
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from transformers.utils.quantization_config import CompressedTensorsConfig

from tensorpress import (
    CheckpointError,
    CompressionOptions,
    InvalidOptionsError,
    InvalidTensorError,
    compress_state_dict,
)
from tensorpress.checkpoint import compress_checkpoint
from tensorpress.checkpoint.architecture import module_kinds_from_config
from tensorpress.writer import write_safetensors_shards

SOURCE = GOLDEN_DIR / "model_untied"


def copy_source(destination: Path) -> Path:
    """Copy the golden input folder and add a tokenizer file that must be carried over."""
    shutil.copytree(SOURCE, destination)
    (destination / "tokenizer.json").write_text('{"version": "1.0"}\n')
    return destination


def write_three_shards(destination: Path) -> Path:
    """Write the golden input as 3 shards and an index, fused partners in different shards."""
    copy_source(destination)
    (destination / "model.safetensors").unlink()
    tensors = load_file(SOURCE / "model.safetensors")
    names = sorted(tensors)
    weight_map = {}
    for number in range(3):
        shard = f"model-{number + 1:05d}-of-00003.safetensors"
        part = {name: tensors[name] for position, name in enumerate(names) if position % 3 == number}
        save_file(part, destination / shard, metadata={"format": "pt"})
        weight_map.update({name: shard for name in part})
    index = {"metadata": {"total_size": 0}, "weight_map": dict(sorted(weight_map.items()))}
    (destination / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return destination


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def in_memory_route(folder: Path, scheme: str, max_shard_size: str) -> dict[str, bytes]:
    """compress_state_dict plus write_safetensors_shards on the same tensors, same order."""
    state_dict = load_file(SOURCE / "model.safetensors")
    state_dict = {name: state_dict[name] for name in sorted(state_dict)}
    module_types = module_kinds_from_config(SOURCE).module_types
    result = compress_state_dict(state_dict, CompressionOptions.for_scheme(scheme), module_types=module_types)
    # FP8_BLOCK returns views into padded buffers, and huggingface_hub's
    # splitter counts a view's whole storage. Cloning makes it count the
    # bytes actually written, as compress_checkpoint does.
    compact = {name: tensor.clone() for name, tensor in result.tensors.items()}
    folder.mkdir()
    write_safetensors_shards(folder, compact, max_shard_size=max_shard_size)
    return folder_bytes(folder)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_single_file_matches_peer(tmp_path: Path, scheme: str) -> None:
    peer_tensors, peer_config, _ = load_golden_case(f"{scheme}_float32")

    result = compress_checkpoint(SOURCE, tmp_path / "out", CompressionOptions.for_scheme(scheme))

    assert result.weight_files == ["model.safetensors"]
    written = (tmp_path / "out" / "model.safetensors").read_bytes()
    assert written == (GOLDEN_DIR / f"{scheme}_float32" / "model.safetensors").read_bytes()
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert without_version(config["quantization_config"]) == without_version(peer_config)
    assert_same_tensors(load_file(tmp_path / "out" / "model.safetensors"), peer_tensors)


def test_config_json_matches_peer_text(tmp_path: Path) -> None:
    result = compress_checkpoint(SOURCE, tmp_path / "out", CompressionOptions.for_scheme("W4A16"))

    written = json.loads((tmp_path / "out" / "config.json").read_text())
    peer = json.loads((GOLDEN_DIR / "W4A16_float32" / "config.json").read_text())
    written["quantization_config"]["version"] = peer["quantization_config"]["version"]
    assert written == peer
    assert "meta device" in result.module_kinds
    text = (tmp_path / "out" / "config.json").read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"


@pytest.mark.parametrize("scheme", ["W4A16", "NVFP4A16"])
def test_sharded_input_matches_single_file(tmp_path: Path, scheme: str) -> None:
    source = write_three_shards(tmp_path / "sharded")

    compress_checkpoint(source, tmp_path / "out", CompressionOptions.for_scheme(scheme))

    written = (tmp_path / "out" / "model.safetensors").read_bytes()
    assert written == (GOLDEN_DIR / f"{scheme}_float32" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("scheme", ["W4A16", "NVFP4A16", "FP8_BLOCK"])
def test_sharded_output_matches_in_memory_route(tmp_path: Path, scheme: str) -> None:
    expected = in_memory_route(tmp_path / "memory", scheme, max_shard_size="150KB")

    result = compress_checkpoint(
        SOURCE, tmp_path / "out", CompressionOptions.for_scheme(scheme), max_shard_size="150KB"
    )

    written = folder_bytes(tmp_path / "out")
    assert len(result.weight_files) > 2
    weight_files = {name: data for name, data in written.items() if "safetensors" in name}
    assert weight_files == expected


def test_other_files_copied(tmp_path: Path) -> None:
    source = write_three_shards(tmp_path / "sharded")

    compress_checkpoint(source, tmp_path / "out", CompressionOptions.for_scheme("W8A16"))

    names = sorted(path.name for path in (tmp_path / "out").iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"version": "1.0"}\n'
    leftovers = [path.name for path in tmp_path.iterdir() if path.name.startswith(".")]
    assert leftovers == []


def test_reload_with_transformers(tmp_path: Path) -> None:
    compress_checkpoint(
        SOURCE, tmp_path / "out", CompressionOptions.for_scheme("W8A16"), max_shard_size="300KB"
    )
    original = AutoModelForCausalLM.from_pretrained(SOURCE)
    input_ids = torch.tensor([[1, 5, 9, 13, 42]])

    reloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", quantization_config=CompressedTensorsConfig(run_compressed=False)
    )

    with torch.no_grad():
        expected = original(input_ids).logits
        actual = reloaded(input_ids).logits
    cosine = torch.nn.functional.cosine_similarity(expected.flatten(), actual.flatten(), dim=0)
    assert cosine > 0.999


def test_unknown_architecture_uses_name_rule(tmp_path: Path) -> None:
    source = copy_source(tmp_path / "custom")
    config = json.loads((source / "config.json").read_text())
    config["architectures"] = ["NotInTransformersForCausalLM"]
    (source / "config.json").write_text(json.dumps(config))

    result = compress_checkpoint(source, tmp_path / "out", CompressionOptions.for_scheme("W4A16"))

    assert "name/shape rule" in result.module_kinds
    assert "NotInTransformersForCausalLM" in result.module_kinds
    written = (tmp_path / "out" / "model.safetensors").read_bytes()
    assert written == (GOLDEN_DIR / "W4A16_float32" / "model.safetensors").read_bytes()


def test_pickle_checkpoint_rejected(tmp_path: Path) -> None:
    source = tmp_path / "pickled"
    source.mkdir()
    shutil.copy(SOURCE / "config.json", source / "config.json")
    torch.save(load_file(SOURCE / "model.safetensors"), source / "pytorch_model.bin")

    with pytest.raises(CheckpointError, match="allow_pickle"):
        compress_checkpoint(source, tmp_path / "out", CompressionOptions.for_scheme("W4A16"))

    assert not (tmp_path / "out").exists()


def test_pickle_checkpoint_converted_when_allowed(tmp_path: Path) -> None:
    source = tmp_path / "pickled"
    source.mkdir()
    shutil.copy(SOURCE / "config.json", source / "config.json")
    torch.save(load_file(SOURCE / "model.safetensors"), source / "pytorch_model.bin")

    compress_checkpoint(source, tmp_path / "out", CompressionOptions.for_scheme("W4A16"), allow_pickle=True)

    written = (tmp_path / "out" / "model.safetensors").read_bytes()
    assert written == (GOLDEN_DIR / "W4A16_float32" / "model.safetensors").read_bytes()
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]


def test_quantized_source_rejected(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="already has a quantization_config"):
        compress_checkpoint(
            GOLDEN_DIR / "W4A16_float32", tmp_path / "out", CompressionOptions.for_scheme("W4A16")
        )


def test_output_inside_source_rejected(tmp_path: Path) -> None:
    source = copy_source(tmp_path / "source")

    with pytest.raises(CheckpointError, match="inside it"):
        compress_checkpoint(source, source / "out", CompressionOptions.for_scheme("W4A16"))


def test_failure_leaves_no_folder(tmp_path: Path) -> None:
    source = copy_source(tmp_path / "source")
    tensors = load_file(source / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})

    with pytest.raises(InvalidTensorError, match="up_proj.weight contains 1 NaN"):
        compress_checkpoint(source, tmp_path / "out", CompressionOptions.for_scheme("W4A16"))

    assert sorted(path.name for path in tmp_path.iterdir()) == ["source"]


def test_truncated_shard_rejected(tmp_path: Path) -> None:
    source = copy_source(tmp_path / "source")
    data = (source / "model.safetensors").read_bytes()
    (source / "model.safetensors").write_bytes(data[:-100])

    with pytest.raises(CheckpointError, match="truncated"):
        compress_checkpoint(source, tmp_path / "out", CompressionOptions.for_scheme("W4A16"))


def test_index_naming_missing_tensor_rejected(tmp_path: Path) -> None:
    source = write_three_shards(tmp_path / "sharded")
    index = json.loads((source / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.extra.weight"] = "model-00001-of-00003.safetensors"
    (source / "model.safetensors.index.json").write_text(json.dumps(index))

    with pytest.raises(CheckpointError, match="model.extra.weight"):
        compress_checkpoint(source, tmp_path / "out", CompressionOptions.for_scheme("W4A16"))


@pytest.mark.parametrize("scheme", ["W4A16", "NVFP4A16"])
def test_worker_counts_give_same_bytes(tmp_path: Path, scheme: str) -> None:
    source = write_three_shards(tmp_path / "sharded")
    options = CompressionOptions.for_scheme(scheme)

    compress_checkpoint(source, tmp_path / "one", options, max_shard_size="150KB", workers=1)
    compress_checkpoint(source, tmp_path / "three", options, max_shard_size="150KB", workers=3)

    assert folder_bytes(tmp_path / "three") == folder_bytes(tmp_path / "one")


def test_progress_reports_every_module(tmp_path: Path) -> None:
    calls: list[tuple[str, int, int]] = []

    compress_checkpoint(
        SOURCE,
        tmp_path / "out",
        CompressionOptions.for_scheme("W4A16"),
        workers=2,
        progress=lambda stage, done, total: calls.append((stage, done, total)),
    )

    compress_calls = [call for call in calls if call[0] == "compress"]
    assert compress_calls[-1] == ("compress", 14, 14)
    assert [done for _, done, _ in compress_calls] == list(range(1, 15))
    assert calls[-1] == ("write", 1, 1)


def test_invalid_worker_count_rejected(tmp_path: Path) -> None:
    with pytest.raises(InvalidOptionsError, match="workers"):
        compress_checkpoint(SOURCE, tmp_path / "out", CompressionOptions.for_scheme("W4A16"), workers=0)
