"""scripts/gpu_test_shards.py resumes the GPU suite across device calls from the per-test lines of earlier logs:
a test it wrongly thinks ran would never run, so the log reader is pinned here on hand-made `pytest -v` text."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "scripts" / "gpu_test_shards.py"
_spec = importlib.util.spec_from_file_location("gpu_test_shards", _PATH)
shards = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(shards)

_LOG = """\
============================= test session starts ==============================
collecting ... collected 3 items

tests/test_kernels.py::test_keys_m_gpu[3-planar] PASSED                  [ 33%]
tests/test_kernels.py::test_keys_m_gpu[2-iso x] FAILED                   [ 66%]
tests/test_export.py::test_aoti_package_loads XFAIL (sandbox segfault)   [ 80%]
tests/test_quantize_fast.py::test_v2_gpu[True-rotor-2]
=================================== FAILURES ===================================
FAILED tests/test_kernels.py::test_keys_m_gpu[2-iso x] - AssertionError
"""


def test_every_finished_test_is_read_with_its_outcome_and_a_cut_one_is_not():
    assert shards.outcomes(_LOG) == {
        "tests/test_kernels.py::test_keys_m_gpu[3-planar]": "PASSED",
        "tests/test_kernels.py::test_keys_m_gpu[2-iso x]": "FAILED",
        "tests/test_export.py::test_aoti_package_loads": "XFAIL",
    }


def test_an_earlier_run_is_read_from_all_its_shard_logs(tmp_path: Path):
    (tmp_path / "shard0.log").write_text(_LOG)
    (tmp_path / "shard1.log").write_text("tests/test_a.py::test_b SKIPPED (no reason)  [100%]\n")
    (tmp_path / "shard0.txt").write_text("tests/test_c.py::test_d\n")  # the shard's id list, not a log
    found = shards.ran_before(tmp_path)
    assert found["tests/test_a.py::test_b"] == "SKIPPED"
    assert "tests/test_c.py::test_d" not in found
    assert len(found) == 4


def test_a_missing_earlier_run_is_an_error_not_an_empty_one(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        shards.ran_before(tmp_path / "nope")


def test_the_printed_summary_counts_each_outcome_and_never_says_warn():
    """The runner prints its own outcome counts per shard and in total: pytest's last line ("11 passed, 2 warnings")
    would vanish, counts and all, under the `grep -v warn` device scripts put on the output."""
    line = shards.tally(shards.outcomes(_LOG))
    assert line == "1 FAILED, 1 PASSED, 1 XFAIL"
    assert "warn" not in shards.tally(shards.outcomes(_LOG + "==== 1 passed, 3 warnings in 2.00s ====\n")).lower()
    assert shards.tally({}) == "none finished"
