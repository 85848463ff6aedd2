"""The cache write into V codes packed along keys (`packing.pack_along_keys`), in place, in one Triton launch.

A decode step (or a prefill chunk) stores t new tokens' codes, packed per token by the quantize kernels, at t
consecutive slots of a static buffer whose blocks of 16 keys hold one int32 word per coordinate (2-bit plane, key k
at bits 2k) and, at 3 bits, one 16-bit halfword per coordinate (high bit, key k at bit k). A token's codes are spread
over every word of its block, so the write is a read-modify-write of the blocks the slots touch: one program per
(batch x head, touched block), which clears the written keys' bits in each word and ORs in the new ones; the other
keys of the block keep their bits. Same result as `packing.write_along_keys_` (the torch ops torch.export traces).

The first slot is read inside the kernel from cache_position (no host synchronisation: the launch can be captured in
a CUDA graph and replayed at every step); the grid covers ceil(t/16) + 1 blocks from it, which holds t slots from any
offset in a block, and programs past the buffer or without a written key store nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rqcompile.quant.packing import KEY_BLOCK, check_write_along_keys


@triton.jit
def _write_along_keys_kernel(
    buf_ptr,
    sbb,
    sbh,
    codes_ptr,
    scb,
    sch,
    sct,
    pos_ptr,
    H,
    BLOCKS,
    T_NEW,
    D: tl.constexpr,
    DP: tl.constexpr,
    HP: tl.constexpr,
    NBYTES: tl.constexpr,
    HIGH: tl.constexpr,
):
    """One program per (batch x head, j-th block of the window): block start // 16 + j. Standard layout of a code
    row (bytes): 2-bit code i at bits 2 (i % 4) of byte i // 4; at 3 bits, bit 2 of code i at bit i % 8 of byte
    D / 4 + i // 8. Block words (int32): word c = coordinate c's 2-bit codes, key k at bits 2k; at 3 bits, word
    D + c // 2 holds coordinate c's high bits at bits 16 (c % 2) + k."""
    bh = tl.program_id(0)
    j = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    start = tl.load(pos_ptr).to(tl.int64)
    block = start // 16 + j
    k = tl.arange(0, 16)
    row = block * 16 + k - start  # which new token key k of the block is
    written = (row >= 0) & (row < T_NEW) & (block < BLOCKS)
    live = tl.sum(written.to(tl.int32), axis=0) > 0
    words = (buf_ptr + b * sbb + h * sbh + block * (16 * NBYTES)).to(tl.pointer_type(tl.int32))
    rows = codes_ptr + b * scb + h * sch + tl.where(written, row, 0) * sct  # [16] byte pointers
    c = tl.arange(0, DP)
    cm = c < D
    wmask = written[:, None] & cm[None, :]
    byte = tl.load(rows[:, None] + (c // 4)[None, :], mask=wmask, other=0).to(tl.int32)
    low = (byte >> (2 * (c % 4))[None, :]) & 3
    new_low = tl.sum(low << (2 * k)[:, None], axis=0)  # disjoint bits: the sum is their OR
    keep_low = ~tl.sum(tl.where(written, 3 << (2 * k), 0), axis=0)
    old_low = tl.load(words + c, mask=cm & live, other=0)
    tl.store(words + c, (old_low & keep_low) | new_low, mask=cm & live)
    if HIGH:
        m = tl.arange(0, HP)
        mm = m < D // 2
        hmask = written[:, None] & mm[None, :]
        even = 2 * m
        odd = even + 1
        be = tl.load(rows[:, None] + (D // 4 + even // 8)[None, :], mask=hmask, other=0).to(tl.int32)
        bo = tl.load(rows[:, None] + (D // 4 + odd // 8)[None, :], mask=hmask, other=0).to(tl.int32)
        he = (be >> (even % 8)[None, :]) & 1
        ho = (bo >> (odd % 8)[None, :]) & 1
        new_high = tl.sum((he << k[:, None]) | (ho << (k + 16)[:, None]), axis=0)
        half = tl.sum(tl.where(written, 1 << k, 0), axis=0)
        keep_high = ~(half | (half << 16))
        old_high = tl.load(words + D + m, mask=mm & live, other=0)
        tl.store(words + D + m, (old_high & keep_high) | new_high, mask=mm & live)


def launch_write_along_keys(
    buffer: torch.Tensor, codes: torch.Tensor, cache_position: torch.Tensor, bits: int, dim: int, wrap=None
) -> None:
    """`packing.write_along_keys_` as one kernel launch: `codes` [B, H, t, bytes] (standard layout) into `buffer`
    [B, H, T, bytes] packed along keys at the t consecutive slots `cache_position` [t], in place. `wrap`: the launch
    wrapper (None: a plain launch; `torch.library.wrap_triton` under torch.compile)."""
    check_write_along_keys(buffer, codes, cache_position, bits, dim)
    batch, heads, keys, nbytes = buffer.shape
    tokens = codes.shape[2]
    if tokens == 0 or batch * heads == 0:
        return
    if codes.stride(3) != 1:
        codes = codes.contiguous()
    blocks = keys // KEY_BLOCK
    grid = (batch * heads, min(triton.cdiv(tokens, KEY_BLOCK) + 1, blocks))
    kernel = _write_along_keys_kernel if wrap is None else wrap(_write_along_keys_kernel)
    kernel[grid](
        buffer,
        buffer.stride(0),
        buffer.stride(1),
        codes,
        codes.stride(0),
        codes.stride(1),
        codes.stride(2),
        cache_position,
        heads,
        blocks,
        tokens,
        D=dim,
        DP=triton.next_power_of_2(dim),
        HP=triton.next_power_of_2(dim // 2),
        NBYTES=nbytes,
        HIGH=bits == 3,
        num_warps=4,
    )
