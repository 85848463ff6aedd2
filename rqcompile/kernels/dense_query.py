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
# One program per (query row, batch x KV head, block), each reading the whole [G, G] block: 5.0 us at batch 8, 2.7 us
# at batch 1 (Qwen3.5-27B shapes, H200, sessions 26 and 28; ncu: 19% occupancy, latency-bound). A tiled form (a
# program per 16 rows of a KV head x 16 outputs, an fp32 tl.dot, an eighth of the reads) was slower: 7.5 / 4.1 us
# (session 28, benchmarks/NOTES.md), so it was removed.


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
    args = (q, *q.stride(), scale.contiguous(), scale if perm is None else perm.contiguous(), rotation.contiguous())
    args += (out, heads, rep, q_len)
    meta = dict(D=dim, G=g, NB=nb, PERM=perm is not None, CHUNK=min(_CHUNK, g), num_warps=4)
    wrap(_rotate_query_kernel)[(rep * q_len, batch * heads, nb)](*args, **meta)
    return out
