"""Reading sparse checkpoints that transformers with compressed-tensors 0.20 cannot load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tensorpress.checkpoint import decompress_checkpoint, load_dense_state_dict

SPARSE_DIR = Path(__file__).resolve().parent / "fixtures" / "golden_sparse"


def pruned_input() -> dict[str, torch.Tensor]:
    return load_file(SPARSE_DIR / "input_24" / "model.safetensors")


@pytest.mark.parametrize("case", ["dense_24_stats", "unstructured_bitmask"])
def test_load_dense_state_dict_restores_sparse_weights(case: str) -> None:
    source = "input_unstructured" if "unstructured" in case else "input_24"
    expected = load_file(SPARSE_DIR / source / "model.safetensors")

    dense = load_dense_state_dict(SPARSE_DIR / case)

    assert sorted(dense) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(dense[name], tensor), name


def test_decompress_checkpoint_writes_sparse_folder_dense(tmp_path: Path) -> None:
    expected = pruned_input()

    decompress_checkpoint(SPARSE_DIR / "dense_24_stats", tmp_path / "dense")

    written = load_file(tmp_path / "dense" / "model.safetensors")
    assert sorted(written) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(written[name], tensor), name
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "quantization_config" not in config
