"""Research (session 17): how good could any quantizer of the rotated groups be at b bits? Issue 6's targets against
the rate-distortion bound.

Each (layer, K|V) state's quantizer is replaced, by a research patch of the cache's `quantize_state` /
`dequantize_state`, with Gaussian noise in the quantized domain (`u = (x - mean) / scale`, rotated): every norm group
y gets `y + n`, n isotropic with `E||n||^2 = D ||y||^2`, then rescaled to `||y||` (the library's quantizer keeps each
group's length too: its stored norm is corrected). Everything else is the library's: calibration, prompt means, the
pre-RoPE offset, the sink token. D is
- `matched`: the library quantizer's own relative squared error on the same data (measured per call): whether its
  error acts like Gaussian noise of that size (a check of the model, not a bound);
- `rd`: `2^(-2b)`, the distortion-rate function of a Gaussian source at b bits per coordinate, the least any
  quantizer of i.i.d. Gaussian coordinates can reach at that rate, however long its blocks;
- `rd+norm`: `2^(-2(b + 16/g))`: the same with the fp16 norm's bits spent on the coordinates too;
- `gain:X`: the matched D lowered by X dB, what a quantizer X dB better than the scalar codebook would reach by this
  model (published granular gains: ~0.65 dB for the E8 lattice, ~1-1.5 dB for trellis-coded quantization).

Harness: the presets' 1K harness (prefill 512, 256 teacher-forced steps in one chunk, license windows 0 / 8192 /
16384, no window), `RQCache(config, calibration=calibrate(key_scale="query"), prompt_means=True)`.

    cd benchmarks && ../.venv/bin/python noise_bound.py --configs "iso K3V3,iso K4/3 V3,iso K3 V3/2"
"""

from __future__ import annotations

import argparse
import time

import torch
from pair_query_scales import WIDTHS
from quality_harness import Harness, add_arguments, row

import rqcompile.cache as cache_module
from rqcompile.cache import RQCache
from rqcompile.config import RQConfig
from rqcompile.ops import dequantize_state, quantize_state
from rqcompile.quant.quantizer import QuantState
from rqcompile.quant.rotations import rotate


def _groups(x: torch.Tensor, state: QuantState) -> torch.Tensor:
    """x [B, H, T, d] in the quantized domain, rotated, as norm groups [B, H, T, G, g]."""
    u = (x.float() - state.mean[:, None, :]) / state.scale[:, None, :]
    return rotate(u, state.rotation).unflatten(-1, (-1, state.group))


def _ungroup(y: torch.Tensor, state: QuantState) -> torch.Tensor:
    u = rotate(y.flatten(-2), state.rotation, inverse=True)
    return u * state.scale[:, None, :] + state.mean[:, None, :]


def noisy(mode: str, generator: torch.Generator, errors: list[float]):
    """A `quantize_state` replacement that stores `x` with Gaussian noise of the mode's size (in place of codes; the
    "norms" slot carries nothing)."""

    def quantize(x: torch.Tensor, state: QuantState) -> tuple[torch.Tensor, torch.Tensor]:
        bits = state.bits
        y = _groups(x, state)
        if mode == "matched" or mode.startswith("gain:"):
            real = _groups(dequantize_state(*quantize_state(x, state), state, torch.float32), state)
            d = float((real - y).pow(2).sum() / y.pow(2).sum().clamp_min(1e-30))
            if mode.startswith("gain:"):
                d *= 10 ** (-float(mode.split(":")[1]) / 10)
        elif mode == "rd":
            d = 2.0 ** (-2 * bits)
        elif mode == "rd+norm":
            d = 2.0 ** (-2 * (bits + 16 / state.group))
        else:
            raise ValueError(mode)
        errors.append(d)
        norm = y.norm(dim=-1, keepdim=True)
        n = torch.randn(y.shape, generator=generator) * norm * (d / state.group) ** 0.5
        noisy_y = y + n
        noisy_y = noisy_y * norm / noisy_y.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        return _ungroup(noisy_y, state), x.new_zeros(*x.shape[:-1], 0)

    return quantize


def patch(mode: str | None, generator: torch.Generator, errors: list[float]) -> None:
    """Research patch of the cache's write and read (None: the library's quantizer)."""
    if mode is None:
        cache_module.quantize_state, cache_module.dequantize_state = quantize_state, dequantize_state
        return
    cache_module.quantize_state = noisy(mode, generator, errors)
    cache_module.dequantize_state = lambda stored, _norms, _state, dtype: stored.to(dtype)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="iso K3V3,iso K4/3 V3,iso K3 V3/2")
    p.add_argument("--modes", default="quantizer,matched,rd,rd+norm")
    add_arguments(p)
    args = p.parse_args()
    harness = Harness.load(args)
    calib = harness.query_scale_calibration()
    print(f"prefill {args.prefill}, decode {args.decode}, windows {args.offsets}, no window", flush=True)
    for spec in args.configs.split(","):
        backend, widths = spec.strip().split(" ", 1)
        config = RQConfig(backend=backend, residual_window=0, **WIDTHS[widths])
        make = lambda c=config: RQCache(c, calibration=calib, prompt_means=True)  # noqa: E731
        for mode in args.modes.split(","):
            errors: list[float] = []
            patch(None if mode == "quantizer" else mode, torch.Generator().manual_seed(0), errors)
            t0 = time.perf_counter()
            cells = row(*harness.score(make))
            patch(None, torch.Generator(), [])
            d = f"mean D {sum(errors) / len(errors):.4f}" if errors else "library quantizer"
            print(f"{spec:14s} {mode:9s} {d:18s} {cells} {time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
