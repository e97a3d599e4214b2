"""Quantized formats, with compressed-tensors' own compressors as the reference.

compressed-tensors 0.20 compressors are pure classmethods over a module's
local state dict, so they define the exact bytes. This module adapts them to
the format registry and infers a module's format the way compressed-tensors
does (first match in its priority order). For the int, fp8 and fp4 formats
on CPU, the kernels in `tensorpress.formats.fast` compute the same bytes
faster, and whatever they do not cover goes to compressed-tensors.
"""

from __future__ import annotations

import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.compressors.format import COMPRESSION_FORMAT_PRIORITY
from compressed_tensors.compressors.mxfp6.helpers import unpack_fp6_from_uint8
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
from compressed_tensors.quantization import QuantizationScheme, QuantizationStrategy
from compressed_tensors.quantization.lifecycle.forward import dequantize

from tensorpress.formats import Format, ModuleTensors, fast, register_format
from tensorpress.formats.actorder import (
    ACTORDER_FORMATS,
    compress_with_g_idx,
    decompress_with_g_idx,
)

__all__ = ["QUANTIZED_FORMAT_NAMES", "fits", "infer_module_format", "module_class_for"]

QUANTIZED_FORMAT_NAMES: tuple[str, ...] = tuple(fmt.value for fmt in COMPRESSION_FORMAT_PRIORITY)


def module_class_for(class_names: tuple[str, ...]) -> type[torch.nn.Module]:
    """Return the torch class that compressed-tensors' format checks expect."""
    if "Linear" in class_names or "LinearBase" in class_names:
        return torch.nn.Linear
    if "Embedding" in class_names:
        return torch.nn.Embedding
    return torch.nn.Module


def fits(format_name: str, class_names: tuple[str, ...], scheme: QuantizationScheme) -> bool:
    """Return True when compressed-tensors' `format_name` compressor accepts the module."""
    compressor = BaseCompressor.get_value_from_registry(format_name)
    return bool(compressor.can_compress(module_class_for(class_names), scheme))


def infer_module_format(class_names: tuple[str, ...], scheme: QuantizationScheme) -> str:
    """Return the first format, in compressed-tensors' priority order, that fits the module."""
    module_class = module_class_for(class_names)
    for fmt in COMPRESSION_FORMAT_PRIORITY:
        compressor = BaseCompressor.get_value_from_registry(fmt.value)
        if compressor.can_compress(module_class, scheme):
            return fmt.value
    return "dense"


# Packed float formats: name -> (values per packed row element, unpack function).
_PACKED_FLOAT = {
    "nvfp4-pack-quantized": (2, unpack_fp4_from_uint8),
    "mxfp4-pack-quantized": (2, unpack_fp4_from_uint8),
    "mxfp6-pack-quantized": (4 / 3, unpack_fp6_from_uint8),
}


def _decompress_packed_float(
    name: str, tensors: ModuleTensors, scheme: QuantizationScheme, dtype: torch.dtype
) -> ModuleTensors:
    """Dequantize fp4/fp6 weights in `dtype`; compressed-tensors always uses bfloat16."""
    compressor = BaseCompressor.get_value_from_registry(name)
    values_per_element, unpack = _PACKED_FLOAT[name]
    tensors = dict(tensors)
    packed = tensors.pop("weight_packed")
    rows, packed_columns = packed.shape
    columns = round(packed_columns * values_per_element)
    unpacked = None
    if values_per_element == 2:
        unpacked = fast.unpack_fp4(packed, rows, columns, dtype)
    if unpacked is None:
        unpacked = unpack(packed, rows, columns, dtype=dtype)
    scale = compressor._decompress_scale(tensors["weight_scale"], dtype)
    global_scale = tensors.get("weight_global_scale")
    weight = fast.dequantize_values(
        unpacked, scale, None, scheme.weights, global_scale=global_scale, dtype=dtype
    )
    if weight is None:
        weight = dequantize(
            x_q=unpacked, scale=scale, args=scheme.weights, global_scale=global_scale, dtype=dtype
        )
    tensors["weight"] = weight
    tensors["weight_scale"] = scale
    return tensors


