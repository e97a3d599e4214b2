"""Load a compressed-tensors folder into memory as a dense state dict."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from tensorpress.checkpoint.source import open_checkpoint
from tensorpress.compress import decompress_state_dict
from tensorpress.errors import CheckpointError

__all__ = ["load_dense_state_dict"]


def load_dense_state_dict(
    folder: str | os.PathLike[str], *, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Read every tensor of a compressed-tensors folder and return dense weights.

    This reads quantized, sparse and stacked checkpoints, including the
    sparse ones that transformers with compressed-tensors 0.20 cannot load.
    The whole model is held in memory; to write a dense folder without that,
    use `decompress_checkpoint`. A folder without a quantization_config is
    returned as it is stored.

    Raises:
        CheckpointError: the folder or its config.json is missing or corrupt.
        MissingTensorError, InvalidTensorError: see `decompress_state_dict`.

    Example (tests/test_checkpoint_sparse_read.py runs the same on fixtures)::

        dense = load_dense_state_dict("llama-2of4-fp8")
        model.load_state_dict(dense)
    """
    folder = Path(folder)
    source = open_checkpoint(folder)
    config_path = folder / "config.json"
    quantization = None
    if config_path.is_file():
        try:
            quantization = json.loads(config_path.read_text(encoding="utf-8")).get("quantization_config")
        except (OSError, ValueError, AttributeError) as error:
            raise CheckpointError(f"{config_path} is not a readable JSON object: {error}") from None
    tensors = {name: source[name] for name in source}
    if not quantization:
        return tensors
    return decompress_state_dict(tensors, quantization, dtype=dtype)
