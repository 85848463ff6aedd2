"""Byte-permute (PTX `prmt.b32`) table decode of packed codes to fp16 codebook values (attention `DECODE=1`).

One list of steps per code width is both the inline PTX (`asm`) and a numpy emulator (`emulate`), so the two cannot
drift; tests/test_kernels.py runs the emulator against the reference decode, and the attention kernel's interpreter
mode runs a Triton transcription of the same steps (`attention._prmt_emulated`).

`prmt.b32 d, a, b, c` (default mode): bytes 0-3 of a and 4-7 of b form an 8-byte pool; result byte i is pool byte
`c[4i+2:4i]`, or, where `c[4i+3]` is set, that byte's sign bit replicated over 8 bits (only c's low 16 bits count).
The codebook's fp16 values are split into a table of low bytes and one of high bytes (4 levels per 32-bit word,
`table_words`): one prmt looks up the low bytes of 4 codes whose 3-bit indexes sit in the selector's nibbles, a
second their high bytes, and two more interleave the two into two fp16x2 pairs.

2 and 3 bits (one asm per int32 word of the 2-bit low plane: 16 codes). The low plane puts code i at bits 2i..2i+1
of the word, so `w & 0x33333333` holds the even codes 0, 2, ..., 14 as nibbles 0..7 and `(w >> 2) & 0x33333333` the
odd ones: no bit spreading, but each pair comes out as (c0, c2), (c4, c6), ..., (c1, c3), ...: the asm returns its 16
values in the column order `COLUMNS[bits]` (even codes, then odd codes), and the kernel permutes q's columns (K) and
the accumulator's store (V) to match. 3 bits: bit 2 of each code (the high plane's 16 bits for this word, `hh`,
bits 0..15) is spread to bit 2 of the selector nibbles: one prmt spreads its two bytes to bytes 0 and 2, two
shift-or steps spread the bits to h_{2k} at 4k and h_{2k+1} at 4k+1, then two shifts and masks place them.
4 bits (one asm per word: 8 codes, natural order): the 16-level tables take two lookups per byte (levels 0-7 and
8-15, by the code's low 3 bits) and a byte select on the code's bit 3 (a mask made by prmt's sign mode).

Instructions per element (PTX; ptxas fuses each and+or into one LOP3): 2 bits 21/16, 3 bits 30/16, 4 bits 21/8.
"""

from __future__ import annotations

import numpy as np

# fp16 output column j of one asm block holds code COLUMNS[bits][j] of the block
COLUMNS = {
    2: tuple(range(0, 16, 2)) + tuple(range(1, 16, 2)),
    3: tuple(range(0, 16, 2)) + tuple(range(1, 16, 2)),
    4: tuple(range(8)),
}
CODES = {2: 16, 3: 16, 4: 8}  # codes per asm block (= one int32 word of the low plane)
LOP3_MUX = 0xD8  # lop3 LUT of (a & ~c) | (b & c)


def _lookup_pairs(steps, sel, lo_a, lo_b, hi_a, hi_b, tag):
    """Low and high bytes of the 4 codes in `sel`'s nibbles, interleaved into two fp16x2 pairs."""
    steps += [
        ("prmt", f"l{tag}", lo_a, lo_b, sel),
        ("prmt", f"h{tag}", hi_a, hi_b, sel),
        ("prmt", f"p{tag}0", f"l{tag}", f"h{tag}", 0x5140),
        ("prmt", f"p{tag}1", f"l{tag}", f"h{tag}", 0x7362),
    ]
    return [f"p{tag}0", f"p{tag}1"]


