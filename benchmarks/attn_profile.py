"""Where the fused decode attention spends its time: per-kernel device time (torch.profiler) of rq::attention at
Qwen3.5-27B attention shapes, next to bf16 SDPA on the same inputs, plus a mode that launches one shape repeatedly
for Nsight Compute and one that breaks down the host time of an eager call.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/attn_profile.py --out $OUT
    ncu --clock-control none -k regex:_attn_split --launch-skip 5 --launch-count 1 --section SpeedOfLight \\
        python3 benchmarks/attn_profile.py --ncu 8,32768
    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/attn_profile.py --host 1,4096

Options that change the launch (`--set block_n=128,split_waves=4`) apply to every shape, so variants can be compared
in one device run (`--variants "a:block_n=64;b:split_waves=4"`). Any launch_attention keyword works there, among
them keys-m's look-aheads (`k_prefetch=0`, `v_prefetch=1`) and its timing ablations (`ablate=N`, the bits of
`attention_keys_m.ABLATIONS`: parts of the loop replaced by no-ops, outputs wrong by design; session 18's table:
`--variants "base:;noKV:ablate=3;vreg:ablate=16;noVdot:ablate=4;noKdot:ablate=8;skel:ablate=12"`).
A setting named `kattn.NAME` (or `dense_query.NAME`) sets the module constant NAME of
`rqcompile.kernels.attention` (`rqcompile.kernels.dense_query`) for that variant only (restored after it), e.g. the
combine step's output columns per program of a dense block (session 28 timed 32 / 64 / 128):
`--variants "c32:kattn.COMBINE_DENSE_COLS=32;c64:kattn.COMBINE_DENSE_COLS=64;c128:"`.
`v_along_keys=1` times V's codes packed along keys (`RQConfig.value_layout="keys"`, `packing.pack_along_keys`) on V
re-packed that way, and reports its output's relative difference from the default launch's on the same data.
`rope_table=1` (with `--rope`) passes keys-m the rope term's cos / sin as `rope_term.rope_table` and reports the
output's relative difference from the same launch computing them.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import math
import os
import pstats
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from triton.testing import do_bench_cudagraph

import rqcompile.ops  # noqa: F401  (registers the rq ops and their CUDA kernels)
from rqcompile.config import RQConfig
from rqcompile.kernels import attention as kattn
from rqcompile.kernels import dense_query
from rqcompile.kernels.attention import launch_attention
from rqcompile.kernels.quantize import launch_quantize
from rqcompile.kernels.rope_term import rope_table
from rqcompile.quant import quantizer
from rqcompile.quant.packing import pack_along_keys

HEADS, Q_HEADS, DIM = 4, 24, 256
MODULES = {"kattn": kattn, "dense_query": dense_query}  # whose constants a variant may set


def inputs(batch: int, ctx: int, backend: str, bits: int):
    """Packed K/V of random bf16 data and the op's positional arguments (attention mask None, 1/sqrt(d))."""
    backend, _, staged = backend.partition(":")  # "iso:sfull" (the default rotation), "iso:s3": gpu_bench's names
    stages = 1 if not staged else ("full" if staged == "sfull" else int(staged[1:]))
    config = RQConfig(residual_window=0, rotation_stages=stages, backend=backend, bits=bits)
    states = [
        quantizer.make_state(config, layer_idx=1, kind=kind, num_heads=HEADS, head_dim=DIM) for kind in ("k", "v")
    ]
    ks, vs = (s.to("cuda") for s in states)
    q = torch.randn(batch, Q_HEADS, 1, DIM, device="cuda", dtype=torch.bfloat16)
    packed = []
    for st in (ks, vs):
        x = torch.randn(batch, HEADS, ctx, DIM, device="cuda", dtype=torch.bfloat16)
        packed += list(launch_quantize(x, st.rotation, st.mean, st.scale, st.levels, bits, st.group))
        del x
    kc, kn, vc, vn = packed
    args = (q, kc, kn, vc, vn, ks.rotation, ks.scale, ks.levels, vs.rotation, vs.mean, vs.scale, vs.levels, bits, bits)
    nbytes = sum(t.numel() * t.element_size() for t in packed)
    return args, nbytes


def along_keys(op_args: tuple, bits: int) -> tuple:
    """The op's arguments with V's codes re-packed along keys, one batch row at a time (the unpacked codes of a row
    at 512K keys take 4 GiB)."""
    vc = op_args[3]
    packed = torch.cat([pack_along_keys(vc[b : b + 1], bits, DIM) for b in range(vc.shape[0])])
    return (*op_args[:3], packed, *op_args[4:])


