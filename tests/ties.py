"""Inputs whose unit coordinates sit exactly on decision boundaries: where two encoders disagree unless they share
the format's tie rule (docs/FORMAT.md, "Ties"). Shared by the reference, kernel and ONNX tests."""

from __future__ import annotations

import torch

from rqcompile.quant.codebook import boundaries


def tie_levels(bits: int) -> tuple[torch.Tensor, int]:
    """A symmetric codebook with magnitudes (2k + 1) / (2n) (so its boundaries are k / n, exact midpoints) and the
    n it was built for."""
    n = 8 if bits < 4 else 16
    mags = [(2 * k + 1) / (2 * n) for k in range(1 << (bits - 1))]
    return torch.tensor([-m for m in reversed(mags)] + mags), n


def tie_input(bits: int, tokens: int = 8, heads: int = 2, dim: int = 256, group: int = 128, seed: int = 0):
    """x [1, heads, tokens, dim] whose norm groups are integers -H..H with squared sum n^2 (H = 2**(bits - 1)), so
    each group's norm is n and its units x / n are 0, a boundary of `tie_levels(bits)` exactly, or above the top
    one: every boundary appears at least once per group, with random signs and positions."""
    h = 1 << (bits - 1)
    _, n = tie_levels(bits)
    parts = list(range(1, h + 1))  # each boundary at least once, and above the top one; then the largest that fit
    left = n * n - sum(k * k for k in parts)
    for k in range(h, 0, -1):
        parts += [k] * (left // (k * k))
        left %= k * k
    assert left == 0 and len(parts) <= group
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(1, heads, tokens, dim)
    for hh in range(heads):
        for t in range(tokens):
            for grp in range(dim // group):
                where = torch.randperm(group, generator=g)[: len(parts)] + grp * group
                signs = torch.randint(0, 2, (len(parts),), generator=g) * 2 - 1
                x[0, hh, t, where] = torch.tensor(parts, dtype=torch.float32) * signs
    return x


def tie_params(bits: int, heads: int = 2, dim: int = 256, group: int = 128, search: bool = True):
    """(rotation, mean, scale, levels) of an identity dense rotation per group, mean 0, scale 1, the tie codebook
    and, with `search`, the scale candidates 1 and 2 (1 keeps every tie; 2 halves the units)."""
    levels, _ = tie_levels(bits)
    if search:
        levels = torch.cat([levels, torch.tensor([1.0, 2.0])])
    rotation = torch.eye(group).expand(heads, dim // group, group, group).contiguous()
    return rotation, torch.zeros(heads, dim), torch.ones(heads, dim), levels


def strict_codes(unit: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Codes under the rule the format had before session 35 (`u > b` on both sides of 0): what a test compares
    with to show that its input holds ties the two rules split."""
    return (unit.unsqueeze(-1) > boundaries(levels)).sum(-1)
