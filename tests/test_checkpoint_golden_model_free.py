"""compress_checkpoint against llmcompressor 0.14.0.1's ``model_free_ptq`` on the same folders.

tests/fixtures/make_golden_model_free.py recorded what the peer writes
(tensor digests, index and config entry) for each case. The outputs agree
except where the two differ by design:

- Embeddings: the peer's "Linear" target matches every ``*.weight`` whose
  module name does not end in "norm" (``match_quantizable_tensors`` of
  compressed-tensors 0.19.0), so it quantizes
  ``model.embed_tokens``. tensorpress builds the model on the meta device
  and matches by class, so the embedding stays dense and keeps the
  source's bytes.
- Config group name: the peer names the group after the preset ("W4A16"),
  tensorpress names it "group_0" as llmcompressor's ``oneshot`` does.
- Weight observer in the config: the peer writes null, tensorpress writes
  "memoryless_minmax" as ``oneshot`` does. The field names how scales were
  computed; the tensors are the same.
- ``sparsity_config``: tensorpress writes an empty one, as ``oneshot``'s
  save_pretrained does; the peer writes none.
- ``ignore`` with a regex: tensorpress lists the Linear modules the
  patterns matched, as ``oneshot``'s save_pretrained does; the peer copies
  the patterns as given. Both select the same modules.
- Files: the peer writes one output shard per input shard, with the input
  shard's name, and always writes an index. tensorpress splits at
  ``max_shard_size`` (default "5GB"), so these small inputs give one
  model.safetensors and no index. Tensors are compared by name.
- Shard layouts: for NVFP4A16 the peer raises when one shard contains the
  q_proj of two layers before their k_proj and v_proj (the case
  "NVFP4A16_three_shards"). tensorpress compresses that folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import raw_bytes

from tensorpress import CompressionOptions
from tensorpress.checkpoint import compress_checkpoint, open_checkpoint

FIXTURES = Path(__file__).resolve().parent / "fixtures"
GOLDEN = FIXTURES / "golden_model_free"
CASES = sorted(path.stem for path in GOLDEN.glob("*.json") if path.stem != "versions")
EMBEDDING = "model.embed_tokens"


def load_make_source():
    """Import `make_source` from the fixture script, which needs no llmcompressor at import."""
    spec = importlib.util.spec_from_file_location("make_golden_model_free", FIXTURES / "make_golden_model_free.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_source


make_source = load_make_source()


def digest(tensor: torch.Tensor) -> dict:
    return {
        "dtype": str(tensor.dtype).removeprefix("torch."),
        "shape": list(tensor.shape),
        "sha256": hashlib.sha256(raw_bytes(tensor).numpy().tobytes()).hexdigest(),
    }


def folder_digests(folder: Path) -> dict[str, dict]:
    source = open_checkpoint(folder)
    return {name: digest(tensor) for name, tensor in source.read(list(source.tensors)).items()}


def load_record(case: str) -> dict:
    return json.loads((GOLDEN / f"{case}.json").read_text())


@pytest.fixture(scope="module")
def compressed(tmp_path_factory: pytest.TempPathFactory):
    """Return compress_case(case) -> (source folder, output folder), compressing each case once."""
    folders: dict[str, tuple[Path, Path]] = {}

    def compress_case(case: str) -> tuple[Path, Path]:
        if case not in folders:
            record = load_record(case)
            root = tmp_path_factory.mktemp(case)
            source = make_source(record["source"], root / "source")
            options = CompressionOptions.for_scheme(record["scheme"], ignore=record["ignore"])
            compress_checkpoint(source, root / "out", options)
            folders[case] = (source, root / "out")
        return folders[case]

    return compress_case


PEER_SUCCEEDED = [case for case in CASES if "error" not in load_record(case)]


def test_cases_recorded() -> None:
    assert len(CASES) >= 8
    schemes = {load_record(case)["scheme"] for case in CASES}
    assert schemes == {"W4A16", "FP8_DYNAMIC", "NVFP4A16"}


@pytest.mark.parametrize("case", PEER_SUCCEEDED)
def test_tensors_match_peer(compressed, case: str) -> None:
    record = load_record(case)
    source, output = compressed(case)

    written = folder_digests(output)

    expected = {name: entry for name, entry in record["tensors"].items() if not name.startswith(f"{EMBEDDING}.")}
    expected[f"{EMBEDDING}.weight"] = digest(open_checkpoint(source)[f"{EMBEDDING}.weight"])
    assert sorted(written) == sorted(expected)
    for name, entry in expected.items():
        assert written[name] == entry, f"{name} differs from model_free_ptq's"


@pytest.mark.parametrize("case", PEER_SUCCEEDED)
def test_peer_quantized_embedding(case: str) -> None:
    record = load_record(case)

    names = [name for name in record["tensors"] if name.startswith(f"{EMBEDDING}.")]

    assert f"{EMBEDDING}.weight_scale" in names
    assert len(names) >= 2


@pytest.mark.parametrize("case", PEER_SUCCEEDED)
def test_config_matches_peer(compressed, case: str) -> None:
    record = load_record(case)
    _, output = compressed(case)

    written = json.loads((output / "config.json").read_text())["quantization_config"]

    peer = dict(record["quantization_config"])
    ours = dict(written)
    assert list(peer["config_groups"]) == [record["scheme"]]
    assert list(ours["config_groups"]) == ["group_0"]
    ours_group = ours.pop("config_groups")["group_0"]
    peer_group = peer.pop("config_groups")[record["scheme"]]
    assert ours_group["weights"].pop("observer") == "memoryless_minmax"
    assert peer_group["weights"].pop("observer") is None
    assert ours_group == peer_group
    assert ours.pop("sparsity_config") == {}
    assert peer.pop("ignore") == record["ignore"]
    if record["ignore"] == ["lm_head"]:
        assert ours.pop("ignore") == ["lm_head"]
    else:
        assert sorted(ours.pop("ignore")) == sorted(
            ["lm_head"] + [f"model.layers.1.mlp.{name}" for name in ("gate_proj", "up_proj", "down_proj")]
        )
    ours.pop("version")
    peer.pop("version")
    assert ours == peer


@pytest.mark.parametrize("case", PEER_SUCCEEDED)
def test_other_files_match_peer(compressed, case: str) -> None:
    record = load_record(case)
    _, output = compressed(case)

    files = sorted(path.name for path in output.iterdir())

    peer_weights = {name for name in record["files"] if "safetensors" in name}
    assert [name for name in files if "safetensors" not in name] == [
        name for name in record["files"] if "safetensors" not in name
    ]
    assert set(record["weight_map"].values()) | {"model.safetensors.index.json"} == peer_weights
    assert [name for name in files if "safetensors" in name] == ["model.safetensors"]


def test_peer_failure_layout_compresses(compressed) -> None:
    record = load_record("NVFP4A16_three_shards")
    assert "twice before completing set" in record["error"]
    _, output = compressed("NVFP4A16_three_shards")
    single = load_record("NVFP4A16_single")

    written = folder_digests(output)

    for name, entry in single["tensors"].items():
        if not name.startswith(f"{EMBEDDING}."):
            assert written[name] == entry, f"{name} differs from model_free_ptq's single-file output"