# Formats whose compressed weight is the quantized values themselves.
_NAIVE_FORMATS = ("naive-quantized", "int-quantized", "float-quantized")
# Strategies whose zero points pack-quantized packs along rows.
_PACKED_ZERO_POINT_STRATEGIES = (QuantizationStrategy.GROUP, QuantizationStrategy.CHANNEL)


def _has_packed_zero_point(tensors: ModuleTensors, scheme: QuantizationScheme) -> bool:
    args = scheme.weights
    return (
        args is not None
        and not args.symmetric
        and args.strategy in (QuantizationStrategy.GROUP, QuantizationStrategy.CHANNEL)
        and "weight_zero_point" in tensors
        and "weight_scale" in tensors
    )


def _needs_zero_point(scheme: QuantizationScheme) -> bool:
    args = scheme.weights
    return args is not None and not args.symmetric and args.strategy in _PACKED_ZERO_POINT_STRATEGIES


def _standard_strides(tensor: torch.Tensor) -> torch.Tensor:
    # .contiguous() keeps odd strides on size-1 dims, which .view(dtype) rejects.
    return torch.empty(tensor.shape, dtype=tensor.dtype).copy_(tensor)


def _with_unpacked_zero_point(tensors: ModuleTensors, scheme: QuantizationScheme) -> ModuleTensors:
    """Unpack row-packed zero points along columns of the transpose.

    compressed-tensors 0.20.1's ``unpack_from_int32(..., packed_dim=0)`` fails
    under torch 2.13 when the packed zero point has a single row (8 or fewer
    weight rows at 4 bits). Unpacking the transpose along dim 1 gives the
    same values.
    """
    tensors = dict(tensors)
    groups = tensors["weight_scale"].shape[-1]
    rows = tensors["weight_scale"].shape[0]
    packed = _standard_strides(tensors["weight_zero_point"].t())
    tensors["weight_zero_point"] = unpack_from_int32(
        packed, scheme.weights.num_bits, torch.Size([groups, rows]), packed_dim=1
    ).t()
    return tensors


def _decompress_pack_quantized(tensors: ModuleTensors, scheme: QuantizationScheme) -> ModuleTensors:
    tensors = dict(tensors)
    packed = tensors.pop("weight_packed")
    args = scheme.weights
    shape = torch.Size(int(size) for size in tensors["weight_shape"])
    unpacked = None
    if len(shape) == 2:
        unpacked = fast.unpack_int32(packed, args.num_bits, shape[1])
    if unpacked is None:
        unpacked = unpack_from_int32(_standard_strides(packed), args.num_bits, shape)
    tensors["weight"] = _dequantize(unpacked, tensors, scheme)
    return tensors


def _dequantize(quantized: torch.Tensor, tensors: ModuleTensors, scheme: QuantizationScheme) -> torch.Tensor:
    scale = tensors["weight_scale"]
    zero_point = tensors.get("weight_zero_point")
    weight = fast.dequantize_values(quantized, scale, zero_point, scheme.weights)
    if weight is None:
        weight = dequantize(x_q=quantized, scale=scale, zero_point=zero_point, args=scheme.weights)
    return weight


def _decompress_naive(tensors: ModuleTensors, scheme: QuantizationScheme) -> ModuleTensors:
    """Dequantize an int8 or fp8 weight, as compressed-tensors' naive-quantized compressor does."""
    tensors = dict(tensors)
    tensors["weight"] = _dequantize(tensors.pop("weight"), tensors, scheme)
    return tensors


def _without_symmetric_zero_points(tensors: ModuleTensors, scheme: QuantizationScheme) -> ModuleTensors:
    # compressed-tensors' BaseCompressor._remove_symmetric_zp: vLLM loads no
    # zero points for symmetric schemes.
    for base, args in (
        ("input", scheme.input_activations),
        ("weight", scheme.weights),
        ("output", scheme.output_activations),
    ):
        if args is not None and args.symmetric:
            tensors.pop(f"{base}_zero_point", None)
    return tensors


