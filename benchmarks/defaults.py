"""Quality of the default config and its alternatives on SmolLM2-135M (QUALITY.md, "Defaults"), with the quality
pins' harness (tests/test_quality_pins.py): one license-text window, prefill 512, 256 teacher-forced decode steps in
one chunk; calibration `rqcompile.calibrate(model, tokenizer=tok, key_scale=True, value_scale=True,
rope_key_mean=False)` (2048 stdlib tokens, key mean + K/V scales), or `RQCache(calibration="prompt")` (each layer
measures its statistics on the 512-token prompt itself: since session 11 the key mean only for rotations that mix the
norm group). None of it removes the pre-RoPE key mean (the default since session 15 where the RoPE is known).

    .venv/bin/python benchmarks/defaults.py                 # the window of the pins (offset 0)
    .venv/bin/python benchmarks/defaults.py --offset 8192   # a second window
"""

from __future__ import annotations

import argparse
import time

import torch

from rqcompile import models
from rqcompile.cache import RQCache
from rqcompile.calibrate import Calibration, calibrate
from rqcompile.config import RQConfig
from rqcompile.eval import decode_time_ppl, kl_divergence, license_corpus

PREFILL, DECODE = 512, 256
ONE = RQConfig(
    residual_window=0, rotation_stages=1
)  # iso 3-bit, sink 1, search, one block layer: the default of sessions 4-7
STAGED = RQConfig(
    residual_window=0, rotation_stages="full"
)  # 3 iso stages at SmolLM2's head_dim 64: the default since session 8
ROWS = {  # name: (config, calibration: None, "stdlib", "stdlib key mean", "prompt" or "prompt key mean")
    "old default: planar 3-bit, search, no sink": (
        RQConfig(residual_window=0, backend="planar", sink_tokens=0, rotation_stages=1),
        None,
    ),
    "planar 3-bit, search, sink 1": (ONE.replace(backend="planar"), None),
    "iso 3-bit, search, no sink": (ONE.replace(sink_tokens=0), None),
    "iso 3-bit, search, sink 1 (default of sessions 4-7)": (ONE, None),
    "rotor 3-bit, search, sink 1": (ONE.replace(backend="rotor"), None),
    "iso 3-bit, search, sink 1, calibrated": (ONE, "stdlib"),
    "planar 3-bit, search, sink 1, calibrated": (ONE.replace(backend="planar"), "stdlib"),
    "rotor 3-bit, search, sink 1, calibrated": (ONE.replace(backend="rotor"), "stdlib"),
    "iso 3-bit, search, sink 1, calibration='prompt'": (ONE, "prompt"),
    "planar 3-bit, search, sink 1, calibration='prompt'": (ONE.replace(backend="planar"), "prompt"),
    "rotor 3-bit, search, sink 1, calibration='prompt'": (ONE.replace(backend="rotor"), "prompt"),
    # session 7: staged rotations (QUALITY.md "Staged rotations in the format"); "full" is RQConfig() since session 8
    "iso 2 stages, calibrated": (RQConfig(residual_window=0, rotation_stages=2), "stdlib"),
    "iso 2 stages, calibration='prompt'": (RQConfig(residual_window=0, rotation_stages=2), "prompt"),
    "iso full (3 stages)": (STAGED, None),
    "iso full (3 stages), calibrated": (STAGED, "stdlib"),
    "iso full (3 stages), key mean only": (STAGED, "stdlib key mean"),
    "iso full (3 stages), calibration='prompt'": (STAGED, "prompt"),
    "iso full (3 stages), key mean of the prompt only": (STAGED, "prompt key mean"),
    "iso full (3 stages), no scale search, calibrated": (STAGED.replace(scale_search=()), "stdlib"),
    "iso full (3 stages), no scale search, calibration='prompt'": (STAGED.replace(scale_search=()), "prompt"),
    "hadamard": (RQConfig(residual_window=0, backend="hadamard"), None),
    "hadamard, key mean only": (RQConfig(residual_window=0, backend="hadamard"), "stdlib key mean"),
    "hadamard, calibration='prompt'": (RQConfig(residual_window=0, backend="hadamard"), "prompt"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--offset", type=int, default=0, help="license-corpus token offset of the window (0)")
    parser.add_argument("--only", default="", help="run only the rows whose name contains this text")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tok = models.load_smollm2()
    ids = license_corpus(tok, PREFILL + DECODE + 1, offset=args.offset)
    reference = decode_time_ppl(model, ids, prefill=PREFILL, decode=DECODE, chunk=DECODE)
    start = time.perf_counter()
    stdlib = calibrate(model, tokenizer=tok, key_scale=True, value_scale=True, rope_key_mean=False)
    key_mean = Calibration({k: v for k, v in stdlib.stats.items() if k[1:] == ("k", "mean")}, "stdlib key mean")
    # what calibration="prompt" measures, key mean only: calibrate leaves out the sink token as the cache does
    prompt_key_mean = calibrate(
        model,
        ids[:, :PREFILL],
        key_scale=False,
        value_scale=False,
        error_weights=False,
        source="prompt key mean",
        rope_key_mean=False,
    )
    print(f"window {args.offset}: fp ppl {reference.ppl:.3f}; calibration {time.perf_counter() - start:.1f} s")
    print("| config | ppl delta | KL (nats/token) |\n|---|---|---|")
    for name, (config, how) in ROWS.items():
        if args.only not in name:
            continue
        calibration = {"stdlib": stdlib, "stdlib key mean": key_mean, "prompt key mean": prompt_key_mean}.get(how, how)
        result = decode_time_ppl(
            model,
            ids,
            lambda c=config, cal=calibration: RQCache(c, calibration=cal),
            PREFILL,
            DECODE,
            chunk=DECODE,
        )
        kl = kl_divergence(reference, result).mean().item()
        print(f"| {name} | {100 * (result.ppl / reference.ppl - 1):+.1f}% | {kl:.3f} |", flush=True)


if __name__ == "__main__":
    main()
