"""Quality pins on the real SmolLM2-135M: fail when compression quality regresses, cheap enough for every CI run.

Decode-time ppl over a short window (prefill 128 license tokens, then 32 teacher-forced steps through the cache) for
the default config (planar, 3 bits) and the calibrated iso 3-bit preset (K mean + K scale + V scale, calibrated on
512 stdlib tokens, never on the evaluation text). Each delta must stay below a bound ~25% above the value measured
when the pin was set (see QUALITY.md), and above a floor that shows the cache really quantizes. Measured at pin time
(torch 2.13 CPU, transformers 5.24, one thread): fp ppl 15.203; planar-3 +386%; iso-3 calibrated +19.2%.

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
    "iso-3-cal": (RQConfig(backend="iso", bits=3), True, 2.0, 24.0),
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

    # Bits per element from the bytes the cache allocated: 3-bit codes + one fp16 norm per 64 = 3.25.
    report = caches[0].memory_report()
    mc = smollm2[0].config
    elements = sum(m["tokens"] for m in report.layers.values()) * mc.num_key_value_heads * mc.head_dim * 2
    assert sum(m["tokens"] for m in report.layers.values()) == mc.num_hidden_layers * (PREFILL + DECODE)
    assert report.compressed_bytes * 8 / elements == pytest.approx(3.25)


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
