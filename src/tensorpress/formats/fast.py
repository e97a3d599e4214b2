"""Fast CPU kernels that give exactly the bytes of compressed-tensors 0.20.1.

compressed-tensors' CPU path spends most of its time on work that does not
change the result. ``pack_to_int32`` widens every value to int32 and packs
with ``scatter_add_``. fp8 weights are cast to fp8, back to the weight dtype
and to fp8 again. fp4 codes come from eight masked assignments over the
whole weight. The kernels here run the same floating-point operations on
the same dtypes and broadcast shapes (division by the scale, zero-point
addition, clamping, rounding), so every quantized value is the one
compressed-tensors computes, and replace the rest with integer operations
on bytes.

Each function returns None when its input is outside what it reproduces
exactly (a big-endian host, a non-positive or non-finite scale, a padded
block); callers then use compressed-tensors' own code. property_tests/
test_fast_*.py compare every kernel with compressed-tensors bit for bit.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy, QuantizationType
from compressed_tensors.quantization.utils import calculate_range

__all__ = [
    "group_min_max",
    "quantize_int8",
    "quantize_fp8",
    "quantize_pack_fp4",
    "pack_int32",
    "quantize_pack_int32",
    "unpack_int32",
    "unpack_fp4",
    "dequantize_values",
]

_LITTLE_ENDIAN = sys.byteorder == "little"
_GROUPED = (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP)
# Kernels work on row blocks of about this many bytes of float32, so that
# the temporaries of one block stay small. On a 2-core EPYC VM, 4 MiB
# blocks ran faster than 256 KiB blocks (per-call overhead) and than whole
# tensors (memory traffic). This is a rough measurement on a loaded machine.
_BLOCK_BYTES = 1 << 22


def _reduce_last(values: torch.Tensor, op) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Reduce the last dimension with `op` (torch.minimum or torch.maximum) by halving.

    torch's amin/amax over a short innermost dimension (a quantization group)
    runs far slower than elementwise minimum/maximum over its two halves.
    min and max are exact, so the order of the comparisons does not change
    the value. Only the sign of a zero result may differ, and no qparam
    depends on it.
    """
    while values.shape[-1] > 1:
        size = values.shape[-1]
        half = size // 2
        reduced = op(values[..., :half], values[..., half : 2 * half])
        if size % 2:
            reduced[..., :1] = op(reduced[..., :1], values[..., -1:])
        values = reduced
    return values[..., 0]


