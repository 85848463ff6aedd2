"""Lloyd-Max codebooks for the coordinates of a rotated, normalized vector.

After a random rotation each coordinate of a unit vector in R^g is close to N(0, 1/g), so the MSE-optimal scalar
quantizer is the Lloyd-Max quantizer of the standard normal scaled by 1/sqrt(g). The N(0, 1) levels are computed
once, exactly (Lloyd iteration on the closed-form Gaussian centroids in float64), and checked in the tests against
the published tables.
"""

from __future__ import annotations

import functools
import math

import torch

_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _pdf(x: float) -> float:
    return _INV_SQRT_2PI * math.exp(-0.5 * x * x) if math.isfinite(x) else 0.0


def _cdf(x: float) -> float:
    if x == math.inf:
        return 1.0
    if x == -math.inf:
        return 0.0
    return 0.5 * (1.0 + math.erf(x / _SQRT2))


@functools.cache
def lloyd_max_normal(bits: int, iterations: int = 2000) -> tuple[float, ...]:
    """MSE-optimal levels of a 2**bits-level scalar quantizer for N(0, 1), ascending."""
    levels = 2**bits
    # Start from equiprobable quantiles' midpoints; Lloyd iteration converges to the unique optimum (log-concave pdf).
    points = [math.sqrt(2.0) * _erfinv(2.0 * (i + 0.5) / levels - 1.0) for i in range(levels)]
    for _ in range(iterations):
        edges = [-math.inf] + [(a + b) / 2.0 for a, b in zip(points, points[1:])] + [math.inf]
        new = []
        for lo, hi in zip(edges, edges[1:]):
            mass = _cdf(hi) - _cdf(lo)
            new.append((_pdf(lo) - _pdf(hi)) / mass)
        if max(abs(a - b) for a, b in zip(points, new)) < 1e-15:
            points = new
            break
        points = new
    return tuple(points)


def lloyd_max_distortion(bits: int) -> float:
    """Expected squared error of the N(0, 1) Lloyd-Max quantizer (per coordinate), by numerical integration."""
    points = lloyd_max_normal(bits)
    edges = [-math.inf] + [(a + b) / 2.0 for a, b in zip(points, points[1:])] + [math.inf]
    # E[(X - c)^2 ; lo < X < hi] = [ (1 + c^2) Phi + (2c - x) phi ] evaluated over the cell, written out below.
    total = 0.0
    for c, lo, hi in zip(points, edges, edges[1:]):
        mass = _cdf(hi) - _cdf(lo)
        first = _pdf(lo) - _pdf(hi)  # E[X; cell]
        lo_term = lo * _pdf(lo) if math.isfinite(lo) else 0.0
        hi_term = hi * _pdf(hi) if math.isfinite(hi) else 0.0
        second = mass + lo_term - hi_term  # E[X^2; cell]
        total += second - 2.0 * c * first + c * c * mass
    return total


def codebook(bits: int, group: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Levels for the coordinates of a unit vector in R^group: Lloyd-Max of N(0, 1/group), float32, ascending and
    exactly symmetric (levels[k] == -levels[-1 - k]: the v2 encoder's scale search codes magnitudes from the upper
    half, quantize_v2._magnitude_of_abs). The iteration's levels are symmetric to ~1e-16; averaging each with its
    mirror makes it exact (rounding to float32 is symmetric too) and changes no float32 level."""
    levels = torch.tensor(lloyd_max_normal(bits), dtype=torch.float64)
    levels = (levels - levels.flip(0)) * 0.5 / math.sqrt(group)
    return levels.to(dtype=torch.float32, device=device)


def boundaries(levels: torch.Tensor) -> torch.Tensor:
    """Decision thresholds between adjacent levels: a value's code is how many thresholds it exceeds."""
    return (levels[1:] + levels[:-1]) * 0.5


def _erfinv(y: float) -> float:
    """Inverse error function by Newton's method; only used for the starting point of the iteration."""
    x = 0.0
    for _ in range(100):
        err = math.erf(x) - y
        x -= err / (2.0 / math.sqrt(math.pi) * math.exp(-x * x))
        if abs(err) < 1e-15:
            break
    return x
