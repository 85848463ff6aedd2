"""benchmarks/window_stats.py: the many-window verdicts on issue 6's targets come from its parse and statistics, so
a row it misreads or a wrong interval would misstate whether a target is met."""

from __future__ import annotations

import math

import pytest
from benchmark_modules import load_benchmark

LOG = """\
prefill 512, decode 256, windows 0,1,2,3, w0
iso K4/3 V3    prompt + offset + stdlib query key scales                +1.00% / -1.00% / +3.00% / +1.00% (KL 0.0100 / 0.0200 / 0.0300 / 0.0200; mean 0.0200) 15s
hadamard K4/3 V3 prompt + offset + stdlib query key scales                +2.00% / +0.00% / +5.00% / +1.00% (KL 0.0200 / 0.0200 / 0.0300 / 0.0300; mean 0.0250) 14s
planar K3 V3/2 prompt + offset + stdlib query key scales                +10.50% / +9.50% / +11.00% / +9.00% (KL 0.1000 / 0.1000 / 0.1000 / 0.1000; mean 0.1000) 14s
"""  # noqa: E501


@pytest.fixture(scope="module")
def stats():
    return load_benchmark("window_stats", "window_stats")


def test_every_row_is_read_with_its_backend_widths_and_per_window_cells(stats):
    rows = stats.parse_rows("Loading weights: 100%\n" + LOG)
    assert [(r["backend"], r["width"]) for r in rows] == [("iso", "K4/3 V3"), ("hadamard", "K4/3 V3"),
                                                        ("planar", "K3 V3/2")]  # fmt: skip
    assert rows[0]["variant"] == "prompt + offset + stdlib query key scales"
    assert rows[0]["deltas"] == [1.0, -1.0, 3.0, 1.0]
    assert rows[1]["kls"] == [0.02, 0.02, 0.03, 0.03]
    assert rows[2]["offsets"] == [0, 1, 2, 3]
    named = stats.parse_rows("iso K4/3 V3 (5-19) prompt + offset   +1.00% / +2.00% (KL 0.1 / 0.2; mean 0.15) 9s")
    assert (named[0]["width"], named[0]["variant"]) == ("K4/3 V3 (5-19)", "prompt + offset")  # presets' layer sets


@pytest.mark.parametrize(
    "log",
    [
        "iso K3V3      x   +1.00% / +2.00% (KL 0.1 / 0.2 / 0.3; mean 0.2) 1s",  # ppl and KL cells disagree
        "windows 0,1,2, w0\niso K3V3      x   +1.00% / +2.00% (KL 0.1 / 0.2; mean 0.15) 1s",  # the header disagrees
    ],
)
def test_a_row_whose_cells_do_not_match_its_windows_is_refused(stats, log):
    with pytest.raises(ValueError, match="ppl deltas"):
        stats.parse_rows(log)


def test_the_interval_is_students_over_the_windows(stats):
    mean, half = stats.mean_ci([1.0, -1.0, 3.0, 1.0])  # sd = sqrt(8/3), t(3) = 3.182
    assert mean == 1.0
    assert half == pytest.approx(3.182 * math.sqrt(8 / 3) / 2)
    assert math.isnan(stats.mean_ci([2.0])[1])


def test_block_backends_are_compared_with_hadamard_window_by_window(stats):
    summary = {(s["backend"], s["width"]): s for s in stats.summarize(stats.parse_rows(LOG))}
    iso = summary["iso", "K4/3 V3"]
    assert iso["delta"] == 1.0 and iso["delta_median"] == 1.0
    diff, half = iso["vs_hadamard"]["delta"]  # differences -1, -1, -2, 0: mean -1, sd sqrt(2/3)
    assert diff == -1.0 and half == pytest.approx(3.182 * math.sqrt(2 / 3) / 2)
    assert iso["vs_hadamard"]["kl"][0] == pytest.approx(-0.005)
    assert summary["hadamard", "K4/3 V3"]["vs_hadamard"] == {}
    assert summary["planar", "K3 V3/2"]["vs_hadamard"] == {}  # no hadamard row of its widths


def test_a_baseline_run_is_compared_config_by_config_only_over_the_same_windows(stats):
    base = stats.parse_rows(LOG)
    changed = stats.parse_rows(LOG.replace("+1.00% / -1.00% / +3.00% / +1.00%", "+0.00% / -1.00% / +2.00% / +1.00%"))
    summary = {(s["backend"], s["width"]): s for s in stats.summarize(changed, base)}
    assert summary["iso", "K4/3 V3"]["vs_baseline"]["delta"][0] == -0.5
    assert summary["hadamard", "K4/3 V3"]["vs_baseline"]["delta"] == (0.0, 0.0)
    other_windows = stats.parse_rows(LOG.replace("windows 0,1,2,3", "windows 4,5,6,7"))
    assert all(s["vs_baseline"] == {} for s in stats.summarize(other_windows, base))
    assert "vs baseline" in stats.markdown(stats.summarize(changed, base))
