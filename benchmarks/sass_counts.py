"""Static SASS of the uniform decode attention kernels for sm_90, built here without a GPU: registers, stack, shared
memory, and the main loop's instruction count per 64-key tile and thread with its shared-memory / mma / barrier
instructions (benchmarks/NOTES.md v10). The kernels are compiled with the divisibility attributes a real launch
specializes (16-byte aligned pointers, strides and lengths divisible by 16, unit stride, Tq = 1): without them the
load layouts, and so the conversions, differ.

The device machine runs Triton 3.6 (torch 2.11); to count what it runs, install that version beside the venv:

    .venv/bin/python -m pip install --no-deps --target /tmp/t36 triton==3.6.0
    PYTHONPATH=/tmp/t36:. .venv/bin/python benchmarks/sass_counts.py "kb=3,vb=3" "kernel=split,kb=3,vb=3,maxnreg=128"
    PYTHONPATH=/tmp/t36:. .venv/bin/python benchmarks/sass_counts.py --prologue "kb=3,vb=3,krb=4"   # + the prologue

`--floor=B:CTX[,B:CTX...]` adds, per build and shape (Qwen3.5-27B: 4 KV heads, head_dim 256), the time the
kernel's instructions alone need on an H200 at one warp-instruction per scheduler and cycle (132 SMs x 4 x 1.98
GHz): the loop per 64-key tile, the rest once per program, with the split count launch_attention takes on CUDA
(`splits.wave_splits` for the programs per SM that the build's registers allow); and the byte floor of its codes and
norms at the copy bandwidth measured in session 26 (4275 GB/s):

    PYTHONPATH=/tmp/t36:. .venv/bin/python benchmarks/sass_counts.py --floor=8:32768,8:131072,1:32768 \
        "kb=3,vb=3,kvlen=1,vkeys=1,kpre=1,kvstart=1,krb=0"

Each argument is one build: kernel (keys-m | split), kb / vb (bits), kvlen (0/1), mask (0/1/2), mrow (1: the mask is
one row per batch, as apply's decode steps pass it), maxnreg, stages, ablate (keys-m's timing ablations,
attention_keys_m.ABLATIONS bits), kpre / vpre (keys-m's KPREFETCH / VPREFETCH), rope (ROPE_K: the rope score
term's padded pair count, 0 = none), rtab (keys-m's ROPE_TABLE: that term's cos / sin read from
rope_term.rope_table), vkeys (keys-m's VKEYS: V packed along keys), kvstart (rq::attention's
kv_start: keys before it masked, as apply's decode steps without a mask pass it), krb (K's rotation blocks as the
kernel sees them: 2, the default here, rotates q in the kernel by 2 x 2 blocks, as planar does; 0 takes q rotated
before, in float32, as the default full mixing launches it. The two allocate differently: session 25 found the
production decode build, "kb=3,vb=3,kvlen=1,vkeys=1,kpre=1,kvstart=1,krb=0", at 203 registers where krb=2 gives 172).
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from rqcompile.kernels import attention as kattn
from rqcompile.kernels.splits import wave_splits

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
SMS, SCHEDULERS, CLOCK_HZ, REGS_PER_SM = 132, 4, 1.98e9, 65536  # H200 SXM at its maximum clock
KV_HEADS, COPY_GBS = 4, 4275
POINTERS = {
    "q_ptr": "*bf16",
    "kc_ptr": "*i32",
    "kn_ptr": "*fp16",
    "vc_ptr": "*i32",
    "vn_ptr": "*fp16",
    "krot_ptr": "*fp32",
    "kscale_ptr": "*fp32",
    "klev_ptr": "*fp32",
    "vlev_ptr": "*fp32",
    "mask_ptr": "*bf16",
    "kvlen_ptr": "*i32",
    "pm_ptr": "*fp32",
    "pl_ptr": "*fp32",
    "pacc_ptr": "*fp32",
    "rope_ptr": "*fp32",
    "rfreq_ptr": "*fp32",
    "rtab_ptr": "*fp16",
}
DIVISIBLE = (*POINTERS, "sqb", "sqh", "sqt", "Tk", "span")
SHARED_OPS = re.compile(r"(STS|LDS|LDSM|STSM|BAR|SHFL|HGMMA|HMMA)")


def build(
    kernel="keys-m",
    kb=3,
    vb=3,
    kvlen=0,
    mask=0,
    mrow=0,
    maxnreg=None,
    stages=3,
    d=256,
    ablate=0,
    kpre=0,
    vpre=0,
    rope=0,
    vkeys=0,
    kvstart=0,
    krb=2,
    rtab=0,
):
    fn = kattn._attn_keys_m_kernel if kernel == "keys-m" else kattn._attn_split_kernel
    sig = {name: "i32" for name in fn.arg_names}
    sig.update(POINTERS, qk_scale="fp32")
    if krb == 0:  # a dense K rotation: q comes rotated, in float32, from kernels/dense_query.py
        sig.update(q_ptr="*fp32")
    const = dict(D=d, KBITS=kb, VBITS=vb, NGK=d // 128, NGV=d // 128, KRB=krb, KNB=d // max(krb, 1), MASK_KIND=mask)
    const.update(MASK_ROW=bool(mrow), HAS_KVLEN=bool(kvlen), KV_START=kvstart, ROPE_K=rope)
    const.update(BLOCK_M=16, BLOCK_N=64, DECODE=1, sqd=1, Tq=1)
    if not mask:
        const.update(smb=0, smh=0, smt=0, smn=0)
    else:  # a contiguous mask row: Triton specializes the unit stride
        const.update(smn=1)
    if kernel == "keys-m":
        const.update(ABLATE=ablate, KPREFETCH=bool(kpre), VPREFETCH=bool(vpre), VKEYS=bool(vkeys))
        const.update(ROPE_TABLE=bool(rtab))
    sig.update({name: "constexpr" for name in const})
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in DIVISIBLE if sig[n] != "constexpr"}
    options = {"num_warps": 4, "num_stages": stages, **({"maxnreg": maxnreg} if maxnreg else {})}
    return triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", 90, 32), options=options)


def sass_rows(sass: str) -> list[tuple[int, str, str]]:
    """(address, opcode, operands) of each SASS instruction (a predicate guard dropped)."""
    rows = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)(.*)", line)
        if m:
            rows.append((int(m.group(1), 16), m.group(2), m.group(3)))
    return rows


def backward_branches(rows: list[tuple[int, str, str]]) -> list[tuple[int, int]]:
    """[first, last] address of each backward branch's body: the loops."""
    spans = []
    for addr, op, rest in rows:
        target = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if target and int(target.group(1), 16) < addr:
            spans.append((int(target.group(1), 16), addr))
    return spans


