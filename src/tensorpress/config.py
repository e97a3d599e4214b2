"""The ``quantization_config`` entry of config.json, as the peers write it."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

import compressed_tensors
import torch
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
)

__all__ = ["build_config", "dump_args", "strip_group_actorder", "QUANT_METHOD"]

QUANT_METHOD = "compressed-tensors"


def build_config(
    *,
    schemes: list[QuantizationScheme],
    model_format: str,
    status: QuantizationStatus,
    ignore: list[str],
    kv_cache_scheme: QuantizationArgs | None,
    sparsity_config: dict[str, Any] | None = None,
    transform_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the config.json entry in the JSON form the peer writes.

    The keys match compressed-tensors' ``ModelCompressor.update_config``:
    ``version``, ``quant_method``, ``sparsity_config``, ``transform_config``
    and the fields of ``QuantizationConfig`` (config groups named
    ``group_0``, ``group_1``, ... in order of first use).
    """
    quantization: dict[str, Any] = {}
    if schemes or kv_cache_scheme is not None:
        config = QuantizationConfig(
            config_groups={f"group_{index}": scheme for index, scheme in enumerate(schemes)},
            quantization_status=status,
            kv_cache_scheme=kv_cache_scheme,
            global_compression_ratio=None,
            format=model_format,
            ignore=ignore,
        )
        quantization = config.model_dump(exclude={"quant_method"})
        # compressed-tensors 0.20 added this field, and neither 0.19 nor
        # llmcompressor 0.14 writes it, so it is left out when it is None.
        if quantization.get("moe_sparsity_config") is None:
            quantization.pop("moe_sparsity_config", None)
        for name, scheme in config.config_groups.items():
            group = quantization["config_groups"][name]
            for field in ("weights", "input_activations", "output_activations"):
                args = getattr(scheme, field)
                group[field] = None if args is None else dump_args(args)
        if config.kv_cache_scheme is not None:
            quantization["kv_cache_scheme"] = dump_args(config.kv_cache_scheme)

    entry = {
        "version": compressed_tensors.__version__,
        "quant_method": QUANT_METHOD,
        "sparsity_config": sparsity_config or {},
        "transform_config": transform_config or {},
        **quantization,
    }
    # Normalise enums and dtypes to what json.dump writes and json.load returns.
    return json.loads(json.dumps(entry, sort_keys=True))


def dump_args(args: QuantizationArgs) -> dict[str, Any]:
    """Serialise QuantizationArgs with every field, as compressed-tensors 0.19 does.

    compressed-tensors 0.20 omits fields that are None or unset; llmcompressor
    0.14 (on compressed-tensors 0.19) writes them all, with ``zp_dtype`` None
    for symmetric args. Loaders accept both; the full form matches the peer.
    """
    data = args.model_dump()
    for field in type(args).model_fields:
        if field in data:
            continue
        if field == "zp_dtype":
            data[field] = None if args.symmetric else str(args.zp_dtype)
        elif field == "observer_kwargs":
            data[field] = dict(args.observer_kwargs or {})
        else:
            value = getattr(args, field)
            data[field] = str(value) if isinstance(value, torch.dtype) else value
    return data


def strip_group_actorder(config: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of a config dict with ``actorder: "group"`` set to None.

    compressed-tensors 0.20 refuses to parse "group"; the ``weight_g_idx``
    tensors themselves tell tensorpress which modules use it.
    """
    result = copy.deepcopy(dict(config))
    for group in (result.get("config_groups") or {}).values():
        if not isinstance(group, dict):
            continue
        for field in ("weights", "input_activations", "output_activations"):
            args = group.get(field)
            if isinstance(args, dict) and str(args.get("actorder")).lower() in ("group", "true", "dynamic"):
                args["actorder"] = None
    return result
