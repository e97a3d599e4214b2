"""save_pretrained for Hugging Face transformers models, without patching them.

This is the only module that touches transformers' classes. It reads the
model (state dict, module classes, attached quantization schemes, config)
and hands plain tensors and names to the core.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

from tensorpress.compress import CompressedStateDict, compress_with_plan, forced_format
from tensorpress.errors import InvalidOptionsError
from tensorpress.experts import split_fused_experts
from tensorpress.modules import attention_modules, prepare_module_classes, require_kv_cache_scales
from tensorpress.options import CompressionOptions
from tensorpress.plan import plan_compression, plan_from_schemes, with_default_observers
from tensorpress.sparsity import check_sparsity_options
from tensorpress.writer import atomic_directory, check_shard_size, write_json, write_safetensors_shards

__all__ = ["save_pretrained", "module_types_of", "deduplicate_tied"]

logger = logging.getLogger(__name__)

# transformers 5's default for PreTrainedModel.save_pretrained.
DEFAULT_MAX_SHARD_SIZE = "50GB"

# Arguments of transformers' save_pretrained that change nothing without a
# hub upload or a PEFT model; accepted so that existing calls keep working.
_IGNORED_ARGUMENTS = ("token", "save_peft_format", "save_original_format", "commit_message")


def module_types_of(model: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """Map each module name to its class names, most derived first (the MRO)."""
    return {
        name: tuple(cls.__name__ for cls in type(module).__mro__ if issubclass(cls, torch.nn.Module))
        for name, module in model.named_modules()
    }


def deduplicate_tied(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop later names of tensors that share memory with an earlier one (tied weights).

    transformers writes a tied table once, under the first name in state-dict
    order (for Llama, ``model.embed_tokens.weight`` rather than ``lm_head.weight``).
    """
    seen: set[tuple[int, int, tuple[int, ...], torch.dtype]] = set()
    result: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if tensor.numel() and tensor.device.type != "meta":
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
            if key in seen:
                continue
            seen.add(key)
        result[name] = tensor
    return result


def _attached_schemes(model: torch.nn.Module) -> dict[str, QuantizationScheme]:
    return {
        name: module.quantization_scheme
        for name, module in model.named_modules()
        if isinstance(getattr(module, "quantization_scheme", None), QuantizationScheme)
    }


def _attached_kv_cache_scheme(model: torch.nn.Module) -> QuantizationArgs | None:
    """Return the KV-cache args that compressed-tensors attached to attention modules, if any.

    compressed-tensors gives each attention module a scheme whose input
    activations are the kv_cache_scheme and which has no weights.
    """
    module_classes = module_types_of(model)
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if not isinstance(scheme, QuantizationScheme) or scheme.weights is not None:
            continue
        if scheme.input_activations is not None and name in attention_modules(
            (f"{name}.{child}" for child, _ in module.named_children()), module_classes
        ):
            return scheme.input_activations.model_copy(deep=True)
    return None


