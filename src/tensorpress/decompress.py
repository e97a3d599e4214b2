"""Decompression of compressed-tensors checkpoints back to dense weights."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from compressed_tensors.quantization import QuantizationConfig

from tensorpress.config import strip_group_actorder
from tensorpress.errors import InvalidOptionsError, MissingTensorError, TensorpressError
from tensorpress.formats import get_format
from tensorpress.modules import module_tensors
from tensorpress.names import ModuleTypes, class_names, group_by_module, infer_module_kind
from tensorpress.plan import plan_compression
from tensorpress.sparsity import decompress_sparse_modules

__all__ = ["decompress_tensors", "QPARAM_SUFFIXES"]

# Local names that hold quantization parameters rather than model weights.
QPARAM_SUFFIXES = (
    "_scale",
    "_zero_point",
    "_global_scale",
    "_g_idx",
    "_shape",
)

_COMPRESSED_WEIGHT_NAMES = ("weight_packed", "weight")


def _parse(config: Mapping[str, Any]) -> QuantizationConfig | None:
    if not config.get("config_groups"):
        return None
    try:
        return QuantizationConfig.model_validate(strip_group_actorder(config))
    except Exception as error:  # pydantic and preset lookups raise several types
        raise InvalidOptionsError(
            f"invalid quantization_config: {error}. Pass the dict written under "
            "quantization_config in config.json"
        ) from None


def _guess_classes(module: str, local: Mapping[str, torch.Tensor]) -> tuple[str, ...]:
    # A packed module has no float "weight" to read a shape from, but any
    # module with a packed weight or a weight scale held a 2-D weight.
    if "weight_packed" in local or "weight_scale" in local:
        return (infer_module_kind(module, torch.empty(0, 0)),)
    return (infer_module_kind(module, local.get("weight")),)


def _is_qparam(local: str) -> bool:
    if local in ("k_scale", "v_scale", "q_scale"):
        return True
    return local.startswith(("weight_", "input_", "output_")) and local.endswith(QPARAM_SUFFIXES)


def decompress_tensors(
    tensors: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    *,
    module_types: ModuleTypes | None,
    dtype: torch.dtype | None,
) -> dict[str, torch.Tensor]:
    """Decompress every sparse and quantized module of `tensors`; see `decompress_state_dict`."""
    quantization = _parse(config)
    # Sparse formats wrap the (possibly quantized) weight, so they come off first.
    tensors = decompress_sparse_modules(tensors, config)
    groups = group_by_module(tensors)

    classes: dict[str, tuple[str, ...]] = {}
    if module_types is not None:
        for name in module_types:
            classes[name] = class_names(module_types, name)
    for module, names in groups.items():
        if module not in classes:
            classes[module] = _guess_classes(module, module_tensors(tensors, module, names))

    plan = plan_compression(classes, quantization)
    status = config.get("quantization_status")
    # A "frozen" checkpoint holds float weights beside their qparams.
    compressed = status != "frozen"

    output: dict[str, torch.Tensor] = {}
    for module, names in groups.items():
        module_plan = plan.modules.get(module)
        local = module_tensors(tensors, module, names)
        if module_plan is None or not any(key in local for key in _COMPRESSED_WEIGHT_NAMES):
            for name in names:
                output[name] = tensors[name]
            continue

        if compressed:
            try:
                dense = get_format(module_plan.format).decompress(
                    local, module_plan.scheme, dtype
                )
            except TensorpressError:
                raise
            except KeyError as error:
                raise MissingTensorError(
                    f"{module}.{error.args[0]} is missing; format {module_plan.format!r} "
                    "needs it to decompress the module"
                ) from None
        else:
            dense = local

        prefix = f"{module}." if module else ""
        for key, tensor in dense.items():
            if _is_qparam(key):
                continue
            if key == "weight" and dtype is not None:
                tensor = tensor.to(dtype)
            output[prefix + key] = tensor
    return output
