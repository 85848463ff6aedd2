"""Quality pins on the real SmolLM2-135M: fail when compression quality regresses, cheap enough for every CI run.

Decode-time ppl over a short window (prefill 128 license tokens, then 32 teacher-forced steps through the cache) for
the default config (planar, 3 bits) and the calibrated iso 3-bit preset with one sink token (K mean + K scale + V
scale from `calibrate`'s defaults on 512 stdlib tokens, never on the evaluation text; `sink_tokens=1`). Each delta
must stay below a bound ~25% above the value measured when the pin was set, and above a floor that shows the cache
really quantizes. Measured at pin time (torch 2.13 CPU, transformers 5.24, one thread, calibrate scale_power 0.8 /
skip_first 1): fp ppl 15.203; planar-3 +386%; iso-3-cal-sink1 +9.7% (iso-3-cal without the sink: +38.5%).

The full-length numbers come from benchmarks/quality.py; its end-to-end smoke run is marked slow.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from rqcompile import models
from rqcompile.cache import RQCache
from rqcompile.calibrate import calibrate
from rqcompile.config import RQConfig
from rqcompile.eval import decode_time_ppl, license_corpus, reference_cache, stdlib_corpus

PREFILL, DECODE = 128, 32

# (config, calibrated?, lower bound %, upper bound %) on the ppl delta vs the fp cache.
PINS = {
    "planar-3": (RQConfig(backend="planar", bits=3), False, 100.0, 485.0),
    "iso-3-cal-sink1": (RQConfig(backend="iso", bits=3, sink_tokens=1), True, 2.0, 12.1),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def smollm2():
    return models.load_smollm2()


@pytest.fixture(scope="module")
def ids(smollm2):
    return license_corpus(smollm2[1], PREFILL + DECODE + 1)


@pytest.fixture(scope="module")
def calibration(smollm2):
    return calibrate(smollm2[0], stdlib_corpus(smollm2[1], 512), key_scale=True, value_scale=True, source="stdlib")


@pytest.fixture(scope="module")
def fp_ppl(smollm2, ids):
    return decode_time_ppl(smollm2[0], ids, reference_cache, PREFILL, DECODE, keep_logprobs=False).ppl


@pytest.mark.parametrize("name", sorted(PINS))
def test_decode_time_ppl_pin(name, smollm2, ids, calibration, fp_ppl):
    config, calibrated, low, high = PINS[name]
    caches: list[RQCache] = []

    def make():
        caches.append(RQCache(config, calibration=calibration if calibrated else None))
        return caches[-1]

    ppl = decode_time_ppl(smollm2[0], ids, make, PREFILL, DECODE, keep_logprobs=False).ppl
    delta = 100 * (ppl / fp_ppl - 1)
    assert low < delta < high, f"{name}: ppl {ppl:.3f} vs fp {fp_ppl:.3f} = {delta:+.1f}%, pinned to ({low}, {high})%"

    if not config.sink_tokens:
        assert _bits_per_element(caches[0], smollm2[0].config) == pytest.approx(3.25)


def _bits_per_element(cache: RQCache, mc) -> float:
    """Bytes the cache allocated x 8 / elements; 3-bit codes + one fp16 norm per 64 = 3.25."""
    report = cache.memory_report()
    tokens = sum(m["tokens"] for m in report.layers.values())
    assert tokens % mc.num_hidden_layers == 0
    return report.compressed_bytes * 8 / (tokens * mc.num_key_value_heads * mc.head_dim * 2)


def test_sink_token_costs_only_its_own_bytes(smollm2, ids, calibration):
    caches: list[RQCache] = []
    config = RQConfig(backend="iso", bits=3, sink_tokens=1)

    def make():
        caches.append(RQCache(config, calibration=calibration))
        return caches[-1]

    decode_time_ppl(smollm2[0], ids, make, PREFILL, 2, keep_logprobs=False)
    mc = smollm2[0].config
    sink_extra = 16 * 2 / 2 / (PREFILL + 2) * 2  # generous: one fp32 token of K and V per layer over the sequence
    assert _bits_per_element(caches[0], mc) < 3.25 + sink_extra + 0.05


@pytest.mark.slow
def test_quality_benchmark_quick_grid_runs(tmp_path):
    """benchmarks/quality.py end to end on a tiny window: results JSON, plot and markdown block are written."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "quality.py"
    spec = importlib.util.spec_from_file_location("quality_bench", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["quality_bench"] = mod
    spec.loader.exec_module(mod)
    out, md = tmp_path / "q.json", tmp_path / "Q.md"
    data = mod.main(
        ["--grid", "quick", "--prefill", "64", "--decode", "8", "--out", str(out), "--markdown", str(md), "--no-mse"]
    )
    assert out.is_file() and md.read_text().count(mod.BEGIN.format(out.stem)) == 1
    assert {r["name"] for r in data["results"]} >= {"planar-3", "hadamard-3", "kivi-3"}
    assert data["consistency_max_abs"] < 1e-4
