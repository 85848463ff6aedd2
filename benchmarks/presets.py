"""Preset search for issue 6: the best measured configuration of each backend at about 4, 3.5, 3 and 2.5 bits/element.

Every candidate uses the library's own `RQCache` (sink tokens and recent window included), calibration on the
stdlib corpus, evaluation on the license corpus (never the same text). Bits per element are measured twice from the
bytes the cache allocates: at the evaluation length, and at 32K tokens (one layer filled with synthetic K/V: the
allocation does not depend on the values).

    .venv/bin/python benchmarks/presets.py --decode 128 --out benchmarks/results/presets_d128.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import transformers

from rqcompile.cache import RQCache, RQCacheLayer
from rqcompile.calibrate import Calibration, calibrate
from rqcompile.config import RQConfig
from rqcompile.eval import decode_time_ppl, kl_divergence, license_corpus, stdlib_corpus
from rqcompile.models import load_smollm2

BACKENDS = ("planar", "iso", "rotor", "hadamard")
WIDTHS = {
    "4.25": dict(bits=4),
    "3.75": dict(key_bits=4, value_bits=3),
    "3.25": dict(bits=3),
    "2.75": dict(key_bits=3, value_bits=2),
}


def candidates() -> list[tuple[str, str, RQConfig]]:
    rows = []
    for backend in BACKENDS:
        for width, bits in WIDTHS.items():
            rows.append((backend, width, RQConfig(backend=backend, sink_tokens=1, **bits)))
        rows.append((backend, "3.25+w32", RQConfig(backend=backend, bits=3, sink_tokens=1, residual_window=32)))
    return rows


def bits_at(config: RQConfig, calibration: Calibration | None, model_config, tokens: int) -> float:
    """Measured bits/element of one attention layer holding `tokens` synthetic tokens."""
    heads, dim = model_config.num_key_value_heads, model_config.head_dim
    layer = RQCacheLayer(config, 0, calibration)
    gen = torch.Generator().manual_seed(0)
    for start in range(0, tokens, 4096):
        n = min(4096, tokens - start)
        layer.update(torch.randn(1, heads, n, dim, generator=gen), torch.randn(1, heads, n, dim, generator=gen))
    held = layer.memory()
    return (held["compressed_bytes"] + held["window_bytes"]) * 8 / (tokens * heads * dim * 2)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--decode", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/presets.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    model, tok = load_smollm2()
    ids = license_corpus(tok, args.prefill + args.decode + 1)
    t0 = time.perf_counter()
    full = calibrate(model, stdlib_corpus(tok, 4096), value_scale=True, source="stdlib 4096 tokens")
    key_mean = Calibration({k: v for k, v in full.stats.items() if k[1] == "k" and k[2] == "mean"}, full.source)
    print(f"calibrated in {time.perf_counter() - t0:.0f}s", flush=True)
    reference = decode_time_ppl(model, ids, prefill=args.prefill, decode=args.decode)
    print(f"fp ppl {reference.ppl:.3f}", flush=True)
    rows = []
    for backend, width, config in candidates():
        calib = key_mean if backend == "hadamard" else full  # measured: scales hurt hadamard (QUALITY.md)
        holder: list[RQCache] = []

        def make(config=config, calib=calib, holder=holder):
            holder.append(RQCache(config, calibration=calib))
            return holder[-1]

        t0 = time.perf_counter()
        result = decode_time_ppl(model, ids, make, prefill=args.prefill, decode=args.decode)
        report = holder[0].memory_report()
        elements = sum(m["tokens"] for m in report.layers.values()) * model.config.num_key_value_heads
        row = {
            "backend": backend,
            "preset": width,
            "config": config.to_dict(),
            "calibration": "key mean" if calib is key_mean else "key mean + K/V scales",
            "ppl": result.ppl,
            "delta_pct": 100 * (result.ppl / reference.ppl - 1),
            "kl": kl_divergence(reference, result).mean().item(),
            "bits_eval": report.compressed_bytes * 8 / (elements * model.config.head_dim * 2),
            "bits_32k": bits_at(config, calib, model.config, 32768),
            "seconds": time.perf_counter() - t0,
        }
        rows.append(row)
        print(
            f"{backend:9s} {width:9s} ppl {row['ppl']:7.3f} {row['delta_pct']:+7.1f}% KL {row['kl']:.4f} "
            f"bits {row['bits_eval']:.2f} (eval) {row['bits_32k']:.3f} (32K) {row['seconds']:.0f}s",
            flush=True,
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "prefill": args.prefill,
            "decode": args.decode,
            "fp_ppl": reference.ppl,
            "rows": rows,
            "machine": f"{platform.processor() or platform.machine()} CPU, 1 thread",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "command": f"benchmarks/presets.py --prefill {args.prefill} --decode {args.decode} --out {args.out}",
        }
        args.out.write_text(json.dumps(data, indent=1))
    return data


if __name__ == "__main__":
    main()
