"""The keys-m kernel, the default for decode shapes (`launch_attention(variant=...)`): keys as the M side of a Hopper
wgmma, so the decoded K tile goes straight into the mma's registers.

The split kernel (attention_split) computes scores as q [BLOCK_M, d] @ K^T: the decoded K tile is the mma's B
operand, which the tensor cores read from shared memory, so every decoded K element is stored to shared memory and
read back (with V's tile ~1.5 KB of shared traffic per tile and thread, which benchmarks/NOTES.md v8 took for the
limit; v10 measured this kernel 4-9% faster at batch 8, not the ~2x that predicted: both are latency-bound).
Here the scores are computed transposed, S^T = K [BLOCK_N, d] @ q^T, with 64 keys as the M side of a Hopper
wgmma, whose A operand may live in registers. The codes are loaded so that each thread decodes exactly the
elements the A fragment wants from it (lane l: keys l/4 and l/4 + 8 of its warp's 16, coordinates 16k + 8h +
2(l%4) + e): a [64, 4, NW] word tile (4 lanes per key, NW contiguous words each), keys loaded in the order the
blocked layout's (repeat, warp, lane) rows need to become the fragment's (warp, repeat, lane) rows, and the
decoded columns permuted to the fragment's order (q's columns follow). No layout conversion is left between the
decode and the mma (Triton 3.6 sm_90 TTGIR / SASS, benchmarks/NOTES.md v10). Values: O^T = V^T @ P^T, the same
wgmma orientation, so p and the accumulator share one layout with the scores (V's tile still goes through shared
memory: its reduction axis is the key axis, and the format packs codes along coordinates).
Decode shapes only: <= 16 query rows per program (the N side), 64 keys per tile, 4 warps, parts of 128
coordinates per norm group (head_dim 128 with one group, 256 with two), 2/3/4-bit uniform widths, prmt decode.
With V's codes packed along keys (VKEYS, docs/FORMAT.md) each thread loads the bytes of V^T's A fragment directly,
and V skips the shared-memory trip too.
"""

from __future__ import annotations

import triton
import triton.language as tl

from rqcompile.kernels.decode_grid import _key_ok, _key_range, _q_rot, _query_rows
from rqcompile.kernels.rope_term import _cos_sin, _rope_scores_turned, _rope_setup
from rqcompile.kernels.tile_decode import (
    _decode_words,
    _prmt_columns,
    _prmt_rows,
    _spread_source,
    _tables,
    _tile_decode,
    _tile_prmt,
    _tile_words,
)

# Timing ablations of the keys-m kernel (launch_attention(ablate=...), benchmarks/attn_profile.py): each bit replaces
# one part of the loop by a no-op so that a device run can say what that part costs. Their outputs are wrong by
# design. The decode ablations keep every load: the words' bits are handed on as fp16 values by register moves
# (NOP_ASM*), so memory traffic, layouts and mmas stay as they are and only the table lookups go. The dot ablations
# drop a dot and, with it, the loads that fed it; "v-loads" keeps V's dot but feeds it a tile made from the norms
# (Triton then keeps that operand in registers: V's loads, decode and trip through shared memory all go).
ABLATIONS = {"k-decode": 1, "v-decode": 2, "v-dot": 4, "k-dot": 8, "v-loads": 16}