def _loop_span(rows: list[tuple[int, str, str]]) -> tuple[int, int] | None:
    """[first, last] address of the largest backward branch's body: the key loop."""
    return max(backward_branches(rows), key=lambda span: span[1] - span[0], default=None)


def loop_instructions(sass: str) -> list[str]:
    """The opcodes of the largest backward branch's body: the key loop."""
    rows = sass_rows(sass)
    best = _loop_span(rows)
    return [op for addr, op, _ in rows if best and best[0] <= addr <= best[1]]


def prologue(sass: str) -> tuple[int, str]:
    """The instructions before the key loop: their count, and the order of their global loads, shared-memory
    accesses and barriers, run-length encoded ("LDG.E.128x6 BARx1 ..."). Loads issued after a barrier wait for
    everything before it (session 26: planar's q rotation held the first tile's loads back by ~1 us)."""
    rows = sass_rows(sass)
    best = _loop_span(rows)
    ops = [op for addr, op, _ in rows if best and addr < best[0]]
    seq = [op if op.startswith("LDG") else op.split(".")[0] for op in ops if re.match(r"(LDG|STS|LDS|BAR|MEMBAR)", op)]
    runs: list[list] = []
    for op in seq:
        if runs and runs[-1][0] == op:
            runs[-1][1] += 1
        else:
            runs.append([op, 1])
    return len(ops), " ".join(f"{op}x{n}" for op, n in runs)


def decode_floors(sass: str, regs: int, batch: int, ctx: int, kb: int, vb: int, d: int = 256, warps: int = 4):
    """(issue floor us, byte floor us, splits) of one decode call of this keys-m build at `batch` x `ctx` keys."""
    rows = sass_rows(sass)
    lo, hi = _loop_span(rows)
    loop = sum(1 for a, _, _ in rows if lo <= a <= hi)
    slots = REGS_PER_SM // (-(-regs * 32 // 256) * 256 * warps)
    tiles, pairs = ctx // 64, batch * KV_HEADS
    splits = wave_splits(tiles, pairs, SMS, max(slots, 1))
    warp_instructions = warps * (pairs * splits * (len(rows) - loop) + pairs * tiles * loop)
    issue_us = warp_instructions / (SMS * SCHEDULERS * CLOCK_HZ) * 1e6
    per_key = d * (kb + vb) // 8 + 2 * 2 * (d // 128)  # codes of K and V, one fp16 norm per 128 coordinates each
    return issue_us, pairs * ctx * per_key / (COPY_GBS * 1e9) * 1e6, splits


def main() -> None:
    floors = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--floor=")]
    specs = [a for a in sys.argv[1:] if a != "--prologue" and not a.startswith("--floor=")]
    for spec in specs or ["kb=3,vb=3", "kernel=split,kb=3,vb=3"]:
        kw = {}
        for item in filter(None, spec.split(",")):
            key, value = item.split("=")
            kw[key] = value if key == "kernel" else int(value)
        compiled = build(**kw)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            sass = subprocess.run([f"{BIN}/cuobjdump", "-sass", f.name], capture_output=True, text=True).stdout
            res = subprocess.run([f"{BIN}/cuobjdump", "-res-usage", f.name], capture_output=True, text=True).stdout
        loop = loop_instructions(sass)
        shared = {op: n for op, n in sorted(collections.Counter(loop).items()) if SHARED_OPS.match(op)}
        usage = " ".join(re.findall(r"REG:\d+|STACK:\d+", res))
        print(f"{spec}: {usage} shared {compiled.metadata.shared} B, loop {len(loop)} instructions; {shared}")
        if "--prologue" in sys.argv:
            count, order = prologue(sass)
            print(f"  prologue: {count} instructions; {order}")
        regs = int(re.search(r"REG:(\d+)", res).group(1))
        for shape in ",".join(floors).split(",") if floors else []:
            batch, ctx = (int(v) for v in shape.split(":"))
            issue, byte, splits = decode_floors(sass, regs, batch, ctx, kw.get("kb", 3), kw.get("vb", 3))
            print(f"  B{batch} {ctx // 1024}K: {splits} splits, issue floor {issue:.0f} us, byte floor {byte:.0f} us")


if __name__ == "__main__":
    main()
