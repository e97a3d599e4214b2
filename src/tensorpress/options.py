"""Typed options for compression; every check of option combinations lives here."""

from __future__ import annotations

import copy
import re
from typing import Any

from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from tensorpress.config import strip_group_actorder
from tensorpress.errors import InvalidOptionsError

__all__ = ["CompressionOptions", "QUANTIZATION_FORMATS", "SPARSITY_FORMATS"]

# Formats that hold quantized (or dense) weights, as compressed-tensors 0.20 names them.
QUANTIZATION_FORMATS: tuple[str, ...] = (
    CompressionFormat.dense.value,
    CompressionFormat.naive_quantized.value,
    CompressionFormat.int_quantized.value,
    CompressionFormat.float_quantized.value,
    CompressionFormat.pack_quantized.value,
    CompressionFormat.nvfp4_pack_quantized.value,
    CompressionFormat.mxfp4_pack_quantized.value,
    CompressionFormat.mxfp6_pack_quantized.value,
    CompressionFormat.mxfp8_quantized.value,
)

# Formats that hold sparse weights, written by compressed-tensors up to 0.14.
SPARSITY_FORMATS: tuple[str, ...] = ("dense", "sparse-bitmask", "sparse-24-bitmask")

# Sparsity structures that callers sometimes pass where a format belongs.
_SPARSITY_STRUCTURES = ("2:4", "unstructured", "0:0")


