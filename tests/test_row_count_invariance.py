"""benchmarks/row_count_invariance.py's count: a norm group differs when any of its code bytes does."""

from __future__ import annotations

import torch
from benchmark_modules import load_benchmark


def test_a_group_counts_once_whichever_of_its_bytes_differ():
    bench = load_benchmark("row_count_invariance", "row_count_invariance")
    codes = torch.zeros(1, 2, 4, 48, dtype=torch.uint8)  # 2 groups of 24 bytes (64 coordinates x 3 bits)
    norms = torch.ones(1, 2, 4, 2, dtype=torch.float16)
    other_codes, other_norms = codes.clone(), norms.clone()
    other_codes[0, 0, 0, 0] = other_codes[0, 0, 0, 23] = 1  # two bytes of one group
    other_codes[0, 1, 3, 24] = 7  # the first byte of another row's second group
    other_norms[0, 1, 2, 1] = 2.0
    groups, changed_norms = bench.differing_groups((codes, norms), (other_codes, other_norms))
    assert groups == 2 / 16 and changed_norms == 1 / 16
    assert bench.differing_groups((codes, norms), (codes, norms)) == (0.0, 0.0)
