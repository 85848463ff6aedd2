"""The decode-step quantize: one program per (row, norm group), the scale search's candidates side by side.

A decode step writes one token per KV head. The tiled kernel (quantize.py) gives each (batch, head) one program that
walks its norm groups and the scale search's candidates one after another, so a one-token call is a long serial chain
on a handful of SMs (session 12 profile: ~26 us per call under a CUDA graph with the default dense rotation, 32 calls
per step of the 64-layer model, 0.83 ms per token). Here each (row, norm group) is its own program and the candidates
are the rows of one [candidates, G] tile, so the chain is: load, rotate, one norm, one search, pack, store. Same
arithmetic as the tiled kernel's one-row tile (docs/FORMAT.md; codes equal up to the order of float sums).

Covers one width in 2..4 bits without a perm (the defaults and every uniform preset): block rotations (b <= 4) and
the dense per-group rotation (full mixing, hadamard). `launch_quantize` picks it for calls of at most
`DEFAULTS["rows_max_tokens"]` tokens.
"""

from __future__ import annotations

import triton
import triton.language as tl

from rqcompile.kernels.quantize_v1 import TINY, _codes, _lookup, _pack_store, _rotate_blocks


@triton.jit
def _quantize_rows_kernel(
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
    H,
    T,
    D: tl.constexpr,
    G: tl.constexpr,
    NG: tl.constexpr,
    RB: tl.constexpr,
    NB: tl.constexpr,
    BITS: tl.constexpr,
    NA: tl.constexpr,
    NA_PAD: tl.constexpr,
):
    g = tl.program_id(0)
    row = tl.program_id(1)  # (b, h, t) flattened: the output row
    t = row % T
    bh = row // T
    b = bh // H
    h = bh % H
    NL: tl.constexpr = 1 << BITS
    CB: tl.constexpr = D * BITS // 8
    x_base = x_ptr + b.to(tl.int64) * sxb + h * sxh + t.to(tl.int64) * sxt
    row_ok = tl.full([1, 1], 1, tl.int1)
    if RB == G:  # dense per-group rotation (full mixing, hadamard): y = R_g u over chunks of 32 input coordinates
        # as a [G, 32] tile times u, not the tiled kernel's [rows, G, 32] form (_rotate_dense): on the H200 that form
        # took a one-token call from 5.6 to 8.9 us and a 16-token one at batch 8 from 14.4 to 36.5 us (session 13)
        KC: tl.constexpr = 32 if G > 32 else G
        ri = tl.arange(0, G)
        y = tl.zeros([G], dtype=tl.float32)
        for kc in tl.static_range(G // KC):
            kk = kc * KC + tl.arange(0, KC)
            ch = g * G + kk
            u = tl.math.div_rn(
                tl.load(x_base + ch * sxd).to(tl.float32) - tl.load(mean_ptr + h * D + ch),
                tl.load(scale_ptr + h * D + ch),
            )
            r = tl.load(rot_ptr + ((h * NB + g) * G + ri[:, None]) * G + kk[None, :])  # R_g[i, k]
            y += tl.sum(r * u[None, :], axis=1)
        y = y[None, :]
    else:
        c = g * G + tl.arange(0, G)
        x_row = x_base + tl.zeros([1, 1], tl.int64)
        y = _rotate_blocks(x_row, row_ok, sxd, rot_ptr, mean_ptr, scale_ptr, mean_ptr, h, c, D, G, RB, NB, False, 1)
    n = tl.sqrt_rn(tl.sum(y * y, axis=1))  # [1]
    unit = tl.where(n[:, None] > 0, tl.math.div_rn(y, tl.maximum(n, TINY)[:, None]), 0.0)  # [1, G]
    if NA == 0:
        code = _codes(unit, lev_ptr, NL, 1, G)
    else:  # every candidate c at once: codes of unit / c, keep the largest cosine (the first on ties)
        a = tl.arange(0, NA_PAD)
        cand = tl.load(lev_ptr + NL + a, mask=a < NA, other=1.0)
        codes_a = _codes(tl.math.div_rn(unit, cand[:, None]), lev_ptr, NL, NA_PAD, G)
        lv_a = _lookup(codes_a, lev_ptr, NL, 0, NA_PAD, G)
        cos = tl.math.div_rn(tl.sum(unit * lv_a, axis=1), tl.maximum(tl.sqrt_rn(tl.sum(lv_a * lv_a, axis=1)), TINY))
        cos = tl.where(a < NA, cos, float("-inf"))
        pick = tl.min(tl.where(cos == tl.max(cos, axis=0), a, NA_PAD), axis=0)
        code = tl.sum(tl.where((a == pick)[:, None], codes_a, 0), axis=0)[None, :]
    lv = _lookup(code, lev_ptr, NL, 0, 1, G)
    corrected = tl.math.div_rn(n, tl.maximum(tl.sqrt_rn(tl.sum(lv * lv, axis=1)), TINY))  # [1]
    tl.store(norms_ptr + row.to(tl.int64) * NG + g + tl.arange(0, 1), corrected.to(tl.float16))
    _pack_store(code, codes_ptr + row.to(tl.int64) * CB + tl.zeros([1, 1], tl.int64), row_ok, g, G, D, BITS, 1)


def rows_apply(dim: int, rb: int, bits: int, group: int, layout: str = "", perm=None) -> bool:
    """Whether this kernel covers the call: one width in 2..4 bits, no perm, a block (b <= 4) or dense per-group
    rotation."""
    return layout == "" and perm is None and bits in (2, 3, 4) and (rb <= 4 or rb == group) and dim % group == 0


def launch_quantize_rows(x, rotation, mean, scale, levels, bits: int, group: int, codes, norms, wrap=lambda k: k):
    """Fill `codes` [B, H, T, bytes] and `norms` [B, H, T, d/group] from x [B, H, T, d] (any strides)."""
    batch, heads, tokens, dim = x.shape
    rb = rotation.shape[-1]
    na = levels.numel() - 2**bits
    grid = (dim // group, batch * heads * tokens)
    wrap(_quantize_rows_kernel)[grid](
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
        heads,
        tokens,
        D=dim,
        G=group,
        NG=dim // group,
        RB=rb,
        NB=rotation.shape[1],
        BITS=bits,
        NA=na,
        NA_PAD=triton.next_power_of_2(max(na, 1)),
        num_warps=max(1, min(4, group // 32)),
    )
