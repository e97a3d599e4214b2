"""Kill a tensorpress writer at every file-system step and report what the destination held.

Run as ``python atomic_kill_driver.py WORKDIR WRITER...``; prints a JSON object
of one report per writer. A writer name ending in ":fallback" runs without
the atomic swap (as on systems without renameat2). tests/test_atomic_kill.py
runs it in a subprocess.

The driver imports everything once, builds the previous and the expected new
contents of the destination, then for kill point k = 0, 1, 2, ... forks a
child that runs the writer and sends itself SIGKILL at its k-th step. A step
is a call to one of the functions in `STEPS` (file writes, JSON writes,
renames, folder removal), and each is killed before the call, after it, or,
for file writes, after writing half the file. After every kill the
destination must hold exactly the previous or the new contents, and the next
save must succeed and leave no temporary sibling behind. The sweep ends at
the first k that the writer finishes without reaching.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
from pathlib import Path

import torch

import tensorpress.writer as writer_module
from tensorpress import CompressionOptions, save_pretrained
from tensorpress.checkpoint import compress_checkpoint, decompress_checkpoint, pipeline, shards
from tensorpress.cli import main as cli_main

GOLDEN_SOURCE = Path(__file__).resolve().parent / "fixtures" / "golden" / "model_untied"


def folder_state(folder: Path) -> dict[str, str] | None:
    """Return relative path -> file bytes (hex) of everything under `folder`, or None if absent."""
    if not folder.exists():
        return None
    state = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            state[str(path.relative_to(folder))] = path.read_bytes().hex()
    return state


class Killer:
    """Counts steps and sends SIGKILL to this process at step number `target`."""

    def __init__(self, target: int):
        self.target = target
        self.count = 0

    def wrap(self, original, path_of, modes):  # type: ignore[no-untyped-def]
        """Return `original` with one kill point per mode: "before", "half" or "after" the call."""

        def step(*args, **kwargs):  # type: ignore[no-untyped-def]
            for mode in modes:
                if self.count == self.target:
                    if mode != "before":
                        original(*args, **kwargs)
                    if mode == "half":
                        path = Path(path_of(*args, **kwargs))
                        data = path.read_bytes()
                        path.write_bytes(data[: len(data) // 2])
                    os.kill(os.getpid(), signal.SIGKILL)
                self.count += 1
            return original(*args, **kwargs)

        return step


def install(killer: Killer, fallback: bool) -> None:
    """Wrap every file-system step of the writers with `killer`."""
    hf = sys.modules["tensorpress.adapters.hf"]
    file_writes = [
        # Whichever of the two the shard writer calls: save_file or its replacement.
        (writer_module, "save_file", lambda tensors, path, **_: path),
        (writer_module, "write_safetensors_file", lambda tensors, path, **_: path),
        (shards, "write_shard", lambda path, *_, **__: path),
        (writer_module, "write_json", lambda path, *_, **__: path),
        (pipeline, "write_json", lambda path, *_, **__: path),
        (shards, "write_json", lambda path, *_, **__: path),
        (hf, "write_json", lambda path, *_, **__: path),
    ]
    for module, name, path_of in file_writes:
        if hasattr(module, name):
            setattr(module, name, killer.wrap(getattr(module, name), path_of, ("before", "half", "after")))
    for name in ("replace", "rename"):
        setattr(os, name, killer.wrap(getattr(os, name), None, ("before", "after")))
    shutil.rmtree = killer.wrap(shutil.rmtree, None, ("before",))
    if fallback:
        writer_module._exchange = lambda first, second: False
    else:
        writer_module._exchange = killer.wrap(writer_module._exchange, None, ("before", "after"))


def writers(work: Path):  # type: ignore[no-untyped-def]
    """Return the destination and name -> (write previous, write new) for every writer under test."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4, vocab_size=64)
    )
    packed_w8 = work / "packed_w8"
    packed_w4 = work / "packed_w4"
    compress_checkpoint(GOLDEN_SOURCE, packed_w8, CompressionOptions.for_scheme("W8A16"))
    compress_checkpoint(GOLDEN_SOURCE, packed_w4, CompressionOptions.for_scheme("W4A16"), max_shard_size="150KB")
    destination = work / "dst"

    def save(scheme: str, shard: str):  # type: ignore[no-untyped-def]
        options = CompressionOptions.for_scheme(scheme, ignore=["lm_head"])
        return lambda: save_pretrained(model, destination, quantization=options.quantization, max_shard_size=shard)

    def compress(scheme: str, shard: str):  # type: ignore[no-untyped-def]
        options = CompressionOptions.for_scheme(scheme)
        return lambda: compress_checkpoint(GOLDEN_SOURCE, destination, options, max_shard_size=shard)

    def decompress(source: Path, shard: str):  # type: ignore[no-untyped-def]
        return lambda: decompress_checkpoint(source, destination, max_shard_size=shard)

    def cli(source: Path, shard: str):  # type: ignore[no-untyped-def]
        return lambda: cli_main(["decompress", str(source), str(destination), "--quiet", "--max-shard-size", shard])

    return destination, {
        "save_pretrained": (save("W8A16", "50GB"), save("W4A16", "40KB")),
        "compress_checkpoint": (compress("W8A16", "5GB"), compress("W4A16", "150KB")),
        "compress_checkpoint_fresh": (None, compress("W4A16", "150KB")),
        "decompress_checkpoint": (decompress(packed_w8, "5GB"), decompress(packed_w4, "400KB")),
        "cli_decompress": (decompress(packed_w8, "5GB"), cli(packed_w4, "400KB")),
    }


