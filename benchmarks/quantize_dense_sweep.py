"""Bulk quantize with the default rotation (full mixing: one dense [128, 128] block per norm group) on [1, 4, 65536,
256] bf16, 3 bits, scale search on (`--search off`: none), each launch against the measured device copy bandwidth, with
the fraction of code bytes that differ from the torch reference's (fp32 on the same GPU; the kernels' tf32x3 dots sum in
another order: float ties only). Launches: `v1:ROWS:WARPS` (the v1 kernel's dense tile, `DEFAULTS["block_t_dense"]` rows
per program) and `v2:TILE:WARPS[:CHUNK]` (the v2 kernel, `DEFAULTS["v2_tile_dense"]` elements per slot tile, at most
`DEFAULTS["v2_dense_max_rows"]` rows; CHUNK: `DEFAULTS["v2_dense_chunk"]`, input coordinates per tl.dot step of the
rotation; `v2:TILE:WARPS:CHUNK:split` / `...:tf32x3` sets `DEFAULTS["v2_dense_split"]`, the rotation pre-split into tf32
halves once per launch or split by tl.dot in every program; `...:fold` sets `DEFAULTS["v2_dense_fold"]`, (x - mean) /
scale folded into the rotation's three bf16 parts; without that field, the defaults: split since session 31, fold since
session 32). Each launch is timed twice: by do_bench (L2 flushed before each call; the call's host work counts where the
host is slower than the flush, as in session 32's call 2), and as a CUDA graph's replay (no host work; L2 not flushed,
but x is 128 MiB against the H200's 50 MB). A field `rN` anywhere after WARPS caps v2's dense launch at N registers per
thread (`DEFAULTS["v2_dense_maxnreg"]`, per code width) on WARPS, e.g. `v2:1024:4:64:fold:r168`, `r0` for none (a
spec without it takes the default caps, and their warps where `DEFAULTS["v2_dense_capped_warps"]` names them: 8 at 4
bits); a field `mN` lets
a dense program take up to N rows (`DEFAULTS["v2_dense_max_rows"]`, 64), e.g. `v2:1024:8:64:fold:m128`; a field
`pipe` / `nopipe` runs the folded rotation's dots as one pipelined loop or unrolled (`DEFAULTS["v2_dense_pipeline"]`,
per code width), `sN` with N stages (`DEFAULTS["v2_dense_stages"]`), e.g. `v2:1024:4:64:fold:pipe:s2`.
`--backends planar,iso,rotor` times those block rotations (one layer) instead: then TILE is `DEFAULTS["v2_tile"]`
(the slot tile of the block path) and CHUNK / the precision field do not apply.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/quantize_dense_sweep.py --out $OUT          # session 17, run 2
    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/quantize_dense_sweep.py \
        --tiles v1:64:4,v2:128:4,v2:256:4 --out $OUT                                                # run 3
    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/quantize_dense_sweep.py \
        --tiles v2:512:4:32,v2:512:4:64,v2:512:4:128,v2:512:4:32 --out $OUT                       # session 29's lead
    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/quantize_dense_sweep.py --bits 3,2,4 \
        --tiles v2:1024:4:64:tf32x3,v2:1024:4:64:split,v2:1024:4:64:tf32x3 --out $OUT              # session 30's lead
    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/quantize_dense_sweep.py --bits 3,2,4 \
        --backends planar,iso,rotor --tiles v2:128:4,v2:256:4,v2:512:4,v2:128:4 --out $OUT          # session 31
    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/quantize_dense_sweep.py --bits 3,2,4 \
        --tiles v2:1024:4:64:split,v2:1024:4:64:fold,v2:1024:4:64:split --out $OUT                  # session 31's lead
    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/quantize_dense_sweep.py --bits 3,2,4 \
        --tiles v2:1024:4:64:fold,v2:1024:4:64:split,v2:1024:4:64:fold --out $OUT                   # session 32
    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/quantize_dense_sweep.py --bits 3,2,4 \
        --tiles v2:1024:4:64:fold:r0:nopipe,v2:1024:4:64:fold:r168:nopipe,v2:1024:8:64:fold:r128:nopipe,\
v2:1024:4:64:fold:r128:nopipe,v2:1024:8:64:fold:m128:r0:nopipe,v2:1024:4:64:fold:r200:nopipe,\
v2:1024:4:64:fold:r0:nopipe --out $OUT                                                             # session 33
    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/quantize_dense_sweep.py --search on,off --bits 3,2,4 \
        --tiles v2:1024:4:64:fold:nopipe,v2:1024:4:64:fold:r0:nopipe --out $OUT                      # session 33
    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/quantize_dense_sweep.py --bits 3,2,4 \
        --tiles v2:1024:4:64:fold:nopipe,v2:1024:4:64:fold:pipe,v2:1024:4:64:fold:pipe:s2,\
v2:1024:4:64:fold:r0:pipe,v2:1024:4:64:fold:nopipe --out $OUT                                      # session 33
(session 33 ran the first of these before the register caps became the default, without `r0`, and all three before
the pipeline did, without `nopipe`: as written they time what it timed. A spec without `rN` / `pipe` / `nopipe`
takes the defaults.)
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from triton.testing import do_bench, do_bench_cudagraph

from rqcompile.config import RQConfig
from rqcompile.kernels import quantize as kq
from rqcompile.quant import quantizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--tiles", default="v1:64:4,v1:16:4,v1:32:4,v1:128:4,v1:32:8,v1:64:8,v1:128:8", help="kernel:tile:warps"
    )
    p.add_argument("--bits", default="3", help="comma-separated code widths, each timed over every launch in --tiles")
    p.add_argument("--backends", default="", help="block rotations to time instead of the dense default")
    p.add_argument(
        "--search",
        default="on",
        help="comma-separated: on (the default config's scale search) and / or off (`scale_search=()`), each timed",
    )
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    x = torch.randn(1, 4, 65536, 256, device="cuda", dtype=torch.bfloat16)
    src = torch.randn(2**29, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_bw = 4 * src.numel() / (do_bench(lambda: dst.copy_(src), return_mode="median") * 1e-3)
    src = dst = None
    print(f"GPU {torch.cuda.get_device_name(0)}, copy bandwidth {copy_bw / 1e9:.0f} GB/s", flush=True)
    defaults = dict(kq.DEFAULTS)
    rows = []
    for backend in args.backends.split(",") if args.backends else [None]:
        for search in args.search.split(","):
            for bits in (int(b) for b in args.bits.split(",")):
                rows += _sweep(x, bits, args.tiles.split(","), defaults, copy_bw, backend, search == "on")
    kq.DEFAULTS.update(defaults)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "quantize_dense_sweep.json"), "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(0), "copy_GBps": copy_bw / 1e9, "rows": rows}, f, indent=1)


def _numbered(field: str) -> bool:
    """A spec field `rN` (a register cap of N per thread), `mN` (at most N rows per dense program) or `sN` (N
    pipeline stages)."""
    return field[:1] in ("r", "m", "s") and field[1:].isdigit()


def _sweep(
    x: torch.Tensor,
    bits: int,
    specs: list[str],
    defaults: dict,
    copy_bw: float,
    backend: str | None = None,
    search: bool = True,
) -> list[dict]:
    """Time each launch spec on one `bits`-wide write of `x` (the default config's dense rotation, or one layer of
    `backend`'s blocks; with the default's scale search or none), restoring `defaults` after each."""
    cfg = RQConfig(residual_window=0, bits=bits) if search else RQConfig(residual_window=0, bits=bits, scale_search=())
    if backend:
        cfg = cfg.replace(backend=backend, rotation_stages=1)
    state = quantizer.make_state(cfg, layer_idx=1, kind="k", num_heads=4, head_dim=256)
    st = state.to("cuda")
    call = (x, st.rotation, st.mean, st.scale, st.levels, bits, st.group)
    ref_codes, _ = quantizer.quantize(x, st.rotation, st.mean, st.scale, st.levels, st.widths, st.group)
    rows = []
    for spec in specs:
        variant, tile, warps, *rest = spec.split(":")
        tile, warps = int(tile), int(warps)
        numbered = {f[0]: int(f[1:]) for f in rest if _numbered(f)}
        pipe = (bits,) if "pipe" in rest else () if "nopipe" in rest else None
        rest = [f for f in rest if not _numbered(f) and f not in ("pipe", "nopipe")]
        chunk = int(rest[0]) if rest else defaults["v2_dense_chunk"]
        prec = rest[1] if len(rest) > 1 else None
        split = {"split": True, "tf32x3": False, "fold": False, None: defaults["v2_dense_split"]}[prec]
        fold = {"fold": True, None: defaults["v2_dense_fold"]}.get(prec, False)
        if variant == "v1":
            kq.DEFAULTS.update(defaults, block_t_dense=tile, num_warps=warps)
        else:
            tile_key = "v2_tile" if backend else "v2_tile_dense"
            kq.DEFAULTS.update(defaults, v2_num_warps=warps, v2_dense_chunk=chunk, v2_dense_split=split)
            kq.DEFAULTS["v2_dense_fold"] = fold
            capped = "r" in numbered
            kq.DEFAULTS["v2_dense_maxnreg"] = {bits: numbered["r"]} if capped else defaults["v2_dense_maxnreg"]
            kq.DEFAULTS["v2_dense_capped_warps"] = {} if capped else defaults["v2_dense_capped_warps"]  # rN: WARPS
            kq.DEFAULTS["v2_dense_max_rows"] = numbered.get("m", defaults["v2_dense_max_rows"])
            kq.DEFAULTS["v2_dense_pipeline"] = defaults["v2_dense_pipeline"] if pipe is None else pipe
            kq.DEFAULTS["v2_dense_pipeline_needs_cap"] = defaults["v2_dense_pipeline_needs_cap"] if pipe is None else ()
            kq.DEFAULTS["v2_dense_stages"] = numbered.get("s", defaults["v2_dense_stages"])
            kq.DEFAULTS[tile_key] = tile
        t0 = time.time()
        codes, norms = kq.launch_quantize(*call, variant=variant)
        torch.cuda.synchronize()
        build = time.time() - t0
        ms = do_bench(lambda v=variant: kq.launch_quantize(*call, variant=v), return_mode="median")
        graph_ms = do_bench_cudagraph(lambda v=variant: kq.launch_quantize(*call, variant=v), return_mode="median")
        nbytes = x.numel() * 2 + codes.numel() + norms.numel() * 2
        differing = (codes != ref_codes).float().mean().item()
        _, launch_warps, launch_pipe = kq._dense_launch(bits, eager=True)
        row = {
            "backend": backend or "default (dense)",
            "scale_search": search,
            "bits": bits,
            "variant": variant,
            "tile": tile,
            "warps": launch_warps if variant == "v2" and not backend else warps,
            "chunk": chunk if variant == "v2" else None,
            "split": split,
            "fold": fold,
            "maxnreg": kq.DEFAULTS["v2_dense_maxnreg"].get(bits) if variant == "v2" and not backend else None,
            "max_rows": kq.DEFAULTS["v2_dense_max_rows"] if variant == "v2" and not backend else None,
            "pipeline": launch_pipe and fold and variant == "v2" and not backend,
            "stages": kq.DEFAULTS["v2_dense_stages"] if variant == "v2" and not backend else None,
        }
        row.update(ms=ms, of_copy=nbytes / (ms * 1e-3) / copy_bw, graph_ms=graph_ms)
        row.update(build_s=build, code_bytes_differing_from_reference=differing)
        row["nan_norms"] = bool(torch.isnan(norms.float()).any())
        rows.append(row)
        prec = "fold" if fold else "split" if split else "tf32x3"
        launch = f"chunk {row['chunk']} {prec}" if not backend else f"{backend} blocks"
        launch += "" if search else " no search"
        launch += f" maxnreg {row['maxnreg']}" if row["maxnreg"] else ""
        launch += f" max_rows {row['max_rows']}" if row["max_rows"] and row["max_rows"] != 64 else ""
        launch += " pipelined" if row["pipeline"] else ""
        launch += f" stages {row['stages']}" if row["stages"] else ""
        print(
            f"{bits} bits {variant} tile {tile:4d} warps {row['warps']} {launch}: {ms:.3f} ms, "
            f"{100 * row['of_copy']:.1f}% of copy bandwidth, as a CUDA graph {graph_ms:.3f} ms, "
            f"{differing:.1e} of code bytes differ from the reference, "
            f"build {build:.0f} s",
            flush=True,
        )
    kq.DEFAULTS.update(defaults)
    return rows


if __name__ == "__main__":
    main()
