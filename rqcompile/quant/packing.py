"""Bit packing of quantization codes (layout in docs/FORMAT.md, "Bit packing").

A code of `w` bits is split into planes of 4, 2 and 1 bits (low bits first: 3 = 2+1, 5 = 4+1, 6 = 4+2), and each
plane is packed on its own, so no code straddles a byte: every code is read with at most a few byte loads and shifts
(simple for kernels and expressible with Div/Mod in ONNX). 2 and 4 bits are one plane.

A vector may mix widths (calibrated bit allocation): `widths[i]` is the width of stored coordinate `i`. Coordinates
of equal width must form runs that start and end on multiples of 8; each run is packed as above, runs in order. A
uniform vector is one run, so it has exactly the single-width layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MAX_BITS = 8
RUN_ALIGN = 8  # codes per run must be a multiple of this (whole bytes in every plane)


def planes(bits: int) -> tuple[int, ...]:
    """Widths of the bit planes a code of `bits` bits is split into, low bits first."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits={bits!r} cannot be packed; choose a width in 1..{MAX_BITS}")
    out, left = [], bits
    for width in (4, 2, 1):
        while left >= width:
            out.append(width)
            left -= width
    return tuple(out)


def runs(widths: Sequence[int]) -> tuple[tuple[int, int, int], ...]:
    """(width, start, count) of each maximal run of equal widths, checked to be 8-aligned."""
    if not widths:
        raise ValueError("a layout needs at least one coordinate")
    out, start = [], 0
    for i in range(1, len(widths) + 1):
        if i == len(widths) or widths[i] != widths[start]:
            out.append((int(widths[start]), start, i - start))
            start = i
    for width, start, count in out:
        planes(width)
        if start % RUN_ALIGN or count % RUN_ALIGN:
            raise ValueError(
                f"coordinates of width {width} run over [{start}, {start + count}); runs must start and end on "
                f"multiples of {RUN_ALIGN}"
            )
    return tuple(out)


def packed_size(dim: int, bits: int) -> int:
    """Bytes one vector of `dim` codes of `bits` bits takes."""
    if dim % RUN_ALIGN:
        raise ValueError(f"dimension {dim} must be a multiple of {RUN_ALIGN} for bit packing")
    planes(bits)
    return dim * bits // 8


