"""Save a transformers model as a compressed-tensors checkpoint and reload it.

Run: python examples/save_pretrained_llama.py [--output FOLDER] [--scheme W4A16]

The model is a tiny Llama with seeded random weights, built from a
LlamaConfig so that no download is needed. A real model from
``AutoModelForCausalLM.from_pretrained(...)`` is saved the same way. The
script reloads the folder with transformers, checks that it contains
the weights tensorpress decompresses to, and prints how close its logits are to
the original model's.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.utils.quantization_config import CompressedTensorsConfig

from tensorpress import CompressionOptions, decompress_state_dict, save_pretrained


def build_model() -> LlamaForCausalLM:
    """Return a seeded two-layer bfloat16 Llama small enough for a test."""
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
    return LlamaForCausalLM(config).to(torch.bfloat16).eval()


def main(output: Path, scheme: str) -> None:
    model = build_model()
    options = CompressionOptions.for_scheme(scheme, targets=["Linear"], ignore=["lm_head"])

    # Same call shape as llmcompressor's patched model.save_pretrained(output),
    # but the model is left as it was.
    result = save_pretrained(model, output, quantization=options.quantization)
    print(f"wrote {output}: format {result.config['format']}, files {sorted(p.name for p in output.iterdir())}")

    reloaded = AutoModelForCausalLM.from_pretrained(
        output, quantization_config=CompressedTensorsConfig(run_compressed=False)
    ).eval()
    decompressed = decompress_state_dict(result.tensors, result.config, dtype=torch.bfloat16)
    loaded = reloaded.state_dict()
    for name, weight in decompressed.items():
        assert torch.equal(loaded[name], weight), f"transformers loaded other values for {name}"
    print(f"transformers loaded the {len(decompressed)} tensors that tensorpress decompresses to")

    input_ids = torch.tensor([[1, 17, 42, 99, 7, 200]])
    with torch.no_grad():
        expected = model(input_ids).logits.float()
        actual = reloaded(input_ids).logits.float()
    cosine = torch.nn.functional.cosine_similarity(expected.flatten(), actual.flatten(), dim=0).item()
    print(f"cosine similarity of the logits, original vs {scheme}: {cosine:.4f}")

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, help="folder to write (default: a temporary folder)")
    parser.add_argument("--scheme", default="W4A16", help="compressed-tensors preset scheme (default: W4A16)")
    arguments = parser.parse_args()
    main(arguments.output or Path(tempfile.mkdtemp(prefix="tensorpress-example-")), arguments.scheme)
