"""Bad inputs raise TensorpressError subclasses that name the problem and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tensorpress import (
    CheckpointError,
    CompressionOptions,
    InvalidOptionsError,
    InvalidTensorError,
    MissingTensorError,
    UnsupportedFormatError,
    compress_state_dict,
    decompress_state_dict,
    save_pretrained,
)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: CompressionOptions.for_scheme("W4A16", targets="Linear"), "targets must be a list"),
        (lambda: CompressionOptions.for_scheme("W4A16", ignore="lm_head"), "ignore must be a list"),
        (lambda: CompressionOptions.for_scheme(4), "scheme must be a preset name"),
        (lambda: CompressionOptions.for_scheme("W9A99"), "unknown quantization scheme"),
        (lambda: CompressionOptions.for_scheme("W4A16", ignore=["re:(["]), "not a valid regular expression"),
        (lambda: CompressionOptions(quantization_format="marlin-24"), "vLLM no longer"),
        (lambda: CompressionOptions(quantization_format="int9"), "unknown quantization_format"),
        (lambda: CompressionOptions(compress=True), "unknown option 'compress'"),
    ],
)
def test_invalid_options_rejected(build, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidOptionsError, match=message):
        build()


@pytest.mark.parametrize(
    ("weight", "message"),
    [
        (torch.randint(0, 5, (8, 128)), "dtype torch.int64"),
        (torch.ones(8, 128, dtype=torch.bool), "dtype torch.bool"),
        (torch.randn(8, 128, dtype=torch.complex64), "dtype torch.complex64"),
        (torch.empty(8, 128, device="meta"), "meta device"),
        (torch.randn(8, 128).to_sparse(), "layout"),
        (torch.full((8, 128), float("nan")), "NaN or Inf"),
        (torch.randn(8, 100), "100 columns"),
    ],
)
def test_bad_weights_rejected(weight: torch.Tensor, message: str) -> None:
    with pytest.raises(InvalidTensorError, match=message) as raised:
        compress_state_dict({"proj.weight": weight}, CompressionOptions.for_scheme("W4A16"))

    assert "proj.weight" in str(raised.value)


def test_non_contiguous_weight_same_bytes() -> None:
    weight = torch.randn(128, 64).t()
    options = CompressionOptions.for_scheme("W4A16")

    strided = compress_state_dict({"proj.weight": weight}, options)
    contiguous = compress_state_dict({"proj.weight": weight.contiguous()}, options)

    for name, tensor in contiguous.tensors.items():
        assert torch.equal(strided.tensors[name], tensor)


def test_static_activation_scale_missing() -> None:
    with pytest.raises(MissingTensorError, match="proj.input_scale is missing"):
        compress_state_dict({"proj.weight": torch.randn(8, 128)}, CompressionOptions.for_scheme("FP8"))


def test_misshapen_weight_scale_rejected() -> None:
    state_dict = {"proj.weight": torch.randn(8, 128), "proj.weight_scale": torch.ones(4, 1)}

    with pytest.raises(InvalidTensorError, match=r"proj.weight_scale has shape \(4, 1\)"):
        compress_state_dict(state_dict, CompressionOptions.for_scheme("W8A16"))


def test_forced_format_that_cannot_hold_scheme() -> None:
    options = CompressionOptions.for_scheme("FP8_DYNAMIC", quantization_format="pack-quantized")

    with pytest.raises(UnsupportedFormatError, match="use 'float-quantized'"):
        compress_state_dict({"proj.weight": torch.randn(8, 128)}, options)


def test_small_asymmetric_weight_round_trips() -> None:
    # Eight rows at 4 bits pack the zero point into one row, which
    # compressed-tensors 0.20.1 cannot unpack under torch 2.13 by itself.
    weight = torch.randn(8, 256)
    result = compress_state_dict({"proj.weight": weight}, CompressionOptions.for_scheme("W4A16_ASYM"))

    dense = decompress_state_dict(result.tensors, result.config)

    assert dense["proj.weight"].shape == (8, 256)
    assert (dense["proj.weight"] - weight).abs().max() < 0.5


def test_save_into_path_below_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, vocab_size=32))

    with pytest.raises(CheckpointError, match="cannot create the folder"):
        save_pretrained(model, tmp_path / "file" / "out")


def test_save_rejects_bad_shard_size_and_plain_modules(tmp_path: Path) -> None:
    with pytest.raises(InvalidOptionsError, match="needs a transformers model"):
        save_pretrained(torch.nn.Linear(128, 8), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("shape", [(128,), (2, 8, 128)])
def test_exact_target_on_unquantizable_weight(shape: tuple[int, ...]) -> None:
    options = CompressionOptions.for_scheme("W4A16", targets=["block.norm"], ignore=[])

    with pytest.raises(InvalidTensorError, match=r"block.norm is a quantization target by name"):
        compress_state_dict({"block.norm.weight": torch.randn(*shape)}, options)


def test_regex_and_class_targets_skip_unquantizable_weights() -> None:
    options = CompressionOptions.for_scheme("W4A16", targets=["Linear", "re:block.*"], ignore=[])
    state_dict = {"block.norm.weight": torch.randn(128), "block.proj.weight": torch.randn(8, 128)}

    result = compress_state_dict(state_dict, options)

    assert result.tensors["block.norm.weight"] is state_dict["block.norm.weight"]
    assert "block.proj.weight_packed" in result.tensors


def test_unmatched_target_and_ignore_warn(caplog: pytest.LogCaptureFixture) -> None:
    options = CompressionOptions.for_scheme("W4A16", targets=["Conv2d"], ignore=["lm_hed"])

    with caplog.at_level("WARNING", logger="tensorpress.plan"):
        result = compress_state_dict({"proj.weight": torch.randn(8, 128)}, options)

    assert result.config is None
    assert "target 'Conv2d' matches no module" in caplog.text
    assert "ignore entry 'lm_hed' matches no module" in caplog.text


@pytest.mark.parametrize("size", ["abc", 0, -1, "0GB"])
def test_bad_shard_size_rejected_before_work(tmp_path: Path, size) -> None:  # type: ignore[no-untyped-def]
    from tensorpress.checkpoint import compress_checkpoint
    from conftest import GOLDEN_DIR

    with pytest.raises(InvalidOptionsError, match="is not a positive size"):
        compress_checkpoint(GOLDEN_DIR / "model_untied", tmp_path / "out",
                            CompressionOptions.for_scheme("W4A16"), max_shard_size=size)

    assert not (tmp_path / "out").exists()


def test_saved_folder_has_umask_permissions(tmp_path: Path) -> None:
    import os
    import stat

    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, vocab_size=32))
    umask = os.umask(0o022)
    try:
        save_pretrained(model, tmp_path / "new")
        existing = tmp_path / "existing"
        existing.mkdir(mode=0o750)
        os.chmod(existing, 0o750)
        save_pretrained(model, existing)
    finally:
        os.umask(umask)

    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o755
    assert stat.S_IMODE(existing.stat().st_mode) == 0o750