class CompressionOptions(BaseModel):
    """Options for `compress_state_dict` and `save_pretrained`.

    Fields:
        quantization: a compressed-tensors ``QuantizationConfig``, or its dict
            form as written under ``quantization_config`` in config.json.
            None writes the weights unquantized.
        quantization_format: a format name ("pack-quantized", ...) that
            overrides the format inferred for every quantized module.
        sparsity_config: a sparsity compression config (dict or
            compressed-tensors ``SparsityCompressionConfig``).
        skip_sparsity_compression_stats: when True and no sparsity_config is
            given, skip the pass over the weights that infers one.
        disable_sparse_compression: infer sparsity statistics but write dense.
        save_compressed: False writes float weights with their qparams
            (``quantization_status: "frozen"``), as llmcompressor does.
        transform_config: the ``transform_config`` entry (rotations such as
            Hadamard transforms, as compressed-tensors' TransformConfig
            dumps it), written to the config unchanged. When None, a
            ``transform_config`` key of a `quantization` dict is used.

    The options copy the quantization config they are given, so later changes
    to the caller's object do not leak in.

    Example:
        >>> options = CompressionOptions.for_scheme("W4A16", ignore=["lm_head"])
        >>> options.quantization.config_groups["group_0"].weights.num_bits
        4
    """

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    quantization: QuantizationConfig | None = None
    quantization_format: str | None = None
    sparsity_config: dict[str, Any] | None = None
    skip_sparsity_compression_stats: bool = True
    disable_sparse_compression: bool = False
    save_compressed: bool = True
    transform_config: dict[str, Any] | None = None

    def __init__(self, **data: Any) -> None:
        # pydantic wraps validator errors in ValidationError; callers catch
        # TensorpressError, so re-raise with the same text under our type.
        try:
            super().__init__(**data)
        except ValidationError as error:
            raise InvalidOptionsError(_describe_validation_error(error)) from None

    @classmethod
    def for_scheme(
        cls,
        scheme: str,
        *,
        targets: list[str] | tuple[str, ...] = ("Linear",),
        ignore: list[str] | tuple[str, ...] = ("lm_head",),
        **options: Any,
    ) -> CompressionOptions:
        """Build options for one compressed-tensors preset scheme ("W4A16", "FP8_DYNAMIC", ...).

        Raises:
            InvalidOptionsError: the scheme name is not a compressed-tensors preset.
        """
        if not isinstance(scheme, str):
            raise InvalidOptionsError(
                f"scheme must be a preset name such as 'W4A16', not {type(scheme).__name__}"
            )
        for label, entries in (("targets", targets), ("ignore", ignore)):
            if isinstance(entries, str) or not isinstance(entries, (list, tuple)):
                raise InvalidOptionsError(
                    f"{label} must be a list of strings, for example {label}=[{entries!r}], "
                    f"not {type(entries).__name__}"
                )
            _check_patterns(label, entries)
        try:
            preset = preset_name_to_scheme(scheme, list(targets))
        except (KeyError, ValueError) as error:
            raise InvalidOptionsError(
                f"unknown quantization scheme {scheme!r}: use a compressed-tensors "
                f"preset such as 'W4A16', 'W8A8', 'FP8_DYNAMIC' or 'NVFP4A16' ({error})"
            ) from None
        config = QuantizationConfig(config_groups={"group_0": preset}, ignore=list(ignore))
        return cls(quantization=config, **options)

    @model_validator(mode="before")
    @classmethod
    def _take_transform_config(cls, data: Any) -> Any:
        # A config.json entry carries transform_config beside the quantization
        # fields; QuantizationConfig would drop it.
        if isinstance(data, dict) and data.get("transform_config") is None:
            quantization = data.get("quantization")
            if isinstance(quantization, dict) and quantization.get("transform_config"):
                data = {**data, "transform_config": quantization["transform_config"]}
        return data

    @field_validator("transform_config", mode="before")
    @classmethod
    def _copy_transform_config(cls, value: Any) -> dict[str, Any] | None:
        if value is None:
            return None
        if hasattr(value, "model_dump"):
            value = value.model_dump(mode="json")
        if not isinstance(value, dict):
            raise InvalidOptionsError(
                f"transform_config must be a dict or a compressed-tensors TransformConfig, "
                f"not {type(value).__name__}"
            )
        return copy.deepcopy(value)

    @field_validator("quantization", mode="before")
    @classmethod
    def _parse_quantization(cls, value: Any) -> QuantizationConfig | None:
        if value is None:
            return None
        if isinstance(value, QuantizationConfig):
            return copy.deepcopy(value)
        if isinstance(value, dict):
            try:
                return QuantizationConfig.model_validate(strip_group_actorder(value))
            except Exception as error:  # pydantic and preset lookups raise several types
                raise InvalidOptionsError(
                    f"invalid quantization config: {error}. Pass a compressed-tensors "
                    "QuantizationConfig or the dict written under quantization_config "
                    "in config.json"
                ) from None
        raise InvalidOptionsError(
            f"quantization must be a QuantizationConfig, a dict or None, not "
            f"{type(value).__name__}"
        )

    @field_validator("quantization_format", mode="before")
    @classmethod
    def _check_quantization_format(cls, value: Any) -> str | None:
        if value is None:
            return None
        if isinstance(value, CompressionFormat):
            value = value.value
        if value == "marlin-24":
            raise InvalidOptionsError(
                "quantization_format='marlin-24' is not supported: vLLM no longer "
                "loads marlin-24 checkpoints. Leave quantization_format unset to write "
                "'pack-quantized' with a sparsity config"
            )
        if value in ("sparse-bitmask", "sparse-24-bitmask"):
            raise InvalidOptionsError(
                f"quantization_format={value!r} is a sparsity format: pass it as "
                f"sparsity_config={{'format': {value!r}}} instead"
            )
        if value == CompressionFormat.mixed_precision.value:
            raise InvalidOptionsError(
                "quantization_format='mixed-precision' is written when config groups "
                "use different formats; set the 'format' field of each config group "
                "instead of forcing it for every module"
            )
        if value not in QUANTIZATION_FORMATS:
            raise InvalidOptionsError(
                f"unknown quantization_format {value!r}: expected one of "
                f"{', '.join(QUANTIZATION_FORMATS)}"
            )
        return value

    @field_validator("sparsity_config", mode="before")
    @classmethod
    def _check_sparsity_config(cls, value: Any) -> dict[str, Any] | None:
        if value is None:
            return None
        if hasattr(value, "model_dump"):
            value = value.model_dump()
        if not isinstance(value, dict):
            raise InvalidOptionsError(
                f"sparsity_config must be a dict or a SparsityCompressionConfig, not "
                f"{type(value).__name__}"
            )
        value = copy.deepcopy(value)
        sparse_format = value.get("format")
        if sparse_format in _SPARSITY_STRUCTURES:
            raise InvalidOptionsError(
                f"sparsity_config format {sparse_format!r} is a sparsity structure, "
                "not a format: use for example {'format': 'sparse-24-bitmask', "
                f"'sparsity_structure': {sparse_format!r}}}"
            )
        if sparse_format not in SPARSITY_FORMATS:
            raise InvalidOptionsError(
                f"sparsity_config has format {sparse_format!r}: expected one of "
                f"{', '.join(SPARSITY_FORMATS)}, for example "
                "{'format': 'sparse-24-bitmask', 'sparsity_structure': '2:4', "
                "'targets': ['Linear'], 'ignore': ['lm_head']}"
            )
        _check_sparsity_fields(value)
        return value

    @model_validator(mode="after")
    def _check_combinations(self) -> CompressionOptions:
        if self.quantization is not None:
            _check_patterns("ignore", self.quantization.ignore or [])
            for group in self.quantization.config_groups.values():
                _check_patterns("targets", group.targets)
        if not self.save_compressed and self.quantization_format not in (None, "dense"):
            raise InvalidOptionsError(
                f"save_compressed=False writes dense weights, so quantization_format "
                f"must be None or 'dense', not {self.quantization_format!r}"
            )
        return self


