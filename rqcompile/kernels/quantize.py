"""Triton kernels for rq::quantize and rq::dequantize (docs/FORMAT.md), one pass over the K/V rows.

Quantize: per program a tile of `BLOCK_T` tokens of one (batch, KV head); per norm group: rotate (block-diagonal
b <= 4 as `b` gathered loads + FMAs; dense b == g, full mixing and the hadamard backend, as fp32 `tl.dot`s per
group), group norm, codes = number of decision boundaries exceeded (exactly the reference's rule), corrected norm,
bit packing. Three kernels: v1 (`_quantize_kernel`, every layout), v2 (slot tiles, below) and the decode step's rows
kernel (quantize_rows.py); `launch_quantize` picks one.
Dequantize: the inverse, used by the prefill path (dequantize + SDPA) and rq::dequantize on CUDA.

Calibrated bit allocation (a `perm` and per-coordinate widths): the same kernels, specialized on the layout string
(`LAYOUT`, see `common.layout_string`; "" for one width) and on `PERM`. The rotation reads its input channels in
`perm` order (gathered loads of x, mean and scale), each run of equal widths is coded against its own codebook and
packed as its own bit planes; norm groups and the scale search are over stored coordinates, as for one width.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from rqcompile.kernels.common import (
    channels,
    codebook_levels,
    dot_precision,
    layout_string,
    num_planes,
    num_runs,
    plane_shift,
    plane_width,
    row_bytes,
    run_byte,
    run_count,
    run_covers,
    run_level,
    run_overlaps,
    run_start,
    run_width,
    supported_dim,
)

TINY = tl.constexpr(1.1754943508222875e-38)  # torch.finfo(torch.float32).tiny, as the reference clamps with


@triton.jit
def _pack_store(code, out_row, t_ok, g, G: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, BLOCK_T: tl.constexpr):
    """Pack codes [BLOCK_T, G] of norm group `g` into the row's bytes (layout of docs/FORMAT.md)."""
    if BITS == 4:
        sh = tl.arange(0, 2) * 4
        byte = tl.sum(tl.reshape(code, [BLOCK_T, G // 2, 2]) << sh[None, None, :], axis=2)
        cols = g * (G // 2) + tl.arange(0, G // 2)
        tl.store(out_row + cols[None, :], byte.to(tl.uint8), mask=t_ok)
    else:
        sh = tl.arange(0, 4) * 2
        byte = tl.sum(tl.reshape(code & 3, [BLOCK_T, G // 4, 4]) << sh[None, None, :], axis=2)
        cols = g * (G // 4) + tl.arange(0, G // 4)
        tl.store(out_row + cols[None, :], byte.to(tl.uint8), mask=t_ok)
        if BITS == 3:
            sh8 = tl.arange(0, 8)
            hb = tl.sum(tl.reshape((code >> 2) & 1, [BLOCK_T, G // 8, 8]) << sh8[None, None, :], axis=2)
            cols8 = D // 4 + g * (G // 8) + tl.arange(0, G // 8)
            tl.store(out_row + cols8[None, :], hb.to(tl.uint8), mask=t_ok)


@triton.jit
def _codes(unit, lev_ptr, NL: tl.constexpr, BLOCK_T: tl.constexpr, G: tl.constexpr):
    """Code of each coordinate: how many decision boundaries (midpoints of adjacent levels) it exceeds."""
    code = tl.zeros([BLOCK_T, G], dtype=tl.int32)
    for k in tl.static_range(NL - 1):
        bnd = (tl.load(lev_ptr + k) + tl.load(lev_ptr + k + 1)) * 0.5
        code += (unit > bnd).to(tl.int32)
    return code


@triton.jit
def _lookup(code, lev_ptr, NL: tl.constexpr, LUT: tl.constexpr, BLOCK_T: tl.constexpr, G: tl.constexpr):
    """levels[code]: a gather, or (LUT) a chain of selects over the levels held in registers."""
    if LUT == 0:
        lv = tl.load(lev_ptr + code)
    else:
        lv = tl.zeros([BLOCK_T, G], dtype=tl.float32) + tl.load(lev_ptr)
        for k in tl.static_range(1, NL):
            lv = tl.where(code == k, tl.load(lev_ptr + k), lv)
    return lv


@triton.jit
def _run_codes(
    code, unit, lev_ptr, c, L: tl.constexpr, r: tl.constexpr, g: tl.constexpr, G: tl.constexpr, BLOCK_T: tl.constexpr
):
    """`code` with the columns of run r in norm group g replaced by their codes in the run's codebook."""
    if run_overlaps(L, r, g * G, g * G + G):
        code_r = _codes(unit, lev_ptr + run_level(L, r), 1 << run_width(L, r), BLOCK_T, G)
        if run_covers(L, r, g * G, g * G + G):
            code = code_r
        else:
            S: tl.constexpr = run_start(L, r)
            code = tl.where(((c >= S) & (c < S + run_count(L, r)))[None, :], code_r, code)
    return code


@triton.jit
def _layout_codes(unit, lev_ptr, c, L: tl.constexpr, g: tl.constexpr, G: tl.constexpr, BLOCK_T: tl.constexpr):
    """Codes of a norm group whose columns `c` belong to runs of different widths: each run's columns against
    the run's codebook (the compares run over the whole tile once per run present in the group)."""
    code = tl.zeros([BLOCK_T, G], dtype=tl.int32)
    for r in tl.static_range(num_runs(L)):
        code = _run_codes(code, unit, lev_ptr, c, L, r, g, G, BLOCK_T)
    return code


@triton.jit
def _run_offset(off, c, L: tl.constexpr, r: tl.constexpr):
    S: tl.constexpr = run_start(L, r)
    return tl.where((c >= S) & (c < S + run_count(L, r)), run_level(L, r), off)


@triton.jit
def _layout_offsets(c, L: tl.constexpr):
    """Offset in `levels` of the codebook of each column `c` (its run's)."""
    off = tl.zeros(c.shape, dtype=tl.int32)
    for r in tl.static_range(num_runs(L)):
        off = _run_offset(off, c, L, r)
    return off


@triton.jit
def _pack_plane(
    code, out_row, t_ok, g, G: tl.constexpr, S, N, B, W: tl.constexpr, p: tl.constexpr, BLOCK_T: tl.constexpr
):
    """Store bit plane p of the W-bit codes of group g that lie in the run [S, S+N) whose bytes start at row byte B:
    plane fields of PW bits, 8/PW codes per byte, low bits first; the run's planes follow each other."""
    PW: tl.constexpr = plane_width(W, p)
    SH: tl.constexpr = plane_shift(W, p)
    PER: tl.constexpr = 8 // PW
    sh = tl.arange(0, PER) * PW
    v = (code >> SH) & ((1 << PW) - 1)
    byte = tl.sum(tl.reshape(v, [BLOCK_T, G // PER, PER]) << sh[None, None, :], axis=2)
    col = g * G + tl.arange(0, G // PER) * PER
    ok = (col >= S) & (col < S + N)
    tl.store(out_row + B + N * SH // 8 + (col - S) // PER, byte.to(tl.uint8), mask=t_ok & ok[None, :])


@triton.jit
def _pack_run(code, out_row, t_ok, g, G: tl.constexpr, L: tl.constexpr, r: tl.constexpr, BLOCK_T: tl.constexpr):
    """Pack the part of run r that lies in norm group g, one bit plane at a time."""
    if run_overlaps(L, r, g * G, g * G + G):
        W: tl.constexpr = run_width(L, r)
        for p in tl.static_range(num_planes(W)):
            _pack_plane(code, out_row, t_ok, g, G, run_start(L, r), run_count(L, r), run_byte(L, r), W, p, BLOCK_T)


@triton.jit
def _pack_layout(code, out_row, t_ok, g, G: tl.constexpr, L: tl.constexpr, BLOCK_T: tl.constexpr):
    for r in tl.static_range(num_runs(L)):
        _pack_run(code, out_row, t_ok, g, G, L, r, BLOCK_T)


@triton.jit
def _rotate_dense(
    x_row,
    t_ok,
    sxd,
    rot_ptr,
    mean_ptr,
    scale_ptr,
    perm_ptr,
    h,
    g,
    D: tl.constexpr,
    G: tl.constexpr,
    NB: tl.constexpr,
    PERM: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """y [BLOCK_T, G] = u @ R_g^T for norm group g, u = (x - mean) / scale, over chunks of KC input coordinates (a
    whole [G, G] fp32 block in registers spilled: 255 registers + 1.3 KB of stack per thread at G = 128). tl.dot needs
    16 rows; a tile of fewer rows (a decode step's token) multiplies and sums in registers instead of padding the tile
    with empty rows."""
    KC: tl.constexpr = 32 if G > 32 else G
    ri = tl.arange(0, G)
    y = tl.zeros([BLOCK_T, G], dtype=tl.float32)
    for kc in tl.static_range(G // KC):
        kk = kc * KC + tl.arange(0, KC)
        chk = channels(perm_ptr, h, g * G + kk, g * G + kk < D, D, PERM)
        xv = tl.load(x_row + chk[None, :] * sxd, mask=t_ok, other=0.0).to(tl.float32)
        mu = tl.load(mean_ptr + h * D + chk)[None, :]
        u = tl.math.div_rn(xv - mu, tl.load(scale_ptr + h * D + chk)[None, :])
        if BLOCK_T >= 16:
            rt = tl.load(rot_ptr + ((h * NB + g) * G + ri[None, :]) * G + kk[:, None])  # R_g[i, k] at [k, i]
            y = tl.dot(u, rt, y, input_precision=DOT_PREC)
        else:
            r = tl.load(rot_ptr + ((h * NB + g) * G + ri[:, None]) * G + kk[None, :])  # R_g[i, k] at [i, k]
            y += tl.sum(u[:, None, :] * r[None, :, :], axis=2)
    return y


@triton.jit
def _rotate_blocks(
    x_row,
    t_ok,
    sxd,
    rot_ptr,
    mean_ptr,
    scale_ptr,
    perm_ptr,
    h,
    c,
    D: tl.constexpr,
    G: tl.constexpr,
    RB: tl.constexpr,
    NB: tl.constexpr,
    PERM: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """y [BLOCK_T, G] at the G rotated coordinates c of a block rotation (b <= 4), as RB gathered loads of the block's
    inputs (a block may straddle norm groups: rotor's b = 3)."""
    blk = c // RB
    ii = c % RB
    y = tl.zeros([BLOCK_T, G], dtype=tl.float32)
    for k in tl.static_range(RB):
        src = blk * RB + k
        sv = src < D
        chs = channels(perm_ptr, h, src, sv, D, PERM)
        xv = tl.load(x_row + chs[None, :] * sxd, mask=t_ok & sv[None, :], other=0.0).to(tl.float32)
        mu = tl.load(mean_ptr + h * D + chs, mask=sv, other=0.0)
        sc = tl.load(scale_ptr + h * D + chs, mask=sv, other=1.0)
        u = tl.where(sv[None, :], tl.math.div_rn(xv - mu[None, :], sc[None, :]), 0.0)
        coef = tl.load(rot_ptr + ((h * NB + blk) * RB + ii) * RB + k)
        y += coef[None, :] * u
    return y


@triton.jit
def _quantize_kernel(
    x_ptr,
    sxb,
    sxh,
    sxt,
    sxd,
    rot_ptr,
    mean_ptr,
    scale_ptr,
    lev_ptr,
    codes_ptr,
    norms_ptr,
    perm_ptr,
    H,
    T,
    D: tl.constexpr,
    G: tl.constexpr,
    NG: tl.constexpr,
    RB: tl.constexpr,
    NB: tl.constexpr,
    BITS: tl.constexpr,
    DENSE: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    LUT: tl.constexpr,
    RESHAPE: tl.constexpr,
    NA: tl.constexpr,
    PERM: tl.constexpr,
    LAYOUT: tl.constexpr,
):
    pid_t = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    if LAYOUT != "":
        CB: tl.constexpr = row_bytes(LAYOUT)
        NL: tl.constexpr = codebook_levels(LAYOUT)  # the scale candidates follow every run's codebook
    else:
        CB: tl.constexpr = D * BITS // 8
        NL: tl.constexpr = 1 << BITS
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = (t < T)[:, None]
    x_row = x_ptr + b.to(tl.int64) * sxb + h * sxh + t.to(tl.int64)[:, None] * sxt
    out_tok = bh.to(tl.int64) * T + t.to(tl.int64)
    for g in tl.static_range(NG):
        c = g * G + tl.arange(0, G)
        ch = channels(perm_ptr, h, c, c < D, D, PERM)  # input channels (c itself without a perm)
        if DENSE:
            y = _rotate_dense(
                x_row, t_ok, sxd, rot_ptr, mean_ptr, scale_ptr, perm_ptr, h, g, D, G, NB, PERM, DOT_PREC, BLOCK_T
            )
        elif RESHAPE:  # RB in (1, 2, 4): one contiguous load (a gather with a perm), rotate in registers
            xv = tl.load(x_row + ch[None, :] * sxd, mask=t_ok, other=0.0).to(tl.float32)
            u = tl.math.div_rn(xv - tl.load(mean_ptr + h * D + ch)[None, :], tl.load(scale_ptr + h * D + ch)[None, :])
            u3 = tl.reshape(u, [BLOCK_T, G // RB, RB])
            jb = g * (G // RB) + tl.arange(0, G // RB)
            ri = tl.arange(0, RB)
            r3 = tl.load(rot_ptr + ((h * NB + jb[:, None, None]) * RB + ri[None, :, None]) * RB + ri[None, None, :])
            y = tl.reshape(tl.sum(u3[:, :, None, :] * r3[None, :, :, :], axis=3), [BLOCK_T, G])
        else:
            y = _rotate_blocks(
                x_row, t_ok, sxd, rot_ptr, mean_ptr, scale_ptr, perm_ptr, h, c, D, G, RB, NB, PERM, BLOCK_T
            )
        n = tl.sqrt_rn(tl.sum(y * y, axis=1))
        unit = tl.where(n[:, None] > 0, tl.math.div_rn(y, tl.maximum(n, TINY)[:, None]), 0.0)
        if LAYOUT != "":
            off = _layout_offsets(c, LAYOUT)[None, :]  # each column's codebook in `levels`
        if NA == 0:
            if LAYOUT != "":
                code = _layout_codes(unit, lev_ptr, c, LAYOUT, g, G, BLOCK_T)
            else:
                code = _codes(unit, lev_ptr, NL, BLOCK_T, G)
        else:  # scale search: codes of unit / c for each candidate c, keep the largest cosine (first on ties)
            code = tl.zeros([BLOCK_T, G], dtype=tl.int32)
            best = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
            for a in tl.static_range(NA):
                scaled = tl.math.div_rn(unit, tl.load(lev_ptr + NL + a))
                if LAYOUT != "":
                    code_a = _layout_codes(scaled, lev_ptr, c, LAYOUT, g, G, BLOCK_T)
                    lv_a = tl.load(lev_ptr + off + code_a)
                else:
                    code_a = _codes(scaled, lev_ptr, NL, BLOCK_T, G)
                    lv_a = _lookup(code_a, lev_ptr, NL, LUT, BLOCK_T, G)
                cos = tl.math.div_rn(
                    tl.sum(unit * lv_a, axis=1), tl.maximum(tl.sqrt_rn(tl.sum(lv_a * lv_a, axis=1)), TINY)
                )
                better = cos > best
                code = tl.where(better[:, None], code_a, code)
                best = tl.where(better, cos, best)
        if LAYOUT != "":
            lv = tl.load(lev_ptr + off + code)
        else:
            lv = _lookup(code, lev_ptr, NL, LUT, BLOCK_T, G)
        cn = tl.sqrt_rn(tl.sum(lv * lv, axis=1))
        corrected = tl.math.div_rn(n, tl.maximum(cn, TINY))
        tl.store(norms_ptr + out_tok * NG + g, corrected.to(tl.float16), mask=t < T)
        if LAYOUT != "":
            _pack_layout(code, codes_ptr + out_tok[:, None] * CB, t_ok, g, G, LAYOUT, BLOCK_T)
        else:
            _pack_store(code, codes_ptr + out_tok[:, None] * CB, t_ok, g, G, D, BITS, BLOCK_T)


# -------------------------------------------------------------- variant "v2" (uniform widths, block or dense rotations)
#
# The norm group is held as P "slot" tiles [BLOCK_T, G/P]: slot s holds the coordinates P*j + s of the group, so
# the codes of one stored word (P = 16 codes of 2 bits in an int32, 16 bits of the 1-bit plane in an int16, 8
# codes of 4 bits in an int32) sit in the same thread at the same position of the P tiles and pack with shifts and
# ORs (no reshape, no shared memory). Row sums are elementwise adds across the tiles plus one reduction of G/P.
# The scale search compares `unit` against per-candidate thresholds, exact: the smallest float t with
# div_rn(t, c) > b (division by c > 0 is monotone), so `unit >= t` is the reference's `unit / c > b` without a
# division per element. _v2_prep_kernel computes them once per launch as vectors into a scratch tensor (an
# unrolled per-program prologue cost ~50 instructions per element and minutes of compile time), with 1 / scale per
# channel for the remaining divisions (_div_rcp: a reciprocal and one FMA correction, still the IEEE quotient).
# A dense per-group rotation (full mixing, hadamard) is v1's tf32x3 `tl.dot`, its output split into the slot tiles
# (_dense_slots); the default for dense bulk writes since session 17 (DEFAULTS["quantize_variant_dense"]).


@triton.jit
def _float_up(f):
    """The next float above f (scalar; -0.0 and +0.0 go to the smallest positive subnormal)."""
    i = f.to(tl.int32, bitcast=True)
    i = tl.where(f == 0.0, 1, tl.where(i >= 0, i + 1, i - 1))
    return i.to(tl.float32, bitcast=True)


@triton.jit
def _threshold(b, c):
    """The smallest float t with div_rn(t, c) > b, for c > 0: div_rn(u, c) > b <=> u >= t (+inf if none). Bisection
    over the floats in order (int32 keys: the bits for t >= 0, minus the bits of -t below), 32 steps of a runtime
    loop: exact for every b, c (a walk from b * c needs up to c / 2 steps when b = 0 and t is subnormal), with
    one div_rn in the code. Elementwise: call it on vectors (_v2_prep_kernel)."""
    lo = tl.zeros(b.shape, dtype=tl.int32) - 0x7F800000  # key of -inf: never above b
    hi = tl.zeros(b.shape, dtype=tl.int32) + 0x7F800000  # key of +inf: above every finite b
    for _ in range(32):
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without int32 overflow
        t = tl.where(mid >= 0, mid, -mid).to(tl.float32, bitcast=True)
        t = tl.where(mid >= 0, t, -t)
        above = tl.math.div_rn(t, c) > b
        hi = tl.where(above, mid, hi)
        lo = tl.where(above, lo, mid)
    t = tl.where(hi >= 0, hi, -hi).to(tl.float32, bitcast=True)
    return tl.where(hi >= 0, t, -t)


@triton.jit
def _v2_prep_kernel(
    lev_ptr,
    scale_ptr,
    thr_ptr,
    rs_ptr,
    HD,
    NL: tl.constexpr,
    NA: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Per launch, for the v2 kernel (the parameters stay on the device: no host sync): rs = div_rn(1, scale) per
    channel (for _div_rcp; the programs split them) and, in program 0, thr[a * NL + k] = _threshold(boundary k,
    candidate a) for a < NA, k < NL - 1 (k = NL - 1 is padding)."""
    pid = tl.program_id(0)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    tl.store(rs_ptr + r, tl.math.div_rn(1.0, tl.load(scale_ptr + r, mask=r < HD, other=1.0)), mask=r < HD)
    if NA > 0:
        if pid == 0:
            i = tl.arange(0, BLOCK)
            a = i // NL
            k = i % NL
            ok = (a < NA) & (k < NL - 1)
            bnd = (tl.load(lev_ptr + k, mask=ok, other=0.0) + tl.load(lev_ptr + k + 1, mask=ok, other=0.0)) * 0.5
            tl.store(thr_ptr + i, _threshold(bnd, tl.load(lev_ptr + NL + a, mask=ok, other=1.0)), mask=ok)


@triton.jit
def _div_rcp(a, b, r, FMA_DIV: tl.constexpr):
    """div_rn(a, b) given r = div_rn(1, b), in 3 instructions instead of ~10: q = a r, then q + (a - b q) r with the
    residual exact by FMA. With r the correctly rounded reciprocal one correction gives the correctly rounded
    quotient (Markstein; 1.4e8 random/adversarial pairs checked) while nothing leaves the normal range: |a| >= 2^-100
    or a == 0, |a / b| < 2^126, b <= 2^125. FMA_DIV=False (an interpreter whose fma rounds twice): plain div_rn."""
    if FMA_DIV:
        q = a * r
        return tl.fma(-tl.fma(b, q, -a), r, q)  # the residual as -(b q - a): keeps the sign of a zero quotient
    else:
        return tl.math.div_rn(a, b)


@triton.jit
def _slot_level(u, lev, thr, NL: tl.constexpr):
    """levels[code] for the code of `u` against ascending thresholds `thr` (tuples of the levels and thresholds;
    code = thresholds reached)."""
    lv = tl.zeros(u.shape, dtype=tl.float32) + lev[0]
    for k in tl.static_range(NL - 1):
        lv = tl.where(u >= thr[k], lev[k + 1], lv)
    return lv


@triton.jit
def _block_slots(
    x_row,
    t_ok,
    sxd,
    rot_ptr,
    mean_ptr,
    scale_ptr,
    rs_ptr,
    h,
    g,
    jj,
    D: tl.constexpr,
    G: tl.constexpr,
    RB: tl.constexpr,
    NB: tl.constexpr,
    P: tl.constexpr,
    J: tl.constexpr,
    FMA_DIV: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """A block rotation (b <= 4) into v2's slot tiles, as `_dense_slots` returns them: u per slot (x, mean, scale of
    each slot), then each slot's rotated coordinate from the b slots of its block; blocks that straddle slots (rotor,
    b = 3) gather their inputs instead."""
    us = ()
    if P % RB == 0:
        for s in tl.static_range(P):
            col = g * G + jj * P + s
            xv = tl.load(x_row + col[None, :] * sxd, mask=t_ok, other=0.0).to(tl.float32)
            mu = tl.load(mean_ptr + h * D + col)
            sc = tl.load(scale_ptr + h * D + col)
            rs = tl.load(rs_ptr + h * D + col)
            us = us + (_div_rcp(xv - mu[None, :], sc[None, :], rs[None, :], FMA_DIV),)
    ys = ()
    ss = tl.zeros([BLOCK_T, J], dtype=tl.float32)
    for s in tl.static_range(P):
        col = g * G + jj * P + s
        blk = col // RB
        y = tl.zeros([BLOCK_T, J], dtype=tl.float32)
        for k in tl.static_range(RB):
            if P % RB == 0:
                coef = tl.load(rot_ptr + ((h * NB + blk) * RB + s % RB) * RB + k)
                y += coef[None, :] * us[s - s % RB + k]
            else:  # blocks straddle slots (rotor, b = 3): gathered loads of the block's inputs
                coef = tl.load(rot_ptr + ((h * NB + blk) * RB + col % RB) * RB + k)
                src = blk * RB + k
                sv = src < D
                xv = tl.load(x_row + src[None, :] * sxd, mask=t_ok & sv[None, :], other=0.0).to(tl.float32)
                mu = tl.load(mean_ptr + h * D + src, mask=sv, other=0.0)
                sc = tl.load(scale_ptr + h * D + src, mask=sv, other=1.0)
                rs = tl.load(rs_ptr + h * D + src, mask=sv, other=1.0)
                u = _div_rcp(xv - mu[None, :], sc[None, :], rs[None, :], FMA_DIV)
                y += coef[None, :] * tl.where(sv[None, :], u, 0.0)
        ys = ys + (y,)
        ss += y * y
    return ys, ss


@triton.jit
def _dense_slots(
    x_row,
    t_ok,
    sxd,
    rot_ptr,
    mean_ptr,
    scale_ptr,
    h,
    g,
    D: tl.constexpr,
    G: tl.constexpr,
    NB: tl.constexpr,
    P: tl.constexpr,
    J: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """The dense rotation (full mixing, hadamard: one [G, G] block per norm group) into v2's slot tiles: a tuple of P
    [BLOCK_T, J] tiles (slot s holds rotated coordinates j * P + s) and the group's squared norm per (row, word).
    The group is rotated as v1 rotates it (`_rotate_dense`, tl.dot over chunks of the input), then its [BLOCK_T, J, P]
    columns are split into slots, one bit of s per `tl.split`."""
    y = _rotate_dense(
        x_row, t_ok, sxd, rot_ptr, mean_ptr, scale_ptr, mean_ptr, h, g, D, G, NB, False, DOT_PREC, BLOCK_T
    )  # perm_ptr unused (PERM=False)
    LOG2P: tl.constexpr = 4 if P == 16 else 3
    if P == 16:
        parts = (tl.reshape(y, [BLOCK_T, J, 2, 2, 2, 2]),)
    else:
        parts = (tl.reshape(y, [BLOCK_T, J, 2, 2, 2]),)
    for level in tl.static_range(LOG2P):  # split the lowest bit of s left: all the 0 halves, then all the 1 halves
        zeros = ()
        ones = ()
        for i in tl.static_range(1 << level):
            lo, hi = tl.split(parts[i])
            zeros = zeros + (lo,)
            ones = ones + (hi,)
        parts = zeros + ones  # parts[s]: the bits of s split so far
    ss = tl.zeros([BLOCK_T, J], dtype=tl.float32)
    for s in tl.static_range(P):
        ss += parts[s] * parts[s]
    return parts, ss


@triton.jit
def _quantize_v2_kernel(
    x_ptr,
    sxb,
    sxh,
    sxt,
    sxd,
    rot_ptr,
    mean_ptr,
    scale_ptr,
    lev_ptr,
    thr_ptr,
    rs_ptr,
    codes_ptr,
    norms_ptr,
    H,
    T,
    D: tl.constexpr,
    G: tl.constexpr,
    NG: tl.constexpr,
    RB: tl.constexpr,
    NB: tl.constexpr,
    BITS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    NA: tl.constexpr,
    FMA_DIV: tl.constexpr,
    DOT_PREC: tl.constexpr = "ieee",
):
    pid_t = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    CB: tl.constexpr = D * BITS // 8
    NL: tl.constexpr = 1 << BITS
    P: tl.constexpr = 8 if BITS == 4 else 16  # codes per stored word (slots)
    J: tl.constexpr = G // P
    LB: tl.constexpr = 2 if BITS == 3 else BITS  # width of the first plane
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = (t < T)[:, None]
    x_row = x_ptr + b.to(tl.int64) * sxb + h * sxh + t.to(tl.int64)[:, None] * sxt
    out_tok = bh.to(tl.int64) * T + t.to(tl.int64)
    crow = codes_ptr + out_tok[:, None] * CB
    jj = tl.arange(0, J)
    # the levels, and the thresholds of the plain codes (u > b <=> u >= the next float above b)
    lev = ()
    for k in tl.static_range(NL):
        lev = lev + (tl.load(lev_ptr + k),)
    thr = ()
    if NA == 0:
        for k in tl.static_range(NL - 1):
            thr = thr + (_float_up((lev[k] + lev[k + 1]) * 0.5),)
    for g in tl.static_range(NG):
        # the group rotated into slot tiles, and its squared norm per (row, word)
        if RB == G:
            ys, ss = _dense_slots(
                x_row, t_ok, sxd, rot_ptr, mean_ptr, scale_ptr, h, g, D, G, NB, P, J, DOT_PREC, BLOCK_T
            )
        else:
            ys, ss = _block_slots(
                x_row, t_ok, sxd, rot_ptr, mean_ptr, scale_ptr, rs_ptr, h, g, jj, D, G, RB, NB, P, J, FMA_DIV, BLOCK_T
            )
        n = tl.sqrt_rn(tl.sum(ss, axis=1))
        inv_ok = n[:, None] > 0
        nd = tl.maximum(n, TINY)[:, None]
        rn = tl.math.div_rn(1.0, nd)  # one division per row; the coordinates' by _div_rcp
        units = ()
        for s in tl.static_range(P):
            units = units + (tl.where(inv_ok, _div_rcp(ys[s], nd, rn, FMA_DIV), 0.0),)
        # the codes' thresholds per row (the kept candidate's) and the squared length of their reconstruction
        if NA == 0:
            row_thr = thr
            den = tl.zeros([BLOCK_T, J], dtype=tl.float32)
            for s in tl.static_range(P):
                lv = _slot_level(units[s], lev, thr, NL)
                den += lv * lv
            cn2 = tl.sum(den, axis=1)
        else:  # scale search: largest cosine <unit, L[codes]> / ||L[codes]||, the first candidate on ties
            best = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
            cn2 = tl.zeros([BLOCK_T], dtype=tl.float32)
            kept = tl.zeros([BLOCK_T], dtype=tl.int32)
            for a in range(NA):  # a runtime loop: one copy of the body (compile time, code size)
                ta = ()
                for k in tl.static_range(NL - 1):
                    ta = ta + (tl.load(thr_ptr + a * NL + k),)
                num = tl.zeros([BLOCK_T, J], dtype=tl.float32)
                den = tl.zeros([BLOCK_T, J], dtype=tl.float32)
                for s in tl.static_range(P):
                    lv = _slot_level(units[s], lev, ta, NL)
                    num += units[s] * lv
                    den += lv * lv
                den_a = tl.sum(den, axis=1)
                cos = tl.math.div_rn(tl.sum(num, axis=1), tl.maximum(tl.sqrt_rn(den_a), TINY))
                better = cos > best
                best = tl.where(better, cos, best)
                cn2 = tl.where(better, den_a, cn2)
                kept = tl.where(better, a, kept)
            row_thr = ()
            for k in tl.static_range(NL - 1):
                row_thr = row_thr + (tl.load(thr_ptr + kept * NL + k),)
        corrected = tl.math.div_rn(n, tl.maximum(tl.sqrt_rn(cn2), TINY))
        tl.store(norms_ptr + out_tok * NG + g, corrected.to(tl.float16), mask=t < T)
        # codes against the row's thresholds, packed per stored word
        lo = tl.zeros([BLOCK_T, J], dtype=tl.int32)
        hi = tl.zeros([BLOCK_T, J], dtype=tl.int32)
        for s in tl.static_range(P):
            code = tl.zeros([BLOCK_T, J], dtype=tl.int32)
            for k in tl.static_range(NL - 1):
                if NA == 0:
                    code += (units[s] >= row_thr[k]).to(tl.int32)
                else:
                    code += (units[s] >= row_thr[k][:, None]).to(tl.int32)
            if BITS == 4:
                lo |= code << (4 * s)
            else:
                lo |= (code & 3) << (2 * s)
                if BITS == 3:
                    hi |= (code >> 2) << s
        wl = crow + g * (G * LB // 8) + jj[None, :] * 4
        tl.store(wl.to(tl.pointer_type(tl.int32)), lo, mask=t_ok)
        if BITS == 3:
            wh = crow + D // 4 + g * (G // 8) + jj[None, :] * 2
            tl.store(wh.to(tl.pointer_type(tl.int16)), hi.to(tl.int16), mask=t_ok)


@triton.jit
def _load_codes(row_ptr, idx, mask, BITS: tl.constexpr, D: tl.constexpr):
    """Codes of elements `idx` (any shape) of packed rows `row_ptr` (same shape), per docs/FORMAT.md."""
    if BITS == 4:
        byte = tl.load(row_ptr + idx // 2, mask=mask, other=0).to(tl.int32)
        code = (byte >> ((idx % 2) * 4)) & 15
    else:
        byte = tl.load(row_ptr + idx // 4, mask=mask, other=0).to(tl.int32)
        code = (byte >> ((idx % 4) * 2)) & 3
        if BITS == 3:
            hb = tl.load(row_ptr + D // 4 + idx // 8, mask=mask, other=0).to(tl.int32)
            code = code | (((hb >> (idx % 8)) & 1) << 2)
    return code


@triton.jit
def _plane_load(row_ptr, i, mask, B, N, W: tl.constexpr, p: tl.constexpr):
    """Plane p's share of the W-bit codes of run elements `i` (0 <= i < N; the run's bytes start at row byte B)."""
    PW: tl.constexpr = plane_width(W, p)
    SH: tl.constexpr = plane_shift(W, p)
    PER: tl.constexpr = 8 // PW
    byte = tl.load(row_ptr + B + N * SH // 8 + i // PER, mask=mask, other=0).to(tl.int32)
    return ((byte >> ((i % PER) * PW)) & ((1 << PW) - 1)) << SH


@triton.jit
def _run_load(lidx, row_ptr, idx, mask, L: tl.constexpr, r: tl.constexpr):
    """`lidx` with the elements of run r replaced by their index in `levels` (codebook offset + code)."""
    W: tl.constexpr = run_width(L, r)
    S: tl.constexpr = run_start(L, r)
    N: tl.constexpr = run_count(L, r)
    inr = (idx >= S) & (idx < S + N)
    i = tl.where(inr, idx - S, 0)
    m = mask & inr
    code = _plane_load(row_ptr, i, m, run_byte(L, r), N, W, 0)
    for p in tl.static_range(1, num_planes(W)):
        code = code | _plane_load(row_ptr, i, m, run_byte(L, r), N, W, p)
    return tl.where(inr, run_level(L, r) + code, lidx)


@triton.jit
def _layout_load(row_ptr, idx, mask, L: tl.constexpr, BLOCK_T: tl.constexpr, G: tl.constexpr):
    """Index in `levels` of elements `idx` of packed rows `row_ptr` ([BLOCK_T, G] after broadcasting) under a
    layout of runs: the run's codebook offset plus the code, read plane by plane."""
    lidx = tl.zeros([BLOCK_T, G], dtype=tl.int32)
    for r in tl.static_range(num_runs(L)):
        lidx = _run_load(lidx, row_ptr, idx, mask, L, r)
    return lidx


@triton.jit
def _dequantize_kernel(
    codes_ptr,
    norms_ptr,
    rot_ptr,
    mean_ptr,
    scale_ptr,
    lev_ptr,
    out_ptr,
    perm_ptr,
    H,
    T,
    D: tl.constexpr,
    G: tl.constexpr,
    NG: tl.constexpr,
    RB: tl.constexpr,
    NB: tl.constexpr,
    BITS: tl.constexpr,
    DENSE: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    PERM: tl.constexpr,
    LAYOUT: tl.constexpr,
):
    pid_t = tl.program_id(0)
    bh = tl.program_id(1)
    h = bh % H
    if LAYOUT != "":
        CB: tl.constexpr = row_bytes(LAYOUT)
    else:
        CB: tl.constexpr = D * BITS // 8
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = (t < T)[:, None]
    tok = bh.to(tl.int64) * T + t.to(tl.int64)
    crow = codes_ptr + tok[:, None] * CB
    KC: tl.constexpr = 32 if G > 32 else G  # dense rotation: stored coordinates per tl.dot
    for g in tl.static_range(NG):
        c = g * G + tl.arange(0, G)
        if DENSE:  # u[k] = sum_i R[i, k] y[i] over chunks of KC stored coordinates i (see the quantize kernel)
            nrm = tl.load(norms_ptr + tok * NG + g, mask=t < T, other=0.0).to(tl.float32)
            rk = tl.arange(0, G)
            u = tl.zeros([BLOCK_T, G], dtype=tl.float32)
            for kc in tl.static_range(G // KC):
                ci = g * G + kc * KC + tl.arange(0, KC)
                if LAYOUT != "":
                    code = _layout_load(crow, ci[None, :], t_ok, LAYOUT, BLOCK_T, KC)  # an index into `levels`
                else:
                    code = _load_codes(crow, ci[None, :], t_ok, BITS, D)
                y = tl.load(lev_ptr + code) * nrm[:, None]
                ii = kc * KC + tl.arange(0, KC)
                r = tl.load(rot_ptr + ((h * NB + g) * G + ii[:, None]) * G + rk[None, :])  # R_g[i, k], i in the chunk
                u = tl.dot(y, r, u, input_precision=DOT_PREC)
        else:
            blk = c // RB
            kk = c % RB
            u = tl.zeros([BLOCK_T, G], dtype=tl.float32)
            for i in tl.static_range(RB):
                src = blk * RB + i
                sv = src < D
                m2 = t_ok & sv[None, :]
                if LAYOUT != "":
                    code = _layout_load(crow, src[None, :], m2, LAYOUT, BLOCK_T, G)
                else:
                    code = _load_codes(crow, src[None, :], m2, BITS, D)
                nrm = tl.load(norms_ptr + tok[:, None] * NG + (src // G)[None, :], mask=m2, other=0.0)
                y = tl.where(m2, tl.load(lev_ptr + code) * nrm.to(tl.float32), 0.0)
                coef = tl.load(rot_ptr + ((h * NB + blk) * RB + i) * RB + kk)
                u += coef[None, :] * y
        ch = channels(perm_ptr, h, c, c < D, D, PERM)  # the output channel of stored coordinate c
        out = u * tl.load(scale_ptr + h * D + ch)[None, :] + tl.load(mean_ptr + h * D + ch)[None, :]
        tl.store(out_ptr + tok[:, None] * D + ch[None, :], out.to(out_ptr.dtype.element_ty), mask=t_ok)


# launch defaults (tuned on the device, see benchmarks/NOTES.md)
DEFAULTS = {"block_t": 8, "block_t_dense": 64, "lut": 0, "num_warps": 4, "reshape": True}
# `launch_quantize(variant=...)` default, and the "v2" kernel's launch: `v2_tile` elements per slot tile
# ([BLOCK_T, G/P], BLOCK_T = v2_tile // (G/P)), `v2_num_warps` warps. "v1" until v2 is timed on the device.
DEFAULTS.update({"quantize_variant": "v1", "v2_tile": 128, "v2_num_warps": 4})
# A dense per-group rotation (full mixing, the default config's; hadamard) takes v2 where it applies: on the H200
# (session 17, benchmarks/quantize_dense_sweep.py) a [1, 4, 65536, 256] bf16 write in 1.55 ms against v1's 3.23 ms,
# codes off the fp32 reference's in 1.5e-5 of bytes against v1's 1.7e-5 (both sum the rotation in tf32x3 dots).
DEFAULTS["quantize_variant_dense"] = "v2"
# ... with 512-element slot tiles (64 rows at g = 128, 3 bits), at most 64 rows: 1.19 ms against 1.55 at 128
# elements on the same write (session 17); codes equal to the 128-element tile's but for float ties (session 18,
# benchmarks/quantize_tile_check.py --same-as 128).
DEFAULTS["v2_tile_dense"] = 512
# Calls of at most this many tokens (a decode step's) take the "rows" kernel (quantize_rows.py) where it applies.
# H200 (session 13, benchmarks/quantize_decode.py): rows 5.6-6.4 us vs the tiled kernel's 16.5-86 us at 1-4 tokens
# (dense rotation), 5.9 / 14.4 us vs 50 / 51 us at 16 tokens and batch 1 / 8.
DEFAULTS["rows_max_tokens"] = 16


def _block_t(dim: int, dense: bool, tokens: int | None = None) -> int:
    """Rows per program, shrunk to the rows there are: a decode step quantizes one token per head, and a program's
    time is a long per-thread chain, so the tile's empty rows cost as much as full ones. Measured on the H200 (session
    7 profile, BENCHMARKS.md): 0.3 ms per single-token call with the dense rotation's 64-row tile, 0.045 ms with the
    block rotations' 8 rows. Built for sm_90 (Triton 3.6), a 1-row tile has fewer instructions per program: block
    2,085 vs 7,380; dense (rotated without tl.dot, which needs 16 rows) 5,714 vs 16,480 at 16 rows and 49,321 at 64.
    Dense tiles of 2-15 rows gain nothing over 16 (16,239 at 4), so they take 16. Timed on the H200 (session 8): one
    token 8 us (block), 16 us (dense). A symbolic length (dynamic prefill) keeps the default: one specialization for
    all lengths."""
    default = DEFAULTS["block_t_dense"] if dense else DEFAULTS["block_t"]
    if not isinstance(tokens, int):
        return default
    if dense and tokens > 1:
        return min(default, max(16, triton.next_power_of_2(tokens)))
    return min(default, triton.next_power_of_2(tokens))


def kernel_layout(bits: int, widths, dim: int) -> str:
    """The `LAYOUT` constexpr: "" where the single-width code paths apply (one width in 2..4), else the layout's
    string (a single run for other uniform widths)."""
    if widths is None:
        widths = (bits,) * dim
    widths = tuple(int(w) for w in widths)
    if len(set(widths)) == 1 and widths[0] in (2, 3, 4):
        return ""
    return layout_string(widths)


def _layout_ok(widths, dim: int, levels=None) -> bool:
    """A layout the kernels can read: valid runs over `dim` coordinates (and enough levels for their codebooks)."""
    from rqcompile.quant.packing import runs
    from rqcompile.quant.quantizer import codebook_size

    if widths is None:
        return True
    widths = tuple(int(w) for w in widths)
    try:
        runs(widths)
    except ValueError:
        return False
    return len(widths) == dim and (levels is None or levels.numel() >= codebook_size(widths))


def quantize_supported(x, rotation, bits: int, group: int, widths=None, levels=None) -> bool:
    dim = x.shape[-1]
    rb = rotation.shape[-1]
    return (
        supported_dim(dim)
        and group >= 8
        and dim % group == 0
        and (group & (group - 1)) == 0
        and (rb <= 4 or (rb == group and rotation.shape[1] == dim // group))
        and _layout_ok(widths, dim, levels)
    )


def _fma_exact() -> bool:
    """Whether tl.fma rounds once here: on the device, and in interpreters that emulate it (Triton 3.8's computes
    x * y + z, so v2 keeps div_rn there)."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return True
    from triton._C.libtriton import interpreter

    return hasattr(interpreter, "fma_fp32")


def v2_applies(dim: int, rb: int, bits: int, group: int, layout: str = "", perm=None) -> bool:
    """Whether the "v2" quantize kernel covers this call: one width in 2..4, a block rotation (b <= 4) or a dense
    one per norm group (b = g >= 64: full mixing, hadamard), no perm, and at least one stored word per norm group
    (P = 16 codes for 2/3 bits, 8 for 4 bits); else v1 runs."""
    slots = 8 if bits == 4 else 16
    rotation_ok = rb <= 4 or (rb == group and group >= 64 and group & (group - 1) == 0)
    return layout == "" and perm is None and rotation_ok and group % slots == 0 and dim % group == 0


def launch_quantize(
    x, rotation, mean, scale, levels, bits: int, group: int, wrap=lambda k: k, perm=None, widths=None, variant=None
):
    """(codes uint8 [B, H, T, bytes], norms fp16 [B, H, T, d/group]) from x [B, H, T, d] (any strides).

    `widths` (one per stored coordinate) replaces `bits`, and `perm` [H, d] is the channel order the rotation
    reads (calibrated bit allocation). `variant`: "v1", "v2" or "rows" (None: "rows" for a call of at most
    `DEFAULTS["rows_max_tokens"]` tokens, else `DEFAULTS["quantize_variant_dense"]` for a dense rotation and
    `DEFAULTS["quantize_variant"]` for blocks); "v2" and "rows" run only where
    `v2_applies` / `rows_apply` say, other calls take v1. All write the same codes and norms (up to float ties)."""
    import torch

    batch, heads, tokens, dim = x.shape
    rb = rotation.shape[-1]
    nb = rotation.shape[1]
    dense = rb > 4
    layout = kernel_layout(bits, widths, dim)
    code_bytes = row_bytes(layout) if layout else dim * bits // 8
    codebook = codebook_levels(layout) if layout else 2**bits
    codes = torch.empty((batch, heads, tokens, code_bytes), dtype=torch.uint8, device=x.device)
    norms = torch.empty((batch, heads, tokens, dim // group), dtype=torch.float16, device=x.device)
    if batch * heads * tokens == 0:
        return codes, norms
    if variant is None:
        few = isinstance(tokens, int) and tokens <= DEFAULTS["rows_max_tokens"]
        variant = "rows" if few else DEFAULTS["quantize_variant_dense" if dense else "quantize_variant"]
    if variant not in ("v1", "v2", "rows"):
        raise ValueError(f"unknown quantize variant {variant!r}")
    if variant == "rows":
        from rqcompile.kernels.quantize_rows import launch_quantize_rows, rows_apply

        if rows_apply(dim, rb, bits, group, layout, perm):
            launch_quantize_rows(x, rotation, mean, scale, levels, bits, group, codes, norms, wrap)
            return codes, norms
    if variant == "v2" and v2_applies(dim, rb, bits, group, layout, perm):
        slots = 8 if bits == 4 else 16
        bt = max(1, DEFAULTS["v2_tile_dense" if dense else "v2_tile"] // (group // slots))
        if dense:
            bt = min(max(bt, 16), 64)  # the rotation's tl.dot needs 16 rows; more than 64 was never measured
        levels = levels.contiguous()
        na = levels.numel() - codebook
        scale = scale.contiguous()
        thr = torch.empty(max(na, 1) * codebook, dtype=torch.float32, device=x.device)
        rs = torch.empty(heads * dim, dtype=torch.float32, device=x.device)
        wrap(_v2_prep_kernel)[(triton.cdiv(heads * dim, 1024),)](
            levels,
            scale,
            thr,
            rs,
            heads * dim,
            NL=codebook,
            NA=na,
            BLOCK=triton.next_power_of_2(max(na, 1) * codebook),
            BLOCK_R=1024,
        )
        grid = (triton.cdiv(tokens, bt), batch * heads)
        wrap(_quantize_v2_kernel)[grid](
            x,
            x.stride(0),
            x.stride(1),
            x.stride(2),
            x.stride(3),
            rotation.contiguous(),
            mean.contiguous(),
            scale,
            levels,
            thr,
            rs,
            codes,
            norms,
            heads,
            tokens,
            D=dim,
            G=group,
            NG=dim // group,
            RB=rb,
            NB=nb,
            BITS=bits,
            BLOCK_T=bt,
            NA=na,
            FMA_DIV=_fma_exact(),
            DOT_PREC=dot_precision(),
            num_warps=DEFAULTS["v2_num_warps"],
        )
        return codes, norms
    bt = _block_t(dim, dense, tokens)
    grid = (triton.cdiv(tokens, bt), batch * heads)
    wrap(_quantize_kernel)[grid](
        x,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        x.stride(3),
        rotation.contiguous(),
        mean.contiguous(),
        scale.contiguous(),
        levels.contiguous(),
        codes,
        norms,
        mean if perm is None else perm.contiguous(),
        heads,
        tokens,
        D=dim,
        G=group,
        NG=dim // group,
        RB=rb,
        NB=nb,
        BITS=bits,
        DENSE=dense,
        DOT_PREC=dot_precision(),
        BLOCK_T=bt,
        LUT=DEFAULTS["lut"],
        RESHAPE=DEFAULTS["reshape"] and rb in (1, 2, 4),
        NA=levels.numel() - codebook,
        PERM=perm is not None,
        LAYOUT=layout,
        num_warps=DEFAULTS["num_warps"],
    )
    return codes, norms


def launch_dequantize(
    codes,
    norms,
    rotation,
    mean,
    scale,
    levels,
    bits: int,
    head_dim: int,
    dtype,
    wrap=lambda k: k,
    perm=None,
    widths=None,
):
    """Reconstructed x [B, H, T, head_dim] in `dtype` from packed codes and norms; `perm` / `widths` as for
    `launch_quantize`."""
    import torch

    batch, heads, tokens, _ = codes.shape
    group = head_dim // norms.shape[-1]
    rb = rotation.shape[-1]
    dense = rb > 4
    out = torch.empty((batch, heads, tokens, head_dim), dtype=dtype, device=codes.device)
    if batch * heads * tokens == 0:
        return out
    bt = _block_t(head_dim, dense)
    grid = (triton.cdiv(tokens, bt), batch * heads)
    wrap(_dequantize_kernel)[grid](
        codes.contiguous(),
        norms.contiguous(),
        rotation.contiguous(),
        mean.contiguous(),
        scale.contiguous(),
        levels.contiguous(),
        out,
        mean if perm is None else perm.contiguous(),
        heads,
        tokens,
        D=head_dim,
        G=group,
        NG=head_dim // group,
        RB=rb,
        NB=rotation.shape[1],
        BITS=bits,
        DENSE=dense,
        DOT_PREC=dot_precision(),
        BLOCK_T=bt,
        PERM=perm is not None,
        LAYOUT=kernel_layout(bits, widths, head_dim),
        num_warps=4,
    )
    return out


def dequantize_supported(norms, rotation, head_dim: int, widths=None, levels=None) -> bool:
    group = head_dim // norms.shape[-1]
    rb = rotation.shape[-1]
    return (
        supported_dim(head_dim)
        and group >= 8
        and (group & (group - 1)) == 0
        and (rb <= 4 or rb == group)
        and _layout_ok(widths, head_dim, levels)
    )