def rope_inputs(batch: int, pairs: int) -> dict[str, torch.Tensor]:
    """launch_attention's rope_ab (random weights, one decode query) and rope_inv_freq over `pairs` rotary pairs with
    Qwen3.5's theta 1e7: the calibrated default's pre-RoPE key-mean term."""
    index = torch.arange(0, 2 * pairs, 2, dtype=torch.float32, device="cuda")
    return {
        "rope_ab": torch.randn(batch, Q_HEADS, 1, 2 * pairs, device="cuda"),
        "rope_inv_freq": 1.0 / 1e7 ** (index / (2 * pairs)),
    }


def kernel_times(fn, reps: int = 20) -> dict[str, float]:
    """Mean device microseconds per call of each kernel `fn` launches."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    total: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            total[ev.name[:60]] += ev.device_time_total
    return {name: us / reps for name, us in sorted(total.items(), key=lambda kv: -kv[1])}


def host_us(fn, reps: int = 200) -> float:
    """Host microseconds per call of `fn`, the GPU kept ahead (calls only queue work; synchronized once at the end
    of a warm-up so that the queue is drained before timing)."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / reps * 1e6


def host_overhead(*op_args) -> None:
    """Eager calls pay host time per call that CUDA graphs and torch.compile remove (session 5: ~0.3 ms). Time the
    layers of one call separately, then profile the full op's Python."""
    sm = 1 / math.sqrt(DIM)
    q = op_args[0]
    rows = {
        "torch.ops.rq.attention (dispatcher, launcher, 2 kernels)": lambda: torch.ops.rq.attention(*op_args, None, sm),
        "launch_attention (launcher, 2 kernels)": lambda: launch_attention(*op_args, None, sm),
        "launch_attention, split_waves=8 (no build query for the split count)": lambda: launch_attention(
            *op_args, None, sm, split_waves=8
        ),
        "3 torch.empty (the launcher's buffers)": lambda: [torch.empty(64, device="cuda") for _ in range(3)],
        "q.float() (one small torch op)": lambda: q.float(),
    }
    for name, fn in rows.items():
        print(f"{host_us(fn):9.1f} us  {name}", flush=True)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        torch.ops.rq.attention(*op_args, None, sm)
    prof.disable()
    torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
    print(out.getvalue(), flush=True)


