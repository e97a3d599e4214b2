"""Per-module steps of compression: checks, qparams, shared global scales."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from compressed_tensors.quantization import (
    DynamicType,
    QuantizationArgs,
    QuantizationScheme,
    QuantizationStrategy,
    QuantizationType,
)
from compressed_tensors.quantization.utils import calculate_range

from tensorpress.errors import InvalidTensorError, MissingTensorError
from tensorpress.formats.actorder import check_g_idx
from tensorpress.names import ModuleTypes, class_names, group_by_module, infer_module_kind
from tensorpress.plan import CompressionPlan
from tensorpress.qparams import (
    FUSED_PROJECTIONS,
    global_scale_from_min_max,
    group_min_max,
    weight_qparams,
)

__all__ = [
    "prepare_module_classes",
    "module_tensors",
    "check_weight",
    "expected_qparam_shape",
    "fill_weight_qparams",
    "shared_global_scales",
    "require_activation_qparams",
    "attention_modules",
    "require_kv_cache_scales",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def prepare_module_classes(
    state_dict: Mapping[str, torch.Tensor], module_types: ModuleTypes | None
) -> dict[str, tuple[str, ...]]:
    """Return module name -> class names for every module, in model order.

    Modules listed in `module_types` come first, in its order; modules that
    own tensors but are missing from it get a class from `infer_module_kind`.
    """
    classes: dict[str, tuple[str, ...]] = {}
    if module_types is not None:
        for name in module_types:
            classes[name] = class_names(module_types, name)
    for module, names in group_by_module(state_dict).items():
        if module in classes:
            continue
        weight_name = f"{module}.weight" if module else "weight"
        weight = state_dict[weight_name] if weight_name in names else None
        classes[module] = (infer_module_kind(module, weight),)
    return classes


def module_tensors(
    state_dict: Mapping[str, torch.Tensor], module: str, names: list[str]
) -> dict[str, torch.Tensor]:
    """Return a module's tensors keyed by local name ("weight", "weight_scale", ...)."""
    start = len(module) + 1 if module else 0
    return {name[start:]: state_dict[name] for name in names}


def check_weight(module: str, weight: torch.Tensor, scheme: QuantizationScheme) -> None:
    """Reject weights that cannot be quantized, naming the tensor and the fix."""
    name = f"{module}.weight"
    if weight.is_meta:
        raise InvalidTensorError(
            f"{name} is on the meta device and has no data; load the real weights "
            "before compressing"
        )
    if weight.layout != torch.strided:
        raise InvalidTensorError(
            f"{name} has layout {weight.layout}; pass a dense tensor (call .to_dense())"
        )
    if weight.dtype not in _FLOAT_DTYPES:
        raise InvalidTensorError(
            f"{name} has dtype {weight.dtype}, but quantization needs a float16, "
            "bfloat16, float32 or float64 weight; pass the float weight, or ignore the "
            "module if it is already quantized"
        )
    if weight.dim() != 2:
        raise InvalidTensorError(
            f"{name} has shape {tuple(weight.shape)}; quantized weights must be 2-D "
            "(rows, columns). Add the module to the ignore list"
        )
    if weight.numel() == 0:
        raise InvalidTensorError(
            f"{name} has shape {tuple(weight.shape)} and no elements, so there is nothing "
            "to quantize; add the module to the ignore list"
        )
    # min and max are NaN when any value is NaN and infinite when any value
    # is, so two scalars answer the question for a fraction of isfinite's cost.
    lowest, highest = torch.aminmax(weight)
    if not bool(torch.isfinite(lowest) & torch.isfinite(highest)):
        count = int((~torch.isfinite(weight)).sum())
        raise InvalidTensorError(
            f"{name} contains {count} NaN or Inf values; fix the weights (for example "
            "re-run calibration) or add the module to the ignore list"
        )
    args = scheme.weights
    if args.strategy in (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP):
        columns = weight.shape[-1]
        if columns % args.group_size:
            raise InvalidTensorError(
                f"{name} has {columns} columns, which group_size {args.group_size} "
                "does not divide; add the module to the ignore list or use a group size "
                "that divides the columns"
            )


