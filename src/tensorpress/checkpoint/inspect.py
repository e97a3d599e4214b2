"""inspect_checkpoint and verify_checkpoint: read a compressed folder's headers and config."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from compressed_tensors.quantization import QuantizationConfig

from tensorpress.config import strip_group_actorder
from tensorpress.checkpoint.architecture import module_kinds_from_config
from tensorpress.checkpoint.shards import DTYPE_NAMES, dtype_from_name
from tensorpress.checkpoint.source import CheckpointSource, TensorInfo, open_checkpoint
from tensorpress.compress import compress_module
from tensorpress.errors import CheckpointError, TensorpressError
from tensorpress.names import group_by_module, infer_module_kind
from tensorpress.options import CompressionOptions
from tensorpress.plan import CompressionPlan, plan_compression

__all__ = ["inspect_checkpoint", "verify_checkpoint"]

_CONFIG_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DENSE_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _load_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None


def _plan(folder: Path, source: CheckpointSource, quantization: dict[str, Any]) -> CompressionPlan:
    if not quantization.get("config_groups"):
        return CompressionPlan()
    try:
        parsed = QuantizationConfig.model_validate(strip_group_actorder(quantization))
    except Exception as error:  # pydantic raises several types for bad configs
        raise CheckpointError(f"{folder / 'config.json'}: invalid quantization_config: {error}") from None
    module_types = module_kinds_from_config(folder).module_types or {}
    classes: dict[str, tuple[str, ...]] = {}
    for module, names in group_by_module(source.tensors).items():
        if module in module_types:
            classes[module] = module_types[module]
            continue
        local_names = {name.rpartition(".")[2] for name in names}
        weight = source.tensors.get(f"{module}.weight")
        # A packed module has no float weight to read a rank from, but held a 2-D one.
        is_2d = bool(local_names & {"weight_packed", "weight_scale"}) or (weight is not None and len(weight.shape) == 2)
        classes[module] = (infer_module_kind(module, torch.empty(0, 0) if is_2d else None),)
    return plan_compression(classes, parsed, warn_unmatched=False)


def _dense_dtype(config: dict[str, Any], local: dict[str, TensorInfo]) -> torch.dtype:
    scale = local.get("weight_scale")
    if scale is not None and dtype_from_name(scale.dtype) in _DENSE_SCALE_DTYPES:
        return dtype_from_name(scale.dtype)
    return _CONFIG_DTYPES.get(config.get("dtype") or config.get("torch_dtype"), torch.bfloat16)


def _dense_shape(source: CheckpointSource, module: str, local: dict[str, TensorInfo], num_bits: int) -> tuple[int, ...] | None:
    if "weight_shape" in local:
        shape_tensor = source[f"{module}.weight_shape"]
        return tuple(int(size) for size in shape_tensor.tolist())
    if "weight" in local:
        return local["weight"].shape
    packed = local.get("weight_packed")
    if packed is not None and packed.dtype == "U8" and len(packed.shape) == 2:
        return (packed.shape[0], packed.shape[1] * 8 // num_bits)
    return None


def _locals(module: str, names: list[str], source: CheckpointSource) -> dict[str, TensorInfo]:
    start = len(module) + 1 if module else 0
    return {name[start:]: source.tensors[name] for name in names}


def inspect_checkpoint(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Summarise a checkpoint folder from its headers and config.json, reading no weights.

    The result (JSON-serialisable) lists the format, the config groups, the
    ignore list, file and tensor sizes, and the compression ratio: the bytes
    the quantized weights would take dense (at the config's dtype) plus every
    other tensor, over the bytes stored.
    """
    folder = Path(folder)
    source = open_checkpoint(folder)
    config = _load_config(folder)
    quantization = config.get("quantization_config") or {}
    plan = _plan(folder, source, quantization)
    dense_itemsize = _CONFIG_DTYPES.get(config.get("dtype") or config.get("torch_dtype"), torch.bfloat16).itemsize

    stored = sum(info.nbytes for info in source.tensors.values())
    dense = stored
    formats: Counter[str] = Counter()
    for module, names in group_by_module(source.tensors).items():
        module_plan = plan.modules.get(module)
        local = _locals(module, names, source)
        if module_plan is None or not ({"weight", "weight_packed"} & set(local)):
            continue
        formats[module_plan.format] += 1
        shape = _dense_shape(source, module, local, module_plan.scheme.weights.num_bits if module_plan.scheme.weights else 8)
        if shape is None:
            continue
        module_stored = sum(info.nbytes for info in local.values())
        dense += int(torch.Size(shape).numel()) * dense_itemsize - module_stored
        dense += sum(info.nbytes for key, info in local.items() if key == "bias")

    schemes = {}
    for group, scheme in (quantization.get("config_groups") or {}).items():
        schemes[group] = {
            "targets": scheme.get("targets"),
            "format": scheme.get("format"),
            "weights": _summarise_args(scheme.get("weights")),
            "input_activations": _summarise_args(scheme.get("input_activations")),
        }
    return {
        "path": str(folder),
        "architecture": (config.get("architectures") or [None])[0],
        "quantized": bool(quantization),
        "format": quantization.get("format"),
        "quantization_status": quantization.get("quantization_status"),
        "compressed_tensors_version": quantization.get("version"),
        "schemes": schemes,
        "ignore": quantization.get("ignore") or [],
        "kv_cache_scheme": _summarise_args(quantization.get("kv_cache_scheme")),
        "sparsity_config": quantization.get("sparsity_config") or None,
        "quantized_modules": sum(formats.values()),
        "modules_per_format": dict(sorted(formats.items())),
        "tensor_count": len(source.tensors),
        "weight_files": {path.name: path.stat().st_size for path in source.weight_files},
        "stored_bytes": stored,
        "dense_bytes": dense,
        "compression_ratio": round(dense / stored, 3) if stored else None,
    }


