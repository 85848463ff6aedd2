"""Rotating the queries by a dense K rotation (hadamard, or the default full mixing's 128 x 128 per norm group) in one
Triton kernel.

The attention kernels apply block rotations of 2-4 to q themselves; a dense block is too large to redo in every
split's program, so q is rotated once before them. As torch ops (cast, scale, einsum, copies) that took several
small launches, ~10-15 us of every eager decode call; this is one launch. The math is `rotations.rotate` of
`q * k_scale` in the stored coordinate order (`k_perm`), as `quantizer.rotated_scores` does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rqcompile.kernels.common import channels

_CHUNK = 32  # input coordinates per step: a [G, 32] slice of the rotation in registers (32 per thread at G = 128)
# "rows": one program per (query row, batch x KV head, block), each reading the whole [G, G] block (the timed
# default: 5.0 us at batch 8, 2.6 us at batch 1, Qwen3.5-27B shapes, H200, session 26; ncu: 19% occupancy,
# latency-bound). "tiles": one program per (16 rows of a KV head over the batch, block, 16 outputs), each reading a
# [16, G] slice and multiplying by an fp32 FMA tl.dot, so a block is read once per 16 rows instead of once per row
# (batch 8: 192 programs and 3 MB of the rotation instead of 384 and 24 MB; sm_90, Triton 3.6: 576 instructions per
# program either way, 46 registers against 79). Untimed (session 27, no device time): not the default until it is.
VARIANT = "rows"
VARIANTS = ("rows", "tiles")
_TILE_ROWS, _TILE_OUTS = 16, 16


def dense_query_applies(rotation: torch.Tensor, dim: int) -> bool:
    """Whether the kernel covers this rotation [H, NB, G, G]: blocks of a power of two >= 16 tiling head_dim exactly
    (hadamard pads a head_dim that is not a power of two; that stays with the torch ops)."""
    _, nb, g, _ = rotation.shape
    return g >= 16 and g & (g - 1) == 0 and nb * g == dim


@triton.jit
def _rotate_query_kernel(
    q_ptr,
    sqb,
    sqh,
    sqt,
    sqd,
    scale_ptr,
    perm_ptr,
    rot_ptr,
    out_ptr,
    H,
    REP,
    Tq,
    D: tl.constexpr,
    G: tl.constexpr,
    NB: tl.constexpr,
    PERM: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """One program per (query row of a KV head, batch x KV head, block): out[i] = sum_k R[h, blk, i, k] x[k] with
    x[k] = q[perm[h, c]] * scale[h, perm[h, c]], c = blk * G + k, CHUNK inputs per step."""
    row = tl.program_id(0)
    bh = tl.program_id(1)
    blk = tl.program_id(2)
    b = bh // H
    h = bh % H
    r = row // Tq
    t = row % Tq
    qh = h * REP + r
    i = tl.arange(0, G)
    out = tl.zeros([G], dtype=tl.float32)
    for k0 in tl.static_range(0, G, CHUNK):
        k = k0 + tl.arange(0, CHUNK)
        c = channels(perm_ptr, h, blk * G + k, k < G, D, PERM)
        x = tl.load(q_ptr + b.to(tl.int64) * sqb + qh * sqh + t * sqt + c * sqd).to(tl.float32)
        x = x * tl.load(scale_ptr + h * D + c)
        rot = tl.load(rot_ptr + ((h * NB + blk) * G + i[:, None]).to(tl.int64) * G + k[None, :])
        out += tl.sum(rot * x[None, :], axis=1)
    orow = ((b.to(tl.int64) * H + h) * REP + r) * Tq + t
    tl.store(out_ptr + orow * D + blk * G + i, out)


@triton.jit
def _rotate_query_tiles_kernel(
    q_ptr,
    sqb,
    sqh,
    sqt,
    sqd,
    scale_ptr,
    perm_ptr,
    rot_ptr,
    out_ptr,
    H,
    REP,
    Tq,
    M,
    D: tl.constexpr,
    G: tl.constexpr,
    NB: tl.constexpr,
    PERM: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_O: tl.constexpr,
):
    """The "tiles" variant: program (row tile, KV head x block, output tile) computes out[m, i] = sum_k R[h, blk, i, k]
    x[m, k] for BLOCK_R of the M = B * REP * Tq query rows of KV head h (m = (b * REP + r) * Tq + t) and BLOCK_O
    outputs i, x as in _rotate_query_kernel."""
    m = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    h = tl.program_id(1) // NB
    blk = tl.program_id(1) % NB
    i = tl.program_id(2) * BLOCK_O + tl.arange(0, BLOCK_O)
    m_ok = m < M
    b = m // (REP * Tq)
    r = (m // Tq) % REP
    t = m % Tq
    qrow = b.to(tl.int64) * sqb + (h * REP + r).to(tl.int64) * sqh + t.to(tl.int64) * sqt
    out = tl.zeros([BLOCK_R, BLOCK_O], dtype=tl.float32)
    for k0 in tl.static_range(0, G, CHUNK):
        k = k0 + tl.arange(0, CHUNK)
        c = channels(perm_ptr, h, blk * G + k, k < G, D, PERM)
        x = tl.load(q_ptr + qrow[:, None] + c[None, :] * sqd, mask=m_ok[:, None], other=0.0).to(tl.float32)
        x = x * tl.load(scale_ptr + h * D + c)[None, :]
        rt = tl.load(rot_ptr + ((h * NB + blk) * G + i[None, :]).to(tl.int64) * G + k[:, None])  # R[i, k] at [k, i]
        out = tl.dot(x, rt, out, input_precision="ieee")  # fp32 FMAs (a summed broadcast product crossed lanes)
    orow = ((b.to(tl.int64) * H + h) * REP + r) * Tq + t
    tl.store(out_ptr + orow[:, None] * D + blk * G + i[None, :], out, mask=m_ok[:, None])


def rotate_query(q, rotation, scale, perm, heads: int, wrap) -> torch.Tensor:
    """q [B, Hq, Tq, D] (any strides and float dtype) -> float32 [B, Hq, Tq, D], rotated by KV head h's dense blocks
    `rotation` [H, NB, G, G] after K's per-channel `scale` [H, D], in `perm` [H, D] order (or None). `wrap`: the launch
    wrapper (identity eager, wrap_triton under torch.compile)."""
    batch, q_heads, q_len, dim = q.shape
    _, nb, g, _ = rotation.shape
    rep = q_heads // heads
    out = torch.empty((batch, q_heads, q_len, dim), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    if VARIANT not in VARIANTS:
        raise ValueError(f"unknown rotate_query variant {VARIANT!r}; expected one of {VARIANTS}")
    args = (q, *q.stride(), scale.contiguous(), scale if perm is None else perm.contiguous(), rotation.contiguous())
    args += (out, heads, rep, q_len)
    meta = dict(D=dim, G=g, NB=nb, PERM=perm is not None, CHUNK=min(_CHUNK, g), num_warps=4)
    if VARIANT == "tiles":
        rows = batch * rep * q_len
        block_o = min(_TILE_OUTS, g)
        grid = (triton.cdiv(rows, _TILE_ROWS), heads * nb, g // block_o)
        wrap(_rotate_query_tiles_kernel)[grid](*args, rows, BLOCK_R=_TILE_ROWS, BLOCK_O=block_o, **meta)
    else:
        wrap(_rotate_query_kernel)[(rep * q_len, batch * heads, nb)](*args, **meta)
    return out
