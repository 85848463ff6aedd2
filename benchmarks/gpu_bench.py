"""One device run: environment, copy bandwidth, kernel correctness at real sizes, quantize throughput, decode
attention latency at Qwen3.5-27B attention shapes (24 query heads, 4 KV heads, head_dim 256) against bf16 SDPA
and dequantize-then-SDPA, torch.compile / AOTInductor checks. Short table at the end, full JSON under --out.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/gpu_bench.py --out $OUT
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench, do_bench_cudagraph

import rqcompile.ops  # noqa: F401  (registers the rq ops and their CUDA kernels)
from rqcompile.config import RQConfig
from rqcompile.kernels import attention as kattn
from rqcompile.kernels import quantize as kquant
from rqcompile.kernels.attention import launch_attention
from rqcompile.kernels.quantize import launch_dequantize, launch_quantize
from rqcompile.quant import quantizer
from rqcompile.quant.packing import unpack

RESULTS: dict = {
    "env": {},
    "sweep": [],
    "checks": [],
    "quantize": [],
    "quantize_decode": [],
    "attention": [],
    "compile": [],
    "errors": [],
}
GIB = 1024**3


def log(*a):
    print(*a, flush=True)


@contextlib.contextmanager
def attention_decode(decode):
    """rq::attention (and launch_attention without `decode=`) with this code decode (kattn.DECODES name)."""
    old = kattn.DEFAULTS["decode"]
    kattn.DEFAULTS["decode"] = decode
    try:
        yield
    finally:
        kattn.DEFAULTS["decode"] = old


def med(fn, graph=False):
    if graph:
        return do_bench_cudagraph(fn, rep=100, return_mode="median")
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def env():
    p = torch.cuda.get_device_properties(0)
    e = {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "gpu": p.name,
        "sms": p.multi_processor_count,
        "mem_gib": round(p.total_memory / GIB, 1),
        "python": sys.version.split()[0],
    }
    try:
        import transformers

        e["transformers"] = transformers.__version__
    except Exception as exc:  # noqa: BLE001
        e["transformers"] = repr(exc)
    RESULTS["env"] = e
    log("ENV", e)


def copy_bandwidth():
    n = 2 * GIB // 2
    src = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = med(lambda: dst.copy_(src))
    bw = 2 * src.numel() * 2 / (ms * 1e-3)
    RESULTS["env"]["copy_bw_GBps"] = bw / 1e9
    log(f"copy bandwidth (read+write): {bw / 1e9:.0f} GB/s ({ms:.3f} ms for 2 GiB)")
    return bw


def state(backend, bits, kind, heads, dim, calibrated=False, scale_search=None):
    """`backend` alone is one block layer (the block kernels); "iso:s4" is RQConfig.rotation_stages=4, "iso:sfull"
    "full" (the library default since session 8)."""
    name, _, stages = backend.partition(":s")
    config = RQConfig(
        residual_window=0, backend=name, bits=bits, rotation_stages=int(stages) if stages.isdigit() else stages or 1
    )
    if scale_search is not None:
        config = config.replace(scale_search=scale_search)
    st = quantizer.make_state(config, layer_idx=1, kind=kind, num_heads=heads, head_dim=dim)
    if calibrated:
        from dataclasses import replace

        st = replace(st, mean=torch.randn(heads, dim) * 0.3, scale=torch.rand(heads, dim) + 0.5)
    return st.to("cuda")


def check_quantize(backend, bits, dim=256, heads=4, tokens=4096, batch=2):
    st = state(backend, bits, "k", heads, dim, calibrated=True)
    x = (torch.randn(batch, tokens, heads, dim, device="cuda") * 3).to(torch.bfloat16).transpose(1, 2)
    codes, norms = torch.ops.rq.quantize(x, st.rotation, st.mean, st.scale, st.levels, bits, st.group)
    rc, rn = quantizer.quantize(x, st.rotation, st.mean, st.scale, st.levels, bits, st.group)
    cu, ru = unpack(codes, bits, dim), unpack(rc, bits, dim)
    mism = (cu != ru).float().mean().item()
    maxdiff = (cu - ru).abs().max().item()
    nerr = ((norms.float() - rn.float()).abs() / rn.float().abs().clamp_min(1e-6)).max().item()
    same = (cu != ru).unflatten(-1, (norms.shape[-1], -1)).any(-1).logical_not()  # groups with no boundary flip
    nerr_same = ((norms.float() - rn.float()).abs() / rn.float().abs().clamp_min(1e-6))[same].max().item()
    # with the scale search a float tie can pick another candidate for a whole group (codes and norm both change);
    # tests/test_kernels.py checks that such groups reconstruct as well as the reference's
    flipped = 1.0 - same.float().mean().item()
    ok = flipped < 2e-3 and nerr_same < 2e-3 and not torch.isnan(norms).any().item()
    r = {
        "what": f"quantize {backend} {bits}b",
        "code_mismatch": mism,
        "max_code_diff": maxdiff,
        "norm_relerr": nerr,
        "norm_relerr_unflipped": nerr_same,
        "groups_flipped": flipped,
    }
    r["ok"] = ok
    RESULTS["checks"].append(r)
    log(r)
    # dequantize kernel against the reference on the same codes
    y = torch.ops.rq.dequantize(rc, rn, st.rotation, st.mean, st.scale, st.levels, bits, dim, torch.float32)
    ry = quantizer.dequantize(rc, rn, st.rotation, st.mean, st.scale, st.levels, bits, dim)
    e = ((y - ry).norm() / ry.norm()).item()
    r2 = {"what": f"dequantize {backend} {bits}b", "relerr": e, "ok": e < 1e-4}
    RESULTS["checks"].append(r2)
    log(r2)


def check_attention(backend, kb, vb, batch=2, tq=1, tk=5000, mask_kind="none"):
    heads, rep, dim = 4, 6, 256
    ks, vs = state(backend, kb, "k", heads, dim, True), state(backend, vb, "v", heads, dim, True)
    k = torch.randn(batch, heads, tk, dim, device="cuda") * 2
    v = torch.randn(batch, heads, tk, dim, device="cuda")
    kc, kn = quantizer.quantize(k, ks.rotation, ks.mean, ks.scale, ks.levels, kb, ks.group)
    vc, vn = quantizer.quantize(v, vs.rotation, vs.mean, vs.scale, vs.levels, vb, vs.group)
    q = torch.randn(batch, heads * rep, tq, dim, device="cuda", dtype=torch.bfloat16)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(batch, 1, 1, tk, device="cuda") > 0.2
    elif mask_kind == "float":
        mask = torch.randn(batch, heads * rep, tq, tk, device="cuda")
    elif mask_kind == "causal":
        mask = torch.ones(tq, tk, dtype=torch.bool, device="cuda").tril(tk - tq)
    sm = 1 / math.sqrt(dim)
    out = torch.ops.rq.attention(
        q, kc, kn, vc, vn, ks.rotation, ks.scale, ks.levels, vs.rotation, vs.mean, vs.scale, vs.levels, kb, vb, mask, sm
    )
    ref = quantizer.rotated_attention(q.float(), kc, kn, vc, vn, ks, vs, mask, sm)
    e = ((out.float() - ref).norm() / ref.norm()).item()
    ok = e < 1e-2 and not torch.isnan(out).any().item()
    what = f"attention {backend} K{kb}V{vb} B{batch} Tq{tq} Tk{tk} mask={mask_kind} decode={kattn.DEFAULTS['decode']}"
    r = {"what": what, "relerr": e, "ok": ok}
    RESULTS["checks"].append(r)
    log(r)


def bench_quantize(copy_bw, backend, bits, dim=256, heads=4, tokens=65536, batch=1, scale_search=None):
    st = state(backend, bits, "k", heads, dim, scale_search=scale_search)
    xs = [torch.randn(batch, heads, tokens, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    i = [0]

    def run():
        i[0] ^= 1
        return launch_quantize(xs[i[0]], st.rotation, st.mean, st.scale, st.levels, bits, st.group)

    ms = med(run)
    elems = batch * heads * tokens * dim
    nbytes = elems * 2 + elems * bits / 8 + elems / st.group * 2
    bw = nbytes / (ms * 1e-3)
    n_search = len(st.scale_candidates)
    r = {"backend": backend, "bits": bits, "shape": [batch, heads, tokens, dim], "ms": ms, "GBps": bw / 1e9}
    r["variant"] = kquant.DEFAULTS["quantize_variant_dense" if st.rotation.shape[-1] > 4 else "quantize_variant"]
    r["frac_copy_bw"] = bw / copy_bw
    r["scale_candidates"] = n_search
    RESULTS["quantize"].append(r)
    log(
        f"quantize {r['variant']} {backend:8s} {bits}b search {n_search}: {ms:.3f} ms, {bw / 1e9:.0f} GB/s "
        f"= {bw / copy_bw:.0%} of copy"
    )


def bench_quantize_decode(backend, batch, bits=3, dim=256, heads=4):
    """One decode step's quantize call (one new token per KV head, K or V of one layer): latency as a CUDA-graph
    replay, the way a compiled decode step runs it. The work is tiny (batch * heads * dim elements); what this
    measures is the kernel's per-program chain (benchmarks/NOTES.md v9)."""
    st = state(backend, bits, "k", heads, dim)
    x = torch.randn(batch, heads, 1, dim, device="cuda", dtype=torch.bfloat16)

    def run():
        return launch_quantize(x, st.rotation, st.mean, st.scale, st.levels, bits, st.group)

    row = {"backend": backend, "batch": batch, "bits": bits, "graph_us": med(run, graph=True) * 1e3}
    row["scale_candidates"] = len(st.scale_candidates)
    RESULTS["quantize_decode"].append(row)
    log(f"quantize one token {backend:8s} B{batch} {bits}b: {row['graph_us']:.1f} us (graph)")


