"""Opt-in conversion of pickle checkpoints (.bin, .pt) to safetensors shards."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch

from tensorpress.checkpoint.shards import Spool, write_shard
from tensorpress.checkpoint.source import (
    CheckpointSource,
    find_pickle_files,
    load_weight_map,
    open_checkpoint,
    shard_path,
)
from tensorpress.errors import CheckpointError
from tensorpress.writer import write_json

__all__ = ["convert_pickle_checkpoint"]

logger = logging.getLogger(__name__)

_PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"


def _pickle_files(folder: Path) -> list[Path]:
    index = folder / _PICKLE_INDEX_NAME
    if index.is_file():
        weight_map = load_weight_map(index)
        return [shard_path(folder, name, index) for name in dict.fromkeys(weight_map.values())]
    return [shard_path(folder, path.name, path) for path in find_pickle_files(folder)]


def _load(path: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            # Files in the legacy (non-zip) format cannot be memory-mapped.
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as error:
        raise CheckpointError(
            f"{path}: torch.load(weights_only=True) failed: {error}. The file is corrupt or "
            "holds objects other than tensors; convert it to safetensors yourself"
        ) from None
    if not isinstance(loaded, dict) or not all(
        isinstance(name, str) and isinstance(tensor, torch.Tensor) for name, tensor in loaded.items()
    ):
        raise CheckpointError(
            f"{path} does not hold a flat dict of tensor names to tensors; convert it to a "
            "state dict in safetensors yourself"
        )
    return loaded


def convert_pickle_checkpoint(folder: Path, scratch: Path) -> CheckpointSource:
    """Convert `folder`'s pickle weights into safetensors shards under `scratch` and open them.

    Each pickle file becomes one safetensors file of the same stem, read with
    ``torch.load(weights_only=True, mmap=True)``, so only tensors, never
    arbitrary objects, are unpickled.
    """
    files = _pickle_files(folder)
    scratch.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    for path in files:
        logger.warning("converting pickle weights %s with torch.load(weights_only=True)", path)
        tensors = _load(path)
        shard_name = f"{path.stem}.safetensors"
        spool = Spool(scratch / f"{path.stem}.spool")
        try:
            infos = [spool.write(name, tensor) for name, tensor in tensors.items()]
            spool.close()
            write_shard(scratch / shard_name, infos)
        finally:
            spool.close()
            spool.path.unlink(missing_ok=True)
        del tensors
        for info in infos:
            weight_map[info.name] = shard_name
    write_json(scratch / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
    return open_checkpoint(scratch)
