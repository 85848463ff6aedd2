"""K and V may each mix code widths in runs (docs/FORMAT.md, "Bit allocation") and read their input channels in a
per-head order `perm`. The layout kernel keeps one query tile and one accumulator per run, each over the run's
stored coordinates padded to a power of two (`run_window`; columns past the run are zero in q and never stored
from the accumulator). It has MAX_RUNS run slots per tensor (8: one run per width 1..8 covers every layout of the
allocator, whose widths never increase along the vector); a slot the layout does not use compiles to nothing.
Per K/V tile and run, the run's codes are decoded with its constexpr width (a binary select tree on the code's
bits up to 4 bits, a table load above, where 2**w - 1 selects would cost more) and take one `tl.dot`. A run inside
one norm group applies its norm after the dot (K) or in p (V), as the single-width kernel does; a run across norm
groups multiplies per element. Codes are read as int16 words: with runs of 16 codes every bit plane of every run
starts on an even byte.
"""

from __future__ import annotations

import triton
import triton.language as tl

from rqcompile.kernels.common import (
    channels,
    has_run,
    num_planes,
    plane_shift,
    plane_width,
    row_bytes,
    run_byte,
    run_count,
    run_in_group,
    run_level,
    run_start,
    run_width,
    run_window,
)
from rqcompile.kernels.decode_grid import _key_ok, _key_range, _query_rows
from rqcompile.kernels.rope_term import _rope_scores, _rope_setup
from rqcompile.kernels.tile_decode import _bit, _pick

MAX_RUNS = 8
GATHER_BITS = tl.constexpr(5)  # runs of this width or more decode by a table load (not measured on the GPU yet)


@triton.jit
def _run_q(
    qrow,
    sqd,
    m_ok,
    rot_ptr,
    ks_ptr,
    perm_ptr,
    h,
    qk_scale,
    L: tl.constexpr,
    r: tl.constexpr,
    D: tl.constexpr,
    RB: tl.constexpr,
    NB: tl.constexpr,
    PERM: tl.constexpr,
    BM: tl.constexpr,
):
    """The query rows rotated like K (channels in K's perm order, times K's scale) times qk_scale, on run r's
    window of stored coordinates: fp16 [BM, window], zero past the run (a placeholder if there is no run r)."""
    if has_run(L, r):
        S: tl.constexpr = run_start(L, r)
        P: tl.constexpr = run_window(L, r)
        c = S + tl.arange(0, P)
        c_ok = c < S + run_count(L, r)
        if RB == 0:  # q already rotated (in perm order) and K-scaled (dense rotation: kernels/dense_query.py)
            qv = tl.load(qrow[:, None] + c[None, :] * sqd, mask=m_ok[:, None] & c_ok[None, :], other=0.0)
            qv = qv.to(tl.float32)
        else:
            blk = c // RB
            ii = c % RB
            qv = tl.zeros([BM, P], dtype=tl.float32)
            for k in tl.static_range(RB):
                src = blk * RB + k
                sv = c_ok & (src < D)
                ch = channels(perm_ptr, h, src, sv, D, PERM)
                x = tl.load(qrow[:, None] + ch[None, :] * sqd, mask=m_ok[:, None] & sv[None, :], other=0.0)
                ksc = tl.load(ks_ptr + h * D + ch, mask=sv, other=0.0)
                coef = tl.load(rot_ptr + ((h * NB + blk) * RB + ii) * RB + k, mask=c_ok, other=0.0)
                qv += coef[None, :] * (x.to(tl.float32) * ksc[None, :])
        out = (qv * qk_scale).to(tl.float16)
    else:
        out = tl.zeros([BM, 16], dtype=tl.float16)
    return out


@triton.jit
def _run_acc(L: tl.constexpr, r: tl.constexpr, BM: tl.constexpr):
    """Run r's zero accumulator, fp32 [BM, window] (a placeholder if there is no run r)."""
    if has_run(L, r):
        acc = tl.zeros([BM, run_window(L, r)], dtype=tl.float32)
    else:
        acc = tl.zeros([BM, 16], dtype=tl.float32)
    return acc


@triton.jit
def _half(base, j, ok):
    """Halfword j from `base`, zero-extended to int32."""
    return tl.load(base + j, mask=ok, other=0).to(tl.int32) & 0xFFFF