def bench_layout_attention(copy_bw, batch, ctx, key_bits=3.5, value_bits=3, backend="iso"):
    """Fused attention over a calibrated bit-allocation layout (widths 2-6, random anisotropic channel weights) vs the
    uniform 3-bit kernel on the same shapes; correctness against the torch reference at 32K and below."""
    from rqcompile.ops import attention_state, quantize_state, reference_attention

    heads, hq, dim = 4, 24, 256
    gen = torch.Generator().manual_seed(1)
    config = RQConfig(
        residual_window=0, backend=backend, key_bits=key_bits, value_bits=value_bits, bit_allocation=(2, 3, 4, 5, 6)
    )
    ks, vs = (
        quantizer.make_state(
            config,
            layer_idx=1,
            kind=kind,
            num_heads=heads,
            head_dim=dim,
            weight=torch.exp(torch.randn(heads, dim, generator=gen) * 1.5),
        ).to("cuda")
        for kind in "kv"
    )
    q = torch.randn(batch, hq, 1, dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, heads, ctx, dim, device="cuda", dtype=torch.bfloat16)
    kc, kn = quantize_state(k, ks)
    vc, vn = quantize_state(k.flip(2), vs)
    del k
    sm = 1 / math.sqrt(dim)
    row = {"batch": batch, "ctx": ctx, "backend": backend, "layout_k": key_bits, "layout_v": value_bits}
    row["k_runs"] = sorted({w for w in ks.widths}, reverse=True)

    def fused():
        return attention_state(q, kc, kn, vc, vn, ks, vs, None, sm)

    if batch * ctx <= 2**18:
        from rqcompile.ops import layout_args

        kb, kp, kw = layout_args(ks)
        vb, vp, vw = layout_args(vs)
        ref = reference_attention(
            q.float(), kc, kn, vc, vn, ks.rotation, ks.scale, ks.levels, vs.rotation, vs.mean, vs.scale, vs.levels,
            kb, vb, None, sm, None, kp, vp, kw, vw,
        )  # fmt: skip
        row["relerr_vs_reference"] = ((fused().float() - ref).norm() / ref.norm()).item()
        del ref
    row["fused_ms"] = med(fused)
    row["fused_graph_ms"] = med(fused, graph=True)
    packed = sum(t.numel() * t.element_size() for t in (kc, kn, vc, vn))
    row["floor_ms"] = packed / copy_bw * 1e3
    RESULTS.setdefault("layout_attention", []).append(row)
    log(row)


