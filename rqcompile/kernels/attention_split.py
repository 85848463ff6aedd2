"""The split kernel: grid (splits, batch * kv_heads, row tiles). One program owns one KV head and a tile of its
`rep * Tq` query rows (GQA: the query heads of one KV head share each K/V tile), and a contiguous range of keys.
It rotates q once (block-diagonal gather, or reads q pre-rotated for dense/hadamard), then streams packed K/V:
no unpacking to memory and no per-token inverse rotation. Each [BLOCK_N, d] tile of codes is read as int32 words
(16-byte vector loads; with little-endian bytes the layout of docs/FORMAT.md puts 2-bit code i at bits 2*(i%16) of
word i//16, 4-bit code i at bits 4*(i%8) of word i//8, and bit 2 of a 3-bit code at bit i%32 of word d/16 + i//32)
and decoded by `tile_decode`. One `tl.dot` per norm group against the fp16 levels (fp32 accumulation): the K
norms scale the score columns after the dot, the V norms are folded into p, so no per-element norm multiply
(for more than two norm groups the norms are applied per element instead). Online softmax in base 2; the partial
(max, sum, acc) of each split go to `attention_combine`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from rqcompile.kernels.decode_grid import _key_ok, _key_range, _q_rot, _query_rows
from rqcompile.kernels.rope_term import _rope_scores, _rope_setup
from rqcompile.kernels.tile_decode import (
    _prmt_columns,
    _prmt_rows,
    _spread_chunks,
    _spread_source,
    _tables,
    _tile,
    _tile_prmt,
)


@triton.jit
def _attn_split_kernel(
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
    KBITS: tl.constexpr,
    VBITS: tl.constexpr,
    NGK: tl.constexpr,
    NGV: tl.constexpr,
    KRB: tl.constexpr,
    KNB: tl.constexpr,
    MASK_KIND: tl.constexpr,
    MASK_ROW: tl.constexpr,
    HAS_KVLEN: tl.constexpr,
    KV_START: tl.constexpr,
    ROPE_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DECODE: tl.constexpr = 0,
    OPAQUE: tl.constexpr = True,
):
    split, bh, b, h, rows, m_ok, hq, tq, qoff = _query_rows(sqb, sqh, sqt, H, REP, Tq, M, BLOCK_M)
    qrow = q_ptr + qoff
    CWK: tl.constexpr = D * KBITS // 32  # int32 words of codes per key
    CWV: tl.constexpr = D * VBITS // 32
    KPOST: tl.constexpr = NGK <= 2  # K norms applied to the scores after the dot (one dot per norm group)
    VPOST: tl.constexpr = NGV <= 2  # V norms folded into p (one dot per norm group)
    KFAST: tl.constexpr = DECODE != 0 and KPOST  # prmt decode (the per-element norm path keeps the tree)
    VFAST: tl.constexpr = DECODE != 0 and VPOST
    # two norm groups with the prmt decode: one half tile and one dot per group (K=D/2 for the scores, N=D/2 for the
    # values), instead of two full dots with the other group's half masked to zero (twice the mma work and q reads)
    KSPLIT: tl.constexpr = KFAST and NGK == 2
    VSPLIT: tl.constexpr = VFAST and NGV == 2
    DV: tl.constexpr = D // 2 if VSPLIT else D  # accumulator columns per tile
    col = tl.arange(0, D)
    if KSPLIT:
        qf = _q_rot(qrow, sqd, m_ok, krot_ptr, kscale_ptr, h, qk_scale, D, KRB, KNB, BLOCK_M, 0, D // 2)
        qg = _q_rot(qrow, sqd, m_ok, krot_ptr, kscale_ptr, h, qk_scale, D, KRB, KNB, BLOCK_M, D // 2, D // 2)
    else:
        qf = _q_rot(qrow, sqd, m_ok, krot_ptr, kscale_ptr, h, qk_scale, D, KRB, KNB, BLOCK_M)
        qg = qf
    if KFAST:
        ktab = _tables(klev_ptr, KBITS)
        if KBITS != 4:  # q's columns in the K tiles' order (_prmt_columns): [.., 2i + e] -> [.., 8e + i] per 16
            qf = _prmt_rows(qf, BLOCK_M)
            qg = _prmt_rows(qg, BLOCK_M)
        qf = _spread_chunks(qf, KBITS)  # and in the tiles' chunk order
        qg = _spread_chunks(qg, KBITS)
    dcol = tl.arange(0, DV)
    if VFAST:
        vtab = _tables(vlev_ptr, VBITS)
        # the accumulator's columns follow the V tiles' order
        vcol = _prmt_columns(_spread_source(dcol, DV, VBITS), VBITS)
    else:
        vcol = dcol
    if KSPLIT:
        q0 = qf.to(tl.float16)
        q1 = qg.to(tl.float16)
    elif KPOST and NGK == 2:
        q0 = tl.where(col[None, :] < D // 2, qf, 0.0).to(tl.float16)
        q1 = tl.where(col[None, :] < D // 2, 0.0, qf).to(tl.float16)
    else:
        q0 = qf.to(tl.float16)
        q1 = q0

    ROPE: tl.constexpr = ROPE_K >= 16  # rope_ab's score term (kernels/rope_term.py)
    if ROPE:
        wa, wb, rfreq = _rope_setup(
            rope_ptr, srb, srh, srt, srd, rfreq_ptr, rope_h, b, hq, tq, m_ok, qk_scale, ROPE_K, False
        )
    n_lo, n_hi = _key_range(kvlen_ptr, b, split, NS, span, Tk, HAS_KVLEN, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_t = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DV], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, DV], dtype=tl.float32)  # the second norm group's columns (VSPLIT)
    kbase = kc_ptr + bh.to(tl.int64) * Tk * CWK
    vbase = vc_ptr + bh.to(tl.int64) * Tk * CWV
    knb = kn_ptr + bh.to(tl.int64) * Tk * NGK
    vnb = vn_ptr + bh.to(tl.int64) * Tk * NGV
    mrow = mask_ptr + b.to(tl.int64) * smb + hq.to(tl.int64) * smh + tq.to(tl.int64) * smt
    mrow0 = mask_ptr + b.to(tl.int64) * smb
    for start in range(n_lo, n_hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = _key_ok(n, n_hi, KV_START)
        n64 = n.to(tl.int64)
        # ---- scores: q . (codebook[code] * norm), norms after the dot
        krow = kbase + n64 * CWK
        if KSPLIT:  # one half tile and one dot per norm group
            nk0 = tl.load(knb + n64 * NGK, mask=n_ok, other=0.0).to(tl.float32)
            nk1 = tl.load(knb + n64 * NGK + 1, mask=n_ok, other=0.0).to(tl.float32)
            kt = tl.trans(_tile_prmt(krow, n_ok, ktab, D, KBITS, DECODE, BLOCK_N, 0, 2, OPAQUE))
            sc = tl.dot(q0, kt) * nk0[None, :]
            kt = tl.trans(_tile_prmt(krow, n_ok, ktab, D, KBITS, DECODE, BLOCK_N, 1, 2, OPAQUE))
            sc += tl.dot(q1, kt) * nk1[None, :]
        else:
            if KFAST:
                kt = tl.trans(_tile_prmt(krow, n_ok, ktab, D, KBITS, DECODE, BLOCK_N, OPAQUE=OPAQUE))
            else:
                kt = tl.trans(_tile(kbase, knb, n64, n_ok, klev_ptr, CWK, D, KBITS, NGK, KPOST, BLOCK_N))
            if KPOST:
                nk0 = tl.load(knb + n64 * NGK, mask=n_ok, other=0.0).to(tl.float32)
                sc = tl.dot(q0, kt) * nk0[None, :]
                if NGK == 2:
                    nk1 = tl.load(knb + n64 * NGK + 1, mask=n_ok, other=0.0).to(tl.float32)
                    sc += tl.dot(q1, kt) * nk1[None, :]
            else:
                sc = tl.dot(q0, kt)
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
        l_t = l_t * alpha[:, None] + p  # row sums reduced once after the loop: no cross-warp sum per tile
        m_i = m_new
        # ---- values: p . (codebook[code] * norm), norms folded into p
        vrow = vbase + n64 * CWV
        if VSPLIT:  # one half tile, one dot and one accumulator per norm group
            nv0 = tl.load(vnb + n64 * NGV, mask=n_ok, other=0.0).to(tl.float32)
            nv1 = tl.load(vnb + n64 * NGV + 1, mask=n_ok, other=0.0).to(tl.float32)
            vt = _tile_prmt(vrow, n_ok, vtab, D, VBITS, DECODE, BLOCK_N, 0, 2, OPAQUE)
            acc = acc * alpha[:, None] + tl.dot((p * nv0[None, :]).to(tl.float16), vt)
            vt = _tile_prmt(vrow, n_ok, vtab, D, VBITS, DECODE, BLOCK_N, 1, 2, OPAQUE)
            acc1 = acc1 * alpha[:, None] + tl.dot((p * nv1[None, :]).to(tl.float16), vt)
        else:
            if VFAST:
                vt = _tile_prmt(vrow, n_ok, vtab, D, VBITS, DECODE, BLOCK_N, OPAQUE=OPAQUE)
            else:
                vt = _tile(vbase, vnb, n64, n_ok, vlev_ptr, CWV, D, VBITS, NGV, VPOST, BLOCK_N)
            if VPOST:
                nv0 = tl.load(vnb + n64 * NGV, mask=n_ok, other=0.0).to(tl.float32)
                pv = tl.dot((p * nv0[None, :]).to(tl.float16), vt)
                if NGV == 2:
                    nv1 = tl.load(vnb + n64 * NGV + 1, mask=n_ok, other=0.0).to(tl.float32)
                    pv1 = tl.dot((p * nv1[None, :]).to(tl.float16), vt)
                    pv = tl.where(col[None, :] < D // 2, pv, pv1)
            else:
                pv = tl.dot(p.to(tl.float16), vt)
            acc = acc * alpha[:, None] + pv

    l_i = tl.sum(l_t, axis=1)
    pidx = (bh.to(tl.int64) * NS + split) * M + rows
    tl.store(pm_ptr + pidx, m_i, mask=m_ok)
    tl.store(pl_ptr + pidx, l_i, mask=m_ok)
    tl.store(pacc_ptr + pidx[:, None] * D + vcol[None, :], acc, mask=m_ok[:, None])
    if VSPLIT:
        tl.store(pacc_ptr + pidx[:, None] * D + (D // 2 + vcol)[None, :], acc1, mask=m_ok[:, None])
