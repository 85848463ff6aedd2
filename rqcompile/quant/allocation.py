"""Calibrated bit allocation: more bits for the rotated coordinates whose error costs most, fewer for the rest.

Why: a 2-4 dimensional block rotation cannot spread a few dominant key channels over the whole vector the way a
dense Hadamard does. Instead of fighting that anisotropy, spend it. For coordinates with error weights `w_j`
(calibration: keys `E[q_j^2] var(k_j)`, the variance their error adds to attention scores; values
`||W_o[:, j]||^2 var(v_j)`), the distortion `sum_j w_j D(b_j)` at a fixed average width is minimized by giving each
coordinate about `0.5 log2(w_j / geomean(w))` bits more than the average (reverse water-filling); the gain over
uniform widths is `0.5 log2(mean(w) / geomean(w))` bits per coordinate, ~0.5-1.7 bits for SmolLM2's keys.

The rotation stays block-diagonal: whole rotation blocks are reordered (a per-head channel permutation applied
before rotating) so that blocks of similar weight sit together, and stored coordinates are then given widths in
segments of 16 (8 when head_dim is not a multiple of 16), one width profile per (layer, K|V) shared by its heads,
non-increasing along the vector. Everything is deterministic from the calibration.
"""

from __future__ import annotations

import torch

from rqcompile.quant.codebook import lloyd_max_distortion


def _distortion(bits: int) -> float:
    return lloyd_max_distortion(bits)


def block_order(weight: torch.Tensor, block: int) -> torch.Tensor:
    """Per head, channel indices with the rotation's whole blocks sorted by total weight, heaviest first
    (a trailing partial block stays last, where the rotation's zero padding expects it)."""
    heads, dim = weight.shape
    full = dim // block
    sums = weight[:, : full * block].reshape(heads, full, block).sum(-1)
    order = torch.argsort(sums, dim=-1, descending=True, stable=True)  # [H, full]
    channels = (order[..., None] * block + torch.arange(block)).flatten(1)
    tail = torch.arange(full * block, dim).expand(heads, -1)
    return torch.cat([channels, tail], dim=1)


def rotated_weight(weight: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Error weight of each rotated coordinate: `W_j = sum_i R_ji^2 w_i` within its block."""
    heads, dim = weight.shape
    _, nb, b, _ = rotation.shape
    padded = torch.nn.functional.pad(weight, (0, nb * b - dim)).view(heads, nb, b)
    return torch.einsum("hnji,hni->hnj", rotation.pow(2), padded).reshape(heads, nb * b)[:, :dim]


def segment_widths(segment_weight: torch.Tensor, avg_bits: float, allowed: tuple[int, ...]) -> list[int]:
    """Greedy reverse water-filling over segments: start every segment at the smallest allowed width and keep
    giving the next width step to the segment with the largest distortion saved per bit, until the budget
    `round(avg_bits * segments)` is spent. Returned non-increasing (segments are sorted by weight)."""
    widths = sorted(allowed)
    count = segment_weight.numel()
    bits = [widths[0]] * count
    budget = round(avg_bits * count) - widths[0] * count
    w = segment_weight.tolist()
    while budget > 0:
        best, best_gain, best_step = None, -1.0, 0
        for j, b in enumerate(bits):
            bigger = [x for x in widths if x > b]
            if not bigger or bigger[0] - b > budget:
                continue
            step = bigger[0] - b
            gain = w[j] * (_distortion(b) - _distortion(bigger[0])) / step
            if gain > best_gain:
                best, best_gain, best_step = j, gain, step
        if best is None:
            break
        bits[best] += best_step
        budget -= best_step
    return sorted(bits, reverse=True)


def allocate_bits(
    weight: torch.Tensor, rotation: torch.Tensor, avg_bits: float, allowed: tuple[int, ...]
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(perm [H, d] int64, per-coordinate widths) for channel error weights `weight` [H, d] and a rotation
    [H, nb, b, b], averaging `avg_bits` (rounded to whole bits per segment) with widths from `allowed`."""
    heads, dim = weight.shape
    if not allowed or min(allowed) > avg_bits or max(allowed) < avg_bits:
        raise ValueError(f"average width {avg_bits} is outside the allowed widths {allowed}")
    if not torch.isfinite(weight).all() or (weight < 0).any():
        raise ValueError("calibration error weights must be finite and non-negative")
    block = rotation.shape[-1]
    unit = 16 if dim % 16 == 0 else 8
    if dim % unit:
        raise ValueError(f"bit allocation needs head_dim divisible by 8, got {dim}")
    perm = block_order(weight, block)
    stored = rotated_weight(weight.gather(1, perm), rotation)  # [H, d] in stored order
    segments = stored.view(heads, dim // unit, unit).sum(-1)
    # heads share one profile: segment s of every head is its s-th heaviest group of blocks
    per_segment = segment_widths(segments.sum(0), avg_bits, tuple(sorted(set(allowed))))
    widths = tuple(w for w in per_segment for _ in range(unit))
    return perm, widths


__all__ = ["allocate_bits", "block_order", "rotated_weight", "segment_widths"]