def run(destination: Path, write_previous, write_new, fallback: bool) -> dict:  # type: ignore[no-untyped-def]
    work = destination.parent
    shutil.rmtree(destination, ignore_errors=True)
    shutil.rmtree(work / "pristine", ignore_errors=True)

    # The new contents include carried-over files, so build them on top of the previous ones.
    if write_previous is not None:
        write_previous()
        (destination / "tokenizer.json").write_text('{"kept": true}\n')
    previous = folder_state(destination)
    pristine = work / "pristine"
    if destination.exists():
        shutil.copytree(destination, pristine)
    write_new()
    expected = folder_state(destination)

    report = {"points": 0, "killed_with_previous": 0, "killed_with_new": 0, "killed_absent": 0, "failures": [], "cleanups": 0}
    target = 0
    while True:
        shutil.rmtree(destination, ignore_errors=True)
        if pristine.exists():
            shutil.copytree(pristine, destination)
        pid = os.fork()
        if pid == 0:
            install(Killer(target), fallback)
            try:
                write_new()
            except BaseException:  # noqa: BLE001 - any failure is reported by exit status
                os._exit(1)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        if os.WIFEXITED(status):
            if os.WEXITSTATUS(status) != 0:
                report["failures"].append(f"point {target}: the writer failed with status {os.WEXITSTATUS(status)}")
            elif folder_state(destination) != expected:
                report["failures"].append(f"point {target}: an uninterrupted write gave other contents")
            break
        report["points"] += 1
        state = folder_state(destination)
        if state == previous:
            report["killed_with_previous"] += 1
        elif state == expected:
            report["killed_with_new"] += 1
        elif state is None and fallback:
            # Without an atomic swap the destination is briefly absent, and
            # the next save restores the old contents from the .old sibling.
            report["killed_absent"] += 1
        else:
            files = sorted(state or {})
            report["failures"].append(f"point {target}: the destination holds a mix: {files}")

        leftovers = [path.name for path in work.iterdir() if path.name.startswith(".dst.")]
        if leftovers:
            # The next save must succeed and remove what the killed one left.
            write_new()
            report["cleanups"] += 1
            remaining = [path.name for path in work.iterdir() if path.name.startswith(".dst.")]
            if remaining or folder_state(destination) != expected:
                report["failures"].append(f"point {target}: the next save left {remaining} or other contents")
        target += 1
    return report


if __name__ == "__main__":
    torch.set_num_threads(1)  # forked children must not inherit a busy thread pool
    logging.basicConfig(level=logging.ERROR)
    workdir = Path(sys.argv[1])
    destination, table = writers(workdir)
    reports = {}
    for argument in sys.argv[2:]:
        name, _, variant = argument.partition(":")
        reports[argument] = run(destination, *table[name], fallback=variant == "fallback")
    print(json.dumps(reports))
