"""Research (session 36): which layers' keys does retrieval need? 4-bit keys in one block of layers at a time.

At SmolLM2's 8K positions every config with 3-bit keys is +80% or worse on a window that copies text its prompt
holds (QUALITY.md "Session 10"), and 4-bit keys everywhere bring it to ~+27%. At 1K and on prose, which layers get
the extra key bits hardly mattered (QUALITY.md, "Which layers get the extra bits"). This asks whether retrieval is
different: if one block of layers carries most of the gain, a `layer_bits` preset can buy retrieval for a fraction
of the bits. The 8K harness with the default 32-token window; calibration as the best measured drop-in option (the
prompt's key means with stdlib query key scales, `RQCache(..., prompt_means=True)`).

    .venv/bin/python benchmarks/retrieval_layers.py --offsets 32768 --blocks 0,1,2,3,4,5
    .venv/bin/python benchmarks/retrieval_layers.py --offsets 4096,30720 --blocks "" --probe 15 --only "K4 in"

`--probe N` (session 37) adds 4-bit keys in the N layers `rqcompile.key_sensitivity` ranks first on stdlib text, so
that a layer choice made without the evaluation corpus is scored on it.

Copying windows of the license corpus at prefill 7679 / decode 512 (share of decode tokens whose preceding 8-gram
is in the prompt): 4096 (0.96), 6144 (0.65), 14336 (0.38), 30720 (0.98), 32768 (1.00); prose (< 0.05): 0, 8192,
16384, 18432, 24576, 36864, 40960.
"""

from __future__ import annotations

import argparse
import time

from quality_harness import Harness, add_arguments, row

from rqcompile import key_sensitivity
from rqcompile.cache import RQCache
from rqcompile.config import RQConfig

LAYERS = 30  # SmolLM2-135M


def layer_set(spec: str) -> list[int]:
    """ "0-4+10-14" -> [0, ..., 4, 10, ..., 14]."""
    spans = [tuple(int(x) for x in part.split("-")) for part in spec.split("+")]
    return sorted({i for lo, *hi in spans for i in range(lo, (hi[0] if hi else lo) + 1)})


def _override(base: RQConfig, spec: str) -> RQConfig:
    """`spec` "k4=15-19,v3=0-9" (or a bare layer set "5-19", meaning k4=...): those layers' key / value widths."""
    widths = {}
    for part in spec.split(","):
        width, _, layers = part.rpartition("=")  # "k4=15-19", or a bare "5-19" for k4
        kind, bits = (width or "k4")[0], int((width or "k4")[1:])
        for i in layer_set(layers):
            k, v = widths.get(i, (base.bits_for(i, "k"), base.bits_for(i, "v")))
            widths[i] = (bits, v) if kind == "k" else (k, bits)
    return base.replace(layer_bits=tuple((i, k, v) for i, (k, v) in sorted(widths.items())))


def configs(backend: str, bits: tuple[int, int], blocks: list[int], size: int, extra: list[str]) -> dict[str, RQConfig]:
    """K`bits[0]`V`bits[1]` + w32, then 4-bit keys in each listed block of `size` layers, then any `extra` overrides
    ("5-19": 4-bit keys there; "k4=15-19,v3=0-9": per-kind widths), then 4-bit keys everywhere."""
    base = RQConfig(backend=backend, key_bits=bits[0], value_bits=bits[1], residual_window=32)
    name = f"K{bits[0]}V{bits[1]}"
    out = {name: base}
    for spec in extra:
        out[f"{name} {spec}" if "=" in spec else f"K4 in {spec}"] = _override(base, spec)
    for b in blocks:
        lo, hi = b * size, min(LAYERS, (b + 1) * size) - 1
        out[f"K4 in {lo}-{hi}"] = _override(base, f"{lo}-{hi}")
    out[f"K4V{bits[1]}"] = base.replace(key_bits=4)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.set_defaults(prefill=7679, decode=512, offsets="32768")
    p.add_argument("--backend", default="iso")
    p.add_argument("--bits", default="3,3", help="key and value widths of the base config")
    p.add_argument("--blocks", default="0,1,2,3,4,5", help="blocks of --size layers to give 4-bit keys, one at a time")
    p.add_argument("--size", type=int, default=5)
    p.add_argument("--extra", default="", help="';'-separated overrides, e.g. '0-4+10-14;k4=15-19,v3=0-9'")
    p.add_argument("--only", default="", help="'|'-separated substrings of the config names to run")
    p.add_argument(
        "--probe",
        type=int,
        default=0,
        help="also 4-bit keys in the N layers rqcompile.key_sensitivity ranks first (stdlib text; the base config "
        "and this calibration)",
    )
    args = p.parse_args()
    harness = Harness.load(args)
    calibration = harness.query_scale_calibration()
    blocks = [int(b) for b in args.blocks.split(",") if b]
    extra = [e for e in args.extra.split(";") if e]
    bits = tuple(int(b) for b in args.bits.split(","))
    if args.probe:
        base = RQConfig(backend=args.backend, key_bits=bits[0], value_bits=bits[1])
        found = key_sensitivity(
            harness.model, base, tokenizer=harness.tokenizer, calibration=calibration, prompt_means=True
        )
        chosen = sorted(found.ranked()[: args.probe])
        kl = ", ".join(f"{i}: {found.kl[i]:.5f}" for i in sorted(found.kl))
        print(f"key_sensitivity ({found.source}): KL {{{kl}}}", flush=True)
        print(f"ranked {found.ranked()}; top {args.probe}: {chosen}", flush=True)
        extra.append("+".join(str(i) for i in chosen))
    print(f"prefill {args.prefill}, decode {args.decode}, windows {args.offsets}, w32, {args.backend}", flush=True)
    for name, config in configs(args.backend, bits, blocks, args.size, extra).items():
        if args.only and not any(part in name for part in args.only.split("|")):
            continue
        t0 = time.perf_counter()
        cells = row(*harness.score(lambda c=config: RQCache(c, calibration=calibration, prompt_means=True)))
        print(f"{args.backend} {name:20s} {cells} {time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
