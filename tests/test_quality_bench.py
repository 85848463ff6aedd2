"""benchmarks/quality.py: its grid, and a tiny end-to-end run (slow: loads SmolLM2, runs the quick grid)."""

from __future__ import annotations

import math

import pytest
from benchmark_modules import load_benchmark


def _load_quality_module():
    return load_benchmark("quality", "quality_bench")


@pytest.mark.slow
def test_quick_grid_writes_results_plot_and_markdown(tmp_path):
    mod = _load_quality_module()
    out, md = tmp_path / "q.json", tmp_path / "Q.md"
    data = mod.main(
        ["--grid", "quick", "--prefill", "64", "--decode", "8", "--out", str(out), "--markdown", str(md), "--no-mse"]
    )
    assert out.is_file() and md.read_text().count(mod.BEGIN.format(out.stem)) == 1
    assert {r["name"] for r in data["results"]} >= {"planar-3", "hadamard-3", "kivi-3"}
    by_name = {r["name"]: r for r in data["results"]}
    assert by_name["planar-3"]["decode_chunk"] == 8 and by_name["kivi-3"]["decode_chunk"] == 1
    noise = data["chunking_noise"]
    assert noise["steps"] == 8 and math.isfinite(noise["ppl_gap_pct"]) and noise["kl_between"] >= 0
    assert "noise floor" in md.read_text()


def test_full_grid_covers_the_issue_2_configurations():
    """planar / iso / rotor / hadamard x 2/3/4 bits, KIVI at the same bits, mixed K4/V3 and K4/V2."""
    mod = _load_quality_module()
    names = {s.name for s in mod.grid("full")}
    for backend in ("planar", "iso", "rotor", "hadamard"):
        assert {f"{backend}-{n}" for n in (2, 3, 4)} <= names
        assert any(n.startswith(f"{backend}-K4V3") for n in names) and any(
            n.startswith(f"{backend}-K4V2") for n in names
        )
    assert {"kivi-2", "kivi-3", "kivi-4", "kivi-K4V3", "kivi-K4V2"} <= names
