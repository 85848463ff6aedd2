"""Where a decode attention program sits: its place in the grid, its query rows (rotated once) and the range of
keys it reads. Shared by the split, keys-m and layout kernels, whose partial outputs are indexed the same way.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
    C0: tl.constexpr = 0,
    DC: tl.constexpr = 0,
):
    """The rotated, K-scaled query rows times qk_scale, fp32 [BLOCK_M, DC] (columns C0.., natural order; DC 0: D).
    Blocks of 2 and 4 take q in one contiguous load and pull the blocks' coordinates apart in registers (split /
    join): gathering them coordinate by coordinate compiled to 16-bit loads with a layout conversion through shared
    memory after each (sm_90: keys-m's prologue 999 -> 766 instructions, ~20 -> 4 barriers, session 26)."""
    DQ: tl.constexpr = D if DC == 0 else DC
    c = C0 + tl.arange(0, DQ)
    if RB == 0:  # q already rotated and K-scaled (dense rotation: kernels/dense_query.py)
        qv = tl.load(qrow[:, None] + c[None, :] * sqd, mask=m_ok[:, None], other=0.0).to(tl.float32)
    elif RB == 2 or RB == 4:
        cv = c < D
        x = tl.load(qrow[:, None] + c[None, :] * sqd, mask=m_ok[:, None] & cv[None, :], other=0.0).to(tl.float32)
        x = x * tl.load(ks_ptr + h * D + c, mask=cv, other=0.0)[None, :]
        blk = C0 // RB + tl.arange(0, DQ // RB)
        rb = rot_ptr + (h * NB + blk) * (RB * RB)  # R[h, blk, i, k] at rb + i * RB + k: out_i = sum_k R_ik x_k
        b_ok = blk < NB
        if RB == 2:
            x0, x1 = tl.split(tl.reshape(x, [BM, DQ // 2, 2]))
            y0 = _block_row(rb, b_ok, 0, x0, x1, x0, x1, 2)
            y1 = _block_row(rb, b_ok, 2, x0, x1, x0, x1, 2)
            qv = tl.reshape(tl.join(y0, y1), [BM, DQ])
        else:
            xa, xb = tl.split(tl.reshape(x, [BM, DQ // 4, 2, 2]))  # coordinates 4j + 2p + q: xa q = 0, xb q = 1
            x0, x2 = tl.split(xa)
            x1, x3 = tl.split(xb)
            y0 = _block_row(rb, b_ok, 0, x0, x1, x2, x3, 4)
            y1 = _block_row(rb, b_ok, 4, x0, x1, x2, x3, 4)
            y2 = _block_row(rb, b_ok, 8, x0, x1, x2, x3, 4)
            y3 = _block_row(rb, b_ok, 12, x0, x1, x2, x3, 4)
            qv = tl.reshape(tl.join(tl.join(y0, y2), tl.join(y1, y3)), [BM, DQ])
    else:  # blocks of 3 (rotor) straddle power-of-two chunks: each coordinate gathered
        blk = c // RB
        ii = c % RB
        qv = tl.zeros([BM, DQ], dtype=tl.float32)
        for k in tl.static_range(RB):
            src = blk * RB + k
            sv = src < D
            x = tl.load(qrow[:, None] + src[None, :] * sqd, mask=m_ok[:, None] & sv[None, :], other=0.0)
            ksc = tl.load(ks_ptr + h * D + src, mask=sv, other=0.0)
            coef = tl.load(rot_ptr + ((h * NB + blk) * RB + ii) * RB + k)
            qv += coef[None, :] * (x.to(tl.float32) * ksc[None, :])
    return qv * qk_scale


@triton.jit
def _block_row(rb, b_ok, row, x0, x1, x2, x3, RB: tl.constexpr):
    """One output coordinate of every block: sum_k R[blk, i, k] x_k, R's row i at rb + row (RB = 2: x2, x3 unused)."""
    y = (
        tl.load(rb + row, mask=b_ok, other=0.0)[None, :] * x0
        + tl.load(rb + row + 1, mask=b_ok, other=0.0)[None, :] * x1
    )
    if RB == 4:
        y += tl.load(rb + row + 2, mask=b_ok, other=0.0)[None, :] * x2
        y += tl.load(rb + row + 3, mask=b_ok, other=0.0)[None, :] * x3
    return y


@triton.jit
def _query_rows(sqb, sqh, sqt, H, REP, Tq, M, BLOCK_M: tl.constexpr):
    """A decode program's place in the grid (split, batch x KV head, row tile) and its BLOCK_M query rows: row
    index `rows` (r * Tq + tq over the KV head's REP query heads), validity, query head, position, and q row offsets.
    Shared by every attention kernel, whose partial outputs are indexed the same way. Offsets, not pointers: a
    pointer argument to a helper makes `wrap_triton`'s analysis count q as written (test_kernels checks it)."""
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rows < M
    tq = rows % Tq
    hq = h * REP + rows // Tq
    qoff = b.to(tl.int64) * sqb + hq.to(tl.int64) * sqh + tq.to(tl.int64) * sqt
    return tl.program_id(0), bh, b, h, rows, m_ok, hq, tq, qoff


@triton.jit
def _key_range(kvlen_ptr, b, split, NS, span, Tk, HAS_KVLEN: tl.constexpr, BLOCK_N: tl.constexpr):
    """[n_lo, n_hi): this split's keys. With kv_len the splits share the valid keys only (a short context in a long
    static cache keeps every split busy), in whole tiles. The bounds are told to be >= 0: without that the compiler
    keeps signed index arithmetic in the loop (keys-m with kv_len and V along keys, q rotated by 2 x 2 blocks in the
    kernel: 171 registers and 941 loop instructions per tile against 168 and 871 with it; sm_90, Triton 3.6,
    benchmarks/sass_counts.py)."""
    if HAS_KVLEN:
        # int32 or int64, clamped before narrowing; < 0: no keys, as the reference
        kvl = tl.maximum(tl.minimum(tl.load(kvlen_ptr + b), Tk), 0).to(tl.int32)
        tl.assume(kvl >= 0)
        span_b = (((kvl + NS - 1) // NS + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
        n_lo = split * span_b
        n_hi = tl.minimum(n_lo + span_b, kvl)
    else:
        tl.assume(span >= 0)
        tl.assume(Tk >= 0)
        n_lo = split * span
        n_hi = tl.minimum(n_lo + span, Tk)
    tl.assume(n_lo >= 0)
    return n_lo, n_hi


@triton.jit
def _key_ok(n, n_hi, KV_START: tl.constexpr):
    """Which key slots n a tile reads: below the split's end, and from rq::attention's kv_start on (a constant: the
    builds without it keep the single compare). keys-m with V along keys and kv_len, q rotated by 2 x 2 blocks in the
    kernel: 172 registers with the bound, 168 without (sm_90, Triton 3.6; a branch on the tile's start instead: 174;
    the default's dense rotation builds with 203 either way, session 25)."""
    if KV_START > 0:
        return (n < n_hi) & (n >= KV_START)
    return n < n_hi