def _check_transformers_arguments(kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(kwargs)
    if kwargs.pop("push_to_hub", False):
        raise InvalidOptionsError(
            "push_to_hub=True is not supported: save to a folder, then upload it with "
            "huggingface_hub.upload_folder"
        )
    if kwargs.pop("safe_serialization", True) is False:
        raise InvalidOptionsError(
            "safe_serialization=False is not supported: tensorpress writes safetensors "
            "only, never pickle files"
        )
    if kwargs.pop("distributed_checkpoint", False):
        raise InvalidOptionsError(
            "distributed_checkpoint=True is not supported: gather the model on one "
            "process and call save_pretrained there"
        )
    if "save_function" in kwargs:
        raise InvalidOptionsError(
            "save_function is not supported: tensorpress writes safetensors files itself"
        )
    for name in _IGNORED_ARGUMENTS:
        kwargs.pop(name, None)
    if kwargs:
        raise InvalidOptionsError(
            f"unknown save_pretrained argument(s): {', '.join(sorted(kwargs))}; "
            "tensorpress takes the compression options and transformers' is_main_process, "
            "state_dict, max_shard_size and variant"
        )
    return kwargs


def _config_json(model: torch.nn.Module, quantization_config: dict[str, Any] | None) -> dict[str, Any]:
    # Work on a copy: transformers' own save sets fields on model.config.
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    data = config.to_diff_dict()
    data.pop("quantization_config", None)
    if quantization_config is not None:
        data["quantization_config"] = quantization_config
    return data


def save_pretrained(
    model: torch.nn.Module,
    save_directory: str | os.PathLike[str],
    *,
    quantization: QuantizationConfig | dict[str, Any] | None = None,
    quantization_format: str | None = None,
    sparsity_config: dict[str, Any] | None = None,
    save_compressed: bool = True,
    skip_sparsity_compression_stats: bool = True,
    disable_sparse_compression: bool = False,
    transform_config: dict[str, Any] | None = None,
    is_main_process: bool = True,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    variant: str | None = None,
    **kwargs: Any,
) -> CompressedStateDict:
    """Save a transformers model as a compressed-tensors checkpoint.

    Writes the files transformers' ``save_pretrained`` writes, and never
    pickle files. config.json gains a ``quantization_config`` entry,
    generation_config.json is written when the model has one, weights go to
    safetensors shards with an index past `max_shard_size`, and tied weights
    are written once. The model is not modified.

    Schemes come from `quantization`, or when it is None from the
    ``quantization_scheme`` attributes that llmcompressor and
    compressed-tensors attach to modules (with the qparams they registered).
    A model with neither is saved dense, without a quantization_config.

    The save is atomic: files go to a temporary sibling folder that replaces
    `save_directory` only when complete. Non-weight files already in
    `save_directory` (a tokenizer, say) are kept; old weight shards are not.

    Args:
        model: a transformers ``PreTrainedModel`` (any torch module with a
            ``config`` attribute works).
        save_directory: the folder to write.
        quantization, quantization_format, sparsity_config, save_compressed,
        skip_sparsity_compression_stats, disable_sparse_compression,
        transform_config: see `CompressionOptions`.
        is_main_process, state_dict, max_shard_size, variant: as in
            transformers. Other transformers arguments that only matter for
            hub uploads (token, ...) are accepted and ignored; push_to_hub,
            safe_serialization=False and save_function are rejected.

    Returns:
        The `CompressedStateDict` that was written.

    Raises:
        InvalidOptionsError: an option or argument is invalid or unknown.
        InvalidTensorError, MissingTensorError: see `compress_state_dict`.

    Example:
        >>> import tempfile, torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from tensorpress import CompressionOptions, save_pretrained
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=256,
        ...     num_hidden_layers=1, num_attention_heads=4, vocab_size=64))
        >>> options = CompressionOptions.for_scheme("W4A16", ignore=["lm_head"])
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     result = save_pretrained(model, folder, quantization=options.quantization)
        >>> result.config["format"]
        'pack-quantized'
    """
    _check_transformers_arguments(kwargs)
    if not hasattr(model, "config") or not hasattr(model.config, "to_diff_dict"):
        raise InvalidOptionsError(
            f"save_pretrained needs a transformers model with a config, got "
            f"{type(model).__name__}; for other modules call compress_state_dict on "
            "module.state_dict() and write the tensors yourself"
        )
    check_shard_size(max_shard_size)
    options = CompressionOptions(
        quantization=quantization,
        quantization_format=quantization_format,
        sparsity_config=sparsity_config,
        save_compressed=save_compressed,
        skip_sparsity_compression_stats=skip_sparsity_compression_stats,
        disable_sparse_compression=disable_sparse_compression,
        transform_config=transform_config,
    )

    tensors = deduplicate_tied(state_dict if state_dict is not None else model.state_dict())
    # transformers 5 keeps experts fused in memory, so split them per expert under saved names.
    experts = split_fused_experts(tensors, module_types_of(model), getattr(model.config, "model_type", None))
    tensors = experts.state_dict
    module_classes = prepare_module_classes(tensors, experts.module_types)

    attached = _attached_schemes(model) if quantization is None else {}
    if attached:
        schemes = {name: with_default_observers(scheme.model_copy(deep=True)) for name, scheme in attached.items()}
        # Modules matched by one config group share one scheme object; keep that sharing.
        by_identity = {id(scheme): copy_ for scheme, copy_ in zip(attached.values(), schemes.values())}
        shared = {name: by_identity[id(scheme)] for name, scheme in attached.items()}
        plan = plan_from_schemes(module_classes, shared, force_format=forced_format(options))
        plan.kv_cache_scheme = _attached_kv_cache_scheme(model)
    else:
        plan = plan_compression(
            module_classes,
            options.quantization,
            force_format=forced_format(options),
            aliases=experts.aliases(module_classes),
        )

    check_sparsity_options(options)
    require_kv_cache_scales(tensors, module_classes, plan.kv_cache_scheme)
    experts.rename_ignore(plan)
    result = compress_with_plan(tensors, plan, options, module_classes=module_classes)
    if experts.layout.renames or experts.split:
        result = CompressedStateDict(
            tensors=MappingProxyType(experts.checkpoint_tensors(result.tensors)), config=result.config
        )

    if not is_main_process:
        return result

    filename_pattern = "model{suffix}.safetensors" if variant is None else f"model{{suffix}}.{variant}.safetensors"
    with atomic_directory(save_directory) as staging:
        write_json(staging / "config.json", _config_json(model, result.config))
        generation_config = getattr(model, "generation_config", None)
        can_generate = getattr(model, "can_generate", lambda: False)()
        if generation_config is not None and can_generate:
            generation_config.save_pretrained(staging)
        write_safetensors_shards(
            Path(staging), result.tensors, max_shard_size=max_shard_size, filename_pattern=filename_pattern
        )
    logger.info("saved %d tensors to %s", len(result.tensors), save_directory)
    return result