def bench_attention(
    copy_bw, batch, ctx, bits=3, backend="planar", with_sdpa=True, with_deq=True, decodes=("tree",), rope=False
):
    """Fused attention (one row per code decode, same inputs) against bf16 SDPA and dequantize-then-SDPA (timed once,
    copied into every decode's row). `rope`: also the fused call with the pre-RoPE key offset's score term
    (`rope_ab` over Qwen3.5's 64 rotary dims, h = 32), its time and its error against the torch reference."""
    heads, hq, dim = 4, 24, 256
    ks, vs = state(backend, bits, "k", heads, dim), state(backend, bits, "v", heads, dim)
    q = torch.randn(batch, hq, 1, dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, heads, ctx, dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(batch, heads, ctx, dim, device="cuda", dtype=torch.bfloat16)
    kc, kn = launch_quantize(k, ks.rotation, ks.mean, ks.scale, ks.levels, bits, ks.group)
    vc, vn = launch_quantize(v, vs.rotation, vs.mean, vs.scale, vs.levels, bits, vs.group)
    sm = 1 / math.sqrt(dim)
    packed_bytes = sum(t.numel() * t.element_size() for t in (kc, kn, vc, vn))
    bf16_bytes = 2 * k.numel() * 2
    args = (q, kc, kn, vc, vn, ks.rotation, ks.scale, ks.levels, vs.rotation, vs.mean, vs.scale, vs.levels, bits, bits)

    def fused():
        return torch.ops.rq.attention(*args, None, sm)

    ref = None
    # correctness at this size against SDPA over the dequantized cache (skipped where fp32 copies don't fit)
    if batch * ctx <= 2**20:
        kd = launch_dequantize(kc, kn, ks.rotation, ks.mean, ks.scale, ks.levels, bits, dim, torch.bfloat16)
        vd = launch_dequantize(vc, vn, vs.rotation, vs.mean, vs.scale, vs.levels, bits, dim, torch.bfloat16)
        ref = F.scaled_dot_product_attention(q.float(), kd.float(), vd.float(), scale=sm, enable_gqa=True)
        del kd, vd
    rows, first_out = [], None
    for decode in decodes:
        row = {"batch": batch, "ctx": ctx, "bits": bits, "backend": backend, "decode": decode}

        def fused_kernel_only(decode=decode):
            return launch_attention(*args, None, sm, decode=decode)

        with attention_decode(decode):
            out = fused().float()
            if ref is not None:
                row["relerr_vs_dequant_sdpa_fp32"] = ((out - ref).norm() / ref.norm()).item()
            if first_out is None:
                first_out = out
            else:  # the same decoded values: equal up to the fp32 summation order
                row["maxdiff_vs_" + decodes[0]] = (out - first_out).abs().max().item()
            row["fused_ms"] = med(fused)
        row["fused_graph_ms"] = med(fused_kernel_only, graph=True)
        row["fused_floor_ms"] = packed_bytes / copy_bw * 1e3
        if rope:
            guarded(rope_row, row, args, sm, decode)
        rows.append(row)
    del ref, first_out
    if with_sdpa:
        base = {}

        def sdpa():
            return F.scaled_dot_product_attention(q, k, v, scale=sm, enable_gqa=True)

        base["sdpa_ms"] = med(sdpa)
        base["sdpa_graph_ms"] = med(sdpa, graph=True)
        base["sdpa_floor_ms"] = bf16_bytes / copy_bw * 1e3

        def deq_sdpa():
            kd = launch_dequantize(kc, kn, ks.rotation, ks.mean, ks.scale, ks.levels, bits, dim, torch.bfloat16)
            vd = launch_dequantize(vc, vn, vs.rotation, vs.mean, vs.scale, vs.levels, bits, dim, torch.bfloat16)
            return F.scaled_dot_product_attention(q, kd, vd, scale=sm, enable_gqa=True)

        if with_deq:
            base["deq_sdpa_ms"] = med(deq_sdpa)
        base["deq_sdpa_floor_ms"] = (packed_bytes + 2 * bf16_bytes) / copy_bw * 1e3
        for row in rows:
            row.update(base)
    for row in rows:
        RESULTS["attention"].append(row)
        log(json.dumps(row))


def rope_row(row, args, sm, decode):
    """`row` gains the fused attention's time with the rope_ab term (kernel only, CUDA graph) and its relative error
    against the torch reference on these inputs (where that fits)."""
    q = args[0]
    half = 32
    inv_freq = 1.0 / (1e7 ** (torch.arange(0, 2 * half, 2, device="cuda", dtype=torch.float32) / (2 * half)))
    ab = torch.randn(*q.shape[:-1], 2 * half, device="cuda") * 4.0
    tail = (None, sm, None, None, None, None, None, ab, inv_freq)
    row["rope_kernel_supported"] = kattn.attention_supported(
        q, args[1], args[3], args[12], args[13], args[2], args[4], rope_ab=ab
    )
    if row["rope_kernel_supported"]:

        def with_rope(decode=decode):
            return launch_attention(*args, *tail, decode=decode)

        out = with_rope().float()
        assert torch.isfinite(out).all()
        if q.shape[0] * args[1].shape[2] <= 2**18:
            from rqcompile.ops import reference_attention

            ref = reference_attention(*args, *tail).float()
            row["rope_relerr_vs_reference"] = ((out - ref).norm() / ref.norm()).item()
        row["fused_rope_graph_ms"] = med(with_rope, graph=True)


def sweep(copy_bw):
    """Launch-parameter sweep; the fastest settings become the kernels' defaults for the rest of the run."""
    heads, dim = 4, 256
    st = state("planar", 3, "k", heads, dim)
    x = torch.randn(1, heads, 65536, dim, device="cuda", dtype=torch.bfloat16)
    best = None
    for bt in (8, 16, 32):
        for lut in (0, 1):
            for reshape in (False, True):
                kquant.DEFAULTS.update(block_t=bt, lut=lut, reshape=reshape)
                ms = med(lambda: launch_quantize(x, st.rotation, st.mean, st.scale, st.levels, 3, st.group))
                RESULTS["sweep"].append({"kernel": "quantize", "block_t": bt, "lut": lut, "reshape": reshape, "ms": ms})
                log(f"sweep quantize bt={bt} lut={lut} reshape={reshape}: {ms:.3f} ms")
                if best is None or ms < best[0]:
                    best = (ms, dict(block_t=bt, lut=lut, reshape=reshape))
    kquant.DEFAULTS.update(best[1])
    log("quantize defaults", kquant.DEFAULTS)
    sweep_attention()


def sweep_attention(configs=None):
    """Attention launch sweep (planar 3 bit, 32K context, batch 1 and 8, CUDA-graph medians); the configuration
    with the smallest summed time becomes kattn.DEFAULTS."""
    heads, dim = 4, 256
    if configs is None:
        # (block_n, num_warps, split_waves, num_stages, maxnreg): the current defaults first, then what the prmt
        # decode (v6, fewer registers and instructions per element) may have made worth it
        configs = [
            dict(block_n=bn, num_warps=nw, split_waves=sw, num_stages=ns, maxnreg=mr)
            for bn, nw, sw, ns, mr in (
                (32, 4, 8, 2, 168),
                (32, 4, 4, 2, 168),
                (32, 4, 8, 2, 128),
                (64, 4, 8, 2, 168),
                (64, 4, 4, 2, 168),
                (64, 4, 8, 3, 168),
                (64, 8, 8, 2, None),
                (128, 4, 4, 2, None),
                (128, 8, 4, 2, None),
                (16, 4, 8, 2, 128),
            )
        ]
    shapes = []
    for batch in (1, 8):
        ks, vs = state("planar", 3, "k", heads, dim), state("planar", 3, "v", heads, dim)
        kv = torch.randn(batch, heads, 32768, dim, device="cuda", dtype=torch.bfloat16)
        kc, kn = launch_quantize(kv, ks.rotation, ks.mean, ks.scale, ks.levels, 3, ks.group)
        q = torch.randn(batch, 24, 1, dim, device="cuda", dtype=torch.bfloat16)
        shapes.append((q, kc, kn, ks, vs))
    best = None
    for cfg in configs:
        tot = 0.0
        for q, kc, kn, ks, vs in shapes:
            fn = functools.partial(
                launch_attention,
                q,
                kc,
                kn,
                kc,
                kn,
                ks.rotation,
                ks.scale,
                ks.levels,
                vs.rotation,
                vs.mean,
                vs.scale,
                vs.levels,
                3,
                3,
                None,
                0.0625,
                **cfg,
            )
            try:
                ms = med(fn, graph=True)
            except Exception as exc:  # noqa: BLE001
                log("sweep attention failed", cfg, repr(exc)[:200])
                ms = float("inf")
            tot += ms
            RESULTS["sweep"].append({"kernel": "attention", "batch": q.shape[0], **cfg, "ms": ms})
            log(f"sweep attention B{q.shape[0]} 32K {cfg}: {ms:.3f} ms")
        if best is None or tot < best[0]:
            best = (tot, dict(cfg))
    kattn.DEFAULTS.update(best[1])
    log("attention defaults", kattn.DEFAULTS)


def quantize_attend_module() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A module that quantizes x with rq::quantize and attends to it with rq::attention (K = V), and its inputs: what
    check_compile and aoti_only compile."""
    heads, rep, dim, bits, tk = 4, 6, 256, 3, 3000
    ks = state("planar", bits, "k", heads, dim)
    x = torch.randn(2, heads, tk, dim, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(2, heads * rep, 1, dim, device="cuda", dtype=torch.bfloat16)

    class M(torch.nn.Module):
        def forward(self, x, q):
            kc, kn = torch.ops.rq.quantize(x, ks.rotation, ks.mean, ks.scale, ks.levels, bits, ks.group)
            return torch.ops.rq.attention(
                q,
                kc,
                kn,
                kc,
                kn,
                ks.rotation,
                ks.scale,
                ks.levels,
                ks.rotation,
                ks.mean,
                ks.scale,
                ks.levels,
                bits,
                bits,
                None,
                1 / math.sqrt(dim),
            )

    return M(), x, q


def check_compile():
    """torch.compile and AOTInductor over the rq ops on CUDA: same results as eager, Triton kernels in the graph."""
    m, x, q = quantize_attend_module()
    eager = m(x, q)
    try:
        from torch._inductor.utils import run_and_get_code

        cm = torch.compile(m, fullgraph=True)
        out, codes = run_and_get_code(cm, x, q)
        src = "\n".join(codes)
        r = {
            "what": "torch.compile",
            "maxdiff": (out.float() - eager.float()).abs().max().item(),
            # any of the quantize and decode-attention kernels the launchers pick (keys-m is the decode default)
            "triton_kernels_in_graph": (
                any(k in src for k in ("_quantize_kernel", "_quantize_v2_kernel", "_quantize_rows_kernel")),
                any(k in src for k in ("_attn_keys_m_kernel", "_attn_split_kernel")),
            ),
            "extern_rq_call": "torch.ops.rq" in src,
            "eager_ms": med(lambda: m(x, q)),
            "compiled_ms": med(lambda: cm(x, q)),
        }
        r["ok"] = r["maxdiff"] < 1e-2 and all(r["triton_kernels_in_graph"])
    except Exception as exc:  # noqa: BLE001
        r = {"what": "torch.compile", "ok": False, "error": repr(exc)[:2000]}
        traceback.print_exc()
    RESULTS["compile"].append(r)
    log(r)
    import subprocess

    proc = subprocess.run(
        [sys.executable, __file__, "--aoti-only"], capture_output=True, text=True, timeout=240, env=os.environ.copy()
    )
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("AOTI ")]
    r = json.loads(line[-1][5:]) if line else {"what": "AOTInductor", "ok": False}
    r["returncode"] = proc.returncode
    if proc.returncode:
        r["stderr_tail"] = proc.stderr[-1500:]
    RESULTS["compile"].append(r)
    log(r)


def aoti_only():
    """AOTInductor export of quantize + attention, in its own process (a crash there must not end the bench)."""
    m, x, q = quantize_attend_module()
    eager = m(x, q)
    import tempfile
    import zipfile

    r = {"what": "AOTInductor", "ok": False, "stage": "export"}
    print("AOTI " + json.dumps(r), flush=True)
    ep = torch.export.export(m, (x, q), strict=False)
    r["exported_ops"] = sorted({str(n.target) for n in ep.graph.nodes if "rq" in str(n.target)})
    r["stage"] = "compile"
    print("AOTI " + json.dumps(r), flush=True)
    path = os.path.join(tempfile.mkdtemp(), "m.pt2")
    torch._inductor.aoti_compile_and_package(ep, package_path=path)
    names = zipfile.ZipFile(path).namelist()
    r["kernel_binaries"] = [n.rsplit("/", 1)[-1] for n in names if n.endswith((".cubin", ".fatbin", ".ptx"))][:8]
    r["stage"] = "load"
    print("AOTI " + json.dumps(r), flush=True)
    out = torch._inductor.aoti_load_package(path)(x, q)
    r["maxdiff"] = (out.float() - eager.float()).abs().max().item()
    r["ok"] = r["maxdiff"] < 1e-2
    r["stage"] = "done"
    print("AOTI " + json.dumps(r), flush=True)


def guarded(fn, *a, **k):
    try:
        fn(*a, **k)
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        RESULTS["errors"].append(f"{fn.__name__}{a}: {exc!r}"[:1000])
    torch.cuda.empty_cache()


def table(copy_bw):
    log("\n==== SUMMARY (" + RESULTS["env"].get("gpu", "?") + f", copy bw {copy_bw / 1e9:.0f} GB/s) ====")
    bad = [c["what"] for c in RESULTS["checks"] + RESULTS["compile"] if not c.get("ok")]
    log(f"checks: {len(RESULTS['checks']) - len([b for b in bad if 'torch.compile' not in b])} ok, failed: {bad}")
    for r in RESULTS["quantize"]:
        s = f"quantize {r['backend']:8s} {r['bits']}b  {r['ms']:.3f} ms  {r['GBps']:.0f} GB/s"
        log(s + f"  {r['frac_copy_bw']:.0%} of copy")
    for r in RESULTS["quantize_decode"]:
        log(f"quantize one token {r['backend']:8s} B{r['batch']} {r['bits']}b  {r['graph_us']:.1f} us (graph)")
    log(
        "attn backend B ctx b decode | fused ms (graph) floor% | sdpa ms (graph) floor% | deq+sdpa ms | vs sdpa (graph)"
    )
    for r in RESULTS["attention"]:
        s = f"{r.get('backend', 'planar'):7s} B{r['batch']} {r['ctx'] // 1024:4d}K {r['bits']}b "
        s += f"{r.get('decode', 'tree'):4s} | "
        s += f"{r['fused_ms']:.3f} ({r['fused_graph_ms']:.3f}) "
        s += f"{r['fused_floor_ms'] / r['fused_graph_ms']:.0%}"
        if "sdpa_ms" in r:
            s += f" | {r['sdpa_ms']:.3f} ({r['sdpa_graph_ms']:.3f}) {r['sdpa_floor_ms'] / r['sdpa_graph_ms']:.0%}"
            s += f" | {r.get('deq_sdpa_ms', float('nan')):.3f} | {r['sdpa_ms'] / r['fused_ms']:.2f}x"
            s += f" ({r['sdpa_graph_ms'] / r['fused_graph_ms']:.2f}x)"
        if "fused_rope_graph_ms" in r:
            s += f" | rope {r['fused_rope_graph_ms']:.3f} (graph) {r['fused_rope_graph_ms'] / r['fused_graph_ms']:.2f}x"
            s += f" err {r.get('rope_relerr_vs_reference', float('nan')):.1e}"
        elif "rope_kernel_supported" in r:
            s += " | rope: kernel declines"
        log(s)
    for e in RESULTS["errors"]:
        log("ERROR", e[:300])


def attention_checks(decodes=("tree",)):
    for decode in decodes:
        with attention_decode(decode):
            attention_checks_one()


def attention_checks_one():
    for backend, kb, vb in (("planar", 3, 3), ("planar", 2, 2), ("planar", 4, 4), ("iso", 4, 2), ("rotor", 2, 4)):
        guarded(check_attention, backend, kb, vb)
    guarded(check_attention, "hadamard", 3, 3)
    guarded(check_attention, "iso:sfull", 3, 3)
    guarded(check_attention, "planar", 3, 3, batch=3, mask_kind="bool")
    guarded(check_attention, "planar", 3, 3, batch=2, tq=7, mask_kind="float")
    guarded(check_attention, "iso", 3, 3, batch=2, tq=16, mask_kind="causal")


def quantize_section(copy_bw, variants):
    """Quantize checks against the reference, one-token (decode) and bulk timings, for each quantize variant."""
    for variant in variants:  # launch_quantize's default for the checks and timing
        kquant.DEFAULTS["quantize_variant"] = variant
        for backend in ("planar", "iso", "rotor", "hadamard", "iso:sfull"):
            guarded(check_quantize, backend, 3)
        for backend in ("planar", "iso", "hadamard", "iso:sfull"):
            for batch in (1, 8):
                guarded(bench_quantize_decode, backend, batch)
        for backend, bits, search in (
            ("planar", 3, None),
            ("planar", 3, ()),
            ("iso", 3, None),
            ("iso:sfull", 3, None),
            ("hadamard", 3, None),
            ("planar", 4, None),
        ):
            guarded(bench_quantize, copy_bw, backend, bits, scale_search=search)


def write_results(out, t0):
    RESULTS["defaults"] = {"attention": dict(kattn.DEFAULTS)}
    RESULTS["wall_s"] = time.time() - t0
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "gpu_bench.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)


def attn_only(args):
    """`--attn-only`: environment, copy bandwidth, attention correctness, launch sweep, then fused vs bf16 SDPA for
    every (batch, context, bits) asked for (planar), in one process; JSON under --out."""
    t0 = time.time()
    torch.manual_seed(0)
    env()
    copy_bw = copy_bandwidth()
    if args.layout:
        for ctx in [int(c) for c in args.contexts.split(",")]:
            guarded(bench_layout_attention, copy_bw, 8, ctx, 3.5, 3, "iso")
            guarded(bench_attention, copy_bw, 8, ctx, bits=3, backend="iso", with_deq=False)
    if args.quantize:
        quantize_section(copy_bw, args.quantize_variant.split(","))
        if args.quantize_only:
            write_results(args.out, t0)
            return
    decodes = tuple(args.decode.split(","))
    attention_checks(decodes)
    log(f"checks done at {time.time() - t0:.0f}s")
    if not args.no_sweep:
        guarded(sweep_attention)
        log(f"sweep done at {time.time() - t0:.0f}s")
    for batch in [int(b) for b in args.batches.split(",")]:
        for ctx in [int(c) for c in args.contexts.split(",")]:
            for bits in [int(b) for b in args.bits.split(",")]:
                for backend in args.backends.split(","):
                    guarded(
                        bench_attention,
                        copy_bw,
                        batch,
                        ctx,
                        bits=bits,
                        backend=backend,
                        with_deq=not args.no_deq,
                        decodes=decodes,
                        rope=args.rope,
                    )
    log(f"attention bench done at {time.time() - t0:.0f}s")
    write_results(args.out, t0)
    table(copy_bw)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--aoti-only", action="store_true")
    ap.add_argument("--attn-only", action="store_true", help="attention checks, sweep and latency only")
    ap.add_argument("--batches", default="1,8", help="attention batches (comma-separated)")
    ap.add_argument("--contexts", default="4096,32768,131072,524288", help="attention contexts")
    ap.add_argument("--bits", default="3", help="attention bit widths for every (batch, context)")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument(
        "--backends", default="planar", help="with --attn-only: attention backends to time (staged: iso:s4, iso:sfull)"
    )
    ap.add_argument("--quantize", action="store_true", help="with --attn-only: quantize checks and bench too")
    ap.add_argument("--quantize-only", action="store_true", help="with --attn-only --quantize: stop after quantize")
    ap.add_argument("--layout", action="store_true", help="with --attn-only: bit-allocation layout attention too")
    ap.add_argument("--no-deq", action="store_true", help="skip the dequantize-then-SDPA baseline")
    ap.add_argument("--rope", action="store_true", help="with --attn-only: also time the rope_ab score term")
    ap.add_argument(
        "--quantize-variant",
        default="v1",
        help="with --quantize: quantize kernels to check and time, comma-separated (v1, v2; benchmarks/NOTES.md)",
    )
    ap.add_argument(
        "--decode",
        default="prmt",
        help="attention code decodes to check and time, comma-separated (kattn.DECODES: tree, prmt, prmt-emulated)",
    )
    args = ap.parse_args()
    for decode in args.decode.split(","):
        if decode not in kattn.DECODES:
            ap.error(f"--decode: {decode!r} is not one of {sorted(kattn.DECODES)}")
    if args.aoti_only:
        aoti_only()
        return
    if args.attn_only:
        attn_only(args)
        return
    t0 = time.time()
    torch.manual_seed(0)
    env()
    copy_bw = copy_bandwidth()
    for backend in ("planar", "iso", "rotor", "hadamard", "none"):
        for bits in (2, 3, 4):
            guarded(check_quantize, backend, bits)
    decodes = tuple(args.decode.split(","))
    attention_checks(decodes)
    log(f"checks done at {time.time() - t0:.0f}s")
    guarded(sweep, copy_bw)
    log(f"sweep done at {time.time() - t0:.0f}s")
    for backend, bits in (("planar", 3), ("planar", 2), ("planar", 4), ("iso", 3), ("rotor", 3), ("hadamard", 3)):
        guarded(bench_quantize, copy_bw, backend, bits)
    log(f"quantize bench done at {time.time() - t0:.0f}s")
    mem = torch.cuda.get_device_properties(0).total_memory
    for batch in (1, 8):
        for ctx in (4096, 32768, 131072, 524288):
            need = 2 * batch * 4 * ctx * 256 * 2 * 2.6  # bf16 K/V + copies made by the baselines
            if need > 0.8 * mem:
                guarded(bench_attention, copy_bw, batch, ctx, with_sdpa=False, decodes=decodes)
                continue
            guarded(bench_attention, copy_bw, batch, ctx, decodes=decodes)
    for bits in (2, 4):
        guarded(bench_attention, copy_bw, 8, 131072, bits=bits, decodes=decodes)
    log(f"attention bench done at {time.time() - t0:.0f}s")
    RESULTS["defaults"] = {"quantize": dict(kquant.DEFAULTS), "attention": dict(kattn.DEFAULTS)}
    os.makedirs(args.out, exist_ok=True)
    table(copy_bw)
    guarded(check_compile)
    RESULTS["wall_s"] = time.time() - t0
    with open(os.path.join(args.out, "gpu_bench.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)
    for r in RESULTS["compile"]:
        log({k: v for k, v in r.items() if k != "stderr_tail"})


if __name__ == "__main__":
    main()
