"""How a tile of packed codes becomes fp16 codebook values inside the attention kernels (constexpr DECODE, the
launcher's `decode`): 0 = a binary tree of selects on the code's bits (exact table values), expanded in registers to
[BLOCK_N, d/PER, PER]; 1 = byte-permute table lookups in inline PTX (kernels/prmt.py: four prmt per four codes, ~2-3
instructions per element instead of ~8-17; 2/3-bit tiles come out with their columns permuted within each block of
16, which q and the accumulator's store follow); 2 = the same steps in Triton integer ops (for the interpreter,
which cannot run inline asm and takes the tree for 1).
"""

from __future__ import annotations

import triton
import triton.language as tl

from rqcompile.kernels import prmt as _prmt_steps


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

# _nop_asm's asm: the timing ablations' stand-in for the decode (attention_keys_m.ABLATIONS)
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
