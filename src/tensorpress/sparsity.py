"""The sparsity config: its inference from weights, its plan, and a per-layer report.

The rules follow llmcompressor 0.10.0.4 (``SparsityConfigMetadata`` and
``transformers/compression/helpers.py``), the last release that wrote sparse
checkpoints:

- ``global_sparsity`` is the fraction of exact zeros over every tensor of
  the model right before compression, weight qparams included;
- the structure is "2:4" when more than 80 % of Linear weights have at least
  two zeros in every group of four consecutive values, else "unstructured";
- a layer is a target when its weight has a sparsity of at least 0.49 and
  follows the structure. `reduce_targets_and_ignore` shortens the lists
  per module class;
- the inferred format is "sparse-24-bitmask" for 2:4 weights that are
  unquantized or quantized to 8 bits (weights and activations, int or
  float), and "dense" otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from compressed_tensors.quantization import QuantizationScheme, QuantizationType

from tensorpress.errors import InvalidOptionsError
from tensorpress.formats.sparse import (
    SPARSE_24_BITMASK,
    SPARSE_FORMAT_NAMES,
    SPARSE_TENSOR_NAMES,
    compress_sparse_weight,
    decompress_sparse_weight,
    is_sparse_compressed,
)
from tensorpress.names import group_by_module, match_class, matches
from tensorpress.options import CompressionOptions
from tensorpress.plan import CompressionPlan

__all__ = [
    "SPARSITY_THRESHOLD",
    "SparsityPlan",
    "ZeroCounter",
    "LayerSparsity",
    "check_sparsity_options",
    "plan_sparsity",
    "tensor_sparsity",
    "follows_structure",
    "detect_structure",
    "infer_sparsity_structure",
    "infer_targets_and_ignore",
    "reduce_targets_and_ignore",
    "supports_sparse_24_bitmask",
    "decompress_sparse_modules",
    "sparsity_report",
]

logger = logging.getLogger(__name__)

# A layer whose weight has at least this fraction of zeros is a sparse target.
SPARSITY_THRESHOLD = 0.49
# The structure is "2:4" when more than this share of Linear weights follows it.
STRUCTURE_SHARE = 0.8
TWO_FOUR = "2:4"
UNSTRUCTURED = "unstructured"
# Group sizes that `detect_structure` tries, smallest first.
_GROUP_SIZES = (4, 8, 16, 32)
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _zero_mask(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dtype in _FP8_DTYPES:
        tensor = tensor.to(torch.float32)
    return tensor == 0


def tensor_sparsity(tensor: torch.Tensor) -> float:
    """Return the fraction of exact zeros, computed in float32 as llmcompressor does."""
    if tensor.numel() == 0:
        return 0.0
    zeros = _zero_mask(tensor).sum()
    return (zeros.float() / float(tensor.numel())).item()


def _parse_structure(structure: str) -> tuple[int, int] | None:
    """Return (n, m) for an "n:m" structure, or None for "unstructured"."""
    if structure.strip().lower() == UNSTRUCTURED:
        return None
    try:
        zeros, group = (int(part) for part in structure.split(":"))
    except ValueError:
        raise InvalidOptionsError(
            f"sparsity_structure {structure!r} is invalid: use 'unstructured' or 'N:M' "
            "such as '2:4'"
        ) from None
    return zeros, group


def follows_structure(tensor: torch.Tensor, structure: str) -> bool:
    """Return True when every group of m consecutive values contains at least n zeros.

    Groups run over the flattened tensor, as in llmcompressor; a tensor whose
    size is not a multiple of m does not follow the structure. Every tensor
    follows "unstructured" and "0:0".
    """
    parsed = _parse_structure(structure)
    if parsed is None:
        return True
    zeros, group = parsed
    if zeros == 0 or group == 0:
        return True
    if tensor.numel() % group:
        return False
    zero_counts = _zero_mask(tensor).reshape(-1, group).sum(dim=1)
    return bool((zero_counts >= zeros).all())


def detect_structure(weight: torch.Tensor) -> str:
    """Return the tightest N:M structure a weight follows, or "unstructured".

    Groups of 4, 8, 16 and 32 consecutive values along each row are tried in
    that order. The first group size M whose fullest group has N <= M / 2
    nonzeros gives "N:M", for example "2:4", "1:4" or "4:8". This looks beyond the 2:4 that compressed-tensors records, so that
    callers can report other N:M structures.
    """
    if weight.dim() < 1 or weight.numel() == 0:
        return UNSTRUCTURED
    nonzero = ~_zero_mask(weight)
    columns = weight.shape[-1]
    for group in _GROUP_SIZES:
        if columns % group:
            continue
        fullest = int(nonzero.reshape(-1, group).sum(dim=1).max())
        if fullest <= group // 2:
            return f"{fullest}:{group}"
    return UNSTRUCTURED


def _weight(state_dict: Mapping[str, torch.Tensor], module: str) -> torch.Tensor | None:
    return state_dict.get(f"{module}.weight" if module else "weight")


def infer_sparsity_structure(
    state_dict: Mapping[str, torch.Tensor], module_classes: Mapping[str, tuple[str, ...]]
) -> str:
    """Return "2:4" when more than 80 % of Linear weights follow 2:4, else "unstructured".

    A Linear module without a weight in `state_dict` (a tied head saved under
    the embedding's name) counts as not following 2:4.
    """
    linear = [name for name, classes in module_classes.items() if match_class(classes, "Linear")]
    following = 0
    for name in linear:
        weight = _weight(state_dict, name)
        if weight is not None and follows_structure(weight, TWO_FOUR):
            following += 1
    if linear and following > len(linear) * STRUCTURE_SHARE:
        return TWO_FOUR
    _log_other_structures(state_dict, linear)
    return UNSTRUCTURED


def _log_other_structures(state_dict: Mapping[str, torch.Tensor], linear: list[str]) -> None:
    structures: dict[str, int] = {}
    for name in linear:
        weight = _weight(state_dict, name)
        if weight is None or weight.dim() != 2:
            continue
        structure = detect_structure(weight)
        if structure not in (UNSTRUCTURED, TWO_FOUR):
            structures[structure] = structures.get(structure, 0) + 1
    if structures:
        found = ", ".join(f"{count} follow {name}" for name, count in sorted(structures.items()))
        logger.info(
            "of %d Linear weights, %s; the sparsity config records 'unstructured' "
            "because compressed-tensors names only 2:4 structures",
            len(linear),
            found,
        )


def reduce_targets_and_ignore(
    targets_by_class: Mapping[str, list[str]], ignore_by_class: Mapping[str, list[str]]
) -> tuple[list[str], list[str]]:
    """Reduce per-class lists of sparse and dense modules to short targets and ignore lists.

    Classes are visited in order of first appearance. When at least as many
    modules of a class are sparse as dense, the class name becomes a target
    and its dense modules are ignored. When fewer but some are sparse, the
    sparse modules become targets by name and the dense ones are ignored. A
    class with no sparse module adds nothing. This is llmcompressor 0.10's rule,
    except that it visits classes in a set's order, which varies between runs.
    """
    targets: list[str] = []
    ignore: list[str] = []
    classes = list(dict.fromkeys([*targets_by_class, *ignore_by_class]))
    for cls in classes:
        sparse = targets_by_class.get(cls, [])
        dense = ignore_by_class.get(cls, [])
        if len(sparse) >= len(dense):
            targets.append(cls)
            ignore.extend(dense)
        elif sparse:
            targets.extend(sparse)
            ignore.extend(dense)
    return targets, ignore


def infer_targets_and_ignore(
    state_dict: Mapping[str, torch.Tensor],
    module_classes: Mapping[str, tuple[str, ...]],
    structure: str,
) -> tuple[list[str], list[str]]:
    """Return the targets and ignore lists for the sparse layers of a state dict.

    A module is sparse when it has a weight with sparsity >= 0.49 that
    follows `structure`; it is grouped under its most derived class name
    ("Module" when the class is unknown).
    """
    targets_by_class: dict[str, list[str]] = {}
    ignore_by_class: dict[str, list[str]] = {}
    for name, classes in module_classes.items():
        cls = classes[0] if classes else "Module"
        weight = _weight(state_dict, name)
        is_target = (
            weight is not None
            and tensor_sparsity(weight) >= SPARSITY_THRESHOLD
            and follows_structure(weight, structure)
        )
        found = targets_by_class if is_target else ignore_by_class
        found.setdefault(cls, []).append(name)
    return reduce_targets_and_ignore(targets_by_class, ignore_by_class)


# Quantized formats that store weight_packed instead of a weight tensor.
_PACKED_FORMATS = frozenset(
    {"pack-quantized", "nvfp4-pack-quantized", "mxfp4-pack-quantized", "mxfp6-pack-quantized"}
)


def _is_8_bit_int_or_float(args: Any) -> bool:
    return args.num_bits == 8 and args.type in (
        QuantizationType.INT.value,
        QuantizationType.FLOAT.value,
    )


def supports_sparse_24_bitmask(schemes: Iterable[QuantizationScheme]) -> bool:
    """Return True when every scheme quantizes weights and inputs to 8 bits, int or float.

    No schemes (an unquantized model) also returns True. Asymmetric weights
    return False: their zero point replaces the zeros, so quantized weights
    no longer follow 2:4 (llmcompressor 0.10 returns True there and prunes
    the quantized values).
    """
    for scheme in schemes:
        weights, inputs = scheme.weights, scheme.input_activations
        if weights is None and inputs is None:
            continue
        if weights is None or inputs is None:
            logger.info(
                "weight-only or activation-only quantization: sparse-24-bitmask is off, "
                "the sparsity config gets format 'dense'"
            )
            return False
        if not (_is_8_bit_int_or_float(weights) and _is_8_bit_int_or_float(inputs)):
            logger.info(
                "sparse-24-bitmask needs 8-bit int or float weights and activations: the "
                "sparsity config gets format 'dense'"
            )
            return False
        if not weights.symmetric:
            logger.warning(
                "asymmetric 8-bit weights do not keep their zeros when quantized, so "
                "they cannot be stored as sparse-24-bitmask: the sparsity config gets "
                "format 'dense'"
            )
            return False
    return True


class ZeroCounter:
    """Running count of exact zeros over tensors, for ``global_sparsity``.

    Each tensor adds ``round(sparsity * numel)`` with the sparsity computed
    in float32, as llmcompressor's ``ModuleSparsificationInfo`` does, so
    the result matches its float to the last bit.
    """

    def __init__(self) -> None:
        self.zeros = 0
        self.total = 0

    def add(self, tensors: Iterable[torch.Tensor]) -> None:
        for tensor in tensors:
            numel = tensor.numel()
            self.zeros += round(tensor_sparsity(tensor) * numel)
            self.total += numel

    def global_sparsity(self) -> float:
        if self.total == 0:
            return 0.0
        return self.zeros / float(self.total) * 100 / 100.0


@dataclass
class SparsityPlan:
    """The sparsity config to write and the modules whose weights it compresses.

    Attributes:
        format: "dense", "sparse-bitmask" or "sparse-24-bitmask".
        structure: the ``sparsity_structure`` to record.
        targets, ignore: the lists to record (None when the caller gave None).
        global_sparsity: the value to record, or None to count zeros while
            compressing (see `ZeroCounter`).
        compressed_modules: modules whose ``weight`` the format replaces.
    """

    format: str
    structure: str
    targets: list[str] | None
    ignore: list[str] | None
    global_sparsity: float | None
    compressed_modules: frozenset[str] = field(default_factory=frozenset)

    @property
    def counts_zeros(self) -> bool:
        return self.global_sparsity is None

    def config(self, counter: ZeroCounter | None) -> dict[str, Any]:
        """Return the ``sparsity_config`` entry, in the form compressed-tensors 0.14 dumps."""
        global_sparsity = self.global_sparsity
        if global_sparsity is None:
            global_sparsity = counter.global_sparsity() if counter is not None else 0.0
        return {
            "format": self.format,
            "global_sparsity": global_sparsity,
            "ignore": self.ignore,
            "registry_requires_subclass": False,
            "sparsity_structure": self.structure,
            "targets": self.targets,
        }

    def compress_module(self, module: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Replace the module's weight by the sparse format's tensors when it is a target.

        `tensors` and the result are keyed by full tensor name. A target
        without a ``weight`` (a pack-quantized module stores
        ``weight_packed``) is left as it is, as compressed-tensors 0.14 does.
        """
        prefix = f"{module}." if module else ""
        weight_name = f"{prefix}weight"
        if module not in self.compressed_modules or weight_name not in tensors:
            return dict(tensors)
        output = {name: tensor for name, tensor in tensors.items() if name != weight_name}
        sparse = compress_sparse_weight(weight_name, tensors[weight_name], self.format)
        output.update((prefix + local, tensor) for local, tensor in sparse.items())
        return output


def check_sparsity_options(options: CompressionOptions) -> None:
    """Reject option combinations that no sparse checkpoint can satisfy.

    Raises:
        InvalidOptionsError: a config group has the marlin-24 format.
    """
    quantization = options.quantization
    if quantization is None:
        return
    for name, scheme in quantization.config_groups.items():
        if scheme.format == "marlin-24":
            raise InvalidOptionsError(
                f"config group {name!r} has format 'marlin-24', which vLLM no longer "
                "loads; remove the format to write 'pack-quantized' with a sparsity "
                "config of format 'dense'"
            )


def _sparse_modules(
    module_classes: Mapping[str, tuple[str, ...]],
    targets: list[str] | None,
    ignore: list[str] | None,
) -> frozenset[str]:
    targets = targets or []
    ignore = ignore or []
    return frozenset(
        name
        for name, classes in module_classes.items()
        if matches(name, classes, targets) and not matches(name, classes, ignore)
    )


def plan_sparsity(
    state_dict: Mapping[str, torch.Tensor],
    module_classes: Mapping[str, tuple[str, ...]],
    plan: CompressionPlan,
    options: CompressionOptions,
) -> SparsityPlan | None:
    """Decide the sparsity config from the options and, where needed, the weights.

    - ``sparsity_config`` given: use it; infer a missing
      ``sparsity_structure``; when ``targets`` is missing, infer targets and
      ignore and count ``global_sparsity`` (llmcompressor 0.10 would record
      ``targets: null`` and write every weight dense).
    - no ``sparsity_config`` and ``skip_sparsity_compression_stats=False``:
      infer the whole config; None when no layer is sparse.
    - no ``sparsity_config`` and the default skip: None, without reading a weight.

    With ``save_compressed=False`` or ``disable_sparse_compression=True`` the
    format is "dense" and the weights stay dense.
    """
    given = options.sparsity_config
    if given is None and options.skip_sparsity_compression_stats:
        return None

    if given is None:
        structure = infer_sparsity_structure(state_dict, module_classes)
        sparse_format = SPARSE_24_BITMASK
        if not options.save_compressed or structure != TWO_FOUR:
            sparse_format = "dense"
        elif not supports_sparse_24_bitmask(plan.schemes):
            sparse_format = "dense"
        targets, ignore = infer_targets_and_ignore(state_dict, module_classes, structure)
        if not (targets or ignore):
            logger.info("no sparse layers found: writing no sparsity config")
            return None
        global_sparsity = None
    else:
        sparse_format = given["format"]
        structure = given.get("sparsity_structure")
        if structure is None:
            structure = infer_sparsity_structure(state_dict, module_classes)
        targets, ignore = given.get("targets"), given.get("ignore")
        global_sparsity = given.get("global_sparsity")
        if global_sparsity is None:
            global_sparsity = 0.0
        if targets is None:
            targets, ignore = infer_targets_and_ignore(state_dict, module_classes, structure)
            global_sparsity = None
            logger.info(
                "sparsity_config has no targets: inferred targets %s and ignore %s",
                targets,
                ignore,
            )
        if not options.save_compressed and sparse_format != "dense":
            logger.info(
                "save_compressed=False writes dense weights, so the sparsity config "
                "gets format 'dense' instead of %r",
                sparse_format,
            )
            sparse_format = "dense"

    if options.disable_sparse_compression:
        sparse_format = "dense"

    compressed_modules: frozenset[str] = frozenset()
    if sparse_format in SPARSE_FORMAT_NAMES:
        compressed_modules = _sparse_modules(module_classes, targets, ignore)
        packed = sorted(
            name
            for name in compressed_modules
            if name in plan.modules and plan.modules[name].format in _PACKED_FORMATS
        )
        if packed and options.save_compressed:
            # A packed weight has no "weight" tensor to store sparsely; writing
            # the sparse format name anyway would describe tensors that are
            # not there.
            logger.warning(
                "sparsity format %r cannot stack on packed quantized weights (%s, ...): "
                "the sparsity config gets format 'dense'",
                sparse_format,
                packed[0],
            )
            sparse_format = "dense"
            compressed_modules = frozenset()
    return SparsityPlan(
        format=sparse_format,
        structure=structure,
        targets=targets,
        ignore=ignore,
        global_sparsity=global_sparsity,
        compressed_modules=compressed_modules,
    )


def decompress_sparse_modules(
    tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """Return `tensors` with every sparse-compressed weight rebuilt as a dense ``weight``.

    Runs only when the config's ``sparsity_config`` has a sparse format, and
    then on every module that contains ``compressed`` and ``bitmask``
    tensors, whatever its targets are, as compressed-tensors 0.14 reads
    checkpoints.
    Stacked weights come back quantized (fp8 or int8) for the quantized
    format to decompress next.
    """
    sparsity = config.get("sparsity_config") or {}
    if sparsity.get("format") not in SPARSE_FORMAT_NAMES:
        return dict(tensors)
    sparse_names = set(SPARSE_TENSOR_NAMES["sparse-bitmask"])
    output: dict[str, torch.Tensor] = {}
    for module, names in group_by_module(tensors).items():
        start = len(module) + 1 if module else 0
        local = {name[start:]: tensors[name] for name in names}
        if not is_sparse_compressed(local):
            output.update((name, tensors[name]) for name in names)
            continue
        prefix = f"{module}." if module else ""
        for name in names:
            if name[start:] not in sparse_names:
                output[name] = tensors[name]
        output[f"{prefix}weight"] = decompress_sparse_weight(module, local)
    return output


@dataclass(frozen=True)
class LayerSparsity:
    """One row of `sparsity_report`.

    Attributes:
        layer: module name.
        shape: dense weight shape.
        dtype: dtype of the stored values (fp8 or int8 for stacked weights).
        zeros: exact zeros in the dense weight.
        structure: "N:M" from `detect_structure`, or "unstructured".
        format: "sparse-bitmask", "sparse-24-bitmask" or "dense".
        bytes_before: bytes of the dense weight in ``dtype``.
        bytes_after: bytes of the tensors stored for the weight.
    """

    layer: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    zeros: int
    structure: str
    format: str
    bytes_before: int
    bytes_after: int

    @property
    def sparsity(self) -> float:
        numel = 1
        for size in self.shape:
            numel *= size
        return self.zeros / numel if numel else 0.0


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def sparsity_report(
    tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None
) -> list[LayerSparsity]:
    """Return one `LayerSparsity` per 2-D weight of a compressed or dense state dict.

    `tensors` and `config` are ``CompressedStateDict.tensors`` and ``.config``
    (or a checkpoint's tensors and its ``quantization_config`` entry).
    Sparse-compressed weights are measured after decompressing them; other
    modules with a 2-D ``weight`` report it as stored. Packed quantized
    weights (``weight_packed``) have no element-wise zeros to count and are
    left out.
    """
    sparse_format = ((config or {}).get("sparsity_config") or {}).get("format", "dense")
    rows: list[LayerSparsity] = []
    for module, names in group_by_module(tensors).items():
        start = len(module) + 1 if module else 0
        local = {name[start:]: tensors[name] for name in names}
        if is_sparse_compressed(local) and sparse_format in SPARSE_FORMAT_NAMES:
            weight = decompress_sparse_weight(module, local)
            stored = [local[key] for key in SPARSE_TENSOR_NAMES[sparse_format] if key in local]
            layer_format = sparse_format
        elif "weight" in local and local["weight"].dim() == 2:
            weight = local["weight"]
            stored = [weight]
            layer_format = "dense"
        else:
            continue
        rows.append(
            LayerSparsity(
                layer=module,
                shape=tuple(weight.shape),
                dtype=weight.dtype,
                zeros=int(_zero_mask(weight).sum()),
                structure=detect_structure(weight),
                format=layer_format,
                bytes_before=_nbytes(weight),
                bytes_after=sum(_nbytes(tensor) for tensor in stored),
            )
        )
    return rows
