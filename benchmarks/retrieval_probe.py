"""Research (session 36): find the layers whose keys retrieval needs from calibration text alone.

`retrieval_layers.py` found, on the license corpus's copying window, that 4-bit keys in one block of SmolLM2's
layers (15-19) buy half of what 4-bit keys everywhere buy. A preset cannot name layers per model, so this asks
whether a cheap probe on *calibration* text (never the evaluation text) finds the same layers: stdlib text
followed by a copy of itself, so that the second copy can be predicted by looking back (what induction heads
do); per layer, the KL of the second copy's predictions against the fp model with 4-bit keys in that layer only
(3-bit elsewhere, the default window), against K3V3 everywhere. The layers whose upgrade cuts KL most would be the
probe's choice. Measured (QUALITY.md "Session 36"): both forms rank layer 18 first, as the 8K copying window does,
but the single-layer changes are noise-sized (most layers came out *worse* with 4-bit keys), so it chooses nothing yet.

    .venv/bin/python benchmarks/retrieval_probe.py --tokens 512 --gap 1024 [--random]
"""

from __future__ import annotations

import argparse
import time

import torch
from quality_harness import Harness
from retrieval_layers import LAYERS

from rqcompile import models
from rqcompile.cache import RQCache
from rqcompile.config import RQConfig
from rqcompile.eval import decode_time_ppl, kl_divergence, stdlib_corpus


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="iso")
    p.add_argument("--tokens", type=int, default=512, help="length of the passage that is repeated")
    p.add_argument("--gap", type=int, default=1024, help="unrelated stdlib tokens between the passage and its copy")
    p.add_argument("--offset", type=int, default=8192, help="stdlib token offset of the passage")
    p.add_argument("--calib-tokens", type=int, default=4096, help="stdlib tokens for the calibration")
    p.add_argument("--random", action="store_true", help="a passage of random token ids (only a lookup predicts it)")
    args = p.parse_args()
    torch.set_num_threads(1)
    model, tok = models.load_smollm2()
    passage = stdlib_corpus(tok, args.tokens, offset=args.offset)
    if args.random:
        passage = torch.randint(1000, 30000, passage.shape, generator=torch.Generator().manual_seed(0))
    gap = stdlib_corpus(tok, args.gap, offset=args.offset + args.tokens)
    ids = torch.cat([passage, gap, passage, passage[:, :1]], dim=1)
    prefill = args.tokens + args.gap
    harness = Harness(model, tok, stdlib_corpus(tok, args.calib_tokens), [], [], prefill, args.tokens)
    calibration = harness.query_scale_calibration()
    ref = decode_time_ppl(model, ids, prefill=prefill, decode=args.tokens, chunk=args.tokens)
    base = RQConfig(backend=args.backend, bits=3, residual_window=32)
    kind = "random" if args.random else "stdlib"
    print(f"{kind} passage {args.tokens}, gap {args.gap}, fp ppl of the copy {ref.ppl:.3f}", flush=True)
    results = {}
    for layer in [None, *range(LAYERS)]:
        config = base if layer is None else base.replace(layer_bits=((layer, 4, 3),))
        t0 = time.perf_counter()
        make = lambda c=config: RQCache(c, calibration=calibration, prompt_means=True)  # noqa: E731
        result = decode_time_ppl(model, ids, make, prefill, args.tokens, chunk=args.tokens)
        kl = kl_divergence(ref, result).mean().item()
        results[layer] = kl
        name = "K3V3" if layer is None else f"K4 in {layer}"
        delta = 100 * (result.ppl / ref.ppl - 1)
        print(f"{name:10s} {delta:+.2f}% KL {kl:.4f} {time.perf_counter() - t0:.0f}s", flush=True)
    gains = sorted(((results[None] - results[i], i) for i in range(LAYERS)), reverse=True)
    print("layers by KL gain:", ", ".join(f"{i} ({g:+.4f})" for g, i in gains))


if __name__ == "__main__":
    main()