def group_min_max(
    weight: torch.Tensor, args: QuantizationArgs
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Return (min, max) of each row or group of a 2-D weight, else None.

    For the channel strategy the shape is (rows, 1); for the group
    strategies it is (rows, groups), over ``args.group_size`` consecutive
    columns. The values equal ``torch.amin``/``torch.amax`` over the same
    elements. Other strategies return None.
    """
    if weight.dim() != 2 or weight.numel() == 0:
        return None
    rows, columns = weight.shape
    if args.strategy == QuantizationStrategy.CHANNEL:
        # A whole row is long enough for torch's own reduction to be fast.
        min_vals, max_vals = torch.aminmax(weight, dim=-1, keepdim=True)
        return min_vals, max_vals
    if args.strategy in _GROUPED and columns % args.group_size == 0:
        grouped = weight.reshape(rows, columns // args.group_size, args.group_size)
    else:
        return None
    return _reduce_last(grouped, torch.minimum), _reduce_last(grouped, torch.maximum)


def _usable_scale(scale: torch.Tensor) -> bool:
    # A zero, negative or non-finite scale can give NaN quotients, whose
    # casts and sign bits compressed-tensors does not define; leave those to it.
    return bool(scale.numel()) and bool(((scale > 0) & torch.isfinite(scale)).all())


@dataclass(frozen=True)
class _Scaling:
    """A weight's qparams, shaped as compressed-tensors broadcasts them against the weight.

    ``scale`` and ``zero_point`` have one leading entry per row (per block
    row for the block strategy) so that a slice of rows takes its slice of
    them, except for the tensor strategy, whose single scale applies to all.
    """

    weight: torch.Tensor
    args: QuantizationArgs
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    q_min: float
    q_max: float
    row_multiple: int

    def broadcast_rows(self, start: int, stop: int) -> tuple[torch.Tensor, slice]:
        """Return rows start:stop of the weight, shaped to broadcast with the qparams, and their qparam rows."""
        rows = self.weight[start:stop]
        strategy = self.args.strategy
        if strategy in _GROUPED:
            group_size = self.args.group_size
            values = rows.unflatten(-1, (rows.shape[-1] // group_size, group_size))
            qparam_rows = slice(start, stop)
        elif strategy == QuantizationStrategy.BLOCK:
            block_rows, block_columns = self.args.block_structure
            values = rows.reshape(
                rows.shape[0] // block_rows, block_rows, rows.shape[1] // block_columns, block_columns
            )
            qparam_rows = slice(start // block_rows, stop // block_rows)
        elif strategy == QuantizationStrategy.CHANNEL:
            values = rows
            qparam_rows = slice(start, stop)
        else:
            values = rows
            qparam_rows = slice(None)
        return values, qparam_rows

    def scaled_rows(self, start: int, stop: int) -> torch.Tensor:
        """Return clamp(weight / scale + zero_point) for rows start:stop, shaped (rows, columns)."""
        values, qparam_rows = self.broadcast_rows(start, stop)
        scaled = values / self.scale[qparam_rows]
        if self.zero_point is not None:
            scaled.add_(self.zero_point[qparam_rows])
        scaled.clamp_(self.q_min, self.q_max)
        return scaled.reshape(stop - start, -1)

    def row_ranges(self, bytes_per_element: int) -> Iterator[tuple[int, int]]:
        """Yield row ranges of about _BLOCK_BYTES of scaled values each."""
        rows, columns = self.weight.shape
        step = max(1, _BLOCK_BYTES // max(columns * bytes_per_element, 1))
        step = -(-step // self.row_multiple) * self.row_multiple
        for start in range(0, rows, step):
            yield start, min(rows, start + step)


def _shaped_qparam(
    value: torch.Tensor, weight: torch.Tensor, args: QuantizationArgs
) -> torch.Tensor | None:
    """Return `value` shaped as compressed-tensors broadcasts it, or None for unexpected shapes."""
    rows, columns = weight.shape
    strategy = args.strategy
    if strategy in _GROUPED:
        if columns % args.group_size or tuple(value.shape) != (rows, columns // args.group_size):
            return None
        return value.unsqueeze(-1)
    if strategy == QuantizationStrategy.BLOCK:
        block_rows, block_columns = args.block_structure
        expected = (rows // block_rows, columns // block_columns)
        if rows % block_rows or columns % block_columns or tuple(value.shape) != expected:
            return None
        return value.unsqueeze(1).unsqueeze(-1)
    if strategy == QuantizationStrategy.CHANNEL:
        return value if tuple(value.shape) == (rows, 1) else None
    if strategy == QuantizationStrategy.TENSOR:
        return value if value.numel() == 1 and value.dim() <= 1 else None
    return None


def _prepare_scaling(
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    args: QuantizationArgs,
    global_scale: torch.Tensor | None,
    *,
    zero_point_changes_result: bool,
) -> _Scaling | None:
    """Shape the qparams of `weight` for `_Scaling.scaled_rows`, or return None.

    `zero_point_changes_result` False lets an all-zero zero point be
    skipped, which only turns -0.0 into +0.0.
    """
    if weight.dim() != 2 or not weight.is_contiguous() or weight.device.type != "cpu":
        return None
    if not weight.dtype.is_floating_point or weight.numel() == 0:
        return None
    shaped_scale = _shaped_qparam(scale, weight, args)
    if shaped_scale is None:
        return None
    if global_scale is not None:
        shaped_scale = shaped_scale / global_scale
    if not _usable_scale(shaped_scale):
        return None

    shaped_zero_point = None
    if zero_point is not None and (zero_point_changes_result or bool(zero_point.any())):
        shaped_zero_point = _shaped_qparam(zero_point, weight, args)
        if shaped_zero_point is None:
            return None
        shaped_zero_point = shaped_zero_point.to(weight.dtype)

    # Python-number bounds take torch's fast clamp kernel, which 0-dim tensor
    # bounds do not. Every bound (an int range of at most 8 bits, or an
    # fp4/fp6/fp8 maximum) is exact in each float dtype, so the result is the same.
    q_min, q_max = (float(bound) for bound in calculate_range(args, weight.device))
    return _Scaling(weight, args, shaped_scale, shaped_zero_point, q_min, q_max, _row_multiple(args))


def _row_multiple(args: QuantizationArgs) -> int:
    return args.block_structure[0] if args.strategy == QuantizationStrategy.BLOCK else 1


def quantize_int8(
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    args: QuantizationArgs,
) -> torch.Tensor | None:
    """Quantize to int8 as ``quantize(weight, scale, zero_point, args, dtype=torch.int8)`` does."""
    if args.type != QuantizationType.INT or args.num_bits > 8:
        return None
    scaling = _prepare_scaling(weight, scale, zero_point, args, None, zero_point_changes_result=False)
    if scaling is None:
        return None
    output = torch.empty(weight.shape, dtype=torch.int8)
    for start, stop in scaling.row_ranges(4):
        output[start:stop] = _rounded_integers(scaling.scaled_rows(start, stop))
    return output


def _rounded_integers(scaled: torch.Tensor) -> torch.Tensor:
    """Round half to even; float16 goes to float32, whose int8 cast torch runs faster.

    The rounded values are integers inside the int8 range, which every
    route to int8 converts exactly.
    """
    scaled = scaled.round_()
    return scaled.float() if scaled.dtype == torch.float16 else scaled


def quantize_pack_int32(
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    args: QuantizationArgs,
) -> torch.Tensor | None:
    """Return ``pack_to_int32(quantize(..., dtype=torch.int8), num_bits)`` in one pass over rows."""
    if args.type != QuantizationType.INT or args.num_bits > 8 or not _LITTLE_ENDIAN:
        return None
    scaling = _prepare_scaling(weight, scale, zero_point, args, None, zero_point_changes_result=False)
    if scaling is None:
        return None
    rows, columns = weight.shape
    output = _PackedOutput(rows, columns, args.num_bits)
    for start, stop in scaling.row_ranges(4):
        quantized = _rounded_integers(scaling.scaled_rows(start, stop)).to(torch.int8)
        output.write(start, stop, quantized)
    return output.result()


def quantize_fp8(
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    args: QuantizationArgs,
) -> torch.Tensor | None:
    """Quantize to float8_e4m3fn as compressed-tensors' float-quantized compressor does.

    compressed-tensors casts to fp8, back to the scaled dtype and to fp8
    again. Every fp8 value is exact in float16, bfloat16 and float32, so one
    cast gives the same bytes. The zero point is added even when it is all
    zero, because it turns -0.0 into +0.0, which fp8 stores differently.
    """
    if args.type != QuantizationType.FLOAT or args.num_bits != 8:
        return None
    if args.pytorch_dtype() != torch.float8_e4m3fn:
        return None
    scaling = _prepare_scaling(weight, scale, zero_point, args, None, zero_point_changes_result=True)
    if scaling is None:
        return None
    output = torch.empty(weight.shape, dtype=torch.float8_e4m3fn)
    for start, stop in scaling.row_ranges(4):
        scaled = scaling.scaled_rows(start, stop)
        # torch converts each float16 to float32 before rounding to fp8, so
        # casting to float32 first gives the same bytes, and runs faster.
        output[start:stop] = scaled.float() if scaled.dtype == torch.float16 else scaled
    return output


# fp4 (E2M1) rounding thresholds on the magnitude, in compressed-tensors'
# order: a magnitude above (or, where True, at) each one adds 1 to the code.
_FP4_THRESHOLDS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


def quantize_pack_fp4(
    weight: torch.Tensor,
    scale: torch.Tensor,
    global_scale: torch.Tensor | None,
    args: QuantizationArgs,
) -> torch.Tensor | None:
    """Quantize to fp4 (E2M1) and pack two codes per byte, as ``quantize_and_pack_fp4`` does.

    compressed-tensors rounds with thresholds: ties at 0.25, 1.25, 2.5 and
    5.0 round down, ties at 0.75, 1.75 and 3.5 round up. It multiplies the
    magnitude by ``torch.sign`` and packs the sign bit. Because
    ``torch.sign(-0.0)`` is +0.0, the sign bit is set exactly when the
    scaled value is below zero.
    """
    if args.type != QuantizationType.FLOAT or args.num_bits != 4 or not args.symmetric:
        return None
    if args.strategy not in _GROUPED or weight.dim() != 2 or weight.shape[-1] % 2:
        return None
    scaling = _prepare_scaling(weight, scale, None, args, global_scale, zero_point_changes_result=False)
    if scaling is None:
        return None
    rows, columns = weight.shape
    output = torch.empty((rows, columns // 2), dtype=torch.uint8)
    for start, stop in scaling.row_ranges(4):
        scaled = scaling.scaled_rows(start, stop)
        magnitude = scaled.abs()
        codes = torch.lt(scaled, 0).view(torch.uint8).bitwise_left_shift(3)
        above = torch.empty(scaled.shape, dtype=torch.bool)
        for threshold, inclusive in _FP4_THRESHOLDS:
            compare = torch.ge if inclusive else torch.gt
            codes.add_(compare(magnitude, threshold, out=above).view(torch.uint8))
        pairs = codes.view(stop - start, -1, 2)
        torch.bitwise_or(pairs[..., 0], pairs[..., 1].bitwise_left_shift(4), out=output[start:stop])
    return output


class _PackedOutput:
    """int32 words of a (rows, columns) int8 tensor packed along rows, filled block by block."""

    def __init__(self, rows: int, columns: int, num_bits: int) -> None:
        self.columns = columns
        self.num_bits = num_bits
        self.packed_columns = -(-columns * num_bits // 32)
        self.padded_columns = -(-columns // 32) * 32
        self.words = torch.empty((rows, self.padded_columns * num_bits // 32), dtype=torch.int32)
        self.bytes = self.words.view(torch.uint8)

    def write(self, start: int, stop: int, values: torch.Tensor) -> None:
        num_bits = self.num_bits
        unsigned = values.view(torch.uint8).bitwise_xor(1 << (num_bits - 1))
        unsigned.bitwise_and_((1 << num_bits) - 1)
        if self.padded_columns != self.columns:
            unsigned = torch.nn.functional.pad(unsigned, (0, self.padded_columns - self.columns))
        self.bytes[start:stop] = _pack_bytes(unsigned, num_bits)

    def result(self) -> torch.Tensor:
        if self.packed_columns == self.words.shape[1]:
            return self.words
        return self.words[:, : self.packed_columns].contiguous()


def pack_int32(values: torch.Tensor, num_bits: int) -> torch.Tensor | None:
    """Pack int8 values along rows into int32 words as ``pack_to_int32(values, num_bits)`` does.

    Every value must lie in the signed `num_bits` range; quantized weights
    do, because they are clamped. compressed-tensors adds the offset
    ``2 ** (num_bits - 1)`` and writes value ``i`` of a row at bit
    ``i * num_bits`` of a little-endian bit stream, cut into 32-bit words.
    Flipping the sign bit of a ``num_bits`` value adds that offset, and on a
    little-endian host the stream's bytes are the words' bytes.
    """
    if not _LITTLE_ENDIAN or values.dtype != torch.int8 or values.dim() != 2:
        return None
    if not 1 <= num_bits <= 8:
        return None
    rows, columns = values.shape
    values = values.contiguous()
    output = _PackedOutput(rows, columns, num_bits)
    step = max(1, _BLOCK_BYTES // max(output.padded_columns, 1))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        output.write(start, stop, values[start:stop])
    return output.result()


def _pack_bytes(unsigned: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Pack a uint8 (rows, 32 * k) block of offset values into (rows, 4 * k * num_bits) bytes."""
    rows = unsigned.shape[0]
    if num_bits == 8:
        return unsigned
    if num_bits == 4:
        pairs = unsigned.view(torch.int16)
        return pairs.bitwise_or(pairs.bitwise_right_shift(4)).bitwise_and_(0xFF).to(torch.uint8)
    # Eight values fill num_bits bytes: gather them into the low bits of an int64.
    octets = unsigned.view(rows, -1, 8)
    words = octets[..., 0].to(torch.int64)
    for index in range(1, 8):
        words.bitwise_or_(octets[..., index].to(torch.int64).bitwise_left_shift(index * num_bits))
    return words.view(torch.uint8).view(rows, -1, 8)[..., :num_bits].reshape(rows, -1)


def unpack_int32(packed: torch.Tensor, num_bits: int, columns: int) -> torch.Tensor | None:
    """Unpack `pack_int32` words into int8 (rows, columns), as ``unpack_from_int32`` does."""
    if not _LITTLE_ENDIAN or packed.dtype != torch.int32 or packed.dim() != 2:
        return None
    if not 1 <= num_bits <= 8:
        return None
    rows, words = packed.shape
    if words != -(-columns * num_bits // 32):
        return None
    data = packed.contiguous().view(torch.uint8)
    if num_bits == 8:
        unsigned = data
    elif num_bits == 4:
        unsigned = torch.stack((data.bitwise_and(15), data.bitwise_right_shift(4)), dim=-1)
    else:
        unsigned = _unpack_octets(data, num_bits)
    unsigned = unsigned.reshape(rows, -1)[:, :columns]
    if num_bits == 8:
        return unsigned.bitwise_xor(0x80).view(torch.int8)
    # Values below 128 read the same as int8, and the difference fits int8.
    return unsigned.view(torch.int8).sub(1 << (num_bits - 1))


def _unpack_octets(data: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Split each run of num_bits bytes of (rows, bytes) into eight values, LSB first."""
    rows, byte_count = data.shape
    octets = -(-byte_count // num_bits)
    lanes = torch.zeros((rows, octets, 8), dtype=torch.uint8)
    grouped = lanes[..., :num_bits]
    if octets * num_bits == byte_count:
        grouped.copy_(data.view(rows, octets, num_bits))
    else:
        padded = torch.zeros((rows, octets * num_bits), dtype=torch.uint8)
        padded[:, :byte_count] = data
        grouped.copy_(padded.view(rows, octets, num_bits))
    words = lanes.view(torch.int64)
    shifts = torch.arange(8, dtype=torch.int64) * num_bits
    return words.bitwise_right_shift(shifts).bitwise_and_((1 << num_bits) - 1).to(torch.uint8)


_FP4_VALUES = torch.tensor(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=torch.float32,
)


def unpack_fp4(packed: torch.Tensor, rows: int, columns: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Unpack fp4 codes into `dtype` values, as ``unpack_fp4_from_uint8`` does.

    compressed-tensors multiplies the magnitude by +1.0 or -1.0, so code 8
    gives -0.0, as in the table here. Each byte indexes a row of a 256 x 2
    table that contains the values of its low and high code.
    """
    if packed.dtype != torch.uint8 or packed.dim() != 2 or tuple(packed.shape) != (rows, columns // 2):
        return None
    if columns % 2 or packed.device.type != "cpu":
        return None
    codes = torch.arange(256, dtype=torch.int64)
    table = torch.stack((_FP4_VALUES[codes & 15], _FP4_VALUES[codes >> 4]), dim=1).to(dtype)
    indices = packed.contiguous().view(-1).to(torch.int32)
    return table.index_select(0, indices).reshape(rows, columns)


_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _converted(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Return ``values.to(dtype)``; fp8 goes through a 256-entry table of torch's own casts.

    torch converts fp8 to wider floats one element at a time, several times
    slower than a table lookup of the same results.
    """
    if values.dtype not in _FP8_DTYPES or dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return values.to(dtype)
    table = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(values.dtype).to(dtype)
    indices = values.contiguous().view(torch.uint8).to(torch.int32).reshape(-1)
    return table.index_select(0, indices).reshape(values.shape)


def dequantize_values(
    quantized: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    args: QuantizationArgs,
    *,
    global_scale: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor | None:
    """Dequantize as compressed-tensors' ``dequantize`` does: (q - zero_point) * scale.

    The arithmetic runs in the scale's dtype (float32 after a float32
    global scale), and the result is cast to `dtype`, default the scale's
    dtype.
    """
    if quantized.dim() != 2 or quantized.device.type != "cpu":
        return None
    output_dtype = dtype if dtype is not None else scale.dtype
    shaped_scale = _shaped_qparam(scale, quantized, args)
    if shaped_scale is None:
        return None
    if global_scale is not None:
        shaped_scale = shaped_scale / global_scale
    shaped_zero_point = None
    # Subtracting a zero point of +0.0 leaves every value, -0.0 included, as it was.
    if zero_point is not None and bool(zero_point.any()):
        shaped_zero_point = _shaped_qparam(zero_point, quantized, args)
        if shaped_zero_point is None:
            return None
        shaped_zero_point = shaped_zero_point.to(shaped_scale.dtype)

    scaling = _Scaling(quantized, args, shaped_scale, shaped_zero_point, 0.0, 0.0, _row_multiple(args))
    output = torch.empty(quantized.shape, dtype=output_dtype)
    for start, stop in scaling.row_ranges(4):
        values, qparam_rows = scaling.broadcast_rows(start, stop)
        result = _converted(values, shaped_scale.dtype)
        if shaped_zero_point is not None:
            result.sub_(shaped_zero_point[qparam_rows])
        result.mul_(shaped_scale[qparam_rows])
        output[start:stop] = result.reshape(stop - start, -1)
    return output
