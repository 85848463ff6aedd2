"""Research (session 12, QUALITY.md "Tried in session 12"): does calibrating on chunks as long as the serving context
fix per-channel key statistics at 8K tokens? Post-RoPE, a slowly turning channel pair looks constant over a 512-token
chunk and not over 8K; `calibrate(chunk=...)` sets the chunk. Session 10's 8K harness (7,679-token prompt, 512 decode
steps in one chunk, license windows 24576 / 32768 / 40960), full mixing K3V3 + sink + search + 32-token window, with
(a) the key mean and (b) the key mean plus per-channel query key scales (benchmarks/query_key_scales.py), both
measured on stdlib text in chunks of `--chunk` tokens (`--tokens` in all).

    .venv/bin/python benchmarks/long_calibration.py --backend planar --chunk 8192 --tokens 16384

Session 13: `--key-mean-only --chunks 512,8192` compares the key mean from short and long chunks of the same text
side by side, for several `--backends`, on the 8K harness or (`--prefill 512 --decode 256 --offsets 0,8192,16384`)
on the pins' 1K harness.
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
    parser.add_argument("--backends", default="", help="comma-separated; overrides --backend")
    parser.add_argument("--chunk", type=int, default=8192)
    parser.add_argument("--chunks", default="", help="comma-separated chunk lengths (key mean only); overrides --chunk")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--key-mean-only", action="store_true", help="skip the query-scale row")
    parser.add_argument("--prefill", type=int, default=PREFILL)
    parser.add_argument("--decode", type=int, default=DECODE)
    parser.add_argument("--offsets", default=",".join(map(str, OFFSETS)))
    parser.add_argument("--window", type=int, default=32, help="RQConfig.residual_window")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    model, tok = models.load_smollm2()
    text = stdlib_corpus(tok, args.tokens)
    if args.chunks:
        calibrations = {
            f"key mean, {c}-token chunks": calibrate(model, text, chunk=int(c), key_scale=False, rope_key_mean=False)
            for c in args.chunks.split(",")
        }
    else:
        key_mean = calibrate(model, text, chunk=args.chunk, key_scale=False, rope_key_mean=False)
        calibrations = {"key mean": key_mean}
        if not args.key_mean_only:
            centred = calibrate(
                model, text, key_scale=True, scale_power=1.0, error_weights=False, chunk=args.chunk, rope_key_mean=False
            )
            calibrations["key mean + per-channel query scales"] = with_query_scales(
                key_mean, centred, centred, pairs=False
            )
    prefill, decode = args.prefill, args.decode
    windows = [license_corpus(tok, prefill + decode + 1, offset=int(o)) for o in args.offsets.split(",")]
    refs = [decode_time_ppl(model, ids, prefill=prefill, decode=decode, chunk=decode) for ids in windows]
    for backend in (args.backends or args.backend).split(","):
        config = RQConfig(backend=backend, residual_window=args.window)
        print(
            f"{backend} K3V3 w{args.window}, prefill {prefill}, decode {decode}, {args.tokens} stdlib tokens",
            flush=True,
        )
        for name, calibration in calibrations.items():
            t0, cells, kls = time.perf_counter(), [], []

            def make(calibration=calibration, config=config) -> RQCache:
                return RQCache(config, calibration=calibration)

            for ids, ref in zip(windows, refs):
                result = decode_time_ppl(model, ids, make, prefill, decode, chunk=decode)
                kls.append(kl_divergence(ref, result).mean().item())
                cells.append(f"{100 * (result.ppl / ref.ppl - 1):+.1f}%")
            mean_kl = sum(kls) / len(kls)
            print(f"  {name}: {' / '.join(cells)} (KL {mean_kl:.4f}) {time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
