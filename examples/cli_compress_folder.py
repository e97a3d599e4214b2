"""Compress a checkpoint folder with the tensorpress command line.

Run: python examples/cli_compress_folder.py [--output FOLDER] [--scheme W4A16]

The script saves a tiny seeded Llama with transformers into FOLDER/dense (a
stand-in for a downloaded checkpoint), then runs

    python -m tensorpress compress FOLDER/dense FOLDER/compressed --scheme W4A16
    python -m tensorpress inspect FOLDER/compressed --json
    python -m tensorpress verify FOLDER/compressed

and reloads FOLDER/compressed with transformers. Installed with pip, the
command is also available as plain ``tensorpress``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.utils.quantization_config import CompressedTensorsConfig


def save_dense_checkpoint(folder: Path) -> None:
    """Save a seeded two-layer bfloat16 Llama as transformers does."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)


def tensorpress(*arguments: str) -> str:
    """Run ``python -m tensorpress ARGUMENTS`` and return its stdout; raise if it fails."""
    command = [sys.executable, "-m", "tensorpress", *arguments]
    print("$", " ".join(["python", *command[1:]]))
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise SystemExit(f"tensorpress {arguments[0]} exited with {completed.returncode}:\n{completed.stderr}")
    return completed.stdout


def main(output: Path, scheme: str) -> None:
    dense, compressed = output / "dense", output / "compressed"
    save_dense_checkpoint(dense)

    print(tensorpress("compress", str(dense), str(compressed), "--scheme", scheme, "--ignore", "lm_head", "--quiet"))
    summary = json.loads(tensorpress("inspect", str(compressed), "--json"))
    print(json.dumps(summary, indent=2))
    print(tensorpress("verify", str(compressed)))

    reloaded = AutoModelForCausalLM.from_pretrained(
        compressed, quantization_config=CompressedTensorsConfig(run_compressed=False)
    )
    original = AutoModelForCausalLM.from_pretrained(dense)
    input_ids = torch.tensor([[1, 17, 42, 99, 7, 200]])
    with torch.no_grad():
        expected = original(input_ids).logits.float()
        actual = reloaded(input_ids).logits.float()
    cosine = torch.nn.functional.cosine_similarity(expected.flatten(), actual.flatten(), dim=0).item()
    print(f"cosine similarity of the logits, dense vs {scheme}: {cosine:.4f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, help="folder to write into (default: a temporary folder)")
    parser.add_argument("--scheme", default="W4A16", help="compressed-tensors preset scheme (default: W4A16)")
    arguments = parser.parse_args()
    main(arguments.output or Path(tempfile.mkdtemp(prefix="tensorpress-example-")), arguments.scheme)