def program(bits: int):
    """(inputs, steps, outputs): input register names (the asm's int32 operands, in order), steps
    (op, dst, *args) with args register names or int immediates, and the fp16x2 output registers in order
    (low half first)."""
    steps: list = []
    out: list = []
    if bits in (2, 3):
        if bits == 2:
            inputs = ["w", "tlo", "thi"]  # tlo/thi: low/high bytes of fp16(levels[0..3])
            lo = ("tlo", "thi")  # nibble 0..3 picks from the first operand
            hi = ("thi", "tlo")
        else:
            inputs = ["w", "hh", "tlo0", "tlo1", "thi0", "thi1"]  # tlo0: low bytes of levels 0-3, tlo1: 4-7
            lo = ("tlo0", "tlo1")
            hi = ("thi0", "thi1")
        steps += [
            ("and", "e", "w", 0x33333333),  # nibble k: code 2k
            ("shr", "o0", "w", 2),
            ("and", "o", "o0", 0x33333333),  # nibble k: code 2k + 1
        ]
        if bits == 3:
            steps += [
                ("prmt", "x0", "hh", 0, 0x4140),  # h0-7 at bits 0-7, h8-15 at 16-23
                ("shl", "x1", "x0", 4),
                ("or", "x2", "x0", "x1"),
                ("and", "x", "x2", 0x0F0F0F0F),  # h[4g..4g+3] at bits 8g..8g+3
                ("shl", "t0", "x", 2),
                ("or", "t", "x", "t0"),  # h[2k] at bit 4k, h[2k+1] at bit 4k+1
                ("shl", "te0", "t", 2),
                ("and", "te", "te0", 0x44444444),
                ("or", "se", "e", "te"),
                ("shl", "to0", "t", 1),
                ("and", "to", "to0", 0x44444444),
                ("or", "so", "o", "to"),
            ]
        se, so = ("se", "so") if bits == 3 else ("e", "o")
        steps += [("shr", "seh", se, 16), ("shr", "soh", so, 16)]
        for tag, sel in (("0", se), ("1", "seh"), ("2", so), ("3", "soh")):
            out += _lookup_pairs(steps, sel, *lo, *hi, tag)
        return inputs, steps, out
    if bits == 4:
        # t0..t3: low bytes of levels 0-3, 4-7, 8-11, 12-15; u0..u3: high bytes
        inputs = ["w", "t0", "t1", "t2", "t3", "u0", "u1", "u2", "u3"]
        steps += [
            ("and", "s", "w", 0x77777777),  # the codes' low 3 bits (bit 3 set would mean sign mode)
            ("shr", "sh", "s", 16),
            ("shl", "w4", "w", 4),  # bit 3 of code 2m at a byte's sign bit of w4, of code 2m+1 of w
        ]
        for g, sel, msel in ((0, "s", 0xD9C8), (1, "sh", 0xFBEA)):
            steps += [
                ("prmt", f"m{g}", "w4", "w", msel),  # byte i: 0xFF where code 4g+i >= 8
                ("prmt", f"a{g}", "t0", "t1", sel),
                ("prmt", f"b{g}", "t2", "t3", sel),
                ("lop3", f"l{g}", f"a{g}", f"b{g}", f"m{g}", LOP3_MUX),
                ("prmt", f"c{g}", "u0", "u1", sel),
                ("prmt", f"d{g}", "u2", "u3", sel),
                ("lop3", f"h{g}", f"c{g}", f"d{g}", f"m{g}", LOP3_MUX),
                ("prmt", f"p{g}0", f"l{g}", f"h{g}", 0x5140),
                ("prmt", f"p{g}1", f"l{g}", f"h{g}", 0x7362),
            ]
            out += [f"p{g}0", f"p{g}1"]
        return inputs, steps, out
    raise ValueError(f"prmt decode: bits must be 2, 3 or 4, not {bits}")


def asm(bits: int) -> str:
    """The PTX body for `tl.inline_asm_elementwise`: outputs $0..$(2n-1) (fp16, `=h`), inputs after them (`r`)."""
    inputs, steps, out = program(bits)
    n_out = 2 * len(out)
    reg = {name: f"${n_out + i}" for i, name in enumerate(inputs)}
    temps = [s[1] for s in steps]
    for t in temps:
        reg[t] = f"rq{t}"

    def arg(a):
        return reg[a] if isinstance(a, str) else f"0x{a:X}"

    lines = ["{", ".reg .b32 " + ", ".join(reg[t] for t in temps) + ";"]
    for op, dst, *args in steps:
        if op == "lop3":
            a, b, c, lut = args
            lines.append(f"lop3.b32 {reg[dst]}, {arg(a)}, {arg(b)}, {arg(c)}, 0x{lut:X};")
        elif op == "prmt":
            lines.append(f"prmt.b32 {reg[dst]}, {', '.join(arg(a) for a in args)};")
        elif op in ("shl", "shr"):
            lines.append(f"{op}.b32 {reg[dst]}, {arg(args[0])}, {args[1]};")
        else:
            lines.append(f"{op}.b32 {reg[dst]}, {arg(args[0])}, {arg(args[1])};")
    for i, p in enumerate(out):
        lines.append(f"mov.b32 {{${2 * i}, ${2 * i + 1}}}, {reg[p]};")
    lines.append("}")
    # one line: torch.compile / AOTInductor copy the kernel's constexpr globals into generated Python source as
    # string literals, and a newline in one broke that file ("unterminated string literal", H200, torch 2.11)
    return " ".join(lines)


