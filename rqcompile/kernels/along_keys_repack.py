"""V codes packed along keys (`packing.pack_along_keys`) re-packed per token (`packing.pack`), in one Triton launch.

The attention kernels that cannot read V along keys (prefill-sized calls) and the dequantize kernel read codes packed
per token. As torch ops (`pack(unpack_along_keys(...))`) the conversion builds int64 codes, 8 * dim bytes per token
(a 1 GB transient for one layer's 128K-token V cache); this kernel reads each block of 16 tokens once and writes its
16 rows once: a copy, bandwidth-bound, with no temporaries.

Both layouts are bit matrices of one block: along keys, word c of the 2-bit plane holds coordinate c's codes of the
16 tokens (token k at bits 2k); per token, word w of token k's row holds coordinates 16w..16w+15 (coordinate 16w + j
at bits 2j). So each group of 16 words is a 16 x 16 matrix of 2-bit fields to transpose, done in registers with the
four masked swap stages of the classic recursive transpose (Hacker's Delight 7-3: about 12 operations per word, not
4 per field). The high bit plane (3 bits) is the same transpose once each word's two halfwords are interleaved (bit
k -> 2k, bit 16 + k -> 2k + 1): then field k of word m is coordinates 2m, 2m + 1 of token k, and the transposed word
holds 32 coordinates' high bits in order, which is the per-token high plane word.

Rows of a whole number of int32 words (dim % 16 == 0 at 2 bits, dim % 32 == 0 at 3 bits: every power-of-two head_dim
>= 32) are stored as words; other dims (a multiple of 8, as packing allows) pad the last group with zeros and store
the row's bytes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rqcompile.quant.packing import KEY_BLOCK, _traced, packed_size

_WORDS_PER_PROGRAM = 2048  # 32-bit words of one plane each program transposes (several blocks of 16 tokens)


@triton.jit
def _swap_stage(x, R: tl.constexpr, S: tl.constexpr, MASK: tl.constexpr):
    """One stage of the 16 x 16 transpose of 2-bit fields, on each row of x [R, 16] (uint32 words): words j and
    j + S (bit S of j clear) exchange word j's fields S..2S-1 of each 2S with word j + S's fields 0..S-1 (MASK: the
    latter's bits)."""
    SHIFT: tl.constexpr = 2 * S
    y = tl.permute(tl.reshape(x, (R, 8 // S, 2, S)), (0, 1, 3, 2))  # [R, 16/2S, S, 2]: words j, j + S last
    lo, hi = tl.split(y)
    t = ((lo >> SHIFT) ^ hi) & MASK
    y = tl.join(lo ^ (t << SHIFT), hi ^ t)
    return tl.reshape(tl.permute(y, (0, 1, 3, 2)), (R, 16))


@triton.jit
def _transpose16(x, R: tl.constexpr):
    """Each row of x [R, 16] (uint32) as a 16 x 16 matrix of 2-bit fields (word j, field k at bits 2k), transposed:
    word k of the result holds field k of word j at bits 2j."""
    x = _swap_stage(x, R, 8, 0x0000FFFF)
    x = _swap_stage(x, R, 4, 0x00FF00FF)
    x = _swap_stage(x, R, 2, 0x0F0F0F0F)
    return _swap_stage(x, R, 1, 0x33333333)


@triton.jit
def _interleave_halves(x):
    """Outer perfect shuffle of uint32 words: bit k -> bit 2k and bit 16 + k -> bit 2k + 1 (k < 16)."""
    x = ((x & 0x0000FF00) << 8) | ((x >> 8) & 0x0000FF00) | (x & 0xFF0000FF)
    x = ((x & 0x00F000F0) << 4) | ((x >> 4) & 0x00F000F0) | (x & 0xF00FF00F)
    x = ((x & 0x0C0C0C0C) << 2) | ((x >> 2) & 0x0C0C0C0C) | (x & 0xC3C3C3C3)
    return ((x & 0x22222222) << 1) | ((x >> 1) & 0x22222222) | (x & 0x99999999)


@triton.jit
def _store_plane(
    out_ptr,
    words,
    blk,
    g,
    valid,
    NBYTES: tl.constexpr,
    OFFSET: tl.constexpr,
    PLANE_BYTES: tl.constexpr,
    WORDS: tl.constexpr,
):
    """Store words [R, 16] (row (block, group g), column token k: that token's plane word g) into the rows of the
    per-token layout: plane bytes at OFFSET of each NBYTES-byte row, as int32 words or (WORDS false) byte by byte."""
    k = tl.arange(0, 16)
    row = blk[:, None] * 16 + k[None, :]  # [R, 16] int64 token rows of the flattened output
    if WORDS:
        ptr = out_ptr.to(tl.pointer_type(tl.uint32)) + row * (NBYTES // 4) + (OFFSET // 4 + g)[:, None]
        tl.store(ptr, words, mask=valid[:, None])
    else:
        q = tl.arange(0, 4)
        byte = 4 * g[:, None, None] + q[None, None, :]  # [R, 1, 4] byte of the plane
        vals = ((words[:, :, None] >> (8 * q)[None, None, :]) & 0xFF).to(tl.uint8)
        ptr = out_ptr + row[:, :, None] * NBYTES + OFFSET + byte
        tl.store(ptr, vals, mask=valid[:, None, None] & (byte < PLANE_BYTES))


@triton.jit
def _along_keys_to_tokens_kernel(
    in_ptr,
    out_ptr,
    BLOCKS,
    D: tl.constexpr,
    NBYTES: tl.constexpr,
    HIGH: tl.constexpr,
    WORDS: tl.constexpr,
    NB: tl.constexpr,
    GL: tl.constexpr,
    GH: tl.constexpr,
):
    """One program per NB consecutive blocks of 16 tokens of the flattened [N * T / 16] blocks (block i: bytes
    16 * NBYTES * i on, in both layouts). Rows of the register tiles are (block, group of 16 words of a plane):
    GL groups of the 2-bit plane (words c = 16 g + j of the block), GH of the high plane (words D + 16 g + j), both
    padded to a power of two; padding words load as 0 and are not stored."""
    WPB: tl.constexpr = NBYTES * 4  # 32-bit words per block of 16 tokens
    src = in_ptr.to(tl.pointer_type(tl.uint32))
    first = tl.program_id(0).to(tl.int64) * NB
    j = tl.arange(0, 16)

    r = tl.arange(0, NB * GL)
    blk = first + r // GL
    g = r % GL
    c = 16 * g[:, None] + j[None, :]  # [R, 16] coordinate of the 2-bit plane word
    valid = blk < BLOCKS
    if 16 * GL > D:  # padded groups (a constexpr test: no mask that varies along a row run keeps stores vectorized)
        valid = valid & (16 * g < D)
    low = tl.load(src + blk[:, None] * WPB + c, mask=valid[:, None] & (c < D), other=0)
    _store_plane(out_ptr, _transpose16(low, NB * GL), blk, g, valid, NBYTES, 0, D // 4, WORDS)

    if HIGH:
        r = tl.arange(0, NB * GH)
        blk = first + r // GH
        g = r % GH
        m = 16 * g[:, None] + j[None, :]  # [R, 16] word of the high plane: coordinates 2m, 2m + 1
        valid = blk < BLOCKS
        if 32 * GH > D:
            valid = valid & (32 * g < D)
        high = tl.load(src + blk[:, None] * WPB + D + m, mask=valid[:, None] & (m < D // 2), other=0)
        high = _transpose16(_interleave_halves(high), NB * GH)
        _store_plane(out_ptr, high, blk, g, valid, NBYTES, D // 4, D // 8, WORDS)


def _check(along: torch.Tensor, bits: int, dim: int) -> int:
    """The launcher's contract; returns the bytes per token."""
    if bits not in (2, 3):
        raise ValueError(f"packing along keys covers 2 and 3 bits, not {bits}")
    if along.dtype != torch.uint8:
        raise ValueError(f"codes packed along keys must be uint8, got {along.dtype}")
    if along.dim() < 2:
        raise ValueError(f"codes packed along keys must be [..., T, bytes], got shape {tuple(along.shape)}")
    nbytes = packed_size(dim, bits)
    keys = along.shape[-2]
    if keys % KEY_BLOCK:
        raise ValueError(f"{keys} tokens: codes packed along keys need a multiple of {KEY_BLOCK}")
    if along.shape[-1] != nbytes:
        raise ValueError(f"{along.shape[-1]} bytes per token; {dim} codes of {bits} bits take {nbytes}")
    return nbytes


def launch_along_keys_to_tokens(along: torch.Tensor, bits: int, dim: int, wrap=None) -> torch.Tensor:
    """Codes packed along keys, uint8 [..., T, bytes] (T a multiple of 16), as a new contiguous uint8 tensor of the
    same shape packed per token: bit-exact `pack(unpack_along_keys(along, bits, dim), bits)` in one launch. Any
    leading dims (flattened; a non-contiguous input is copied first). `wrap`: the launch wrapper (None: a plain
    launch; `torch.library.wrap_triton` under torch.compile)."""
    nbytes = _check(along, bits, dim)
    along = along.contiguous()
    if not _traced(along) and along.data_ptr() % 4:  # a view at an odd byte offset: the kernel loads 32-bit words
        along = along.clone()
    out = torch.empty(along.shape, dtype=torch.uint8, device=along.device)
    blocks = along.numel() // (KEY_BLOCK * nbytes)
    if blocks == 0:
        return out
    gl = triton.next_power_of_2(triton.cdiv(dim, 16))
    gh = triton.next_power_of_2(triton.cdiv(dim, 32))
    nb = max(1, _WORDS_PER_PROGRAM // (16 * gl))
    kernel = _along_keys_to_tokens_kernel if wrap is None else wrap(_along_keys_to_tokens_kernel)
    kernel[(triton.cdiv(blocks, nb),)](
        along,
        out,
        blocks,
        D=dim,
        NBYTES=nbytes,
        HIGH=bits == 3,
        WORDS=nbytes % 4 == 0,
        NB=nb,
        GL=gl,
        GH=gh,
        num_warps=4,
    )
    return out
