"""Write tensors and JSON files into a folder atomically.

A save goes into a temporary sibling folder; only when every file is complete
does the folder replace the destination. A save that dies part-way leaves
the destination as it was (or absent), never a mix of old and new files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file

from tensorpress.errors import CheckpointError

__all__ = [
    "atomic_directory",
    "write_safetensors_shards",
    "write_json",
    "is_weight_file",
]

logger = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json")


def is_weight_file(name: str) -> bool:
    """Return True for weight shards and their index files, which a new save replaces."""
    return name.endswith(_WEIGHT_SUFFIXES) or name.endswith(_INDEX_SUFFIXES)


@contextmanager
def atomic_directory(destination: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder that replaces `destination` when the block succeeds.

    Files already in `destination` that are not weight files (tokenizer,
    README, ...) are carried over, unless the new save writes a file of the
    same name. Old weight shards and index files are dropped. On error the
    temporary folder is removed and `destination` is untouched.
    """
    destination = Path(destination)
    if destination.exists() and not destination.is_dir():
        raise CheckpointError(
            f"{destination} exists and is not a folder; pass a folder path to save into"
        )
    parent = destination.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CheckpointError(
            f"cannot create the folder {parent} to save into: {error.strerror or error}; "
            "pick a save path whose parents are folders you can write"
        ) from None
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".partial", dir=parent))
    try:
        yield staging
        if destination.exists():
            for entry in destination.iterdir():
                if is_weight_file(entry.name) or (staging / entry.name).exists():
                    continue
                target = staging / entry.name
                if entry.is_dir():
                    shutil.copytree(entry, target, symlinks=True)
                else:
                    shutil.copy2(entry, target, follow_symlinks=False)
            backup = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".old", dir=parent))
            backup.rmdir()
            os.replace(destination, backup)
            os.replace(staging, destination)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(staging, destination)
        _fsync_directory(parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _fsync_directory(path: Path) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def write_json(path: Path, data: Mapping[str, Any], *, sort_keys: bool = True) -> None:
    """Write `data` as indented JSON followed by a newline."""
    path.write_text(json.dumps(data, indent=2, sort_keys=sort_keys) + "\n", encoding="utf-8")


def _detach_shared(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return CPU, contiguous tensors, cloning any that share storage or view a larger buffer.

    safetensors refuses to write two tensors that share memory, and
    huggingface_hub sizes a view by its whole buffer when it plans shards.
    """
    seen: dict[int, str] = {}
    result: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        if not tensor.is_contiguous():
            tensor = tensor.contiguous()
        storage = tensor.untyped_storage().data_ptr() if tensor.numel() else None
        # A slice of a larger buffer (block-padded FP8 weights) would count as
        # the whole buffer when huggingface_hub sizes shards.
        oversized = tensor.untyped_storage().nbytes() > tensor.numel() * tensor.element_size()
        if storage is not None and (storage in seen or oversized):
            tensor = tensor.clone()
        elif storage is not None:
            seen[storage] = name
        result[name] = tensor
    return result


def write_safetensors_shards(
    folder: Path,
    tensors: Mapping[str, torch.Tensor],
    *,
    max_shard_size: int | str,
    filename_pattern: str = "model{suffix}.safetensors",
    progress: Callable[[str], None] | None = None,
) -> list[str]:
    """Write `tensors` as safetensors shards plus an index when there is more than one.

    Sharding follows huggingface_hub's ``split_torch_state_dict_into_shards``,
    as transformers does. Returns the names of the files written.
    """
    prepared = _detach_shared(tensors)
    split = split_torch_state_dict_into_shards(
        prepared, filename_pattern=filename_pattern, max_shard_size=max_shard_size
    )
    written = []
    for filename, names in split.filename_to_tensors.items():
        shard = {name: prepared[name] for name in names}
        save_file(shard, str(folder / filename), metadata={"format": "pt"})
        written.append(filename)
        if progress is not None:
            progress(filename)
    if split.is_sharded:
        index_name = filename_pattern.format(suffix="") + ".index.json"
        index = {"metadata": {"total_size": split.metadata["total_size"]}, "weight_map": split.tensor_to_filename}
        write_json(folder / index_name, index)
        written.append(index_name)
    return written
