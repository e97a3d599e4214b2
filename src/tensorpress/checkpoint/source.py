"""Lazy reading of a safetensors checkpoint folder, one tensor at a time.

Only the JSON headers are read up front. A tensor is read with safetensors'
``safe_open`` when a caller needs it, and the file is closed again at once:
safetensors 0.8 returns tensors backed by a memory map of the whole file, so
a handle kept open would keep every page it ever touched resident (the
process's RSS would grow to the shard size). With a handle per read, the
pages go away when the caller drops the tensor.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from tensorpress.errors import CheckpointError

__all__ = [
    "TensorInfo",
    "CheckpointSource",
    "open_checkpoint",
    "read_header",
    "SAFE_WEIGHTS_NAME",
    "SAFE_WEIGHTS_INDEX_NAME",
    "PICKLE_SUFFIXES",
]

logger = logging.getLogger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

# A header larger than this is corrupt; safetensors itself caps it at 100 MB.
_MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    """Location, dtype and shape of one tensor in a safetensors file, from its header."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Read a safetensors file's header: tensor name -> TensorInfo, and the metadata.

    Offsets in the result are absolute file positions.

    Raises:
        CheckpointError: the file is missing, truncated or not safetensors.
    """
    try:
        with open(path, "rb") as file:
            prefix = file.read(8)
            if len(prefix) != 8:
                raise CheckpointError(f"{path} is not a safetensors file: it is shorter than 8 bytes")
            (length,) = struct.unpack("<Q", prefix)
            if length > _MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"{path} is not a safetensors file: its header length {length} is invalid"
                )
            raw = file.read(length)
            file.seek(0, 2)
            file_size = file.tell()
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found; the checkpoint folder is incomplete") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not a safetensors file: invalid header ({error})") from None

    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + length
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            begin, end = entry["data_offsets"]
            info = TensorInfo(
                name=name,
                path=path,
                dtype=entry["dtype"],
                shape=tuple(int(size) for size in entry["shape"]),
                start=data_start + int(begin),
                end=data_start + int(end),
            )
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: the header entry of {name!r} is invalid") from None
        if info.end > file_size:
            raise CheckpointError(
                f"{path} is truncated: tensor {name!r} ends at byte {info.end} but the file "
                f"has {file_size} bytes; download or copy the file again"
            )
        tensors[name] = info
    return tensors, metadata


class CheckpointSource(Mapping[str, torch.Tensor]):
    """The tensors of a checkpoint folder as a lazy, read-only mapping.

    Iteration follows the checkpoint's own order: the index's ``weight_map``
    order for sharded checkpoints, the header order of a single file.
    ``source[name]`` reads one tensor from disk on every access.
    """

    def __init__(self, folder: Path, tensors: dict[str, TensorInfo], weight_files: list[Path]):
        self.folder = folder
        self.tensors = tensors
        self.weight_files = weight_files

    def __getitem__(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        return read_tensors(info.path, [name])[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Read `names`, opening each file they live in once."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.tensors[name].path, []).append(name)
        result: dict[str, torch.Tensor] = {}
        for path, file_names in by_file.items():
            result.update(read_tensors(path, file_names))
        return {name: result[name] for name in names}


def read_tensors(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Read `names` from one safetensors file and close it before returning."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            return {name: file.get_tensor(name) for name in names}
    except (OSError, RuntimeError, ValueError) as error:
        raise CheckpointError(f"{path}: reading {', '.join(names[:3])} failed: {error}") from error


def _load_index(folder: Path) -> dict[str, str]:
    path = folder / SAFE_WEIGHTS_INDEX_NAME
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{path} has no weight_map; it is not a safetensors index file")
    return weight_map


def find_pickle_files(folder: Path) -> list[Path]:
    """Return the pickle weight files (.bin, .pt, .pth, .ckpt) in `folder`, sorted."""
    return sorted(path for path in folder.iterdir() if path.is_file() and path.name.endswith(PICKLE_SUFFIXES))


def open_checkpoint(folder: str | Path) -> CheckpointSource:
    """Open a safetensors checkpoint folder without reading any tensor data.

    The folder contains either model.safetensors.index.json and the shards it
    names, or a single model.safetensors (or a single other *.safetensors).

    Raises:
        CheckpointError: the folder is missing, holds only pickle weights, or
            its index and shards disagree.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} not found or not a folder")

    if (folder / SAFE_WEIGHTS_INDEX_NAME).is_file():
        weight_map = _load_index(folder)
        shard_names = list(dict.fromkeys(weight_map.values()))
        headers = {name: read_header(folder / name)[0] for name in shard_names}
        tensors: dict[str, TensorInfo] = {}
        for name, shard in weight_map.items():
            info = headers[shard].get(name)
            if info is None:
                raise CheckpointError(
                    f"{folder / SAFE_WEIGHTS_INDEX_NAME} maps {name!r} to {shard}, but that "
                    "shard has no such tensor; the index and shards do not belong together"
                )
            tensors[name] = info
        for shard, header in headers.items():
            extra = [name for name in header if name not in weight_map]
            if extra:
                raise CheckpointError(
                    f"{folder / shard} contains {len(extra)} tensor(s) that the index does not "
                    f"list (first: {extra[0]!r}); the index and shards do not belong together"
                )
        return CheckpointSource(folder, tensors, [folder / name for name in shard_names])

    candidates = sorted(folder.glob("*.safetensors"))
    single = folder / SAFE_WEIGHTS_NAME
    if single.is_file():
        candidates = [single]
    if len(candidates) == 1:
        tensors = read_header(candidates[0])[0]
        return CheckpointSource(folder, tensors, candidates)
    if len(candidates) > 1:
        raise CheckpointError(
            f"{folder} contains {len(candidates)} safetensors files but no "
            f"{SAFE_WEIGHTS_INDEX_NAME}; add the index that names the shards"
        )
    if find_pickle_files(folder):
        raise CheckpointError(
            f"{folder} contains only pickle weights ({', '.join(p.name for p in find_pickle_files(folder))}); "
            "tensorpress reads safetensors by default because unpickling can run code. "
            "Pass allow_pickle=True (CLI: --allow-pickle) to convert them with "
            "torch.load(weights_only=True), or convert them to safetensors first"
        )
    raise CheckpointError(f"{folder} contains no model.safetensors and no {SAFE_WEIGHTS_INDEX_NAME}")
