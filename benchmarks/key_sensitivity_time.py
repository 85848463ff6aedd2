"""Time `rqcompile.key_sensitivity` with its defaults on SmolLM2-135M (the README and QUALITY.md "Session 37" cite it).

    .venv/bin/python benchmarks/key_sensitivity_time.py

Two threads; `calibrate`'s default (2,048 stdlib tokens), so its top layers can differ a little from the 8K runs',
which took their calibration from 4,096 tokens.
"""

from __future__ import annotations

import time

import torch

from rqcompile import RQConfig, calibrate, key_sensitivity, models

torch.set_num_threads(2)
model, tok = models.load_smollm2()
calib = calibrate(model, tokenizer=tok)
t0 = time.perf_counter()
found = key_sensitivity(model, RQConfig(), tokenizer=tok, calibration=calib, prompt_means=True, progress=False)
seconds = time.perf_counter() - t0
print(f"key_sensitivity, SmolLM2-135M, defaults (2 passages x 31 passes of 2,048 tokens): {seconds:.0f} s")
print(f"top 15 layers: {sorted(found.ranked()[:15])}")
