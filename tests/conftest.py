"""Shared fixtures and helpers for the tensorpress test suite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

GOLDEN_DIR = Path(__file__).resolve().parent / "fixtures" / "golden"
SCHEMES = ("W4A16", "W4A16_ASYM", "W8A16", "W8A8", "FP8_DYNAMIC", "FP8_BLOCK", "NVFP4A16", "MXFP4A16")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_golden_input(tied: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Return the seeded input model's state dict, cast as from_pretrained(dtype=...) casts it."""
    folder = GOLDEN_DIR / ("model_tied" if tied else "model_untied")
    return {name: tensor.to(dtype) for name, tensor in load_file(folder / "model.safetensors").items()}


def load_golden_case(case: str) -> tuple[dict[str, torch.Tensor], dict, dict[str, torch.Tensor]]:
    """Return (peer output tensors, peer quantization_config entry, peer pre-save qparams)."""
    folder = GOLDEN_DIR / case
    tensors = load_file(folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    qparams = load_file(folder / "presave_qparams.safetensors")
    return tensors, config, qparams


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Assert equal names, dtypes, shapes and bytes (fp8 compared as raw bytes)."""
    assert sorted(actual) == sorted(expected)
    for name, want in expected.items():
        got = actual[name]
        assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
        assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        got_bytes = raw_bytes(got)
        want_bytes = raw_bytes(want)
        assert torch.equal(got_bytes, want_bytes), f"{name}: bytes differ"


def raw_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """Return the tensor's bytes; a fresh copy has standard strides even for size-1 dims."""
    return torch.empty(tensor.shape, dtype=tensor.dtype).copy_(tensor).reshape(-1).view(torch.uint8)


def without_version(config: dict) -> dict:
    """Return the config entry without its compressed-tensors version."""
    return {key: value for key, value in config.items() if key != "version"}


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN_DIR
