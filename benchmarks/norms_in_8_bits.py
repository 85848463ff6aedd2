"""Research (not in the format): what storing each norm group's norm in 8 bits instead of fp16 would cost.

    cd benchmarks && ../.venv/bin/python norms_in_8_bits.py pair_query_scales.py --only "stdlib query key scales" \
        --offsets 1024,3072,...,48128 --configs "planar K3 V3/2,iso K4/3 V3"

Runs the given script (any quality-harness script) with the reference quantizer's norms rounded to a log2 grid of
`NORM_STEPS` (environment, default 32) steps per octave, what an 8-bit code covering 256 / NORM_STEPS octaves above
a per-cache offset would hold, and prints at exit the span of log2(norm) each quantizer state saw (a state lives in
one cache, i.e. one window). The caches still allocate fp16 norms: bits/element of a row run this way are what the
8-bit format would allocate only by arithmetic (0.125 fewer at a norm group of 64), never measured; QUALITY.md
"Session 38" says so where it uses them. Why: at head_dim 64 the fp16 norm is 0.25 of a 3.0-bit budget.
"""

from __future__ import annotations

import atexit
import os
import runpy
import sys

import torch

from rqcompile.quant import quantizer

STEPS = float(os.environ.get("NORM_STEPS", "32"))
_quantize = quantizer.quantize
_spans: dict[int, list[float]] = {}  # id(rotation) -> [min, max] log2 norm; a state's rotation lives as long as it


def _rounded_norms(x, rotation, *args, **kwargs):
    codes, norms = _quantize(x, rotation, *args, **kwargs)
    n = norms.float()
    positive = n > 0
    if positive.any():
        logs = torch.log2(n[positive])
        span = _spans.setdefault(id(rotation), [float("inf"), float("-inf")])
        span[0], span[1] = min(span[0], logs.min().item()), max(span[1], logs.max().item())
    grid = torch.exp2(torch.round(torch.log2(n.clamp_min(1e-30)) * STEPS) / STEPS)
    return codes, torch.where(positive, grid, n).to(torch.float16)


@atexit.register
def _report() -> None:
    spans = sorted(hi - lo for lo, hi in _spans.values())
    if spans:
        print(
            f"norms in 8 bits: {STEPS:g} steps per octave; {len(spans)} quantizer states, log2(norm) span "
            f"(octaves) min {spans[0]:.2f}, median {spans[len(spans) // 2]:.2f}, max {spans[-1]:.2f}",
            flush=True,
        )


if __name__ == "__main__":
    quantizer.quantize = _rounded_norms  # rqcompile.ops calls quantizer.quantize by attribute, so this reaches it
    script, sys.argv = sys.argv[1], sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
