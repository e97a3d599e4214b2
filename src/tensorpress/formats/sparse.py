"""Sparse formats: sparse-bitmask and sparse-24-bitmask.

compressed-tensors 0.14 was the last release to write these formats, and
this module reproduces its on-disk layout byte for byte. Both formats
replace a module's ``weight`` with:

- ``compressed``: the kept values, in the weight's dtype;
- ``bitmask``: uint8, one bit per weight element, packed along the last
  dimension in little-endian bit order (element ``j`` of a row is bit
  ``j % 8`` of byte ``j // 8``), shape ``(rows, ceil(columns / 8))``;
- ``shape``: int64, the dense shape.

sparse-bitmask keeps every nonzero value in a 1-D ``compressed``, stores
``shape`` as ``(2,)`` and adds ``row_offsets`` (int64, the index in
``compressed`` where each row starts). sparse-24-bitmask keeps exactly two
values of every four consecutive values of a row in a ``(rows, columns / 2)``
``compressed`` and stores ``shape`` as ``(2, 1)``.

Neither format can store -0.0: a -0.0 that is not kept comes back as +0.0.
Every other value, NaN payloads included, round-trips bit for bit.

The quantized weights of the int-quantized and float-quantized formats can
be stored in either sparse format ("stacking"), so int8 and fp8 values are
accepted beside the float dtypes.
"""

from __future__ import annotations

import torch
from compressed_tensors.quantization import QuantizationScheme

from tensorpress.errors import InvalidTensorError, MissingTensorError
from tensorpress.formats import Format, ModuleTensors, register_format

__all__ = [
    "SPARSE_BITMASK",
    "SPARSE_24_BITMASK",
    "SPARSE_FORMAT_NAMES",
    "SPARSE_TENSOR_NAMES",
    "pack_bitmask",
    "unpack_bitmask",
    "compress_sparse_weight",
    "decompress_sparse_weight",
    "is_sparse_compressed",
]

SPARSE_BITMASK = "sparse-bitmask"
SPARSE_24_BITMASK = "sparse-24-bitmask"
SPARSE_FORMAT_NAMES: tuple[str, ...] = (SPARSE_BITMASK, SPARSE_24_BITMASK)

# Local tensor names each format writes in place of "weight".
SPARSE_TENSOR_NAMES: dict[str, tuple[str, ...]] = {
    SPARSE_BITMASK: ("shape", "compressed", "bitmask", "row_offsets"),
    SPARSE_24_BITMASK: ("shape", "compressed", "bitmask"),
}

# Dtypes whose values the sparse formats store. int8 and fp8 come from
# stacking on the int-quantized and float-quantized formats.
_VALUE_DTYPES = (
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.int8,
)
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_INTEGER_VIEWS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean (rows, columns) mask into uint8 (rows, ceil(columns / 8)), LSB first."""
    rows, columns = mask.shape
    padded_columns = -(-columns // 8) * 8
    padded = torch.zeros((rows, padded_columns), dtype=torch.uint8)
    padded[:, :columns] = mask.to(torch.uint8)
    # The bytes are sums of distinct powers of two, so they never exceed 255.
    return (padded.reshape(rows, -1, 8) * _BIT_WEIGHTS).sum(dim=-1, dtype=torch.uint8)


def unpack_bitmask(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Unpack `pack_bitmask` output into a boolean mask of the dense `shape`."""
    rows, columns = shape
    bits = packed.to(torch.uint8).unsqueeze(-1).bitwise_and(_BIT_WEIGHTS).ne(0)
    return bits.reshape(rows, -1)[:, :columns]


def _raw(tensor: torch.Tensor) -> torch.Tensor:
    """Return an integer view of the same bytes, so that indexing copies bits, not values."""
    return tensor.view(_INTEGER_VIEWS[tensor.element_size()])


def _nonzero_mask(weight: torch.Tensor) -> torch.Tensor:
    # -0.0 counts as zero and NaN as nonzero, as `weight != 0` decides.
    if weight.dtype in _FP8_DTYPES:
        return weight.to(torch.float32) != 0
    return weight != 0


