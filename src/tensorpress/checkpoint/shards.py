"""Write safetensors shards a tensor at a time, byte for byte as safetensors writes them.

A safetensors file starts with a header that lists every tensor's dtype,
shape and offsets, so a shard cannot be written before all of its tensors
are known. Compressed tensors therefore go to a spool file first, in the
order they are produced. Once every module is done, the shards are planned
with huggingface_hub's splitter. Each shard is assembled by copying byte
ranges from the spool, or from the source file for tensors that pass
through unchanged. Memory stays at one copy buffer, but the disk briefly
stores the spool beside the shards.
"""

from __future__ import annotations

import json
import struct
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from huggingface_hub.serialization import split_state_dict_into_shards_factory
from safetensors.torch import _TYPES as SAFETENSORS_DTYPES
from safetensors.torch import save as safetensors_save

from tensorpress.checkpoint.source import TensorInfo
from tensorpress.errors import CheckpointError
from tensorpress.writer import write_json

__all__ = ["Spool", "write_shards", "DTYPE_NAMES", "dtype_from_name"]

# torch dtype -> the name safetensors writes in headers ("F32", "BF16", ...).
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}

# Bytes copied per read when assembling a shard.
_COPY_CHUNK_BYTES = 16 * 1024 * 1024

# The metadata that transformers and tensorpress.writer put in every shard.
_SHARD_METADATA = {"format": "pt"}


def dtype_from_name(name: str) -> torch.dtype:
    """Return the torch dtype of a safetensors dtype name."""
    try:
        return SAFETENSORS_DTYPES[name]
    except KeyError:
        raise CheckpointError(f"safetensors dtype {name!r} is not supported by this torch build") from None


class Spool:
    """An append-only file of raw tensor bytes, safe to write from several threads."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "wb")
        self._offset = 0
        self._lock = threading.Lock()

    def write(self, name: str, tensor: torch.Tensor) -> TensorInfo:
        """Append `tensor`'s bytes and return where they are."""
        dtype_name = DTYPE_NAMES.get(tensor.dtype)
        if dtype_name is None:
            raise CheckpointError(f"{name}: safetensors cannot store dtype {tensor.dtype}")
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        with self._lock:
            start = self._offset
            self._file.write(data)
            self._offset += data.nbytes
        return TensorInfo(
            name=name,
            path=self.path,
            dtype=dtype_name,
            shape=tuple(tensor.shape),
            start=start,
            end=start + data.nbytes,
        )

    def close(self) -> None:
        self._file.close()


def _safetensors_order(infos: Iterable[TensorInfo]) -> list[str]:
    # Let safetensors itself order the names (by dtype, then name) by
    # serialising empty tensors: the header lists them in data order.
    empty = {info.name: torch.empty((0,), dtype=dtype_from_name(info.dtype)) for info in infos}
    raw = safetensors_save(empty, metadata=_SHARD_METADATA)
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    return [name for name in header if name != "__metadata__"]


def _header_bytes(ordered: list[TensorInfo]) -> bytes:
    header: dict[str, object] = {"__metadata__": dict(_SHARD_METADATA)}
    offset = 0
    for info in ordered:
        header[info.name] = {
            "dtype": info.dtype,
            "shape": list(info.shape),
            "data_offsets": [offset, offset + info.nbytes],
        }
        offset += info.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    # safetensors pads the header with spaces to a multiple of 8 bytes.
    raw += b" " * ((8 - len(raw) % 8) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _copy_range(source: Path, start: int, length: int, destination) -> None:  # type: ignore[no-untyped-def]
    with open(source, "rb") as file:
        file.seek(start)
        remaining = length
        while remaining:
            chunk = file.read(min(remaining, _COPY_CHUNK_BYTES))
            if not chunk:
                raise CheckpointError(f"{source} ended early while copying tensor data; it is truncated")
            destination.write(chunk)
            remaining -= len(chunk)


def write_shard(path: Path, infos: list[TensorInfo]) -> None:
    """Write one safetensors file whose bytes equal ``safetensors.torch.save_file``'s."""
    by_name = {info.name: info for info in infos}
    ordered = [by_name[name] for name in _safetensors_order(infos)]
    with open(path, "wb") as file:
        file.write(_header_bytes(ordered))
        for info in ordered:
            _copy_range(info.path, info.start, info.nbytes, file)


def write_shards(
    folder: Path,
    infos: Mapping[str, TensorInfo],
    *,
    max_shard_size: int | str,
    filename_pattern: str = "model{suffix}.safetensors",
    progress: Callable[[int, int], None] | None = None,
    writes_shard: Callable[[int], bool] | None = None,
    write_index: bool = True,
) -> list[str]:
    """Write `infos` (in order) as shards plus an index, as tensorpress.writer does.

    The split is huggingface_hub's ``split_state_dict_into_shards_factory``
    over the tensors' byte sizes, so the files and the index equal what
    ``write_safetensors_shards`` writes for the same tensors in the same
    order. Returns the names of every shard and of the index, including
    those skipped here.

    Args:
        writes_shard: when given, only shards whose number (counting from 0)
            it accepts are written, so that several processes can share the
            files.
        write_index: write the index file (when there is more than one shard).
        progress: gets (shards written, shards this call writes).
    """
    split = split_state_dict_into_shards_factory(
        dict(infos),
        get_storage_size=lambda info: info.nbytes,
        filename_pattern=filename_pattern,
        max_shard_size=max_shard_size,
    )
    names = list(split.filename_to_tensors)
    mine = [number for number in range(len(names)) if writes_shard is None or writes_shard(number)]
    for done, number in enumerate(mine, start=1):
        filename = names[number]
        write_shard(folder / filename, [infos[name] for name in split.filename_to_tensors[filename]])
        if progress is not None:
            progress(done, len(mine))
    written = list(names)
    if split.is_sharded:
        index_name = filename_pattern.format(suffix="") + ".index.json"
        if write_index:
            index = {"metadata": {"total_size": split.metadata["total_size"]}, "weight_map": split.tensor_to_filename}
            write_json(folder / index_name, index)
        written.append(index_name)
    return written
