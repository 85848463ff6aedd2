"""rq::attention's `rope_ab` score term (a pre-RoPE key offset turned to each key's slot j), shared by every
attention kernel.

A score gains sum_i A_i cos(j theta_i) + B_i sin(j theta_i) for key slot j (rope_ab = [A | B] per query row, theta =
rope_inv_freq, the angle the fp32 product float32(j) * theta_i as in ops.rope_score_bias). Each program loads its
rows' A and B once (times qk_scale, as q), and per key tile computes the [ROPE_K, BLOCK_N] angles, their cos and
sin, and two fp16 dots (K = ROPE_K) into the scores: the sincos work is shared by all the program's query rows (the
KV head's query heads x Tq). keys-m, the decode kernel, computes the cos / sin of the slots' offsets inside a tile
once and turns them by each tile's start angle (_rope_scores_turned; H200, session 24: -4 to -8% of its time with
the term). h is padded with zero weights and zero frequencies to ROPE_K, a power of two >= 16
(tl.dot's smallest K). ROPE_K 0: no term; the kernels test ROPE_K >= 16, so the rope-free build is the same code
as before the term existed (and tests/kernel_writes_probe.py's placeholder 1 for an argument it does not know is
rope-free too).

keys-m can instead read the cos / sin from `rope_table(rope_inv_freq, slots)`, a per-model constant of fp16 [slots, 2
ROPE_K] (launch_attention's `rope_table`): one fp16 dot per tile against loop-constant weights, no angles, no
turning, and exact to fp16 (the turned angles drift by ~1 ulp of the angle). sm_90 SASS (Triton 3.6, V along keys,
kv_len + kv_start, ROPE_K 32): 211 registers and 1,032 loop instructions uncapped, 168 with 8 B of stack and 967
under keys-m's register cap, against 255 / 1,084 and, capped, 352 B of stack / 1,181 for the turned tables (the build
without the term: 203 / 968, capped 168 / 892).
"""

from __future__ import annotations

import triton
import triton.language as tl

from rqcompile.kernels.common import interpreting


def rope_table(rope_inv_freq, slots: int):
    """fp16 [slots, 2 ROPE_K]: row j holds cos(a_ji) in columns i < h and sin(a_ji) in columns ROPE_K + i, zeros
    elsewhere, with a_ji = float32(j) * theta_i (the fp32 product ops.rope_score_bias and transformers take), its cos /
    sin evaluated in float64 and rounded once to fp16. On rope_inv_freq's device."""
    import torch

    half = rope_inv_freq.numel()
    width = max(16, triton.next_power_of_2(half))
    freq = rope_inv_freq.detach().reshape(-1).to(torch.float32)
    angles = (torch.arange(slots, device=freq.device, dtype=torch.float32)[:, None] * freq[None, :]).double()
    table = torch.zeros(slots, 2 * width, dtype=torch.float64, device=freq.device)
    table[:, :half] = angles.cos()
    table[:, width : width + half] = angles.sin()
    return table.to(torch.float16)


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
def _rope_scores_turned(sc, wa, wb, freq, start, cos_j, sin_j):
    """keys-m's sc^T [BLOCK_N, BLOCK_M] plus the rope term of key slots start + j: the loop-invariant fp32 [BLOCK_N,
    ROPE_K] cos / sin of j t turned by the tile's start angle s t (cos((s + j) t) = cos(j t) cos(s t) - sin(j t)
    sin(s t), sin likewise): four FMAs per entry instead of a range reduction and two SFU calls; the weights stay the
    loop's constant B operands (sm_90, V along keys, kv_len + kv_start: 1,221 -> 1,098 loop instructions, 234 -> 254
    registers, two programs per SM either way). The angle j t + s t differs from the reference's float32(s + j) * t
    (the angle transformers' RoPE turned the key by) by the products' rounding: at most ~1 ulp of the angle, 2^-6 rad
    at 2^17 slots for the fastest pair (t = 1), proportionally less for the others; a change of the term well under
    the 3-bit keys' own error, but larger than fp16's rounding at long contexts."""
    cs, ss = _cos_sin(tl.cast(start, tl.float32) * freq)
    ct = cos_j * cs[None, :] - sin_j * ss[None, :]
    st = sin_j * cs[None, :] + cos_j * ss[None, :]
    sc = tl.dot(ct.to(tl.float16), wa, sc)
    return tl.dot(st.to(tl.float16), wb, sc)


@triton.jit
def _rope_scores(sc, wa, wb, freq, n):
    """sc [BLOCK_M, BLOCK_N] plus the rope term of key slots n: wa . cos(n theta) + wb . sin(n theta) (fp16 operands,
    fp32 sums into sc; the split and layout kernels)."""
    cos, sin = _cos_sin(freq[:, None] * n.to(tl.float32)[None, :])  # [ROPE_K, BLOCK_N]: float32(j) * theta_i
    sc = tl.dot(wa, cos.to(tl.float16), sc)
    return tl.dot(wb, sin.to(tl.float16), sc)
