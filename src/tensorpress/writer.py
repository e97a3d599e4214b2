"""Write tensors and JSON files into a folder atomically.

A save goes into a temporary sibling folder; only when every file is complete
does the folder replace the destination. A save that dies part-way leaves
the destination as it was (or absent), never a mix of old and new files.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from huggingface_hub.serialization._base import parse_size_to_int

from tensorpress.errors import CheckpointError, InvalidOptionsError
from tensorpress.safetensors_file import write_safetensors_file

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


def _folder_mode(destination: Path) -> int:
    if destination.is_dir():
        return destination.stat().st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def check_shard_size(max_shard_size: int | str) -> int:
    """Return `max_shard_size` in bytes; raise InvalidOptionsError unless it is a positive size."""
    try:
        size = parse_size_to_int(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    except (TypeError, ValueError):
        size = None
    if size is None or size <= 0 or isinstance(max_shard_size, bool):
        raise InvalidOptionsError(
            f"max_shard_size={max_shard_size!r} is not a positive size; use bytes as an "
            "int or a string such as '5GB' or '500MB'"
        )
    return size


@contextmanager
def atomic_directory(destination: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder that replaces `destination` when the block succeeds.

    Files already in `destination` that are not weight files (tokenizer,
    README, ...) are carried over, unless the new save writes a file of the
    same name. Old weight shards and index files are dropped. On error the
    temporary folder is removed and `destination` is untouched.

    The temporary folder is a hidden sibling, ``.<name>.<pid>.<random>.partial``.
    On Linux the finished folder and `destination` swap places in one
    ``renameat2(RENAME_EXCHANGE)`` call, so a process killed at any point
    leaves `destination` with its old or its new contents. Elsewhere the old
    folder is first renamed to a ``.old`` sibling, and a save killed between
    the two renames leaves `destination` absent. Siblings left by killed
    saves are removed (or, for a ``.old`` folder whose destination is
    missing, renamed back) by the next save into the same path.
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
    _clean_leftovers(destination)
    prefix = f".{destination.name}.{os.getpid()}."
    staging = Path(tempfile.mkdtemp(prefix=prefix, suffix=_PARTIAL_SUFFIX, dir=parent))
    # mkdtemp creates 0700 folders, but a server running as another user
    # must read the checkpoint. A new folder gets the umask's mode, and an
    # existing destination keeps its own.
    os.chmod(staging, _folder_mode(destination))
    try:
        yield staging
        if destination.exists():
            _carry_over(destination, staging)
            _fsync_tree(staging)
            if _exchange(staging, destination):
                # staging now contains the old contents.
                _fsync_directory(parent)
                shutil.rmtree(staging, ignore_errors=True)
            else:
                backup = Path(tempfile.mkdtemp(prefix=prefix, suffix=_BACKUP_SUFFIX, dir=parent))
                backup.rmdir()
                os.replace(destination, backup)
                os.replace(staging, destination)
                _fsync_directory(parent)
                shutil.rmtree(backup, ignore_errors=True)
        else:
            _fsync_tree(staging)
            os.replace(staging, destination)
        _fsync_directory(parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


_PARTIAL_SUFFIX = ".partial"
_BACKUP_SUFFIX = ".old"

# renameat2 flag that swaps two paths atomically (linux/fs.h), and "relative to the cwd".
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(first: Path, second: Path) -> bool:
    """Swap two folders in one atomic step; return False where the OS or filesystem cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # no glibc 2.28+ (musl, old systems)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise CheckpointError(
        f"replacing {second} with the finished save failed: {os.strerror(code)}"
    )


def _carry_over(destination: Path, staging: Path) -> None:
    for entry in destination.iterdir():
        if is_weight_file(entry.name) or (staging / entry.name).exists():
            continue
        target = staging / entry.name
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, target, symlinks=True)
        else:
            shutil.copy2(entry, target, follow_symlinks=False)


def _clean_leftovers(destination: Path) -> None:
    """Remove the temporary siblings of `destination` that saves killed part-way left behind.

    A sibling whose process is still running belongs to a save in progress
    and is kept. A ``.old`` sibling contains the previous contents of a save
    killed between its two renames. When `destination` is missing, it is
    renamed back instead of removed.
    """
    prefix = f".{destination.name}."
    for entry in sorted(destination.parent.iterdir()):
        name = entry.name
        if not name.startswith(prefix) or not name.endswith((_PARTIAL_SUFFIX, _BACKUP_SUFFIX)):
            continue
        owner = name[len(prefix) :].split(".", 1)[0]
        if not owner.isdigit() or _is_running(int(owner)) or not entry.is_dir():
            continue
        if name.endswith(_BACKUP_SUFFIX) and not destination.exists():
            os.replace(entry, destination)
            logger.warning("restored %s from %s, left by an interrupted save", destination, entry)
            continue
        shutil.rmtree(entry, ignore_errors=True)
        logger.info("removed %s, left by an interrupted save into %s", entry, destination)


def _is_running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _fsync_tree(folder: Path) -> None:
    """Flush every file under `folder` to disk, so a crash after the rename finds complete files."""
    for root, _, files in os.walk(folder):
        for name in files:
            path = Path(root, name)
            if not path.is_symlink():
                _fsync_directory(path)
        _fsync_directory(Path(root))


def _fsync_directory(path: Path) -> None:
    """Flush a folder (or file) to disk; filesystems that cannot are skipped silently."""
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
    as transformers does. Each shard is written from the tensors' memory,
    with the bytes ``safetensors.torch.save_file`` writes but without its
    copy of the shard. Returns the names of the files written.
    """
    prepared = _detach_shared(tensors)
    split = split_torch_state_dict_into_shards(
        prepared, filename_pattern=filename_pattern, max_shard_size=max_shard_size
    )
    written = []
    for filename, names in split.filename_to_tensors.items():
        shard = {name: prepared[name] for name in names}
        write_safetensors_file(shard, folder / filename, metadata={"format": "pt"})
        written.append(filename)
        if progress is not None:
            progress(filename)
    if split.is_sharded:
        index_name = filename_pattern.format(suffix="") + ".index.json"
        index = {"metadata": {"total_size": split.metadata["total_size"]}, "weight_map": split.tensor_to_filename}
        write_json(folder / index_name, index)
        written.append(index_name)
    return written
