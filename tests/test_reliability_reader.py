"""The checkpoint reader rejects unsafe or corrupt folders with CheckpointError, before writing."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tensorpress import CheckpointError, CompressionOptions
from tensorpress.checkpoint import compress_checkpoint, open_checkpoint

INDEX = "model.safetensors.index.json"


def two_shards(folder: Path) -> Path:
    """Write a two-shard checkpoint of two Linear modules and its index."""
    folder.mkdir(parents=True)
    save_file({"a.weight": torch.randn(8, 128)}, folder / "model-00001-of-00002.safetensors")
    save_file({"b.weight": torch.randn(8, 128)}, folder / "model-00002-of-00002.safetensors")
    write_index(folder, {"a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors"})
    return folder


def write_index(folder: Path, weight_map: dict) -> None:
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def raw_safetensors(header: dict, data: bytes = b"") -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


def assert_rejected_without_output(folder: Path, tmp_path: Path, message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(folder)
    with pytest.raises(CheckpointError, match=message):
        compress_checkpoint(folder, tmp_path / "out", CompressionOptions.for_scheme("W8A16"))
    assert not (tmp_path / "out").exists()
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith(".out.")]


@pytest.mark.parametrize(
    "target",
    ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors", "..\\outside.safetensors"],
)
def test_index_names_file_outside_folder(tmp_path: Path, target: str) -> None:
    folder = two_shards(tmp_path / "ckpt")
    save_file({"b.weight": torch.randn(8, 128)}, tmp_path / "outside.safetensors")
    write_index(folder, {"a.weight": "model-00001-of-00002.safetensors", "b.weight": target})

    assert_rejected_without_output(folder, tmp_path, "outside the checkpoint folder")


def test_symlinked_shard_leading_out(tmp_path: Path) -> None:
    folder = two_shards(tmp_path / "ckpt")
    outside = tmp_path / "elsewhere.safetensors"
    os.replace(folder / "model-00002-of-00002.safetensors", outside)
    (folder / "model-00002-of-00002.safetensors").symlink_to(outside)

    assert_rejected_without_output(folder, tmp_path, "symlink to .*outside the checkpoint folder")


def test_symlinked_single_file_leading_out(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file({"a.weight": torch.randn(8, 128)}, tmp_path / "elsewhere.safetensors")
    (folder / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")

    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        open_checkpoint(folder)


def test_symlink_inside_folder_accepted(tmp_path: Path) -> None:
    folder = two_shards(tmp_path / "ckpt")
    (folder / "store").mkdir()
    os.replace(folder / "model-00002-of-00002.safetensors", folder / "store" / "b.safetensors")
    (folder / "model-00002-of-00002.safetensors").symlink_to(folder / "store" / "b.safetensors")

    assert sorted(open_checkpoint(folder)) == ["a.weight", "b.weight"]


def test_hub_cache_blob_symlink_accepted(tmp_path: Path) -> None:
    # huggingface_hub's cache layout: snapshots/<revision>/<file> -> ../../blobs/<hash>.
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    save_file({"a.weight": torch.randn(8, 128)}, repo / "blobs" / "f00d")
    (snapshot / "model.safetensors").symlink_to("../../blobs/f00d")

    assert list(open_checkpoint(snapshot)) == ["a.weight"]


def test_duplicate_tensor_across_shards(tmp_path: Path) -> None:
    folder = two_shards(tmp_path / "ckpt")
    save_file(
        {"b.weight": torch.randn(8, 128), "a.weight": torch.randn(8, 128)},
        folder / "model-00002-of-00002.safetensors",
    )

    assert_rejected_without_output(folder, tmp_path, "'a.weight' is stored in both")


def test_index_naming_missing_file(tmp_path: Path) -> None:
    folder = two_shards(tmp_path / "ckpt")
    (folder / "model-00002-of-00002.safetensors").unlink()

    assert_rejected_without_output(folder, tmp_path, "model-00002-of-00002.safetensors not found")


def test_index_naming_missing_tensor(tmp_path: Path) -> None:
    folder = two_shards(tmp_path / "ckpt")
    write_index(
        folder,
        {
            "a.weight": "model-00001-of-00002.safetensors",
            "b.weight": "model-00002-of-00002.safetensors",
            "c.weight": "model-00002-of-00002.safetensors",
        },
    )

    assert_rejected_without_output(folder, tmp_path, "'c.weight'.*no such tensor")


@pytest.mark.parametrize(
    ("index_text", "message"),
    [
        ("{not json", "not valid JSON"),
        ('["weight_map"]', "has no weight_map"),
        ('{"weight_map": {"a.weight": 7}}', "weight_map values must be file names"),
        ('{"weight_map": {"a.weight": ""}}', "weight_map values must be file names"),
    ],
)
def test_malformed_index(tmp_path: Path, index_text: str, message: str) -> None:
    folder = two_shards(tmp_path / "ckpt")
    (folder / INDEX).write_text(index_text)

    assert_rejected_without_output(folder, tmp_path, message)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "shorter than 8 bytes"),
        (struct.pack("<Q", 2**40), "header length"),
        (struct.pack("<Q", 500) + b"{}", "truncated: its header needs 500 bytes"),
        (raw_safetensors([1, 2]), "header is not a JSON object"),
        (raw_safetensors({"__metadata__": {"format": 1}}), "__metadata__"),
        (raw_safetensors({"a.weight": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)), "header entry of 'a.weight' is invalid"),
        (raw_safetensors({"a.weight": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4)), "is invalid"),
        (raw_safetensors({"a.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, bytes(4)), "do not match its shape"),
        (raw_safetensors({"a.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(8)), "4 bytes after its last tensor"),
        (
            raw_safetensors(
                {
                    "a.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                    "b.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                },
                bytes(4),
            ),
            "overlap or leave gaps",
        ),
        (b"\x08\x00\x00\x00\x00\x00\x00\x00" + b'{"a":1,"a":2}'[:8], "invalid header"),
    ],
)
def test_corrupt_safetensors_file(tmp_path: Path, content: bytes, message: str) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(content)

    assert_rejected_without_output(folder, tmp_path, message)


def test_duplicate_header_key(tmp_path: Path) -> None:
    entry = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    header = ('{"a.weight": ' + entry + ', "a.weight": ' + entry + "}").encode()
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))

    assert_rejected_without_output(folder, tmp_path, "duplicate key 'a.weight'")


def test_pickle_index_naming_file_outside(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save({"a.weight": torch.randn(8, 128)}, tmp_path / "outside.bin")
    torch.save({"a.weight": torch.randn(8, 128)}, folder / "pytorch_model.bin")
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"a.weight": "../outside.bin"}}))

    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        compress_checkpoint(folder, tmp_path / "out", CompressionOptions.for_scheme("W8A16"), allow_pickle=True)

    assert not (tmp_path / "out").exists()
