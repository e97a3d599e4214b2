"""Write a safetensors file straight from tensor memory, byte for byte as safetensors does.

``safetensors.torch.save_file`` (0.8.0) first copies every tensor into a
Python ``bytes`` object, so a shard briefly exists twice in memory. This
writer builds the same header and writes each tensor's own buffer to the
file, with no copy. The layout follows safetensors' serializer:

- an 8-byte little-endian header length, then the JSON header (compact,
  non-ASCII characters unescaped), padded with spaces to a multiple of 8;
- ``__metadata__`` first, then the tensors in data order;
- the data of each tensor in that order, with no gaps.

safetensors orders tensors by dtype, then by name. Rather than copy that
rule, the writer gets it from safetensors: it serializes empty tensors of
the same names and dtypes and reads the order and dtype names from that
header.
tests/test_fast_writer.py checks that the bytes equal ``save_file``'s.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Mapping

import torch
from safetensors.torch import save, save_file

__all__ = ["write_safetensors_file"]


def _order_and_dtypes(tensors: Mapping[str, torch.Tensor]) -> list[tuple[str, str]]:
    """Return (name, safetensors dtype name) in the order safetensors writes the data."""
    empty = {name: torch.empty((0,), dtype=tensor.dtype) for name, tensor in tensors.items()}
    raw = save(empty)
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    return [(name, entry["dtype"]) for name, entry in header.items() if name != "__metadata__"]


def _header(
    tensors: Mapping[str, torch.Tensor],
    order: list[tuple[str, str]],
    metadata: Mapping[str, str] | None,
) -> bytes:
    entries: dict[str, object] = {}
    if metadata is not None:
        # NOTE: safetensors writes several metadata keys in hash-map order,
        # which varies; sorted keys keep this writer deterministic, and one
        # key (tensorpress writes {"format": "pt"}) matches save_file.
        entries["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for name, dtype_name in order:
        tensor = tensors[name]
        size = tensor.numel() * tensor.element_size()
        entries[name] = {
            "dtype": dtype_name,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return header + b" " * (-len(header) % 8)


def write_safetensors_file(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write `tensors` to `path` in the safetensors format, without copying their data.

    The tensors must be contiguous and must not share memory, as for
    ``save_file``. Tensors off the CPU, non-contiguous tensors and
    big-endian hosts go to ``save_file``.
    """
    direct = sys.byteorder == "little" and all(
        tensor.device.type == "cpu" and tensor.is_contiguous() for tensor in tensors.values()
    )
    if not direct:
        save_file(dict(tensors), str(path), metadata=dict(metadata) if metadata else None)
        return
    order = _order_and_dtypes(tensors)
    header = _header(tensors, order, metadata)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(header)))
        file.write(header)
        for name, _ in order:
            tensor = tensors[name]
            if tensor.numel() == 0:
                continue
            # A uint8 view of the tensor's own storage: numpy exposes it to
            # file.write as a buffer, so nothing is copied.
            file.write(tensor.detach().reshape(-1).view(torch.uint8).numpy())
