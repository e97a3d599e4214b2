"""Compress a torch state dict with compress_state_dict and write it as safetensors.

Run: python examples/compress_state_dict.py [--output FOLDER] [--scheme W4A16]

The state dict here is a small random MLP block; any ``model.state_dict()``
works the same way. The script writes FOLDER/model.safetensors and
FOLDER/quantization_config.json, then decompresses the tensors again and
prints the largest weight error relative to the largest weight.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tensorpress import CompressionOptions, compress_state_dict, decompress_state_dict


def build_state_dict() -> dict[str, torch.Tensor]:
    """Return a seeded two-layer MLP block in bfloat16, named as in a transformers model."""
    generator = torch.Generator().manual_seed(0)
    hidden, intermediate = 256, 512

    def weight(rows: int, columns: int) -> torch.Tensor:
        return (torch.randn(rows, columns, generator=generator) * 0.02).to(torch.bfloat16)

    return {
        "model.layers.0.mlp.up_proj.weight": weight(intermediate, hidden),
        "model.layers.0.mlp.down_proj.weight": weight(hidden, intermediate),
        "model.layers.0.post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        "lm_head.weight": weight(128, hidden),
    }


def main(output: Path, scheme: str) -> None:
    state_dict = build_state_dict()
    options = CompressionOptions.for_scheme(scheme, targets=["Linear"], ignore=["lm_head"])
    result = compress_state_dict(state_dict, options)

    output.mkdir(parents=True, exist_ok=True)
    save_file(dict(result.tensors), str(output / "model.safetensors"), metadata={"format": "pt"})
    (output / "quantization_config.json").write_text(json.dumps(result.config, indent=2) + "\n")

    for name, tensor in result.tensors.items():
        print(f"{name:52} {str(tensor.dtype):15} {tuple(tensor.shape)}")

    reloaded = load_file(str(output / "model.safetensors"))
    dense = decompress_state_dict(reloaded, result.config, dtype=torch.bfloat16)
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        original = state_dict[name].float()
        error = ((dense[name].float() - original).abs().max() / original.abs().max()).item()
        print(f"{name}: max error {error:.3f} of the largest weight after {scheme}")
        # fp4 rounds to within about 1/6 of a group's largest value; the rest
        # of the margin covers the rounding of the scales themselves.
        assert error < 0.25, f"{name}: decompressed weight is off by {error:.3f}"
    print(f"wrote {output} (format {result.config['format']})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, help="folder to write (default: a temporary folder)")
    parser.add_argument("--scheme", default="W4A16", help="compressed-tensors preset scheme (default: W4A16)")
    arguments = parser.parse_args()
    main(arguments.output or Path(tempfile.mkdtemp(prefix="tensorpress-example-")), arguments.scheme)
