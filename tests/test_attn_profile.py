"""benchmarks/attn_profile.py's variant settings (the device runs compare variants in one process)."""

from __future__ import annotations

import pytest
from benchmark_modules import load_benchmark

from rqcompile.kernels import attention as kattn

PROFILE = load_benchmark("attn_profile", "attn_profile")


def test_a_variant_sets_attention_constants_only_while_it_runs():
    settings = PROFILE.parse_settings("kattn.COMBINE_DENSE_COLS=64,block_n=128")
    before = kattn.COMBINE_DENSE_COLS
    with PROFILE.module_constants(settings) as launch_settings:
        assert kattn.COMBINE_DENSE_COLS == 64
        assert launch_settings == {"block_n": 128}  # what launch_attention gets
    assert kattn.COMBINE_DENSE_COLS == before


def test_a_constant_the_attention_module_lacks_is_an_error():
    """A misspelt name would otherwise time the default under the variant's name."""
    with pytest.raises(ValueError, match="COMBINE_DENSE_COL"):
        with PROFILE.module_constants({"kattn.COMBINE_DENSE_COL": 64}):
            pass