def expected_qparam_shape(weight_shape: torch.Size, args: QuantizationArgs) -> tuple[int, ...]:
    """Return the shape compressed-tensors gives a weight's scale and zero point."""
    rows, columns = weight_shape[-2], weight_shape[-1]
    strategy = args.strategy
    if strategy == QuantizationStrategy.TENSOR:
        return (1,)
    if strategy == QuantizationStrategy.CHANNEL:
        return (rows, 1)
    if strategy in (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP):
        return (rows, math.ceil(columns / args.group_size))
    if strategy == QuantizationStrategy.BLOCK:
        block_rows, block_columns = args.block_structure
        return (math.ceil(rows / block_rows), math.ceil(columns / block_columns))
    raise InvalidTensorError(
        f"weights cannot use the {strategy.value!r} quantization strategy; use tensor, "
        "channel, group, tensor_group or block"
    )


def _needs_global_scale(args: QuantizationArgs) -> bool:
    return args.strategy == QuantizationStrategy.TENSOR_GROUP


def fill_weight_qparams(
    module: str,
    tensors: dict[str, torch.Tensor],
    scheme: QuantizationScheme,
    global_scale: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """Return `tensors` with weight qparams computed from min/max where absent.

    Qparams that are present are checked for shape and dtype, never changed.
    """
    args = scheme.weights
    weight = tensors["weight"]
    expected = expected_qparam_shape(weight.shape, args)

    if "weight_scale" not in tensors:
        if _needs_global_scale(args) and global_scale is None:
            global_scale = global_scale_from_min_max([group_min_max(weight, args, module)])
        tensors = dict(tensors)
        computed = weight_qparams(
            weight, args, global_scale=global_scale, name=f"{module}.weight"
        )
        for local, value in computed.items():
            tensors.setdefault(local, value)
        _check_g_idx(module, tensors, args)
        return tensors

    scale = tensors["weight_scale"]
    _check_qparam(module, "weight_scale", scale, expected, floating=True)
    _check_positive(module, "weight_scale", scale)
    if not args.symmetric:
        if "weight_zero_point" not in tensors:
            raise MissingTensorError(
                f"{module}.weight_zero_point is missing; the asymmetric weight scheme "
                f"needs it beside {module}.weight_scale (or drop both to compute them "
                "from min/max)"
            )
        zero_point = tensors["weight_zero_point"]
        _check_qparam(module, "weight_zero_point", zero_point, expected, floating=None)
        _check_zero_point_range(module, "weight_zero_point", zero_point, args)
    if _needs_global_scale(args):
        if "weight_global_scale" not in tensors:
            raise MissingTensorError(
                f"{module}.weight_global_scale is missing; the tensor_group scheme needs it "
                f"beside {module}.weight_scale (or drop both to compute them from min/max)"
            )
        global_scale = tensors["weight_global_scale"]
        _check_qparam(module, "weight_global_scale", global_scale, (1,), floating=True)
        _check_positive(module, "weight_global_scale", global_scale)
    _check_g_idx(module, tensors, args)
    return tensors


def _check_g_idx(module: str, tensors: Mapping[str, torch.Tensor], args: QuantizationArgs) -> None:
    if "weight_g_idx" in tensors and args.strategy == QuantizationStrategy.GROUP:
        columns = tensors["weight"].shape[-1]
        groups = tensors["weight_scale"].shape[-1]
        check_g_idx(f"{module}.weight_g_idx", tensors["weight_g_idx"], columns, groups)


def _check_positive(module: str, local: str, tensor: torch.Tensor) -> None:
    """Reject scales that are not finite and positive: quantizing divides by them."""
    values = tensor.float()
    bad = ~(torch.isfinite(values) & (values > 0))
    if bool(bad.any()):
        first = values[bad].flatten()[0].item()
        raise InvalidTensorError(
            f"{module}.{local} contains {int(bad.sum())} value(s) that are not finite and "
            f"positive (first: {first}); a scale must be > 0. Recompute the qparams, or "
            "drop them to compute them from min/max"
        )


def _check_zero_point_range(
    module: str, local: str, zero_point: torch.Tensor, args: QuantizationArgs
) -> None:
    """Reject integer zero points that are fractional or outside the quantized range."""
    if args.type != QuantizationType.INT:
        return
    if zero_point.dtype.is_complex or zero_point.dtype == torch.bool:
        raise InvalidTensorError(
            f"{module}.{local} has dtype {zero_point.dtype}; a zero point must be an "
            "integer tensor"
        )
    q_min, q_max = (int(bound) for bound in calculate_range(args, torch.device("cpu")))
    values = zero_point.double()
    inside = torch.isfinite(values) & (values == values.round())
    inside &= (values >= q_min) & (values <= q_max)
    if not bool(inside.all()):
        first = zero_point[~inside].flatten()[0].item()
        raise InvalidTensorError(
            f"{module}.{local} contains {int((~inside).sum())} value(s) that are not "
            f"integers in [{q_min}, {q_max}], the {args.num_bits}-bit range (first: "
            f"{first}); recompute the qparams, or drop them to compute them from min/max"
        )


def _check_qparam(
    module: str,
    local: str,
    tensor: torch.Tensor,
    expected: tuple[int, ...],
    *,
    floating: bool | None,
) -> None:
    name = f"{module}.{local}"
    if tuple(tensor.shape) != expected:
        raise InvalidTensorError(
            f"{name} has shape {tuple(tensor.shape)} but the scheme expects {expected}; "
            "recompute the qparams for this scheme, or drop them to compute from min/max"
        )
    if floating and not tensor.dtype.is_floating_point:
        raise InvalidTensorError(
            f"{name} has dtype {tensor.dtype} but a scale must be a float tensor"
        )


def shared_global_scales(
    state_dict: Mapping[str, torch.Tensor], plan: CompressionPlan
) -> dict[str, torch.Tensor]:
    """Compute one global scale per group of fused projections that lack qparams.

    llmcompressor shares the "tensor_group" global scale of q/k/v and of
    gate/up (see `FUSED_PROJECTIONS`) because vLLM fuses those weights.
    Modules that carry their own ``weight_scale`` are left alone.
    """
    needing: dict[str, QuantizationArgs] = {}
    for name, module_plan in plan.modules.items():
        args = module_plan.scheme.weights
        if args is None or not _needs_global_scale(args):
            continue
        if f"{name}.weight" not in state_dict or f"{name}.weight_scale" in state_dict:
            continue
        needing[name] = args

    scales: dict[str, torch.Tensor] = {}
    for name in needing:
        if name in scales:
            continue
        parent, _, last = name.rpartition(".")
        partners = [name]
        for group in FUSED_PROJECTIONS:
            if last in group:
                siblings = [f"{parent}.{member}" if parent else member for member in group]
                # llmcompressor fuses only when every member of the group exists.
                if all(f"{sibling}.weight" in state_dict for sibling in siblings):
                    partners = [sibling for sibling in siblings if sibling in needing]
                break
        stats = []
        for partner in partners:
            weight = state_dict[f"{partner}.weight"]
            # Check before taking min/max, which fails on empty weights and
            # would spread a NaN to every partner's scale.
            check_weight(partner, weight, plan.modules[partner].scheme)
            stats.append(group_min_max(weight, needing[partner], partner))
        shared = global_scale_from_min_max(stats)
        for partner in partners:
            scales[partner] = shared
    return scales


def require_activation_qparams(
    module: str, tensors: Mapping[str, torch.Tensor], scheme: QuantizationScheme
) -> None:
    """Raise when a static activation scheme lacks the scales calibration gives."""
    for base, args in (("input", scheme.input_activations), ("output", scheme.output_activations)):
        if args is None or args.dynamic is True:
            continue
        if args.strategy == QuantizationStrategy.TENSOR_GROUP and f"{base}_global_scale" not in tensors:
            raise MissingTensorError(
                f"{module}.{base}_global_scale is missing; the {base} activation scheme "
                "needs a calibrated global scale. Calibrate the model (for example with "
                "llmcompressor) or use a scheme with dynamic activations"
            )
        if args.strategy == QuantizationStrategy.TENSOR_GROUP:
            _check_activation_scale(
                module, f"{base}_global_scale", tensors[f"{base}_global_scale"], None
            )
        if args.dynamic == DynamicType.LOCAL:
            continue
        if f"{base}_scale" not in tensors:
            raise MissingTensorError(
                f"{module}.{base}_scale is missing; static {base} activation "
                "quantization needs a calibrated scale. Calibrate the model (for example "
                "with llmcompressor) or use a scheme with dynamic activations"
            )
        _check_activation_scale(module, f"{base}_scale", tensors[f"{base}_scale"], args)
        if not args.symmetric:
            if f"{base}_zero_point" not in tensors:
                raise MissingTensorError(
                    f"{module}.{base}_zero_point is missing; the static asymmetric {base} "
                    "activation scheme needs a calibrated zero point beside "
                    f"{module}.{base}_scale. Calibrate the model or use a symmetric scheme"
                )
            zero_point = tensors[f"{base}_zero_point"]
            if zero_point.shape != tensors[f"{base}_scale"].shape:
                raise InvalidTensorError(
                    f"{module}.{base}_zero_point has shape {tuple(zero_point.shape)} but "
                    f"{module}.{base}_scale has {tuple(tensors[f'{base}_scale'].shape)}; "
                    "they must match. Recompute the activation qparams"
                )
            _check_zero_point_range(module, f"{base}_zero_point", zero_point, args)


def _check_activation_scale(
    module: str, local: str, scale: torch.Tensor, args: QuantizationArgs | None
) -> None:
    """Check a calibrated activation scale: a float tensor of positive, finite values.

    A per-tensor scale (`args` with the "tensor" strategy, or None for a
    global scale) must hold one value; llmcompressor stores it with shape (1,).
    """
    name = f"{module}.{local}"
    if not scale.dtype.is_floating_point:
        raise InvalidTensorError(
            f"{name} has dtype {scale.dtype} but a scale must be a float tensor; pass the "
            "calibrated float scale"
        )
    per_tensor = args is None or args.strategy == QuantizationStrategy.TENSOR
    if per_tensor and (scale.numel() != 1 or scale.dim() > 1):
        raise InvalidTensorError(
            f"{name} has shape {tuple(scale.shape)} but a per-tensor scale contains one value, "
            "shape (1,); pass the calibrated per-tensor scale"
        )
    _check_positive(module, local, scale)


# Child modules that mark an attention module whose key/value cache
# compressed-tensors quantizes (``_KV_CACHE_PROJECTION_NAMES`` in 0.19 and 0.20).
_KV_PROJECTIONS = ("k_proj", "v_proj", "qkv_proj", "kv_b_proj")


def attention_modules(
    names: Iterable[str], module_classes: Mapping[str, tuple[str, ...]]
) -> list[str]:
    """Return the attention modules among the ancestors of `names`, in order of first appearance.

    A module counts when it has a child named k_proj, v_proj, qkv_proj or
    kv_b_proj and, where its classes are known, one of them contains
    "Attention", the test compressed-tensors applies to a module tree.
    """
    found: dict[str, None] = {}
    for name in names:
        parts = name.split(".")
        for depth in range(1, len(parts)):
            if parts[depth] in _KV_PROJECTIONS:
                found.setdefault(".".join(parts[:depth]), None)
    result = []
    for module in found:
        classes = module_classes.get(module, ())
        known = [cls for cls in classes if cls != "Module"]
        if known and not any("attention" in cls.lower() for cls in known):
            continue
        result.append(module)
    return result


def require_kv_cache_scales(
    state_dict: Mapping[str, torch.Tensor],
    module_classes: Mapping[str, tuple[str, ...]],
    kv_cache_scheme: QuantizationArgs | None,
) -> None:
    """Raise when a static KV-cache scheme lacks an attention module's k_scale or v_scale.

    llmcompressor calibrates these scales on data and registers them on the
    attention module, so they cannot be computed from the weights.
    """
    if kv_cache_scheme is None or kv_cache_scheme.dynamic is not False:
        return
    needed = ["k_scale", "v_scale"]
    if not kv_cache_scheme.symmetric:
        needed += ["k_zero_point", "v_zero_point"]
    for module in attention_modules(state_dict, module_classes):
        missing = [local for local in needed if f"{module}.{local}" not in state_dict]
        if missing:
            raise MissingTensorError(
                f"attention module {module} lacks {', '.join(missing)}, which the static "
                "kv_cache_scheme needs. Calibrate the model (for example with llmcompressor) "
                "and pass its state dict with these tensors, or use a dynamic "
                "kv_cache_scheme, or remove kv_cache_scheme"
            )
