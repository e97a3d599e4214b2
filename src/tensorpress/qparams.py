"""Weight qparams from min/max, for weights that arrive without them.

This is the maths of llmcompressor 0.14's default weight observer
("memoryless_minmax") in a data-free ``oneshot``: reshape the weight by the
quantization strategy, take the min and max of each group, and hand them to
compressed-tensors' ``calculate_qparams``. For the "tensor_group" strategy
(NVFP4) the global scale comes from the absolute max over the weight and its
fused partners (q/k/v, gate/up), as llmcompressor shares it.
"""

from __future__ import annotations

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy
from compressed_tensors.quantization.utils import (
    calculate_qparams,
    generate_gparam,
    maybe_pad_tensor_for_block_quant,
)

from tensorpress.errors import InvalidTensorError
from tensorpress.formats import fast

__all__ = [
    "FUSED_PROJECTIONS",
    "group_min_max",
    "global_scale_from_min_max",
    "weight_qparams",
    "scale_dtype_for",
]

# Sibling projections whose "tensor_group" global scales are shared, because
# vLLM fuses them into one matrix (same groups as llmcompressor 0.14).
FUSED_PROJECTIONS: tuple[tuple[str, ...], ...] = (
    ("gate_proj", "up_proj"),
    ("q_proj", "k_proj", "v_proj"),
    ("q_a_proj", "kv_a_proj_with_mqa"),
    ("w1", "w3"),
)


def _flatten_weight(weight: torch.Tensor, args: QuantizationArgs, name: str) -> torch.Tensor:
    """Reshape to (1, *qparam_shape, group) so that one min/max per qparam remains."""
    strategy = args.strategy
    if strategy == QuantizationStrategy.TENSOR:
        return weight.reshape(1, 1, -1)
    if strategy == QuantizationStrategy.CHANNEL:
        return weight.unsqueeze(-2).unsqueeze(0)
    if strategy in (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP):
        columns = weight.shape[-1]
        if columns % args.group_size:
            raise InvalidTensorError(
                f"{name}: {columns} columns are not divisible by group_size "
                f"{args.group_size}; add the module to the ignore list or pick a "
                "group size that divides the columns"
            )
        return weight.unflatten(-1, (-1, args.group_size)).unsqueeze(0)
    if strategy == QuantizationStrategy.BLOCK:
        block_height, block_width = args.block_structure
        padded = maybe_pad_tensor_for_block_quant(weight, tuple(args.block_structure))
        rows, columns = padded.shape
        return (
            padded.reshape(rows // block_height, block_height, columns // block_width, block_width)
            .transpose(1, 2)
            .flatten(-2, -1)
            .unsqueeze(0)
        )
    raise InvalidTensorError(
        f"{name}: weights cannot use the {strategy.value!r} quantization strategy; "
        "use tensor, channel, group, tensor_group or block"
    )


def group_min_max(
    weight: torch.Tensor, args: QuantizationArgs, name: str = "weight"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return per-qparam (min, max) of `weight` for the strategy in `args`."""
    # The same values, computed faster for 2-D channel and group weights.
    reduced = fast.group_min_max(weight, args)
    if reduced is not None:
        return reduced
    observed = _flatten_weight(weight, args, name)
    return torch.amin(observed, dim=(0, -1)), torch.amax(observed, dim=(0, -1))


def global_scale_from_min_max(stats: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Return the float32 global scale shared by weights with these (min, max) stats."""
    absmax = stats[0][1].max()
    for min_vals, max_vals in stats:
        absmax = torch.max(absmax, -min_vals.min())
        absmax = torch.max(absmax, max_vals.max())
    return generate_gparam(-absmax.reshape(1), absmax.reshape(1))


def scale_dtype_for(weight_dtype: torch.dtype) -> torch.dtype:
    """Return the dtype compressed-tensors gives a weight's scale before compression."""
    if weight_dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return weight_dtype
    return torch.float16


def weight_qparams(
    weight: torch.Tensor,
    args: QuantizationArgs,
    *,
    global_scale: torch.Tensor | None = None,
    min_max: tuple[torch.Tensor, torch.Tensor] | None = None,
    name: str = "weight",
) -> dict[str, torch.Tensor]:
    """Compute weight_scale and weight_zero_point (and keep weight_global_scale).

    The results have the dtypes llmcompressor stores them in: the scale in
    the weight's float dtype, the zero point in ``args.zp_dtype``.
    """
    min_vals, max_vals = min_max if min_max is not None else group_min_max(weight, args, name)
    scale, zero_point = calculate_qparams(
        min_vals=min_vals, max_vals=max_vals, quantization_args=args, global_scale=global_scale
    )
    qparams = {
        "weight_scale": scale.to(scale_dtype_for(weight.dtype)),
        "weight_zero_point": zero_point.to(args.zp_dtype),
    }
    if global_scale is not None:
        qparams["weight_global_scale"] = global_scale.to(torch.float32)
    return qparams
