"""Checkpoint folders: compress, decompress, inspect and verify safetensors folders on disk.

Tensors are read one module at a time and written through a spool, so peak
memory follows the largest module, not the checkpoint or shard size.
"""

from __future__ import annotations

from tensorpress.checkpoint.load import load_dense_state_dict
from tensorpress.checkpoint.pipeline import (
    CheckpointResult,
    Progress,
    compress_checkpoint,
    decompress_checkpoint,
)
from tensorpress.checkpoint.source import CheckpointSource, TensorInfo, open_checkpoint

__all__ = [
    "CheckpointResult",
    "CheckpointSource",
    "Progress",
    "TensorInfo",
    "compress_checkpoint",
    "decompress_checkpoint",
    "load_dense_state_dict",
    "open_checkpoint",
]
