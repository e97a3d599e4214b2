"""Exceptions raised by tensorpress.

Every error a caller can cause derives from `TensorpressError`, so one
``except TensorpressError`` catches them all. Each message names the tensor,
option or file involved and what to change.
"""

from __future__ import annotations

__all__ = [
    "TensorpressError",
    "InvalidOptionsError",
    "UnsupportedFormatError",
    "InvalidTensorError",
    "MissingTensorError",
    "CheckpointError",
]


class TensorpressError(Exception):
    """Base class of every error tensorpress raises on bad input."""


class InvalidOptionsError(TensorpressError, ValueError):
    """An option, or a combination of options, is invalid."""


class UnsupportedFormatError(TensorpressError, ValueError):
    """A compression format name is unknown, or cannot hold the requested scheme."""


class InvalidTensorError(TensorpressError, ValueError):
    """A tensor has a dtype, shape or value that its scheme cannot take."""


class MissingTensorError(TensorpressError, KeyError):
    """A tensor that a scheme or format requires is absent from the input."""

    def __str__(self) -> str:
        # KeyError quotes its argument; a sentence reads better unquoted.
        return str(self.args[0]) if self.args else ""


class CheckpointError(TensorpressError, OSError):
    """A checkpoint file or folder is missing, corrupt or unsafe to read."""
