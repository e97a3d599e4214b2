"""Numpy arrays and lazy tensor sources in and out of `compress_state_dict`.

Frameworks other than torch (JAX/Flax, MLX, TensorFlow) hand over weights
as numpy arrays, with bfloat16 and float8 dtypes from the ``ml_dtypes``
package. This module turns those into torch tensors, without a copy where
the bytes can be viewed as the torch dtype. It wraps lazy sources such as an
open safetensors file, so each tensor is read only when compression reaches
it, and it turns results back into numpy arrays.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from tensorpress.errors import InvalidOptionsError, InvalidTensorError

__all__ = [
    "RETURN_TYPES",
    "check_return_type",
    "as_tensor_mapping",
    "to_tensor",
    "to_numpy",
    "to_numpy_mapping",
    "LazyTensors",
]

RETURN_TYPES = ("torch", "numpy")

# ml_dtypes dtype name -> the torch dtype with the same bit layout. numpy
# reports these dtypes by name only once ml_dtypes is imported.
_ML_DTYPES_TO_TORCH = {
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "float8_e4m3fnuz": torch.float8_e4m3fnuz,
    "float8_e5m2fnuz": torch.float8_e5m2fnuz,
    "float8_e8m0fnu": torch.float8_e8m0fnu,
}
_TORCH_TO_ML_DTYPES = {torch_dtype: name for name, torch_dtype in _ML_DTYPES_TO_TORCH.items()}

# Unsigned integer dtypes of each item size, used to reinterpret bytes.
_NUMPY_UINTS = {1: np.uint8, 2: np.uint16}
_TORCH_UINTS = {1: torch.uint8, 2: torch.uint16}


def check_return_type(return_type: str) -> None:
    """Raise InvalidOptionsError unless `return_type` is "torch" or "numpy"."""
    if return_type not in RETURN_TYPES:
        raise InvalidOptionsError(
            f"return_type={return_type!r} is invalid: use 'torch' for torch tensors or "
            "'numpy' for numpy arrays"
        )


def _ml_dtypes() -> Any | None:
    try:
        return importlib.import_module("ml_dtypes")
    except ImportError:
        return None


def to_tensor(name: str, value: Any) -> torch.Tensor:
    """Return `value` (a torch tensor or numpy array) as a torch tensor, sharing memory where possible.

    Torch tensors are returned as they are. Numpy arrays share their memory
    with the result unless their byte order is not the machine's or a stride
    is negative, in which case they are copied. bfloat16 and float8 arrays
    from ml_dtypes are reinterpreted bit for bit as the matching torch dtype.

    Raises:
        InvalidTensorError: `value` is neither, or its dtype has no torch
            equivalent. The message names the tensor and the dtype to use.
    """
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.generic):
        value = np.asarray(value)
    if not isinstance(value, np.ndarray):
        raise InvalidTensorError(
            f"{name}: expected a torch.Tensor or numpy array, got {type(value).__name__}; "
            "convert it with numpy.asarray() or torch.as_tensor() first"
        )

    dtype = value.dtype
    if not dtype.isnative:
        value = value.astype(dtype.newbyteorder("="))
    if any(stride < 0 for stride in value.strides):
        value = value.copy()

    torch_dtype = _ML_DTYPES_TO_TORCH.get(dtype.name)
    if torch_dtype is not None:
        raw = value.view(_NUMPY_UINTS[dtype.itemsize])
        return _from_numpy(raw).view(torch_dtype)
    _check_numpy_dtype(name, dtype)
    try:
        return _from_numpy(value)
    except TypeError:
        raise InvalidTensorError(
            f"{name} has numpy dtype {dtype}, which torch cannot hold; pass a numeric "
            "array (float32, float16, ml_dtypes.bfloat16, int8, ...)"
        ) from None


def _from_numpy(array: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():
        # Read-only arrays (memory-mapped files, JAX buffers) are shared as
        # they are: compression never writes into its inputs.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def _check_numpy_dtype(name: str, dtype: np.dtype) -> None:
    if dtype.kind == "V" and dtype.fields is None and dtype.name.startswith("void"):
        raise InvalidTensorError(
            f"{name} has the raw numpy dtype {dtype.str}, which is how numpy stores "
            "bfloat16 and float8 values when ml_dtypes is not installed; run "
            "`pip install ml_dtypes` and pass array.view(ml_dtypes.bfloat16) (or the "
            "float8 dtype it contains), or pass the weights as float32"
        )
    if dtype.type.__module__.startswith("ml_dtypes"):
        raise InvalidTensorError(
            f"{name} has dtype {dtype.name}, which torch has no dtype for; cast it to "
            "float32 or ml_dtypes.bfloat16 (array.astype(...)) before compressing"
        )


class LazyTensors(Mapping[str, torch.Tensor]):
    """A read-only mapping that loads and converts one tensor per lookup.

    Nothing is cached, so memory holds only the tensors that the caller
    keeps. A name that compression looks up twice (a weight whose class is
    guessed from its shape, then compressed) is read twice.
    """

    def __init__(self, names: list[str], load: Callable[[str], Any]) -> None:
        self._names = names
        self._known = frozenset(names)
        self._load = load

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._known:
            raise KeyError(name)
        return to_tensor(name, self._load(name))

    def __contains__(self, name: object) -> bool:
        # Mapping's default __contains__ would load the tensor.
        return name in self._known

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def as_tensor_mapping(state_dict: Any) -> Mapping[str, torch.Tensor]:
    """Return `state_dict` as a mapping of names to torch tensors.

    A ``dict`` is converted at once: torch tensors are kept as the same
    objects, numpy arrays become tensors that share their memory, and a
    dict of torch tensors only is returned unchanged. An open safetensors
    file (``safe_open(...)``, read through ``get_tensor``) and any other
    object with ``keys()`` and ``__getitem__`` are wrapped in `LazyTensors`,
    so each tensor is read when it is needed.

    Raises:
        InvalidTensorError: `state_dict` is not a mapping, a name is not a
            string, or a value (checked on access for lazy sources) is not a
            tensor or array torch can hold.
    """
    if isinstance(state_dict, dict):
        _check_names(state_dict.keys())
        converted = {name: to_tensor(name, value) for name, value in state_dict.items()}
        if all(converted[name] is state_dict[name] for name in converted):
            return state_dict
        return converted
    if hasattr(state_dict, "keys") and hasattr(state_dict, "get_tensor"):
        names = list(state_dict.keys())
        _check_names(names)
        return LazyTensors(names, state_dict.get_tensor)
    if hasattr(state_dict, "keys") and hasattr(state_dict, "__getitem__"):
        names = list(state_dict.keys())
        _check_names(names)
        return LazyTensors(names, state_dict.__getitem__)
    raise InvalidTensorError(
        f"state_dict must be a mapping of tensor names to tensors or numpy arrays (or an "
        f"open safetensors file), not {type(state_dict).__name__}"
    )


def _check_names(names: Any) -> None:
    for name in names:
        if not isinstance(name, str):
            raise InvalidTensorError(
                f"tensor name {name!r} is not a string; key the state dict by dotted "
                "names such as 'model.layers.0.mlp.up_proj.weight'"
            )


def to_numpy(name: str, tensor: torch.Tensor) -> np.ndarray:
    """Return `tensor` as a numpy array that shares its memory (CPU tensors).

    bfloat16 and float8 tensors become ml_dtypes arrays with the same bytes.

    Raises:
        InvalidTensorError: the dtype needs ml_dtypes and it is not
            installed, or numpy has no equivalent dtype.
    """
    tensor = tensor.detach().cpu()
    ml_name = _TORCH_TO_ML_DTYPES.get(tensor.dtype)
    if ml_name is None:
        try:
            return tensor.numpy()
        except TypeError as error:
            raise InvalidTensorError(
                f"{name} has dtype {tensor.dtype}, which numpy cannot hold ({error}); "
                "use return_type='torch'"
            ) from None
    ml_dtypes = _ml_dtypes()
    if ml_dtypes is None:
        raise InvalidTensorError(
            f"{name} has dtype {tensor.dtype}, which numpy supports only through ml_dtypes; "
            "run `pip install ml_dtypes`, or use return_type='torch'"
        )
    raw = tensor.view(_TORCH_UINTS[tensor.element_size()]).numpy()
    return raw.view(getattr(ml_dtypes, ml_name))


def to_numpy_mapping(tensors: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Return `tensors` with every tensor converted by `to_numpy`, in the same order."""
    return {name: to_numpy(name, tensor) for name, tensor in tensors.items()}
