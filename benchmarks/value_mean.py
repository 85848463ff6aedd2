"""Research (session 8, QUALITY.md "Tried in session 8"): does quantizing V around its per-channel mean lower the
error? The format already carries a mean for V (every decoder adds it back); `calibrate(value_mean=True)` measures
it on sample text. The prompt-calibrated rows patch the cache's prompt measurement to take V's mean too (the cache
has no option for it: not kept). The quality pins' harness (benchmarks/defaults.py): prefill 512, 256 decode steps.

    .venv/bin/python benchmarks/value_mean.py 0 && .venv/bin/python benchmarks/value_mean.py 8192
"""

from __future__ import annotations

import sys

import torch

import rqcompile.cache as cache_module
from rqcompile import models
from rqcompile.cache import RQCache
from rqcompile.calibrate import calibrate
from rqcompile.config import RQConfig
from rqcompile.eval import decode_time_ppl, kl_divergence, license_corpus

PREFILL, DECODE = 512, 256
K4_LAYERS = tuple(range(0, 5)) + tuple(range(10, 20))  # presets.py's "K4/3 V3": 3.5 bits/element
FULL, ONE = RQConfig(residual_window=0), RQConfig(residual_window=0, rotation_stages=1)
MIXED = FULL.replace(layer_bits=tuple((i, 4, 3) for i in K4_LAYERS))


def main() -> None:
    offset = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    torch.set_num_threads(1)
    model, tok = models.load_smollm2()
    ids = license_corpus(tok, PREFILL + DECODE + 1, offset=offset)
    ref = decode_time_ppl(model, ids, prefill=PREFILL, decode=DECODE, chunk=DECODE)
    stdlib = calibrate(model, tokenizer=tok, key_scale=True, value_scale=True, rope_key_mean=False)
    stdlib_v = calibrate(model, tokenizer=tok, key_scale=True, value_scale=True, value_mean=True, rope_key_mean=False)
    measure = cache_module.channel_stats

    def with_value_mean(x, *, mean, scale, **kw):
        return measure(x, mean=True, scale=scale, **kw)

    rows = [  # name, config, calibration, patch the prompt measurement to take V's mean
        ("full, prompt", FULL, "prompt", False),
        ("full, prompt + V mean", FULL, "prompt", True),
        ("full, stdlib", FULL, stdlib, False),
        ("full, stdlib + V mean", FULL, stdlib_v, False),
        ("one layer, prompt", ONE, "prompt", False),
        ("one layer, prompt + V mean", ONE, "prompt", True),
        ("full K4/3 V3 (3.5), prompt", MIXED, "prompt", False),
        ("full K4/3 V3 (3.5), prompt + V mean", MIXED, "prompt", True),
    ]
    print(f"window {offset}: fp ppl {ref.ppl:.3f}")
    try:
        for name, config, calibration, patch in rows:
            cache_module.channel_stats = with_value_mean if patch else measure
            run = decode_time_ppl(
                model, ids, lambda c=config, cal=calibration: RQCache(c, calibration=cal), PREFILL, DECODE, chunk=DECODE
            )
            kl = kl_divergence(ref, run).mean().item()
            print(f"| {name} | {100 * (run.ppl / ref.ppl - 1):+.1f}% | {kl:.3f} |", flush=True)
    finally:
        cache_module.channel_stats = measure


if __name__ == "__main__":
    main()
