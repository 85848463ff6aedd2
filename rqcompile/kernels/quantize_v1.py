"""The v1 quantize kernel (`_quantize_kernel`, every layout) and the pieces the other quantize kernels share.

Per program a tile of `BLOCK_T` tokens of one (batch, KV head); per norm group: rotate (block-diagonal b <= 4 as `b`
gathered loads + FMAs; dense b == g, full mixing and the hadamard backend, as fp32 `tl.dot`s per group), group norm,
codes = number of decision boundaries exceeded (exactly the reference's rule, ties toward zero), corrected norm,
bit packing.
"""

from __future__ import annotations

import triton
import triton.language as tl

from rqcompile.kernels.common import (
    _div_rcp,
    channels,
    codebook_levels,
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
    """Code of each coordinate: how many decision boundaries (midpoints of adjacent levels) it exceeds, a
    coordinate exactly on one rounding toward zero (quantizer.boundary_codes). The codebook is symmetric (the
    format's codebooks are; artifacts with others are refused), so that is the sign and the count m of boundaries
    above 0 that |u| exceeds: H + m above 0, H - 1 - m at or below (H = NL / 2), half the compares of a count over
    all boundaries."""
    H: tl.constexpr = NL // 2
    mag = tl.abs(unit)
    m = tl.zeros([BLOCK_T, G], dtype=tl.int32)
    for k in tl.static_range(H, NL - 1):
        bnd = (tl.load(lev_ptr + k) + tl.load(lev_ptr + k + 1)) * 0.5
        m += (mag > bnd).to(tl.int32)
    return tl.where(unit > 0, H + m, H - 1 - m)


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
    rs_ptr,
    perm_ptr,
    h,
    g,
    D: tl.constexpr,
    G: tl.constexpr,
    NB: tl.constexpr,
    PERM: tl.constexpr,
    FMA_DIV: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    KC: tl.constexpr,
    rlo_ptr=None,
    SPLIT: tl.constexpr = False,
):
    """y [BLOCK_T, G] = u @ R_g^T for norm group g, u = (x - mean) / scale, over chunks of KC input coordinates (KC
    divides G; the chunk trades registers for dot steps: a whole [G, G] fp32 block in registers spilled in v1, 255
    registers + 1.3 KB of stack per thread at G = 128). tl.dot needs 16 rows; a tile of fewer rows (a decode step's
    token) multiplies and sums in registers instead of padding the tile with empty rows. SPLIT: rot_ptr / rlo_ptr
    hold R split into tf32 halves (R ~ hi + lo, both exact in tf32, `quantize._split_tf32`), so the three tf32 dots of
    tf32x3 run without converting R in every program: u = u_hi + u_lo (u_hi rounded to tf32 here, u_lo exact),
    y = u_lo hi + u_hi lo + u_hi hi (DOT_PREC the tf32 dot's: "tf32" on the GPU)."""
    ri = tl.arange(0, G)
    y = tl.zeros([BLOCK_T, G], dtype=tl.float32)
    for kc in tl.static_range(G // KC):
        kk = kc * KC + tl.arange(0, KC)
        chk = channels(perm_ptr, h, g * G + kk, g * G + kk < D, D, PERM)
        xv = tl.load(x_row + chk[None, :] * sxd, mask=t_ok, other=0.0).to(tl.float32)
        mu = tl.load(mean_ptr + h * D + chk)[None, :]
        sc = tl.load(scale_ptr + h * D + chk)[None, :]
        rs = tl.load(rs_ptr + h * D + chk)[None, :] if FMA_DIV else sc  # 1 / scale (v2's prep kernel writes it)
        u = _div_rcp(xv - mu, sc, rs, FMA_DIV)
        if BLOCK_T >= 16 and SPLIT:
            at = ((h * NB + g) * G + ri[None, :]) * G + kk[:, None]  # R_g[i, k] at [k, i]
            rt = tl.load(rot_ptr + at)
            u_hi = ((u.to(tl.int32, bitcast=True) + 0x1000) & -0x2000).to(tl.float32, bitcast=True)
            y = tl.dot(u - u_hi, rt, y, input_precision=DOT_PREC)
            y = tl.dot(u_hi, tl.load(rlo_ptr + at), y, input_precision=DOT_PREC)
            y = tl.dot(u_hi, rt, y, input_precision=DOT_PREC)
        elif BLOCK_T >= 16:
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
            # div_rn (FMA_DIV False: v1 has no 1 / scale, scale_ptr stands in for it), 32 coordinates per dot step
            y = _rotate_dense(
                x_row,
                t_ok,
                sxd,
                rot_ptr,
                mean_ptr,
                scale_ptr,
                scale_ptr,
                perm_ptr,
                h,
                g,
                D,
                G,
                NB,
                PERM,
                False,
                DOT_PREC,
                BLOCK_T,
                32 if G > 32 else G,
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