def _compress_fast(name: str, tensors: ModuleTensors, scheme: QuantizationScheme) -> ModuleTensors | None:
    """Compress with `tensorpress.formats.fast`, or return None where it does not apply.

    The result has the tensors, dtypes and key order of compressed-tensors'
    compressor for `name`.
    """
    args = scheme.weights
    weight = tensors.get("weight")
    scale = tensors.get("weight_scale")
    if args is None or weight is None or scale is None or weight.device.type != "cpu":
        return None
    zero_point = tensors.get("weight_zero_point")

    if name == "pack-quantized":
        packed = fast.quantize_pack_int32(weight, scale, zero_point, args)
        if packed is None:
            return None
        result = dict(tensors)
        del result["weight"]
        result["weight_packed"] = packed
        result["weight_shape"] = torch.tensor(weight.shape)
        if not args.symmetric and args.strategy in _PACKED_ZERO_POINT_STRATEGIES:
            if zero_point is None or zero_point.dtype != torch.int8:
                return None
            result["weight_zero_point"] = pack_to_int32(zero_point, args.num_bits, packed_dim=0).contiguous()
        return _without_symmetric_zero_points(result, scheme)

    if name in ("naive-quantized", "int-quantized", "float-quantized"):
        if args.pytorch_dtype() == torch.int8 and args.type == "int":
            quantized = fast.quantize_int8(weight, scale, zero_point, args)
        else:
            quantized = fast.quantize_fp8(weight, scale, zero_point, args)
        if quantized is None:
            return None
        result = dict(tensors)
        del result["weight"]
        result["weight"] = quantized
        return _without_symmetric_zero_points(result, scheme)

    if name in ("nvfp4-pack-quantized", "mxfp4-pack-quantized"):
        global_scale = tensors.get("weight_global_scale")
        packed = fast.quantize_pack_fp4(weight, scale, global_scale, args)
        if packed is None:
            return None
        compressor = BaseCompressor.get_value_from_registry(name)
        result = dict(tensors)
        del result["weight"]
        del result["weight_scale"]
        result["weight_packed"] = packed
        result["weight_scale"] = compressor._compress_scale(scale, args)
        return _without_symmetric_zero_points(result, scheme)
    return None


def _wrap(name: str) -> Format:
    def _uses_g_idx(tensors: ModuleTensors, scheme: QuantizationScheme) -> bool:
        return (
            "weight_g_idx" in tensors
            and name in ACTORDER_FORMATS
            and scheme.weights is not None
            and scheme.weights.strategy == QuantizationStrategy.GROUP
        )

    compressor = BaseCompressor.get_value_from_registry(name)

    def compress_plain(tensors: ModuleTensors, scheme: QuantizationScheme) -> ModuleTensors:
        result = _compress_fast(name, tensors, scheme)
        if result is not None:
            return result
        return dict(compressor.compress(dict(tensors), scheme))

    def compress(tensors: ModuleTensors, scheme: QuantizationScheme) -> ModuleTensors:
        if _uses_g_idx(tensors, scheme):
            return compress_with_g_idx(compress_plain, tensors, scheme)
        return compress_plain(tensors, scheme)

    def decompress(
        tensors: ModuleTensors, scheme: QuantizationScheme, dtype: torch.dtype | None = None
    ) -> ModuleTensors:
        if _uses_g_idx(tensors, scheme):
            return decompress_with_g_idx(tensors, scheme, dtype)
        if name == "pack-quantized" and _has_packed_zero_point(tensors, scheme):
            result = _decompress_pack_quantized(_with_unpacked_zero_point(tensors, scheme), scheme)
        elif name == "pack-quantized" and "weight_packed" in tensors and not _needs_zero_point(scheme):
            result = _decompress_pack_quantized(tensors, scheme)
        elif name in _PACKED_FLOAT and "weight_packed" in tensors:
            result = _decompress_packed_float(name, tensors, scheme, dtype or torch.bfloat16)
        elif name in _NAIVE_FORMATS and "weight" in tensors and "weight_scale" in tensors:
            result = _decompress_naive(tensors, scheme)
        else:
            result = dict(compressor.decompress(dict(tensors), scheme))
        if dtype is not None and "weight" in result:
            result["weight"] = result["weight"].to(dtype)
        return result

    return Format(name=name, compress=compress, decompress=decompress)


for _name in QUANTIZED_FORMAT_NAMES:
    register_format(_wrap(_name))
