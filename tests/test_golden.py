"""Golden tests: tensorpress writes the bytes llmcompressor 0.14.0.1 writes.

The fixtures come from tests/fixtures/make_golden.py, run by hand beside the
peer; this suite only reads them.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    DTYPES,
    SCHEMES,
    assert_same_tensors,
    load_golden_case,
    load_golden_input,
    without_version,
)

from tensorpress import CompressionOptions, compress_state_dict

CASES = [(scheme, dtype) for scheme in SCHEMES for dtype in DTYPES]


@pytest.mark.parametrize(("scheme", "dtype"), CASES)
def test_presave_state_dict_matches_peer(scheme: str, dtype: str) -> None:
    peer_tensors, peer_config, qparams = load_golden_case(f"{scheme}_{dtype}")
    state_dict = load_golden_input(tied=False, dtype=DTYPES[dtype])
    state_dict.update(qparams)
    options = CompressionOptions(quantization=peer_config)

    result = compress_state_dict(state_dict, options)

    assert_same_tensors(dict(result.tensors), peer_tensors)
    assert without_version(result.config) == without_version(peer_config)


@pytest.mark.parametrize(("scheme", "dtype"), CASES)
def test_min_max_route_matches_peer(scheme: str, dtype: str) -> None:
    peer_tensors, peer_config, _ = load_golden_case(f"{scheme}_{dtype}")
    state_dict = load_golden_input(tied=False, dtype=DTYPES[dtype])
    options = CompressionOptions.for_scheme(scheme, targets=["Linear"], ignore=["lm_head"])

    result = compress_state_dict(state_dict, options)

    assert_same_tensors(dict(result.tensors), peer_tensors)
    assert without_version(result.config) == without_version(peer_config)


def test_tied_model_min_max_matches_peer() -> None:
    peer_tensors, peer_config, _ = load_golden_case("W4A16_tied_float32")
    state_dict = load_golden_input(tied=True, dtype=torch.float32)
    # transformers saves a tied head once, under the embedding's name, but
    # the lm_head module still exists and is listed in the ignore list.
    module_types = {name.rpartition(".")[0]: "Linear" for name in state_dict if "proj" in name}
    module_types |= {"model.embed_tokens": "Embedding", "lm_head": "Linear"}
    options = CompressionOptions.for_scheme("W4A16", ignore=["lm_head"])

    result = compress_state_dict(state_dict, options, module_types=module_types)

    assert_same_tensors(dict(result.tensors), peer_tensors)
    assert without_version(result.config) == without_version(peer_config)
