"""Triton decode attention over the packed cache, computed in the rotated space (docs/FORMAT.md), flash-decoding.

Split kernel: grid (splits, batch * kv_heads, row tiles). One program owns one KV head and a tile of its
`rep * Tq` query rows (GQA: the query heads of one KV head share each K/V tile), and a contiguous range of keys.
It rotates q once (block-diagonal gather, or reads q pre-rotated for dense/hadamard), then streams packed K/V:
no unpacking to memory and no per-token inverse rotation. Each [BLOCK_N, d] tile of codes is read as int32 words
(16-byte vector loads; with little-endian bytes the layout of docs/FORMAT.md puts 2-bit code i at bits 2*(i%16) of
word i//16, 4-bit code i at bits 4*(i%8) of word i//8, and bit 2 of a 3-bit code at bit i%32 of word d/16 + i//32),
expanded in registers to [BLOCK_N, d/PER, PER] and mapped to `codebook[code]` by a binary tree of selects on the
code's bits (exact table values). One `tl.dot` per norm group against the fp16 levels (fp32 accumulation): the K
norms scale the score columns after the dot, the V norms are folded into p, so no per-element norm multiply
(for more than two norm groups the norms are applied per element instead). Online softmax in base 2.
Combine kernel: merges the splits' (max, sum, acc), un-rotates V once per query row (block-diagonal gather),
applies V's scale and mean and writes the output in q's dtype.

Masks: none; an optional per-batch valid length `kv_len` (keys >= kv_len[b] are never read, and the splits divide
the valid keys among themselves, so the work follows the context, not max_cache_len); or any
SDPA-style mask (bool or additive float, broadcastable to [B, Hq, Tq, Tk]) read tile by tile with its strides.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

from rqcompile.kernels.common import interpreting, is_pow2, sm_count

LOG2E = 1.4426950408889634
# launch defaults (tuned on the device, see benchmarks/NOTES.md); num_stages: software pipelining of the loop
# maxnreg: register cap per thread (more programs per SM; eager launches only, see launch_attention)
DEFAULTS = {"block_n": 32, "num_warps": 4, "split_waves": 8, "num_stages": 2, "maxnreg": 168}


@triton.jit
def _q_rot(
    qrow,
    sqd,
    m_ok,
    rot_ptr,
    ks_ptr,
    h,
    qk_scale,
    D: tl.constexpr,
    RB: tl.constexpr,
    NB: tl.constexpr,
    BM: tl.constexpr,
):
    """The rotated, K-scaled query rows times qk_scale, fp32 [BLOCK_M, D] (natural column order)."""
    c = tl.arange(0, D)
    if RB == 0:  # q already rotated and K-scaled on the host (dense rotation)
        qv = tl.load(qrow[:, None] + c[None, :] * sqd, mask=m_ok[:, None], other=0.0).to(tl.float32)
    else:
        blk = c // RB
        ii = c % RB
        qv = tl.zeros([BM, D], dtype=tl.float32)
        for k in tl.static_range(RB):
            src = blk * RB + k
            sv = src < D
            x = tl.load(qrow[:, None] + src[None, :] * sqd, mask=m_ok[:, None] & sv[None, :], other=0.0)
            ksc = tl.load(ks_ptr + h * D + src, mask=sv, other=0.0)
            coef = tl.load(rot_ptr + ((h * NB + blk) * RB + ii) * RB + k)
            qv += coef[None, :] * (x.to(tl.float32) * ksc[None, :])
    return qv * qk_scale


@triton.jit
def _pick(b, lev_ptr, k: tl.constexpr):
    """levels[k + 1] where the bit is set, else levels[k] (one select, both scalars in registers)."""
    return tl.where(b, tl.load(lev_ptr + k + 1), tl.load(lev_ptr + k))


@triton.jit
def _bit(w, sh):
    return ((w >> sh) & 1) != 0


@triton.jit
def _levels(row, n_ok, lev_ptr, D: tl.constexpr, BITS: tl.constexpr):
    """codebook[code] for a [BLOCK_N, D] tile of packed codes, as fp32 [BLOCK_N, D // PER, PER] (PER codes per
    int32 word: element (n, j, l) is code PER*j + l of row n, so a plain reshape gives the natural order).

    `row` points at each row's codes as int32 words (little-endian bytes, so the byte layout of docs/FORMAT.md is:
    2 bits -> code i at bits 2*(i%16) of word i//16; 4 bits -> bits 4*(i%8) of word i//8; the 3-bit high plane
    starts at word D//16 and holds bit 2 of code i at bit i%32 of word D//16 + i//32). Each word is loaded once
    (16-byte vector loads) and every level is a binary tree of selects on the code's bits (exact: the table's
    values, no approximation; 2**bits - 1 selects)."""
    if BITS == 4:
        PER: tl.constexpr = 8
    else:
        PER: tl.constexpr = 16
    W: tl.constexpr = D // PER
    wi = tl.arange(0, W)
    li = tl.arange(0, PER)
    w = tl.load(row[:, None] + wi[None, :], mask=n_ok[:, None], other=0)[:, :, None]
    if BITS == 4:
        sh = (4 * li)[None, None, :]
        b0 = _bit(w, sh)
        b1 = _bit(w, sh + 1)
        b2 = _bit(w, sh + 2)
        b3 = _bit(w, sh + 3)
        v0 = tl.where(b1, _pick(b0, lev_ptr, 2), _pick(b0, lev_ptr, 0))
        v1 = tl.where(b1, _pick(b0, lev_ptr, 6), _pick(b0, lev_ptr, 4))
        v2 = tl.where(b1, _pick(b0, lev_ptr, 10), _pick(b0, lev_ptr, 8))
        v3 = tl.where(b1, _pick(b0, lev_ptr, 14), _pick(b0, lev_ptr, 12))
        val = tl.where(b3, tl.where(b2, v3, v2), tl.where(b2, v1, v0))
    else:
        sh = (2 * li)[None, None, :]
        b0 = _bit(w, sh)
        b1 = _bit(w, sh + 1)
        if BITS == 2:
            val = tl.where(b1, _pick(b0, lev_ptr, 2), _pick(b0, lev_ptr, 0))
        else:
            wh = tl.load(row[:, None] + (W + wi // 2)[None, :], mask=n_ok[:, None], other=0)[:, :, None]
            b2 = _bit(wh, (16 * (wi % 2))[None, :, None] + li[None, None, :])
            v0 = tl.where(b1, _pick(b0, lev_ptr, 2), _pick(b0, lev_ptr, 0))
            v1 = tl.where(b1, _pick(b0, lev_ptr, 6), _pick(b0, lev_ptr, 4))
            val = tl.where(b2, v1, v0)
    return val


@triton.jit
def _tile(
    cbase,
    nbase,
    n64,
    n_ok,
    lev_ptr,
    CW: tl.constexpr,
    D: tl.constexpr,
    BITS: tl.constexpr,
    NG: tl.constexpr,
    POST: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """fp16 [BLOCK_N, D]: codebook[code] (POST: the norms are applied outside, after the dots) or
    codebook[code] * norm (per element)."""
    val = _levels(cbase + n64 * CW, n_ok, lev_ptr, D, BITS)
    if not POST:
        PER: tl.constexpr = 8 if BITS == 4 else 16
        W: tl.constexpr = D // PER
        g = tl.arange(0, W) // (W // NG)
        nrm = tl.load(nbase + n64[:, None] * NG + g[None, :], mask=n_ok[:, None], other=0.0).to(tl.float32)
        val = val * nrm[:, :, None]
    return tl.reshape(val.to(tl.float16), [BLOCK_N, D])


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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    split = tl.program_id(0)
    bh = tl.program_id(1)
    mt = tl.program_id(2)
    b = bh // H
    h = bh % H
    CWK: tl.constexpr = D * KBITS // 32  # int32 words of codes per key
    CWV: tl.constexpr = D * VBITS // 32
    KPOST: tl.constexpr = NGK <= 2  # K norms applied to the scores after the dot (one dot per norm group)
    VPOST: tl.constexpr = NGV <= 2  # V norms folded into p (one dot per norm group)
    rows = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rows < M
    r = rows // Tq
    tq = rows % Tq
    hq = h * REP + r
    qrow = q_ptr + b.to(tl.int64) * sqb + hq.to(tl.int64) * sqh + tq.to(tl.int64) * sqt
    col = tl.arange(0, D)
    qf = _q_rot(qrow, sqd, m_ok, krot_ptr, kscale_ptr, h, qk_scale, D, KRB, KNB, BLOCK_M)
    if KPOST and NGK == 2:
        q0 = tl.where(col[None, :] < D // 2, qf, 0.0).to(tl.float16)
        q1 = tl.where(col[None, :] < D // 2, 0.0, qf).to(tl.float16)
    else:
        q0 = qf.to(tl.float16)
        q1 = q0

    if HAS_KVLEN:  # the splits share the valid keys only: a short context in a long static cache keeps every split busy
        kvl = tl.minimum(tl.load(kvlen_ptr + b).to(tl.int32), Tk)
        span_b = (((kvl + NS - 1) // NS + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
        n_lo = split * span_b
        n_hi = tl.minimum(n_lo + span_b, kvl)
    else:
        n_lo = split * span
        n_hi = tl.minimum(n_lo + span, Tk)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    kbase = kc_ptr + bh.to(tl.int64) * Tk * CWK
    vbase = vc_ptr + bh.to(tl.int64) * Tk * CWV
    knb = kn_ptr + bh.to(tl.int64) * Tk * NGK
    vnb = vn_ptr + bh.to(tl.int64) * Tk * NGV
    mrow = mask_ptr + b.to(tl.int64) * smb + hq.to(tl.int64) * smh + tq.to(tl.int64) * smt
    mrow0 = mask_ptr + b.to(tl.int64) * smb
    for start in range(n_lo, n_hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < n_hi
        n64 = n.to(tl.int64)
        # ---- scores: q . (codebook[code] * norm), norms after the dot
        kt = tl.trans(_tile(kbase, knb, n64, n_ok, klev_ptr, CWK, D, KBITS, NGK, KPOST, BLOCK_N))
        if KPOST:
            nk0 = tl.load(knb + n64 * NGK, mask=n_ok, other=0.0).to(tl.float32)
            sc = tl.dot(q0, kt) * nk0[None, :]
            if NGK == 2:
                nk1 = tl.load(knb + n64 * NGK + 1, mask=n_ok, other=0.0).to(tl.float32)
                sc += tl.dot(q1, kt) * nk1[None, :]
        else:
            sc = tl.dot(q0, kt)
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
        # ---- values: p . (codebook[code] * norm), norms folded into p
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

    pidx = (bh.to(tl.int64) * NS + split) * M + rows
    tl.store(pm_ptr + pidx, m_i, mask=m_ok)
    tl.store(pl_ptr + pidx, l_i, mask=m_ok)
    tl.store(pacc_ptr + pidx[:, None] * D + col[None, :], acc, mask=m_ok[:, None])


@triton.jit
def _attn_combine_kernel(
    pm_ptr,
    pl_ptr,
    pacc_ptr,
    vrot_ptr,
    vscale_ptr,
    vmean_ptr,
    out_ptr,
    H,
    REP,
    Tq,
    M,
    NS,
    D: tl.constexpr,
    VRB: tl.constexpr,
    VNB: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    s = tl.arange(0, BLOCK_S)
    s_ok = s < NS
    base = (bh.to(tl.int64) * NS + s) * M + row
    ms = tl.load(pm_ptr + base, mask=s_ok, other=float("-inf"))
    ls = tl.load(pl_ptr + base, mask=s_ok, other=0.0)
    mmax = tl.max(ms, axis=0)
    muse = tl.where(mmax == float("-inf"), 0.0, mmax)
    w = tl.where(s_ok, tl.exp2(ms - muse), 0.0)
    total = tl.sum(w * ls, axis=0)
    inv = tl.where(total > 0, 1.0 / tl.maximum(total, 1e-30), 0.0)
    c = tl.arange(0, D)
    arow = pacc_ptr + base[:, None] * D
    if VRB == 0:  # dense V rotation: the host un-rotates
        out = tl.sum(w[:, None] * tl.load(arow + c[None, :], mask=s_ok[:, None], other=0.0), axis=0) * inv
    else:
        blk = c // VRB
        kk = c % VRB
        out = tl.zeros([D], dtype=tl.float32)
        for i in tl.static_range(VRB):
            src = blk * VRB + i
            sv = src < D
            a = tl.sum(w[:, None] * tl.load(arow + src[None, :], mask=s_ok[:, None] & sv[None, :], other=0.0), axis=0)
            coef = tl.load(vrot_ptr + ((h * VNB + blk) * VRB + i) * VRB + kk)
            out += coef * a
        out = out * inv * tl.load(vscale_ptr + h * D + c) + tl.load(vmean_ptr + h * D + c)
    r = row // Tq
    t = row % Tq
    orow = ((b.to(tl.int64) * H * REP + h * REP + r) * Tq + t) * D
    tl.store(out_ptr + orow + c, out.to(out_ptr.dtype.element_ty))


def attention_supported(q, k_codes, v_codes, k_bits: int, v_bits: int, k_norms, v_norms) -> bool:
    dim = q.shape[-1]
    if not is_pow2(dim) or dim < 32 or dim > 512 or q.shape[1] % k_codes.shape[1]:
        return False
    for bits, norms in ((k_bits, k_norms), (v_bits, v_norms)):
        if bits not in (2, 3, 4) or dim % norms.shape[-1] or (dim // norms.shape[-1]) % 16:
            return False
    return True


def _words(codes):
    """The packed codes as int32 words (4 consecutive bytes, little-endian), [..., d*bits/32]."""
    import torch

    codes = codes.contiguous()
    if codes.storage_offset() % 4:
        codes = codes.clone()
    return codes.view(torch.int32)


def _identity(kernel):
    return kernel


def _rotate(x, rotation, inverse=False):
    from rqcompile.quant.rotations import rotate

    return rotate(x, rotation, inverse=inverse)


def launch_attention(
    q,
    k_codes,
    k_norms,
    v_codes,
    v_norms,
    k_rotation,
    k_scale,
    k_levels,
    v_rotation,
    v_mean,
    v_scale,
    v_levels,
    k_bits: int,
    v_bits: int,
    attn_mask,
    sm_scale: float,
    kv_len=None,
    wrap=None,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_stages: int | None = None,
    maxnreg: int | None = None,
    num_warps: int | None = None,
    split_waves: int | None = None,
):
    """rq::attention on the packed cache with Triton (see module docstring). kv_len: optional int [B]."""
    import torch

    wrap = _identity if wrap is None else wrap
    block_n = DEFAULTS["block_n"] if block_n is None else block_n
    num_stages = DEFAULTS["num_stages"] if num_stages is None else num_stages
    maxnreg = DEFAULTS["maxnreg"] if maxnreg is None else maxnreg
    num_warps = DEFAULTS["num_warps"] if num_warps is None else num_warps
    split_waves = DEFAULTS["split_waves"] if split_waves is None else split_waves
    batch, q_heads, q_len, dim = q.shape
    heads = k_codes.shape[1]
    tk = k_codes.shape[2]
    rep = q_heads // heads
    rows = rep * q_len
    block_m = 16 if rows <= 16 else (32 if rows <= 32 else 64)
    # The register cap is a plain Triton launch option; torch's wrap_triton (torch.compile / AOTInductor) is given
    # only the options it knows. It is tuned for decode tiles: at BLOCK_M 64 (prefill) ptxas cannot fit the kernel
    # in 168 registers and refuses it (C7600, seen on the H200), so larger tiles launch uncapped.
    capped = maxnreg and block_m == 16 and wrap is _identity and not interpreting()
    launch_opts = {"maxnreg": maxnreg} if capped else {}
    m_tiles = triton.cdiv(rows, block_m)
    qk_scale = float(sm_scale) * LOG2E
    device = q.device

    krb = k_rotation.shape[-1]
    q_in = q
    if krb > 4:  # dense (hadamard) K rotation: rotate q once on the host
        qf = q.float().unflatten(1, (heads, rep)).flatten(2, 3) * k_scale[:, None, :]
        q_in = _rotate(qf, k_rotation).unflatten(2, (rep, q_len)).flatten(1, 2)
        krb = 0

    total_blocks = max(1, triton.cdiv(tk, block_n))
    if num_splits is None:
        target = split_waves * sm_count(device.index or 0) if device.type == "cuda" else 4
        num_splits = triton.cdiv(target, batch * heads * m_tiles)
    num_splits = max(1, min(int(num_splits), total_blocks, 128))
    span = triton.cdiv(total_blocks, num_splits) * block_n
    num_splits = max(1, triton.cdiv(tk, span))

    if attn_mask is None:
        mask_kind, mask, mstrides = 0, q, (0, 0, 0, 0)
    else:
        mask = attn_mask
        if mask.dtype == torch.bool:
            # a uint8 copy of the (unexpanded) mask, not a dtype view: Inductor cannot lower view(bool -> uint8)
            mask_kind, mask = 1, mask.to(torch.uint8)
        else:
            mask_kind = 2
        mask = mask.expand(batch, q_heads, q_len, tk)
        mstrides = tuple(mask.stride())
    kvl = kv_len.to(torch.int32) if kv_len is not None else q

    pm = torch.empty((batch * heads, num_splits, rows), dtype=torch.float32, device=device)
    pl = torch.empty((batch * heads, num_splits, rows), dtype=torch.float32, device=device)
    pacc = torch.empty((batch * heads, num_splits, rows, dim), dtype=torch.float32, device=device)
    if batch * q_heads * q_len == 0:
        return torch.empty(q.shape, dtype=q.dtype, device=device)
    wrap(_attn_split_kernel)[(num_splits, batch * heads, m_tiles)](
        q_in,
        q_in.stride(0),
        q_in.stride(1),
        q_in.stride(2),
        q_in.stride(3),
        _words(k_codes),
        k_norms.contiguous(),
        _words(v_codes),
        v_norms.contiguous(),
        k_rotation.contiguous(),
        k_scale.contiguous(),
        k_levels.contiguous(),
        v_levels.contiguous(),
        mask,
        *mstrides,
        kvl,
        pm,
        pl,
        pacc,
        heads,
        rep,
        q_len,
        tk,
        rows,
        num_splits,
        span,
        qk_scale,
        D=dim,
        KBITS=k_bits,
        VBITS=v_bits,
        NGK=k_norms.shape[-1],
        NGV=v_norms.shape[-1],
        KRB=krb,
        KNB=k_rotation.shape[1],
        MASK_KIND=mask_kind,
        MASK_ROW=mask_kind != 0 and mstrides[1] == 0 and mstrides[2] == 0,
        HAS_KVLEN=kv_len is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=num_warps,
        num_stages=num_stages,
        **launch_opts,
    )
    vrb = v_rotation.shape[-1]
    dense_v = vrb > 4
    out = torch.empty((batch, q_heads, q_len, dim), dtype=torch.float32 if dense_v else q.dtype, device=device)
    wrap(_attn_combine_kernel)[(rows, batch * heads)](
        pm,
        pl,
        pacc,
        v_rotation.contiguous(),
        v_scale.contiguous(),
        v_mean.contiguous(),
        out,
        heads,
        rep,
        q_len,
        rows,
        num_splits,
        D=dim,
        VRB=0 if dense_v else vrb,
        VNB=v_rotation.shape[1],
        BLOCK_S=max(2, triton.next_power_of_2(num_splits)),
        num_warps=4,
    )
    if dense_v:
        acc = out.unflatten(1, (heads, rep)).flatten(2, 3)
        acc = _rotate(acc, v_rotation, inverse=True) * v_scale[:, None, :] + v_mean[:, None, :]
        out = acc.unflatten(2, (rep, q_len)).flatten(1, 2).to(q.dtype)
    return out


def default_sm_scale(dim: int) -> float:
    return 1.0 / math.sqrt(dim)
