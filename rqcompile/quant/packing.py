"""Bit packing of quantization codes at exactly `bits` bits per code (layout in docs/FORMAT.md).

2 and 4 bits pack 4 and 2 codes per byte; 3 bits is stored as a 2-bit plane followed by a 1-bit plane, so every
code is read with at most two byte loads and two shifts, with no code straddling a byte (simple for kernels and
expressible with Div/Mod in ONNX).
"""

from __future__ import annotations

import torch

_PLANES = {2: (2,), 3: (2, 1), 4: (4,)}


def planes(bits: int) -> tuple[int, ...]:
    """Widths of the bit planes a code of `bits` bits is split into, low bits first."""
    try:
        return _PLANES[bits]
    except KeyError:
        raise ValueError(f"bits={bits} is not supported; choose one of {tuple(_PLANES)}") from None


def packed_size(dim: int, bits: int) -> int:
    """Bytes one vector of `dim` codes takes."""
    if dim % 8:
        raise ValueError(f"dimension {dim} must be a multiple of 8 for bit packing")
    return dim * bits // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) along the last dim into uint8 bytes."""
    dim = codes.shape[-1]
    packed_size(dim, bits)
    codes = codes.to(torch.int32)
    out, shift = [], 0
    for width in planes(bits):
        per_byte = 8 // width
        plane = (codes >> shift) & ((1 << width) - 1)
        plane = plane.unflatten(-1, (dim // per_byte, per_byte))
        weights = torch.tensor([1 << (width * i) for i in range(per_byte)], dtype=torch.int32, device=codes.device)
        out.append((plane * weights).sum(-1))
        shift += width
    return torch.cat(out, dim=-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of `pack`: uint8 bytes -> int64 codes of shape [..., dim]."""
    if packed.shape[-1] != packed_size(dim, bits):
        raise ValueError(
            f"expected {packed_size(dim, bits)} packed bytes for dim={dim}, bits={bits}, got {packed.shape[-1]}"
        )
    data = packed.to(torch.int64)
    codes = torch.zeros(*packed.shape[:-1], dim, dtype=torch.int64, device=packed.device)
    start, shift = 0, 0
    for width in planes(bits):
        per_byte = 8 // width
        nbytes = dim // per_byte
        chunk = data[..., start : start + nbytes]
        shifts = torch.arange(per_byte, device=packed.device) * width
        plane = (chunk.unsqueeze(-1) >> shifts) & ((1 << width) - 1)
        codes |= plane.flatten(-2) << shift
        start += nbytes
        shift += width
    return codes
