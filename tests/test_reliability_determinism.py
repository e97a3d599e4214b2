"""The same input and options give byte-identical files, across runs and worker counts."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from conftest import GOLDEN_DIR, raw_bytes

from tensorpress import CompressionOptions, compress_state_dict, save_pretrained
from tensorpress.checkpoint import compress_checkpoint, decompress_checkpoint

SOURCE = GOLDEN_DIR / "model_untied"


def folder_digests(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def tensor_digests(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    return {
        name: f"{tensor.dtype} {tuple(tensor.shape)} {hashlib.sha256(raw_bytes(tensor).numpy().tobytes()).hexdigest()}"
        for name, tensor in tensors.items()
    }


@pytest.mark.parametrize("scheme", ["W8A8", "FP8_BLOCK", "MXFP4A16", "W4A16_ASYM"])
def test_compress_checkpoint_across_runs_and_workers(tmp_path: Path, scheme: str) -> None:
    options = CompressionOptions.for_scheme(scheme)
    digests = []
    for run, workers in enumerate((1, 1, 2, 4)):
        output = tmp_path / f"run{run}"
        compress_checkpoint(SOURCE, output, options, max_shard_size="200KB", workers=workers)
        digests.append(folder_digests(output))

    assert len(digests[0]) > 2
    for other in digests[1:]:
        assert other == digests[0]


def test_decompress_checkpoint_across_runs_and_workers(tmp_path: Path) -> None:
    compress_checkpoint(SOURCE, tmp_path / "packed", CompressionOptions.for_scheme("NVFP4A16"))
    digests = []
    for run, workers in enumerate((1, 1, 3)):
        output = tmp_path / f"dense{run}"
        decompress_checkpoint(tmp_path / "packed", output, max_shard_size="400KB", workers=workers)
        digests.append(folder_digests(output))

    for other in digests[1:]:
        assert other == digests[0]


@pytest.mark.parametrize("workers", [2, 4])
def test_compress_state_dict_workers_same_bytes(workers: int) -> None:
    generator = torch.Generator().manual_seed(3)
    state_dict = {f"layers.{index}.proj.weight": torch.randn(32, 256, generator=generator) for index in range(6)}
    options = CompressionOptions.for_scheme("W4A16")
    parallel = compress_state_dict(state_dict, options, workers=workers)
    serial = compress_state_dict(state_dict, options)

    assert tensor_digests(dict(parallel.tensors)) == tensor_digests(dict(serial.tensors))
    assert parallel.config == serial.config


def test_save_pretrained_across_runs(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4, vocab_size=64)
    )
    options = CompressionOptions.for_scheme("W4A16", ignore=["lm_head"])

    save_pretrained(model, tmp_path / "first", quantization=options.quantization, max_shard_size="100KB")
    save_pretrained(model, tmp_path / "second", quantization=options.quantization, max_shard_size="100KB")

    assert folder_digests(tmp_path / "first") == folder_digests(tmp_path / "second")
    assert len(list((tmp_path / "first").glob("*.safetensors"))) > 1
