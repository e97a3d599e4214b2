"""The command line end to end on real folders: packaged MiniLM and a sharded synthetic Llama.

Each folder goes through compress, inspect, verify, decompress, then
inspect and verify again on the dense copy, which transformers loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import GOLDEN_DIR
from safetensors import safe_open
from test_checkpoint import write_three_shards
from transformers import AutoModel, AutoModelForCausalLM

from tensorpress.cli import main
from tensorpress.demo import minilm_folder


def inspect_json(folder: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    capsys.readouterr()
    assert main(["inspect", str(folder), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def tensor_names(folder: Path) -> dict[str, str]:
    """Return tensor name -> dtype over every safetensors file in `folder`."""
    names = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as file:
            for name in file.keys():
                names[name] = file.get_slice(name).get_dtype()
    return names


def cosine(expected: torch.Tensor, actual: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(expected.flatten(), actual.flatten(), dim=0).item()


def test_minilm_folder_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = minilm_folder()
    packed = tmp_path / "w8a8"
    dense = tmp_path / "dense"

    assert main(["compress", str(source), str(packed), "--scheme", "W8A8", "--quiet", "--workers", "2"]) == 0
    summary = inspect_json(packed, capsys)
    assert main(["verify", str(packed)]) == 0
    assert main(["decompress", str(packed), str(dense), "--quiet"]) == 0
    dense_summary = inspect_json(dense, capsys)
    assert main(["verify", str(dense)]) == 0

    assert summary["format"] == "int-quantized"
    assert summary["architecture"] == "BertModel"
    assert summary["quantized_modules"] == 37  # 6 layers of 6 Linear modules, and the pooler
    assert summary["compression_ratio"] > 1.1  # the float32 word embeddings stay dense
    assert dense_summary["format"] is None
    assert tensor_names(dense) == tensor_names(source)
    assert (dense / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    assert (dense / "1_Pooling" / "config.json").is_file()
    original = AutoModel.from_pretrained(source)
    reloaded = AutoModel.from_pretrained(dense)
    input_ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102]])
    with torch.no_grad():
        expected = original(input_ids).last_hidden_state
        actual = reloaded(input_ids).last_hidden_state
    assert cosine(expected, actual) > 0.99


def test_sharded_llama_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = write_three_shards(tmp_path / "sharded")
    packed = tmp_path / "nvfp4"
    dense = tmp_path / "dense"

    assert main(["compress", str(source), str(packed), "--scheme", "NVFP4A16", "--max-shard-size", "150KB", "--quiet"]) == 0
    summary = inspect_json(packed, capsys)
    assert main(["verify", str(packed)]) == 0
    assert main(["decompress", str(packed), str(dense), "--max-shard-size", "300KB", "--quiet"]) == 0
    dense_summary = inspect_json(dense, capsys)
    assert main(["verify", str(dense)]) == 0

    assert summary["format"] == "nvfp4-pack-quantized"
    assert summary["quantized_modules"] == 14
    assert len(summary["weight_files"]) > 2
    assert (packed / "model.safetensors.index.json").is_file()
    assert dense_summary["format"] is None
    assert len(dense_summary["weight_files"]) > 2
    assert tensor_names(dense) == tensor_names(GOLDEN_DIR / "model_untied")
    original = AutoModelForCausalLM.from_pretrained(source)
    reloaded = AutoModelForCausalLM.from_pretrained(dense)
    input_ids = torch.tensor([[1, 5, 9, 13, 42]])
    with torch.no_grad():
        expected = original(input_ids).logits
        actual = reloaded(input_ids).logits
    assert cosine(expected, actual) > 0.98
