"""Static SASS of the bulk quantize kernels for sm_90, built here without a GPU, and the time their instruction
count alone needs on an H200: the issue floor that bounds "quantize >= 80% of copy bandwidth" (issue 4).

Each build is the kernel `launch_quantize` runs for a contiguous x [B, H, T, 256] bf16 write of many tokens, with
the constants and divisibility a real launch specializes. The count is per warp and program: the straight-line
instructions plus the body of each runtime loop times its trip count (the scale search's candidate loop runs NA
times, and for blocks of 3 or 4 a loop over the D / G norm groups runs around it; `for _ in range(n)` loops are the
only backward branches these kernels have). Every warp of a program runs
the same stream, so a launch issues programs x warps x that many warp-instructions, and an H200 issues at most one
per scheduler and cycle: 132 SMs x 4 schedulers x 1.98 GHz. That floor ignores memory, latency and the pipes that
issue at half rate or less (MUFU, conversions), so the real time is above it. A dense rotation's `tl.dot` runs on
the tensor cores (HGMMA, asynchronous to the issue of the rest): their floor is the multiply-adds its HGMMA
instructions name (M x N x K each, once per warpgroup) at the H200's dense rate (TF32 494.7, BF16 989.4 TFLOPS).

    .venv/bin/python -m pip install --no-deps --target /tmp/t36 triton==3.6.0   # the device's Triton
    PYTHONPATH=/tmp/t36:. .venv/bin/python benchmarks/quantize_sass.py             # the default config, planar
    PYTHONPATH=/tmp/t36:. .venv/bin/python benchmarks/quantize_sass.py "kernel=v1,rb=2,na=5" "kernel=v2,rb=2,na=0"

Each argument is one build: kernel (v1 | v2), rb (rotation block: 2 planar, 4 iso with one layer, 128 the default
full mixing), bits, na (scale candidates: 5 is the default `RQConfig.scale_search`, 0 none), tokens (T), kc (v2's
dense rotation: input coordinates per tl.dot step, `DEFAULTS["v2_dense_chunk"]`), split (1: the dense rotation
pre-split into tf32 halves, `DEFAULTS["v2_dense_split"]`), fold (1: (x - mean) / scale folded into the rotation's
three bf16 parts, `DEFAULTS["v2_dense_fold"]`), maxnreg (Triton's register cap per thread: the stack it costs; 0 for
none; the default caps per width), warps and rows (v2's warps and the most rows of a dense program), pipe (1 / 0: the
folded rotation's dots pipelined or unrolled; default `DEFAULTS["v2_dense_pipeline"]`).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from benchmarks.sass_counts import BIN, CLOCK_HZ, SCHEDULERS, SMS, backward_branches, sass_rows
from rqcompile.kernels import quantize as kq

TENSOR_FLOPS = {"TF32": 494.7e12, "BF16": 989.4e12, "F16": 989.4e12}  # H200 SXM, dense
COPY_GBS = 4250  # the H200's device copy bandwidth as measured in sessions 3-17 (BENCHMARKS.md)
POINTERS = dict(x_ptr="*bf16", rot_ptr="*fp32", mean_ptr="*fp32", scale_ptr="*fp32", lev_ptr="*fp32")
POINTERS.update(thr_ptr="*fp32", rs_ptr="*fp32", rlo_ptr="*fp32", codes_ptr="*u8", norms_ptr="*fp16", perm_ptr="*fp32")


def build(
    kernel: str = "v2",
    rb: int = 128,
    bits: int = 3,
    na: int = 5,
    d: int = 256,
    g: int = 128,
    tokens=65536,
    kc=None,
    split=None,
    fold=None,
    maxnreg=None,
    warps=None,
    rows=None,
    pipe=None,
):
    """(compiled kernel, BLOCK_T, num_warps) as launch_quantize builds it for this write (kc: v2's dense rotation
    chunk, default `DEFAULTS["v2_dense_chunk"]`; split: its pre-split rotation, `DEFAULTS["v2_dense_split"]`; fold:
    its folded bf16 rotation, `DEFAULTS["v2_dense_fold"]`; maxnreg: Triton's register cap per thread, 0 for none,
    default `DEFAULTS["v2_dense_maxnreg"]`; warps: v2's, default `DEFAULTS["v2_num_warps"]`; rows: the most rows of a
    dense program, default `DEFAULTS["v2_dense_max_rows"]`)."""
    fn = kq._quantize_v2_kernel if kernel == "v2" else kq._quantize_kernel
    dense = rb > 4
    nb = d // g if dense else d // rb
    const = dict(D=d, G=g, NG=d // g, RB=rb, NB=nb, BITS=bits, NA=na, sxd=1)
    if kernel == "v2":
        slots = 8 if bits == 4 else 16
        bt = max(1, kq.DEFAULTS["v2_tile_dense" if dense else "v2_tile"] // (g // slots))
        bt = min(max(bt, 16), rows or kq.DEFAULTS["v2_dense_max_rows"]) if dense else bt
        fold = bool(kq.DEFAULTS["v2_dense_fold"] if fold is None else fold) and dense
        split = bool(kq.DEFAULTS["v2_dense_split"] if split is None else split) and dense and not fold
        const.update(BLOCK_T=bt, FMA_DIV=True, DOT_PREC="tf32" if split else "tf32x3", SPLIT=split, FOLD=fold)
        const.update(KC=min(kc or kq.DEFAULTS["v2_dense_chunk"], g))
        maxnreg = (kq.DEFAULTS["v2_dense_maxnreg"].get(bits) if dense and maxnreg is None else maxnreg) or None
        needs_cap = bits in kq.DEFAULTS["v2_dense_pipeline_needs_cap"] and not maxnreg
        pipe = bits in kq.DEFAULTS["v2_dense_pipeline"] and not needs_cap if pipe is None else pipe
        const.update(PIPE=fold and bool(pipe))
        if not warps:  # as launch_quantize picks them
            warps = kq.DEFAULTS["v2_num_warps"]
            warps = kq.DEFAULTS["v2_dense_capped_warps"].get(bits, warps) if maxnreg else warps
    else:
        bt = kq._block_t(d, dense, tokens)
        const.update(BLOCK_T=bt, DENSE=dense, DOT_PREC="tf32x3", LUT=kq.DEFAULTS["lut"], PERM=False, LAYOUT="")
        const.update(RESHAPE=kq.DEFAULTS["reshape"] and rb in (1, 2, 4))
        warps = kq.DEFAULTS["num_warps"]
    sig = {name: "i32" for name in fn.arg_names}
    sig.update({k: v for k, v in POINTERS.items() if k in sig})
    if kernel == "v2" and fold:
        sig["rot_ptr"] = "*bf16"  # the folded rotation's three bf16 parts
    sig.update({name: "constexpr" for name in const})
    divisible = [n for n in (*POINTERS, "sxb", "sxh", "sxt", "T") if sig.get(n, "constexpr") != "constexpr"]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    target = GPUTarget("cuda", 90, 32)
    maxnreg = maxnreg or None  # maxnreg=0: no cap
    options = {"num_warps": warps} if maxnreg is None else {"num_warps": warps, "maxnreg": maxnreg}
    compiled = triton.compile(ASTSource(fn, sig, const, attrs), target=target, options=options)
    return compiled, bt, warps


def _runs(sass: str, trips: int, outer_trips: int) -> tuple[list[tuple[int, str, str]], list[int], int]:
    """(rows, how many times each row runs per warp, loops). An innermost loop's body runs `trips` times, a loop
    around another loop (the norm groups' runtime loop around the scale search's) `outer_trips` times; an
    instruction inside several loops runs their product."""
    rows = sass_rows(sass)
    loops = backward_branches(rows)
    outer = {(lo, hi) for lo, hi in loops if any(lo <= a and b <= hi and (a, b) != (lo, hi) for a, b in loops)}
    counts = []
    for addr, _, _ in rows:
        n = 1
        for lo, hi in loops:
            if lo <= addr <= hi:
                n *= outer_trips if (lo, hi) in outer else trips
        counts.append(n)
    return rows, counts, len(loops)


def dynamic_count(sass: str, trips: int, outer_trips: int = 1) -> tuple[int, int, int]:
    """(instructions run per warp, static instructions, backward branches), loops counted as `_runs` does."""
    rows, counts, loops = _runs(sass, trips, outer_trips)
    return sum(counts), len(rows), loops


def tensor_flops(sass: str, trips: int = 1, outer_trips: int = 1) -> dict[str, int]:
    """Floating-point operations (2 per multiply-add) of one program's HGMMA instructions, by input type, an HGMMA
    inside a loop counted once per trip (a dense rotation inside the norm groups' runtime loop)."""
    flops: dict[str, int] = {}
    rows, counts, _ = _runs(sass, trips, outer_trips)
    for (_, op, rest), n in zip(rows, counts, strict=True):
        m = re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)\.\w+\.(\w+)", op + rest)
        if m:
            kind = m.group(4)
            flops[kind] = flops.get(kind, 0) + n * 2 * int(m.group(1)) * int(m.group(2)) * int(m.group(3))
    return flops


