"""The compression plan: the scheme and format of each module, shared by every route.

The plan needs only module names and class names, never tensors, so the
in-memory route and the checkpoint-folder route build the same one.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
)
from compressed_tensors.quantization.quant_config import get_vllm_module_type

from tensorpress.errors import UnsupportedFormatError
from tensorpress.formats.quantized import QUANTIZED_FORMAT_NAMES, fits, infer_module_format
from tensorpress.names import match_name, matches, matching_targets

logger = logging.getLogger(__name__)

__all__ = [
    "ModulePlan",
    "CompressionPlan",
    "plan_compression",
    "plan_from_schemes",
    "with_default_observers",
    "COMPRESSIBLE_CLASSES",
]

# compressed-tensors quantizes modules of these classes (and their subclasses).
COMPRESSIBLE_CLASSES = ("Linear", "LinearBase", "Embedding")


@dataclass(frozen=True)
class ModulePlan:
    """One quantized module: its scheme (with ``format`` filled in) and format name."""

    name: str
    scheme: QuantizationScheme
    format: str


@dataclass
class CompressionPlan:
    """Schemes, formats and the ignore list for a whole model."""

    modules: dict[str, ModulePlan] = field(default_factory=dict)
    schemes: list[QuantizationScheme] = field(default_factory=list)
    model_format: str = "dense"
    ignore: list[str] = field(default_factory=list)
    kv_cache_scheme: QuantizationArgs | None = None
    # Modules that a target names exactly but that cannot be quantized (not
    # Linear or Embedding); compression raises if such a module has a weight.
    named_but_unquantizable: list[str] = field(default_factory=list)


def _is_compressible(classes: tuple[str, ...]) -> bool:
    return any(cls in COMPRESSIBLE_CLASSES for cls in classes)


def plan_compression(
    module_classes: Mapping[str, tuple[str, ...]],
    config: QuantizationConfig | None,
    *,
    force_format: str | None = None,
    aliases: Mapping[str, str] | None = None,
    warn_unmatched: bool = True,
) -> CompressionPlan:
    """Match every module against `config` as compressed-tensors does.

    `module_classes` maps each module name, in model order, to its class
    names (most derived first). A module gets the scheme of its most specific
    matching target (exact name, then regex, then class) unless an ignore
    entry matches it. Only Linear and Embedding modules are quantized. The
    ignore list written to the config names every module of a quantized
    class (by vLLM's reading: routers and gates count as Linear) that was
    left unquantized, as ``QuantizationConfig.from_pretrained`` does.

    `aliases` maps a module name to its name in the checkpoint where the two
    differ (transformers renames Mixtral's ``mlp`` to ``block_sparse_moe`` on
    save). Target and ignore entries match either name, because callers
    write them against the model and configs read back from checkpoints use
    the saved names.
    """
    if config is None:
        return CompressionPlan()

    # Later groups win for a target listed twice, as in compressed-tensors.
    target_to_scheme: OrderedDict[str, QuantizationScheme] = OrderedDict()
    for scheme in config.config_groups.values():
        scheme = with_default_observers(scheme.model_copy(deep=True))
        for target in scheme.targets:
            target_to_scheme[target] = scheme
    ignore_entries = list(config.ignore or [])

    aliases = aliases or {}
    assigned = {
        name: _scheme_for(name, classes, target_to_scheme, ignore_entries, aliases.get(name))
        for name, classes in module_classes.items()
    }
    plan = plan_from_schemes(module_classes, assigned, force_format=force_format)
    plan.kv_cache_scheme = config.kv_cache_scheme
    if warn_unmatched:
        _warn_unmatched(module_classes, aliases, list(target_to_scheme), "target")
        _warn_unmatched(module_classes, aliases, ignore_entries, "ignore entry")
    exact_targets = [target for target in target_to_scheme if not target.startswith("re:")]
    for name, classes in module_classes.items():
        names = (name,) if name not in aliases else (name, aliases[name])
        if _is_compressible(classes) or not any(each in exact_targets for each in names):
            continue
        if not any(matches(each, classes, ignore_entries) for each in names):
            plan.named_but_unquantizable.append(name)
    return plan


def plan_from_schemes(
    module_classes: Mapping[str, tuple[str, ...]],
    schemes: Mapping[str, QuantizationScheme | None],
    *,
    force_format: str | None = None,
) -> CompressionPlan:
    """Build the plan from a scheme already chosen for each module (None: unquantized).

    Modules that share one scheme object share one config group, and the
    first of them settles its format, as in compressed-tensors'
    ``infer_model_format``. The caller's scheme objects are not modified.
    """
    plan = CompressionPlan()
    copies: dict[int, QuantizationScheme] = {}
    formats: set[str] = set()
    quantized_types: set[str] = set()
    unquantized: list[tuple[str, str]] = []

    for name, classes in module_classes.items():
        vllm_type = get_vllm_module_type(classes[0]) if classes else "Module"
        original = schemes.get(name)
        if original is None or not _is_compressible(classes):
            unquantized.append((name, vllm_type))
            continue

        scheme = copies.get(id(original))
        if scheme is None:
            scheme = original.model_copy(deep=True)
            scheme.format = force_format or scheme.format or infer_module_format(classes, scheme)
            check_format_fits(name, classes, scheme)
            copies[id(original)] = scheme
        if scheme not in plan.schemes:
            plan.schemes.append(scheme)

        plan.modules[name] = ModulePlan(name=name, scheme=scheme, format=scheme.format)
        quantized_types.add(vllm_type)
        if scheme.format != "dense":
            formats.add(scheme.format)

    plan.ignore = [name for name, vllm_type in unquantized if vllm_type in quantized_types]
    if force_format is not None and plan.modules:
        plan.model_format = force_format
    elif len(formats) == 1:
        plan.model_format = next(iter(formats))
    elif len(formats) > 1:
        plan.model_format = "mixed-precision"
    return plan


def check_format_fits(name: str, classes: tuple[str, ...], scheme: QuantizationScheme) -> None:
    """Reject a chosen format that cannot store the scheme's weights.

    llmcompressor only warns here ("Compression may fail") and writes wrong
    values; a forced pack-quantized on FP8 weights, say, loses the weights.
    """
    chosen = scheme.format
    if chosen == "dense" or chosen not in QUANTIZED_FORMAT_NAMES:
        return
    if not fits(chosen, classes, scheme):
        inferred = infer_module_format(classes, scheme)
        raise UnsupportedFormatError(
            f"{name}: format {chosen!r} cannot store this scheme's weights "
            f"({scheme.weights.type if scheme.weights else 'no'} {scheme.weights.num_bits if scheme.weights else ''}-bit); "
            f"use {inferred!r} or leave the format unset to infer it"
        )


def with_default_observers(scheme: QuantizationScheme) -> QuantizationScheme:
    """Fill unset observers as llmcompressor 0.14 does before calibrating.

    Static weights get "memoryless_minmax" (the min/max this library computes
    when qparams are absent) and static activations "minmax". The observer is
    only recorded in the config; it changes no tensor.
    """
    for field, default in (
        ("weights", "memoryless_minmax"),
        ("input_activations", "minmax"),
        ("output_activations", "minmax"),
    ):
        args = getattr(scheme, field)
        if args is None or args.observer is not None:
            continue
        if args.dynamic is not True:
            args.observer = default
    return scheme


def _warn_unmatched(
    module_classes: Mapping[str, tuple[str, ...]],
    aliases: Mapping[str, str],
    entries: list[str],
    label: str,
) -> None:
    # compressed-tensors warns the same way; a typo otherwise yields a dense
    # checkpoint (or a quantized lm_head) without a word.
    for entry in entries:
        if not any(
            matches(each, classes, [entry])
            for name, classes in module_classes.items()
            for each in ((name,) if name not in aliases else (name, aliases[name]))
        ):
            logger.warning("quantization %s %r matches no module", label, entry)


def _scheme_for(
    name: str,
    classes: tuple[str, ...],
    target_to_scheme: Mapping[str, QuantizationScheme],
    ignore: Iterable[str],
    alias: str | None = None,
) -> QuantizationScheme | None:
    if not _is_compressible(classes):
        return None
    names = (name,) if alias is None else (name, alias)
    if not any(matches(each, classes, target_to_scheme) for each in names):
        return None
    if any(matches(each, classes, ignore) for each in names):
        return None
    # An exact name or regex matching either name beats a class target.
    found = [target for each in names for target in matching_targets(each, classes, target_to_scheme)]
    by_name = [target for target in found if any(match_name(each, target) for each in names)]
    return target_to_scheme[(by_name or found)[0]]
