"""Can Gluon (triton.experimental.gluon, Triton 3.6 on the device machine) overlap a decode-attention tile's wgmma
with the next tile's work? Builds small sm_90 kernels here, without a GPU, and prints what ptxas made of each
(benchmarks/NOTES.md "Session 18": keys-m's mma chain and its V tile's trip through shared memory are where its time
goes, and Triton's `tl.dot` waits for every wgmma in program order).

    .venv/bin/python -m pip install --no-deps --target /tmp/t36 triton==3.6.0
    PYTHONPATH=/tmp/t36:. .venv/bin/python benchmarks/gluon_probe.py

Per pattern: the `wgmma.wait_group N` the PTX asks for, the `WARPGROUP.DEPBAR.LE gsb0, N` the SASS has (N = 1: one
group may still run under the next tile's work; 0: serialized), and ptxas's performance notes (C7514 / C7515 name
why it serialized). Each kernel reads 64-key fp16 tiles of K into the wgmma's A-operand registers, q^T [128, 16]
once into shared memory. Nothing here runs: correctness and speed need the device.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
PATTERNS = {
    0: "one accumulator chained over the tiles, wait(1) after each",
    1: "the same with the first tile's wgmma peeled off the loop",
    2: "per-tile scores (use_acc=False), two alternating, a tile's read while the next one's runs",
}


@gluon.jit
def _probe_kernel(k_ptr, q_ptr, out_ptr, n_tiles, PATTERN: gl.constexpr):
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 16, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    q_layout: gl.constexpr = gl.BlockedLayout([1, 8], [16, 2], [4, 1], [1, 0])
    qr = gl.arange(0, 128, layout=gl.SliceLayout(1, q_layout))
    qc = gl.arange(0, 16, layout=gl.SliceLayout(0, q_layout))
    q = gl.load(q_ptr + qr[:, None] * 16 + qc[None, :])
    q_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([128, 16], gl.float16)
    q_smem = gl.allocate_shared_memory(gl.float16, [128, 16], q_smem_layout, q)
    fence_async_shared()
    kr = gl.arange(0, 64, layout=gl.SliceLayout(1, a_layout))
    kc = gl.arange(0, 128, layout=gl.SliceLayout(0, a_layout))
    orow = gl.arange(0, 64, layout=gl.SliceLayout(1, acc_layout))
    ocol = gl.arange(0, 16, layout=gl.SliceLayout(0, acc_layout))
    acc = gl.zeros([64, 16], gl.float32, layout=acc_layout)
    if PATTERN == 0:
        for t in range(0, n_tiles):
            acc = warpgroup_mma(gl.load(k_ptr + (t * 64 + kr)[:, None] * 128 + kc[None, :]), q_smem, acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
    elif PATTERN == 1:
        acc = warpgroup_mma(gl.load(k_ptr + kr[:, None] * 128 + kc[None, :]), q_smem, acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        for t in range(1, n_tiles):
            acc = warpgroup_mma(gl.load(k_ptr + (t * 64 + kr)[:, None] * 128 + kc[None, :]), q_smem, acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
    else:
        sa = gl.zeros([64, 16], gl.float32, layout=acc_layout)
        sb = gl.zeros([64, 16], gl.float32, layout=acc_layout)
        sa = warpgroup_mma(gl.load(k_ptr + kr[:, None] * 128 + kc[None, :]), q_smem, sa, use_acc=False, is_async=True)
        sa = warpgroup_mma_wait(num_outstanding=1, deps=(sa,))
        for t in range(1, n_tiles - 1, 2):
            a = gl.load(k_ptr + (t * 64 + kr)[:, None] * 128 + kc[None, :])
            sb = warpgroup_mma(a, q_smem, sb, use_acc=False, is_async=True)
            sb = warpgroup_mma_wait(num_outstanding=2, deps=(sb,))  # both still in flight: only sb's type changes
            sa = warpgroup_mma_wait(num_outstanding=1, deps=(sa,))
            acc += gl.exp2(sa)
            a = gl.load(k_ptr + ((t + 1) * 64 + kr)[:, None] * 128 + kc[None, :])
            sa = warpgroup_mma(a, q_smem, sa, use_acc=False, is_async=True)
            sa = warpgroup_mma_wait(num_outstanding=2, deps=(sa,))
            sb = warpgroup_mma_wait(num_outstanding=1, deps=(sb,))
            acc += gl.exp2(sb)
        sa = warpgroup_mma_wait(num_outstanding=0, deps=(sa,))
        acc += gl.exp2(sa)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    gl.store(out_ptr + orow[:, None] * 16 + ocol[None, :], acc)


def main() -> None:
    sig = {"k_ptr": "*fp16", "q_ptr": "*fp16", "out_ptr": "*fp32", "n_tiles": "i32", "PATTERN": "constexpr"}
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(3)}
    for pattern, what in PATTERNS.items():
        src = GluonASTSource(_probe_kernel, sig, {"PATTERN": pattern}, attrs)
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
        with tempfile.TemporaryDirectory() as tmp:
            with open(os.path.join(tmp, "k.ptx"), "w") as f:
                f.write(ptx)
            cubin = os.path.join(tmp, "k.cubin")
            notes = subprocess.run(
                [f"{BIN}/ptxas", "-arch=sm_90a", "-v", f.name, "-o", cubin], capture_output=True, text=True
            ).stderr
            sass = subprocess.run([f"{BIN}/cuobjdump", "-sass", cubin], capture_output=True, text=True).stdout
        asked = [int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)]
        kept = [int(n, 16) for n in re.findall(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*(0x[0-9a-f]+)", sass)]
        why = [line.split(": ", 1)[1][:90] for line in notes.splitlines() if "(C75" in line]
        print(f"{pattern}: {what}\n   PTX waits {asked}, SASS waits {sorted(set(kept))}; {why or 'no ptxas notes'}")


if __name__ == "__main__":
    main()