def constraints(bits: int) -> str:
    inputs, _, out = program(bits)
    return ",".join(["=h"] * (2 * len(out)) + ["r"] * len(inputs))


def n_inputs(bits: int) -> int:
    return len(program(bits)[0])


# ---------------------------------------------------------------- numpy emulator of the same steps


def prmt_np(a, b, c):
    """PTX prmt.b32 (default mode) on uint32 arrays."""
    a, b, c = (np.asarray(v, dtype=np.uint64) & 0xFFFFFFFF for v in (a, b, c))
    pool = a | (b << np.uint64(32))
    r = np.zeros(np.broadcast(a, b, c).shape, dtype=np.uint64)
    for i in range(4):
        nib = (c >> np.uint64(4 * i)) & np.uint64(0xF)
        byte = (pool >> ((nib & np.uint64(7)) * np.uint64(8))) & np.uint64(0xFF)
        sign = np.where(byte & np.uint64(0x80), np.uint64(0xFF), np.uint64(0))
        byte = np.where(nib & np.uint64(8), sign, byte)
        r |= byte << np.uint64(8 * i)
    return r.astype(np.uint32)


def lop3_np(a, b, c, lut):
    a, b, c = (np.asarray(v, dtype=np.uint32) for v in (a, b, c))
    r = np.zeros(np.broadcast(a, b, c).shape, dtype=np.uint32)
    for k in range(8):  # LUT bit index = (a << 2) | (b << 1) | c per bit position
        if lut >> k & 1:
            ma = a if k & 4 else ~a
            mb = b if k & 2 else ~b
            mc = c if k & 1 else ~c
            r |= ma & mb & mc
    return r


def emulate(bits: int, *values):
    """The asm's fp16 outputs (uint16 bit patterns, [..., 2 * pairs], column order COLUMNS[bits]) for int32/uint32
    input arrays in program(bits)[0] order."""
    inputs, steps, out = program(bits)
    reg = {name: np.asarray(v).astype(np.int64).astype(np.uint64).astype(np.uint32) for name, v in zip(inputs, values)}

    def val(a):
        return reg[a] if isinstance(a, str) else np.uint32(a)

    for op, dst, *args in steps:
        if op == "prmt":
            reg[dst] = prmt_np(*(val(a) for a in args))
        elif op == "lop3":
            reg[dst] = lop3_np(val(args[0]), val(args[1]), val(args[2]), args[3])
        elif op == "shl":
            reg[dst] = ((reg[args[0]].astype(np.uint64) << np.uint64(args[1])) & 0xFFFFFFFF).astype(np.uint32)
        elif op == "shr":
            reg[dst] = reg[args[0]] >> np.uint32(args[1])
        elif op == "and":
            reg[dst] = val(args[0]) & val(args[1])
        elif op == "or":
            reg[dst] = val(args[0]) | val(args[1])
        else:
            raise ValueError(op)
    halves = []
    for p in out:
        halves += [reg[p] & 0xFFFF, reg[p] >> 16]
    return np.stack(halves, axis=-1).astype(np.uint16)


def table_words(levels, bits: int):
    """The table operands of program(bits) for fp32 `levels` (2**bits of them): words of the low, then the high
    bytes of fp16(level) (round to nearest), 4 levels per word, as int32."""
    h = np.asarray(levels, dtype=np.float32).astype(np.float16).view(np.uint16).astype(np.uint32)
    lo, hi = h & 0xFF, h >> 8
    words = []
    for plane in (lo, hi):
        for g in range(len(h) // 4):
            q = plane[4 * g : 4 * g + 4]
            words.append(int(q[0] | q[1] << 8 | q[2] << 16 | q[3] << 24))
    return [np.int32(np.uint32(x).view(np.int32)) for x in words]
