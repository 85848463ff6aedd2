"""benchmarks/attn_profile.py's variant settings (the device runs compare variants in one process)."""

from __future__ import annotations

import pytest
from benchmark_modules import load_benchmark

from rqcompile.kernels import attention as kattn
from rqcompile.kernels import dense_query

PROFILE = load_benchmark("attn_profile", "attn_profile")


def test_a_variant_sets_kernel_constants_only_while_it_runs():
    settings = PROFILE.parse_settings("kattn.COMBINE_DENSE_COLS=64,block_n=128,dense_query._CHUNK=16")
    before = kattn.COMBINE_DENSE_COLS, dense_query._CHUNK
    with PROFILE.module_constants(settings) as launch_settings:
        assert (kattn.COMBINE_DENSE_COLS, dense_query._CHUNK) == (64, 16)
        assert launch_settings == {"block_n": 128}  # what launch_attention gets
    assert (kattn.COMBINE_DENSE_COLS, dense_query._CHUNK) == before


def test_a_constant_the_attention_module_lacks_is_an_error():
    """A misspelt name would otherwise time the default under the variant's name."""
    for key in ("kattn.COMBINE_DENSE_COL", "attention.COMBINE_DENSE_COLS"):
        with pytest.raises(ValueError, match=key):
            with PROFILE.module_constants({key: 64}):
                pass
