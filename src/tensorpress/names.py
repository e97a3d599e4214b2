"""Module names, module kinds and target matching over plain tensor names.

compressed-tensors matches a config's ``targets`` and ``ignore`` entries
against a module tree: an entry is an exact module name, a ``re:`` regex
matched from the start of the name, or a class name found in the module's
class hierarchy. Without a module tree, the class names come from a
``module_types`` mapping or from `infer_module_types`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache

import torch

__all__ = [
    "split_name",
    "group_by_module",
    "infer_module_types",
    "matches",
    "matching_targets",
    "ModuleTypes",
]

# Module name -> its class name, or its class names from most to least derived
# (a module's MRO), so a target such as "Linear" also matches subclasses.
ModuleTypes = Mapping[str, "str | Sequence[str]"]

# Last name parts that hold an embedding table, beyond those containing "embed".
_EMBEDDING_NAMES = frozenset({"wte", "wpe", "shared", "tok_embeddings"})


def split_name(tensor_name: str) -> tuple[str, str]:
    """Split "model.layers.0.q_proj.weight" into ("model.layers.0.q_proj", "weight")."""
    module, _, local = tensor_name.rpartition(".")
    return module, local


def group_by_module(names: Iterable[str]) -> dict[str, list[str]]:
    """Group tensor names by module name, keeping the order of first appearance."""
    groups: dict[str, list[str]] = {}
    for name in names:
        module, _ = split_name(name)
        groups.setdefault(module, []).append(name)
    return groups


def infer_module_kind(module_name: str, weight: torch.Tensor | None) -> str:
    """Guess a module's class name from its name and the shape of its weight.

    The rule: a 2-D ``weight`` is an "Embedding" when the last part of the
    module name contains "embed" (any case) or is one of wte, wpe, shared,
    tok_embeddings, and a "Linear" otherwise. Anything else (1-D norms and
    biases, 3-D or 4-D weights, modules without a weight) is "Module", which no
    class target but "Module" matches.
    """
    if weight is None or weight.dim() != 2:
        return "Module"
    last = module_name.rpartition(".")[2]
    if "embed" in last.lower() or last in _EMBEDDING_NAMES:
        return "Embedding"
    return "Linear"


def infer_module_types(state_dict: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Map every module that owns a tensor in `state_dict` to a guessed class name.

    See `infer_module_kind` for the rule.
    """
    kinds: dict[str, str] = {}
    for module, names in group_by_module(state_dict).items():
        weight_name = f"{module}.weight" if module else "weight"
        weight = state_dict[weight_name] if weight_name in names else None
        kinds[module] = infer_module_kind(module, weight)
    return kinds


def class_names(module_types: ModuleTypes, module: str) -> tuple[str, ...]:
    """Return the class names of `module`, most derived first; empty when unknown."""
    value = module_types.get(module)
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


@lru_cache(maxsize=4096)
def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def match_name(name: str, target: str) -> bool:
    """Match an exact module name or a "re:" regex (matched from the start)."""
    if target.startswith("re:"):
        return _compile(target[3:]).match(name) is not None
    return target == name


def match_class(classes: Sequence[str], target: str) -> bool:
    """Match a class name; vLLM's LinearBase counts as Linear, as in compressed-tensors."""
    return any(cls == target or (cls == "LinearBase" and target == "Linear") for cls in classes)


def matches(name: str, classes: Sequence[str], targets: Iterable[str]) -> bool:
    """Return True when any of `targets` matches the module by name or class."""
    return any(match_name(name, target) or match_class(classes, target) for target in targets)


def matching_targets(name: str, classes: Sequence[str], targets: Iterable[str]) -> list[str]:
    """Return the targets that match a module, most specific first.

    Exact names come first, then regexes, then class names, the order in
    which compressed-tensors picks the scheme of a module matched by several.
    """
    ordered = sorted(targets, key=lambda target: ("re:" in target, target))
    found = [target for target in ordered if match_name(name, target)]
    found += [
        target for target in ordered if match_class(classes, target) and target not in found
    ]
    return found