@triton.jit
def _fragment_columns(x, NW: tl.constexpr, PER: tl.constexpr):
    """[R, 128] tile, columns in (lane t, word u, value v) order (t * NW + u) * PER + v -> the wgmma A fragment's
    column order 16k + 8h + 2t + e, with k = u * PER / 4 + v // 4, h = v // 2 % 2, e = v % 2."""
    R: tl.constexpr = x.shape[0]
    x = tl.reshape(x, [R, 4, NW, PER // 4, 2, 2])
    x = tl.permute(x, (0, 2, 3, 4, 1, 5))
    return tl.reshape(x, [R, 128])


@triton.jit
def _fragment_rows(x):
    """[64, C] tile: rows (repeat, warp, lane) of the word loads -> rows (warp, repeat, lane) of the A fragment."""
    C: tl.constexpr = x.shape[1]
    x = tl.reshape(x, [2, 4, 8, C])
    x = tl.permute(x, (1, 0, 2, 3))
    return tl.reshape(x, [64, C])


@triton.jit
def _key_words(krow, n_ok, D: tl.constexpr, BITS: tl.constexpr, PART: tl.constexpr):
    """The code words _key_decode turns into the K fragment of coordinates PART * 128.., as loaded: [lane t, key,
    word u] (and 3 bits' high-plane halfwords in the same layout; the low words again at 2 and 4 bits). `krow`
    points at each loaded key's words (keys in _fragment_rows' source order)."""
    if BITS == 4:
        PER: tl.constexpr = 8
    else:
        PER: tl.constexpr = 16
    W: tl.constexpr = D // PER
    NW: tl.constexpr = 128 // (4 * PER)  # words per thread and key
    # loaded as [lane t, key, word u]: Triton lays a load out by the contiguity of its offsets, fastest first, ties
    # in axis order, so this makes u the vector (registers), then 4 lanes along t, 8 along keys, warps along keys
    # (the fragment's rows); [key, t, u] put 32 lanes along the keys. _key_decode permutes to [key, t, u].
    t = tl.arange(0, 4)
    u = tl.arange(0, NW)
    wi = PART * (128 // PER) + t[:, None, None] * NW + u[None, None, :]
    w = tl.load(krow[None, :, None] + wi, mask=n_ok[None, :, None], other=0)
    if BITS == 3:  # the high-plane halfwords of words (t, u): halfword 2W + PART * 8 + NW * t + u, the same layout
        hrow = krow.to(tl.pointer_type(tl.int16))
        hi = tl.load(
            hrow[None, :, None] + (2 * W + PART * 8) + t[:, None, None] * NW + u[None, None, :],
            mask=n_ok[None, :, None],
            other=0,
        )
    else:
        hi = w
    return w, hi


@triton.jit
def _key_decode(w, hi, tab, BITS: tl.constexpr, DECODE: tl.constexpr):
    """fp16 [64, 128] decoded K values in the A fragment's layout (see above) from _key_words' words."""
    if BITS == 4:
        PER: tl.constexpr = 8
    else:
        PER: tl.constexpr = 16
    NW: tl.constexpr = 128 // (4 * PER)
    w = tl.permute(w, (1, 0, 2))
    if BITS == 3:
        hh = tl.permute(hi, (1, 0, 2)).to(tl.int32)
    else:
        hh = w
    tile = tl.reshape(_decode_words(w, hh, tab, BITS, DECODE), [64, 128])  # column (t * NW + u) * PER + value
    return _fragment_rows(_fragment_columns(tile, NW, PER))


@triton.jit
def _key_fragment(krow, n_ok, tab, D: tl.constexpr, BITS: tl.constexpr, DECODE: tl.constexpr, PART: tl.constexpr):
    """fp16 [64, 128] decoded K values of coordinates PART * 128.. in the A fragment's layout (see above)."""
    w, hi = _key_words(krow, n_ok, D, BITS, PART)
    return _key_decode(w, hi, tab, BITS, DECODE)


@triton.jit
def _q_fragment(q, BITS: tl.constexpr):
    """q's 128 columns (natural order) in _key_fragment's column order, transposed: fp16 [128, BLOCK_M]."""
    if BITS == 4:
        PER: tl.constexpr = 8
    else:
        PER: tl.constexpr = 16
        q = _prmt_rows(q, q.shape[0])
    return tl.trans(_fragment_columns(q, 128 // (4 * PER), PER).to(tl.float16))


@triton.jit
def _vkeys_key(x):
    """VKEYS: the key (within a 64-key tile) at fragment column x of V^T's A operand, and so at row x of the scores
    (see _vkeys_fragment): column 16j + 8e + 2t + f holds code COLUMNS[4j + 2e + f] of block t's words."""
    j = x // 16
    e = (x // 8) % 2
    t = (x // 2) % 4
    f = x % 2
    return 16 * t + 8 * (j % 2) + 4 * e + 2 * f + j // 2


@triton.jit
def _vkeys_coord(r):
    """VKEYS: the coordinate (within a norm group) of row r = 64m + 16w + 8h + g of V^T's A operand (and of the
    accumulator): thread (w, g) holds coordinates 4 (8w + g) .. + 3, whose words sit side by side."""
    m = r // 64
    w = (r // 16) % 4
    h = (r // 8) % 2
    g = r % 8
    return 4 * (8 * w + g) + 2 * m + h


@triton.jit
def _vkeys_words(vtile, n0, n_hi, CWV: tl.constexpr, BITS: tl.constexpr, PART: tl.constexpr):
    """VKEYS: the words of one norm group of a 64-key tile of V codes packed along keys (`vtile`: the tile's first
    block; a block of 16 keys holds D low-plane words, word c = coordinate c's codes of the 16 keys, then at 3 bits
    D high-plane halfwords). Loaded as [block t, g, w, c4]: c4 the vector, lanes along t and g, warps along w (the
    A fragment's lane = 4g + t); thread (w, g) reads coordinates 4 (8w + g) + c4. `n0`: the tile's first key."""
    D: tl.constexpr = CWV * 32 // BITS
    t = tl.arange(0, 4)[:, None, None, None]
    g = tl.arange(0, 8)[None, :, None, None]
    w = tl.arange(0, 4)[None, None, :, None]
    c4 = tl.arange(0, 4)[None, None, None, :]
    ok = n0 + 16 * t < n_hi
    blk = vtile + t * (16 * CWV)
    coord = PART * 128 + 4 * (8 * w + g)
    lo = tl.load(blk + coord + c4, mask=ok, other=0)
    if BITS == 3:
        c2 = tl.arange(0, 2)[None, None, None, :]
        hi = tl.load(blk + D + coord // 2 + c2, mask=ok, other=0)
        hh = tl.reshape(tl.join(hi, hi >> 16), [4, 8, 4, 4])
    else:
        hh = lo
    return lo, hh


@triton.jit
def _vkeys_fragment(lo, hh, tab, BITS: tl.constexpr, DECODE: tl.constexpr):
    """VKEYS: fp16 [128 coordinates, 64 keys], V^T of one norm group in the wgmma A fragment's layout, decoded from
    _vkeys_words' words with no trip through shared memory (rows: _vkeys_coord; columns: _vkeys_key)."""
    v = tl.reshape(_decode_words(lo, hh, tab, BITS, DECODE), [4, 8, 4, 2, 2, 4, 2, 2])  # t g w m h j e f
    v = tl.permute(v, (3, 2, 4, 1, 5, 6, 0, 7))  # m w h g j e t f
    return tl.reshape(v, [128, 64])


@triton.jit
def _tile_norms(knb, vnb, n, n_hi, NGK: tl.constexpr, NGV: tl.constexpr):
    """fp32 K and V norms of keys n (one per norm group; a second group's are the first's where there is none)."""
    ok = n < n_hi
    n64 = n.to(tl.int64)
    nk0 = tl.load(knb + n64 * NGK, mask=ok, other=0.0).to(tl.float32)
    nv0 = tl.load(vnb + n64 * NGV, mask=ok, other=0.0).to(tl.float32)
    nk1 = nk0
    nv1 = nv0
    if NGK == 2:
        nk1 = tl.load(knb + n64 * NGK + 1, mask=ok, other=0.0).to(tl.float32)
    if NGV == 2:
        nv1 = tl.load(vnb + n64 * NGV + 1, mask=ok, other=0.0).to(tl.float32)
    return nk0, nk1, nv0, nv1


@triton.jit
def _attn_keys_m_kernel(
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
    rtab_ptr,
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
    DECODE: tl.constexpr = 1,
    ABLATE: tl.constexpr = 0,
    KPREFETCH: tl.constexpr = False,
    VPREFETCH: tl.constexpr = False,
    VKEYS: tl.constexpr = False,
    ROPE_TABLE: tl.constexpr = False,
):
    """_attn_split_kernel's contract (same arguments, same partial outputs) with keys as the mma's M side.
    ABLATE: timing ablations only (ABLATIONS), 0 in every real launch. VKEYS (`RQConfig.value_layout="keys"`,
    launch_attention's `v_along_keys`): V's codes packed along keys, decoded straight into V^T's A fragment, read
    one tile ahead; the tile's keys then sit in _vkeys_key's order on the scores' rows. ROPE_TABLE: the rope term's
    cos / sin of each key slot read from rtab_ptr (rope_term.rope_table) instead of computed."""
    KDECODE: tl.constexpr = 3 if ABLATE & 1 else DECODE
    VDECODE: tl.constexpr = 3 if ABLATE & 2 else DECODE
    tl.static_assert(BLOCK_N == 64)
    tl.static_assert(D // NGK == 128 and D // NGV == 128)
    split, bh, b, h, rows, m_ok, hq, tq, qoff = _query_rows(sqb, sqh, sqt, H, REP, Tq, M, BLOCK_M)
    qrow = q_ptr + qoff
    CWK: tl.constexpr = D * KBITS // 32
    CWV: tl.constexpr = D * VBITS // 32
    ktab = _tables(klev_ptr, KBITS)
    vtab = _tables(vlev_ptr, VBITS)
    # the accumulators' rows follow the V tiles' column order
    if VKEYS:
        tl.static_assert(VBITS != 4 and not VPREFETCH)
        vcol = _vkeys_coord(tl.arange(0, 128))
    else:
        vcol = _prmt_columns(_spread_source(tl.arange(0, 128), 128, VBITS), VBITS)

    ROPE: tl.constexpr = ROPE_K >= 16  # rope_ab's score term (kernels/rope_term.py)
    if ROPE:
        wa, wb, rfreq = _rope_setup(
            rope_ptr, srb, srh, srt, srd, rfreq_ptr, rope_h, b, hq, tq, m_ok, qk_scale, ROPE_K, True
        )
    n_lo, n_hi = _key_range(kvlen_ptr, b, split, NS, span, Tk, HAS_KVLEN, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_t = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    acc0 = tl.zeros([128, BLOCK_M], dtype=tl.float32)
    acc1 = tl.zeros([128, BLOCK_M], dtype=tl.float32)  # the second norm group's coordinates (NGV == 2)
    kbase = kc_ptr + bh.to(tl.int64) * Tk * CWK
    vbase = vc_ptr + bh.to(tl.int64) * Tk * CWV
    knb = kn_ptr + bh.to(tl.int64) * Tk * NGK
    vnb = vn_ptr + bh.to(tl.int64) * Tk * NGV
    mrow = mask_ptr + b.to(tl.int64) * smb + hq.to(tl.int64) * smh + tq.to(tl.int64) * smt
    mrow0 = mask_ptr + b.to(tl.int64) * smb
    i = tl.arange(0, BLOCK_N)
    load_order = ((i // 8) % 4) * 16 + (i // 32) * 8 + i % 8  # _fragment_rows' inverse: natural keys after it
    if VKEYS:  # the scores' row r holds key _vkeys_key(r): the rows' keys (norms, masks) and K's loads follow
        load_order = _vkeys_key(load_order)
        i = _vkeys_key(i)
    if ROPE and ROPE_TABLE:  # [cos | sin] weights against rope_table's [cos | sin] columns: one dot per tile
        wab = tl.join(wa, wb).permute(2, 0, 1).reshape(2 * ROPE_K, BLOCK_M)
        tcol = tl.arange(0, 2 * ROPE_K)
    elif ROPE:  # the cos / sin of the slots' offsets inside a tile, turned by each tile's start angle in the loop
        cos_j, sin_j = _cos_sin(i.to(tl.float32)[:, None] * rfreq[None, :])
    # the norms are read one tile ahead: Triton's pipeliner stages only the loads that feed a dot, and these plain
    # loads, consumed in the same iteration, left every warp waiting on global memory (ncu, benchmarks/NOTES.md v10)
    nk0, nk1, nv0, nv1 = _tile_norms(knb, vnb, n_lo + i, n_hi, NGK, NGV)
    # KPREFETCH: the K code words too, into registers by plain loads one tile ahead, instead of the pipeliner's
    # asynchronous copies through shared memory (whose buffer, [t, key, u] in row-major order, puts the four t lanes
    # of a key on one bank: 4-way conflicts on both the copy and the read; ncu, session 18)
    if KPREFETCH:
        nl = n_lo + load_order
        kw0, kh0 = _key_words(kbase + nl.to(tl.int64) * CWK, nl < n_hi, D, KBITS, 0)
        kw1, kh1 = kw0, kh0
        if NGK == 2:
            kw1, kh1 = _key_words(kbase + nl.to(tl.int64) * CWK, nl < n_hi, D, KBITS, 1)
    # VPREFETCH: V's code words likewise (untimed; 166 registers at 3 bits, but 210 with kv_len and 215 at 4 bits:
    # two programs per SM instead of three, or spills under a 168 cap)
    if VKEYS:
        vk0, vkh0 = _vkeys_words(vbase + tl.cast(n_lo, tl.int64) * CWV, n_lo, n_hi, CWV, VBITS, 0)
        vk1, vkh1 = vk0, vkh0
        if NGV == 2:
            vk1, vkh1 = _vkeys_words(vbase + tl.cast(n_lo, tl.int64) * CWV, n_lo, n_hi, CWV, VBITS, 1)
    if VPREFETCH:
        n0 = n_lo + i
        vw0, vh0 = _tile_words(vbase + n0.to(tl.int64) * CWV, n0 < n_hi, D, VBITS, 0, NGV)
        vw1, vh1 = vw0, vh0
        if NGV == 2:
            vw1, vh1 = _tile_words(vbase + n0.to(tl.int64) * CWV, n0 < n_hi, D, VBITS, 1, 2)
    # q's rotation after the first tile's loads are issued: an in-kernel block rotation (KRB 2, 4) goes through
    # shared memory and barriers, and ahead of the loads it held them back (planar's keys-m at batch 1, 32K keys:
    # 22.0 -> 20.9 us with this order and decode_grid._q_rot's contiguous load, H200, session 26)
    q0 = _q_fragment(_q_rot(qrow, sqd, m_ok, krot_ptr, kscale_ptr, h, qk_scale, D, KRB, KNB, BLOCK_M, 0, 128), KBITS)
    if NGK == 2:
        q1 = _q_fragment(
            _q_rot(qrow, sqd, m_ok, krot_ptr, kscale_ptr, h, qk_scale, D, KRB, KNB, BLOCK_M, 128, 128), KBITS
        )
    for start in range(n_lo, n_hi, BLOCK_N):
        n = start + i
        n_ok = _key_ok(n, n_hi, KV_START)
        n64 = n.to(tl.int64)
        nl = start + load_order
        krow = kbase + nl.to(tl.int64) * CWK
        nk0_next, nk1_next, _, _ = _tile_norms(knb, vnb, n + BLOCK_N, n_hi, NGK, NGV)
        _, _, nv0, nv1 = _tile_norms(knb, vnb, n, n_hi, NGK, NGV)
        # ---- scores^T [keys, rows]: (codebook[code] . q) * norm per norm group
        if ABLATE & 8:
            sc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32) + nk0[:, None] + nk1[:, None]
        elif KPREFETCH:
            nn = nl + BLOCK_N
            krn = kbase + nn.to(tl.int64) * CWK
            kw0n, kh0n = _key_words(krn, nn < n_hi, D, KBITS, 0)
            sc = tl.dot(_key_decode(kw0, kh0, ktab, KBITS, KDECODE), q0) * nk0[:, None]
            kw1n, kh1n = kw0n, kh0n
            if NGK == 2:
                kw1n, kh1n = _key_words(krn, nn < n_hi, D, KBITS, 1)
                sc += tl.dot(_key_decode(kw1, kh1, ktab, KBITS, KDECODE), q1) * nk1[:, None]
            kw0, kh0, kw1, kh1 = kw0n, kh0n, kw1n, kh1n
        else:
            sc = tl.dot(_key_fragment(krow, nl < n_hi, ktab, D, KBITS, KDECODE, 0), q0) * nk0[:, None]
            if NGK == 2:
                sc += tl.dot(_key_fragment(krow, nl < n_hi, ktab, D, KBITS, KDECODE, 1), q1) * nk1[:, None]
        if ROPE and ROPE_TABLE:
            tab = tl.load(rtab_ptr + n64[:, None] * (2 * ROPE_K) + tcol[None, :], mask=(n < n_hi)[:, None], other=0.0)
            sc = tl.dot(tab, wab, sc)
        elif ROPE:
            sc = _rope_scores_turned(sc, wa, wb, rfreq, start, cos_j, sin_j)
        sc = tl.where(n_ok[:, None], sc, float("-inf"))
        if MASK_KIND != 0:
            if MASK_ROW:
                mv = tl.load(mrow0 + n64 * smn, mask=n_ok, other=0)[:, None]
            else:
                mv = tl.load(mrow[None, :] + n64[:, None] * smn, mask=n_ok[:, None] & m_ok[None, :], other=0)
            if MASK_KIND == 1:
                sc = tl.where(mv != 0, sc, float("-inf"))
            else:
                sc += mv.to(tl.float32) * 1.4426950408889634
        # ---- online softmax (base 2) over the key axis
        m_new = tl.maximum(m_i, tl.max(sc, axis=0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(sc - m_use[None, :])
        l_t = l_t * alpha[None, :] + p
        m_i = m_new
        # ---- values^T [coordinates, rows] += V^T @ (p * norm)^T, one dot per norm group
        vrow = vbase + n64 * CWV
        if ABLATE & 4:
            acc0 = acc0 * alpha[None, :] + tl.sum(p * nv0[:, None], axis=0)[None, :]
            acc1 = acc1 * alpha[None, :] + tl.sum(p * nv1[:, None], axis=0)[None, :]
        elif ABLATE & 16:  # V's mma kept, its operand from the norms in registers: no loads, decode, shared memory
            vt = (tl.zeros([BLOCK_N, 128], dtype=tl.float32) + nv0[:, None]).to(tl.float16)
            acc0 = acc0 * alpha[None, :] + tl.dot(tl.trans(vt), (p * nv0[:, None]).to(tl.float16))
            vt = (tl.zeros([BLOCK_N, 128], dtype=tl.float32) + nv1[:, None]).to(tl.float16)
            acc1 = acc1 * alpha[None, :] + tl.dot(tl.trans(vt), (p * nv1[:, None]).to(tl.float16))
        elif VKEYS:
            vtn = vbase + tl.cast(start + BLOCK_N, tl.int64) * CWV
            vk0n, vkh0n = _vkeys_words(vtn, start + BLOCK_N, n_hi, CWV, VBITS, 0)
            vt = _vkeys_fragment(vk0, vkh0, vtab, VBITS, VDECODE)
            acc0 = acc0 * alpha[None, :] + tl.dot(vt, (p * nv0[:, None]).to(tl.float16))
            vk1n, vkh1n = vk0n, vkh0n
            if NGV == 2:
                vk1n, vkh1n = _vkeys_words(vtn, start + BLOCK_N, n_hi, CWV, VBITS, 1)
                vt = _vkeys_fragment(vk1, vkh1, vtab, VBITS, VDECODE)
                acc1 = acc1 * alpha[None, :] + tl.dot(vt, (p * nv1[:, None]).to(tl.float16))
            vk0, vkh0, vk1, vkh1 = vk0n, vkh0n, vk1n, vkh1n
        elif VPREFETCH:
            nn = n + BLOCK_N
            vrn = vbase + nn.to(tl.int64) * CWV
            vw0n, vh0n = _tile_words(vrn, nn < n_hi, D, VBITS, 0, NGV)
            vt = _tile_decode(vw0, vh0, vtab, VBITS, VDECODE, False)
            acc0 = acc0 * alpha[None, :] + tl.dot(tl.trans(vt), (p * nv0[:, None]).to(tl.float16))
            vw1n, vh1n = vw0n, vh0n
            if NGV == 2:
                vw1n, vh1n = _tile_words(vrn, nn < n_hi, D, VBITS, 1, 2)
                vt = _tile_decode(vw1, vh1, vtab, VBITS, VDECODE, False)
                acc1 = acc1 * alpha[None, :] + tl.dot(tl.trans(vt), (p * nv1[:, None]).to(tl.float16))
            vw0, vh0, vw1, vh1 = vw0n, vh0n, vw1n, vh1n
        else:
            vt = _tile_prmt(vrow, n_ok, vtab, D, VBITS, VDECODE, BLOCK_N, 0, NGV, False)
            acc0 = acc0 * alpha[None, :] + tl.dot(tl.trans(vt), (p * nv0[:, None]).to(tl.float16))
            if NGV == 2:
                vt = _tile_prmt(vrow, n_ok, vtab, D, VBITS, VDECODE, BLOCK_N, 1, 2, False)
                acc1 = acc1 * alpha[None, :] + tl.dot(tl.trans(vt), (p * nv1[:, None]).to(tl.float16))
        nk0, nk1 = nk0_next, nk1_next

    l_i = tl.sum(l_t, axis=0)
    pidx = (bh.to(tl.int64) * NS + split) * M + rows
    tl.store(pm_ptr + pidx, m_i, mask=m_ok)
    tl.store(pl_ptr + pidx, l_i, mask=m_ok)
    tl.store(pacc_ptr + pidx[None, :] * D + vcol[:, None], acc0, mask=m_ok[None, :])
    if NGV == 2:
        tl.store(pacc_ptr + pidx[None, :] * D + (128 + vcol)[:, None], acc1, mask=m_ok[None, :])
