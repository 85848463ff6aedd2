"""The v2 quantize kernel ("slot tiles"; uniform widths, block or dense rotations).

The norm group is held as P "slot" tiles [BLOCK_T, G/P]: slot s holds the coordinates P*j + s of the group, so
the codes of one stored word (P = 16 codes of 2 bits in an int32, 16 bits of the 1-bit plane in an int16, 8
codes of 4 bits in an int32) sit in the same thread at the same position of the P tiles and pack with shifts and
ORs (no reshape, no shared memory). Row sums are elementwise adds across the tiles plus one reduction of G/P.
The scale search compares `|unit|` against per-candidate thresholds, exact: the smallest float t with
div_rn(t, c) > b (division by c > 0 is monotone), so `|unit| >= t` is the reference's `|unit| / c > b` without a
division per element. _v2_prep_kernel computes them once per launch as vectors into a scratch tensor (an unrolled
per-program prologue cost ~50 instructions per element and minutes of compile time), with 1 / scale per channel
for the remaining divisions (_div_rcp: a reciprocal and one FMA correction, still the IEEE quotient). A tie (unit /
c exactly a boundary) rounds toward zero, so with the symmetric codebook -u codes as the mirror of u: the search
scores each candidate by |unit| against the upward thresholds, one compare each (_magnitude_of_abs; reading
magnitudes from the codebook's upper half was -6 to -18% on the H200 in session 30, one compare instead of the
strict rule's two -15% at 3 bits and -24% at 4 in session 34), and the kept code is the sign plus |unit|'s level
found bit by bit by binary search over the kept candidate's thresholds (_code_bits: -9 to -11%, session 30).
A dense per-group rotation (full mixing, hadamard) is a `tl.dot`, the output split into the slot tiles
(_dense_slots). For bf16 x, by default, (x - mean) / scale is folded into the rotation (_rotate_folded, prep
_fold_prep_kernel; DEFAULTS["v2_dense_fold"]: -22% at 3 bits on the H200, session 32): x goes to three bf16 dots as
loaded. Otherwise u = (x - mean) / scale (_div_rcp) goes to the three tf32 dots of tf32x3 written out over R split
into tf32 halves once per launch (DEFAULTS["v2_dense_split"]: -18% at 3 bits, session 31), else to tl.dot's own
tf32x3, which re-splits R in every program.
v2 is the default for dense bulk writes since session 17 (DEFAULTS["quantize_variant_dense"]), for block rotations
since session 28 (DEFAULTS["quantize_variant"]).
"""

from __future__ import annotations

import triton
import triton.language as tl

from rqcompile.kernels.common import _div_rcp
from rqcompile.kernels.quantize_v1 import TINY, _rotate_dense


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
def _fold_prep_kernel(
    rot_ptr, mean_ptr, scale_ptr, parts_ptr, bias_ptr, D, G: tl.constexpr, NB: tl.constexpr, ROWS: tl.constexpr
):
    """Per launch, for the folded dense rotation (`quantize._fold_rotation`): rows i of R' = R_g diag(1 / scale_g)
    (div_rn: the correctly rounded quotient), split into bf16 parts hi + mid + lo that sum to it exactly (each the
    rounding of what the parts before it left: 3 x 8 significant bits hold fp32's 24), and c_g[i] = sum_k R'[i, k]
    mean_g[k] in float64. One launch: the torch form took ~10 small kernels and their host time per write."""
    hg = tl.program_id(0)  # h * NB + g
    h = hg // NB
    g = hg % NB
    i = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    k = tl.arange(0, G)
    r = tl.load(rot_ptr + hg * G * G + i[:, None] * G + k[None, :])
    ch = h * D + g * G
    folded = tl.math.div_rn(r, tl.load(scale_ptr + ch + k)[None, :])
    hi = folded.to(tl.bfloat16)
    rest = folded - hi.to(tl.float32)
    mid = rest.to(tl.bfloat16)
    lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
    out = parts_ptr + hg * 3 * G * G + i[:, None] * G + k[None, :]
    tl.store(out, hi)
    tl.store(out + G * G, mid)
    tl.store(out + 2 * G * G, lo)
    m = tl.load(mean_ptr + ch + k).to(tl.float64)
    tl.store(bias_ptr + ch + i, tl.sum(folded.to(tl.float64) * m[None, :], axis=1).to(tl.float32))


