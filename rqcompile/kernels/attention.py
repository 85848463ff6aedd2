"""Triton decode attention over the packed cache, computed in the rotated space (docs/FORMAT.md), flash-decoding.

Split kernel: grid (splits, batch * kv_heads, row tiles). One program owns one KV head and a tile of its
`rep * Tq` query rows (GQA: the query heads of one KV head share each K/V tile), and a contiguous range of keys.
It rotates q once (block-diagonal gather, or reads q pre-rotated for dense/hadamard), then streams packed K/V:
no unpacking to [N, d] and no per-token inverse rotation. A code `i` is read as `i = S*j + s` (S = 4 codes per
byte for 2/3 bits, 2 for 4 bits): for each slot `s` the codes of all bytes `j` form one [N, d/S] tile, so every
score is a sum of S `tl.dot`s of q's matching columns against `codebook[code] * norm` (fp16 operands, fp32
accumulation), and the values likewise accumulate into S [rows, d/S] accumulators. Online softmax in base 2.
Combine kernel: merges the splits' (max, sum, acc), un-rotates V once per query row (block-diagonal gather),
applies V's scale and mean and writes the output in q's dtype.

Masks: none; an optional per-batch valid length `kv_len` (keys >= kv_len[b] are never read); or any
SDPA-style mask (bool or additive float, broadcastable to [B, Hq, Tq, Tk]) read tile by tile with its strides.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

from rqcompile.kernels.common import is_pow2, sm_count

LOG2E = 1.4426950408889634
# launch defaults (tuned on the device, see benchmarks/NOTES.md); lut: 0 gathered codebook load, 1 select chain
DEFAULTS = {"block_n": 64, "lut": 1, "num_warps": 4, "split_waves": 2}


@triton.jit
def _q_slot(
    qrow,
    sqd,
    m_ok,
    rot_ptr,
    ks_ptr,
    h,
    j,
    qk_scale,
    s: tl.constexpr,
    S: tl.constexpr,
    D: tl.constexpr,
    RB: tl.constexpr,
    NB: tl.constexpr,
    BM: tl.constexpr,
):
    """Columns S*j + s of the rotated, K-scaled query rows, times qk_scale, as fp16 [BLOCK_M, D/S]."""
    c = S * j + s
    if RB == 0:  # q already rotated and K-scaled on the host (dense rotation)
        qv = tl.load(qrow[:, None] + c[None, :] * sqd, mask=m_ok[:, None], other=0.0).to(tl.float32)
    else:
        blk = c // RB
        ii = c % RB
        qv = tl.zeros([BM, D // S], dtype=tl.float32)
        for k in tl.static_range(RB):
            src = blk * RB + k
            sv = src < D
            x = tl.load(qrow[:, None] + src[None, :] * sqd, mask=m_ok[:, None] & sv[None, :], other=0.0)
            ksc = tl.load(ks_ptr + h * D + src, mask=sv, other=0.0)
            coef = tl.load(rot_ptr + ((h * NB + blk) * RB + ii) * RB + k)
            qv += coef[None, :] * (x.to(tl.float32) * ksc[None, :])
    return (qv * qk_scale).to(tl.float16)


@triton.jit
def _lut(code, lev_ptr, NL: tl.constexpr, LUT: tl.constexpr):
    """codebook[code]: a gathered load (LUT == 0) or a chain of selects over the NL scalar levels (LUT == 1)."""
    if LUT == 0:
        val = tl.load(lev_ptr + code)
    else:
        val = tl.zeros(code.shape, dtype=tl.float32) + tl.load(lev_ptr)
        for k in tl.static_range(1, NL):
            val = tl.where(code == k, tl.load(lev_ptr + k), val)
    return val


@triton.jit
def _slot_values(lo, hi, hsh, nrm, lev_ptr, s: tl.constexpr, BITS: tl.constexpr, LUT: tl.constexpr):
    """codebook[code] * norm (fp16) for slot s of the byte tile `lo` (and the 3-bit high plane `hi`)."""
    if BITS == 4:
        code = (lo >> (4 * s)) & 15
    else:
        code = (lo >> (2 * s)) & 3
        if BITS == 3:
            code = code | (((hi >> (hsh + s)) & 1) << 2)
    return (_lut(code, lev_ptr, 1 << BITS, LUT) * nrm).to(tl.float16)


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
    HAS_KVLEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    LUT: tl.constexpr,
):
    split = tl.program_id(0)
    bh = tl.program_id(1)
    mt = tl.program_id(2)
    b = bh // H
    h = bh % H
    SK: tl.constexpr = 2 if KBITS == 4 else 4
    SV: tl.constexpr = 2 if VBITS == 4 else 4
    KDK: tl.constexpr = D // SK
    KDV: tl.constexpr = D // SV
    CBK: tl.constexpr = D * KBITS // 8
    CBV: tl.constexpr = D * VBITS // 8
    rows = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rows < M
    r = rows // Tq
    tq = rows % Tq
    hq = h * REP + r
    qrow = q_ptr + b.to(tl.int64) * sqb + hq.to(tl.int64) * sqh + tq.to(tl.int64) * sqt
    jk = tl.arange(0, KDK)
    jv = tl.arange(0, KDV)
    q0 = _q_slot(qrow, sqd, m_ok, krot_ptr, kscale_ptr, h, jk, qk_scale, 0, SK, D, KRB, KNB, BLOCK_M)
    q1 = _q_slot(qrow, sqd, m_ok, krot_ptr, kscale_ptr, h, jk, qk_scale, 1, SK, D, KRB, KNB, BLOCK_M)
    if SK == 4:
        q2 = _q_slot(qrow, sqd, m_ok, krot_ptr, kscale_ptr, h, jk, qk_scale, 2, SK, D, KRB, KNB, BLOCK_M)
        q3 = _q_slot(qrow, sqd, m_ok, krot_ptr, kscale_ptr, h, jk, qk_scale, 3, SK, D, KRB, KNB, BLOCK_M)

    n_lo = split * span
    n_hi = tl.minimum(n_lo + span, Tk)
    if HAS_KVLEN:
        n_hi = tl.minimum(n_hi, tl.load(kvlen_ptr + b).to(tl.int32))

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_M, KDV], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, KDV], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, KDV], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_M, KDV], dtype=tl.float32)
    kbase = kc_ptr + bh.to(tl.int64) * Tk * CBK
    vbase = vc_ptr + bh.to(tl.int64) * Tk * CBV
    knb = kn_ptr + bh.to(tl.int64) * Tk * NGK
    vnb = vn_ptr + bh.to(tl.int64) * Tk * NGV
    mrow = mask_ptr + b.to(tl.int64) * smb + hq.to(tl.int64) * smh + tq.to(tl.int64) * smt
    hshk = 4 * (jk % 2)
    hshv = 4 * (jv % 2)
    for start in range(n_lo, n_hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < n_hi
        n64 = n.to(tl.int64)
        # ---- K tile, transposed: [D/S, BLOCK_N]
        kp = kbase + n64[None, :] * CBK
        klo = tl.load(kp + jk[:, None], mask=n_ok[None, :], other=0).to(tl.int32)
        khi = klo
        if KBITS == 3:
            khi = tl.load(kp + D // 4 + jk[:, None] // 2, mask=n_ok[None, :], other=0).to(tl.int32)
        if NGK == 1:
            nk = tl.load(knb + n64, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        else:
            nk = tl.load(knb + n64[None, :] * NGK + (jk // (KDK // NGK))[:, None], mask=n_ok[None, :], other=0.0).to(
                tl.float32
            )
        sc = tl.dot(q0, _slot_values(klo, khi, hshk[:, None], nk, klev_ptr, 0, KBITS, LUT))
        sc += tl.dot(q1, _slot_values(klo, khi, hshk[:, None], nk, klev_ptr, 1, KBITS, LUT))
        if SK == 4:
            sc += tl.dot(q2, _slot_values(klo, khi, hshk[:, None], nk, klev_ptr, 2, KBITS, LUT))
            sc += tl.dot(q3, _slot_values(klo, khi, hshk[:, None], nk, klev_ptr, 3, KBITS, LUT))
        sc = tl.where(n_ok[None, :], sc, float("-inf"))
        if MASK_KIND == 1:
            mv = tl.load(mrow[:, None] + n64[None, :] * smn, mask=m_ok[:, None] & n_ok[None, :], other=0)
            sc = tl.where(mv != 0, sc, float("-inf"))
        if MASK_KIND == 2:
            mv = tl.load(mrow[:, None] + n64[None, :] * smn, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            sc += mv.to(tl.float32) * 1.4426950408889634
        # ---- online softmax (base 2)
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(sc - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
        p16 = p.to(tl.float16)
        # ---- V tile: [BLOCK_N, D/S]
        vp = vbase + n64[:, None] * CBV
        vlo = tl.load(vp + jv[None, :], mask=n_ok[:, None], other=0).to(tl.int32)
        vhi = vlo
        if VBITS == 3:
            vhi = tl.load(vp + D // 4 + jv[None, :] // 2, mask=n_ok[:, None], other=0).to(tl.int32)
        if NGV == 1:
            nv = tl.load(vnb + n64, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        else:
            nv = tl.load(vnb + n64[:, None] * NGV + (jv // (KDV // NGV))[None, :], mask=n_ok[:, None], other=0.0).to(
                tl.float32
            )
        acc0 = acc0 * alpha[:, None] + tl.dot(p16, _slot_values(vlo, vhi, hshv[None, :], nv, vlev_ptr, 0, VBITS, LUT))
        acc1 = acc1 * alpha[:, None] + tl.dot(p16, _slot_values(vlo, vhi, hshv[None, :], nv, vlev_ptr, 1, VBITS, LUT))
        if SV == 4:
            acc2 = acc2 * alpha[:, None] + tl.dot(
                p16, _slot_values(vlo, vhi, hshv[None, :], nv, vlev_ptr, 2, VBITS, LUT)
            )
            acc3 = acc3 * alpha[:, None] + tl.dot(
                p16, _slot_values(vlo, vhi, hshv[None, :], nv, vlev_ptr, 3, VBITS, LUT)
            )

    pidx = (bh.to(tl.int64) * NS + split) * M + rows
    tl.store(pm_ptr + pidx, m_i, mask=m_ok)
    tl.store(pl_ptr + pidx, l_i, mask=m_ok)
    prow = pacc_ptr + pidx[:, None] * D
    tl.store(prow + (SV * jv + 0)[None, :], acc0, mask=m_ok[:, None])
    tl.store(prow + (SV * jv + 1)[None, :], acc1, mask=m_ok[:, None])
    if SV == 4:
        tl.store(prow + (SV * jv + 2)[None, :], acc2, mask=m_ok[:, None])
        tl.store(prow + (SV * jv + 3)[None, :], acc3, mask=m_ok[:, None])


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
    if not is_pow2(dim) or dim > 512 or q.shape[1] % k_codes.shape[1]:
        return False
    for bits, norms in ((k_bits, k_norms), (v_bits, v_norms)):
        slots = 2 if bits == 4 else 4
        if dim // slots < 16 or dim % norms.shape[-1] or (dim // norms.shape[-1]) % 8:
            return False
    return True


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
    wrap=lambda k: k,
    num_splits: int | None = None,
    block_n: int | None = None,
    lut: int | None = None,
    num_warps: int | None = None,
    split_waves: int | None = None,
):
    """rq::attention on the packed cache with Triton (see module docstring). kv_len: optional int [B]."""
    import torch

    block_n = DEFAULTS["block_n"] if block_n is None else block_n
    lut = DEFAULTS["lut"] if lut is None else lut
    num_warps = DEFAULTS["num_warps"] if num_warps is None else num_warps
    split_waves = DEFAULTS["split_waves"] if split_waves is None else split_waves
    batch, q_heads, q_len, dim = q.shape
    heads = k_codes.shape[1]
    tk = k_codes.shape[2]
    rep = q_heads // heads
    rows = rep * q_len
    block_m = 16 if rows <= 16 else (32 if rows <= 32 else 64)
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
        mask = attn_mask.expand(batch, q_heads, q_len, tk)
        if mask.dtype == torch.bool:
            mask_kind, mask = 1, mask.view(torch.uint8)
        else:
            mask_kind = 2
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
        k_codes.contiguous(),
        k_norms.contiguous(),
        v_codes.contiguous(),
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
        HAS_KVLEN=kv_len is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        LUT=lut,
        num_warps=num_warps,
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
