"""Repeat the GPU quantize checks that a dense v2 slot tile must pass, many times, each failure's message kept.

Session 17 saw one unexplained failure of `test_quantize_staged_gpu[iso-full]` with 512-element slot tiles
(benchmarks/NOTES.md, "v2 dense tile sweep"). The tests draw fresh random inputs on every call, so a rare tie in
`_check_codes`' tolerance and a real bug (an unwritten row of a partial last tile) look alike in one run. This runs the
same helper (`tests/test_kernels.py::_quantize_case`, outputs poisoned before each launch) `--reps` times per tile,
on the shapes of the failing test and on shapes whose last tile is partial, and prints every failure's assertion.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/quantize_tile_check.py --tiles 128,512 --reps 8

`--same-as 128` instead compares each tile's codes and norms byte for byte with those of the given tile on the same
inputs (the verified default: if they are equal, the tile is exactly as correct as it).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import test_kernels as tk  # noqa: E402  (the tests' own helpers: the same checks, not a copy)
import torch  # noqa: E402

from rqcompile.kernels import quantize as kq  # noqa: E402

# (name, bits, tokens, batch, heads, config): the failing test's shape, then odd token counts (partial last tiles)
CASES = [
    ("iso-full 3000", 3, 3000, 2, 4, {"rotation_stages": "full"}),
    ("iso-full 131", 3, 131, 2, 4, {"rotation_stages": "full"}),
    ("iso-full 4097", 3, 4097, 1, 4, {"rotation_stages": "full"}),
    ("planar-full 2b 777", 2, 777, 2, 4, {"rotation_stages": "full"}),
]


def same_as(base: int, tiles: list[int], reps: int) -> int:
    """Byte-level comparison of every tile's codes and norms with `base`'s, fresh inputs per repetition."""
    default = kq.DEFAULTS["v2_tile_dense"]
    differing = 0
    for name, bits, tokens, batch, heads, config in CASES:
        st = tk._state("iso" if name.startswith("iso") else "planar", bits, "k", heads, 256, "cuda", **config)
        params = (st.rotation, st.mean, st.scale, st.levels, bits, st.group)
        for rep in range(reps):
            x = (torch.randn(batch, tokens, heads, 256, device="cuda") * 2).transpose(1, 2).to(torch.bfloat16)
            outs = {}
            for tile in [base, *tiles]:
                kq.DEFAULTS["v2_tile_dense"] = tile
                tk._poison("cuda")
                outs[tile] = kq.launch_quantize(x, *params, variant="v2")
            for tile in tiles:
                codes = (outs[tile][0] != outs[base][0]).sum().item()
                norms = (outs[tile][1].view(torch.int16) != outs[base][1].view(torch.int16)).sum().item()
                differing += codes + norms
                print(f"{name:20s} rep {rep} tile {tile} vs {base}: {codes} code bytes, {norms} norms differ")
    kq.DEFAULTS["v2_tile_dense"] = default
    return 1 if differing else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiles", default="128,512", help="v2 slot tiles (elements), comma-separated")
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--same-as", type=int, default=0, help="compare outputs with this tile's instead of the reference")
    args = p.parse_args()
    if args.same_as:
        sys.exit(same_as(args.same_as, [int(t) for t in args.tiles.split(",")], args.reps))
    default = kq.DEFAULTS["v2_tile_dense"]
    failures = 0
    for tile in (int(t) for t in args.tiles.split(",")):
        kq.DEFAULTS["v2_tile_dense"] = tile
        for name, bits, tokens, batch, heads, config in CASES:
            bad = []
            for rep in range(args.reps):
                try:
                    tk._quantize_case(
                        "iso" if name.startswith("iso") else "planar",
                        bits,
                        256,
                        "cuda",
                        tokens=tokens,
                        batch=batch,
                        heads=heads,
                        **config,
                    )
                except AssertionError:
                    bad.append(rep)
                    print(f"FAIL tile {tile} {name} rep {rep}:", flush=True)
                    print("".join(traceback.format_exc().splitlines(keepends=True)[-6:]), flush=True)
            failures += len(bad)
            print(f"tile {tile:5d} {name:20s} {args.reps - len(bad)}/{args.reps} passed", flush=True)
    kq.DEFAULTS["v2_tile_dense"] = default
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
