"""Measure compress_checkpoint's peak RSS on ~2 GB and ~4 GB synthetic Llama checkpoints.

Each checkpoint is a seeded bf16 Llama folder (config.json, shards of at
most 1 GB and an index) with the same tensor shapes, so only the layer count
differs. Each compression runs in a fresh subprocess that reports its own
peak RSS (resource.getrusage ru_maxrss) and the RSS right after its imports,
so the numbers exclude the process that built the files. Linux carries the
parent's peak RSS over fork and exec into the child's ru_maxrss. So the
parent imports no torch and builds each checkpoint in another subprocess.
The child also reports VmHWM from /proc/self/status as a cross-check. Flat peak RSS
between the two sizes shows that memory does not grow with the checkpoint.

Run from the repository root (takes a few minutes and ~10 GB of disk):

    .venv/bin/python bench/bench_checkpoint_memory.py [--scheme W4A16] [--workers 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Llama-shaped dimensions (TinyLlama 1.1B): every tensor is the same size in
# both checkpoints, only the number of layers changes.
HIDDEN = 2048
INTERMEDIATE = 5632
HEADS = 32
KV_HEADS = 4
VOCAB = 32000
MAX_SHARD_BYTES = 1_000_000_000

CHILD = r"""
import json, resource, sys, time
import tensorpress.checkpoint  # imports torch, compressed-tensors and transformers
from tensorpress import CompressionOptions
from tensorpress.checkpoint import compress_checkpoint
import transformers  # noqa: F401  (loaded before the baseline is taken)

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20

def hwm_mb():
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024

baseline = rss_mb()
start = time.perf_counter()
compress_checkpoint(sys.argv[1], sys.argv[2], CompressionOptions.for_scheme(sys.argv[3]),
                    workers=int(sys.argv[4]))
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"baseline_mb": baseline, "peak_mb": peak, "hwm_mb": hwm_mb(), "seconds": seconds}))
"""


def layer_shapes(layer: int) -> dict[str, tuple[int, ...]]:
    head_dim = HIDDEN // HEADS
    prefix = f"model.layers.{layer}"
    return {
        f"{prefix}.input_layernorm.weight": (HIDDEN,),
        f"{prefix}.post_attention_layernorm.weight": (HIDDEN,),
        f"{prefix}.self_attn.q_proj.weight": (HIDDEN, HIDDEN),
        f"{prefix}.self_attn.k_proj.weight": (KV_HEADS * head_dim, HIDDEN),
        f"{prefix}.self_attn.v_proj.weight": (KV_HEADS * head_dim, HIDDEN),
        f"{prefix}.self_attn.o_proj.weight": (HIDDEN, HIDDEN),
        f"{prefix}.mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
        f"{prefix}.mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
        f"{prefix}.mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
    }


def build_checkpoint(folder: Path, layers: int, seed: int = 0) -> int:
    """Write a seeded bf16 Llama checkpoint into `folder`; return its tensor bytes."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for layer in range(layers):
        shapes.update(layer_shapes(layer))
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)

    generator = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    total = 0
    for name, shape in shapes.items():
        tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        if shard_bytes + tensor.nbytes > MAX_SHARD_BYTES and shards[-1]:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += tensor.nbytes
        total += tensor.nbytes

    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        filename = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / filename, metadata={"format": "pt"})
        weight_map.update({name: filename for name in shard})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB,
        "dtype": "bfloat16",
        "tie_word_embeddings": False,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return total


def build_in_subprocess(folder: Path, layers: int) -> int:
    completed = subprocess.run(
        [sys.executable, __file__, "--build", str(folder), str(layers)],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(completed.stdout.split()[0])


def measure(source: Path, output: Path, scheme: str, workers: int) -> dict[str, float]:
    completed = subprocess.run(
        [sys.executable, "-c", CHILD, str(source), str(output), scheme, str(workers)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--build":
        print(build_checkpoint(Path(sys.argv[2]), int(sys.argv[3])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scheme", default="W4A16", help="compressed-tensors preset scheme")
    parser.add_argument("--workers", type=int, default=1, help="compress_checkpoint workers")
    parser.add_argument("--layers", type=int, nargs="+", default=[20, 43],
                        help="layer counts of the checkpoints (20 and 43 give ~2 GB and ~4 GB)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per checkpoint")
    args = parser.parse_args()

    start = time.perf_counter()
    largest = VOCAB * HIDDEN * 2 / 2**20
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}; "
          f"scheme {args.scheme}, workers {args.workers}; largest tensor {largest:.0f} MiB")
    print("| checkpoint | layers | shards | baseline RSS | peak RSS (ru_maxrss) | VmHWM | peak - baseline | time |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="tensorpress-bench-") as root:
        for layers in args.layers:
            source = Path(root) / f"llama-{layers}"
            total = build_in_subprocess(source, layers)
            shards = len(list(source.glob("*.safetensors")))
            for repeat in range(args.repeats):
                output = Path(root) / f"out-{layers}-{repeat}"
                result = measure(source, output, args.scheme, args.workers)
                shutil.rmtree(output)
                print(f"| {total / 1e9:.2f} GB | {layers} | {shards} | "
                      f"{result['baseline_mb']:.0f} MiB | {result['peak_mb']:.0f} MiB | {result['hwm_mb']:.0f} MiB | "
                      f"{result['peak_mb'] - result['baseline_mb']:.0f} MiB | {result['seconds']:.1f} s |",
                      flush=True)
            shutil.rmtree(source)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
