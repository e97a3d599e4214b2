"""Run every script in examples/ as a user would, on its tiny built-in model."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


# Each run imports torch, compressed-tensors and mostly transformers, which
# takes seconds, so the fixture starts every run at once and each test waits
# for its own.
RUNS = {
    "state_dict_w4a16": ("compress_state_dict.py", "--scheme", "W4A16"),
    "state_dict_nvfp4": ("compress_state_dict.py", "--scheme", "NVFP4A16"),
    "save_pretrained": ("save_pretrained_llama.py",),
    "flax": ("flax_numpy_checkpoint.py",),
    "flax_no_check": ("flax_numpy_checkpoint.py", "--scheme", "FP8_DYNAMIC", "--no-check"),
    "cli": ("cli_compress_folder.py",),
}


@pytest.fixture(scope="module")
def example_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ExampleRun]]:
    runs = {}
    for key, (script, *arguments) in RUNS.items():
        output = tmp_path_factory.mktemp(key)
        process = subprocess.Popen(
            [sys.executable, str(EXAMPLES / script), "--output", str(output), *arguments],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        runs[key] = ExampleRun(script, output, process)
    yield runs
    for run in runs.values():
        if run.process.poll() is None:
            run.process.kill()
            run.process.communicate()


class ExampleRun:
    """One example started by the fixture: the script, its output folder and process."""

    def __init__(self, script: str, output: Path, process: subprocess.Popen[str]) -> None:
        self.script = script
        self.output = output
        self.process = process

    def stdout(self) -> str:
        """Wait for the run; return its stdout, failing with its stderr when it failed."""
        stdout, stderr = self.process.communicate(timeout=600)
        assert self.process.returncode == 0, (
            f"{self.script} exited with {self.process.returncode}:\n{stderr}"
        )
        return stdout


def test_every_example_is_tested() -> None:
    tested = {
        "compress_state_dict.py",
        "save_pretrained_llama.py",
        "flax_numpy_checkpoint.py",
        "cli_compress_folder.py",
    }

    assert {path.name for path in EXAMPLES.glob("*.py")} == tested


@pytest.mark.parametrize(("key", "scheme"), [("state_dict_w4a16", "W4A16"), ("state_dict_nvfp4", "NVFP4A16")])
def test_compress_state_dict_example(example_runs: dict[str, ExampleRun], key: str, scheme: str) -> None:
    run = example_runs[key]
    stdout = run.stdout()

    assert (run.output / "model.safetensors").is_file()
    config = json.loads((run.output / "quantization_config.json").read_text())
    assert config["quant_method"] == "compressed-tensors"
    assert config["ignore"] == ["lm_head"]
    assert f"after {scheme}" in stdout


def test_save_pretrained_example(example_runs: dict[str, ExampleRun]) -> None:
    run = example_runs["save_pretrained"]
    stdout = run.stdout()

    config = json.loads((run.output / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    assert "transformers loaded the 21 tensors that tensorpress decompresses to" in stdout


def test_flax_numpy_example(example_runs: dict[str, ExampleRun]) -> None:
    run = example_runs["flax"]
    stdout = run.stdout()

    config = json.loads((run.output / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["quantization_config"]["ignore"] == ["lm_head"]
    assert "transformers loaded the 21 tensors that tensorpress decompresses to" in stdout


def test_flax_numpy_example_writes_without_torch(example_runs: dict[str, ExampleRun]) -> None:
    # The writing half uses numpy, ml_dtypes and tensorpress only: torch is
    # imported by tensorpress, never by the example's own writing code.
    source = (EXAMPLES / "flax_numpy_checkpoint.py").read_text()
    writing_part = source.split("def check_with_transformers")[0]
    run = example_runs["flax_no_check"]
    run.stdout()

    assert "import torch" not in writing_part
    assert "import jax" not in source
    config = json.loads((run.output / "config.json").read_text())
    assert config["quantization_config"]["format"] == "float-quantized"


def test_cli_example(example_runs: dict[str, ExampleRun]) -> None:
    run = example_runs["cli"]
    stdout = run.stdout()

    assert "python -m tensorpress compress" in stdout
    config = json.loads((run.output / "compressed" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    assert "cosine similarity of the logits" in stdout
