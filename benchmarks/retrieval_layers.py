"""Research (session 36): which layers' keys does retrieval need? 4-bit keys in one block of layers at a time.

At SmolLM2's 8K positions every config with 3-bit keys is +80% or worse on a window that copies text its prompt
holds (QUALITY.md "Session 10"), and 4-bit keys everywhere bring it to ~+27%. At 1K and on prose, which layers get
the extra key bits hardly mattered (QUALITY.md, "Which layers get the extra bits"). This asks whether retrieval is
different: if one block of layers carries most of the gain, a `layer_bits` preset can buy retrieval for a fraction
of the bits. The 8K harness with the default 32-token window; calibration as the best measured drop-in option (the
prompt's key means with stdlib query key scales, `RQCache(..., prompt_means=True)`).

    .venv/bin/python benchmarks/retrieval_layers.py --offsets 32768 --blocks 0,1,2,3,4,5

Copying windows of the license corpus at prefill 7679 / decode 512 (share of decode tokens whose preceding 8-gram
is in the prompt): 4096 (0.96), 6144 (0.65), 14336 (0.38), 30720 (0.98), 32768 (1.00); prose (< 0.05): 0, 8192,
16384, 18432, 24576, 36864, 40960.
"""

from __future__ import annotations

import argparse
import time

from quality_harness import Harness, add_arguments, row

from rqcompile.cache import RQCache
from rqcompile.config import RQConfig

LAYERS = 30  # SmolLM2-135M


def configs(backend: str, blocks: list[int], size: int, extra: list[str]) -> dict[str, RQConfig]:
    """K3V3 + w32, then 4-bit keys in each listed block of `size` layers, then any `extra` layer lists
    ("0-4+10-14": the union of those ranges), then 4-bit keys everywhere."""
    base = RQConfig(backend=backend, bits=3, residual_window=32)
    out = {"K3V3": base}
    spans = [(b * size, min(LAYERS, (b + 1) * size)) for b in blocks]
    for spec in extra:
        spans_of = [tuple(int(x) for x in part.split("-")) for part in spec.split("+")]
        layers = sorted({i for lo, hi in spans_of for i in range(lo, hi + 1)})
        out[f"K4 in {spec}"] = base.replace(layer_bits=tuple((i, 4, 3) for i in layers))
    for lo, hi in spans:
        out[f"K4 in {lo}-{hi - 1}"] = base.replace(layer_bits=tuple((i, 4, 3) for i in range(lo, hi)))
    out["K4V3"] = base.replace(key_bits=4, value_bits=3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.set_defaults(prefill=7679, decode=512, offsets="32768")
    p.add_argument("--backend", default="iso")
    p.add_argument("--blocks", default="0,1,2,3,4,5", help="blocks of --size layers to give 4-bit keys, one at a time")
    p.add_argument("--size", type=int, default=5)
    p.add_argument("--extra", default="", help="';'-separated layer sets to try too, e.g. '0-4+10-14;20-24'")
    p.add_argument("--only", default="", help="'|'-separated substrings of the config names to run")
    args = p.parse_args()
    harness = Harness.load(args)
    calibration = harness.query_scale_calibration()
    blocks = [int(b) for b in args.blocks.split(",") if b]
    extra = [e for e in args.extra.split(";") if e]
    print(f"prefill {args.prefill}, decode {args.decode}, windows {args.offsets}, w32, {args.backend}", flush=True)
    for name, config in configs(args.backend, blocks, args.size, extra).items():
        if args.only and not any(part in name for part in args.only.split("|")):
            continue
        t0 = time.perf_counter()
        cells = row(*harness.score(lambda c=config: RQCache(c, calibration=calibration, prompt_means=True)))
        print(f"{args.backend} {name:20s} {cells} {time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
