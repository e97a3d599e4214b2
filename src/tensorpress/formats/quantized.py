"""Quantized formats, delegated to compressed-tensors' own compressors.

compressed-tensors 0.20 compressors are pure classmethods over a module's
local state dict, so they define the exact bytes; this module adapts them to
the format registry and infers a module's format the way compressed-tensors
does (first match in its priority order).
"""

from __future__ import annotations

import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.compressors.format import COMPRESSION_FORMAT_PRIORITY
from compressed_tensors.quantization import QuantizationScheme

from tensorpress.formats import Format, ModuleTensors, register_format

__all__ = ["QUANTIZED_FORMAT_NAMES", "infer_module_format", "module_class_for"]

QUANTIZED_FORMAT_NAMES: tuple[str, ...] = tuple(fmt.value for fmt in COMPRESSION_FORMAT_PRIORITY)


def module_class_for(class_names: tuple[str, ...]) -> type[torch.nn.Module]:
    """Return the torch class that compressed-tensors' format checks expect."""
    if "Linear" in class_names or "LinearBase" in class_names:
        return torch.nn.Linear
    if "Embedding" in class_names:
        return torch.nn.Embedding
    return torch.nn.Module


def infer_module_format(class_names: tuple[str, ...], scheme: QuantizationScheme) -> str:
    """Return the first format, in compressed-tensors' priority order, that fits the module."""
    module_class = module_class_for(class_names)
    for fmt in COMPRESSION_FORMAT_PRIORITY:
        compressor = BaseCompressor.get_value_from_registry(fmt.value)
        if compressor.can_compress(module_class, scheme):
            return fmt.value
    return "dense"


def _wrap(name: str) -> Format:
    compressor = BaseCompressor.get_value_from_registry(name)

    def compress(tensors: ModuleTensors, scheme: QuantizationScheme) -> ModuleTensors:
        return dict(compressor.compress(dict(tensors), scheme))

    def decompress(tensors: ModuleTensors, scheme: QuantizationScheme) -> ModuleTensors:
        return dict(compressor.decompress(dict(tensors), scheme))

    return Format(name=name, compress=compress, decompress=decompress)


for _name in QUANTIZED_FORMAT_NAMES:
    register_format(_wrap(_name))
