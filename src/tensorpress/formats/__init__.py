"""On-disk formats, found by the name written in config.json.

Each format is a pair of pure functions over one module's tensors, keyed by
their local names ("weight", "weight_scale", ...): ``compress(tensors,
scheme)`` and ``decompress(tensors, scheme)``. Neither mutates its input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from compressed_tensors.quantization import QuantizationScheme

from tensorpress.errors import UnsupportedFormatError

__all__ = ["ModuleTensors", "Format", "get_format", "register_format", "format_names"]

ModuleTensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Format:
    """One on-disk format: its config.json name and its two pure functions."""

    name: str
    compress: Callable[[ModuleTensors, QuantizationScheme], ModuleTensors]
    # decompress(tensors, scheme, dtype): a dtype of None keeps the format's
    # own output dtype. Otherwise fp4 and fp6 formats, whose scales do not
    # record the model's dtype, dequantize in the given dtype.
    decompress: Callable[[ModuleTensors, QuantizationScheme, "torch.dtype | None"], ModuleTensors]


_REGISTRY: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    """Add a format to the registry under its config.json name."""
    _REGISTRY[fmt.name] = fmt
    return fmt


def get_format(name: str) -> Format:
    """Return the registered format called `name`.

    Raises:
        UnsupportedFormatError: no format has that name.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnsupportedFormatError(
            f"unknown compression format {name!r}: expected one of "
            f"{', '.join(sorted(_REGISTRY))}"
        ) from None


def format_names() -> list[str]:
    """Return the names of every registered format, sorted."""
    return sorted(_REGISTRY)


# Import for their side effect of registering formats.
from tensorpress.formats import quantized as _quantized  # noqa: E402,F401
from tensorpress.formats import sparse as _sparse  # noqa: E402,F401
