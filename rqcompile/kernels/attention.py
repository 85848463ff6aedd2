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
Decode (constexpr DECODE, launcher `decode`): 0 = the select tree above; 1 = byte-permute table lookups in inline
PTX (kernels/prmt.py: four prmt per four codes, ~2-3 instructions per element instead of ~8-17; 2/3-bit tiles come
out with their columns permuted within each block of 16, which q and the accumulator's store follow); 2 = the same
steps in Triton integer ops (for the interpreter, which cannot run inline asm and takes the tree for 1).
Keys-m kernel (the default for decode shapes, `launch_attention(variant=...)`): the same contract with the scores
computed transposed, keys as the M side of a Hopper wgmma, so the decoded K tile goes straight into the mma's
registers (section "keys as the mma's M operand" below).
Combine kernel: merges the splits' (max, sum, acc), un-rotates V once per query row (block-diagonal gather, or a
dense block's matrix-vector product in chunks), applies V's scale and mean and writes the output in q's dtype; for
rq::attention_lse (constexpr WRITE_LSE) also each row's natural-log sum-exp from the merged max and sum. A dense K
rotation (kernels/dense_query.py) rotates q once before the split kernels.

rq::attention's `rope_ab` term (a pre-RoPE key offset turned to each key's slot j): every kernel above adds it to
the raw scores, sum_i A_i cos(j theta_i) + B_i sin(j theta_i) with the fp32 angle float32(j) * theta_i of
ops.rope_score_bias; per key tile the cos/sin of the [h, BLOCK_N] angles are shared by the program's query rows and
enter through two fp16 dots (section "the rope_ab score term"). Without rope_ab (constexpr ROPE_K 0) the kernels
build the same code as before the term existed.

Masks: none; an optional per-batch valid length `kv_len` (keys >= kv_len[b] are never read, and the splits divide
the valid keys among themselves, so the work follows the context, not max_cache_len); or any
SDPA-style mask (bool or additive float, broadcastable to [B, Hq, Tq, Tk]) read tile by tile with its strides.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl
from triton.runtime.jit import MockTensor

from rqcompile.kernels import prmt as _prmt_steps
from rqcompile.kernels.along_keys_repack import launch_along_keys_to_tokens
from rqcompile.kernels.common import (
    channels,
    has_run,
    interpreting,
    is_pow2,
    layout_string,
    num_planes,
    plane_shift,
    plane_width,
    row_bytes,
    run_byte,
    run_count,
    run_in_group,
    run_level,
    run_start,
    run_width,
    run_window,
    sm_count,
)
from rqcompile.kernels.dense_query import dense_query_applies, rotate_query
from rqcompile.kernels.splits import MAX_SPLITS, programs_per_sm, wave_splits

LOG2E = 1.4426950408889634
# launch defaults (the sweep winner on the H200 with the prmt decode, benchmarks/NOTES.md v6); num_stages: software
# pipelining of the loop
# maxnreg: register cap per thread (more programs per SM; eager launches only, see launch_attention)
# decode: how a tile of codes becomes fp16 codebook values: 0 = binary select tree ("tree"), 1 = prmt byte-table
# lookup in inline PTX ("prmt", compiled code only; the interpreter runs the tree), 2 = the prmt steps transcribed
# into Triton integer ops (any backend; to test the prmt data path in the interpreter)
# variant: the uniform-width kernel for decode shapes. "split" = _attn_split_kernel (K tile as the mma's B operand);
# "keys-m" = _attn_keys_m_kernel (keys as the M side, K decoded straight into the mma's registers), taken where it
# applies (keys_m_applies) and the split kernel elsewhere. keys-m is the default since it was timed on the H200
# (benchmarks/NOTES.md v10: at batch 8 4-9% less time, 13-15% with kv_len as apply passes it; batch 1 within 3%)
# k_prefetch: keys-m reads the K code words one tile ahead into registers (v12, session 18: -9 to -12% on the H200);
# v_prefetch: the V code words too (session 19 on the H200: +6% at batch 8 32K, +1% at 128K, -1% at batch 1: off)
# split_waves: the split kernel's key splits, about this many programs per SM; keys-m decode launches on CUDA take
# the count of splits.wave_splits instead (whole waves of resident programs; session 19: -1 to -36% at batch 8,
# -10 to -17% at batch 1), unless a caller passes split_waves or num_splits
DEFAULTS = {
    "block_n": 64,
    "num_warps": 4,
    "split_waves": 8,
    "num_stages": 3,
    "maxnreg": 128,
    "decode": 1,
    "variant": "keys-m",
    "k_prefetch": True,
    "v_prefetch": False,
}
DECODES = {"tree": 0, "prmt": 1, "prmt-emulated": 2}
VARIANTS = ("split", "keys-m")
# The combine kernel reads up to COMBINE_BLOCK_S splits (all of them: the launcher makes at most 128) x BLOCK_D columns
# per load, BLOCK_D = COMBINE_TILE / splits (>= 16): independent loads, not a chain of dependent round trips
COMBINE_BLOCK_S, COMBINE_TILE = 128, 4096


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
    """The rotated, K-scaled query rows times qk_scale, fp32 [BLOCK_M, DC] (columns C0.., natural order; DC 0: D)."""
    DQ: tl.constexpr = D if DC == 0 else DC
    c = C0 + tl.arange(0, DQ)
    if RB == 0:  # q already rotated and K-scaled (dense rotation: kernels/dense_query.py)
        qv = tl.load(qrow[:, None] + c[None, :] * sqd, mask=m_ok[:, None], other=0.0).to(tl.float32)
    else:
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


# ---------------------------------------------------------------- prmt table decode (DECODE 1 and 2)
#
# kernels/prmt.py has the steps (one asm block per int32 word of the low plane: 16 codes for 2/3 bits, 8 for 4 bits)
# and their PTX; the asm returns the block's fp16 values in the column order prmt.COLUMNS[bits] (2/3 bits: even
# codes, then odd codes), which the kernel keeps: q's columns are permuted to match (K), the accumulator is stored
# through the same permutation (V). Scores and p.V do not depend on the order of the coordinates.

PRMT_ASM2 = tl.constexpr(_prmt_steps.asm(2))
PRMT_ASM3 = tl.constexpr(_prmt_steps.asm(3))
PRMT_ASM4 = tl.constexpr(_prmt_steps.asm(4))
PRMT_CON2 = tl.constexpr(_prmt_steps.constraints(2))
PRMT_CON3 = tl.constexpr(_prmt_steps.constraints(3))
PRMT_CON4 = tl.constexpr(_prmt_steps.constraints(4))

# Timing ablations of the keys-m kernel (launch_attention(ablate=...), benchmarks/attn_profile.py): each bit replaces
# one part of the loop by a no-op so that a device run can say what that part costs. Their outputs are wrong by
# design. The decode ablations keep every load: the words' bits are handed on as fp16 values by register moves
# (NOP_ASM*), so memory traffic, layouts and mmas stay as they are and only the table lookups go. The dot ablations
# drop a dot and, with it, the loads that fed it; "v-loads" keeps V's dot but feeds it a tile made from the norms
# (Triton then keeps that operand in registers: V's loads, decode and trip through shared memory all go).
ABLATIONS = {"k-decode": 1, "v-decode": 2, "v-dot": 4, "k-dot": 8, "v-loads": 16}
NOP_ASM2 = tl.constexpr(" ".join(f"mov.b32 {{${2 * i}, ${2 * i + 1}}}, $16;" for i in range(8)))
NOP_ASM3 = tl.constexpr(" ".join(f"mov.b32 {{${2 * i}, ${2 * i + 1}}}, ${16 + i % 2};" for i in range(8)))
NOP_ASM4 = tl.constexpr(" ".join(f"mov.b32 {{${2 * i}, ${2 * i + 1}}}, $8;" for i in range(4)))
NOP_CON2 = tl.constexpr(",".join(["=h"] * 16 + ["r"]))
NOP_CON3 = tl.constexpr(",".join(["=h"] * 16 + ["r", "r"]))
NOP_CON4 = tl.constexpr(",".join(["=h"] * 8 + ["r"]))


@triton.jit
def _table_word(lev_ptr, first: tl.constexpr, HI: tl.constexpr, NL: tl.constexpr):
    """int32 whose byte i is the low (HI=0) or high byte of fp16(levels[first + i]) (round to nearest, as the tree's
    conversion), i = 0..3; zero past the codebook."""
    i = tl.arange(0, 4)
    ok = first + i < NL
    v = tl.load(lev_ptr + first + i, mask=ok, other=0.0).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
    b = (v >> (8 * HI)) & 0xFF
    return tl.sum(b << (8 * i), axis=0)


@triton.jit
def _tables(lev_ptr, BITS: tl.constexpr):
    """(t0, t1, t2, t3, u0, u1, u2, u3): low (t) and high (u) bytes of levels 4g..4g+3 (prmt.table_words)."""
    NL: tl.constexpr = 1 << BITS
    return (
        _table_word(lev_ptr, 0, 0, NL),
        _table_word(lev_ptr, 4, 0, NL),
        _table_word(lev_ptr, 8, 0, NL),
        _table_word(lev_ptr, 12, 0, NL),
        _table_word(lev_ptr, 0, 1, NL),
        _table_word(lev_ptr, 4, 1, NL),
        _table_word(lev_ptr, 8, 1, NL),
        _table_word(lev_ptr, 12, 1, NL),
    )


@triton.jit
def _prmt(a, b, c):
    """PTX prmt.b32 (default mode) in Triton integer ops on uint32 tensors of one shape."""
    r = tl.zeros_like(a)
    for i in tl.static_range(4):
        nib = (c >> (4 * i)) & 0xF
        idx = nib & 7
        src = tl.where(idx < 4, a, b)
        byte = (src >> ((idx & 3) * 8)) & 0xFF
        byte = tl.where((nib & 8) != 0, ((byte >> 7) & 1) * 0xFF, byte)
        r = r | (byte << (8 * i))
    return r


@triton.jit
def _pairs(lo, hi):
    """prmt 0x5140 and 0x7362: bytes of lo and hi interleaved into two fp16x2 words."""
    return _prmt(lo, hi, tl.zeros_like(lo) + 0x5140), _prmt(lo, hi, tl.zeros_like(lo) + 0x7362)


@triton.jit
def _halves(p):
    """The fp16 values in the low and high half of a uint32 fp16x2 word."""
    lo = (p & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True)
    hi = (p >> 16).to(tl.uint16).to(tl.float16, bitcast=True)
    return lo, hi


@triton.jit
def _lookup4(sel, ta, tb, ua, ub):
    """The 4 fp16 values of the codes in sel's nibbles 0..3 (tables ta/tb low bytes, ua/ub high bytes)."""
    p0, p1 = _pairs(_prmt(ta, tb, sel), _prmt(ua, ub, sel))
    v0, v1 = _halves(p0)
    v2, v3 = _halves(p1)
    return v0, v1, v2, v3


