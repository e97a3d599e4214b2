"""Activation ordering: group quantization with a ``weight_g_idx`` column-to-group map.

GPTQ with ``actorder="group"`` quantizes columns in activation order, so
column ``j`` uses the scale of group ``weight_g_idx[j]`` instead of group
``j // group_size``. compressed-tensors 0.20 dropped this path; vLLM still
loads pack-quantized checkpoints that carry ``weight_g_idx``. The weight is
quantized per element with each column's group scale, written in its
original column order, and ``weight_g_idx`` is written unchanged.
"""

from __future__ import annotations

import torch
from compressed_tensors.compressors.pack_quantized.helpers import (
    pack_to_int32,
    unpack_from_int32,
)
from compressed_tensors.quantization import QuantizationScheme
from compressed_tensors.quantization.lifecycle.forward import dequantize

from tensorpress.errors import InvalidTensorError
from tensorpress.formats import ModuleTensors

__all__ = ["ACTORDER_FORMATS", "check_g_idx", "compress_with_g_idx", "decompress_with_g_idx"]

# Integer formats whose group scales can follow a column-to-group map.
ACTORDER_FORMATS = ("pack-quantized", "naive-quantized", "int-quantized")


def _elementwise(scheme: QuantizationScheme) -> QuantizationScheme:
    elementwise = scheme.model_copy(deep=True)
    elementwise.weights.group_size = 1
    return elementwise


def check_g_idx(name: str, g_idx: torch.Tensor, columns: int, groups: int) -> None:
    """Reject a column-to-group map that is not integer, has the wrong length or indexes no group.

    `name` is the tensor's full name for messages, such as "layer.weight_g_idx".
    """
    if g_idx.dtype.is_floating_point or g_idx.dtype.is_complex or g_idx.dtype == torch.bool:
        raise InvalidTensorError(
            f"{name} has dtype {g_idx.dtype}; it must be an integer tensor "
            "mapping each column to its group"
        )
    if tuple(g_idx.shape) != (columns,):
        raise InvalidTensorError(
            f"{name} has shape {tuple(g_idx.shape)}; it needs one group index per "
            f"weight column, shape ({columns},)"
        )
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise InvalidTensorError(
            f"{name} contains group indices outside [0, {groups}); it must index the "
            f"{groups} columns of the weight scale"
        )


def _checked_g_idx(tensors: ModuleTensors, columns: int, groups: int) -> torch.Tensor:
    g_idx = tensors["weight_g_idx"]
    check_g_idx("weight_g_idx", g_idx, columns, groups)
    return g_idx.long()


def compress_with_g_idx(
    compress, tensors: ModuleTensors, scheme: QuantizationScheme  # type: ignore[no-untyped-def]
) -> ModuleTensors:
    """Compress with a format's `compress`, taking each column's scale from weight_g_idx."""
    scale = tensors["weight_scale"]
    zero_point = tensors.get("weight_zero_point")
    g_idx = _checked_g_idx(tensors, tensors["weight"].shape[-1], scale.shape[-1])

    expanded = dict(tensors)
    expanded["weight_scale"] = scale[:, g_idx]
    if zero_point is not None:
        expanded["weight_zero_point"] = zero_point[:, g_idx]
    result = compress(expanded, _elementwise(scheme))

    # Restore the grouped qparams; the compressor saw per-column copies.
    result["weight_scale"] = scale
    if "weight_zero_point" in result and zero_point is not None:
        result["weight_zero_point"] = _packed_zero_point(zero_point, scheme, result)
    result["weight_g_idx"] = tensors["weight_g_idx"]
    return result


def _packed_zero_point(
    zero_point: torch.Tensor, scheme: QuantizationScheme, result: ModuleTensors
) -> torch.Tensor:
    # pack-quantized packs zero points along rows; other formats keep them as they are.
    if "weight_packed" not in result:
        return zero_point
    return pack_to_int32(zero_point.to(torch.int8), scheme.weights.num_bits, packed_dim=0).contiguous()


def decompress_with_g_idx(
    tensors: ModuleTensors, scheme: QuantizationScheme, dtype: torch.dtype | None
) -> ModuleTensors:
    """Dequantize a module written by `compress_with_g_idx`."""
    tensors = dict(tensors)
    scale = tensors["weight_scale"]
    args = scheme.weights

    if "weight_packed" in tensors:
        shape = tuple(int(size) for size in tensors.pop("weight_shape"))
        quantized = unpack_from_int32(tensors.pop("weight_packed"), args.num_bits, shape)
    else:
        quantized = tensors.pop("weight")
        shape = tuple(quantized.shape)
    g_idx = _checked_g_idx(tensors, shape[-1], scale.shape[-1])

    zero_point = tensors.get("weight_zero_point")
    if zero_point is not None and not args.symmetric and zero_point.shape != scale.shape:
        zero_point = unpack_from_int32(zero_point, args.num_bits, tuple(scale.shape), packed_dim=0)

    weight = dequantize(
        x_q=quantized,
        scale=scale[:, g_idx],
        zero_point=None if zero_point is None else zero_point[:, g_idx],
        args=_elementwise(scheme).weights,
    )
    tensors["weight"] = weight if dtype is None else weight.to(dtype)
    return tensors