def parse_settings(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        out[key.strip()] = None if value == "None" else (int(value) if value.lstrip("-").isdigit() else value)
    return out


@contextlib.contextmanager
def module_constants(settings: dict):
    """Apply a variant's `module.NAME=value` settings (module: a key of MODULES) while it runs; yields the rest (the
    launch keywords). An unknown NAME is an error, not a silent no-op."""
    constants, launch = [], {}
    for key, value in settings.items():
        module, _, name = key.partition(".")
        if not name:
            launch[key] = value
        elif module not in MODULES or not hasattr(MODULES[module], name):
            raise ValueError(f"{key}: not a constant of {sorted(MODULES)}")
        else:
            constants.append((MODULES[module], name, value))
    saved = [(module, name, getattr(module, name)) for module, name, _ in constants]
    for module, name, value in constants:
        setattr(module, name, value)
    try:
        yield launch
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--shapes", default="1:32768,1:131072,8:32768,8:131072", help="batch:context, comma-separated")
    ap.add_argument("--backends", default="planar,iso")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--variants", default="default:", help="name:key=val,key=val;name2:... (launch settings)")
    ap.add_argument(
        "--ncu", default="", help="batch,context: launch that shape 10 times for ncu (first variant), nothing else"
    )
    ap.add_argument("--host", default="", help="batch,context: where an eager call spends its host time, nothing else")
    ap.add_argument("--kv-len", action="store_true", help="pass kv_len (all keys valid), as apply's programs do")
    ap.add_argument(
        "--decode-mask",
        action="store_true",
        help="pass a bool mask [1, 1, 1, T] as apply's decode steps do (the first token and the last 32 slots masked: "
        "the exact sink and window)",
    )
    ap.add_argument(
        "--rope",
        type=int,
        default=0,
        help="pass a rope_ab term over this many pairs (32: Qwen3.5-27B's partial rotary, the calibrated default's "
        "pre-RoPE key mean) with Qwen3.5's inverse frequencies (theta 1e7); 0: none",
    )
    args = ap.parse_args()

    if args.host:
        batch, ctx = (int(v) for v in args.host.split(","))
        host_overhead(*inputs(batch, ctx, args.backends.split(",")[0], args.bits)[0])
        return

    variants = []
    for spec in filter(None, args.variants.split(";")):
        name, _, settings = spec.partition(":")
        variants.append((name, parse_settings(settings)))

    if args.ncu:  # the first variant's settings
        batch, ctx = (int(v) for v in args.ncu.split(","))
        op_args, _ = inputs(batch, ctx, args.backends.split(",")[0], args.bits)
        if variants[0][1].get("v_along_keys"):
            op_args = along_keys(op_args, args.bits)
        kv_len = torch.full((batch,), ctx, device="cuda") if args.kv_len else None
        with module_constants(variants[0][1]) as settings:
            for _ in range(10):
                launch_attention(*op_args, None, 1 / math.sqrt(DIM), kv_len, **settings)
        torch.cuda.synchronize()
        return

    print("GPU", torch.cuda.get_device_name(0), "torch", torch.__version__, flush=True)
    rows = []
    for shape in args.shapes.split(","):
        batch, ctx = (int(v) for v in shape.split(":"))
        for backend in args.backends.split(","):
            op_args, nbytes = inputs(batch, ctx, backend, args.bits)
            q = op_args[0]
            k = torch.randn(batch, HEADS, ctx, DIM, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            sm = 1 / math.sqrt(DIM)

            def sdpa(q=q, k=k, v=v, sm=sm):
                return F.scaled_dot_product_attention(q, k, v, scale=sm, enable_gqa=True)

            sdpa_ms = do_bench_cudagraph(sdpa, rep=100, return_mode="median")
            keys_args, default_out = None, None
            rope = rope_inputs(batch, args.rope) if args.rope else {}
            for name, variant_settings in variants:
                with module_constants(variant_settings) as settings:
                    kv_len = torch.full((batch,), ctx, device="cuda") if args.kv_len else None
                    mask = None
                    if args.decode_mask:
                        mask = torch.ones(1, 1, 1, ctx, dtype=torch.bool, device="cuda")
                        mask[..., :1] = mask[..., -32:] = False
                    run_args, diff, diff_label = op_args, None, "vs V per token"
                    if settings.get("v_along_keys"):
                        keys_args = along_keys(op_args, args.bits) if keys_args is None else keys_args
                        run_args = keys_args
                    if settings.get("rope_table"):  # "rope_table=1": rope_term.rope_table for these frequencies
                        without = {k: v for k, v in settings.items() if k != "rope_table"}
                        base = launch_attention(*run_args, mask, sm, kv_len, **rope, **without).float()
                        settings = {**settings, "rope_table": rope_table(rope["rope_inv_freq"], ctx)}
                        out = launch_attention(*run_args, mask, sm, kv_len, **rope, **settings).float()
                        diff, diff_label = ((out - base).norm() / base.norm()).item(), "vs the turned cos / sin"

                    if settings.get("v_along_keys") and diff is None:
                        # against V per token with the same settings (split count included), so the two layouts
                        # sum the same keys in the same splits
                        per_token = {k: v for k, v in settings.items() if k != "v_along_keys"}
                        default_out = launch_attention(*op_args, mask, 1 / math.sqrt(DIM), kv_len, **rope, **per_token)
                        out = launch_attention(*run_args, mask, 1 / math.sqrt(DIM), kv_len, **rope, **settings).float()
                        default_out = default_out.float()
                        diff = ((out - default_out).norm() / default_out.norm()).item()

                    def fused(op_args=run_args, settings=settings, kv_len=kv_len, mask=mask, rope=rope):
                        return launch_attention(*op_args, mask, 1 / math.sqrt(DIM), kv_len, **rope, **settings)

                    ms = do_bench_cudagraph(fused, rep=100, return_mode="median")
                    kernels = kernel_times(fused)
                    row = {
                        "batch": batch,
                        "ctx": ctx,
                        "backend": backend,
                        "variant": name,
                        "kv_len": args.kv_len,
                        "decode_mask": args.decode_mask,
                        "rope_pairs": args.rope,
                        "settings": variant_settings,
                        "graph_ms": ms,
                        "sdpa_graph_ms": sdpa_ms,
                        "vs_sdpa": sdpa_ms / ms,
                        "packed_MB": nbytes / 1e6,
                        "kernels_us": kernels,
                        "rel_diff_vs_default": diff,
                    }
                    rows.append(row)
                    ks = "  ".join(f"{n.split('_kernel')[0][-24:]}={us:.1f}us" for n, us in kernels.items())
                    print(
                        f"B{batch} {ctx // 1024}K {backend:6s} {name:10s} {ms * 1e3:8.1f} us  "
                        f"SDPA {sdpa_ms * 1e3:7.1f} us "
                        f"({sdpa_ms / ms:.2f}x)  | {ks}" + ("" if diff is None else f"  | {diff_label} {diff:.1e}"),
                        flush=True,
                    )
            del k, v, op_args, keys_args, default_out
            torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "attn_profile.json"), "w") as f:
        json.dump({"defaults": kattn.DEFAULTS, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