def report(spec: str) -> None:
    kw = {}
    for item in filter(None, spec.split(",")):
        key, value = item.split("=")
        kw[key] = value if key == "kernel" else int(value)
    compiled, bt, warps = build(**kw)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([f"{BIN}/cuobjdump", "-sass", f.name], capture_output=True, text=True).stdout
        res = subprocess.run([f"{BIN}/cuobjdump", "-res-usage", f.name], capture_output=True, text=True).stdout
    na, d, tokens = kw.get("na", 5), kw.get("d", 256), kw.get("tokens", 65536)
    # the only loops: the scale search's over its NA candidates and, where the groups are not unrolled (blocks of 3
    # or 4, quantize_v2's UNROLL), one over the D / G norm groups around it (alone when NA = 0)
    groups = d // kw.get("g", 128)
    trips = (na, groups) if na else (groups, 1)
    run, static, loops = dynamic_count(sass, *trips)
    heads, batch = 4, 1
    programs = -(-tokens // bt) * batch * heads
    floor_us = programs * warps * run / (SMS * SCHEDULERS * CLOCK_HZ) * 1e6
    tensor_us = sum(programs * f / TENSOR_FLOPS[kind] for kind, f in tensor_flops(sass, *trips).items()) * 1e6
    elements = batch * heads * tokens * d
    bytes_moved = elements * 2 + elements * kw.get("bits", 3) // 8 + elements // kw.get("g", 128) * 2
    copy_us = bytes_moved / (COPY_GBS * 1e9) * 1e6
    usage = " ".join(re.findall(r"REG:\d+|STACK:\d+", res))
    print(
        f"{spec or 'default'}: {usage}, BLOCK_T {bt}, {warps} warps; {static} static instructions, {loops} loop(s); "
        f"{run} run per warp = {run * warps * 32 / (bt * d):.0f} thread-instructions per element; "
        f"x [{batch}, {heads}, {tokens}, {d}]: issue floor {floor_us:.0f} us, tensor-core floor {tensor_us:.0f} us, "
        f"copy of its bytes {copy_us:.0f} us (the larger floor alone is {copy_us / max(floor_us, tensor_us):.1%} of "
        "copy bandwidth)"
    )


def main() -> None:
    for spec in sys.argv[1:] or ["kernel=v2,rb=128,na=5", "kernel=v1,rb=2,na=5", "kernel=v2,rb=2,na=5"]:
        report(spec)


if __name__ == "__main__":
    main()
