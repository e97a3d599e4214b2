"""Compare tensorpress' speed with compressed-tensors' compressors and llmcompressor's save.

The benchmark builds seeded bf16 Llama checkpoints: hidden 2048, 12 layers,
vocab 32000 and about 0.86 B parameters, plus a smaller and a larger one.
Every measurement runs in a fresh subprocess. Each round alternates
between the contenders, and the tables report the median of the rounds:

- compress: ``compress_state_dict`` against compressed-tensors 0.20's
  per-module compressors (``calculate_qparams`` on amin/amax over the
  strategy's groups, as llmcompressor's default observer computes them,
  then the format's ``compress`` classmethod) for W4A16, W8A8, FP8_DYNAMIC
  and NVFP4A16. Both start from the state dict in memory.
- save: ``tensorpress.save_pretrained`` against llmcompressor 0.14's
  patched ``save_pretrained`` after a data-free W4A16 ``oneshot`` (only the
  save is timed), when ``--peer-python`` names a venv with llmcompressor.
- write: tensorpress' safetensors writer against
  ``safetensors.torch.save_file`` on the same compressed tensors.

Each subprocess reports its wall time and peak RSS (``ru_maxrss``). Linux
carries a parent's peak RSS into a child's ``ru_maxrss``, so this parent
process never imports torch. Throughput is GB of input weights (bf16
bytes of the whole state dict) per second.

Run from the repository root (about 12 minutes on 2 cores, 8 GB of disk):

    .venv/bin/python bench/bench_speed.py --peer-python /tmp/peer-new/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# name -> (hidden, intermediate, layers, attention heads); vocab 32000 for all.
SIZES = {
    "small": (1024, 2816, 8, 16),
    "base": (2048, 7168, 12, 16),
    "large": (2048, 7168, 24, 16),
}
VOCAB = 32000
SCHEMES = ("W4A16", "W8A8", "FP8_DYNAMIC", "NVFP4A16")
FORMATS = {
    "W4A16": "pack-quantized",
    "W8A8": "int-quantized",
    "FP8_DYNAMIC": "float-quantized",
    "NVFP4A16": "nvfp4-pack-quantized",
}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report(**values: object) -> None:
    print(json.dumps({**values, "peak_rss_mib": peak_rss_mib()}))


# Subprocess entry points. Each imports what it needs, so that the peer venv
# (which has no tensorpress) can run the peer's.


def build_model(folder: Path, size: str) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    hidden, intermediate, layers, heads = SIZES[size]
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=VOCAB,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    generator = torch.Generator().manual_seed(0)

    def weight(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * 0.02).to(torch.bfloat16)

    tensors = {"model.embed_tokens.weight": weight(VOCAB, hidden)}
    for layer in range(layers):
        prefix = f"model.layers.{layer}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[f"{prefix}.self_attn.{name}.weight"] = weight(hidden, hidden)
        tensors[f"{prefix}.mlp.gate_proj.weight"] = weight(intermediate, hidden)
        tensors[f"{prefix}.mlp.up_proj.weight"] = weight(intermediate, hidden)
        tensors[f"{prefix}.mlp.down_proj.weight"] = weight(hidden, intermediate)
        tensors[f"{prefix}.input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        tensors[f"{prefix}.post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    tensors["model.norm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    tensors["lm_head.weight"] = weight(VOCAB, hidden)
    folder.mkdir(parents=True, exist_ok=True)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _load_state_dict(folder: Path):  # type: ignore[no-untyped-def]
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def run_tensorpress_compress(folder: Path, scheme: str) -> None:
    from tensorpress import CompressionOptions, compress_state_dict

    state_dict = _load_state_dict(folder)
    options = CompressionOptions.for_scheme(scheme, ignore=["lm_head"])
    start = time.perf_counter()
    compress_state_dict(state_dict, options)
    report(seconds=time.perf_counter() - start)


def run_compressed_tensors_compress(folder: Path, scheme: str) -> None:
    import torch
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    state_dict = _load_state_dict(folder)
    preset = preset_name_to_scheme(scheme, ["Linear"])
    args = preset.weights
    compressor = BaseCompressor.get_value_from_registry(FORMATS[scheme])
    start = time.perf_counter()
    output = {}
    for name, weight in state_dict.items():
        if not name.endswith("proj.weight"):
            output[name] = weight
            continue
        # llmcompressor's memoryless min/max observer: amin/amax per qparam.
        if args.strategy == "channel":
            observed = weight.unsqueeze(-2).unsqueeze(0)
        else:
            observed = weight.unflatten(-1, (-1, args.group_size)).unsqueeze(0)
        min_vals = torch.amin(observed, dim=(0, -1))
        max_vals = torch.amax(observed, dim=(0, -1))
        global_scale = None
        if args.strategy == "tensor_group":
            # NOTE: per module; llmcompressor shares it across q/k/v and gate/up.
            absmax = torch.max(-min_vals.min(), max_vals.max()).reshape(1)
            global_scale = generate_gparam(-absmax, absmax)
        scale, zero_point = calculate_qparams(min_vals, max_vals, args, global_scale=global_scale)
        local = {"weight": weight, "weight_scale": scale.to(weight.dtype), "weight_zero_point": zero_point}
        if global_scale is not None:
            local["weight_global_scale"] = global_scale
        module = name[: -len(".weight")]
        for key, tensor in compressor.compress(local, preset).items():
            output[f"{module}.{key}"] = tensor
    report(seconds=time.perf_counter() - start)


def run_tensorpress_save(folder: Path, scheme: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from tensorpress import CompressionOptions, save_pretrained

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    options = CompressionOptions.for_scheme(scheme, ignore=["lm_head"])
    with tempfile.TemporaryDirectory(dir=folder.parent) as output:
        start = time.perf_counter()
        save_pretrained(model, output, quantization=options.quantization)
        report(seconds=time.perf_counter() - start)


def run_peer_save(folder: Path, scheme: str) -> None:
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    recipe = QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"])
    oneshot(model=model, recipe=recipe)
    with tempfile.TemporaryDirectory(dir=folder.parent) as output:
        start = time.perf_counter()
        model.save_pretrained(output)
        report(seconds=time.perf_counter() - start)


def run_writer(folder: Path, writer: str) -> None:
    from safetensors.torch import save_file

    from tensorpress import CompressionOptions, compress_state_dict
    from tensorpress.safetensors_file import write_safetensors_file

    state_dict = _load_state_dict(folder)
    tensors = dict(compress_state_dict(state_dict, CompressionOptions.for_scheme("W4A16")).tensors)
    del state_dict
    before = peak_rss_mib()
    with tempfile.TemporaryDirectory(dir=folder.parent) as output:
        path = Path(output) / "model.safetensors"
        start = time.perf_counter()
        if writer == "tensorpress":
            write_safetensors_file(tensors, path, metadata={"format": "pt"})
        else:
            save_file(tensors, str(path), metadata={"format": "pt"})
        report(seconds=time.perf_counter() - start, peak_before_write_mib=before)


WORKERS = {
    "tensorpress-compress": run_tensorpress_compress,
    "compressed-tensors-compress": run_compressed_tensors_compress,
    "tensorpress-save": run_tensorpress_save,
    "peer-save": run_peer_save,
    "writer": run_writer,
}

# The parent: builds folders, alternates subprocesses, prints the tables.


def run_child(python: str, kind: str, folder: Path, argument: str) -> dict:
    command = [python, __file__, "--child", kind, str(folder), argument]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"{kind} {argument} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def input_gigabytes(size: str) -> float:
    hidden, intermediate, layers, _ = SIZES[size]
    per_layer = 4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden
    return (2 * VOCAB * hidden + layers * per_layer + hidden) * 2 / 1e9


def measure(rounds: int, jobs: list[tuple[str, str, str, Path, str]]) -> dict[str, list[dict]]:
    """Run every job once per round, in order, and return label -> results."""
    results: dict[str, list[dict]] = {}
    for round_number in range(rounds):
        for label, python, kind, folder, argument in jobs:
            result = run_child(python, kind, folder, argument)
            results.setdefault(label, []).append(result)
            print(f"round {round_number + 1}: {label}: {result['seconds']:.2f} s", file=sys.stderr)
    return results


def median(results: list[dict], key: str) -> float:
    return statistics.median(result[key] for result in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-python", help="python of a venv with llmcompressor 0.14 (optional)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per measurement (default: 3)")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "tensorpress-bench-speed"),
                        help="folder for the generated checkpoints (kept between runs)")
    parser.add_argument("--sizes", default="small,base,large", help="model sizes to measure")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "FOLDER", "ARGUMENT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, folder, argument = args.child
        WORKERS[kind](Path(folder), argument)
        return

    python = sys.executable
    work = Path(args.work)
    sizes = args.sizes.split(",")
    for size in sizes:
        folder = work / size
        if not (folder / "model.safetensors").exists():
            print(f"building the {size} checkpoint in {folder}", file=sys.stderr)
            subprocess.run([python, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                            f"import bench_speed; from pathlib import Path; "
                            f"bench_speed.build_model(Path({str(folder)!r}), {size!r})"], check=True)

    # Saves and writes run on the base model, or the first size when base is left out.
    save_size = "base" if "base" in sizes else sizes[0]
    base = work / save_size
    compress_jobs = []
    for size in sizes:
        schemes = SCHEMES if size == "base" else ("W4A16",)
        for scheme in schemes:
            for kind, name in (("tensorpress-compress", "tensorpress"), ("compressed-tensors-compress", "compressed-tensors")):
                compress_jobs.append((f"compress|{size}|{scheme}|{name}", python, kind, work / size, scheme))
    save_jobs = [(f"save|{save_size}|W4A16|tensorpress", python, "tensorpress-save", base, "W4A16")]
    if args.peer_python:
        save_jobs.append((f"save|{save_size}|W4A16|llmcompressor", args.peer_python, "peer-save", base, "W4A16"))
    writer_jobs = [
        (f"write|{save_size}|W4A16|{name}", python, "writer", base, name) for name in ("tensorpress", "save_file")
    ]

    results = measure(args.rounds, compress_jobs + save_jobs + writer_jobs)
    print_tables(results, args)


def print_tables(results: dict[str, list[dict]], args: argparse.Namespace) -> None:
    print(f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"{args.rounds} rounds, medians.\n")
    print("| task | model | scheme | contender | time | GB/s of input | peak RSS | speedup |")
    print("|---|---|---|---|---|---|---|---|")
    groups: dict[tuple[str, str, str], dict[str, list[dict]]] = {}
    for label, runs in results.items():
        task, size, scheme, name = label.split("|")
        groups.setdefault((task, size, scheme), {})[name] = runs
    for (task, size, scheme), contenders in groups.items():
        names = list(contenders)
        reference = median(contenders[names[-1]], "seconds")
        for name in names:
            seconds = median(contenders[name], "seconds")
            rss = median(contenders[name], "peak_rss_mib")
            speedup = f"{reference / seconds:.1f}x" if name != names[-1] else "1.0x"
            print(f"| {task} | {size} ({input_gigabytes(size):.2f} GB) | {scheme} | {name} | {seconds:.2f} s | "
                  f"{input_gigabytes(size) / seconds:.2f} | {rss:.0f} MiB | {speedup} |")


if __name__ == "__main__":
    main()
