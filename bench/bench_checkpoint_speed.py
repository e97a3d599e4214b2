"""Time compress_checkpoint against llmcompressor's model_free_ptq and oneshot + save_pretrained.

Builds one seeded bf16 Llama checkpoint of about 2 GB (20 layers of
TinyLlama's shapes, shards of at most 1 GB, the builder of
bench_checkpoint_memory.py), then compresses it to each scheme with:

- tensorpress: ``compress_checkpoint`` (one row per ``--workers`` value);
- model_free_ptq: llmcompressor's ``model_free_ptq(..., ignore=["lm_head"],
  device="cpu")`` with its default ``max_workers=1`` (needs ``--peer-python``);
- oneshot: ``AutoModelForCausalLM.from_pretrained(dtype=bfloat16)``, a
  data-free ``oneshot`` with ``QuantizationModifier(targets="Linear",
  scheme=SCHEME, ignore=["lm_head"])``, then ``save_pretrained`` (needs
  ``--peer-python``). Its time includes loading; the save alone is reported
  as well.

Every run is a fresh subprocess that reports the seconds of the call itself
(imports excluded) and its own peak RSS (``ru_maxrss``). The tools take turns
within each repeat, so a load change on a shared machine hits them alike,
and the table shows medians over the repeats with ratios against tensorpress.
The parent process imports no torch, because Linux carries a parent's peak
RSS over fork and exec into a child's ``ru_maxrss``.

Run from the repository root (about 20 GB of free disk for the checkpoint
and one output at a time):

    .venv/bin/python bench/bench_checkpoint_speed.py --peer-python /tmp/peer-new/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_checkpoint_memory import build_in_subprocess

IGNORE = ["lm_head"]

# Each child prints one JSON line: seconds of the measured call and peak RSS.
PEAK_RSS = r"""
import json, resource, time
def report(seconds, **extra):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_mb": peak, **extra}))
"""

TENSORPRESS = PEAK_RSS + r"""
import sys
from tensorpress import CompressionOptions
from tensorpress.checkpoint import compress_checkpoint
import transformers  # noqa: F401  (imported before timing, as compress_checkpoint imports it)
source, output, scheme, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
start = time.perf_counter()
compress_checkpoint(source, output, CompressionOptions.for_scheme(scheme, ignore=["lm_head"]), workers=workers)
report(time.perf_counter() - start)
"""

MODEL_FREE = PEAK_RSS + r"""
import sys
from llmcompressor import model_free_ptq
source, output, scheme = sys.argv[1], sys.argv[2], sys.argv[3]
start = time.perf_counter()
model_free_ptq(source, output, scheme=scheme, ignore=["lm_head"], device="cpu")
report(time.perf_counter() - start)
"""

ONESHOT = PEAK_RSS + r"""
import sys, torch
from transformers import AutoModelForCausalLM
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
source, output, scheme = sys.argv[1], sys.argv[2], sys.argv[3]
start = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"]))
save_start = time.perf_counter()
model.save_pretrained(output, save_compressed=True)
end = time.perf_counter()
report(end - start, save_seconds=end - save_start)
"""


def run_child(python: str, script: str, arguments: list[str], log: Path) -> dict[str, float]:
    """Run one measured compression in a fresh interpreter and return its JSON report."""
    environment = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "a") as output:
        completed = subprocess.run(
            [python, "-c", script, *arguments], stdout=subprocess.PIPE, stderr=output, text=True, env=environment
        )
    if completed.returncode != 0:
        raise RuntimeError(f"{python} {arguments} failed with status {completed.returncode}; see {log}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-python", help="python of a venv with llmcompressor 0.14 (peer rows are skipped without it)")
    parser.add_argument("--schemes", nargs="+", default=["W4A16", "FP8_DYNAMIC"], help="compressed-tensors preset schemes")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="compress_checkpoint worker counts, one row each")
    parser.add_argument("--layers", type=int, default=20, help="Llama layers (20 gives about 2 GB in bf16)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per tool and scheme; the table shows medians")
    parser.add_argument("--skip-oneshot", action="store_true", help="leave out the oneshot + save_pretrained rows")
    args = parser.parse_args()

    tools: list[tuple[str, str, str, list[str]]] = [
        (f"tensorpress workers={workers}", sys.executable, TENSORPRESS, [str(workers)]) for workers in args.workers
    ]
    if args.peer_python:
        tools.append(("model_free_ptq", args.peer_python, MODEL_FREE, []))
        if not args.skip_oneshot:
            tools.append(("oneshot + save_pretrained", args.peer_python, ONESHOT, []))

    started = time.perf_counter()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
          f"load average at start {os.getloadavg()[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="tensorpress-speed-") as root:
        source = Path(root) / "llama"
        total = build_in_subprocess(source, args.layers)
        shards = len(list(source.glob("*.safetensors")))
        print(f"checkpoint: {total / 1e9:.2f} GB bf16, {args.layers} layers, {shards} shards", flush=True)
        log = Path(root) / "children.log"
        results: dict[tuple[str, str], list[dict[str, float]]] = {}
        for scheme in args.schemes:
            for repeat in range(args.repeats):
                for name, python, script, extra in tools:
                    output = Path(root) / "out"
                    try:
                        result = run_child(python, script, [str(source), str(output), scheme, *extra], log)
                    except RuntimeError as error:
                        print(f"{scheme} {name}: {error}\n{log.read_text()[-3000:]}", file=sys.stderr)
                        raise SystemExit(1) from None
                    shutil.rmtree(output)
                    results.setdefault((scheme, name), []).append(result)
                    print(f"  {scheme} run {repeat + 1} {name}: {result['seconds']:.1f} s, "
                          f"peak {result['peak_mb']:.0f} MiB", flush=True)

        print()
        print("| scheme | tool | median time | time / tensorpress w=1 | median peak RSS | RSS / tensorpress w=1 | runs |")
        print("|---|---|---|---|---|---|---|")
        for scheme in args.schemes:
            reference = results[(scheme, tools[0][0])]
            reference_seconds = statistics.median(run["seconds"] for run in reference)
            reference_peak = statistics.median(run["peak_mb"] for run in reference)
            for name, *_ in tools:
                runs = results[(scheme, name)]
                seconds = statistics.median(run["seconds"] for run in runs)
                peak = statistics.median(run["peak_mb"] for run in runs)
                each = ", ".join(f"{run['seconds']:.1f}" for run in runs)
                time_text = f"{seconds:.1f} s"
                if "save_seconds" in runs[0]:
                    time_text += f" (save {statistics.median(run['save_seconds'] for run in runs):.1f} s)"
                print(f"| {scheme} | {name} | {time_text} | {seconds / reference_seconds:.2f}x | "
                      f"{peak:.0f} MiB | {peak / reference_peak:.2f}x | "
                      f"{each} s |")
    print(f"total {time.perf_counter() - started:.0f} s, load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