# Keys of compressed-tensors' SparsityCompressionConfig dump; the registry
# flag is accepted so that a config read from config.json can be passed back.
_SPARSITY_KEYS = (
    "format",
    "targets",
    "ignore",
    "global_sparsity",
    "sparsity_structure",
    "registry_requires_subclass",
)


def _check_sparsity_fields(value: dict[str, Any]) -> None:
    unknown = sorted(set(value) - set(_SPARSITY_KEYS))
    if unknown:
        raise InvalidOptionsError(
            f"sparsity_config has unknown keys {unknown}: it takes "
            f"{', '.join(_SPARSITY_KEYS)}"
        )
    for key in ("targets", "ignore"):
        entries = value.get(key)
        if entries is None:
            continue
        if isinstance(entries, str) or not all(isinstance(entry, str) for entry in entries):
            raise InvalidOptionsError(
                f"sparsity_config {key} must be a list of module names, 're:' regexes or "
                f"class names, not {entries!r}; for example ['Linear'] or ['lm_head']"
            )
        value[key] = list(entries)
    sparsity = value.get("global_sparsity")
    if sparsity is not None and (
        isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity <= 1
    ):
        raise InvalidOptionsError(
            f"sparsity_config global_sparsity must be a fraction from 0 to 1, not {sparsity!r}"
        )
    structure = value.get("sparsity_structure")
    if structure is not None and not _is_sparsity_structure(structure):
        raise InvalidOptionsError(
            f"sparsity_config sparsity_structure {structure!r} is invalid: use "
            "'unstructured', '2:4' or another 'N:M', or leave it out to infer it"
        )
    if value["format"] == "sparse-24-bitmask" and structure is not None and structure != "2:4":
        raise InvalidOptionsError(
            f"sparsity_config format 'sparse-24-bitmask' stores 2:4 weights only, but "
            f"sparsity_structure is {structure!r}; use format 'sparse-bitmask' for other "
            "structures"
        )


def _is_sparsity_structure(structure: Any) -> bool:
    if not isinstance(structure, str):
        return False
    if structure.strip().lower() == "unstructured":
        return True
    parts = structure.split(":")
    return len(parts) == 2 and all(part.strip().isdigit() for part in parts)


def _check_patterns(label: str, entries: list[str] | tuple[str, ...]) -> None:
    for entry in entries:
        if not isinstance(entry, str):
            raise InvalidOptionsError(f"{label} entries must be strings, got {entry!r}")
        if entry.startswith("re:"):
            try:
                re.compile(entry[3:])
            except re.error as error:
                raise InvalidOptionsError(
                    f"{label} entry {entry!r} is not a valid regular expression: {error}"
                ) from None


def _describe_validation_error(error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "options"
        if item["type"] == "extra_forbidden":
            problems.append(
                f"unknown option {field!r}: CompressionOptions takes "
                f"{', '.join(CompressionOptions.model_fields)}"
            )
            continue
        cause = item.get("ctx", {}).get("error")
        if isinstance(cause, InvalidOptionsError):
            problems.append(str(cause))
            continue
        message = item["msg"].removeprefix("Value error, ")
        problems.append(f"{field}: {message}" if item["loc"] else message)
    return "; ".join(problems)
