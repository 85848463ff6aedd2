"""Quality of the default config and its alternatives on SmolLM2-135M (QUALITY.md, "Defaults"), with the quality
pins' harness (tests/test_quality_pins.py): one license-text window, prefill 512, 256 teacher-forced decode steps in
one chunk; calibration `rqcompile.calibrate(model, tokenizer=tok)` (2048 stdlib tokens, key mean + K/V scales).

    .venv/bin/python benchmarks/defaults.py
"""

from __future__ import annotations

import time

import torch

from rqcompile import models
from rqcompile.cache import RQCache
from rqcompile.calibrate import calibrate
from rqcompile.config import RQConfig
from rqcompile.eval import decode_time_ppl, kl_divergence, license_corpus

PREFILL, DECODE = 512, 256
ROWS = {  # name: (config, calibrated?)
    "old default: planar 3-bit, search, no sink": (RQConfig(backend="planar", sink_tokens=0), False),
    "planar 3-bit, search, sink 1": (RQConfig(backend="planar"), False),
    "iso 3-bit, search, no sink": (RQConfig(sink_tokens=0), False),
    "default RQConfig(): iso 3-bit, search, sink 1": (RQConfig(), False),
    "rotor 3-bit, search, sink 1": (RQConfig(backend="rotor"), False),
    "default RQConfig(), calibrated": (RQConfig(), True),
    "planar 3-bit, search, sink 1, calibrated": (RQConfig(backend="planar"), True),
    "rotor 3-bit, search, sink 1, calibrated": (RQConfig(backend="rotor"), True),
}


def main() -> None:
    torch.set_num_threads(1)
    model, tok = models.load_smollm2()
    ids = license_corpus(tok, PREFILL + DECODE + 1)
    reference = decode_time_ppl(model, ids, prefill=PREFILL, decode=DECODE, chunk=DECODE)
    start = time.perf_counter()
    calibration = calibrate(model, tokenizer=tok)
    print(f"fp ppl {reference.ppl:.3f}; calibration {time.perf_counter() - start:.1f} s ({calibration.source})")
    print("| config | ppl delta | KL (nats/token) |\n|---|---|---|")
    for name, (config, calibrated) in ROWS.items():
        result = decode_time_ppl(
            model,
            ids,
            lambda c=config, cal=calibrated: RQCache(c, calibration=calibration if cal else None),
            PREFILL,
            DECODE,
            chunk=DECODE,
        )
        kl = kl_divergence(reference, result).mean().item()
        print(f"| {name} | {100 * (result.ppl / reference.ppl - 1):+.1f}% | {kl:.3f} |", flush=True)


if __name__ == "__main__":
    main()
