"""The tensorpress command line: exit codes, inspect --json, decompress, verify."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import GOLDEN_DIR
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from tensorpress.cli import main

SOURCE = GOLDEN_DIR / "model_untied"


def test_compress_exit_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["compress", str(SOURCE), str(tmp_path / "out"), "--scheme", "W4A16", "--quiet"])

    assert status == 0
    written = (tmp_path / "out" / "model.safetensors").read_bytes()
    assert written == (GOLDEN_DIR / "W4A16_float32" / "model.safetensors").read_bytes()
    assert "model.safetensors" in capsys.readouterr().out


def test_unknown_scheme_exit_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["compress", str(SOURCE), str(tmp_path / "out"), "--scheme", "NOPE", "--quiet"])

    assert status == 1
    error = capsys.readouterr().err
    assert error.startswith("tensorpress: error: unknown quantization scheme 'NOPE'")
    assert "Traceback" not in error


def test_missing_folder_exit_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["compress", str(tmp_path / "absent"), str(tmp_path / "out"), "--scheme", "W4A16"])

    assert status == 1
    assert "not found" in capsys.readouterr().err


def test_sparsity_rejected_with_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    arguments = ["compress", str(SOURCE), str(tmp_path / "out"), "--scheme", "W4A16", "--sparsity", "sparse-24-bitmask"]

    status = main(arguments)

    assert status == 1
    assert "--sparsity sparse-24-bitmask" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "arguments",
    [[], ["bogus"], ["compress", "a"], ["compress", "a", "b"], ["compress", "a", "b", "--scheme", "W4A16", "--workers", "0"]],
)
def test_usage_errors_exit_two(arguments: list[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        main(arguments)

    assert raised.value.code == 2


def test_module_entry_point_runs(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "tensorpress", "inspect", str(GOLDEN_DIR / "W4A16_float32"), "--json"],
        capture_output=True,
        text=True,
        check=False,
    )

    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["format"] == "pack-quantized"


def test_inspect_json_content(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["inspect", str(GOLDEN_DIR / "W4A16_float32"), "--json"])

    summary = json.loads(capsys.readouterr().out)
    assert status == 0
    assert summary["format"] == "pack-quantized"
    assert summary["quantization_status"] == "compressed"
    assert summary["schemes"]["group_0"]["targets"] == ["Linear"]
    assert summary["schemes"]["group_0"]["weights"]["num_bits"] == 4
    assert summary["ignore"] == ["lm_head"]
    assert summary["quantized_modules"] == 14
    assert summary["weight_files"] == {"model.safetensors": 426736}
    assert summary["stored_bytes"] == 421600
    assert summary["dense_bytes"] == 1444352
    assert summary["compression_ratio"] == pytest.approx(3.426, abs=1e-3)


def test_inspect_text_on_dense_folder(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["inspect", str(SOURCE)])

    output = capsys.readouterr().out
    assert status == 0
    assert "dense (no quantization_config)" in output
    assert "compression ratio: 1.0" in output


@pytest.mark.parametrize("case", ["W4A16_float32", "NVFP4A16_bfloat16", "FP8_BLOCK_float32", "W8A8_bfloat16"])
def test_verify_golden_folders(case: str, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["verify", str(GOLDEN_DIR / case)])

    assert status == 0, capsys.readouterr().err


def test_verify_reports_wrong_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_bytes((GOLDEN_DIR / "W4A16_float32" / "config.json").read_bytes())
    tensors = load_file(GOLDEN_DIR / "W4A16_float32" / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight_scale"
    tensors[name] = tensors[name][:, :0].contiguous()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})

    status = main(["verify", str(folder)])

    error = capsys.readouterr().err
    assert status == 1
    assert f"{name}: dtype F32 shape [128, 0], but the config expects dtype F32 shape [128, 1]" in error


def test_decompress_loads_in_transformers(tmp_path: Path) -> None:
    assert main(["compress", str(SOURCE), str(tmp_path / "packed"), "--scheme", "W8A16", "--quiet",
                 "--max-shard-size", "300KB"]) == 0

    status = main(["decompress", str(tmp_path / "packed"), str(tmp_path / "dense"), "--quiet"])

    assert status == 0
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "quantization_config" not in config
    original = AutoModelForCausalLM.from_pretrained(SOURCE)
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    input_ids = torch.tensor([[1, 5, 9, 13, 42]])
    with torch.no_grad():
        expected = original(input_ids).logits
        actual = dense(input_ids).logits
    cosine = torch.nn.functional.cosine_similarity(expected.flatten(), actual.flatten(), dim=0)
    assert cosine > 0.999
    assert dense.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    assert main(["verify", str(tmp_path / "dense")]) == 0
