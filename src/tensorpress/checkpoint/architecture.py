"""Module classes of a checkpoint's model, built on the meta device from config.json."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from tensorpress.adapters.hf import module_types_of

__all__ = ["ModuleKinds", "module_kinds_from_config"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModuleKinds:
    """Module name -> class names (MRO order), or None to use the name/shape rule.

    `source` describes where the classes came from, for logs and the CLI.
    """

    module_types: dict[str, tuple[str, ...]] | None
    source: str


def _name_rule(reason: str) -> ModuleKinds:
    return ModuleKinds(
        module_types=None,
        source=f"name/shape rule (tensorpress.names.infer_module_kind), because {reason}",
    )


def module_kinds_from_config(folder: Path) -> ModuleKinds:
    """Build the model of `folder`'s config.json on the meta device and list its module classes.

    Only classes that transformers ships are used: a config that needs
    remote code (``auto_map``) or names an unknown architecture falls back
    to the name/shape rule. Nothing is downloaded and no weight is allocated.
    """
    config_path = folder / "config.json"
    if not config_path.is_file():
        return _name_rule(f"{folder} has no config.json")
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        return _name_rule(f"{config_path} could not be read ({error})")
    architectures = data.get("architectures") or []
    if not architectures:
        return _name_rule(f"{config_path} names no architecture")
    architecture = architectures[0]
    if data.get("auto_map"):
        return _name_rule(f"{architecture} needs remote code (auto_map), which tensorpress never runs")

    try:
        import transformers
        from transformers import AutoConfig
    except ImportError:
        return _name_rule("transformers is not installed")
    model_class = getattr(transformers, architecture, None)
    if not isinstance(model_class, type) or not issubclass(model_class, torch.nn.Module):
        return _name_rule(f"transformers {transformers.__version__} has no model class {architecture}")

    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        with torch.device("meta"):
            model = model_class._from_config(config)
    except Exception as error:  # transformers raises many types for configs it cannot build
        logger.warning("building %s on the meta device failed: %s", architecture, error)
        return _name_rule(f"building {architecture} on the meta device failed ({error})")

    return ModuleKinds(
        module_types=module_types_of(model),
        source=f"module classes of transformers' {architecture}, built on the meta device",
    )
