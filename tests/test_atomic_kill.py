"""Writers killed with SIGKILL at every file-system step leave the old or the new folder, never a mix.

tests/atomic_kill_driver.py does the killing in one subprocess (see its
docstring for the kill points); these tests read its report. The unit tests
below cover the clean-up of temporary siblings that killed saves leave.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tensorpress import CompressionOptions
from tensorpress.checkpoint import compress_checkpoint
from tensorpress.writer import atomic_directory

DRIVER = Path(__file__).resolve().parent / "atomic_kill_driver.py"
WRITERS = [
    "save_pretrained",
    "compress_checkpoint",
    "compress_checkpoint_fresh",
    "compress_checkpoint:fallback",
    "decompress_checkpoint",
    "cli_decompress",
]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses fork and renameat2")


@pytest.fixture(scope="module")
def kill_reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    work = tmp_path_factory.mktemp("kill")
    completed = subprocess.run(
        [sys.executable, str(DRIVER), str(work), *WRITERS],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@linux_only
@pytest.mark.parametrize("writer", WRITERS)
def test_killed_writer_leaves_old_or_new(kill_reports: dict[str, dict], writer: str) -> None:
    report = kill_reports[writer]

    assert report["failures"] == []
    assert report["points"] >= 15
    assert report["killed_with_previous"] > 0
    assert report["killed_with_new"] > 0
    assert report["cleanups"] > 0
    if not writer.endswith(":fallback"):
        assert report["killed_absent"] == 0


def test_stale_partial_removed_with_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    stale = tmp_path / ".out.999999999.abcd1234.partial"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half a file")

    with caplog.at_level(logging.INFO, logger="tensorpress.writer"):
        with atomic_directory(tmp_path / "out") as staging:
            (staging / "config.json").write_text("{}")

    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]
    assert any("left by an interrupted save" in message for message in caplog.messages)


def test_running_owner_partial_kept(tmp_path: Path) -> None:
    # The parent of this process is alive, so its temporary folder may belong to a save in progress.
    live = tmp_path / f".out.{os.getppid()}.abcd1234.partial"
    live.mkdir()

    with atomic_directory(tmp_path / "out") as staging:
        (staging / "config.json").write_text("{}")

    assert live.is_dir()


def test_other_destination_partial_kept(tmp_path: Path) -> None:
    other = tmp_path / ".output.999999999.abcd1234.partial"
    other.mkdir()

    with atomic_directory(tmp_path / "out") as staging:
        (staging / "config.json").write_text("{}")

    assert other.is_dir()


def test_backup_restored_when_destination_missing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    backup = tmp_path / ".out.999999999.abcd1234.old"
    backup.mkdir()
    (backup / "tokenizer.json").write_text('{"old": true}')

    with caplog.at_level(logging.WARNING, logger="tensorpress.writer"):
        with atomic_directory(tmp_path / "out") as staging:
            (staging / "config.json").write_text("{}")

    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"old": true}'
    assert any("restored" in message for message in caplog.messages)


def test_failed_save_keeps_old_contents(tmp_path: Path) -> None:
    with atomic_directory(tmp_path / "out") as staging:
        (staging / "model.safetensors").write_bytes(b"old")

    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(tmp_path / "out") as staging:
            (staging / "model.safetensors").write_bytes(b"new, incomplete")
            raise RuntimeError("boom")

    assert (tmp_path / "out" / "model.safetensors").read_bytes() == b"old"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_stale_weights_dropped_only_on_success(tmp_path: Path) -> None:
    destination = tmp_path / "out"
    with atomic_directory(destination) as staging:
        for number in (1, 2, 3):
            (staging / f"model-0000{number}-of-00003.safetensors").write_bytes(b"old")
        (staging / "model.safetensors.index.json").write_text("{}")
        (staging / "tokenizer.json").write_text("{}")

    with pytest.raises(RuntimeError):
        with atomic_directory(destination) as staging:
            (staging / "model.safetensors").write_bytes(b"new")
            raise RuntimeError("interrupted")
    assert len(list(destination.glob("model-*.safetensors"))) == 3

    with atomic_directory(destination) as staging:
        (staging / "model.safetensors").write_bytes(b"new")

    assert sorted(path.name for path in destination.iterdir()) == ["model.safetensors", "tokenizer.json"]


def test_leftover_in_source_not_copied(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    save_file({"proj.weight": torch.randn(16, 128)}, source / "model.safetensors")
    leftover = source / ".sub.123.abcd1234.partial"
    leftover.mkdir()
    save_file({"other.weight": torch.randn(16, 128)}, leftover / "model.safetensors")

    compress_checkpoint(source, tmp_path / "out", CompressionOptions.for_scheme("W8A16"))

    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
