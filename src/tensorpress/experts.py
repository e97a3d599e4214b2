"""Fused mixture-of-experts tensors, split into the per-expert 2-D weights vLLM loads.

transformers 5 stores the experts of a mixture-of-experts layer as fused 3-D
parameters of one module, for Qwen3-MoE ``mlp.experts.gate_up_proj`` of
shape (experts, 2 * moe_intermediate, hidden) and ``mlp.experts.down_proj``
of shape (experts, hidden, moe_intermediate). compressed-tensors
checkpoints, and vLLM's loaders, name each expert's projections separately
(``mlp.experts.3.gate_proj.weight_packed``). llmcompressor 0.14 gets there by
replacing the experts module with one Linear per projection before
quantizing. This module does the same on names and tensors.

An `ExpertLayout` describes one architecture: how each fused tensor splits,
what the pieces are called in the model and in the checkpoint, whether the
tensor is stored transposed, and which module names transformers renames on
save. `expert_layout` finds the layout of a ``model_type`` among the
registered ones, then derives it from transformers' checkpoint conversion
rules, which describe the reverse mapping (per-expert checkpoint tensors
merged into fused parameters on load).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from tensorpress.arrays import LazyTensors
from tensorpress.errors import InvalidOptionsError, InvalidTensorError
from tensorpress.names import ModuleTypes, class_names, split_name
from tensorpress.plan import CompressionPlan

__all__ = [
    "FusedTensor",
    "ExpertLayout",
    "ExpertView",
    "DEFAULT_LAYOUT",
    "expert_layout",
    "register_expert_layout",
    "layout_from_transformers",
    "split_fused_experts",
    "checkpoint_module_types",
]

logger = logging.getLogger(__name__)

# Class names given to the per-expert projections, as llmcompressor's
# linearized experts make them torch Linear modules.
_EXPERT_CLASSES = ("Linear", "Module")

# The order in which llmcompressor 0.14's linearized expert (ExpertMLPWithGate)
# registers its projections. It sets the order of ignored experts in the
# config's ignore list; projections not named here follow in layout order.
_PEER_MODULE_ORDER = ("up_proj", "gate_proj", "down_proj")


@dataclass(frozen=True)
class FusedTensor:
    """One fused 3-D expert parameter and the per-expert Linear weights it concatenates.

    Attributes:
        parameter: the parameter's last name part, such as "gate_up_proj".
        modules: the per-expert module names in the model, in the order the
            fused tensor concatenates them along its out-features axis.
            llmcompressor names them gate_proj, up_proj and down_proj for
            every architecture.
        saved: the same modules' names in the checkpoint, in the same order;
            empty when they equal `modules`.
        transposed: True when the tensor is stored as (experts, in_features,
            out_features) rather than torch Linear's (experts, out_features,
            in_features).
    """

    parameter: str
    modules: tuple[str, ...]
    saved: tuple[str, ...] = ()
    transposed: bool = False

    def __post_init__(self) -> None:
        if not self.modules:
            raise InvalidOptionsError(f"fused tensor {self.parameter!r} needs at least one module name")
        if self.saved and len(self.saved) != len(self.modules):
            raise InvalidOptionsError(
                f"fused tensor {self.parameter!r} lists {len(self.modules)} module names but "
                f"{len(self.saved)} saved names; give one saved name per module, or none"
            )

    @property
    def saved_names(self) -> tuple[str, ...]:
        """The per-expert module names written to the checkpoint."""
        return self.saved or self.modules


@dataclass(frozen=True)
class ExpertLayout:
    """Storage and checkpoint naming of one architecture's experts.

    Attributes:
        tensors: the fused parameters of an experts module, in data-flow
            order: the first one takes the layer input and the last one
            writes the layer output, so the first one's pieces, transposed,
            have the last one's shape. The split is checked against this.
        experts: the last name part of the module that contains the fused
            parameters.
        renames: (model text, checkpoint text) pairs. Module and tensor names
            are written with every model text replaced by its checkpoint
            text, as transformers' ``save_pretrained`` renames them (Mixtral:
            ".mlp." becomes ".block_sparse_moe.").
    """

    tensors: tuple[FusedTensor, ...]
    experts: str = "experts"
    renames: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        parameters = [tensor.parameter for tensor in self.tensors]
        if not parameters or len(set(parameters)) != len(parameters):
            raise InvalidOptionsError(
                f"an expert layout needs fused tensors with distinct parameter names, got {parameters}"
            )

    def to_checkpoint(self, name: str) -> str:
        """Return the checkpoint name of a module or tensor named `name` in the model."""
        return self._rename(name, [(model, saved) for model, saved in self.renames], to_saved=True)

    def to_model(self, name: str) -> str:
        """Return the model name of a module or tensor named `name` in a checkpoint."""
        return self._rename(name, [(saved, model) for model, saved in self.renames], to_saved=False)

    def model_aliases(self, modules: Iterable[str]) -> dict[str, str]:
        """Map each of `modules`, named as in a checkpoint, whose model name differs to that name."""
        aliases = {}
        for module in modules:
            model = self.to_model(module)
            if model != module:
                aliases[module] = model
        return aliases

    def _rename(self, name: str, pairs: list[tuple[str, str]], *, to_saved: bool) -> str:
        # Pad with dots so that a rename such as ".mlp." also matches at either end.
        padded = f".{name}."
        for old, new in pairs:
            padded = padded.replace(old, new)
        for tensor in self.tensors:
            if not tensor.saved:
                continue
            pieces = zip(tensor.modules, tensor.saved) if to_saved else zip(tensor.saved, tensor.modules)
            for old, new in pieces:
                pattern = rf"(\.{re.escape(self.experts)}\.\d+\.){re.escape(old)}\."
                padded = re.sub(pattern, rf"\g<1>{new}.", padded)
        return padded[1:-1]


# transformers' default for experts modules (``use_experts_implementation``):
# gate and up concatenated along the out-features axis, not transposed.
DEFAULT_LAYOUT = ExpertLayout(
    tensors=(
        FusedTensor("gate_up_proj", ("gate_proj", "up_proj")),
        FusedTensor("down_proj", ("down_proj",)),
    )
)

# vLLM's Mixtral loader reads experts.{i}.w1 (gate), w3 (up) and w2 (down)
# under block_sparse_moe, the names transformers 5 writes on save.
MIXTRAL_LAYOUT = ExpertLayout(
    tensors=(
        FusedTensor("gate_up_proj", ("gate_proj", "up_proj"), saved=("w1", "w3")),
        FusedTensor("down_proj", ("down_proj",), saved=("w2",)),
    ),
    renames=((".mlp.", ".block_sparse_moe."),),
)

_LAYOUTS: dict[str, ExpertLayout] = {
    "qwen2_moe": DEFAULT_LAYOUT,
    "qwen3_moe": DEFAULT_LAYOUT,
    "mixtral": MIXTRAL_LAYOUT,
}


def register_expert_layout(model_type: str, layout: ExpertLayout) -> None:
    """Register the expert layout of `model_type` (config.json's ``model_type``), replacing any."""
    if not isinstance(layout, ExpertLayout):
        raise InvalidOptionsError(
            f"layout for {model_type!r} must be an ExpertLayout, not {type(layout).__name__}"
        )
    _LAYOUTS[model_type] = layout


def expert_layout(model_type: str | None) -> ExpertLayout:
    """Return the expert layout of `model_type`.

    The registered layout comes first, then one derived from transformers'
    conversion rules (`layout_from_transformers`), then `DEFAULT_LAYOUT`,
    whose split `split_fused_experts` checks against the tensor shapes.
    """
    if model_type is None:
        return DEFAULT_LAYOUT
    layout = _LAYOUTS.get(model_type)
    if layout is not None:
        return layout
    layout = layout_from_transformers(model_type)
    if layout is not None:
        logger.info("expert layout of %s derived from transformers' conversion rules", model_type)
        return layout
    return DEFAULT_LAYOUT


_LITERAL_NAME = re.compile(r"^[A-Za-z0-9_.]+$")


def layout_from_transformers(model_type: str) -> ExpertLayout | None:
    """Derive an expert layout from transformers' checkpoint conversion rules for `model_type`.

    transformers merges per-expert checkpoint tensors into a fused parameter
    with a ``WeightConverter`` of MergeModulelist(dim=0), then
    Concatenate(dim=1) when several tensors are merged, then optionally a
    Transpose of the last two axes. Its source patterns give the saved
    names (``mlp.experts.*.gate_proj.weight``), its target the parameter.
    Plain ``WeightRenaming`` entries give the renames. Returns None when
    transformers is missing, has no rules for `model_type`, or its rules
    use any other operation.
    """
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:
        return None

    tensors: list[FusedTensor] = []
    renames: list[tuple[str, str]] = []
    experts_names: set[str] = set()
    for transform in get_checkpoint_conversion_mapping(model_type) or []:
        if type(transform) is WeightRenaming:
            rename = _rename_from(transform)
            if rename is None:
                return None
            renames.append(rename)
        elif isinstance(transform, WeightConverter):
            derived = _fused_tensor_from(transform)
            if derived is None:
                return None
            experts, tensor = derived
            experts_names.add(experts)
            tensors.append(tensor)
        else:
            return None
    if not tensors or len(experts_names) != 1:
        return None
    return ExpertLayout(tensors=tuple(tensors), experts=experts_names.pop(), renames=tuple(renames))


def _rename_from(transform) -> tuple[str, str] | None:
    sources, targets = list(transform.source_patterns), list(transform.target_patterns)
    if len(sources) != 1 or len(targets) != 1:
        return None
    saved, model = sources[0], targets[0]
    # transformers reads the patterns as regexes; only plain names reverse simply.
    if not (_LITERAL_NAME.match(saved) and _LITERAL_NAME.match(model)):
        return None
    return model, saved


def _fused_tensor_from(transform) -> tuple[str, FusedTensor] | None:
    from transformers.core_model_loading import Concatenate, MergeModulelist, Transpose

    targets = list(transform.target_patterns)
    sources = list(transform.source_patterns)
    if len(targets) != 1:
        return None
    experts, _, parameter = targets[0].rpartition(".")
    experts = experts.rpartition(".")[2]

    operations = list(transform.operations)
    if not operations or not isinstance(operations[0], MergeModulelist) or operations[0].dim != 0:
        return None
    operations = operations[1:]
    if len(sources) > 1:
        if not operations or not isinstance(operations[0], Concatenate) or operations[0].dim != 1:
            return None
        operations = operations[1:]
    transposed = False
    if operations and isinstance(operations[0], Transpose):
        if {operations[0].dim0, operations[0].dim1} != {1, 2} or operations[0].check_dims:
            return None
        transposed = True
        operations = operations[1:]
    if operations:
        return None

    saved = []
    for source in sources:
        match = re.search(rf"{re.escape(experts)}\.\*\.(\w+)\.weight$", source)
        if match is None:
            return None
        saved.append(match[1])
    modules = ("gate_proj", "up_proj") if parameter == "gate_up_proj" else (parameter,)
    if len(modules) != len(saved):
        return None
    saved_names = tuple(saved) if tuple(saved) != modules else ()
    return experts, FusedTensor(parameter, modules, saved=saved_names, transposed=transposed)


@dataclass
class ExpertView:
    """A state dict with fused experts split, under model names, and the way back to checkpoint names.

    Attributes:
        state_dict: the tensors, with each fused expert parameter replaced
            by per-expert 2-D weights in its place, and names in the model's
            spelling (`ExpertLayout.to_model`). Tensors of a lazy input stay
            lazy unless they are fused.
        module_types: the caller's module types with a Linear entry for
            each per-expert projection, or None when the caller gave none.
        layout: the layout used for names and splits.
        split: the number of fused tensors that were split.
    """

    state_dict: Mapping[str, torch.Tensor]
    module_types: dict[str, tuple[str, ...]] | None
    layout: ExpertLayout
    split: int = 0

    def checkpoint_name(self, name: str) -> str:
        """Return the name a module or tensor gets in the checkpoint."""
        return self.layout.to_checkpoint(name)

    def aliases(self, modules: Iterable[str]) -> dict[str, str]:
        """Map each of `modules` whose checkpoint name differs to that name."""
        aliases = {}
        for module in modules:
            saved = self.layout.to_checkpoint(module)
            if saved != module:
                aliases[module] = saved
        return aliases

    def rename_ignore(self, plan: CompressionPlan) -> None:
        """Write `plan`'s ignore list in checkpoint names, as compressed-tensors does on save."""
        plan.ignore = [self.checkpoint_name(name) for name in plan.ignore]

    def checkpoint_tensors(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return `tensors` keyed by checkpoint names."""
        return {self.checkpoint_name(name): tensor for name, tensor in tensors.items()}


def checkpoint_module_types(
    module_types: ModuleTypes | None, model_type: str | None
) -> tuple[dict[str, tuple[str, ...]] | None, ExpertLayout]:
    """Return `module_types` keyed by checkpoint names, and the layout of `model_type`.

    The checkpoint-folder route reads per-expert tensors under their saved
    names (Mixtral: ``block_sparse_moe.experts.0.w1``), while module types
    built from the transformers model use the model's names.

    NOTE: the folder route does not split fused 3-D expert tensors stored
    on disk, so such tensors are copied unquantized. transformers writes
    experts one per expert, but some releases ship them fused.
    """
    layout = expert_layout(model_type)
    if module_types is None:
        return None, layout
    return {layout.to_checkpoint(name): class_names(module_types, name) for name in module_types}, layout


def split_fused_experts(
    state_dict: Mapping[str, torch.Tensor],
    module_types: ModuleTypes | None,
    model_type: str | None = None,
) -> ExpertView:
    """Split the fused expert tensors of `state_dict` into per-expert 2-D weights.

    Names are first brought to the model's spelling, so per-expert state
    dicts in either spelling (the peer's pre-save state, an older
    checkpoint) and fused ones all come out alike. Expert e of a fused
    tensor becomes ``<experts>.<e>.<module>.weight`` (and ``.bias`` from a
    ``<parameter>_bias`` tensor). Only the fused tensors are read here; the
    inputs are not modified.

    Raises:
        InvalidTensorError: a fused tensor's shape does not fit the layout,
            or qparams sit beside it in fused form.
    """
    layout = expert_layout(model_type)
    sources = {layout.to_model(name): name for name in state_dict}
    groups = _fused_groups(sources, state_dict, layout)
    types = None if module_types is None else {name: class_names(module_types, name) for name in module_types}
    if not groups and all(model == saved for model, saved in sources.items()):
        return ExpertView(state_dict=state_dict, module_types=types, layout=layout)

    pieces_of = {
        experts_module: _split_group(experts_module, members, sources, state_dict, layout)
        for experts_module, members in groups.items()
    }
    fused_names = {name for members in groups.values() for name in members.values()}
    entries: dict[str, str | torch.Tensor] = {}
    for name, source in sources.items():
        if name not in fused_names:
            entries[name] = source
            continue
        pieces = pieces_of.pop(split_name(name)[0], None)
        if pieces is not None:
            entries.update(pieces)

    if fused_names:
        logger.info("split %d fused expert tensors into per-expert weights", len(fused_names))
    if isinstance(state_dict, dict):
        tensors: Mapping[str, torch.Tensor] = {
            name: state_dict[entry] if isinstance(entry, str) else entry for name, entry in entries.items()
        }
    else:
        tensors = LazyTensors(
            list(entries),
            lambda name: state_dict[entries[name]] if isinstance(entries[name], str) else entries[name],
        )
    return ExpertView(
        state_dict=tensors,
        module_types=_with_expert_types(types, groups, entries),
        layout=layout,
        split=len(fused_names),
    )


def _fused_groups(
    sources: Mapping[str, str], state_dict: Mapping[str, torch.Tensor], layout: ExpertLayout
) -> dict[str, dict[str, str]]:
    """Map each experts module to {local name: model tensor name} of its fused tensors."""
    parameters = {tensor.parameter for tensor in layout.tensors}
    groups: dict[str, dict[str, str]] = {}
    for name, source in sources.items():
        module, local = split_name(name)
        if module.rpartition(".")[2] != layout.experts:
            continue
        if local in parameters:
            if state_dict[source].dim() != 3:
                continue
        elif local.removesuffix("_bias") not in parameters:
            continue
        groups.setdefault(module, {})[local] = name
    return {module: members for module, members in groups.items() if set(members) & parameters}


def _split_group(
    experts_module: str,
    members: dict[str, str],
    sources: Mapping[str, str],
    state_dict: Mapping[str, torch.Tensor],
    layout: ExpertLayout,
) -> dict[str, torch.Tensor]:
    _reject_fused_qparams(experts_module, sources, layout)
    missing = [tensor.parameter for tensor in layout.tensors if tensor.parameter not in members]
    if missing:
        raise InvalidTensorError(
            f"{experts_module} has fused expert tensors {sorted(members)} but lacks "
            f"{missing}; pass every fused tensor of the experts module, or pass the experts "
            "as per-expert 2-D weights"
        )

    def load(local: str) -> torch.Tensor:
        return state_dict[sources[members[local]]]

    weights = {tensor.parameter: _per_expert(load(tensor.parameter), tensor) for tensor in layout.tensors}
    _check_split(experts_module, weights, members, layout)

    per_expert: dict[str, torch.Tensor] = {}
    num_experts = next(iter(weights.values())).shape[0]
    for index in range(num_experts):
        pieces: dict[str, dict[str, torch.Tensor]] = {}
        for tensor in layout.tensors:
            rows = weights[tensor.parameter][index].chunk(len(tensor.modules), dim=0)
            bias_local = f"{tensor.parameter}_bias"
            biases = load(bias_local)[index].chunk(len(tensor.modules)) if bias_local in members else None
            for position, module in enumerate(tensor.modules):
                pieces[module] = {"weight": rows[position].contiguous()}
                if biases is not None:
                    pieces[module]["bias"] = biases[position].contiguous()
        for module in sorted(pieces, key=_peer_rank):
            for local, value in pieces[module].items():
                per_expert[f"{experts_module}.{index}.{module}.{local}"] = value
    return per_expert


def _peer_rank(module: str) -> int:
    return _PEER_MODULE_ORDER.index(module) if module in _PEER_MODULE_ORDER else len(_PEER_MODULE_ORDER)


def _per_expert(fused: torch.Tensor, tensor: FusedTensor) -> torch.Tensor:
    """Return the fused tensor as (experts, out_features, in_features)."""
    return fused.transpose(1, 2) if tensor.transposed else fused


def _check_split(
    experts_module: str,
    weights: dict[str, torch.Tensor],
    members: dict[str, str],
    layout: ExpertLayout,
) -> None:
    counts = {weight.shape[0] for weight in weights.values()}
    if len(counts) != 1:
        raise InvalidTensorError(
            f"{experts_module}: the fused expert tensors disagree on the number of experts "
            f"({ {members[name]: tuple(weight.shape) for name, weight in weights.items()} }); "
            "pass tensors of one model"
        )
    shapes = {}
    for tensor in layout.tensors:
        rows = weights[tensor.parameter].shape[1]
        if rows % len(tensor.modules):
            raise InvalidTensorError(
                f"{members[tensor.parameter]} has {rows} out-features rows, which do not split "
                f"into {len(tensor.modules)} equal pieces {list(tensor.modules)}; the tensor does "
                "not fit this expert layout. Pass model_type, or register the layout with "
                "tensorpress.experts.register_expert_layout"
            )
        shapes[tensor.parameter] = (rows // len(tensor.modules), weights[tensor.parameter].shape[2])

    first, last = layout.tensors[0].parameter, layout.tensors[-1].parameter
    if first != last and shapes[first] != shapes[last][::-1]:
        stored = {members[name]: tuple(weights[name].shape) for name in (first, last)}
        raise InvalidTensorError(
            f"{experts_module}: the fused expert tensors {stored} do not fit the layout "
            f"(per-expert {first} pieces of shape {shapes[first]} should be the transpose of "
            f"{last} of shape {shapes[last]}); the tensors may be stored transposed or "
            "interleaved. Pass model_type, or register the layout with "
            "tensorpress.experts.register_expert_layout"
        )


def _reject_fused_qparams(experts_module: str, names: Iterable[str], layout: ExpertLayout) -> None:
    prefix = f"{experts_module}."
    parameters = {tensor.parameter for tensor in layout.tensors}
    for name in names:
        if not name.startswith(prefix):
            continue
        local = name[len(prefix):]
        base, _, suffix = local.partition("_proj_")
        if f"{base}_proj" in parameters and suffix and suffix != "bias":
            raise InvalidTensorError(
                f"{name} is a qparam of a fused expert tensor, which tensorpress does not "
                "split; pass the float weights to compute qparams, or per-expert weights "
                "with per-expert qparams"
            )


def _with_expert_types(
    module_types: dict[str, tuple[str, ...]] | None,
    groups: dict[str, dict[str, str]],
    names: Iterable[str],
) -> dict[str, tuple[str, ...]] | None:
    """Return module types with a Linear entry per expert projection, after its experts module."""
    if module_types is None:
        return None
    added: dict[str, list[str]] = {module: [] for module in groups}
    for name in names:
        module, _ = split_name(name)
        experts_module = module.rpartition(".")[0].rpartition(".")[0]
        if experts_module in added and module not in added[experts_module]:
            added[experts_module].append(module)

    types: dict[str, tuple[str, ...]] = {}
    for name, classes in module_types.items():
        types[name] = classes
        for module in added.pop(name, []):
            types.setdefault(module, _EXPERT_CLASSES)
    for modules in added.values():
        for module in modules:
            types.setdefault(module, _EXPERT_CLASSES)
    return types
