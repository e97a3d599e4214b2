"""Write a compressed-tensors checkpoint from Flax-style numpy weights.

Run: python examples/flax_numpy_checkpoint.py [--output FOLDER] [--scheme W4A16]

Frameworks such as JAX/Flax keep parameters as a nested dict of arrays, with
bfloat16 from the ml_dtypes package. This script builds such a tree for a
tiny Llama with numpy and ml_dtypes only (``jax.device_get(params)`` returns
the same kind of tree), flattens it to the dotted names of transformers'
LlamaForCausalLM, compresses it and writes config.json and model.safetensors.
It then reloads the folder with transformers to check it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np

from tensorpress import CompressionOptions, compress_state_dict
from tensorpress.writer import write_safetensors_shards

# A tiny Llama. The hidden and intermediate sizes are multiples of 128, so
# the group size of W4A16 divides every Linear layer's input features.
LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "vocab_size": 256,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "dtype": "bfloat16",
}


def build_flax_params(seed: int = 0) -> dict:
    """Return a Flax-style parameter tree: Dense layers hold a (in, out) "kernel"."""
    rng = np.random.default_rng(seed)
    hidden = LLAMA_CONFIG["hidden_size"]
    intermediate = LLAMA_CONFIG["intermediate_size"]
    kv_width = LLAMA_CONFIG["num_key_value_heads"] * LLAMA_CONFIG["head_dim"]
    vocab = LLAMA_CONFIG["vocab_size"]

    def dense(features_in: int, features_out: int) -> dict:
        kernel = rng.standard_normal((features_in, features_out)) * 0.02
        return {"kernel": kernel.astype(ml_dtypes.bfloat16)}

    def norm() -> dict:
        return {"scale": np.ones(hidden, dtype=ml_dtypes.bfloat16)}

    layers = {
        str(index): {
            "self_attn": {
                "q_proj": dense(hidden, hidden),
                "k_proj": dense(hidden, kv_width),
                "v_proj": dense(hidden, kv_width),
                "o_proj": dense(hidden, hidden),
            },
            "mlp": {
                "gate_proj": dense(hidden, intermediate),
                "up_proj": dense(hidden, intermediate),
                "down_proj": dense(intermediate, hidden),
            },
            "input_layernorm": norm(),
            "post_attention_layernorm": norm(),
        }
        for index in range(LLAMA_CONFIG["num_hidden_layers"])
    }
    embedding = (rng.standard_normal((vocab, hidden)) * 0.02).astype(ml_dtypes.bfloat16)
    return {
        "model": {"embed_tokens": {"embedding": embedding}, "layers": layers, "norm": norm()},
        "lm_head": dense(hidden, vocab),
    }


def flatten_to_torch_names(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """Flatten a Flax tree to transformers' dotted names and layouts.

    Flax names a Dense layer's matrix "kernel" and stores it as (in, out).
    torch's Linear calls it "weight" and stores it as (out, in), so kernels
    are transposed, which gives a strided view and no copy. Flax's
    "embedding" and "scale" are torch's "weight".
    """
    flat: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten_to_torch_names(value, f"{prefix}{key}."))
        elif key == "kernel":
            flat[f"{prefix}weight"] = value.T
        elif key in ("embedding", "scale"):
            flat[f"{prefix}weight"] = value
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def write_checkpoint(output: Path, scheme: str) -> dict:
    """Compress the Flax weights and write a transformers folder; return config.json's content."""
    state_dict = flatten_to_torch_names(build_flax_params())
    options = CompressionOptions.for_scheme(scheme, targets=["Linear"], ignore=["lm_head"])
    result = compress_state_dict(state_dict, options)

    output.mkdir(parents=True, exist_ok=True)
    # write_safetensors_shards makes the transposed passthrough tensors
    # (lm_head) contiguous, as safetensors requires.
    write_safetensors_shards(output, result.tensors, max_shard_size="5GB")
    config = {**LLAMA_CONFIG, "quantization_config": result.config}
    (output / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return config


def check_with_transformers(output: Path) -> None:
    """Reload the folder with transformers and check it against tensorpress's own decompression."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    from tensorpress import decompress_state_dict
    from tensorpress.arrays import as_tensor_mapping

    reloaded = AutoModelForCausalLM.from_pretrained(
        output, quantization_config=CompressedTensorsConfig(run_compressed=False)
    ).eval()

    config = json.loads((output / "config.json").read_text())["quantization_config"]
    decompressed = decompress_state_dict(load_file(output / "model.safetensors"), config, dtype=torch.bfloat16)
    loaded = reloaded.state_dict()
    for name, weight in decompressed.items():
        assert torch.equal(loaded[name], weight), f"transformers loaded other values for {name}"
    print(f"transformers loaded the {len(decompressed)} tensors that tensorpress decompresses to")

    dense = LlamaForCausalLM(LlamaConfig(**LLAMA_CONFIG)).to(torch.bfloat16).eval()
    dense.load_state_dict(dict(as_tensor_mapping(flatten_to_torch_names(build_flax_params()))))
    input_ids = torch.tensor([[1, 17, 42, 99, 7, 200]])
    with torch.no_grad():
        expected = dense(input_ids).logits.float()
        actual = reloaded(input_ids).logits.float()
    cosine = torch.nn.functional.cosine_similarity(expected.flatten(), actual.flatten(), dim=0).item()
    print(f"cosine similarity of the logits, dense vs compressed: {cosine:.4f}")


def main(output: Path, scheme: str, check: bool) -> None:
    config = write_checkpoint(output, scheme)
    print(f"wrote {output}: format {config['quantization_config']['format']}, "
          f"files {sorted(path.name for path in output.iterdir())}")
    if check:
        check_with_transformers(output)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, help="folder to write (default: a temporary folder)")
    parser.add_argument("--scheme", default="W4A16", help="compressed-tensors preset scheme (default: W4A16)")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip reloading the folder with transformers")
    arguments = parser.parse_args()
    main(arguments.output or Path(tempfile.mkdtemp(prefix="tensorpress-example-")), arguments.scheme, arguments.check)
