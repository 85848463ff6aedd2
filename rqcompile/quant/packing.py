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
    """Re-pack codes [..., T, bytes] (this module's layout, T a multiple of KEY_BLOCK) along the key axis, the layout
    of V with `RQConfig(value_layout="keys")` (docs/FORMAT.md "V packed along keys"): each block of 16 keys becomes
    `dim` 32-bit words of the 2-bit plane (word c: coordinate c's codes of the 16 keys, key k at bits 2k) and, at 3
    bits, `dim` 16-bit halfwords of the high plane (key k at bit k). Same shape and bytes per block; little-endian."""
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


def _traced(x: torch.Tensor) -> bool:
    """Whether `x` is a stand-in of torch.compile / torch.export tracing (fake or functional, no values to read)."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return torch.compiler.is_compiling() or isinstance(x, (FakeTensor, FunctionalTensor))


def check_write_along_keys(
    buffer: torch.Tensor, codes: torch.Tensor, cache_position: torch.Tensor, bits: int, dim: int
) -> None:
    """The contract of `write_along_keys_` (also the Triton launcher's). The positions' values are checked only
    where that costs no host synchronisation and no graph break: concrete CPU tensors outside tracing; elsewhere a
    position past the buffer drops that token's write (the clamped window never touches other rows)."""
    if bits not in (2, 3):
        raise ValueError(f"packing along keys covers 2 and 3 bits, not {bits}")
    if buffer.dim() != 4 or codes.dim() != 4:
        raise ValueError(
            f"buffer and codes must be [B, H, T, bytes], got {tuple(buffer.shape)} and {tuple(codes.shape)}"
        )
    if buffer.dtype != torch.uint8 or codes.dtype != torch.uint8:
        raise ValueError(f"buffer and codes must be uint8, got {buffer.dtype} and {codes.dtype}")
    batch, heads, keys, nbytes = buffer.shape
    if keys % KEY_BLOCK:
        raise ValueError(f"the buffer holds {keys} keys: packing along keys needs a multiple of {KEY_BLOCK}")
    if nbytes != packed_size(dim, bits):
        raise ValueError(
            f"the buffer has {nbytes} bytes per key; {dim} codes of {bits} bits take {packed_size(dim, bits)}"
        )
    if buffer.stride(3) != 1 or buffer.stride(2) != nbytes:
        raise ValueError(f"the buffer's keys of one head must be contiguous, got strides {buffer.stride()}")
    if (codes.shape[0], codes.shape[1], codes.shape[3]) != (batch, heads, nbytes):
        raise ValueError(f"codes {tuple(codes.shape)} do not match the buffer {tuple(buffer.shape)} in B, H or bytes")
    if cache_position.dim() != 1 or cache_position.numel() != codes.shape[2]:
        raise ValueError(
            f"cache_position {tuple(cache_position.shape)} must list the {codes.shape[2]} new tokens' slots"
        )
    if cache_position.is_floating_point() or cache_position.is_complex() or cache_position.dtype == torch.bool:
        raise ValueError(f"cache_position must hold integers, got {cache_position.dtype}")
    if codes.device != buffer.device or cache_position.device != buffer.device:
        raise ValueError(
            f"buffer, codes and cache_position must share a device, got {buffer.device}, {codes.device} and "
            f"{cache_position.device}"
        )
    tokens = cache_position.numel()
    if tokens == 0 or cache_position.device.type != "cpu" or _traced(cache_position):
        return
    start = int(cache_position[0])
    if not torch.equal(cache_position.to(torch.int64), start + torch.arange(tokens)):
        raise ValueError(f"cache positions must be consecutive and increasing, got {cache_position.tolist()[:8]}...")
    if start < 0:
        raise ValueError(f"cache position {start} is negative")
    if start + tokens > keys:
        raise ValueError(f"cache position {start + tokens - 1} is past the cache length {keys} (slots 0..{keys - 1})")


def write_along_keys_(
    buffer: torch.Tensor, codes: torch.Tensor, cache_position: torch.Tensor, bits: int, dim: int
) -> None:
    """Write t tokens' `codes` [B, H, t, bytes] (standard layout, as the quantize kernels store them) at the
    consecutive slots `cache_position` [t] into `buffer` [B, H, T, bytes] packed along keys, in place; every other
    key keeps its bits (read-modify-write of the blocks of 16 keys the slots touch).

    Static shapes and no host synchronisation (torch.export / torch.compile trace it; start is a tensor): a window of
    min(ceil(t/16) + 1, T/16) consecutive blocks, which covers t slots from any offset in a block, is gathered from
    start // 16, moved back so it stays inside the buffer (no block written twice), re-packed with the new rows and
    scattered back."""
    check_write_along_keys(buffer, codes, cache_position, bits, dim)
    batch, heads, keys, nbytes = buffer.shape
    tokens = codes.shape[2]
    if tokens == 0:
        return
    blocks = keys // KEY_BLOCK
    n = min(-(-tokens // KEY_BLOCK) + 1, blocks)
    device = buffer.device
    start = cache_position[:1].to(torch.int64)
    first = (start // KEY_BLOCK).clamp(0, blocks - n)  # [1]
    index = first + torch.arange(n, device=device)
    view = buffer.view(batch, heads, blocks, KEY_BLOCK * nbytes)
    window = view.index_select(2, index).reshape(batch, heads, n * KEY_BLOCK, nbytes)
    row = first * KEY_BLOCK + torch.arange(n * KEY_BLOCK, device=device) - start  # which new token each key is
    written = ((row >= 0) & (row < tokens))[:, None]
    new = codes.index_select(2, row.clamp(0, tokens - 1))
    old = pack(unpack_along_keys(window, bits, dim), bits)
    merged = torch.where(written, new, old)
    view.index_copy_(2, index, pack_along_keys(merged, bits, dim).reshape(batch, heads, n, KEY_BLOCK * nbytes))
