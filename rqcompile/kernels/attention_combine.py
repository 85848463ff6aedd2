"""The combine kernel: merges the splits' (max, sum, acc), un-rotates V once per query row (block-diagonal gather,
or a dense block's matrix-vector product), applies V's scale and mean and writes the output in q's dtype; for
rq::attention_lse (constexpr WRITE_LSE) also each row's natural-log sum-exp from the merged max and sum.

A latency-bound launch of a few us. All splits of a row fit one load (the launcher makes at most
`splits.MAX_SPLITS` <= BLOCK_S of them), so a program has no loop and issues its loads at once (session 26: from a
chain of one round trip per loop, H200, dense block 6.5 -> 4.2 us at batch 1 32K, planar 3.2 -> 2.7 at batch 8).
A dense block at batch 8 still takes 8.8 us (planar's 2.7): ncu puts it at 82% of L1 throughput, the
shared-memory reductions of 1,536 small programs, each over its [VRB, BLOCK_D] slice of the rotation. Several rows per
program would share a slice, but the [rows, inputs, columns] products compiled to 3-5x the instructions and 6-10x the
barriers (sm_90 SASS, not timed; benchmarks/NOTES.md "Session 26").
"""

from __future__ import annotations

import triton
import triton.language as tl

from rqcompile.kernels.common import (
    channels,
)


@triton.jit
def _split_sum(pacc_ptr, srow, s_ok, w, cols, col_ok, D: tl.constexpr):
    """sum over the splits of w[split] * partial accumulator[split, cols]: one [BLOCK_S, cols] load."""
    acc = tl.load(pacc_ptr + srow[:, None] * D + cols[None, :], mask=s_ok[:, None] & col_ok[None, :], other=0.0)
    return tl.sum(w[:, None] * acc, 0)


@triton.jit
def _attn_combine_kernel(
    pm_ptr,
    pl_ptr,
    pacc_ptr,
    vrot_ptr,
    vscale_ptr,
    vmean_ptr,
    vperm_ptr,
    out_ptr,
    lse_ptr,
    H,
    REP,
    Tq,
    M,
    NS,
    D: tl.constexpr,
    VRB: tl.constexpr,
    VNB: tl.constexpr,
    VPERM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    WRITE_LSE: tl.constexpr,
    VDENSE: tl.constexpr = False,
):
    """One program per (query row, KV head, BLOCK_D output columns). NS <= BLOCK_S splits. A dense block (VDENSE,
    VRB >= BLOCK_D) needs all VRB of its inputs for any output column: each of its programs sums them all."""
    row = tl.program_id(0)
    bh = tl.program_id(1)
    dt = tl.program_id(2)
    b = bh // H
    h = bh % H
    c = dt * BLOCK_D + tl.arange(0, BLOCK_D)
    if VDENSE:  # out[k] = sum_i R[h, blk, i, k] a[i] over the block's VRB inputs
        blk = (dt * BLOCK_D) // VRB
        i = tl.arange(0, VRB)
        rot = tl.load(vrot_ptr + ((h * VNB + blk) * VRB + i[:, None]).to(tl.int64) * VRB + (c % VRB)[None, :])
    elif VRB == 1 or VRB == 2 or VRB == 4:  # out[blk, k] = sum_i R[h, blk, i, k] a[blk, i], in registers
        NBLK: tl.constexpr = BLOCK_D // VRB
        blk = dt * NBLK + tl.arange(0, NBLK)
        i = tl.arange(0, VRB)
        rot = tl.load(vrot_ptr + ((h * VNB + blk)[:, None, None] * VRB + i[None, :, None]) * VRB + i[None, None, :])
    s = tl.arange(0, BLOCK_S)
    s_ok = s < NS
    srow = bh.to(tl.int64) * NS * M + row + s * M  # (bh, split, row) of the partial results
    ms = tl.load(pm_ptr + srow, mask=s_ok, other=float("-inf"))
    ls = tl.load(pl_ptr + srow, mask=s_ok, other=0.0)
    mmax = tl.max(ms, axis=0)
    muse = tl.where(mmax == float("-inf"), 0.0, mmax)
    w = tl.where(s_ok, tl.exp2(ms - muse), 0.0)  # each split's share of the row's sum
    total = tl.sum(w * ls, axis=0)
    inv = tl.where(total > 0, 1.0 / tl.maximum(total, 1e-30), 0.0)
    if VDENSE:
        a = _split_sum(pacc_ptr, srow, s_ok, w, blk * VRB + i, i < VRB, D)
        out = tl.sum(a[:, None] * rot, axis=0)
    elif VRB == 1 or VRB == 2 or VRB == 4:
        a = _split_sum(pacc_ptr, srow, s_ok, w, c, c < D, D)
        out = tl.reshape(tl.sum(tl.reshape(a, [NBLK, VRB])[:, :, None] * rot, axis=1), [BLOCK_D])
    else:  # blocks of 3 (rotor) straddle the chunks: each rotation input gathered from the accumulators
        blk = c // VRB
        kk = c % VRB
        out = tl.zeros([BLOCK_D], dtype=tl.float32)
        for i in tl.static_range(VRB):
            src = blk * VRB + i
            a = _split_sum(pacc_ptr, srow, s_ok, w, src, src < D, D)
            coef = tl.load(vrot_ptr + ((h * VNB + blk) * VRB + i) * VRB + kk)
            out += coef * a
    c = channels(vperm_ptr, h, c, c < D, D, VPERM)  # un-rotated coordinate c is channel perm[h, c] of V
    out = out * inv * tl.load(vscale_ptr + h * D + c) + tl.load(vmean_ptr + h * D + c)
    r = row // Tq
    t = row % Tq
    qrow = (b.to(tl.int64) * H * REP + h * REP + r) * Tq + t
    tl.store(out_ptr + qrow * D + c, out.to(out_ptr.dtype.element_ty))
    if WRITE_LSE and dt == 0:  # natural-log sum-exp of the row's scores (the splits' max and sum are in log2 units)
        lse2 = tl.where(total > 0, muse + tl.log2(tl.maximum(total, 1e-30)), float("-inf"))
        tl.store(lse_ptr + qrow, lse2 * 0.6931471805599453)