@triton.jit
def _plane_bits(row16, ld_ok, HW, PW: tl.constexpr, U: tl.constexpr):
    """A bit plane of PW-bit fields starting at halfword HW of each row, as int32 [BLOCK_N, U, 16] whose low PW
    bits are the field of code 16*u + l of the run (a unit of 16 codes takes PW halfwords; fields low bits first)."""
    u = tl.arange(0, U)
    li = tl.arange(0, 16)
    base = row16[:, None] + (HW + u * PW)[None, :]
    if PW == 1:
        x = tl.load(base, mask=ld_ok, other=0).to(tl.int32)[:, :, None] >> li[None, None, :]
    elif PW == 2:
        w = _half(base, 0, ld_ok) | (_half(base, 1, ld_ok) << 16)
        x = w[:, :, None] >> (2 * li)[None, None, :]
    else:
        w0 = _half(base, 0, ld_ok) | (_half(base, 1, ld_ok) << 16)
        w1 = _half(base, 2, ld_ok) | (_half(base, 3, ld_ok) << 16)
        x = tl.where((li < 8)[None, None, :], w0[:, :, None], w1[:, :, None]) >> (4 * (li % 8))[None, None, :]
    return x


@triton.jit
def _plane_code(row16, ld_ok, HW, N: tl.constexpr, W: tl.constexpr, p: tl.constexpr, U: tl.constexpr):
    """Plane p's share of the codes of a W-bit run of N codes starting at halfword HW (planes follow each other)."""
    PW: tl.constexpr = plane_width(W, p)
    x = _plane_bits(row16, ld_ok, HW + N * plane_shift(W, p) // 16, PW, U)
    return (x & ((1 << PW) - 1)) << plane_shift(W, p)


@triton.jit
def _run_tile(
    cbase,
    nbase,
    n64,
    n_ok,
    lev_ptr,
    L: tl.constexpr,
    r: tl.constexpr,
    CH: tl.constexpr,
    NG: tl.constexpr,
    G: tl.constexpr,
    POST: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """fp16 [BLOCK_N, window] of run r of each key/value row: codebook[code] (POST: the run's one norm is applied
    outside) or codebook[code] * norm; `cbase` points at the codes as int16 words, CH per row."""
    W: tl.constexpr = run_width(L, r)
    N: tl.constexpr = run_count(L, r)
    U: tl.constexpr = run_window(L, r) // 16
    HW: tl.constexpr = run_byte(L, r) // 2
    u = tl.arange(0, U)
    ld_ok = n_ok[:, None] & (u < N // 16)[None, :]
    row16 = cbase + n64 * CH
    lev = lev_ptr + run_level(L, r)
    if W < GATHER_BITS:  # binary tree of selects on the code's bits, as `_levels`
        x0 = _plane_bits(row16, ld_ok, HW, plane_width(W, 0), U)
        b0 = _bit(x0, 0)
        if W == 1:
            val = _pick(b0, lev, 0)
        else:
            b1 = _bit(x0, 1)
            v0 = tl.where(b1, _pick(b0, lev, 2), _pick(b0, lev, 0))
            if W == 2:
                val = v0
            else:
                v1 = tl.where(b1, _pick(b0, lev, 6), _pick(b0, lev, 4))
                if W == 3:  # bit 2 is the 1-bit plane after the 2-bit one
                    b2 = _bit(_plane_bits(row16, ld_ok, HW + N // 8, 1, U), 0)
                    val = tl.where(b2, v1, v0)
                else:
                    b2 = _bit(x0, 2)
                    b3 = _bit(x0, 3)
                    v2 = tl.where(b1, _pick(b0, lev, 10), _pick(b0, lev, 8))
                    v3 = tl.where(b1, _pick(b0, lev, 14), _pick(b0, lev, 12))
                    val = tl.where(b3, tl.where(b2, v3, v2), tl.where(b2, v1, v0))
    else:  # wide codes: assemble the code from its planes, one table load
        code = _plane_code(row16, ld_ok, HW, N, W, 0, U)
        for p in tl.static_range(1, num_planes(W)):
            code = code | _plane_code(row16, ld_ok, HW, N, W, p, U)
        val = tl.load(lev + code)
    if not POST:  # a unit of 16 codes never straddles a norm group (groups are multiples of 16)
        g = (run_start(L, r) + 16 * u) // G
        nrm = tl.load(nbase + n64[:, None] * NG + g[None, :], mask=ld_ok, other=0.0).to(tl.float32)
        val = val * nrm[:, :, None]
    return tl.reshape(val.to(tl.float16), [BLOCK_N, U * 16])


@triton.jit
def _run_scores(
    q,
    kbase,
    knb,
    n64,
    n_ok,
    lev_ptr,
    L: tl.constexpr,
    r: tl.constexpr,
    CH: tl.constexpr,
    NG: tl.constexpr,
    G: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Run r's share of the scores [BLOCK_M, BLOCK_N]: q_r . (codebook[code] * norm)."""
    POST: tl.constexpr = run_in_group(L, r, G)
    kt = tl.trans(_run_tile(kbase, knb, n64, n_ok, lev_ptr, L, r, CH, NG, G, POST, BLOCK_N))
    if POST:
        nk = tl.load(knb + n64 * NG + run_start(L, r) // G, mask=n_ok, other=0.0).to(tl.float32)
        sc = tl.dot(q, kt) * nk[None, :]
    else:
        sc = tl.dot(q, kt)
    return sc


@triton.jit
def _more_scores(
    sc,
    q,
    kbase,
    knb,
    n64,
    n_ok,
    lev_ptr,
    L: tl.constexpr,
    r: tl.constexpr,
    CH: tl.constexpr,
    NG: tl.constexpr,
    G: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """`sc` plus run r's share (`sc` itself if there is no run r)."""
    if has_run(L, r):
        sc += _run_scores(q, kbase, knb, n64, n_ok, lev_ptr, L, r, CH, NG, G, BLOCK_N)
    return sc


@triton.jit
def _run_pv(
    acc,
    alpha,
    p,
    vbase,
    vnb,
    n64,
    n_ok,
    lev_ptr,
    L: tl.constexpr,
    r: tl.constexpr,
    CH: tl.constexpr,
    NG: tl.constexpr,
    G: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Run r's accumulator after one K/V tile: acc * alpha + p . (codebook[code] * norm) (unchanged if there is no
    run r)."""
    if has_run(L, r):
        POST: tl.constexpr = run_in_group(L, r, G)
        vt = _run_tile(vbase, vnb, n64, n_ok, lev_ptr, L, r, CH, NG, G, POST, BLOCK_N)
        if POST:
            nv = tl.load(vnb + n64 * NG + run_start(L, r) // G, mask=n_ok, other=0.0).to(tl.float32)
            pv = tl.dot((p * nv[None, :]).to(tl.float16), vt)
        else:
            pv = tl.dot(p.to(tl.float16), vt)
        acc = acc * alpha[:, None] + pv
    return acc


@triton.jit
def _run_store(pacc_ptr, pidx, m_ok, acc, L: tl.constexpr, r: tl.constexpr, D: tl.constexpr):
    """Store run r's accumulator into its columns (stored coordinates) of the partial output."""
    if has_run(L, r):
        c = run_start(L, r) + tl.arange(0, run_window(L, r))
        ok = m_ok[:, None] & (c < run_start(L, r) + run_count(L, r))[None, :]
        tl.store(pacc_ptr + pidx[:, None] * D + c[None, :], acc, mask=ok)


@triton.jit
def _attn_split_layout_kernel(
    q_ptr,
    sqb,
    sqh,
    sqt,
    sqd,
    kc_ptr,
    kn_ptr,
    vc_ptr,
    vn_ptr,
    krot_ptr,
    kscale_ptr,
    klev_ptr,
    vlev_ptr,
    kperm_ptr,
    mask_ptr,
    smb,
    smh,
    smt,
    smn,
    kvlen_ptr,
    pm_ptr,
    pl_ptr,
    pacc_ptr,
    H,
    REP,
    Tq,
    Tk,
    M,
    NS,
    span,
    qk_scale,
    rope_ptr,
    srb,
    srh,
    srt,
    srd,
    rfreq_ptr,
    rope_h,
    D: tl.constexpr,
    KL: tl.constexpr,
    VL: tl.constexpr,
    NGK: tl.constexpr,
    NGV: tl.constexpr,
    KRB: tl.constexpr,
    KNB: tl.constexpr,
    KPERM: tl.constexpr,
    MASK_KIND: tl.constexpr,
    MASK_ROW: tl.constexpr,
    HAS_KVLEN: tl.constexpr,
    KV_START: tl.constexpr,
    ROPE_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """`_attn_split_kernel` for K/V layouts `KL`/`VL` (run-length strings, `common.layout_string`): one q tile and
    one accumulator per run (see the section comment); splits, masks and the online softmax are the same."""
    split, bh, b, h, rows, m_ok, hq, tq, qoff = _query_rows(sqb, sqh, sqt, H, REP, Tq, M, BLOCK_M)
    qrow = q_ptr + qoff
    CHK: tl.constexpr = row_bytes(KL) // 2  # int16 words of codes per key
    CHV: tl.constexpr = row_bytes(VL) // 2
    GK: tl.constexpr = D // NGK
    GV: tl.constexpr = D // NGV
    q0 = _run_q(qrow, sqd, m_ok, krot_ptr, kscale_ptr, kperm_ptr, h, qk_scale, KL, 0, D, KRB, KNB, KPERM, BLOCK_M)
    q1 = _run_q(qrow, sqd, m_ok, krot_ptr, kscale_ptr, kperm_ptr, h, qk_scale, KL, 1, D, KRB, KNB, KPERM, BLOCK_M)
    q2 = _run_q(qrow, sqd, m_ok, krot_ptr, kscale_ptr, kperm_ptr, h, qk_scale, KL, 2, D, KRB, KNB, KPERM, BLOCK_M)
    q3 = _run_q(qrow, sqd, m_ok, krot_ptr, kscale_ptr, kperm_ptr, h, qk_scale, KL, 3, D, KRB, KNB, KPERM, BLOCK_M)
    q4 = _run_q(qrow, sqd, m_ok, krot_ptr, kscale_ptr, kperm_ptr, h, qk_scale, KL, 4, D, KRB, KNB, KPERM, BLOCK_M)
    q5 = _run_q(qrow, sqd, m_ok, krot_ptr, kscale_ptr, kperm_ptr, h, qk_scale, KL, 5, D, KRB, KNB, KPERM, BLOCK_M)
    q6 = _run_q(qrow, sqd, m_ok, krot_ptr, kscale_ptr, kperm_ptr, h, qk_scale, KL, 6, D, KRB, KNB, KPERM, BLOCK_M)
    q7 = _run_q(qrow, sqd, m_ok, krot_ptr, kscale_ptr, kperm_ptr, h, qk_scale, KL, 7, D, KRB, KNB, KPERM, BLOCK_M)

    ROPE: tl.constexpr = ROPE_K >= 16  # rope_ab's score term (kernels/rope_term.py)
    if ROPE:
        wa, wb, rfreq = _rope_setup(
            rope_ptr, srb, srh, srt, srd, rfreq_ptr, rope_h, b, hq, tq, m_ok, qk_scale, ROPE_K, False
        )
    n_lo, n_hi = _key_range(kvlen_ptr, b, split, NS, span, Tk, HAS_KVLEN, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc0 = _run_acc(VL, 0, BLOCK_M)
    acc1 = _run_acc(VL, 1, BLOCK_M)
    acc2 = _run_acc(VL, 2, BLOCK_M)
    acc3 = _run_acc(VL, 3, BLOCK_M)
    acc4 = _run_acc(VL, 4, BLOCK_M)
    acc5 = _run_acc(VL, 5, BLOCK_M)
    acc6 = _run_acc(VL, 6, BLOCK_M)
    acc7 = _run_acc(VL, 7, BLOCK_M)
    kbase = kc_ptr + bh.to(tl.int64) * Tk * CHK
    vbase = vc_ptr + bh.to(tl.int64) * Tk * CHV
    knb = kn_ptr + bh.to(tl.int64) * Tk * NGK
    vnb = vn_ptr + bh.to(tl.int64) * Tk * NGV
    mrow = mask_ptr + b.to(tl.int64) * smb + hq.to(tl.int64) * smh + tq.to(tl.int64) * smt
    mrow0 = mask_ptr + b.to(tl.int64) * smb
    for start in range(n_lo, n_hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = _key_ok(n, n_hi, KV_START)
        n64 = n.to(tl.int64)
        # ---- scores: the sum over K's runs
        sc = _run_scores(q0, kbase, knb, n64, n_ok, klev_ptr, KL, 0, CHK, NGK, GK, BLOCK_N)
        sc = _more_scores(sc, q1, kbase, knb, n64, n_ok, klev_ptr, KL, 1, CHK, NGK, GK, BLOCK_N)
        sc = _more_scores(sc, q2, kbase, knb, n64, n_ok, klev_ptr, KL, 2, CHK, NGK, GK, BLOCK_N)
        sc = _more_scores(sc, q3, kbase, knb, n64, n_ok, klev_ptr, KL, 3, CHK, NGK, GK, BLOCK_N)
        sc = _more_scores(sc, q4, kbase, knb, n64, n_ok, klev_ptr, KL, 4, CHK, NGK, GK, BLOCK_N)
        sc = _more_scores(sc, q5, kbase, knb, n64, n_ok, klev_ptr, KL, 5, CHK, NGK, GK, BLOCK_N)
        sc = _more_scores(sc, q6, kbase, knb, n64, n_ok, klev_ptr, KL, 6, CHK, NGK, GK, BLOCK_N)
        sc = _more_scores(sc, q7, kbase, knb, n64, n_ok, klev_ptr, KL, 7, CHK, NGK, GK, BLOCK_N)
        if ROPE:
            sc = _rope_scores(sc, wa, wb, rfreq, n)
        sc = tl.where(n_ok[None, :], sc, float("-inf"))
        if MASK_KIND != 0:
            if MASK_ROW:  # the same mask row for every query row of this program: one [BLOCK_N] load
                mv = tl.load(mrow0 + n64 * smn, mask=n_ok, other=0)[None, :]
            else:
                mv = tl.load(mrow[:, None] + n64[None, :] * smn, mask=m_ok[:, None] & n_ok[None, :], other=0)
            if MASK_KIND == 1:
                sc = tl.where(mv != 0, sc, float("-inf"))
            else:
                sc += mv.to(tl.float32) * 1.4426950408889634
        # ---- online softmax (base 2)
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(sc - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
        # ---- values: one accumulator per V run
        acc0 = _run_pv(acc0, alpha, p, vbase, vnb, n64, n_ok, vlev_ptr, VL, 0, CHV, NGV, GV, BLOCK_N)
        acc1 = _run_pv(acc1, alpha, p, vbase, vnb, n64, n_ok, vlev_ptr, VL, 1, CHV, NGV, GV, BLOCK_N)
        acc2 = _run_pv(acc2, alpha, p, vbase, vnb, n64, n_ok, vlev_ptr, VL, 2, CHV, NGV, GV, BLOCK_N)
        acc3 = _run_pv(acc3, alpha, p, vbase, vnb, n64, n_ok, vlev_ptr, VL, 3, CHV, NGV, GV, BLOCK_N)
        acc4 = _run_pv(acc4, alpha, p, vbase, vnb, n64, n_ok, vlev_ptr, VL, 4, CHV, NGV, GV, BLOCK_N)
        acc5 = _run_pv(acc5, alpha, p, vbase, vnb, n64, n_ok, vlev_ptr, VL, 5, CHV, NGV, GV, BLOCK_N)
        acc6 = _run_pv(acc6, alpha, p, vbase, vnb, n64, n_ok, vlev_ptr, VL, 6, CHV, NGV, GV, BLOCK_N)
        acc7 = _run_pv(acc7, alpha, p, vbase, vnb, n64, n_ok, vlev_ptr, VL, 7, CHV, NGV, GV, BLOCK_N)

    pidx = (bh.to(tl.int64) * NS + split) * M + rows
    tl.store(pm_ptr + pidx, m_i, mask=m_ok)
    tl.store(pl_ptr + pidx, l_i, mask=m_ok)
    _run_store(pacc_ptr, pidx, m_ok, acc0, VL, 0, D)
    _run_store(pacc_ptr, pidx, m_ok, acc1, VL, 1, D)
    _run_store(pacc_ptr, pidx, m_ok, acc2, VL, 2, D)
    _run_store(pacc_ptr, pidx, m_ok, acc3, VL, 3, D)
    _run_store(pacc_ptr, pidx, m_ok, acc4, VL, 4, D)
    _run_store(pacc_ptr, pidx, m_ok, acc5, VL, 5, D)
    _run_store(pacc_ptr, pidx, m_ok, acc6, VL, 6, D)
    _run_store(pacc_ptr, pidx, m_ok, acc7, VL, 7, D)