def _summarise_args(args: dict[str, Any] | None) -> dict[str, Any] | None:
    if not args:
        return None
    keys = ("num_bits", "type", "strategy", "group_size", "block_structure", "symmetric", "dynamic")
    return {key: args.get(key) for key in keys if args.get(key) is not None}


def verify_checkpoint(folder: str | os.PathLike[str]) -> list[str]:
    """Check that every tensor's name, dtype and shape agree with config.json; return the problems.

    Opening the folder checks the index against the shard headers and the
    shard sizes. Each quantized module's tensors are then compared with what
    compressing a weight of its dense shape gives under its scheme (once per
    distinct shape and scheme, so this reads only qparams, not weights).
    An empty list means the folder is consistent.
    """
    folder = Path(folder)
    source = open_checkpoint(folder)
    config = _load_config(folder)
    quantization = config.get("quantization_config") or {}
    plan = _plan(folder, source, quantization)
    options = CompressionOptions(save_compressed=quantization.get("quantization_status") != "frozen")
    expected_cache: dict[tuple[Any, ...], dict[str, tuple[str, tuple[int, ...]]]] = {}
    problems: list[str] = []

    for module, names in group_by_module(source.tensors).items():
        local = _locals(module, names, source)
        module_plan = plan.modules.get(module)
        if module_plan is None:
            if "weight_packed" in local or "weight_scale" in local:
                problems.append(f"{module}: has quantized tensors but no config group matches it (or it is ignored)")
            continue
        if not ({"weight", "weight_packed"} & set(local)):
            problems.append(f"{module}: matches config group targets but has no weight or weight_packed")
            continue
        args = module_plan.scheme.weights
        shape = _dense_shape(source, module, local, args.num_bits if args else 8)
        if shape is None:
            problems.append(f"{module}: cannot tell the dense weight shape from {sorted(local)}")
            continue
        dtype = _dense_dtype(config, local)
        activation_names = [name for name in names if name.rpartition(".")[2].startswith(("input_", "output_"))]
        key = (shape, dtype, id(module_plan.scheme), module_plan.format, tuple(sorted(activation_names)))
        if key not in expected_cache:
            dummy = {f"{module}.weight": torch.ones(shape, dtype=dtype)}
            dummy.update(source.read(activation_names))
            try:
                produced = compress_module(module, dummy, plan, options, global_scale=None)
            except TensorpressError as error:
                problems.append(f"{module}: {error}")
                continue
            expected_cache[key] = {
                name.rpartition(".")[2]: (DTYPE_NAMES[tensor.dtype], tuple(tensor.shape))
                for name, tensor in produced.items()
            }
        expected = expected_cache[key]
        for name, (dtype_name, expected_shape) in expected.items():
            info = local.get(name)
            if info is None:
                problems.append(f"{module}.{name}: missing; format {module_plan.format!r} writes it")
            elif info.dtype != dtype_name or info.shape != expected_shape:
                problems.append(
                    f"{module}.{name}: dtype {info.dtype} shape {list(info.shape)}, but the config "
                    f"expects dtype {dtype_name} shape {list(expected_shape)}"
                )
        for name in local:
            if name not in expected and name != "bias":
                problems.append(f"{module}.{name}: not written by format {module_plan.format!r}")
    return problems

