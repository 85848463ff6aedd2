"""The rq::dequantize kernel: codes and norms back to vectors in the input space (the inverse rotation, V's scale
and mean, the channel order), for the prefill path (dequantize + SDPA) and rq::dequantize on CUDA.
"""

from __future__ import annotations

import triton
import triton.language as tl

from rqcompile.kernels.common import (
    channels,
    num_planes,
    num_runs,
    plane_shift,
    plane_width,
    row_bytes,
    run_byte,
    run_count,
    run_level,
    run_start,
    run_width,
)


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
