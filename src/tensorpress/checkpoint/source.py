"""Lazy reading of a safetensors checkpoint folder, one tensor at a time.

Only the JSON headers are read up front. A tensor is read with safetensors'
``safe_open`` when a caller needs it, and the file is closed again at once.
safetensors 0.8 returns tensors backed by a memory map of the whole file, so
a handle kept open would keep every page it ever touched resident, and the
process's RSS would grow to the shard size. With a handle per read, the
pages go away when the caller drops the tensor.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import _TYPES as SAFETENSORS_DTYPES

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

    Offsets in the result are absolute file positions. Every entry is checked
    as safetensors checks it when loading: a known dtype, a shape of
    non-negative sizes, and a byte range of exactly the tensor's size inside
    the file.

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
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a folder, not a safetensors file") from None
    if len(raw) != length:
        raise CheckpointError(
            f"{path} is truncated: its header needs {length} bytes but the file has "
            f"{file_size} bytes; download or copy the file again"
        )
    try:
        header = json.loads(raw, object_pairs_hook=_reject_duplicate_keys)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as error:
        raise CheckpointError(f"{path} is not a safetensors file: invalid header ({error})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file: its header is not a JSON object")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in metadata.items()
    ):
        raise CheckpointError(f"{path}: the header's __metadata__ must map strings to strings")
    data_start = 8 + length
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        info = _tensor_info(path, name, entry, data_start)
        if info.end > file_size:
            raise CheckpointError(
                f"{path} is truncated: tensor {name!r} ends at byte {info.end} but the file "
                f"has {file_size} bytes; download or copy the file again"
            )
        tensors[name] = info
    _check_contiguous(path, tensors.values(), data_start, file_size)
    return tensors, metadata


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _check_contiguous(path: Path, infos: Iterable[TensorInfo], data_start: int, file_size: int) -> None:
    """Require the byte ranges to tile the data section, as safetensors itself does on load.

    Overlapping or gapped ranges mean a corrupt (or crafted) header.
    """
    position = data_start
    for info in sorted(infos, key=lambda info: (info.start, info.end)):
        if info.start != position:
            raise CheckpointError(
                f"{path}: tensor {info.name!r} starts at byte {info.start}, but the previous "
                f"tensor ends at byte {position}; the header's data_offsets overlap or leave "
                "gaps, so the file is corrupt"
            )
        position = info.end
    if position != file_size:
        raise CheckpointError(
            f"{path} has {file_size - position} bytes after its last tensor; the file is "
            "corrupt or was written by something other than safetensors"
        )


def _tensor_info(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    """Parse one header entry, rejecting unknown dtypes and byte ranges that do not fit the shape."""
    invalid = CheckpointError(
        f"{path}: the header entry of {name!r} is invalid; it needs a known dtype, a list "
        "of non-negative sizes as shape and two data_offsets; the file is corrupt"
    )
    if not isinstance(entry, dict):
        raise invalid
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise invalid
    if not isinstance(shape, list) or not isinstance(offsets, list):
        raise invalid
    if len(offsets) != 2 or not all(_is_size(value) for value in (*shape, *offsets)):
        raise invalid
    begin, end = offsets
    element_size = SAFETENSORS_DTYPES[dtype].itemsize
    if end < begin or end - begin != math.prod(shape) * element_size:
        raise CheckpointError(
            f"{path}: tensor {name!r} has data_offsets [{begin}, {end}], which do not match "
            f"its shape {shape} and dtype {dtype}; the file is corrupt"
        )
    return TensorInfo(
        name=name,
        path=path,
        dtype=dtype,
        shape=tuple(shape),
        start=data_start + begin,
        end=data_start + end,
    )


def _is_size(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


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
    except (OSError, RuntimeError, ValueError, SafetensorError) as error:
        raise CheckpointError(f"{path}: reading {', '.join(names[:3])} failed: {error}") from error


def _load_index(folder: Path) -> dict[str, str]:
    path = folder / SAFE_WEIGHTS_INDEX_NAME
    weight_map = load_weight_map(path)
    for shard in dict.fromkeys(weight_map.values()):
        shard_path(folder, shard, path)
    return weight_map


def load_weight_map(path: Path) -> dict[str, str]:
    """Read an index file's ``weight_map`` of tensor name -> file name.

    Raises:
        CheckpointError: the file is not JSON or has no weight_map of strings.
    """
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None
    except OSError as error:
        raise CheckpointError(f"{path} cannot be read: {error.strerror or error}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{path} has no weight_map; it is not a safetensors index file")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise CheckpointError(
                f"{path} maps {name!r} to {shard!r}; weight_map values must be file names"
            )
    return weight_map


def shard_path(folder: Path, name: str, index: Path) -> Path:
    """Return the path of the weight file `name` that `index` lists, which must be inside `folder`.

    Raises:
        CheckpointError: `name` is absolute, contains "..", or resolves
            (through symlinks) to a file outside `folder`.
    """
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts or "\\" in name or "\x00" in name:
        raise CheckpointError(
            f"{index} names the file {name!r}, which is outside the checkpoint folder; an "
            "index may only name files inside its folder"
        )
    path = folder / relative
    root = folder.resolve()
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as error:  # symlink loops
        raise CheckpointError(f"{path} cannot be resolved: {error}") from None
    if root != resolved and root not in resolved.parents and not _is_hub_blob(root, resolved):
        raise CheckpointError(
            f"{path} is a symlink to {resolved}, outside the checkpoint folder {root}; copy "
            "the file into the folder instead of linking it"
        )
    return path


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
        _check_duplicates(folder, headers, weight_map)
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
            extra = [name for name in header if weight_map.get(name) != shard]
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
        shard_path(folder, candidates[0].name, candidates[0])
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


def _is_hub_blob(root: Path, resolved: Path) -> bool:
    # huggingface_hub's cache links snapshots/<revision>/<file> to
    # ../../blobs/<hash>; those links leave the folder but stay in the repository's cache.
    return root.parent.name == "snapshots" and resolved.parent == root.parent.parent / "blobs"


def _check_duplicates(
    folder: Path, headers: Mapping[str, Mapping[str, TensorInfo]], weight_map: Mapping[str, str]
) -> None:
    """Reject a tensor stored in more than one shard, because the intended copy is ambiguous."""
    owners: dict[str, str] = {}
    for shard, header in headers.items():
        for name in header:
            first = owners.setdefault(name, shard)
            if first != shard:
                raise CheckpointError(
                    f"{folder}: tensor {name!r} is stored in both {first} and {shard} (the index "
                    f"maps it to {weight_map.get(name)}); remove the duplicate from one shard"
                )
