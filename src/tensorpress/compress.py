"""compress_state_dict and decompress_state_dict: the pure core."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from compressed_tensors.quantization import QuantizationScheme, QuantizationStatus

from tensorpress.arrays import as_tensor_mapping, check_return_type, to_numpy_mapping
from tensorpress.config import build_config
from tensorpress.experts import split_fused_experts
from tensorpress.errors import InvalidOptionsError, InvalidTensorError, TensorpressError
from tensorpress.formats import get_format
from tensorpress.concurrency import map_in_order, resolve_workers
from tensorpress.modules import (
    check_weight,
    fill_weight_qparams,
    module_tensors,
    prepare_module_classes,
    require_activation_qparams,
    require_kv_cache_scales,
    shared_global_scales,
)
from tensorpress.names import ModuleTypes, group_by_module, split_name
from tensorpress.options import CompressionOptions
from tensorpress.plan import CompressionPlan, plan_compression
from tensorpress.sparsity import ZeroCounter, check_sparsity_options, plan_sparsity

__all__ = [
    "CompressedStateDict",
    "compress_state_dict",
    "compress_with_plan",
    "compress_module",
    "decompress_state_dict",
    "forced_format",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompressedStateDict:
    """The result of `compress_state_dict`.

    Attributes:
        tensors: read-only mapping of tensor name to the exact tensor to write.
        config: the dict that goes under ``quantization_config`` in
            config.json, or None when nothing was quantized or sparsified.
    """

    tensors: Mapping[str, torch.Tensor]
    config: dict[str, Any] | None


def _coerce_options(options: CompressionOptions | Mapping[str, Any] | None) -> CompressionOptions:
    if options is None:
        return CompressionOptions()
    if isinstance(options, CompressionOptions):
        return options
    if isinstance(options, Mapping):
        return CompressionOptions(**options)
    raise InvalidOptionsError(
        f"options must be CompressionOptions, a dict or None, not {type(options).__name__}"
    )


def _check_state_dict(state_dict: Mapping[str, Any]) -> None:
    if not isinstance(state_dict, Mapping):
        raise InvalidTensorError(
            f"state_dict must be a mapping of tensor names to tensors, not "
            f"{type(state_dict).__name__}"
        )
    for name, tensor in state_dict.items():
        if not isinstance(name, str):
            raise InvalidTensorError(f"tensor name {name!r} is not a string")
        if not isinstance(tensor, torch.Tensor):
            raise InvalidTensorError(
                f"{name}: expected a torch.Tensor, got {type(tensor).__name__}"
            )


def compress_state_dict(
    state_dict: Mapping[str, Any],
    options: CompressionOptions | Mapping[str, Any] | None = None,
    *,
    module_types: ModuleTypes | None = None,
    return_type: str = "torch",
    model_type: str | None = None,
    workers: int | None = None,
) -> CompressedStateDict:
    """Compress a state dict into the tensors and config of a compressed-tensors checkpoint.

    Modules are matched against ``options.quantization`` the way
    compressed-tensors matches a model: ``targets`` and ``ignore`` entries
    are exact module names, ``re:`` regexes or class names. Class names come
    from `module_types` (module name -> class name, or class names most
    derived first). Modules missing from it, or all modules when it is None,
    get a class guessed from the name and weight shape. A 2-D weight is an
    ``Embedding`` when the module's last name part contains "embed" (or is
    wte, wpe, shared, tok_embeddings), and a ``Linear`` otherwise.

    A quantized module uses the qparams it carries (``weight_scale``,
    ``weight_zero_point``, ``weight_global_scale``, ``input_scale``, ...).
    When ``weight_scale`` is absent, weight qparams are computed from min/max
    as llmcompressor's default observer computes them in a data-free run.

    The inputs are never modified; the same inputs give the same bytes.

    Args:
        state_dict: tensor name -> tensor, as ``model.state_dict()`` returns.
            Values may also be numpy arrays (bfloat16 and float8 through
            ml_dtypes), and the mapping may be lazy, such as an open
            ``safe_open`` file; see `tensorpress.arrays.as_tensor_mapping`.
        options: `CompressionOptions`, its dict form, or None for defaults.
        module_types: optional module name -> class name(s).
        return_type: "torch" for torch tensors, or "numpy" for numpy arrays
            (bfloat16 and float8 outputs then need ml_dtypes).
        model_type: config.json's ``model_type`` ("qwen3_moe", "mixtral", ...),
            which selects how fused 3-D expert tensors split and how names
            are saved (see `tensorpress.experts`). None splits experts by
            transformers' default layout, checked against their shapes.
        workers: modules compressed at once, on threads; None uses
            ``torch.get_num_threads()``. The bytes do not depend on it.

    Returns:
        `CompressedStateDict` with the tensors to write and the config entry.

    Raises:
        InvalidOptionsError: the options are invalid.
        InvalidTensorError: a weight has a dtype, shape or value its scheme
            cannot take.
        MissingTensorError: a static activation scheme lacks its scale.

    Example:
        >>> import torch
        >>> from tensorpress import CompressionOptions, compress_state_dict
        >>> weights = {"proj.weight": torch.randn(64, 128)}
        >>> result = compress_state_dict(weights, CompressionOptions.for_scheme("W4A16"))
        >>> sorted(result.tensors)
        ['proj.weight_packed', 'proj.weight_scale', 'proj.weight_shape']
        >>> result.config["format"]
        'pack-quantized'
    """
    options = _coerce_options(options)
    check_return_type(return_type)
    # Numpy arrays become tensors and lazy sources are read on access; both
    # raise InvalidTensorError for names and values _check_state_dict rejects.
    state_dict = as_tensor_mapping(state_dict)
    check_sparsity_options(options)

    experts = split_fused_experts(state_dict, module_types, model_type)
    module_classes = prepare_module_classes(experts.state_dict, experts.module_types)
    plan = plan_compression(
        module_classes,
        options.quantization,
        force_format=forced_format(options),
        aliases=experts.aliases(module_classes),
    )
    require_kv_cache_scales(experts.state_dict, module_classes, plan.kv_cache_scheme)
    experts.rename_ignore(plan)
    result = compress_with_plan(
        experts.state_dict, plan, options, module_classes=module_classes, workers=workers
    )
    if experts.layout.renames or experts.split:
        tensors = MappingProxyType(experts.checkpoint_tensors(result.tensors))
        result = CompressedStateDict(tensors=tensors, config=result.config)
    if return_type == "numpy":
        numpy_tensors = MappingProxyType(to_numpy_mapping(result.tensors))
        return CompressedStateDict(tensors=numpy_tensors, config=result.config)
    return result


def compress_with_plan(
    state_dict: Mapping[str, torch.Tensor],
    plan: CompressionPlan,
    options: CompressionOptions,
    *,
    module_classes: Mapping[str, tuple[str, ...]] | None = None,
    workers: int | None = None,
) -> CompressedStateDict:
    """Compress `state_dict` with schemes already assigned to modules.

    `compress_state_dict` builds the plan from target matching; adapters that
    know each module's scheme (such as models that llmcompressor quantized)
    build it with `tensorpress.plan.plan_from_schemes`. `module_classes`
    (module name -> class names, as the plan was built from) lets the
    sparsity options match class targets; None guesses classes from names
    and weight shapes. `workers` modules are compressed at once on threads
    (torch releases the GIL in its kernels); None uses
    ``torch.get_num_threads()``. The bytes do not depend on it.
    """
    _reject_named_unquantizable(state_dict, plan)
    global_scales = shared_global_scales(state_dict, plan)
    if module_classes is None:
        module_classes = prepare_module_classes(state_dict, None)
    sparsity = plan_sparsity(state_dict, module_classes, plan, options)
    zero_counter = ZeroCounter() if sparsity is not None and sparsity.counts_zeros else None

    uncompressed = options.model_copy(update={"save_compressed": False})

    def compress_one(
        module: str, module_input: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor]]:
        counted = None
        if zero_counter is not None:
            # llmcompressor counts the weight qparams registered on the model
            # in global_sparsity, so count after filling them in.
            module_input = compress_module(
                module, module_input, plan, uncompressed, global_scale=global_scales.get(module)
            )
            counted = module_input
        compressed = compress_module(
            module, module_input, plan, options, global_scale=global_scales.get(module)
        )
        if sparsity is not None:
            compressed = sparsity.compress_module(module, compressed)
        return counted, compressed

    # The state dict is read on this thread (lazy sources need not be
    # thread-safe), and results are merged in module order, so the output
    # is the same for any number of workers.
    inputs = (
        (module, {name: state_dict[name] for name in names})
        for module, names in group_by_module(state_dict).items()
    )
    output: dict[str, torch.Tensor] = {}
    for counted, compressed in map_in_order(compress_one, inputs, resolve_workers(workers)):
        if counted is not None:
            zero_counter.add(counted.values())
        output.update(compressed)

    sparsity_config = sparsity.config(zero_counter) if sparsity is not None else None
    config = _config_entry(plan, options, sparsity_config)
    if config is not None:
        mark_group_actorder(config, plan, output)
    return CompressedStateDict(tensors=MappingProxyType(output), config=config)


def _reject_named_unquantizable(state_dict: Mapping[str, torch.Tensor], plan: CompressionPlan) -> None:
    # Class and regex targets skip such modules, as in compressed-tensors; an
    # exact name is a request for that module, so skipping it would be silent.
    for name in plan.named_but_unquantizable:
        weight_name = f"{name}.weight" if name else "weight"
        if weight_name not in state_dict:
            continue
        shape = tuple(state_dict[weight_name].shape)
        raise InvalidTensorError(
            f"{name} is a quantization target by name, but only Linear and Embedding "
            f"modules with a 2-D weight can be quantized and {weight_name} has shape "
            f"{shape}; remove it from the targets, or pass module_types if it is a Linear"
        )


def compress_module(
    module: str,
    tensors: Mapping[str, torch.Tensor],
    plan: CompressionPlan,
    options: CompressionOptions,
    *,
    global_scale: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """Compress one module's tensors by its entry in `plan`; a module outside the plan passes through.

    `tensors` and the result are keyed by full tensor name. `global_scale`
    is the NVFP4 global scale shared with fused partners (see
    `shared_global_scales`), or None to compute it from this module alone.
    tensorpress.checkpoint calls this once per module, so both routes write
    the same bytes.
    """
    module_plan = plan.modules.get(module)
    if module_plan is None:
        return dict(tensors)
    compressed = _compress_module(
        module,
        module_tensors(tensors, module, list(tensors)),
        module_plan.scheme,
        module_plan.format,
        save_compressed=options.save_compressed,
        global_scale=global_scale,
    )
    prefix = f"{module}." if module else ""
    return {prefix + local: tensor for local, tensor in compressed.items()}


def config_entry(plan: CompressionPlan, options: CompressionOptions) -> dict[str, Any] | None:
    """Return the ``quantization_config`` entry for `plan`, or None when nothing is quantized."""
    return _config_entry(plan, options)


def check_options(options: CompressionOptions | Mapping[str, Any] | None) -> CompressionOptions:
    """Return `options` as CompressionOptions; raise for options the folder route lacks.

    The checkpoint-folder route compresses one module at a time and does not
    implement sparsity yet, so it rejects the sparsity options rather than
    write dense weights silently.
    """
    options = _coerce_options(options)
    check_sparsity_options(options)
    if options.sparsity_config is not None or not options.skip_sparsity_compression_stats:
        # NOTE: compress_state_dict and save_pretrained implement sparsity. The
        # folder route would need a pass over every weight before writing.
        raise InvalidOptionsError(
            "sparse compression (sparsity_config, skip_sparsity_compression_stats="
            "False) is not implemented for checkpoint folders yet; load the model and "
            "use compress_state_dict or save_pretrained, or remove those options"
        )
    return options


def forced_format(options: CompressionOptions) -> str | None:
    """Return the format every quantized module must use, or None to infer it."""
    if not options.save_compressed:
        return options.quantization_format or "dense"
    return options.quantization_format


def _compress_module(
    module: str,
    tensors: dict[str, torch.Tensor],
    scheme: QuantizationScheme,
    format_name: str,
    *,
    save_compressed: bool,
    global_scale: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    if scheme.weights is not None and "weight" in tensors:
        check_weight(module, tensors["weight"], scheme)
        tensors = fill_weight_qparams(module, tensors, scheme, global_scale)
    require_activation_qparams(module, tensors, scheme)

    if not save_compressed:
        return tensors
    try:
        return get_format(format_name).compress(tensors, scheme)
    except TensorpressError:
        raise
    except (RuntimeError, ValueError, AssertionError) as error:
        raise InvalidTensorError(
            f"{module}: compressing with format {format_name!r} failed: {error}"
        ) from error


def mark_group_actorder(
    config: dict[str, Any], plan: CompressionPlan, tensors: Mapping[str, torch.Tensor]
) -> None:
    """Write ``actorder: "group"`` for config groups whose modules carry ``weight_g_idx``.

    Loaders read ``weight_g_idx`` only when the config declares group
    activation ordering. With ``actorder: null`` they would load the weight
    with the wrong column scales and raise nothing. compressed-tensors 0.20
    rejects "group" when parsing, so such a checkpoint fails loudly there
    instead of loading wrong values.
    """
    for index, scheme in enumerate(plan.schemes):
        if any(
            module_plan.scheme is scheme and f"{name}.weight_g_idx" in tensors
            for name, module_plan in plan.modules.items()
        ):
            group = config["config_groups"][f"group_{index}"]
            if group.get("weights"):
                group["weights"]["actorder"] = "group"


def _config_entry(
    plan: CompressionPlan,
    options: CompressionOptions,
    sparsity_config: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    kv_cache_scheme = plan.kv_cache_scheme
    if not plan.schemes and kv_cache_scheme is None and sparsity_config is None:
        return None
    status = QuantizationStatus.COMPRESSED if options.save_compressed else QuantizationStatus.FROZEN
    return build_config(
        schemes=plan.schemes,
        model_format=plan.model_format,
        status=status,
        ignore=plan.ignore,
        kv_cache_scheme=kv_cache_scheme,
        sparsity_config=sparsity_config,
        transform_config=options.transform_config,
    )


def decompress_state_dict(
    tensors: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    *,
    module_types: ModuleTypes | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Turn compressed tensors back into a dense (fake-quantized) state dict.

    `config` is the ``quantization_config`` entry of config.json (or
    ``CompressedStateDict.config``). Quantized modules get a float ``weight``
    equal to the dequantized values; their qparams are dropped, so the
    result loads into a model without quantization support. Other
    tensors pass through unchanged.

    Args:
        tensors: the compressed tensors, name -> tensor.
        config: the quantization_config entry.
        module_types: optional module name -> class name(s), as for
            `compress_state_dict`.
        dtype: cast dequantized weights to this dtype. None keeps what
            dequantization gives: the scale's dtype, or bfloat16 for the fp4
            and fp6 formats, whose scales do not record the model's dtype.

    Raises:
        InvalidOptionsError: the config is not a compressed-tensors config.
        MissingTensorError: a quantized module lacks a tensor its format needs.

    Example:
        >>> import torch
        >>> from tensorpress import CompressionOptions, compress_state_dict, decompress_state_dict
        >>> result = compress_state_dict(
        ...     {"proj.weight": torch.randn(8, 128)}, CompressionOptions.for_scheme("W8A16"))
        >>> dense = decompress_state_dict(result.tensors, result.config)
        >>> dense["proj.weight"].shape
        torch.Size([8, 128])
    """
    from tensorpress.decompress import decompress_tensors

    _check_state_dict(tensors)
    if not isinstance(config, Mapping):
        raise InvalidOptionsError(
            f"config must be the quantization_config dict, not {type(config).__name__}"
        )
    return decompress_tensors(tensors, config, module_types=module_types, dtype=dtype)
