"""Decompression of compressed-tensors checkpoints back to dense weights."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from compressed_tensors.quantization import (
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStrategy,
)

from tensorpress.config import strip_group_actorder
from tensorpress.errors import (
    InvalidOptionsError,
    InvalidTensorError,
    MissingTensorError,
    TensorpressError,
    UnsupportedFormatError,
)
from tensorpress.formats import format_names, get_format
from tensorpress.formats.actorder import ACTORDER_FORMATS, check_g_idx
from tensorpress.formats.quantized import QUANTIZED_FORMAT_NAMES
from tensorpress.formats.sparse import is_sparse_compressed
from tensorpress.modules import expected_qparam_shape, module_tensors
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

# Local names that only a quantized module carries.
_QUANTIZED_MARKERS = (
    "weight_packed",
    "weight_scale",
    "weight_zero_point",
    "weight_global_scale",
    "weight_shape",
    "weight_g_idx",
)

# Formats that store the quantized weight as "weight_packed"; the others keep "weight".
_PACKED_FORMATS = ("pack-quantized", "nvfp4-pack-quantized", "mxfp4-pack-quantized", "mxfp6-pack-quantized")

# Dense columns per packed uint8 column of the packed float formats, as (numerator, denominator).
_PACKED_FLOAT_COLUMNS = {
    "nvfp4-pack-quantized": (2, 1),
    "mxfp4-pack-quantized": (2, 1),
    "mxfp6-pack-quantized": (4, 3),
}

_STANDARD_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Top-level "format" values that name no single quantized format.
_MODEL_FORMATS = ("dense", "mixed-precision")


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
    """Decompress every sparse and quantized module of `tensors`; see `decompress_state_dict`.

    Every module is checked before any is decompressed, so a bad module
    raises before the work on the others is done.
    """
    _check_dtype(dtype)
    quantization = _parse(config)
    force_format = _model_format(config, quantization)
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

    # A config read back names modules the checkpoint need not hold (a tied head).
    plan = plan_compression(classes, quantization, force_format=force_format, warn_unmatched=False)
    status = config.get("quantization_status")
    # A "frozen" checkpoint contains float weights beside their qparams.
    compressed = status != "frozen"

    for module, names in groups.items():
        local = module_tensors(tensors, module, names)
        module_plan = plan.modules.get(module)
        if module_plan is None:
            _check_unplanned(module, local, quantization is None)
        elif not compressed:
            _check_frozen(module, local)
        elif any(key in _COMPRESSED_WEIGHT_NAMES or key in _QUANTIZED_MARKERS for key in local):
            _check_layout(module, local, module_plan.scheme, module_plan.format)

    output: dict[str, torch.Tensor] = {}
    for module, names in groups.items():
        module_plan = plan.modules.get(module)
        local = module_tensors(tensors, module, names)
        if module_plan is None or not any(key in local for key in _COMPRESSED_WEIGHT_NAMES):
            for name in names:
                output[name] = tensors[name]
            continue

        if compressed:
            dense = _decompress_module(module, local, module_plan.scheme, module_plan.format, dtype)
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


def _decompress_module(
    module: str,
    local: dict[str, torch.Tensor],
    scheme: QuantizationScheme,
    format_name: str,
    dtype: torch.dtype | None,
) -> dict[str, torch.Tensor]:
    try:
        return get_format(format_name).decompress(local, scheme, dtype)
    except TensorpressError as error:
        # Format helpers name the local tensor only; add the module.
        if module and module not in str(error):
            raise type(error)(f"{module}: {error}") from None
        raise
    except KeyError as error:
        raise MissingTensorError(
            f"{module}.{error.args[0]} is missing; format {format_name!r} "
            "needs it to decompress the module"
        ) from None
    except (AttributeError, TypeError, ValueError, RuntimeError, IndexError, AssertionError) as error:
        # compressed-tensors raises these for tensors that passed the layout
        # checks but still do not fit together.
        raise InvalidTensorError(
            f"{module}: decompressing with format {format_name!r} failed: {error}. The "
            "module's tensors do not match its config group; check that the config "
            "belongs to these tensors"
        ) from error


def _check_dtype(dtype: object) -> None:
    if dtype is None:
        return
    if not isinstance(dtype, torch.dtype):
        raise InvalidOptionsError(
            f"dtype must be a torch.dtype such as torch.bfloat16, or None, not {dtype!r}"
        )
    if dtype not in _STANDARD_FLOATS:
        raise InvalidOptionsError(
            f"dtype {dtype} cannot hold dequantized weights; use torch.float16, "
            "torch.bfloat16, torch.float32 or torch.float64"
        )


def _model_format(
    config: Mapping[str, Any], quantization: QuantizationConfig | None
) -> str | None:
    """Check the top-level ``format``; return it when it applies to groups without their own."""
    model_format = config.get("format")
    if model_format is None:
        return None
    if model_format not in _MODEL_FORMATS and model_format not in format_names():
        raise UnsupportedFormatError(
            f"quantization_config format {model_format!r} is unknown: expected one of "
            f"{', '.join(sorted({*format_names(), *_MODEL_FORMATS}))}. Pass the "
            "quantization_config that was saved with these tensors"
        )
    if quantization is None or model_format not in QUANTIZED_FORMAT_NAMES:
        return None
    # Configs from older compressed-tensors releases name the format only at
    # the top level, and it then applies to every group.
    if any(scheme.format is not None for scheme in quantization.config_groups.values()):
        return None
    return model_format


def _check_unplanned(module: str, local: Mapping[str, torch.Tensor], no_groups: bool) -> None:
    """Reject compressed tensors in a module that no config group quantizes."""
    if is_sparse_compressed(local):
        raise InvalidOptionsError(
            f"{module} contains sparse-compressed tensors (compressed, bitmask), but the "
            "config has no sparsity_config with a sparse format; pass the "
            "quantization_config that was saved with these tensors"
        )
    marker = next((key for key in _QUANTIZED_MARKERS if key in local), None)
    if marker is None:
        return
    if no_groups:
        reason = "the config has no config_groups"
    else:
        reason = "no config group targets this module (or the ignore list names it)"
    raise InvalidOptionsError(
        f"{module}.{marker} is a quantized tensor, but {reason}; pass the "
        "quantization_config that was saved with these tensors"
    )


def _check_frozen(module: str, local: Mapping[str, torch.Tensor]) -> None:
    """Reject compressed weights under quantization_status "frozen", which keeps float weights."""
    if "weight_packed" in local:
        found = "weight_packed"
    elif "weight" in local and local["weight"].dtype not in _STANDARD_FLOATS:
        found = f"weight (dtype {local['weight'].dtype})"
    else:
        return
    raise InvalidOptionsError(
        f"quantization_status is 'frozen', which stores float weights, but {module}."
        f"{found} is compressed; set quantization_status to 'compressed' or pass the "
        "config that was saved with these tensors"
    )


def _check_layout(
    module: str, local: Mapping[str, torch.Tensor], scheme: QuantizationScheme, format_name: str
) -> None:
    """Check a compressed module's tensor names, shapes and dtypes against its format.

    The expected layout comes from compressing a meta-device weight of the
    module's dense shape, so it is exactly what the format writes.
    """
    weight_name = "weight_packed" if format_name in _PACKED_FORMATS else "weight"
    if weight_name not in local:
        hint = ""
        if "weight" in local and local["weight"].dtype in _STANDARD_FLOATS:
            hint = (
                f" {module}.weight is a float weight; if the checkpoint was saved with "
                "save_compressed=False, set quantization_status to 'frozen'."
            )
        raise MissingTensorError(
            f"{module}.{weight_name} is missing; format {format_name!r} stores the "
            f"quantized weight there.{hint}"
        )
    if format_name == "dense" or scheme.weights is None:
        return
    shape = _dense_shape(module, local, format_name)
    if len(shape) != 2:
        # NOTE: only 2-D weights are checked; compressed-tensors' qparam
        # shapes for other ranks are not modelled here.
        return
    args = scheme.weights
    if args.strategy in (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP):
        if shape[-1] % args.group_size:
            raise InvalidTensorError(
                f"{module}: the dense weight has {shape[-1]} columns, which group_size "
                f"{args.group_size} does not divide, so format {format_name!r} never wrote "
                "these tensors; the tensors and config do not belong together"
            )
        if "weight_g_idx" in local and format_name in ACTORDER_FORMATS and "weight_scale" in local:
            groups = local["weight_scale"].shape[-1]
            check_g_idx(f"{module}.weight_g_idx", local["weight_g_idx"], shape[-1], groups)
    layout = _expected_layout(module, scheme, format_name, shape)
    # The quantized weight first: when it disagrees, the qparams are not the cause.
    for name in sorted(layout, key=lambda name: name != weight_name):
        expected_dtype, expected_shape = layout[name]
        tensor = local.get(name)
        if tensor is None:
            raise MissingTensorError(
                f"{module}.{name} is missing; format {format_name!r} needs it to "
                "decompress the module"
            )
        if tuple(tensor.shape) != expected_shape:
            raise InvalidTensorError(
                f"{module}.{name} has shape {tuple(tensor.shape)}, but format "
                f"{format_name!r} with this config group gives {expected_shape} for a "
                f"{shape} weight; the tensors and config do not belong together"
            )
        if not _dtype_fits(tensor.dtype, expected_dtype, exact=name == weight_name):
            raise InvalidTensorError(
                f"{module}.{name} has dtype {tensor.dtype}, but format {format_name!r} "
                f"writes {expected_dtype}; the tensors and config do not belong together"
            )


def _dense_shape(module: str, local: Mapping[str, torch.Tensor], format_name: str) -> tuple[int, ...]:
    if format_name == "pack-quantized":
        shape = local.get("weight_shape")
        if shape is None:
            raise MissingTensorError(
                f"{module}.weight_shape is missing; format 'pack-quantized' needs the "
                f"dense shape to unpack {module}.weight_packed"
            )
        packed_rank = local["weight_packed"].dim()
        if not _is_integer(shape.dtype) or shape.dim() != 1 or shape.numel() != packed_rank:
            raise InvalidTensorError(
                f"{module}.weight_shape has dtype {shape.dtype} and shape "
                f"{tuple(shape.shape)}; it must be a 1-D integer tensor of {packed_rank} "
                "sizes, the dense weight's shape"
            )
        sizes = tuple(int(size) for size in shape.tolist())
        if any(size < 0 for size in sizes):
            raise InvalidTensorError(
                f"{module}.weight_shape contains {list(sizes)}; sizes cannot be negative"
            )
        return sizes
    if format_name in _PACKED_FLOAT_COLUMNS:
        packed = local["weight_packed"]
        numerator, denominator = _PACKED_FLOAT_COLUMNS[format_name]
        if packed.dim() != 2 or (packed.shape[-1] * numerator) % denominator:
            raise InvalidTensorError(
                f"{module}.weight_packed has shape {tuple(packed.shape)}, which format "
                f"{format_name!r} never writes"
            )
        return (packed.shape[0], packed.shape[1] * numerator // denominator)
    return tuple(local["weight"].shape)


def _expected_layout(
    module: str, scheme: QuantizationScheme, format_name: str, shape: tuple[int, ...]
) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Return name -> (dtype, shape) of what `format_name` writes for a weight of `shape`."""
    args = scheme.weights
    try:
        qparam_shape = expected_qparam_shape(torch.Size(shape), args)
        meta = {
            "weight": torch.empty(shape, device="meta"),
            "weight_scale": torch.empty(qparam_shape, device="meta"),
        }
        if not args.symmetric:
            meta["weight_zero_point"] = torch.empty(qparam_shape, dtype=torch.int8, device="meta")
        if args.strategy == QuantizationStrategy.TENSOR_GROUP:
            meta["weight_global_scale"] = torch.empty(1, device="meta")
        compressed = get_format(format_name).compress(meta, scheme)
    except TensorpressError:
        raise
    except (RuntimeError, ValueError, TypeError, AssertionError, ZeroDivisionError) as error:
        raise InvalidTensorError(
            f"{module}: format {format_name!r} cannot hold a {shape} weight under this "
            f"config group ({error}); the tensors and config do not belong together"
        ) from None
    layout = {name: (tensor.dtype, tuple(tensor.shape)) for name, tensor in compressed.items()}
    packs_zero_point = args.strategy in (QuantizationStrategy.GROUP, QuantizationStrategy.CHANNEL)
    if format_name == "pack-quantized" and "weight_zero_point" in layout and packs_zero_point:
        # pack-quantized packs asymmetric zero points along rows; the meta
        # path of compressed-tensors 0.20 leaves them unpacked.
        packed_rows = math.ceil(qparam_shape[0] * args.num_bits / 32)
        layout["weight_zero_point"] = (torch.int32, (packed_rows, qparam_shape[-1]))
    return layout


def _is_integer(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def _dtype_fits(actual: torch.dtype, expected: torch.dtype, *, exact: bool) -> bool:
    if exact:
        return actual == expected
    # Scales follow the model's float dtype, which a meta weight cannot know.
    if expected in _STANDARD_FLOATS:
        return actual in _STANDARD_FLOATS
    if _is_integer(expected):
        return _is_integer(actual)
    return actual == expected