@triton.jit
def _code_bits(u, thr, BITS: tl.constexpr):
    """The bits of u's code (the count of ascending thresholds `thr` that u reaches), most significant first, by
    binary search: bit d compares u with the middle threshold of the 2**(BITS - d) codes the higher bits left,
    picked by a mux tree over those bits. BITS compares and 2**BITS - 1 - BITS selects per code, against 2**BITS - 1
    compares and as many adds for the count (the same code: the thresholds are sorted)."""
    bits = ()
    for d in tl.static_range(BITS):
        # the middle threshold of each prefix p of the d bits found so far: index (2p + 1) 2^(BITS-1-d) - 1
        cands = ()
        for p in tl.static_range(1 << d):
            cands = cands + (thr[(2 * p + 1) * (1 << (BITS - 1 - d)) - 1],)
        for e in tl.static_range(d):  # fold by the prefix's bits, least significant first
            bit = bits[d - 1 - e]
            folded = ()
            for i in tl.static_range(len(cands) // 2):
                folded = folded + (tl.where(bit, cands[2 * i + 1], cands[2 * i]),)
            cands = folded
        bits = bits + (u >= cands[0],)
    return bits


@triton.jit
def _magnitude_of_abs(m, lev, above, H: tl.constexpr):
    """|levels[code]| for |u| = m: the upward boundaries m reaches (`above`: their thresholds), one compare each.
    The levels are symmetric (levels[H + j] = -levels[H - 1 - j], H = NL / 2: codebook.py builds them so) and a
    tie rounds toward zero (quantizer.boundary_codes), so u and -u take mirrored codes of this magnitude."""
    lv = tl.zeros(m.shape, dtype=tl.float32) + lev[H]
    for j in tl.static_range(H - 1):
        lv = tl.where(m >= above[j], lev[H + 1 + j], lv)
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
    each slot), then each slot's rotated coordinate from the b slots of its block. Blocks that straddle slots (rotor,
    b = 3): coordinate col's block holds col - col % b + k (k < b), at slot offset k - col % b in -(b - 1)..b - 1,
    so u is computed for the slots -(b - 1)..P + b - 2 (the neighbouring words' edge coordinates, masked outside
    0..D - 1) and each input picked from them by col % b: the same values as one gathered load per (slot, k), with
    P + 2 (b - 1) loads of x instead of P b (the TritonGPUCoalesce pass's time grows with the loads times the kernel's
    size squared: minutes for rotor on Triton 3.6)."""
    us = ()
    if P % RB == 0:
        for s in tl.static_range(P):
            col = g * G + jj * P + s
            xv = tl.load(x_row + col[None, :] * sxd, mask=t_ok, other=0.0).to(tl.float32)
            mu = tl.load(mean_ptr + h * D + col)
            sc = tl.load(scale_ptr + h * D + col)
            rs = tl.load(rs_ptr + h * D + col)
            us = us + (_div_rcp(xv - mu[None, :], sc[None, :], rs[None, :], FMA_DIV),)
    else:  # us[o]: coordinate g G + jj P + o - (RB - 1), 0 outside the head
        for o in tl.static_range(P + 2 * (RB - 1)):
            src = g * G + jj * P + (o - (RB - 1))
            sv = (src >= 0) & (src < D)
            xv = tl.load(x_row + src[None, :] * sxd, mask=t_ok & sv[None, :], other=0.0).to(tl.float32)
            mu = tl.load(mean_ptr + h * D + src, mask=sv, other=0.0)
            sc = tl.load(scale_ptr + h * D + src, mask=sv, other=1.0)
            rs = tl.load(rs_ptr + h * D + src, mask=sv, other=1.0)
            u = _div_rcp(xv - mu[None, :], sc[None, :], rs[None, :], FMA_DIV)
            us = us + (tl.where(sv[None, :], u, 0.0),)
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
            else:  # blocks straddle slots (rotor, b = 3): input k of col's block is us[s + k - col % RB + RB - 1]
                coef = tl.load(rot_ptr + ((h * NB + blk) * RB + col % RB) * RB + k)
                u = us[s + k]  # col % RB == RB - 1
                for r in tl.static_range(1, RB):
                    u = tl.where((col % RB == RB - 1 - r)[None, :], us[s + k + r], u)
                y += coef[None, :] * u
        ys = ys + (y,)
        ss += y * y
    return ys, ss


@triton.jit
def _bf16_dot(xv, part, y, DOT_PREC: tl.constexpr):
    """y + xv @ part for bf16 operands; in the interpreter (DOT_PREC "ieee") the same products in fp32, because its
    bf16 dot is wrong (Triton 3.8)."""
    if DOT_PREC == "ieee":
        return tl.dot(xv.to(tl.float32), part.to(tl.float32), y, input_precision="ieee")
    return tl.dot(xv, part, y)


@triton.jit
def _rotate_folded(
    x_row,
    t_ok,
    sxd,
    rot_ptr,
    bias_ptr,
    h,
    g,
    D: tl.constexpr,
    G: tl.constexpr,
    NB: tl.constexpr,
    BLOCK_T: tl.constexpr,
    KC: tl.constexpr,
    DOT_PREC: tl.constexpr,
    PIPE: tl.constexpr = False,
):
    """y [BLOCK_T, G] = x @ R'_g^T - c_g with (x - mean) / scale folded into the rotation: R' = R diag(1 / scale),
    c = R' mean (`quantize._fold_rotation`). R' is stored as three bf16 parts (hi + mid + lo = the fp32 R' exactly),
    and bf16 x is exact in a bf16 dot, so three bf16 dots (twice the tf32 rate) give R' x with fp32 sums, and x goes
    to the tensor cores as it was loaded: no (x - mean) / scale per element, no tf32 split of u.

    PIPE: the same dots in the same order as one runtime loop over (chunk, part), which Triton's software pipeliner
    turns into asynchronous copies of the next part into shared memory under this one's dot. Unrolled (PIPE off),
    each part goes global -> registers -> shared -> dot -> wait in series: half of the stall samples of the write
    without the scale search (ncu, session 33)."""
    ri = tl.arange(0, G)
    y = tl.zeros([BLOCK_T, G], dtype=tl.float32)
    group_rot = rot_ptr + (h * NB + g) * 3 * G * G + ri[None, :] * G  # R'_g[i, k] at [k, i]
    if PIPE:
        for i in range(3 * (G // KC)):
            kk = (i // 3) * KC + tl.arange(0, KC)
            xv = tl.load(x_row + (g * G + kk)[None, :] * sxd, mask=t_ok, other=0.0)
            part = tl.load(group_rot + (2 - i % 3) * G * G + kk[:, None])  # the smallest part first
            y = _bf16_dot(xv, part, y, DOT_PREC)
    else:
        for kc in tl.static_range(G // KC):
            kk = kc * KC + tl.arange(0, KC)
            xv = tl.load(x_row + (g * G + kk)[None, :] * sxd, mask=t_ok, other=0.0)
            for p in tl.static_range(2, -1, -1):  # the smallest part first
                y = _bf16_dot(xv, tl.load(group_rot + p * G * G + kk[:, None]), y, DOT_PREC)
    return y - tl.load(bias_ptr + h * D + g * G + ri)[None, :]


@triton.jit
def _dense_slots(
    x_row,
    t_ok,
    sxd,
    rot_ptr,
    mean_ptr,
    scale_ptr,
    rs_ptr,
    h,
    g,
    D: tl.constexpr,
    G: tl.constexpr,
    NB: tl.constexpr,
    P: tl.constexpr,
    J: tl.constexpr,
    FMA_DIV: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    KC: tl.constexpr,
    rlo_ptr,
    SPLIT: tl.constexpr,
    FOLD: tl.constexpr,
    PIPE: tl.constexpr,
):
    """The dense rotation (full mixing, hadamard: one [G, G] block per norm group) into v2's slot tiles: a tuple of P
    [BLOCK_T, J] tiles (slot s holds rotated coordinates j * P + s) and the group's squared norm per (row, word).
    The group is rotated as v1 rotates it (`_rotate_dense`, tl.dot over chunks of the input, but (x - mean) / scale
    by _div_rcp: -10% on the H200, session 29), then its [BLOCK_T, J, P] columns are split into slots, one bit of s
    per `tl.split`."""
    perm_ptr = mean_ptr  # unused (PERM=False)
    if FOLD:
        y = _rotate_folded(x_row, t_ok, sxd, rot_ptr, rlo_ptr, h, g, D, G, NB, BLOCK_T, KC, DOT_PREC, PIPE)
    else:
        y = _rotate_dense(
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
            D,
            G,
            NB,
            False,
            FMA_DIV,
            DOT_PREC,
            BLOCK_T,
            KC,
            rlo_ptr,
            SPLIT,
        )
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
def _v2_group(
    x_row,
    t_ok,
    t,
    sxd,
    rot_ptr,
    mean_ptr,
    scale_ptr,
    thr_ptr,
    rs_ptr,
    norms_ptr,
    h,
    g,
    jj,
    out_tok,
    T,
    crow,
    lev,
    thr,
    D: tl.constexpr,
    G: tl.constexpr,
    NG: tl.constexpr,
    RB: tl.constexpr,
    NB: tl.constexpr,
    BITS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    NA: tl.constexpr,
    FMA_DIV: tl.constexpr,
    DOT_PREC: tl.constexpr,
    KC: tl.constexpr,
    rlo_ptr,
    SPLIT: tl.constexpr,
    FOLD: tl.constexpr,
    PIPE: tl.constexpr,
):
    """Norm group g of the rows (_quantize_v2_kernel's): rotated into slot tiles, normalized, coded (the scale
    search's candidate kept), its corrected norm and packed codes stored."""
    NL: tl.constexpr = 1 << BITS
    P: tl.constexpr = 8 if BITS == 4 else 16  # codes per stored word (slots)
    J: tl.constexpr = G // P
    LB: tl.constexpr = 2 if BITS == 3 else BITS  # width of the first plane
    # the group rotated into slot tiles, and its squared norm per (row, word)
    if RB == G:
        ys, ss = _dense_slots(
            x_row,
            t_ok,
            sxd,
            rot_ptr,
            mean_ptr,
            scale_ptr,
            rs_ptr,
            h,
            g,
            D,
            G,
            NB,
            P,
            J,
            FMA_DIV,
            DOT_PREC,
            BLOCK_T,
            KC,
            rlo_ptr,
            SPLIT,
            FOLD,
            PIPE,
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
    # codes from the sign and |u| (ties toward zero: a symmetric codebook codes -u as the mirror of u), so the
    # magnitudes are searched against the upward thresholds only; the kept candidate's thresholds per row and the
    # squared length of the codes' reconstruction
    H: tl.constexpr = NL // 2
    mags = ()
    for s in tl.static_range(P):
        mags = mags + (tl.abs(units[s]),)
    if NA == 0:
        row_thr = thr
        den = tl.zeros([BLOCK_T, J], dtype=tl.float32)
        for s in tl.static_range(P):
            lv = _magnitude_of_abs(mags[s], lev, row_thr, H)
            den += lv * lv
        cn2 = tl.sum(den, axis=1)
    else:  # scale search: largest cosine <unit, L[codes]> / ||L[codes]||, the first candidate on ties
        best = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
        cn2 = tl.zeros([BLOCK_T], dtype=tl.float32)
        kept = tl.zeros([BLOCK_T], dtype=tl.int32)
        for a in range(NA):  # a runtime loop: one copy of the body (compile time, code size)
            above = ()
            for j in tl.static_range(H - 1):
                above = above + (tl.load(thr_ptr + a * NL + H + j),)
            num = tl.zeros([BLOCK_T, J], dtype=tl.float32)
            den = tl.zeros([BLOCK_T, J], dtype=tl.float32)
            for s in tl.static_range(P):
                # u * levels[code] = |u| * |levels[code]| (the level has u's sign; u = +-0 adds a zero either way)
                lv = _magnitude_of_abs(mags[s], lev, above, H)
                num += mags[s] * lv
                den += lv * lv
            den_a = tl.sum(den, axis=1)
            cos = tl.math.div_rn(tl.sum(num, axis=1), tl.maximum(tl.sqrt_rn(den_a), TINY))
            better = cos > best
            best = tl.where(better, cos, best)
            cn2 = tl.where(better, den_a, cn2)
            kept = tl.where(better, a, kept)
        row_thr = ()
        for j in tl.static_range(H - 1):
            row_thr = row_thr + (tl.load(thr_ptr + kept * NL + H + j)[:, None],)
    corrected = tl.math.div_rn(n, tl.maximum(tl.sqrt_rn(cn2), TINY))
    tl.store(norms_ptr + out_tok * NG + g, corrected.to(tl.float16), mask=t < T)
    # codes packed per stored word: code = H + m above 0, H - 1 - m at or below (m: |u|'s level above 0), i.e. the
    # sign bit, then m's bits flipped below 0
    lo = tl.zeros([BLOCK_T, J], dtype=tl.int32)
    hi = tl.zeros([BLOCK_T, J], dtype=tl.int32)
    for s in tl.static_range(P):
        up = (units[s] > 0).to(tl.int32)
        mbits = _code_bits(mags[s], row_thr, BITS - 1)
        m = tl.zeros([BLOCK_T, J], dtype=tl.int32)
        for i in tl.static_range(BITS - 1):
            m |= mbits[i].to(tl.int32) << (BITS - 2 - i)
        low = m ^ ((up - 1) & (H - 1))
        if BITS == 3:
            hi |= up << s  # the 1-bit plane
            lo |= low << (LB * s)
        else:
            lo |= ((up << (BITS - 1)) | low) << (LB * s)
    wl = crow + g * (G * LB // 8) + jj[None, :] * 4
    tl.store(wl.to(tl.pointer_type(tl.int32)), lo, mask=t_ok)
    if BITS == 3:
        wh = crow + D // 4 + g * (G // 8) + jj[None, :] * 2
        tl.store(wh.to(tl.pointer_type(tl.int16)), hi.to(tl.int16), mask=t_ok)


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
    KC: tl.constexpr = 32,
    rlo_ptr=None,
    SPLIT: tl.constexpr = False,
    FOLD: tl.constexpr = False,
    PIPE: tl.constexpr = False,
):
    pid_t = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    CB: tl.constexpr = D * BITS // 8
    NL: tl.constexpr = 1 << BITS
    P: tl.constexpr = 8 if BITS == 4 else 16  # codes per stored word (slots)
    J: tl.constexpr = G // P
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = (t < T)[:, None]
    x_row = x_ptr + b.to(tl.int64) * sxb + h * sxh + t.to(tl.int64)[:, None] * sxt
    out_tok = bh.to(tl.int64) * T + t.to(tl.int64)
    crow = codes_ptr + out_tok[:, None] * CB
    jj = tl.arange(0, J)
    # the levels, and the upward thresholds of the plain codes (|u| > b <=> |u| >= the next float above b)
    lev = ()
    for k in tl.static_range(NL):
        lev = lev + (tl.load(lev_ptr + k),)
    thr = ()
    if NA == 0:
        for k in tl.static_range(NL // 2, NL - 1):
            thr = thr + (_float_up((lev[k] + lev[k + 1]) * 0.5),)
    # the groups unrolled for planar and dense rotations; blocks of 3 or 4 (rotor, iso) run them in a runtime loop
    # that keeps one copy of the group's code: Triton 3.6's coalesce pass took minutes over the unrolled groups
    # (rotor, session 25; iso at 3 bits, session 28: 42 s of a 47 s build here, and on the device a check's builds
    # did not finish in 150 s; 16 s as a loop). One of the two loops has a single trip, which the compiler drops.
    UNROLL: tl.constexpr = RB == G or RB <= 2
    for g0 in tl.static_range(NG if UNROLL else 1):
        for g1 in range(1 if UNROLL else NG):
            g = g0 + g1
            _v2_group(
                x_row,
                t_ok,
                t,
                sxd,
                rot_ptr,
                mean_ptr,
                scale_ptr,
                thr_ptr,
                rs_ptr,
                norms_ptr,
                h,
                g,
                jj,
                out_tok,
                T,
                crow,
                lev,
                thr,
                D,
                G,
                NG,
                RB,
                NB,
                BITS,
                BLOCK_T,
                NA,
                FMA_DIV,
                DOT_PREC,
                KC,
                rlo_ptr,
                SPLIT,
                FOLD,
                PIPE,
            )