@triton.jit
def _mux4(sel, m, ta, tb, tc, td, ua, ub, uc, ud):
    """4-bit: levels 0-7 (ta, tb) or 8-15 (tc, td) per byte by the mask m (lop3 0xD8), then interleaved."""
    # (a & ~m) | (b & m) written without ~: Triton 3.8's interpreter builds ~x of a uint32 from a -1 it cannot cast
    lo = _prmt(ta, tb, sel)
    lo = lo ^ ((lo ^ _prmt(tc, td, sel)) & m)
    hi = _prmt(ua, ub, sel)
    hi = hi ^ ((hi ^ _prmt(uc, ud, sel)) & m)
    p0, p1 = _pairs(lo, hi)
    v0, v1 = _halves(p0)
    v2, v3 = _halves(p1)
    return v0, v1, v2, v3


@triton.jit
def _prmt_emulated(w, hh, tab, BITS: tl.constexpr):
    """prmt.program(BITS) step by step in Triton integer ops (the same fp16 outputs as the asm)."""
    w = w.to(tl.uint32, bitcast=True)
    z = tl.zeros_like(w)
    t0 = z + tab[0].to(tl.uint32, bitcast=True)
    t1 = z + tab[1].to(tl.uint32, bitcast=True)
    t2 = z + tab[2].to(tl.uint32, bitcast=True)
    t3 = z + tab[3].to(tl.uint32, bitcast=True)
    u0 = z + tab[4].to(tl.uint32, bitcast=True)
    u1 = z + tab[5].to(tl.uint32, bitcast=True)
    u2 = z + tab[6].to(tl.uint32, bitcast=True)
    u3 = z + tab[7].to(tl.uint32, bitcast=True)
    if BITS == 4:
        s = w & 0x77777777
        sh = s >> 16
        w4 = w << 4
        v0, v1, v2, v3 = _mux4(s, _prmt(w4, w, z + 0xD9C8), t0, t1, t2, t3, u0, u1, u2, u3)
        v4, v5, v6, v7 = _mux4(sh, _prmt(w4, w, z + 0xFBEA), t0, t1, t2, t3, u0, u1, u2, u3)
        return v0, v1, v2, v3, v4, v5, v6, v7
    else:
        e = w & 0x33333333
        o = (w >> 2) & 0x33333333
        if BITS == 3:
            x = _prmt(hh.to(tl.uint32, bitcast=True), z, z + 0x4140)
            x = (x | (x << 4)) & 0x0F0F0F0F
            t = x | (x << 2)
            e = e | ((t << 2) & 0x44444444)
            o = o | ((t << 1) & 0x44444444)
            ta, tb, ua, ub = t0, t1, u0, u1
        else:
            ta, tb, ua, ub = t0, u0, u0, t0
        v0, v2, v4, v6 = _lookup4(e, ta, tb, ua, ub)
        v8, v10, v12, v14 = _lookup4(e >> 16, ta, tb, ua, ub)
        v1, v3, v5, v7 = _lookup4(o, ta, tb, ua, ub)
        v9, v11, v13, v15 = _lookup4(o >> 16, ta, tb, ua, ub)
        # the asm's output order (prmt.COLUMNS): even codes, then odd codes
        return v0, v2, v4, v6, v8, v10, v12, v14, v1, v3, v5, v7, v9, v11, v13, v15


@triton.jit
def _prmt_asm(w, hh, tab, BITS: tl.constexpr):
    """The prmt decode of one word per element of w (and hh: 3 bits' high-plane halfword) in inline PTX."""
    if BITS == 2:
        out = tl.inline_asm_elementwise(
            PRMT_ASM2,
            PRMT_CON2,
            [w, tab[0], tab[4]],
            dtype=(tl.float16,) * 16,
            is_pure=True,
            pack=1,
        )
    elif BITS == 3:
        out = tl.inline_asm_elementwise(
            PRMT_ASM3,
            PRMT_CON3,
            [w, hh, tab[0], tab[1], tab[4], tab[5]],
            dtype=(tl.float16,) * 16,
            is_pure=True,
            pack=1,
        )
    else:
        out = tl.inline_asm_elementwise(
            PRMT_ASM4,
            PRMT_CON4,
            [w, tab[0], tab[1], tab[2], tab[3], tab[4], tab[5], tab[6], tab[7]],
            dtype=(tl.float16,) * 8,
            is_pure=True,
            pack=1,
        )
    return out


@triton.jit
def _nop_asm(w, hh, BITS: tl.constexpr):
    """_prmt_asm's outputs without its work (DECODE 3, timing ablations only): the words' bits as fp16 values."""
    if BITS == 2:
        out = tl.inline_asm_elementwise(NOP_ASM2, NOP_CON2, [w], dtype=(tl.float16,) * 16, is_pure=True, pack=1)
    elif BITS == 3:
        out = tl.inline_asm_elementwise(NOP_ASM3, NOP_CON3, [w, hh], dtype=(tl.float16,) * 16, is_pure=True, pack=1)
    else:
        out = tl.inline_asm_elementwise(NOP_ASM4, NOP_CON4, [w], dtype=(tl.float16,) * 8, is_pure=True, pack=1)
    return out


@triton.jit
def _decode_words(w, hh, tab, BITS: tl.constexpr, DECODE: tl.constexpr):
    """The prmt decode of every word of w (hh: 3 bits' high-plane halfwords), joined into w.shape + [2, ..., 2]:
    the first join makes the slowest new axis, so pairing element i with i + n/2 at every level leaves the
    values in output order, a plain reshape away from [.., words * values]."""
    if DECODE == 1:
        out = _prmt_asm(w, hh, tab, BITS)
    elif DECODE == 3:
        out = _nop_asm(w, hh, BITS)
    else:
        out = _prmt_emulated(w, hh, tab, BITS)
    if BITS == 4:
        o0, o1, o2, o3, o4, o5, o6, o7 = out
        a0, a1, a2, a3 = tl.join(o0, o4), tl.join(o1, o5), tl.join(o2, o6), tl.join(o3, o7)
    else:
        o0, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14, o15 = out
        a0, a1, a2, a3 = tl.join(o0, o8), tl.join(o1, o9), tl.join(o2, o10), tl.join(o3, o11)
        a4, a5, a6, a7 = tl.join(o4, o12), tl.join(o5, o13), tl.join(o6, o14), tl.join(o7, o15)
        a0, a1, a2, a3 = tl.join(a0, a4), tl.join(a1, a5), tl.join(a2, a6), tl.join(a3, a7)
    b0, b1 = tl.join(a0, a2), tl.join(a1, a3)
    return tl.join(b0, b1)