def _check_weight(name: str, weight: torch.Tensor, format_name: str) -> None:
    if weight.is_meta:
        raise InvalidTensorError(
            f"{name} is on the meta device and contains no data; load the real weights "
            "before compressing"
        )
    if weight.layout != torch.strided:
        raise InvalidTensorError(
            f"{name} has layout {weight.layout}; pass a dense tensor (call .to_dense())"
        )
    if weight.dim() != 2:
        raise InvalidTensorError(
            f"{name} has shape {tuple(weight.shape)}, but {format_name} stores only 2-D "
            "weights; add the module to the sparsity config's ignore list"
        )
    if weight.dtype not in _VALUE_DTYPES:
        raise InvalidTensorError(
            f"{name} has dtype {weight.dtype}, which {format_name} cannot store; it "
            "stores float16, bfloat16, float32, float64, fp8 and int8 values. Add the "
            "module to the sparsity config's ignore list"
        )


def _compress_bitmask(name: str, weight: torch.Tensor) -> ModuleTensors:
    mask = _nonzero_mask(weight)
    row_counts = mask.sum(dim=-1)
    values = _raw(weight)[mask].view(weight.dtype)
    return {
        "shape": torch.tensor(list(weight.shape), dtype=torch.int64),
        "compressed": values,
        "bitmask": pack_bitmask(mask),
        "row_offsets": torch.cumsum(row_counts, dim=0) - row_counts,
    }


def _ranking_key(weight: torch.Tensor) -> torch.Tensor:
    """Return the key whose two largest entries per group of four are kept.

    Zeros are kept only to fill groups with fewer than two nonzeros, and
    which zeros (+0.0 or -0.0) fill them decides the stored bytes. To write
    the bytes compressed-tensors 0.14 writes, the key is its key (the
    absolute value, and for fp8 the absolute value of the bytes read as
    int8) with the same ``torch.topk`` tie-breaking. With the fp8 key every
    nonzero ranks above +0.0, which ranks above -0.0 (int8 -128).

    int8 values are ranked in int16. compressed-tensors 0.14 ranks them in
    int8, where abs(-128) overflows to -128 and ranks below zero, so it drops
    every -128 of an int-quantized weight.
    """
    if weight.dtype in _FP8_DTYPES:
        return weight.view(torch.int8).abs()
    if weight.dtype == torch.int8:
        return weight.to(torch.int16).abs()
    return weight.abs()