def layout_size(widths: Sequence[int]) -> int:
    """Bytes one vector with per-coordinate `widths` takes."""
    return sum(count * width // 8 for width, _, count in runs(widths))


def _pack_run(codes: torch.Tensor, bits: int) -> torch.Tensor:
    dim = codes.shape[-1]
    out, shift = [], 0
    for width in planes(bits):
        per_byte = 8 // width
        plane = (codes >> shift) & ((1 << width) - 1)
        plane = plane.unflatten(-1, (dim // per_byte, per_byte))
        weights = torch.tensor([1 << (width * i) for i in range(per_byte)], dtype=torch.int32, device=codes.device)
        out.append((plane * weights).sum(-1))
        shift += width
    return torch.cat(out, dim=-1)


def _unpack_run(data: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    codes = torch.zeros(*data.shape[:-1], dim, dtype=torch.int64, device=data.device)
    start, shift = 0, 0
    for width in planes(bits):
        per_byte = 8 // width
        nbytes = dim // per_byte
        chunk = data[..., start : start + nbytes]
        shifts = torch.arange(per_byte, device=data.device) * width
        plane = (chunk.unsqueeze(-1) >> shifts) & ((1 << width) - 1)
        codes |= plane.flatten(-2) << shift
        start += nbytes
        shift += width
    return codes


def _as_widths(bits: int | Sequence[int], dim: int) -> tuple[int, ...]:
    if isinstance(bits, int) and not isinstance(bits, bool):
        packed_size(dim, bits)
        return (bits,) * dim
    widths = tuple(bits)
    if len(widths) != dim:
        raise ValueError(f"layout has {len(widths)} widths for {dim} coordinates")
    return widths


def pack(codes: torch.Tensor, bits: int | Sequence[int]) -> torch.Tensor:
    """Pack integer codes along the last dim into uint8 bytes; `bits`: one width, or one per coordinate."""
    widths = _as_widths(bits, codes.shape[-1])
    codes = codes.to(torch.int32)
    out = [_pack_run(codes[..., s : s + n], w) for w, s, n in runs(widths)]
    return torch.cat(out, dim=-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int | Sequence[int], dim: int) -> torch.Tensor:
    """Inverse of `pack`: uint8 bytes -> int64 codes of shape [..., dim]."""
    widths = _as_widths(bits, dim)
    if packed.shape[-1] != layout_size(widths):
        raise ValueError(
            f"expected {layout_size(widths)} packed bytes for {dim} codes of this layout, got {packed.shape[-1]}"
        )
    data = packed.to(torch.int64)
    out, offset = [], 0
    for width, _, count in runs(widths):
        nbytes = count * width // 8
        out.append(_unpack_run(data[..., offset : offset + nbytes], width, count))
        offset += nbytes
    return torch.cat(out, dim=-1)


KEY_BLOCK = 16  # keys per word of a tensor packed along keys


def pack_along_keys(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Re-pack codes [..., T, bytes] (this module's layout, T a multiple of KEY_BLOCK) along the key axis, as the
    keys-m kernel's VKEYS prototype reads V (not a format of the cache): each block of 16 keys becomes `dim` 32-bit
    words of the 2-bit plane (word c: coordinate c's codes of the 16 keys, key k at bits 2k) and, at 3 bits, `dim`
    16-bit halfwords of the high plane (key k at bit k). Same shape and bytes per block; little-endian words."""
    if bits not in (2, 3):
        raise ValueError(f"packing along keys covers 2 and 3 bits, not {bits}")
    *lead, keys, _ = packed.shape
    if keys % KEY_BLOCK:
        raise ValueError(f"{keys} keys: packing along keys needs a multiple of {KEY_BLOCK}")
    codes = unpack(packed, bits, dim).unflatten(-2, (keys // KEY_BLOCK, KEY_BLOCK))  # [..., blocks, 16, dim]
    k = torch.arange(KEY_BLOCK, device=packed.device)[:, None]
    low = ((codes & 3) << (2 * k)).sum(-2)  # [..., blocks, dim] (int64: the 32-bit patterns)
    words = [low.to(torch.int64).bitwise_and(0xFFFFFFFF).to(torch.int32)]
    if bits == 3:
        high = (((codes >> 2) & 1) << k).sum(-2)  # [..., blocks, dim] 16-bit patterns
        pairs = high.unflatten(-1, (dim // 2, 2))
        words.append((pairs[..., 0] | (pairs[..., 1] << 16)).bitwise_and(0xFFFFFFFF).to(torch.int32))
    out = torch.cat(words, -1).contiguous().view(torch.uint8)  # [..., blocks, 16 * bytes]
    return out.reshape(*lead, keys, packed.shape[-1])


def unpack_along_keys(along: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of `pack_along_keys`: codes packed along keys [..., T, bytes] -> int64 codes [..., T, dim]."""
    if bits not in (2, 3):
        raise ValueError(f"packing along keys covers 2 and 3 bits, not {bits}")
    *lead, keys, nbytes = along.shape
    if keys % KEY_BLOCK or nbytes != packed_size(dim, bits):
        raise ValueError(f"expected [..., a multiple of {KEY_BLOCK} keys, {packed_size(dim, bits)} bytes]")
    words = along.reshape(*lead, keys // KEY_BLOCK, -1).contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    k = torch.arange(KEY_BLOCK, device=along.device)
    codes = (words[..., :dim, None] >> (2 * k)) & 3  # [..., blocks, dim, 16]
    if bits == 3:
        halves = words[..., dim:].repeat_interleave(2, -1) >> (16 * (torch.arange(dim, device=along.device) % 2))
        codes = codes | (((halves[..., None] >> k) & 1) << 2)
    return codes.transpose(-1, -2).reshape(*lead, keys, dim)
