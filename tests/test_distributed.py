"""Ranks splitting compress_checkpoint: torchrun on CPU, and ranks simulated on threads."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import GOLDEN_DIR
from safetensors.torch import load_file, save_file
from test_checkpoint import folder_bytes, write_three_shards

from tensorpress import CheckpointError, CompressionOptions, InvalidTensorError
from tensorpress.checkpoint import compress_checkpoint, decompress_checkpoint
from tensorpress.distributed import Ranks, ranks_from_environment

SOURCE = GOLDEN_DIR / "model_untied"
REPOSITORY = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ThreadRanks(Ranks):
    """Ranks simulated by threads of one process, exchanging values through shared lists."""

    def __init__(self, rank: int, world_size: int, slots: list[Any], barrier: threading.Barrier):
        self.rank = rank
        self.world_size = world_size
        self._slots = slots
        self._barrier = barrier

    def all_gather(self, value: Any) -> list[Any]:
        self._slots[self.rank] = value
        self._barrier.wait()
        gathered = list(self._slots)
        self._barrier.wait()
        return gathered


def run_ranks(world_size: int, call: Callable[[Ranks], Any]) -> list[Any]:
    """Run `call` on `world_size` simulated ranks; return each rank's result or exception."""
    slots: list[Any] = [None] * world_size
    barrier = threading.Barrier(world_size, timeout=60)
    outcomes: list[Any] = [None] * world_size

    def target(rank: int) -> None:
        try:
            outcomes[rank] = call(ThreadRanks(rank, world_size, slots, barrier))
        except Exception as error:  # returned to the test, which checks it
            outcomes[rank] = error

    threads = [threading.Thread(target=target, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a simulated rank hung"
    return outcomes


def test_torchrun_two_ranks_match_one_process(tmp_path: Path) -> None:
    source = write_three_shards(tmp_path / "sharded")
    compress_checkpoint(
        source, tmp_path / "one", CompressionOptions.for_scheme("NVFP4A16"), max_shard_size="150KB"
    )
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        environment.pop(name, None)

    launched = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}",
            "-m", "tensorpress", "compress", str(source), str(tmp_path / "two"),
            "--scheme", "NVFP4A16", "--max-shard-size", "150KB", "--quiet",
        ],
        capture_output=True, text=True, timeout=120, env=environment, cwd=REPOSITORY, check=False,
    )

    assert launched.returncode == 0, launched.stderr[-4000:]
    written = folder_bytes(tmp_path / "two")
    assert sorted(written) == sorted(folder_bytes(tmp_path / "one"))
    assert written == folder_bytes(tmp_path / "one")
    assert len([name for name in written if name.endswith(".safetensors")]) > 2
    assert launched.stdout.count("wrote ") == 1
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []


@pytest.mark.parametrize("scheme", ["W4A16", "NVFP4A16", "FP8_BLOCK", "W8A8"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_simulated_ranks_match_one_process(tmp_path: Path, scheme: str, world_size: int) -> None:
    source = write_three_shards(tmp_path / "sharded")
    options = CompressionOptions.for_scheme(scheme)
    compress_checkpoint(source, tmp_path / "one", options, max_shard_size="150KB")

    outcomes = run_ranks(
        world_size,
        lambda ranks: compress_checkpoint(source, tmp_path / "many", options, max_shard_size="150KB", ranks=ranks),
    )

    for outcome in outcomes:
        assert not isinstance(outcome, Exception), outcome
    assert folder_bytes(tmp_path / "many") == folder_bytes(tmp_path / "one")
    assert {tuple(outcome.weight_files) for outcome in outcomes} == {tuple(outcomes[0].weight_files)}


def test_fused_partners_split_across_ranks() -> None:
    sizes = {
        "model.layers.0.self_attn.q_proj": 4,
        "model.layers.0.self_attn.k_proj": 1,
        "model.layers.0.self_attn.v_proj": 1,
        "model.layers.0.self_attn.o_proj": 4,
    }
    first = ThreadRanks(0, 2, [None, None], threading.Barrier(2))
    second = ThreadRanks(1, 2, [None, None], threading.Barrier(2))

    owned_first = first.assign_modules(sizes)
    owned_second = second.assign_modules(sizes)

    assert owned_first | owned_second == set(sizes)
    assert owned_first & owned_second == set()
    assert "model.layers.0.self_attn.q_proj" in owned_first
    assert "model.layers.0.self_attn.k_proj" in owned_second


def test_simulated_ranks_decompress_match(tmp_path: Path) -> None:
    compress_checkpoint(SOURCE, tmp_path / "packed", CompressionOptions.for_scheme("W4A16"), max_shard_size="150KB")
    decompress_checkpoint(tmp_path / "packed", tmp_path / "one", max_shard_size="300KB")

    outcomes = run_ranks(
        2, lambda ranks: decompress_checkpoint(tmp_path / "packed", tmp_path / "two", max_shard_size="300KB", ranks=ranks)
    )

    for outcome in outcomes:
        assert not isinstance(outcome, Exception), outcome
    assert folder_bytes(tmp_path / "two") == folder_bytes(tmp_path / "one")


def test_failure_on_one_rank_raises_on_all(tmp_path: Path) -> None:
    source = write_three_shards(tmp_path / "sharded")
    index = json.loads((source / "model.safetensors.index.json").read_text())
    bad = "model.layers.1.mlp.up_proj.weight"
    shard = source / index["weight_map"][bad]
    tensors = load_file(shard)
    tensors[bad][0, 0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})

    outcomes = run_ranks(
        2, lambda ranks: compress_checkpoint(source, tmp_path / "out", CompressionOptions.for_scheme("W4A16"), ranks=ranks)
    )

    raised = [type(outcome) for outcome in outcomes]
    assert sorted(raised, key=lambda kind: kind.__name__) == [CheckpointError, InvalidTensorError]
    message = str(next(outcome for outcome in outcomes if type(outcome) is CheckpointError))
    assert "failed to compress its modules" in message
    assert "up_proj.weight contains 1 NaN" in message
    assert sorted(path.name for path in tmp_path.iterdir()) == ["sharded"]


def test_environment_without_world_size_gives_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)

    with ranks_from_environment() as ranks:
        assert ranks is None


def test_invalid_world_size_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "two")

    with pytest.raises(CheckpointError, match="WORLD_SIZE='two' is not an integer"):
        with ranks_from_environment():
            pass


def test_simulated_ranks_convert_pickle(tmp_path: Path) -> None:
    source = tmp_path / "pickled"
    source.mkdir()
    (source / "config.json").write_bytes((SOURCE / "config.json").read_bytes())
    torch.save(load_file(SOURCE / "model.safetensors"), source / "pytorch_model.bin")
    options = CompressionOptions.for_scheme("W4A16")

    outcomes = run_ranks(
        2, lambda ranks: compress_checkpoint(source, tmp_path / "out", options, allow_pickle=True, ranks=ranks)
    )

    for outcome in outcomes:
        assert not isinstance(outcome, Exception), outcome
    written = (tmp_path / "out" / "model.safetensors").read_bytes()
    assert written == (GOLDEN_DIR / "W4A16_float32" / "model.safetensors").read_bytes()
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