def _compress_24_bitmask(name: str, weight: torch.Tensor) -> ModuleTensors:
    rows, columns = weight.shape
    if columns % 4:
        raise InvalidTensorError(
            f"{name} has {columns} columns, but sparse-24-bitmask needs a multiple of 4; "
            "add the module to the sparsity config's ignore list or use sparse-bitmask"
        )
    nonzero_per_group = _nonzero_mask(weight).reshape(rows, -1, 4).sum(dim=-1)
    if bool((nonzero_per_group > 2).any()):
        row, group = (int(index) for index in (nonzero_per_group > 2).nonzero()[0])
        count = int((nonzero_per_group > 2).sum())
        raise InvalidTensorError(
            f"{name} does not follow 2:4 sparsity: {count} groups of four values hold "
            f"more than two nonzeros (the first is row {row}, columns {4 * group} to "
            f"{4 * group + 3}). Prune the weight to 2:4 first, use sparse-bitmask, or "
            "add the module to the sparsity config's ignore list; tensorpress never "
            "prunes weights itself"
        )

    groups = _ranking_key(weight).reshape(-1, 4)
    kept = groups.topk(2, dim=1).indices
    mask = torch.zeros(groups.shape, dtype=torch.bool).scatter_(1, kept, True)
    mask = mask.reshape(rows, columns)
    values = _raw(weight)[mask].view(weight.dtype).reshape(rows, columns // 2)
    return {
        "shape": torch.tensor([rows, columns], dtype=torch.int64).reshape(-1, 1),
        "compressed": values,
        "bitmask": pack_bitmask(mask),
    }


def compress_sparse_weight(name: str, weight: torch.Tensor, format_name: str) -> ModuleTensors:
    """Compress one dense weight into the tensors of `format_name`, keyed by local name.

    `name` is the full tensor name, used in error messages.

    Raises:
        InvalidTensorError: the weight is not 2-D, has a dtype the format cannot
            store, or (sparse-24-bitmask) does not follow 2:4 sparsity.
    """
    _check_weight(name, weight, format_name)
    weight = weight.detach().to("cpu").contiguous()
    if format_name == SPARSE_BITMASK:
        return _compress_bitmask(name, weight)
    if format_name == SPARSE_24_BITMASK:
        return _compress_24_bitmask(name, weight)
    raise InvalidTensorError(
        f"{name}: {format_name!r} is not a sparse format; expected one of "
        f"{', '.join(SPARSE_FORMAT_NAMES)}"
    )


def is_sparse_compressed(tensors: ModuleTensors) -> bool:
    """Return True when a module's tensors hold a sparse-compressed weight."""
    return "compressed" in tensors and "bitmask" in tensors and "weight" not in tensors


def decompress_sparse_weight(module: str, tensors: ModuleTensors) -> torch.Tensor:
    """Rebuild the dense weight from either sparse format's tensors.

    Both formats decompress the same way: the values fill the positions set
    in the bitmask, in row-major order, so ``row_offsets`` is not needed.

    Raises:
        MissingTensorError: ``compressed``, ``bitmask`` or ``shape`` is absent.
        InvalidTensorError: the tensors do not fit together.
    """
    prefix = f"{module}." if module else ""
    for local in ("shape", "compressed", "bitmask"):
        if local not in tensors:
            raise MissingTensorError(
                f"{prefix}{local} is missing; a sparse-compressed weight needs shape, "
                "compressed and bitmask"
            )
    shape = [int(size) for size in tensors["shape"].flatten().tolist()]
    values = tensors["compressed"].contiguous()
    bitmask = tensors["bitmask"]
    if len(shape) != 2:
        raise InvalidTensorError(
            f"{prefix}shape is {shape}, but sparse weights are 2-D; the checkpoint is "
            "corrupt or was not written by a sparse compressor"
        )
    rows, columns = shape
    expected_bitmask = (rows, -(-columns // 8))
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != expected_bitmask:
        raise InvalidTensorError(
            f"{prefix}bitmask has dtype {bitmask.dtype} and shape {tuple(bitmask.shape)}, "
            f"but a {rows}x{columns} weight needs uint8 {expected_bitmask}; the "
            "checkpoint is corrupt"
        )
    mask = unpack_bitmask(bitmask, (rows, columns))
    kept = int(mask.sum())
    if values.numel() != kept:
        raise InvalidTensorError(
            f"{prefix}compressed contains {values.numel()} values but {prefix}bitmask "
            f"marks {kept}; the checkpoint is corrupt"
        )

    raw_values = _raw(values)
    dense = torch.zeros((rows, columns), dtype=raw_values.dtype)
    dense[mask] = raw_values.reshape(-1)
    return dense.view(values.dtype)


def _format(name: str) -> Format:
    def compress(tensors: ModuleTensors, scheme: QuantizationScheme | None) -> ModuleTensors:
        output = {local: tensor for local, tensor in tensors.items() if local != "weight"}
        output.update(compress_sparse_weight("weight", tensors["weight"], name))
        return output

    def decompress(tensors: ModuleTensors, scheme: QuantizationScheme | None) -> ModuleTensors:
        names = SPARSE_TENSOR_NAMES[SPARSE_BITMASK]
        output = {local: tensor for local, tensor in tensors.items() if local not in names}
        output["weight"] = decompress_sparse_weight("", tensors)
        return output

    return Format(name=name, compress=compress, decompress=decompress)


for _name in SPARSE_FORMAT_NAMES:
    register_format(_format(_name))
