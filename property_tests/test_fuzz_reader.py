"""Fuzz the checkpoint reader with corrupt headers, truncated files and hostile index files.

The only allowed outcome of reading a damaged folder is a TensorpressError
(or a clean read of what is really there): never another exception, never
a hang and never a file opened outside the folder. A Python audit hook
records every file the reader opens. safetensors reads tensors in Rust,
which the hook does not see, but only from paths whose header an audited
Python read returned first.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from tensorpress import TensorpressError
from tensorpress.checkpoint import open_checkpoint
from tensorpress.checkpoint.inspect import inspect_checkpoint

# A per-example deadline catches slow paths; the alarm below catches hangs,
# which a Hypothesis deadline cannot interrupt.
FUZZ_SETTINGS = settings(
    max_examples=300,
    deadline=5000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
HANG_SECONDS = 20
INDEX = "model.safetensors.index.json"

_opened: list[str] | None = None


def _audit(event: str, args: tuple) -> None:  # type: ignore[type-arg]
    if _opened is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


@contextmanager
def watched(root: Path, folder: Path) -> Iterator[None]:
    """Fail on a hang, and on any file opened under `root` but outside `folder`."""
    global _opened

    def hang(signum, frame):  # type: ignore[no-untyped-def]
        raise AssertionError(f"reading {folder} took more than {HANG_SECONDS} s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(HANG_SECONDS)
    _opened = []
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        opened, _opened = _opened, None
    inside = folder.resolve()
    for path in opened:
        resolved = Path(path).resolve()
        if root in resolved.parents and resolved != inside and inside not in resolved.parents:
            raise AssertionError(f"the reader opened {path} ({resolved}), outside {folder}")


def read_everything(folder: Path) -> dict[str, torch.Tensor]:
    """Open the folder, read every tensor and summarise it, as compress and inspect do."""
    source = open_checkpoint(folder)
    tensors = source.read(list(source))
    inspect_checkpoint(folder)
    return tensors


def shard_bytes(names: list[str]) -> bytes:
    return save({name: torch.full((2, 4), float(position)) for position, name in enumerate(names)}, metadata={"format": "pt"})


SECRET = save({"secret": torch.full((2, 4), 1234.5)})


def fresh_layout(root: Path) -> Path:
    """Write a valid two-shard folder, and outside it a file the reader must never open."""
    folder = root / "ckpt"
    folder.mkdir()
    (root / "secret.safetensors").write_bytes(SECRET)
    (folder / "model-00001-of-00002.safetensors").write_bytes(shard_bytes(["a.weight", "a.bias"]))
    (folder / "model-00002-of-00002.safetensors").write_bytes(shard_bytes(["b.weight"]))
    weight_map = {
        "a.weight": "model-00001-of-00002.safetensors",
        "a.bias": "model-00001-of-00002.safetensors",
        "b.weight": "model-00002-of-00002.safetensors",
    }
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": 96}, "weight_map": weight_map}))
    return folder


def check_outcome(root: Path, folder: Path) -> None:
    with watched(root, folder):
        try:
            tensors = read_everything(folder)
        except TensorpressError:
            return
    for name, tensor in tensors.items():
        assert name != "secret", "the reader returned a tensor from outside the folder"
        if tensor.dtype.is_floating_point and tensor.numel():
            assert not bool((tensor == 1234.5).any()), f"{name} holds the outside file's values"


# ---- corrupt and truncated safetensors files --------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
sizes = st.integers(min_value=-2, max_value=2**64) | st.sampled_from([0, 1, 2, 4, 8, 16, 32])
header_entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I8", "U8", "F8_E4M3", "BOOL", "X", ""]) | json_values,
        "shape": st.lists(sizes, max_size=3) | json_values,
        "data_offsets": st.lists(sizes, min_size=0, max_size=3) | json_values,
    },
)
headers = st.dictionaries(
    st.sampled_from(["a.weight", "a.bias", "b.weight", "__metadata__", "c"]),
    header_entries | json_values,
    max_size=4,
)


@st.composite
def damaged_shard(draw: st.DrawFn) -> bytes:
    """A shard with a fuzzed header, flipped bytes, a wrong length or a cut-off end."""
    original = shard_bytes(["a.weight", "a.bias"])
    kind = draw(st.sampled_from(["header", "flip", "length", "truncate", "append"]))
    if kind == "header":
        encoded = json.dumps(draw(headers)).encode()
        data = draw(st.binary(max_size=64))
        return struct.pack("<Q", len(encoded)) + encoded + data
    if kind == "flip":
        content = bytearray(original)
        for _ in range(draw(st.integers(min_value=1, max_value=8))):
            position = draw(st.integers(min_value=0, max_value=len(content) - 1))
            content[position] = draw(st.integers(min_value=0, max_value=255))
        return bytes(content)
    if kind == "length":
        length = draw(st.integers(min_value=0, max_value=2**64 - 1) | st.integers(min_value=0, max_value=400))
        return struct.pack("<Q", length) + original[8:]
    if kind == "truncate":
        return original[: draw(st.integers(min_value=0, max_value=len(original) - 1))]
    return original + draw(st.binary(min_size=1, max_size=32))


@FUZZ_SETTINGS
@given(shard=damaged_shard())
def test_damaged_shard(shard: bytes) -> None:
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory).resolve()
        folder = fresh_layout(root)
        (folder / "model-00001-of-00002.safetensors").write_bytes(shard)

        check_outcome(root, folder)


# ---- hostile index files ----------------------------------------------------

file_names = st.sampled_from(
    [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "../secret.safetensors",
        "sub/../../secret.safetensors",
        "SECRET_ABSOLUTE",
        "link-out.safetensors",
        "link-in.safetensors",
        "loop.safetensors",
        "missing.safetensors",
        ".",
        "",
        "sub",
        "config.json",
        INDEX,
        "..\\secret.safetensors",
        "model-00001-of-00002.safetensors\x00.txt",
    ]
)
weight_maps = st.dictionaries(
    st.sampled_from(["a.weight", "a.bias", "b.weight", "secret", "x"]),
    file_names | json_values,
    max_size=5,
)


@st.composite
def hostile_index(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["map", "map", "map", "json", "text"]))
    if kind == "text":
        return draw(st.text(max_size=64))
    if kind == "json":
        return json.dumps(draw(json_values))
    metadata = draw(st.fixed_dictionaries({"total_size": st.integers(min_value=-1, max_value=2**80) | json_values}))
    return json.dumps({"metadata": metadata, "weight_map": draw(weight_maps)})


@FUZZ_SETTINGS
@given(index=hostile_index())
def test_hostile_index(index: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory).resolve()
        folder = fresh_layout(root)
        (folder / "sub").mkdir()
        (folder / "link-out.safetensors").symlink_to(root / "secret.safetensors")
        (folder / "link-in.safetensors").symlink_to(folder / "model-00002-of-00002.safetensors")
        (folder / "loop.safetensors").symlink_to(folder / "loop.safetensors")
        (folder / INDEX).write_text(index.replace("SECRET_ABSOLUTE", str(root / "secret.safetensors")))

        check_outcome(root, folder)


@FUZZ_SETTINGS
@given(data=st.binary(max_size=256))
def test_random_bytes_as_single_file(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory).resolve()
        folder = root / "ckpt"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(data)

        check_outcome(root, folder)
