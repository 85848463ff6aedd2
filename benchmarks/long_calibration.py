"""Research (session 12, QUALITY.md "Tried in session 12"): does calibrating on chunks as long as the serving context
fix per-channel key statistics at 8K tokens? Post-RoPE, a slowly turning channel pair looks constant over a 512-token
chunk and not over 8K; `calibrate(chunk=...)` sets the chunk. Session 10's 8K harness (7,679-token prompt, 512 decode
steps in one chunk, license windows 24576 / 32768 / 40960), full mixing K3V3 + sink + search + 32-token window, with
(a) the key mean and (b) the key mean plus per-channel query key scales (benchmarks/query_key_scales.py), both
measured on stdlib text in chunks of `--chunk` tokens (`--tokens` in all).

    .venv/bin/python benchmarks/long_calibration.py --backend planar --chunk 8192 --tokens 16384
"""

from __future__ import annotations

import argparse
import time

import torch
from query_key_scales import with_query_scales

from rqcompile import models
from rqcompile.cache import RQCache
from rqcompile.calibrate import calibrate
from rqcompile.config import RQConfig
from rqcompile.eval import decode_time_ppl, kl_divergence, license_corpus, stdlib_corpus

PREFILL, DECODE, OFFSETS = 7679, 512, (24576, 32768, 40960)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="iso")
    parser.add_argument("--chunk", type=int, default=8192)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--key-mean-only", action="store_true", help="skip the query-scale row")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    model, tok = models.load_smollm2()
    text = stdlib_corpus(tok, args.tokens)
    key_mean = calibrate(model, text, chunk=args.chunk)
    centred = calibrate(model, text, key_scale=True, scale_power=1.0, error_weights=False, chunk=args.chunk)
    per_channel = with_query_scales(key_mean, centred, centred, pairs=False)
    calibrations = {"key mean": key_mean, "key mean + per-channel query scales": per_channel}
    if args.key_mean_only:
        del calibrations["key mean + per-channel query scales"]
    config = RQConfig(backend=args.backend, residual_window=32)
    windows = [license_corpus(tok, PREFILL + DECODE + 1, offset=o) for o in OFFSETS]
    refs = [decode_time_ppl(model, ids, prefill=PREFILL, decode=DECODE, chunk=DECODE) for ids in windows]
    print(f"{args.backend} K3V3 w32, calibration chunks of {args.chunk} ({args.tokens} stdlib tokens)", flush=True)
    for name, calibration in calibrations.items():
        t0, cells, kls = time.perf_counter(), [], []

        def make(calibration=calibration) -> RQCache:
            return RQCache(config, calibration=calibration)

        for ids, ref in zip(windows, refs):
            result = decode_time_ppl(model, ids, make, PREFILL, DECODE, chunk=DECODE)
            kls.append(kl_divergence(ref, result).mean().item())
            cells.append(f"{100 * (result.ppl / ref.ppl - 1):+.1f}%")
        print(f"{name}: {' / '.join(cells)} (KL {sum(kls) / len(kls):.3f}) {time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
