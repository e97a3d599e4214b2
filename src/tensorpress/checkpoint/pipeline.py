"""compress_checkpoint and decompress_checkpoint: folder to folder, a module at a time."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tensorpress.writer import check_shard_size
from tensorpress.checkpoint.architecture import ModuleKinds, module_kinds_from_config
from tensorpress.checkpoint.pickle import convert_pickle_checkpoint
from tensorpress.checkpoint.shards import Spool, dtype_from_name, write_shards
from tensorpress.checkpoint.source import CheckpointSource, TensorInfo, find_pickle_files, open_checkpoint
from tensorpress.compress import check_options, compress_module, config_entry, decompress_state_dict, forced_format
from tensorpress.distributed import Ranks
from tensorpress.errors import CheckpointError, InvalidOptionsError
from tensorpress.experts import checkpoint_module_types
from tensorpress.modules import prepare_module_classes, shared_global_scales
from tensorpress.names import group_by_module
from tensorpress.options import CompressionOptions
from tensorpress.plan import CompressionPlan, plan_compression
from tensorpress.qparams import FUSED_PROJECTIONS
from tensorpress.writer import is_weight_file, write_json

__all__ = ["CheckpointResult", "Progress", "compress_checkpoint", "decompress_checkpoint"]

logger = logging.getLogger(__name__)

# Called as progress(stage, done, total); stage is "compress", "decompress" or "write".
Progress = Callable[[str, int, int], None]

# Scratch files inside the staging folder, removed before it is renamed into place.
_SPOOL_NAME = ".tensorpress-spool"
_PICKLE_SCRATCH = ".tensorpress-pickle"

# config.json dtype names that decompress_checkpoint casts dequantized weights to.
_CONFIG_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class CheckpointResult:
    """Summary of a folder written by compress_checkpoint or decompress_checkpoint.

    Attributes:
        path: the output folder.
        config: the ``quantization_config`` entry written to config.json
            (None when nothing was quantized, and always for decompression).
        weight_files: the shard and index file names written.
        module_kinds: where module classes came from (meta-device model or
            the name/shape rule).
    """

    path: Path
    config: dict[str, Any] | None
    weight_files: list[str]
    module_kinds: str


ModuleTransform = Callable[[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def compress_checkpoint(
    source_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    options: CompressionOptions | Mapping[str, Any] | None,
    *,
    max_shard_size: int | str = "5GB",
    workers: int = 1,
    progress: Progress | None = None,
    allow_pickle: bool = False,
    ranks: Ranks | None = None,
) -> CheckpointResult:
    """Compress a checkpoint folder into a new compressed-tensors folder, a module at a time.

    Reads model.safetensors or the shards of model.safetensors.index.json
    lazily and compresses each module with the same code as
    `compress_state_dict`. Writes shards (split at `max_shard_size`), an
    index, config.json with its ``quantization_config`` entry, and a copy of
    every other file (tokenizer, generation config, ...). The bytes equal
    those of `compress_state_dict` followed by
    `tensorpress.writer.write_safetensors_shards` on the same tensors in the
    checkpoint's order.

    Module classes for target matching come from the model of config.json,
    built on the meta device when transformers ships its architecture, and
    from the name/shape rule otherwise (`CheckpointResult.module_kinds`).
    Peak memory is a few times the largest module's tensors, whatever the
    checkpoint's size. The output appears atomically: everything is
    written to a temporary sibling folder that is renamed into place.

    Args:
        source_dir: the checkpoint folder to read.
        output_dir: the folder to write; it must not be `source_dir` or inside it.
        options: `CompressionOptions` or its dict form.
        max_shard_size: the largest shard, in bytes or as "5GB".
        workers: modules compressed at once, on threads. The bytes are the
            same for every count.
        progress: called as progress(stage, done, total).
        allow_pickle: convert .bin/.pt weights with
            ``torch.load(weights_only=True)`` when the folder has no safetensors.
        ranks: the processes that share the work, from
            `tensorpress.distributed.ranks_from_environment` under torchrun.
            Every rank makes the same call; the bytes equal one process's.

    Raises:
        CheckpointError: the folder is missing, unreadable, pickle-only or
            already quantized, or the output path is unusable.
        InvalidOptionsError, InvalidTensorError, MissingTensorError: as
            `compress_state_dict` raises them.
    """
    options = check_options(options)
    check_shard_size(max_shard_size)
    source_dir, output_dir = _check_paths(source_dir, output_dir, workers)
    config_json = _read_config_json(source_dir)
    if config_json is not None and config_json.get("quantization_config"):
        raise CheckpointError(
            f"{source_dir / 'config.json'} already has a quantization_config; compress a dense "
            "checkpoint, or decompress this one first (tensorpress decompress SRC DST)"
        )

    ranks = ranks or Ranks()
    with ranks.output_directory(output_dir) as staging:
        source = _open_source(source_dir, staging, allow_pickle, ranks)
        kinds = module_kinds_from_config(source_dir)
        logger.info("module classes for %s: %s", source_dir, kinds.source)
        module_types, layout = checkpoint_module_types(kinds.module_types, (config_json or {}).get("model_type"))
        module_classes = prepare_module_classes(_meta_view(source), module_types)
        _log_unknown_modules(source, kinds)
        plan = plan_compression(
            module_classes,
            options.quantization,
            force_format=forced_format(options),
            aliases=layout.model_aliases(module_classes),
        )
        owned = ranks.assign_modules(_module_sizes(source, set(plan.modules)))
        global_scales = ranks.run(
            lambda: shared_global_scales(source, _fused_only(plan, owned)), "read fused partner weights"
        )

        def transform(module: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return compress_module(module, tensors, plan, options, global_scale=global_scales.get(module))

        entry = config_entry(plan, options)
        files = _write_folder(
            source_dir,
            source,
            staging,
            transform,
            selected=owned,
            stage="compress",
            config_json=_with_quantization(config_json, entry),
            max_shard_size=max_shard_size,
            workers=workers,
            progress=progress,
            ranks=ranks,
        )
    logger.info("wrote %s (%d weight files)", output_dir, len(files))
    return CheckpointResult(path=output_dir, config=entry, weight_files=files, module_kinds=kinds.source)


def decompress_checkpoint(
    source_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    workers: int = 1,
    progress: Progress | None = None,
    ranks: Ranks | None = None,
) -> CheckpointResult:
    """Write a dense copy of a compressed-tensors folder that transformers loads without quantization.

    Each quantized module gets its dequantized ``weight`` and loses its
    qparams; config.json loses its ``quantization_config``. Dequantized
    weights are cast to `dtype`, or when it is None to the ``dtype`` (or
    ``torch_dtype``) that config.json names. `ranks` splits the work as in
    `compress_checkpoint`.

    Raises:
        CheckpointError: the folder is missing or has no quantization_config.
        MissingTensorError: a quantized module lacks a tensor its format needs.
    """
    check_shard_size(max_shard_size)
    source_dir, output_dir = _check_paths(source_dir, output_dir, workers)
    config_json = _read_config_json(source_dir)
    quantization = (config_json or {}).get("quantization_config")
    if not quantization:
        raise CheckpointError(
            f"{source_dir / 'config.json'} has no quantization_config; the folder is not a "
            "compressed-tensors checkpoint"
        )
    if dtype is None:
        dtype = _CONFIG_DTYPES.get(config_json.get("dtype") or config_json.get("torch_dtype"))

    ranks = ranks or Ranks()
    with ranks.output_directory(output_dir) as staging:
        source = open_checkpoint(source_dir)
        kinds = module_kinds_from_config(source_dir)
        logger.info("module classes for %s: %s", source_dir, kinds.source)
        module_types = kinds.module_types or {}

        def transform(module: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            known = {module: module_types[module]} if module in module_types else None
            return decompress_state_dict(tensors, quantization, module_types=known, dtype=dtype)

        dense_config = {key: value for key, value in config_json.items() if key != "quantization_config"}
        files = _write_folder(
            source_dir,
            source,
            staging,
            transform,
            selected=ranks.assign_modules(_module_sizes(source, _quantized_modules(source))),
            stage="decompress",
            config_json=dense_config,
            max_shard_size=max_shard_size,
            workers=workers,
            progress=progress,
            ranks=ranks,
        )
    return CheckpointResult(path=output_dir, config=None, weight_files=files, module_kinds=kinds.source)


def _check_paths(
    source_dir: str | os.PathLike[str], output_dir: str | os.PathLike[str], workers: int
) -> tuple[Path, Path]:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise InvalidOptionsError(f"workers must be a positive integer, not {workers!r}")
    source = Path(source_dir).resolve()
    output = Path(output_dir).resolve()
    if not source.is_dir():
        raise CheckpointError(f"checkpoint folder {source} not found or not a folder")
    if output == source or source in output.parents:
        raise CheckpointError(
            f"output folder {output} is the source folder or inside it; write to a separate folder"
        )
    return source, output


def _read_config_json(folder: Path) -> dict[str, Any] | None:
    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not contain a JSON object")
    return data


def _with_quantization(config_json: dict[str, Any] | None, entry: dict[str, Any] | None) -> dict[str, Any] | None:
    if entry is None:
        return config_json
    if config_json is None:
        logger.warning("the source has no config.json; writing one with only quantization_config")
    return {**(config_json or {}), "quantization_config": entry}


def _open_source(folder: Path, staging: Path, allow_pickle: bool, ranks: Ranks) -> CheckpointSource:
    has_safetensors = any(folder.glob("*.safetensors"))
    if not has_safetensors and allow_pickle and find_pickle_files(folder):
        # Rank 0 converts; the other ranks open its files once it is done.
        scratch = staging / _PICKLE_SCRATCH
        converted = ranks.run(
            lambda: convert_pickle_checkpoint(folder, scratch) if ranks.is_main else None,
            "convert pickle weights",
        )
        return converted or open_checkpoint(scratch)
    return open_checkpoint(folder)


def _meta_view(source: CheckpointSource) -> dict[str, torch.Tensor]:
    # Planning needs only each weight's rank, so give it shapes without data.
    return {
        name: torch.empty(info.shape, dtype=dtype_from_name(info.dtype), device="meta")
        for name, info in source.tensors.items()
    }


def _log_unknown_modules(source: CheckpointSource, kinds: ModuleKinds) -> None:
    if kinds.module_types is None:
        return
    unknown = [module for module in group_by_module(source.tensors) if module not in kinds.module_types]
    if unknown:
        logger.warning(
            "%d module(s) of the checkpoint are not in the model built from config.json "
            "(first: %s); they get classes from the name/shape rule",
            len(unknown),
            unknown[0],
        )


def _module_sizes(source: CheckpointSource, modules: set[str]) -> dict[str, int]:
    """Return the input bytes of each of `modules`, in checkpoint order."""
    return {
        module: sum(source.tensors[name].nbytes for name in names)
        for module, names in group_by_module(source.tensors).items()
        if module in modules
    }


def _fused_only(plan: CompressionPlan, owned: set[str]) -> CompressionPlan:
    # Fused partners share a global scale, so their weights are read before
    # any of them is compressed. Every other module computes its scale from
    # its own weight during compression, which gives the same value. A group
    # is kept whole when this process compresses any of its members.
    modules = {}
    for name, entry in plan.modules.items():
        parent, _, last = name.rpartition(".")
        for group in FUSED_PROJECTIONS:
            if last in group:
                members = {f"{parent}.{member}" if parent else member for member in group}
                if members & owned:
                    modules[name] = entry
                break
    return dataclasses.replace(plan, modules=modules)


def _quantized_modules(source: CheckpointSource) -> set[str]:
    from tensorpress.decompress import _is_qparam

    selected = set()
    for module, names in group_by_module(source.tensors).items():
        start = len(module) + 1 if module else 0
        local = [name[start:] for name in names]
        # Sparse modules hold "compressed" and "bitmask" in place of a weight.
        sparse = "compressed" in local and "bitmask" in local
        if sparse or any(each == "weight_packed" or _is_qparam(each) for each in local):
            selected.add(module)
    return selected


def _write_folder(
    source_dir: Path,
    source: CheckpointSource,
    staging: Path,
    transform: ModuleTransform,
    *,
    selected: set[str],
    stage: str,
    config_json: dict[str, Any] | None,
    max_shard_size: int | str,
    workers: int,
    progress: Progress | None,
    ranks: Ranks,
) -> list[str]:
    """Transform this rank's `selected` modules and write this rank's shards.

    Rank 0 writes the index, config.json and the other files once every
    rank has written its shards.
    """
    spool = Spool(staging / ranks.spool_name(_SPOOL_NAME))
    try:
        local = ranks.run(
            lambda: _transform_modules(source, spool, transform, selected, stage, workers, progress),
            f"{stage} its modules",
        )
        spool.close()
        results: dict[int, list[TensorInfo]] = {}
        for part in ranks.all_gather(local):
            results.update(part)
        outputs = _collect_outputs(source, results)

        def report(done: int, total: int) -> None:
            if progress is not None:
                progress("write", done, total)

        def write_own_shards() -> list[str]:
            return write_shards(
                staging,
                outputs,
                max_shard_size=max_shard_size,
                progress=report,
                writes_shard=ranks.writes_shard,
                write_index=False,
            )

        files = ranks.run(write_own_shards, "write its shards")
        # Every rank is done reading the spools. Remove this one before rank
        # 0 may rename the staging folder.
        spool.path.unlink()

        def finish() -> None:
            if not ranks.is_main:
                return
            write_shards(staging, outputs, max_shard_size=max_shard_size, writes_shard=lambda number: False)
            if config_json is not None:
                write_json(staging / "config.json", config_json)
            _copy_other_files(source_dir, source.weight_files, staging)

        ranks.run(finish, "write the index and config.json")
    finally:
        spool.close()
        spool.path.unlink(missing_ok=True)
        if ranks.is_main:
            shutil.rmtree(staging / _PICKLE_SCRATCH, ignore_errors=True)
    return files


def _transform_modules(
    source: CheckpointSource,
    spool: Spool,
    transform: ModuleTransform,
    selected: set[str],
    stage: str,
    workers: int,
    progress: Progress | None,
) -> dict[int, list[TensorInfo]]:
    """Run `transform` on every selected module and return its output tensors by module position.

    Outputs go to the spool as soon as a module is done, so at most a few
    modules' tensors are in memory: one per worker plus one waiting per worker.
    """
    groups = list(group_by_module(source.tensors).items())
    total = sum(1 for module, _ in groups if module in selected)
    results: list[list[TensorInfo] | None] = [None] * len(groups)

    def run(module: str, names: list[str]) -> list[TensorInfo]:
        output = transform(module, source.read(names))
        return [spool.write(name, tensor) for name, tensor in output.items()]

    done = 0

    def finish(index: int, infos: list[TensorInfo]) -> None:
        nonlocal done
        results[index] = infos
        done += 1
        if progress is not None:
            progress(stage, done, total)

    if workers == 1:
        for index, (module, names) in enumerate(groups):
            if module in selected:
                finish(index, run(module, names))
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tensorpress") as pool:
            pending: deque[tuple[int, Future[list[TensorInfo]]]] = deque()
            try:
                for index, (module, names) in enumerate(groups):
                    if module not in selected:
                        continue
                    pending.append((index, pool.submit(run, module, names)))
                    while len(pending) >= 2 * workers:
                        finished_index, future = pending.popleft()
                        finish(finished_index, future.result())
                while pending:
                    finished_index, future = pending.popleft()
                    finish(finished_index, future.result())
            except BaseException:
                for _, future in pending:
                    future.cancel()
                raise

    return {index: infos for index, infos in enumerate(results) if infos is not None}


def _collect_outputs(source: CheckpointSource, results: Mapping[int, list[TensorInfo]]) -> dict[str, TensorInfo]:
    """Return every output tensor in checkpoint order; modules without results pass through unread."""
    outputs: dict[str, TensorInfo] = {}
    for index, (module, names) in enumerate(group_by_module(source.tensors).items()):
        infos = results.get(index)
        if infos is None:
            infos = [source.tensors[name] for name in names]
        for info in infos:
            outputs[info.name] = info
    return outputs


def _copy_other_files(folder: Path, weight_files: list[Path], staging: Path) -> None:
    """Copy every file but weights, their index and config.json (tokenizer, generation config, ...)."""
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if name.startswith(".") or name == "config.json":
            continue
        if is_weight_file(name):
            if entry not in weight_files and not name.endswith(".index.json"):
                logger.info("not copying %s: it is a weight file outside the checkpoint", entry)
            continue
        target = staging / name
        if entry.is_dir():
            shutil.copytree(entry, target, symlinks=True)
        else:
            shutil.copy2(entry, target)
