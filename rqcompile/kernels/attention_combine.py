"""The combine kernel: merges the splits' (max, sum, acc), un-rotates V once per query row (block-diagonal gather,
or a dense block's matrix-vector product in chunks), applies V's scale and mean and writes the output in q's dtype;
for rq::attention_lse (constexpr WRITE_LSE) also each row's natural-log sum-exp from the merged max and sum.
"""

from __future__ import annotations

import triton
import triton.language as tl

from rqcompile.kernels.common import (
    channels,
)


@triton.jit
def _split_weights(pm_ptr, off, s_ok, muse):
    """exp2(m_split - m_max) of the splits at offsets `off` (0 where masked): each split's share of the row's sum."""
    ms = tl.load(pm_ptr + off, mask=s_ok, other=float("-inf"))
    return tl.where(s_ok, tl.exp2(ms - muse), 0.0)


@triton.jit
def _split_sum(pm_ptr, pacc_ptr, rbase, M, NS, muse, cols, col_ok, D: tl.constexpr, BLOCK_S: tl.constexpr):
    """sum over the splits of weight(split) * partial accumulator[split, cols]: one [BLOCK_S, cols] load per step."""
    a = tl.zeros(cols.shape, dtype=tl.float32)
    for s0 in range(0, NS, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_ok = s < NS
        w = _split_weights(pm_ptr, rbase + s * M, s_ok, muse)
        arow = pacc_ptr + (rbase + s.to(tl.int64) * M)[:, None] * D
        a += tl.sum(w[:, None] * tl.load(arow + cols[None, :], mask=s_ok[:, None] & col_ok[None, :], other=0.0), 0)
    return a


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
    DENSE_K: tl.constexpr = 32,
):
    """One program per (query row, KV head, BLOCK_D output columns): the splits' max and sum first (NS floats),
    then the weighted sum of the partial accumulators, BLOCK_S splits at a time. A whole [NS, D] tile per program
    spilled (59 us at batch 1, 32K, planar, for 3 MB); chunks of 32 splits x 64 columns took 15 us, a chain of
    dependent loads; now all splits x BLOCK_D columns per rotation input come in one load each."""
    row = tl.program_id(0)
    bh = tl.program_id(1)
    dt = tl.program_id(2)
    b = bh // H
    h = bh % H
    rbase = bh.to(tl.int64) * NS * M + row  # + split * M
    mmax = float("-inf")
    for s0 in range(0, NS, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mmax = tl.maximum(mmax, tl.max(tl.load(pm_ptr + rbase + s * M, mask=s < NS, other=float("-inf")), axis=0))
    muse = tl.where(mmax == float("-inf"), 0.0, mmax)
    total = 0.0
    for s0 in range(0, NS, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_ok = s < NS
        w = _split_weights(pm_ptr, rbase + s * M, s_ok, muse)
        total += tl.sum(w * tl.load(pl_ptr + rbase + s * M, mask=s_ok, other=0.0), axis=0)
    inv = tl.where(total > 0, 1.0 / tl.maximum(total, 1e-30), 0.0)
    c = dt * BLOCK_D + tl.arange(0, BLOCK_D)
    if VDENSE:  # a dense block of VRB = BLOCK_D coordinates: out[k] = sum_i R[h, dt, i, k] a[i], DENSE_K inputs a step
        out = tl.zeros([BLOCK_D], dtype=tl.float32)
        for i0 in tl.static_range(0, BLOCK_D, DENSE_K):
            i = i0 + tl.arange(0, DENSE_K)
            a = _split_sum(pm_ptr, pacc_ptr, rbase, M, NS, muse, dt * BLOCK_D + i, i < BLOCK_D, D, BLOCK_S)
            j = tl.arange(0, BLOCK_D)
            rot = tl.load(vrot_ptr + ((h * VNB + dt) * BLOCK_D + i[:, None]).to(tl.int64) * BLOCK_D + j[None, :])
            out += tl.sum(a[:, None] * rot, axis=0)
    elif VRB == 1 or VRB == 2 or VRB == 4:
        # the splits' accumulators of columns c in one contiguous load per step, then the block rotation in registers:
        # out[blk, k] = sum_i R[h, blk, i, k] * a[blk, i] over this chunk's BLOCK_D / VRB blocks
        a = _split_sum(pm_ptr, pacc_ptr, rbase, M, NS, muse, c, c < D, D, BLOCK_S)
        NBLK: tl.constexpr = BLOCK_D // VRB
        blk = dt * NBLK + tl.arange(0, NBLK)
        i = tl.arange(0, VRB)
        rot = tl.load(vrot_ptr + ((h * VNB + blk)[:, None, None] * VRB + i[None, :, None]) * VRB + i[None, None, :])
        out = tl.reshape(tl.sum(tl.reshape(a, [NBLK, VRB])[:, :, None] * rot, axis=1), [BLOCK_D])
    else:  # blocks of 3 (rotor) straddle the chunks: each rotation input gathered from the accumulators
        blk = c // VRB
        kk = c % VRB
        out = tl.zeros([BLOCK_D], dtype=tl.float32)
        for i in tl.static_range(VRB):
            src = blk * VRB + i
            a = _split_sum(pm_ptr, pacc_ptr, rbase, M, NS, muse, src, src < D, D, BLOCK_S)
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
