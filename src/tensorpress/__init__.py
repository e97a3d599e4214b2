"""tensorpress: compressed-tensors checkpoints from plain state dicts.

The core is two pure functions, `compress_state_dict` and
`decompress_state_dict`, over tensor names and tensors; `save_pretrained`
adapts them to Hugging Face transformers models without patching anything.
"""

from __future__ import annotations

from tensorpress.compress import CompressedStateDict, compress_state_dict, decompress_state_dict
from tensorpress.errors import (
    CheckpointError,
    InvalidOptionsError,
    InvalidTensorError,
    MissingTensorError,
    TensorpressError,
    UnsupportedFormatError,
)
from tensorpress.options import CompressionOptions

__all__ = [
    "CompressionOptions",
    "CompressedStateDict",
    "compress_state_dict",
    "decompress_state_dict",
    "save_pretrained",
    "TensorpressError",
    "InvalidOptionsError",
    "InvalidTensorError",
    "MissingTensorError",
    "UnsupportedFormatError",
    "CheckpointError",
]

__version__ = "0.1.0"


def save_pretrained(model, save_directory, **kwargs):  # type: ignore[no-untyped-def]
    """Save a transformers model as a compressed-tensors checkpoint.

    See `tensorpress.adapters.hf.save_pretrained`; this wrapper keeps
    transformers out of ``import tensorpress``.
    """
    from tensorpress.adapters.hf import save_pretrained as _save_pretrained

    return _save_pretrained(model, save_directory, **kwargs)