@triton.jit
def _tile_words(row, n_ok, D: tl.constexpr, BITS: tl.constexpr, PART: tl.constexpr, PARTS: tl.constexpr):
    """The code words of _tile_prmt's tile, as loaded: [rows, words] (and 3 bits' high-plane bits per word, as int32
    whose low 16 bits the decode uses; the low words again at 2 and 4 bits)."""
    if BITS == 4:
        PER: tl.constexpr = 8
    else:
        PER: tl.constexpr = 16
    W: tl.constexpr = D // PER
    WP: tl.constexpr = W // PARTS
    wi = PART * WP + tl.arange(0, WP)
    w = tl.load(row[:, None] + wi[None, :], mask=n_ok[:, None], other=0)
    if BITS == 3:
        # this word's 16 high-plane bits: halfword 2W + wi, read as the int32 word W + wi // 2 (a 4-byte load the
        # pipeliner copies asynchronously; 2-byte loads were issued one per element, unpipelined)
        hj = PART * (WP // 2) + tl.arange(0, WP // 2)
        hi = tl.load(row[:, None] + (W + hj)[None, :], mask=n_ok[:, None], other=0)
        hh = tl.reshape(tl.join(hi, hi >> 16), [w.shape[0], WP])
    else:
        hh = w
    return w, hh


@triton.jit
def _tile_decode(w, hh, tab, BITS: tl.constexpr, DECODE: tl.constexpr, OPAQUE: tl.constexpr = True):
    """fp16 [rows, words * codes per word] codebook values of _tile_words' words (see _tile_prmt)."""
    if BITS == 4:
        PER: tl.constexpr = 8
    else:
        PER: tl.constexpr = 16
    R: tl.constexpr = w.shape[0]
    C: tl.constexpr = w.shape[1] * PER
    tile = _spread_chunks(tl.reshape(_decode_words(w, hh, tab, BITS, DECODE), [R, C]), BITS)
    if (DECODE == 1 or DECODE == 3) and OPAQUE:
        tile = _opaque(tile)
    return tile


@triton.jit
def _tile_prmt(
    row,
    n_ok,
    tab,
    D: tl.constexpr,
    BITS: tl.constexpr,
    DECODE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PART: tl.constexpr = 0,
    PARTS: tl.constexpr = 1,
    OPAQUE: tl.constexpr = True,
):
    """fp16 [BLOCK_N, D // PARTS] codebook values of coordinates PART * D // PARTS.. by prmt table lookups, columns in
    prmt.COLUMNS order within each block of PER codes (`row`: each row's codes as int32 words, as for _levels)."""
    w, hh = _tile_words(row, n_ok, D, BITS, PART, PARTS)
    return _tile_decode(w, hh, tab, BITS, DECODE, OPAQUE)


@triton.jit
def _spread_chunks(x, BITS: tl.constexpr):
    """x's columns reordered so that the shared-memory stores of a 128-column decoded tile are free of bank
    conflicts (other widths unchanged). A decoded tile reaches its store with T threads per row, each holding
    128 / T consecutive columns (T = 4 at 3 bits, 8 at 2 bits, 16 at 4 bits: Triton's layouts at BLOCK_N 64, 4
    warps), and the store swizzles 16-byte chunks by row. At 2 and 3 bits two threads of a quarter warp wrote the
    same bank group on every STS.128 (2-way conflicts, 24% of the kernel's shared wavefronts; ncu, session 6).
    Moving each thread's units of U columns (U = 16 at 3 bits, 8 at 2) from [thread, unit] to [unit, thread] order
    spreads a store's quarter warp over all eight bank groups; 4 bits was already conflict-free. Any column order is
    valid as long as q (scores) and the accumulator's columns (values) follow it (_spread_source)."""
    R: tl.constexpr = x.shape[0]
    C: tl.constexpr = x.shape[1]
    if C == 128 and BITS != 4:
        T: tl.constexpr = 4 if BITS == 3 else 8
        U: tl.constexpr = 16 if BITS == 3 else 8
        x = tl.reshape(tl.permute(tl.reshape(x, [R, T, C // (T * U), U]), (0, 2, 1, 3)), [R, C])
    return x


@triton.jit
def _spread_source(col, C: tl.constexpr, BITS: tl.constexpr):
    """The column before _spread_chunks of column `col` after it, for tiles C columns wide."""
    if C == 128 and BITS != 4:
        T: tl.constexpr = 4 if BITS == 3 else 8
        U: tl.constexpr = 16 if BITS == 3 else 8
        J: tl.constexpr = C // (T * U)
        col = ((col // U) % T) * (J * U) + (col // (T * U)) * U + col % U
    return col


@triton.jit
def _prmt_rows(q, BLOCK_M: tl.constexpr):
    """q's columns in the 2/3-bit tiles' order (_prmt_columns): [.., 2i + e] -> [.., 8e + i] per block of 16."""
    DQ: tl.constexpr = q.shape[1]
    return tl.reshape(tl.permute(tl.reshape(q, [BLOCK_M, DQ // 16, 8, 2]), (0, 1, 3, 2)), [BLOCK_M, DQ])


@triton.jit
def _opaque(x):
    """x (fp16) through an identity asm the compiler may not look through (not pure; ptxas drops the moves). Triton
    halves the dot operands' kWidth (mma v2) when a join feeds them (AccelerateMatmul's computeOrigBitWidth), which
    for fp16 made kWidth 4: q read by LDS.64 and ~2.4 register moves per element around the HMMAs; this keeps 2
    (local sm_90 SASS: 1129 vs 1446 loop instructions per tile uncapped). Eager launches only (OPAQUE): torch's
    wrap_triton cannot analyze an impure inline asm, assumes every input of the kernel mutated, and the compiled
    program then copied each attention layer's whole cache buffers on every step (torch.profiler on the H200,
    session 6: 4 copy kernels, 0.28 ms per step for 2 layers at 131K positions; a pure asm is looked through like
    no asm at all)."""
    return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=tl.float16, is_pure=False, pack=2)


@triton.jit
def _prmt_columns(col, BITS: tl.constexpr):
    """Coordinate of column position `col` of a _tile_prmt tile (prmt.COLUMNS: 2/3 bits hold codes 0, 2, ..., 14,
    1, 3, ..., 15 of each block of 16)."""
    if BITS == 4:
        out = col
    else:
        out = (col // 16) * 16 + 2 * (col % 8) + (col % 16) // 8
    return out


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
    keeps signed index arithmetic in the loop (keys-m with kv_len and V along keys: 171 registers and 941 loop
    instructions per tile against 168 and 871 with it; sm_90, Triton 3.6, benchmarks/sass_counts.py)."""
    if HAS_KVLEN:
        kvl = tl.maximum(tl.minimum(tl.load(kvlen_ptr + b).to(tl.int32), Tk), 0)  # < 0: no keys, as the reference
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
    builds without it keep the single compare). keys-m with V along keys and kv_len: 172 registers with the bound,
    168 without (sm_90, Triton 3.6; a branch on the tile's start instead: 174)."""
    if KV_START > 0:
        return (n < n_hi) & (n >= KV_START)
    return n < n_hi


# ---------------------------------------------------------------- the rope_ab score term (rq::attention's rope_ab)
#
# A score gains sum_i A_i cos(j theta_i) + B_i sin(j theta_i) for key slot j (rope_ab = [A | B] per query row, theta =
# rope_inv_freq, the angle the fp32 product float32(j) * theta_i as in ops.rope_score_bias). Each program loads its
# rows' A and B once (times qk_scale, as q), and per key tile computes the [ROPE_K, BLOCK_N] angles, their cos and
# sin, and two fp16 dots (K = ROPE_K) into the scores: the sincos work is shared by all the program's query rows (the
# KV head's query heads x Tq). h is padded with zero weights and zero frequencies to ROPE_K, a power of two >= 16
# (tl.dot's smallest K). ROPE_K 0: no term; the kernels test ROPE_K >= 16, so the rope-free build is the same code
# as before the term existed (and tests/kernel_writes_probe.py's placeholder 1 for an argument it does not know is
# rope-free too).


@triton.jit
def _rope_weights(rrow, srd, m_ok, rope_h, qk_scale, PART: tl.constexpr, ROPE_K: tl.constexpr, TRANS: tl.constexpr):
    """rope_ab's cos (PART 0) or sin (PART 1) weights of the rows at `rrow`, times qk_scale, fp16 [BLOCK_M, ROPE_K]
    (TRANS: [ROPE_K, BLOCK_M], keys-m's transposed scores); zero past h and for rows past M."""
    i = tl.arange(0, ROPE_K)
    col = (PART * rope_h + i).to(tl.int64) * srd
    if TRANS:
        x = tl.load(rrow[None, :] + col[:, None], mask=(i < rope_h)[:, None] & m_ok[None, :], other=0.0)
    else:
        x = tl.load(rrow[:, None] + col[None, :], mask=m_ok[:, None] & (i < rope_h)[None, :], other=0.0)
    return (x.to(tl.float32) * qk_scale).to(tl.float16)


@triton.jit
def _rope_freq(rfreq_ptr, rope_h, ROPE_K: tl.constexpr):
    """rope_inv_freq fp32 [ROPE_K], zero past h (angle 0: cos 1 and sin 0 against zero weights)."""
    i = tl.arange(0, ROPE_K)
    return tl.load(rfreq_ptr + i, mask=i < rope_h, other=0.0).to(tl.float32)


@triton.jit
def _rope_setup(
    rope_ptr,
    srb,
    srh,
    srt,
    srd,
    rfreq_ptr,
    rope_h,
    b,
    hq,
    tq,
    m_ok,
    qk_scale,
    ROPE_K: tl.constexpr,
    TRANS: tl.constexpr,
):
    """(cos weights, sin weights, frequencies) of a program's rows, loaded once before its key loop."""
    rrow = rope_ptr + (b.to(tl.int64) * srb + hq.to(tl.int64) * srh + tq.to(tl.int64) * srt)
    wa = _rope_weights(rrow, srd, m_ok, rope_h, qk_scale, 0, ROPE_K, TRANS)
    wb = _rope_weights(rrow, srd, m_ok, rope_h, qk_scale, 1, ROPE_K, TRANS)
    return wa, wb, _rope_freq(rfreq_ptr, rope_h, ROPE_K)


# cos / sin of the fp32 angles: the accurate libdevice functions cost ~4x the whole rope-free tile at 128K slots
# (angles past ~1e5 rad take their slow Payne-Hanek path; H200, QUALITY.md "Session 14"). The angle is instead reduced
# to [-pi, pi] by two FMAs against 2 pi split into fp32 head + tail (each FMA rounds once, so the remainder is within
# ~2 ulp(pi) of the exact remainder of the fp32 angle for any angle below 2^24), then the SFU's approximate cos / sin
# (|error| < 1e-6 on [-pi, pi], well under the fp16 operands' 5e-4). The interpreter has no SFU: tl.cos / tl.sin of
# the same reduced angle.
_TWO_PI_HEAD = tl.constexpr(6.2831854820251465)  # float32(2 pi)
_TWO_PI_TAIL = tl.constexpr(-1.7484555314695172e-07)  # float32(2 pi - _TWO_PI_HEAD)
_SFU_TRIG = tl.constexpr(not interpreting())


@triton.jit
def _cos_sin(angle):
    """cos and sin of fp32 angles (any magnitude below 2^24 rad), via the reduction above."""
    turns = tl.floor(angle * 0.15915494309189535 + 0.5)
    r = tl.fma(-turns, _TWO_PI_HEAD, angle)
    r = tl.fma(-turns, _TWO_PI_TAIL, r)
    if _SFU_TRIG:  # inline PTX rather than libdevice's fast_cosf: torch's kernel-write analysis reads inline asm
        cos = tl.inline_asm_elementwise(
            "cos.approx.ftz.f32 $0, $1;", "=f,f", [r], dtype=tl.float32, is_pure=True, pack=1
        )
        sin = tl.inline_asm_elementwise(
            "sin.approx.ftz.f32 $0, $1;", "=f,f", [r], dtype=tl.float32, is_pure=True, pack=1
        )
        return cos, sin
    return tl.cos(r), tl.sin(r)


@triton.jit
def _rope_scores(sc, wa, wb, freq, n, TRANS: tl.constexpr):
    """sc plus the rope term of key slots n: wa . cos(n theta) + wb . sin(n theta) (fp16 operands, fp32 sums into
    sc, [BLOCK_M, BLOCK_N]; TRANS: sc^T [BLOCK_N, BLOCK_M] with wa, wb transposed)."""
    if TRANS:
        cos, sin = _cos_sin(n.to(tl.float32)[:, None] * freq[None, :])  # [BLOCK_N, ROPE_K]: float32(j) * theta_i
        sc = tl.dot(cos.to(tl.float16), wa, sc)
        sc = tl.dot(sin.to(tl.float16), wb, sc)
    else:
        cos, sin = _cos_sin(freq[:, None] * n.to(tl.float32)[None, :])  # [ROPE_K, BLOCK_N]
        sc = tl.dot(wa, cos.to(tl.float16), sc)
        sc = tl.dot(wb, sin.to(tl.float16), sc)
    return sc


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
    rope_ptr,
    srb,
    srh,
    srt,
    srd,
    rfreq_ptr,
    rope_h,
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
    DECODE: tl.constexpr = 0,
    OPAQUE: tl.constexpr = True,
):
    split, bh, b, h, rows, m_ok, hq, tq, qoff = _query_rows(sqb, sqh, sqt, H, REP, Tq, M, BLOCK_M)
    qrow = q_ptr + qoff
    CWK: tl.constexpr = D * KBITS // 32  # int32 words of codes per key
    CWV: tl.constexpr = D * VBITS // 32
    KPOST: tl.constexpr = NGK <= 2  # K norms applied to the scores after the dot (one dot per norm group)
    VPOST: tl.constexpr = NGV <= 2  # V norms folded into p (one dot per norm group)
    KFAST: tl.constexpr = DECODE != 0 and KPOST  # prmt decode (the per-element norm path keeps the tree)
    VFAST: tl.constexpr = DECODE != 0 and VPOST
    # two norm groups with the prmt decode: one half tile and one dot per group (K=D/2 for the scores, N=D/2 for the
    # values), instead of two full dots with the other group's half masked to zero (twice the mma work and q reads)
    KSPLIT: tl.constexpr = KFAST and NGK == 2
    VSPLIT: tl.constexpr = VFAST and NGV == 2
    DV: tl.constexpr = D // 2 if VSPLIT else D  # accumulator columns per tile
    col = tl.arange(0, D)
    if KSPLIT:
        qf = _q_rot(qrow, sqd, m_ok, krot_ptr, kscale_ptr, h, qk_scale, D, KRB, KNB, BLOCK_M, 0, D // 2)
        qg = _q_rot(qrow, sqd, m_ok, krot_ptr, kscale_ptr, h, qk_scale, D, KRB, KNB, BLOCK_M, D // 2, D // 2)
    else:
        qf = _q_rot(qrow, sqd, m_ok, krot_ptr, kscale_ptr, h, qk_scale, D, KRB, KNB, BLOCK_M)
        qg = qf
    if KFAST:
        ktab = _tables(klev_ptr, KBITS)
        if KBITS != 4:  # q's columns in the K tiles' order (_prmt_columns): [.., 2i + e] -> [.., 8e + i] per 16
            qf = _prmt_rows(qf, BLOCK_M)
            qg = _prmt_rows(qg, BLOCK_M)
        qf = _spread_chunks(qf, KBITS)  # and in the tiles' chunk order
        qg = _spread_chunks(qg, KBITS)
    dcol = tl.arange(0, DV)
    if VFAST:
        vtab = _tables(vlev_ptr, VBITS)
        # the accumulator's columns follow the V tiles' order
        vcol = _prmt_columns(_spread_source(dcol, DV, VBITS), VBITS)
    else:
        vcol = dcol
    if KSPLIT:
        q0 = qf.to(tl.float16)
        q1 = qg.to(tl.float16)
    elif KPOST and NGK == 2:
        q0 = tl.where(col[None, :] < D // 2, qf, 0.0).to(tl.float16)
        q1 = tl.where(col[None, :] < D // 2, 0.0, qf).to(tl.float16)
    else:
        q0 = qf.to(tl.float16)
        q1 = q0

    ROPE: tl.constexpr = ROPE_K >= 16  # rope_ab's score term (section "the rope_ab score term")
    if ROPE:
        wa, wb, rfreq = _rope_setup(
            rope_ptr, srb, srh, srt, srd, rfreq_ptr, rope_h, b, hq, tq, m_ok, qk_scale, ROPE_K, False
        )
    n_lo, n_hi = _key_range(kvlen_ptr, b, split, NS, span, Tk, HAS_KVLEN, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_t = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DV], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, DV], dtype=tl.float32)  # the second norm group's columns (VSPLIT)
    kbase = kc_ptr + bh.to(tl.int64) * Tk * CWK
    vbase = vc_ptr + bh.to(tl.int64) * Tk * CWV
    knb = kn_ptr + bh.to(tl.int64) * Tk * NGK
    vnb = vn_ptr + bh.to(tl.int64) * Tk * NGV
    mrow = mask_ptr + b.to(tl.int64) * smb + hq.to(tl.int64) * smh + tq.to(tl.int64) * smt
    mrow0 = mask_ptr + b.to(tl.int64) * smb
    for start in range(n_lo, n_hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = _key_ok(n, n_hi, KV_START)
        n64 = n.to(tl.int64)
        # ---- scores: q . (codebook[code] * norm), norms after the dot
        krow = kbase + n64 * CWK
        if KSPLIT:  # one half tile and one dot per norm group
            nk0 = tl.load(knb + n64 * NGK, mask=n_ok, other=0.0).to(tl.float32)
            nk1 = tl.load(knb + n64 * NGK + 1, mask=n_ok, other=0.0).to(tl.float32)
            kt = tl.trans(_tile_prmt(krow, n_ok, ktab, D, KBITS, DECODE, BLOCK_N, 0, 2, OPAQUE))
            sc = tl.dot(q0, kt) * nk0[None, :]
            kt = tl.trans(_tile_prmt(krow, n_ok, ktab, D, KBITS, DECODE, BLOCK_N, 1, 2, OPAQUE))
            sc += tl.dot(q1, kt) * nk1[None, :]
        else:
            if KFAST:
                kt = tl.trans(_tile_prmt(krow, n_ok, ktab, D, KBITS, DECODE, BLOCK_N, OPAQUE=OPAQUE))
            else:
                kt = tl.trans(_tile(kbase, knb, n64, n_ok, klev_ptr, CWK, D, KBITS, NGK, KPOST, BLOCK_N))
            if KPOST:
                nk0 = tl.load(knb + n64 * NGK, mask=n_ok, other=0.0).to(tl.float32)
                sc = tl.dot(q0, kt) * nk0[None, :]
                if NGK == 2:
                    nk1 = tl.load(knb + n64 * NGK + 1, mask=n_ok, other=0.0).to(tl.float32)
                    sc += tl.dot(q1, kt) * nk1[None, :]
            else:
                sc = tl.dot(q0, kt)
        if ROPE:
            sc = _rope_scores(sc, wa, wb, rfreq, n, False)
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
        l_t = l_t * alpha[:, None] + p  # row sums reduced once after the loop: no cross-warp sum per tile
        m_i = m_new
        # ---- values: p . (codebook[code] * norm), norms folded into p
        vrow = vbase + n64 * CWV
        if VSPLIT:  # one half tile, one dot and one accumulator per norm group
            nv0 = tl.load(vnb + n64 * NGV, mask=n_ok, other=0.0).to(tl.float32)
            nv1 = tl.load(vnb + n64 * NGV + 1, mask=n_ok, other=0.0).to(tl.float32)
            vt = _tile_prmt(vrow, n_ok, vtab, D, VBITS, DECODE, BLOCK_N, 0, 2, OPAQUE)
            acc = acc * alpha[:, None] + tl.dot((p * nv0[None, :]).to(tl.float16), vt)
            vt = _tile_prmt(vrow, n_ok, vtab, D, VBITS, DECODE, BLOCK_N, 1, 2, OPAQUE)
            acc1 = acc1 * alpha[:, None] + tl.dot((p * nv1[None, :]).to(tl.float16), vt)
        else:
            if VFAST:
                vt = _tile_prmt(vrow, n_ok, vtab, D, VBITS, DECODE, BLOCK_N, OPAQUE=OPAQUE)
            else:
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

    l_i = tl.sum(l_t, axis=1)
    pidx = (bh.to(tl.int64) * NS + split) * M + rows
    tl.store(pm_ptr + pidx, m_i, mask=m_ok)
    tl.store(pl_ptr + pidx, l_i, mask=m_ok)
    tl.store(pacc_ptr + pidx[:, None] * D + vcol[None, :], acc, mask=m_ok[:, None])
    if VSPLIT:
        tl.store(pacc_ptr + pidx[:, None] * D + (D // 2 + vcol)[None, :], acc1, mask=m_ok[:, None])


# ---------------------------------------------------------------- keys as the mma's M operand ("keys-m" variant)
#
# The split kernel above computes scores as q [BLOCK_M, d] @ K^T: the decoded K tile is the mma's B operand, which
# the tensor cores read from shared memory, so every decoded K element is stored to shared memory and read back
# (with V's tile ~1.5 KB of shared traffic per tile and thread, which benchmarks/NOTES.md v8 took for the limit;
# v10 measured this kernel 4-9% faster at batch 8, not the ~2x that predicted: both are latency-bound).
# Here the scores are computed transposed, S^T = K [BLOCK_N, d] @ q^T, with 64 keys as the M side of a Hopper
# wgmma, whose A operand may live in registers. The codes are loaded so that each thread decodes exactly the
# elements the A fragment wants from it (lane l: keys l/4 and l/4 + 8 of its warp's 16, coordinates 16k + 8h +
# 2(l%4) + e): a [64, 4, NW] word tile (4 lanes per key, NW contiguous words each), keys loaded in the order the
# blocked layout's (repeat, warp, lane) rows need to become the fragment's (warp, repeat, lane) rows, and the
# decoded columns permuted to the fragment's order (q's columns follow). No layout conversion is left between the
# decode and the mma (Triton 3.6 sm_90 TTGIR / SASS, benchmarks/NOTES.md v10). Values: O^T = V^T @ P^T, the same
# wgmma orientation, so p and the accumulator share one layout with the scores (V's tile still goes through shared
# memory: its reduction axis is the key axis, and the format packs codes along coordinates).
# Decode shapes only: <= 16 query rows per program (the N side), 64 keys per tile, 4 warps, parts of 128
# coordinates per norm group (head_dim 128 with one group, 256 with two), 2/3/4-bit uniform widths, prmt decode.


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
):
    """_attn_split_kernel's contract (same arguments, same partial outputs) with keys as the mma's M side.
    ABLATE: timing ablations only (ABLATIONS), 0 in every real launch. VKEYS (`RQConfig.value_layout="keys"`,
    launch_attention's `v_along_keys`): V's codes packed along keys, decoded straight into V^T's A fragment, read
    one tile ahead; the tile's keys then sit in _vkeys_key's order on the scores' rows."""
    KDECODE: tl.constexpr = 3 if ABLATE & 1 else DECODE
    VDECODE: tl.constexpr = 3 if ABLATE & 2 else DECODE
    tl.static_assert(BLOCK_N == 64)
    tl.static_assert(D // NGK == 128 and D // NGV == 128)
    split, bh, b, h, rows, m_ok, hq, tq, qoff = _query_rows(sqb, sqh, sqt, H, REP, Tq, M, BLOCK_M)
    qrow = q_ptr + qoff
    CWK: tl.constexpr = D * KBITS // 32
    CWV: tl.constexpr = D * VBITS // 32
    q0 = _q_fragment(_q_rot(qrow, sqd, m_ok, krot_ptr, kscale_ptr, h, qk_scale, D, KRB, KNB, BLOCK_M, 0, 128), KBITS)
    if NGK == 2:
        q1 = _q_fragment(
            _q_rot(qrow, sqd, m_ok, krot_ptr, kscale_ptr, h, qk_scale, D, KRB, KNB, BLOCK_M, 128, 128), KBITS
        )
    ktab = _tables(klev_ptr, KBITS)
    vtab = _tables(vlev_ptr, VBITS)
    # the accumulators' rows follow the V tiles' column order
    if VKEYS:
        tl.static_assert(VBITS != 4 and not VPREFETCH)
        vcol = _vkeys_coord(tl.arange(0, 128))
    else:
        vcol = _prmt_columns(_spread_source(tl.arange(0, 128), 128, VBITS), VBITS)

    ROPE: tl.constexpr = ROPE_K >= 16  # rope_ab's score term (section "the rope_ab score term")
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
        if ROPE:
            sc = _rope_scores(sc, wa, wb, rfreq, n, True)
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


# ---------------------------------------------------------------- calibrated bit allocation (layout) variant
#
# K and V may each mix code widths in runs (docs/FORMAT.md, "Bit allocation") and read their input channels in a
# per-head order `perm`. The layout kernel keeps one query tile and one accumulator per run, each over the run's
# stored coordinates padded to a power of two (`run_window`; columns past the run are zero in q and never stored
# from the accumulator). It has MAX_RUNS run slots per tensor (8: one run per width 1..8 covers every layout of the
# allocator, whose widths never increase along the vector); a slot the layout does not use compiles to nothing.
# Per K/V tile and run, the run's codes are decoded with its constexpr width (a binary select tree on the code's
# bits up to 4 bits, a table load above, where 2**w - 1 selects would cost more) and take one `tl.dot`. A run inside
# one norm group applies its norm after the dot (K) or in p (V), as the single-width kernel does; a run across norm
# groups multiplies per element. Codes are read as int16 words: with runs of 16 codes every bit plane of every run
# starts on an even byte.

MAX_RUNS = 8
GATHER_BITS = tl.constexpr(5)  # runs of this width or more decode by a table load (not measured on the GPU yet)


@triton.jit
def _run_q(
    qrow,
    sqd,
    m_ok,
    rot_ptr,
    ks_ptr,
    perm_ptr,
    h,
    qk_scale,
    L: tl.constexpr,
    r: tl.constexpr,
    D: tl.constexpr,
    RB: tl.constexpr,
    NB: tl.constexpr,
    PERM: tl.constexpr,
    BM: tl.constexpr,
):
    """The query rows rotated like K (channels in K's perm order, times K's scale) times qk_scale, on run r's
    window of stored coordinates: fp16 [BM, window], zero past the run (a placeholder if there is no run r)."""
    if has_run(L, r):
        S: tl.constexpr = run_start(L, r)
        P: tl.constexpr = run_window(L, r)
        c = S + tl.arange(0, P)
        c_ok = c < S + run_count(L, r)
        if RB == 0:  # q already rotated (in perm order) and K-scaled (dense rotation: kernels/dense_query.py)
            qv = tl.load(qrow[:, None] + c[None, :] * sqd, mask=m_ok[:, None] & c_ok[None, :], other=0.0)
            qv = qv.to(tl.float32)
        else:
            blk = c // RB
            ii = c % RB
            qv = tl.zeros([BM, P], dtype=tl.float32)
            for k in tl.static_range(RB):
                src = blk * RB + k
                sv = c_ok & (src < D)
                ch = channels(perm_ptr, h, src, sv, D, PERM)
                x = tl.load(qrow[:, None] + ch[None, :] * sqd, mask=m_ok[:, None] & sv[None, :], other=0.0)
                ksc = tl.load(ks_ptr + h * D + ch, mask=sv, other=0.0)
                coef = tl.load(rot_ptr + ((h * NB + blk) * RB + ii) * RB + k, mask=c_ok, other=0.0)
                qv += coef[None, :] * (x.to(tl.float32) * ksc[None, :])
        out = (qv * qk_scale).to(tl.float16)
    else:
        out = tl.zeros([BM, 16], dtype=tl.float16)
    return out


@triton.jit
def _run_acc(L: tl.constexpr, r: tl.constexpr, BM: tl.constexpr):
    """Run r's zero accumulator, fp32 [BM, window] (a placeholder if there is no run r)."""
    if has_run(L, r):
        acc = tl.zeros([BM, run_window(L, r)], dtype=tl.float32)
    else:
        acc = tl.zeros([BM, 16], dtype=tl.float32)
    return acc


@triton.jit
def _half(base, j, ok):
    """Halfword j from `base`, zero-extended to int32."""
    return tl.load(base + j, mask=ok, other=0).to(tl.int32) & 0xFFFF


@triton.jit
def _plane_bits(row16, ld_ok, HW, PW: tl.constexpr, U: tl.constexpr):
    """A bit plane of PW-bit fields starting at halfword HW of each row, as int32 [BLOCK_N, U, 16] whose low PW
    bits are the field of code 16*u + l of the run (a unit of 16 codes takes PW halfwords; fields low bits first)."""
    u = tl.arange(0, U)
    li = tl.arange(0, 16)
    base = row16[:, None] + (HW + u * PW)[None, :]
    if PW == 1:
        x = tl.load(base, mask=ld_ok, other=0).to(tl.int32)[:, :, None] >> li[None, None, :]
    elif PW == 2:
        w = _half(base, 0, ld_ok) | (_half(base, 1, ld_ok) << 16)
        x = w[:, :, None] >> (2 * li)[None, None, :]
    else:
        w0 = _half(base, 0, ld_ok) | (_half(base, 1, ld_ok) << 16)
        w1 = _half(base, 2, ld_ok) | (_half(base, 3, ld_ok) << 16)
        x = tl.where((li < 8)[None, None, :], w0[:, :, None], w1[:, :, None]) >> (4 * (li % 8))[None, None, :]
    return x


@triton.jit
def _plane_code(row16, ld_ok, HW, N: tl.constexpr, W: tl.constexpr, p: tl.constexpr, U: tl.constexpr):
    """Plane p's share of the codes of a W-bit run of N codes starting at halfword HW (planes follow each other)."""
    PW: tl.constexpr = plane_width(W, p)
    x = _plane_bits(row16, ld_ok, HW + N * plane_shift(W, p) // 16, PW, U)
    return (x & ((1 << PW) - 1)) << plane_shift(W, p)


@triton.jit
def _run_tile(
    cbase,
    nbase,
    n64,
    n_ok,
    lev_ptr,
    L: tl.constexpr,
    r: tl.constexpr,
    CH: tl.constexpr,
    NG: tl.constexpr,
    G: tl.constexpr,
    POST: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """fp16 [BLOCK_N, window] of run r of each key/value row: codebook[code] (POST: the run's one norm is applied
    outside) or codebook[code] * norm; `cbase` points at the codes as int16 words, CH per row."""
    W: tl.constexpr = run_width(L, r)
    N: tl.constexpr = run_count(L, r)
    U: tl.constexpr = run_window(L, r) // 16
    HW: tl.constexpr = run_byte(L, r) // 2
    u = tl.arange(0, U)
    ld_ok = n_ok[:, None] & (u < N // 16)[None, :]
    row16 = cbase + n64 * CH
    lev = lev_ptr + run_level(L, r)
    if W < GATHER_BITS:  # binary tree of selects on the code's bits, as `_levels`
        x0 = _plane_bits(row16, ld_ok, HW, plane_width(W, 0), U)
        b0 = _bit(x0, 0)
        if W == 1:
            val = _pick(b0, lev, 0)
        else:
            b1 = _bit(x0, 1)
            v0 = tl.where(b1, _pick(b0, lev, 2), _pick(b0, lev, 0))
            if W == 2:
                val = v0
            else:
                v1 = tl.where(b1, _pick(b0, lev, 6), _pick(b0, lev, 4))
                if W == 3:  # bit 2 is the 1-bit plane after the 2-bit one
                    b2 = _bit(_plane_bits(row16, ld_ok, HW + N // 8, 1, U), 0)
                    val = tl.where(b2, v1, v0)
                else:
                    b2 = _bit(x0, 2)
                    b3 = _bit(x0, 3)
                    v2 = tl.where(b1, _pick(b0, lev, 10), _pick(b0, lev, 8))
                    v3 = tl.where(b1, _pick(b0, lev, 14), _pick(b0, lev, 12))
                    val = tl.where(b3, tl.where(b2, v3, v2), tl.where(b2, v1, v0))
    else:  # wide codes: assemble the code from its planes, one table load
        code = _plane_code(row16, ld_ok, HW, N, W, 0, U)
        for p in tl.static_range(1, num_planes(W)):
            code = code | _plane_code(row16, ld_ok, HW, N, W, p, U)
        val = tl.load(lev + code)
    if not POST:  # a unit of 16 codes never straddles a norm group (groups are multiples of 16)
        g = (run_start(L, r) + 16 * u) // G
        nrm = tl.load(nbase + n64[:, None] * NG + g[None, :], mask=ld_ok, other=0.0).to(tl.float32)
        val = val * nrm[:, :, None]
    return tl.reshape(val.to(tl.float16), [BLOCK_N, U * 16])


@triton.jit
def _run_scores(
    q,
    kbase,
    knb,
    n64,
    n_ok,
    lev_ptr,
    L: tl.constexpr,
    r: tl.constexpr,
    CH: tl.constexpr,
    NG: tl.constexpr,
    G: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Run r's share of the scores [BLOCK_M, BLOCK_N]: q_r . (codebook[code] * norm)."""
    POST: tl.constexpr = run_in_group(L, r, G)
    kt = tl.trans(_run_tile(kbase, knb, n64, n_ok, lev_ptr, L, r, CH, NG, G, POST, BLOCK_N))
    if POST:
        nk = tl.load(knb + n64 * NG + run_start(L, r) // G, mask=n_ok, other=0.0).to(tl.float32)
        sc = tl.dot(q, kt) * nk[None, :]
    else:
        sc = tl.dot(q, kt)
    return sc


@triton.jit
def _more_scores(
    sc,
    q,
    kbase,
    knb,
    n64,
    n_ok,
    lev_ptr,
    L: tl.constexpr,
    r: tl.constexpr,
    CH: tl.constexpr,
    NG: tl.constexpr,
    G: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """`sc` plus run r's share (`sc` itself if there is no run r)."""
    if has_run(L, r):
        sc += _run_scores(q, kbase, knb, n64, n_ok, lev_ptr, L, r, CH, NG, G, BLOCK_N)
    return sc


@triton.jit
def _run_pv(
    acc,
    alpha,
    p,
    vbase,
    vnb,
    n64,
    n_ok,
    lev_ptr,
    L: tl.constexpr,
    r: tl.constexpr,
    CH: tl.constexpr,
    NG: tl.constexpr,
    G: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Run r's accumulator after one K/V tile: acc * alpha + p . (codebook[code] * norm) (unchanged if there is no
    run r)."""
    if has_run(L, r):
        POST: tl.constexpr = run_in_group(L, r, G)
        vt = _run_tile(vbase, vnb, n64, n_ok, lev_ptr, L, r, CH, NG, G, POST, BLOCK_N)
        if POST:
            nv = tl.load(vnb + n64 * NG + run_start(L, r) // G, mask=n_ok, other=0.0).to(tl.float32)
            pv = tl.dot((p * nv[None, :]).to(tl.float16), vt)
        else:
            pv = tl.dot(p.to(tl.float16), vt)
        acc = acc * alpha[:, None] + pv
    return acc


@triton.jit
def _run_store(pacc_ptr, pidx, m_ok, acc, L: tl.constexpr, r: tl.constexpr, D: tl.constexpr):
    """Store run r's accumulator into its columns (stored coordinates) of the partial output."""
    if has_run(L, r):
        c = run_start(L, r) + tl.arange(0, run_window(L, r))
        ok = m_ok[:, None] & (c < run_start(L, r) + run_count(L, r))[None, :]
        tl.store(pacc_ptr + pidx[:, None] * D + c[None, :], acc, mask=ok)


@triton.jit
def _attn_split_layout_kernel(
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
    kperm_ptr,
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
    D: tl.constexpr,
    KL: tl.constexpr,
    VL: tl.constexpr,
    NGK: tl.constexpr,
    NGV: tl.constexpr,
    KRB: tl.constexpr,
    KNB: tl.constexpr,
    KPERM: tl.constexpr,
    MASK_KIND: tl.constexpr,
    MASK_ROW: tl.constexpr,
    HAS_KVLEN: tl.constexpr,
    KV_START: tl.constexpr,
    ROPE_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """`_attn_split_kernel` for K/V layouts `KL`/`VL` (run-length strings, `common.layout_string`): one q tile and
    one accumulator per run (see the section comment); splits, masks and the online softmax are the same."""
    split, bh, b, h, rows, m_ok, hq, tq, qoff = _query_rows(sqb, sqh, sqt, H, REP, Tq, M, BLOCK_M)
    qrow = q_ptr + qoff
    CHK: tl.constexpr = row_bytes(KL) // 2  # int16 words of codes per key
    CHV: tl.constexpr = row_bytes(VL) // 2
    GK: tl.constexpr = D // NGK
    GV: tl.constexpr = D // NGV
    q0 = _run_q(qrow, sqd, m_ok, krot_ptr, kscale_ptr, kperm_ptr, h, qk_scale, KL, 0, D, KRB, KNB, KPERM, BLOCK_M)
    q1 = _run_q(qrow, sqd, m_ok, krot_ptr, kscale_ptr, kperm_ptr, h, qk_scale, KL, 1, D, KRB, KNB, KPERM, BLOCK_M)
    q2 = _run_q(qrow, sqd, m_ok, krot_ptr, kscale_ptr, kperm_ptr, h, qk_scale, KL, 2, D, KRB, KNB, KPERM, BLOCK_M)
    q3 = _run_q(qrow, sqd, m_ok, krot_ptr, kscale_ptr, kperm_ptr, h, qk_scale, KL, 3, D, KRB, KNB, KPERM, BLOCK_M)
    q4 = _run_q(qrow, sqd, m_ok, krot_ptr, kscale_ptr, kperm_ptr, h, qk_scale, KL, 4, D, KRB, KNB, KPERM, BLOCK_M)
    q5 = _run_q(qrow, sqd, m_ok, krot_ptr, kscale_ptr, kperm_ptr, h, qk_scale, KL, 5, D, KRB, KNB, KPERM, BLOCK_M)
    q6 = _run_q(qrow, sqd, m_ok, krot_ptr, kscale_ptr, kperm_ptr, h, qk_scale, KL, 6, D, KRB, KNB, KPERM, BLOCK_M)
    q7 = _run_q(qrow, sqd, m_ok, krot_ptr, kscale_ptr, kperm_ptr, h, qk_scale, KL, 7, D, KRB, KNB, KPERM, BLOCK_M)

    ROPE: tl.constexpr = ROPE_K >= 16  # rope_ab's score term (section "the rope_ab score term")
    if ROPE:
        wa, wb, rfreq = _rope_setup(
            rope_ptr, srb, srh, srt, srd, rfreq_ptr, rope_h, b, hq, tq, m_ok, qk_scale, ROPE_K, False
        )
    n_lo, n_hi = _key_range(kvlen_ptr, b, split, NS, span, Tk, HAS_KVLEN, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc0 = _run_acc(VL, 0, BLOCK_M)
    acc1 = _run_acc(VL, 1, BLOCK_M)
    acc2 = _run_acc(VL, 2, BLOCK_M)
    acc3 = _run_acc(VL, 3, BLOCK_M)
    acc4 = _run_acc(VL, 4, BLOCK_M)
    acc5 = _run_acc(VL, 5, BLOCK_M)
    acc6 = _run_acc(VL, 6, BLOCK_M)
    acc7 = _run_acc(VL, 7, BLOCK_M)
    kbase = kc_ptr + bh.to(tl.int64) * Tk * CHK
    vbase = vc_ptr + bh.to(tl.int64) * Tk * CHV
    knb = kn_ptr + bh.to(tl.int64) * Tk * NGK
    vnb = vn_ptr + bh.to(tl.int64) * Tk * NGV
    mrow = mask_ptr + b.to(tl.int64) * smb + hq.to(tl.int64) * smh + tq.to(tl.int64) * smt
    mrow0 = mask_ptr + b.to(tl.int64) * smb
    for start in range(n_lo, n_hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = _key_ok(n, n_hi, KV_START)
        n64 = n.to(tl.int64)
        # ---- scores: the sum over K's runs
        sc = _run_scores(q0, kbase, knb, n64, n_ok, klev_ptr, KL, 0, CHK, NGK, GK, BLOCK_N)
        sc = _more_scores(sc, q1, kbase, knb, n64, n_ok, klev_ptr, KL, 1, CHK, NGK, GK, BLOCK_N)
        sc = _more_scores(sc, q2, kbase, knb, n64, n_ok, klev_ptr, KL, 2, CHK, NGK, GK, BLOCK_N)
        sc = _more_scores(sc, q3, kbase, knb, n64, n_ok, klev_ptr, KL, 3, CHK, NGK, GK, BLOCK_N)
        sc = _more_scores(sc, q4, kbase, knb, n64, n_ok, klev_ptr, KL, 4, CHK, NGK, GK, BLOCK_N)
        sc = _more_scores(sc, q5, kbase, knb, n64, n_ok, klev_ptr, KL, 5, CHK, NGK, GK, BLOCK_N)
        sc = _more_scores(sc, q6, kbase, knb, n64, n_ok, klev_ptr, KL, 6, CHK, NGK, GK, BLOCK_N)
        sc = _more_scores(sc, q7, kbase, knb, n64, n_ok, klev_ptr, KL, 7, CHK, NGK, GK, BLOCK_N)
        if ROPE:
            sc = _rope_scores(sc, wa, wb, rfreq, n, False)
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
        # ---- values: one accumulator per V run
        acc0 = _run_pv(acc0, alpha, p, vbase, vnb, n64, n_ok, vlev_ptr, VL, 0, CHV, NGV, GV, BLOCK_N)
        acc1 = _run_pv(acc1, alpha, p, vbase, vnb, n64, n_ok, vlev_ptr, VL, 1, CHV, NGV, GV, BLOCK_N)
        acc2 = _run_pv(acc2, alpha, p, vbase, vnb, n64, n_ok, vlev_ptr, VL, 2, CHV, NGV, GV, BLOCK_N)
        acc3 = _run_pv(acc3, alpha, p, vbase, vnb, n64, n_ok, vlev_ptr, VL, 3, CHV, NGV, GV, BLOCK_N)
        acc4 = _run_pv(acc4, alpha, p, vbase, vnb, n64, n_ok, vlev_ptr, VL, 4, CHV, NGV, GV, BLOCK_N)
        acc5 = _run_pv(acc5, alpha, p, vbase, vnb, n64, n_ok, vlev_ptr, VL, 5, CHV, NGV, GV, BLOCK_N)
        acc6 = _run_pv(acc6, alpha, p, vbase, vnb, n64, n_ok, vlev_ptr, VL, 6, CHV, NGV, GV, BLOCK_N)
        acc7 = _run_pv(acc7, alpha, p, vbase, vnb, n64, n_ok, vlev_ptr, VL, 7, CHV, NGV, GV, BLOCK_N)

    pidx = (bh.to(tl.int64) * NS + split) * M + rows
    tl.store(pm_ptr + pidx, m_i, mask=m_ok)
    tl.store(pl_ptr + pidx, l_i, mask=m_ok)
    _run_store(pacc_ptr, pidx, m_ok, acc0, VL, 0, D)
    _run_store(pacc_ptr, pidx, m_ok, acc1, VL, 1, D)
    _run_store(pacc_ptr, pidx, m_ok, acc2, VL, 2, D)
    _run_store(pacc_ptr, pidx, m_ok, acc3, VL, 3, D)
    _run_store(pacc_ptr, pidx, m_ok, acc4, VL, 4, D)
    _run_store(pacc_ptr, pidx, m_ok, acc5, VL, 5, D)
    _run_store(pacc_ptr, pidx, m_ok, acc6, VL, 6, D)
    _run_store(pacc_ptr, pidx, m_ok, acc7, VL, 7, D)


@triton.jit
def _split_weights(pm_ptr, off, s_ok, muse):
    """exp2(m_split - m_max) of the splits at offsets `off` (0 where masked): each split's share of the row's sum."""
    ms = tl.load(pm_ptr + off, mask=s_ok, other=float("-inf"))
    return tl.where(s_ok, tl.exp2(ms - muse), 0.0)


@triton.jit
def _split_sum(pm_ptr, pacc_ptr, rbase, M, NS, muse, cols, col_ok, D: tl.constexpr, BLOCK_S: tl.constexpr):
    """sum over the splits of weight(split) * partial accumulator[split, cols]: one [BLOCK_S, cols] load per step."""
    a = tl.zeros(cols.shape, dtype=tl.float32)
    for s0 in range(0, NS, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_ok = s < NS
        w = _split_weights(pm_ptr, rbase + s * M, s_ok, muse)
        arow = pacc_ptr + (rbase + s.to(tl.int64) * M)[:, None] * D
        a += tl.sum(w[:, None] * tl.load(arow + cols[None, :], mask=s_ok[:, None] & col_ok[None, :], other=0.0), 0)
    return a


@triton.jit
def _attn_combine_kernel(
    pm_ptr,
    pl_ptr,
    pacc_ptr,
    vrot_ptr,
    vscale_ptr,
    vmean_ptr,
    vperm_ptr,
    out_ptr,
    lse_ptr,
    H,
    REP,
    Tq,
    M,
    NS,
    D: tl.constexpr,
    VRB: tl.constexpr,
    VNB: tl.constexpr,
    VPERM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    WRITE_LSE: tl.constexpr,
    VDENSE: tl.constexpr = False,
    DENSE_K: tl.constexpr = 32,
):
    """One program per (query row, KV head, BLOCK_D output columns): the splits' max and sum first (NS floats),
    then the weighted sum of the partial accumulators, BLOCK_S splits at a time. A whole [NS, D] tile per program
    spilled (59 us at batch 1, 32K, planar, for 3 MB); chunks of 32 splits x 64 columns took 15 us, a chain of
    dependent loads; now all splits x BLOCK_D columns per rotation input come in one load each."""
    row = tl.program_id(0)
    bh = tl.program_id(1)
    dt = tl.program_id(2)
    b = bh // H
    h = bh % H
    rbase = bh.to(tl.int64) * NS * M + row  # + split * M
    mmax = float("-inf")
    for s0 in range(0, NS, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mmax = tl.maximum(mmax, tl.max(tl.load(pm_ptr + rbase + s * M, mask=s < NS, other=float("-inf")), axis=0))
    muse = tl.where(mmax == float("-inf"), 0.0, mmax)
    total = 0.0
    for s0 in range(0, NS, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_ok = s < NS
        w = _split_weights(pm_ptr, rbase + s * M, s_ok, muse)
        total += tl.sum(w * tl.load(pl_ptr + rbase + s * M, mask=s_ok, other=0.0), axis=0)
    inv = tl.where(total > 0, 1.0 / tl.maximum(total, 1e-30), 0.0)
    c = dt * BLOCK_D + tl.arange(0, BLOCK_D)
    if VDENSE:  # a dense block of VRB = BLOCK_D coordinates: out[k] = sum_i R[h, dt, i, k] a[i], DENSE_K inputs a step
        out = tl.zeros([BLOCK_D], dtype=tl.float32)
        for i0 in tl.static_range(0, BLOCK_D, DENSE_K):
            i = i0 + tl.arange(0, DENSE_K)
            a = _split_sum(pm_ptr, pacc_ptr, rbase, M, NS, muse, dt * BLOCK_D + i, i < BLOCK_D, D, BLOCK_S)
            j = tl.arange(0, BLOCK_D)
            rot = tl.load(vrot_ptr + ((h * VNB + dt) * BLOCK_D + i[:, None]).to(tl.int64) * BLOCK_D + j[None, :])
            out += tl.sum(a[:, None] * rot, axis=0)
    elif VRB == 1 or VRB == 2 or VRB == 4:
        # the splits' accumulators of columns c in one contiguous load per step, then the block rotation in registers:
        # out[blk, k] = sum_i R[h, blk, i, k] * a[blk, i] over this chunk's BLOCK_D / VRB blocks
        a = _split_sum(pm_ptr, pacc_ptr, rbase, M, NS, muse, c, c < D, D, BLOCK_S)
        NBLK: tl.constexpr = BLOCK_D // VRB
        blk = dt * NBLK + tl.arange(0, NBLK)
        i = tl.arange(0, VRB)
        rot = tl.load(vrot_ptr + ((h * VNB + blk)[:, None, None] * VRB + i[None, :, None]) * VRB + i[None, None, :])
        out = tl.reshape(tl.sum(tl.reshape(a, [NBLK, VRB])[:, :, None] * rot, axis=1), [BLOCK_D])
    else:  # blocks of 3 (rotor) straddle the chunks: each rotation input gathered from the accumulators
        blk = c // VRB
        kk = c % VRB
        out = tl.zeros([BLOCK_D], dtype=tl.float32)
        for i in tl.static_range(VRB):
            src = blk * VRB + i
            a = _split_sum(pm_ptr, pacc_ptr, rbase, M, NS, muse, src, src < D, D, BLOCK_S)
            coef = tl.load(vrot_ptr + ((h * VNB + blk) * VRB + i) * VRB + kk)
            out += coef * a
    c = channels(vperm_ptr, h, c, c < D, D, VPERM)  # un-rotated coordinate c is channel perm[h, c] of V
    out = out * inv * tl.load(vscale_ptr + h * D + c) + tl.load(vmean_ptr + h * D + c)
    r = row // Tq
    t = row % Tq
    qrow = (b.to(tl.int64) * H * REP + h * REP + r) * Tq + t
    tl.store(out_ptr + qrow * D + c, out.to(out_ptr.dtype.element_ty))
    if WRITE_LSE and dt == 0:  # natural-log sum-exp of the row's scores (the splits' max and sum are in log2 units)
        lse2 = tl.where(total > 0, muse + tl.log2(tl.maximum(total, 1e-30)), float("-inf"))
        tl.store(lse_ptr + qrow, lse2 * 0.6931471805599453)


def keys_m_applies(dim: int, k_bits: int, v_bits: int, k_groups: int, v_groups: int, rows: int, decode: int) -> bool:
    """Whether _attn_keys_m_kernel covers this call: decode shapes (<= 16 query rows per KV head), 128 coordinates
    per norm group, uniform 2-4 bit codes, the prmt decode (1, or its Triton transcription 2)."""
    return (
        rows <= 16
        and decode in (1, 2)
        and k_groups * 128 == dim
        and v_groups * 128 == dim
        and k_bits in (2, 3, 4)
        and v_bits in (2, 3, 4)
    )


def kernel_layouts(dim: int, k_bits: int, v_bits: int, k_perm=None, v_perm=None, k_widths=None, v_widths=None):
    """(KL, VL) layout strings for the layout kernel, or None where the single-width kernel applies (no perm, one
    width in 2..4 for each of K and V)."""
    if k_perm is None and v_perm is None and k_widths is None and v_widths is None and {k_bits, v_bits} <= {2, 3, 4}:
        return None  # the common case, without building per-coordinate tuples (host time of every eager call)
    kw = (k_bits,) * dim if k_widths is None else tuple(int(w) for w in k_widths)
    vw = (v_bits,) * dim if v_widths is None else tuple(int(w) for w in v_widths)
    if k_perm is None and v_perm is None and all(len(set(w)) == 1 and w[0] in (2, 3, 4) for w in (kw, vw)):
        return None
    return layout_string(kw), layout_string(vw)


def _layout_readable(widths, dim: int, levels) -> bool:
    """Runs the layout kernel reads: whole units of 16 codes (every plane on an even byte), at most MAX_RUNS."""
    from rqcompile.quant.packing import runs
    from rqcompile.quant.quantizer import codebook_size

    try:
        found = runs(widths)
    except ValueError:
        return False
    return (
        len(widths) == dim
        and len(found) <= MAX_RUNS
        and all(start % 16 == 0 and count % 16 == 0 for _, start, count in found)
        and (levels is None or levels.numel() >= codebook_size(tuple(widths)))
    )


def _rope_readable(rope_ab, q) -> bool:
    """A rope_ab the kernels take: [B, Hq, Tq, 2h] (each of B, Hq, Tq q's or 1, broadcast) with 1 <= h <= d/2
    (RoPE turns at most all of the head's pairs; any h, padded to ROPE_K)."""
    half = rope_ab.shape[-1] // 2
    return (
        rope_ab.dim() == 4
        and rope_ab.shape[-1] % 2 == 0
        and 1 <= half <= max(1, q.shape[-1] // 2)
        and all(r in (1, n) for r, n in zip(rope_ab.shape[:3], q.shape[:3]))
        and rope_ab.is_floating_point()
    )


def attention_supported(
    q,
    k_codes,
    v_codes,
    k_bits: int,
    v_bits: int,
    k_norms,
    v_norms,
    k_widths=None,
    v_widths=None,
    k_levels=None,
    v_levels=None,
    k_perm=None,
    v_perm=None,
    rope_ab=None,
) -> bool:
    dim = q.shape[-1]
    if rope_ab is not None and not _rope_readable(rope_ab, q):
        return False
    if not is_pow2(dim) or dim < 32 or dim > 512 or q.shape[1] % k_codes.shape[1]:
        return False
    for norms in (k_norms, v_norms):
        if dim % norms.shape[-1] or (dim // norms.shape[-1]) % 16:
            return False
    layouts = kernel_layouts(dim, k_bits, v_bits, k_perm, v_perm, k_widths, v_widths)
    if layouts is None:
        return True
    return all(
        _layout_readable((bits,) * dim if widths is None else tuple(int(w) for w in widths), dim, levels)
        for bits, widths, levels in ((k_bits, k_widths, k_levels), (v_bits, v_widths, v_levels))
    )


def _words(codes):
    """The packed codes as int32 words (4 consecutive bytes, little-endian), [..., d*bits/32]."""
    import torch

    codes = codes.contiguous()
    if codes.storage_offset() % 4:
        codes = codes.clone()
    return codes.view(torch.int32)


def _halfwords(codes):
    """The packed codes as int16 words (2 consecutive bytes, little-endian), [..., bytes/2]."""
    import torch

    codes = codes.contiguous()
    if codes.storage_offset() % 2:
        codes = codes.clone()
    return codes.view(torch.int16)


def rope_width(rope_ab) -> int:
    """The kernels' ROPE_K for a rope_ab [.., 2h]: h padded to a power of two >= 16 (tl.dot's smallest K); 0 without
    the term."""
    if rope_ab is None:
        return 0
    return max(16, triton.next_power_of_2(rope_ab.shape[-1] // 2))


def _rope_args(rope_ab, rope_inv_freq, q):
    """(ROPE_K, the kernels' rope arguments: rope_ab broadcast to q's rows and its strides, the frequencies, h).
    Without rope_ab, placeholders the rope-free build never reads."""
    import torch

    if rope_ab is None:
        return 0, (q, 0, 0, 0, 0, q, 0)
    half = rope_inv_freq.numel()
    if rope_ab.shape[-1] != 2 * half:
        raise ValueError(f"rope_ab has {rope_ab.shape[-1]} weights per query, expected 2 x {half} (rope_inv_freq)")
    ab = rope_ab.expand(*q.shape[:3], 2 * half)  # broadcast rows read through zero strides
    freq = rope_inv_freq.to(device=q.device, dtype=torch.float32).contiguous()
    return rope_width(rope_ab), (ab, *ab.stride(), freq, half)


def _identity(kernel):
    return kernel


def keys_m_programs_per_sm(full_mask: bool, rope: bool) -> int:
    """The launcher's first guess of keys-m programs (4 warps each) resident on one H100/H200 SM, by registers
    (Triton 3.6, sm_90; benchmarks/sass_counts.py): 155-168 per thread without a mask or the rope term, or with a
    row-constant mask, i.e. three programs in 64K registers; a mask per query row (238-255) or the rope term
    (178-238): two. The launcher checks it against the build it runs (_keys_m_fits)."""
    return 2 if full_mask or rope else 3


_KEYS_M_FITS: dict[tuple, int] = {}


def _specialization(arg) -> object:
    """What Triton specializes a launch on for one argument: a tensor's dtype (alignment: torch's allocations are
    16-byte aligned), an int's being 1 or a multiple of 16."""
    if hasattr(arg, "data_ptr"):  # a tensor or a MockTensor
        return arg.dtype
    if isinstance(arg, int) and not isinstance(arg, bool):
        return (arg == 1, arg % 16 == 0)
    return type(arg)


def _keys_m_fits(args: tuple, meta: dict, device_index: int) -> int:
    """keys-m programs resident per SM for the build these arguments select. Asking Triton for that build (dtypes
    standing in for the tensors, so that it works on fake tensors while torch.compile traces) costs ~180 us of host
    time (measured on the H200's host), so the answer is kept per specialization."""
    key = (device_index, tuple(meta.items()), tuple(_specialization(a) for a in args))
    if key not in _KEYS_M_FITS:
        mocks = [MockTensor(a.dtype) if hasattr(a, "data_ptr") else a for a in args]
        compiled = _attn_keys_m_kernel.warmup(*mocks, grid=(1,), **meta)
        _KEYS_M_FITS[key] = programs_per_sm(compiled, meta["num_warps"], device_index)
    return _KEYS_M_FITS[key]


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
    k_perm=None,
    v_perm=None,
    k_widths=None,
    v_widths=None,
    rope_ab=None,
    rope_inv_freq=None,
    wrap=None,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_stages: int | None = None,
    maxnreg: int | None = None,
    num_warps: int | None = None,
    split_waves: int | None = None,
    with_lse: bool = False,
    decode: int | str | None = None,
    variant: str | None = None,
    ablate: int = 0,
    k_prefetch: bool | None = None,
    v_prefetch: bool | None = None,
    v_along_keys: bool = False,
    kv_start: int = 0,
):
    """rq::attention on the packed cache with Triton (see module docstring). kv_len: optional int [B]; kv_start: keys
    before it are masked (a constant of the build: 0 compiles to the kernels without the bound).
    `with_lse`: rq::attention_lse, returning (out, lse float32 [B, Hq, Tq]) (the combine step also writes the lse).
    k_perm/v_perm ([H, d] int64) and k_widths/v_widths (per-coordinate widths, replacing the bits): a calibrated
    bit allocation's layout, run by the layout kernel. `decode`: the uniform kernel's code decode (DEFAULTS, DECODES:
    0/"tree", 1/"prmt", 2/"prmt-emulated"); the interpreter cannot run inline asm and takes the tree for "prmt".
    `variant` (DEFAULTS, VARIANTS): "keys-m" runs _attn_keys_m_kernel where keys_m_applies (the interpreter
    runs it with the prmt steps in Triton ops), the split kernel elsewhere. `rope_ab` [B or 1, Hq or 1, Tq or 1, 2h]
    with `rope_inv_freq` [h]: the rope score term, taken by every kernel (split, keys-m and layout alike), so it
    changes no kernel choice. `ablate` (ABLATIONS, keys-m only): timing experiments whose outputs are wrong by
    design; never set it to compute attention. `k_prefetch` / `v_prefetch` (DEFAULTS): keys-m reads the K / V code
    words one tile ahead into registers instead of through the pipeliner's shared-memory copies. `num_splits`: key
    splits per row (at most MAX_SPLITS); by default keys-m on CUDA takes splits.wave_splits' count, everything else
    about `split_waves` programs per SM. `v_along_keys`: v_codes are packed along keys (packing.pack_along_keys,
    `RQConfig.value_layout="keys"`), read in place by keys-m; the other kernels get a copy re-packed per token."""
    import torch

    from rqcompile.ops import check_kv_start

    check_kv_start(kv_start)
    wrap = _identity if wrap is None else wrap
    block_n = DEFAULTS["block_n"] if block_n is None else block_n
    num_stages = DEFAULTS["num_stages"] if num_stages is None else num_stages
    maxnreg_given = maxnreg is not None
    maxnreg = DEFAULTS["maxnreg"] if maxnreg is None else maxnreg
    num_warps = DEFAULTS["num_warps"] if num_warps is None else num_warps
    split_waves_given = split_waves is not None
    split_waves = DEFAULTS["split_waves"] if split_waves is None else split_waves
    decode = DEFAULTS["decode"] if decode is None else decode
    decode = DECODES[decode] if isinstance(decode, str) else int(decode)
    if decode not in DECODES.values():
        raise ValueError(f"decode must be one of {DECODES}, not {decode}")
    variant = DEFAULTS["variant"] if variant is None else variant
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, not {variant!r}")
    batch, q_heads, q_len, dim = q.shape
    heads = k_codes.shape[1]
    tk = k_codes.shape[2]
    rep = q_heads // heads
    rows = rep * q_len
    block_m = 16 if rows <= 16 else (32 if rows <= 32 else 64)

    # The register cap is a plain Triton launch option; torch's wrap_triton (torch.compile / AOTInductor) is given
    # only the options it knows. It is tuned for decode tiles: at BLOCK_M 64 (prefill) ptxas cannot fit the kernel
    # in 168 registers and refuses it (C7600, seen on the H200), so larger tiles launch uncapped.
    # The layout kernel launches uncapped: its register needs (one accumulator per run) are not measured yet.
    layouts = kernel_layouts(dim, k_bits, v_bits, k_perm, v_perm, k_widths, v_widths)
    keys_m = (
        variant == "keys-m"
        and layouts is None
        and keys_m_applies(dim, k_bits, v_bits, k_norms.shape[-1], v_norms.shape[-1], rows, decode)
    )
    if ablate and (not keys_m or interpreting()):
        raise ValueError("ablate: timing ablations run only in the compiled keys-m kernel")
    if v_along_keys and not (keys_m and v_bits in (2, 3) and tk % 16 == 0 and not v_prefetch):
        # the split and layout kernels read V per token: re-pack a copy (prefill-sized calls; one pass over V's codes)
        v_codes = launch_along_keys_to_tokens(v_codes, v_bits, dim, wrap=None if wrap is _identity else wrap)
        v_along_keys = False
    if keys_m:
        block_n, num_warps = 64, 4  # the kernel's fragment layout is built for these
    if interpreting():  # no inline asm: the split kernel takes the tree, keys-m the prmt steps in Triton ops
        decode = 2 if keys_m else (0 if decode == 1 else decode)
    # keys-m: 160 registers uncapped (3 programs per SM either way down to 144); capped only when asked
    capped = maxnreg and block_m == 16 and wrap is _identity and not interpreting() and layouts is None
    capped = capped and (maxnreg_given or not keys_m)
    launch_opts = {"maxnreg": maxnreg} if capped else {}
    m_tiles = triton.cdiv(rows, block_m)
    qk_scale = float(sm_scale) * LOG2E
    device = q.device

    krb = k_rotation.shape[-1]
    q_in = q
    for rotation in (k_rotation, v_rotation):
        if rotation.shape[-1] > 4 and not dense_query_applies(rotation, dim):
            raise ValueError(
                f"dense rotation blocks {tuple(rotation.shape)}: the kernels take powers of two >= 16 "
                f"tiling head_dim {dim} (norm groups of a supported call always are)"
            )
    if krb > 4:  # dense K rotation: q rotated once, by its own kernel, before the attention kernels
        q_in = rotate_query(q, k_rotation, k_scale, k_perm, heads, wrap)
        krb = 0

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
        # a dimension of size 1 is read at index 0 only: stride 0, so that a decode step's mask ([B or 1, 1, 1, T]:
        # expand keeps the query dim's stride T) takes the one-row path (session 21: apply's decode steps ran the
        # per-query-row mask build, 255 registers and 1,081 loop instructions against 174 and 894)
        mstrides = tuple(0 if size == 1 else stride for size, stride in zip(mask.shape, mask.stride()))
    # the kernels read kv_len[b] at offset b: an expanded [1] -> [B] (fuse_attention's valid_kv_length of a mask with
    # batch dim 1) must become B real values, else rows b >= 1 read past its one element
    kvl = kv_len.to(torch.int32).contiguous() if kv_len is not None else q
    lse = torch.empty((batch, q_heads, q_len), dtype=torch.float32, device=device) if with_lse else None
    if batch * q_heads * q_len == 0:
        empty = torch.empty(q.shape, dtype=q.dtype, device=device)
        return (empty, lse) if with_lse else empty
    mask_row = mask_kind != 0 and mstrides[1] == 0 and mstrides[2] == 0
    q_args = (q_in, q_in.stride(0), q_in.stride(1), q_in.stride(2), q_in.stride(3))
    rope_k, rope_args = _rope_args(rope_ab, rope_inv_freq, q)
    meta = {
        "D": dim,
        "NGK": k_norms.shape[-1],
        "NGV": v_norms.shape[-1],
        "KRB": krb,
        "KNB": k_rotation.shape[1],
        "MASK_KIND": mask_kind,
        "MASK_ROW": mask_row,
        "HAS_KVLEN": kv_len is not None,
        "KV_START": kv_start,
        "ROPE_K": rope_k,
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "num_warps": num_warps,
        "num_stages": num_stages,
    }
    uniform_args = ()
    if layouts is None:  # the split and keys-m kernels read the codes as int32 words
        uniform_args = (
            *q_args,
            _words(k_codes),
            k_norms.contiguous(),
            _words(v_codes),
            v_norms.contiguous(),
            k_rotation.contiguous(),
            k_scale.contiguous(),
            k_levels.contiguous(),
            v_levels.contiguous(),
        )
    keys_m_meta = {
        "KBITS": k_bits,
        "VBITS": v_bits,
        "DECODE": decode,
        "ABLATE": int(ablate),
        "KPREFETCH": bool(DEFAULTS["k_prefetch"] if k_prefetch is None else k_prefetch),
        "VPREFETCH": bool(DEFAULTS["v_prefetch"] if v_prefetch is None else v_prefetch) and not v_along_keys,
        "VKEYS": bool(v_along_keys),
        **meta,
        **launch_opts,  # a register cap, where asked for (before session 19 keys-m launches dropped it)
    }

    def tail(pm, pl, pacc, splits: int, span: int) -> tuple:
        return (mask, *mstrides, kvl, pm, pl, pacc, heads, rep, q_len, tk, rows, splits, span, qk_scale, *rope_args)

    total_blocks = max(1, triton.cdiv(tk, block_n))

    def split_plan(splits: int) -> tuple[int, int]:
        """(splits, keys per split): equal spans of whole tiles."""
        span = triton.cdiv(total_blocks, max(1, min(int(splits), total_blocks, MAX_SPLITS))) * block_n
        return max(1, triton.cdiv(tk, span)), span

    work_rows = batch * heads * m_tiles
    static_shape = all(type(n) is int for n in (batch, heads, tk))  # not torch.SymInt (dynamic shapes)
    if num_splits is None and keys_m and not split_waves_given and device.type == "cuda" and static_shape:
        sms = sm_count(device.index or 0)
        guess = keys_m_programs_per_sm(mask_kind != 0 and not mask_row, rope_ab is not None)
        num_splits = wave_splits(total_blocks, work_rows, sms, guess)
        # the build this launch will run (Triton's cache entry for these arguments) says how many programs really fit
        f32 = MockTensor(torch.float32)  # the partial results, not allocated yet
        args = (*uniform_args, *tail(f32, f32, f32, *split_plan(num_splits)))
        fits = _keys_m_fits(args, keys_m_meta, device.index or 0)
        if fits != guess:
            num_splits = wave_splits(total_blocks, work_rows, sms, fits)
    elif num_splits is None:
        target = split_waves * sm_count(device.index or 0) if device.type == "cuda" else 4
        num_splits = triton.cdiv(target, work_rows)
    num_splits, span = split_plan(num_splits)

    pm = torch.empty((batch * heads, num_splits, rows), dtype=torch.float32, device=device)
    pl = torch.empty((batch * heads, num_splits, rows), dtype=torch.float32, device=device)
    pacc = torch.empty((batch * heads, num_splits, rows, dim), dtype=torch.float32, device=device)
    grid = (num_splits, batch * heads, m_tiles)
    tail_args = tail(pm, pl, pacc, num_splits, span)
    if keys_m:
        wrap(_attn_keys_m_kernel)[grid](*uniform_args, *tail_args, **keys_m_meta)
    elif layouts is None:
        wrap(_attn_split_kernel)[grid](
            *uniform_args,
            *tail_args,
            KBITS=k_bits,
            VBITS=v_bits,
            DECODE=decode,
            OPAQUE=wrap is _identity,  # compiled launches: see _opaque
            **meta,
            **launch_opts,
        )
    else:
        wrap(_attn_split_layout_kernel)[grid](
            *q_args,
            _halfwords(k_codes),
            k_norms.contiguous(),
            _halfwords(v_codes),
            v_norms.contiguous(),
            k_rotation.contiguous(),
            k_scale.contiguous(),
            k_levels.contiguous(),
            v_levels.contiguous(),
            k_scale if k_perm is None else k_perm.contiguous(),
            *tail_args,
            KL=layouts[0],
            VL=layouts[1],
            KPERM=k_perm is not None and krb != 0,  # a host-rotated q (dense K) is already in perm order
            **meta,
        )
    vrb = v_rotation.shape[-1]
    dense_v = vrb > 4  # the combine step un-rotates whole dense blocks
    out = torch.empty((batch, q_heads, q_len, dim), dtype=q.dtype, device=device)
    block_s = min(COMBINE_BLOCK_S, max(2, triton.next_power_of_2(num_splits)))
    block_d = vrb if dense_v else min(dim, max(16, COMBINE_TILE // block_s))
    dense_k = min(32, vrb, max(16, COMBINE_TILE // block_s))  # a [dense_k, vrb] slice of R and [block_s, dense_k] loads
    wrap(_attn_combine_kernel)[(rows, batch * heads, dim // block_d)](
        pm,
        pl,
        pacc,
        v_rotation.contiguous(),
        v_scale.contiguous(),
        v_mean.contiguous(),
        v_mean if v_perm is None else v_perm.contiguous(),
        out,
        pm if lse is None else lse,  # unused without WRITE_LSE
        heads,
        rep,
        q_len,
        rows,
        num_splits,
        D=dim,
        VRB=vrb,
        VNB=v_rotation.shape[1],
        VPERM=v_perm is not None,
        BLOCK_S=block_s,
        BLOCK_D=block_d,
        WRITE_LSE=with_lse,
        VDENSE=dense_v,
        DENSE_K=dense_k,
        num_warps=4,
    )
    return (out, lse) if with_lse else out


def default_sm_scale(dim: int) -> float:
    return 1.0 / math.sqrt(dim)
