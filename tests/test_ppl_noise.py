"""benchmarks/ppl_noise.py's perturbation: it must move only codes within float ulps of a boundary, count what it
moved, and repeat per seed, or its spread would measure something else than code flips."""

from __future__ import annotations

import torch
from benchmark_modules import load_benchmark

from rqcompile.quant.codebook import boundaries, codebook
from rqcompile.quant.quantizer import boundary_codes


def test_the_jitter_flips_only_codes_within_ulps_of_a_boundary():
    noise = load_benchmark("ppl_noise", "ppl_noise")
    bounds = boundaries(codebook(3, 128))
    near = bounds.repeat(200)  # exactly on a boundary: the jitter takes about half of them across (not the one at 0)
    far = torch.cat([bounds + 1e-4, bounds - 1e-4, torch.randn(1000) / 8])
    far = far[(far[:, None] - bounds).abs().min(-1).values > 1e-5]
    u = torch.cat([near, far])
    exact = boundary_codes(u, bounds)
    flips = [0]
    codes = noise.jittered(0, flips)(u, bounds)
    assert torch.equal(codes[near.numel() :], exact[near.numel() :])
    assert 0 < flips[0] == int((codes != exact).sum())
    assert (codes - exact).abs().max() == 1
    assert torch.equal(noise.jittered(0, [0])(u, bounds), codes)  # a seed repeats
    assert not torch.equal(noise.jittered(1, [0])(u, bounds), codes)


def test_a_noise_run_records_the_machine_it_ran_on():
    """Pins move with the CPU's float rounding (QUALITY.md "Session 42"), so a run's JSON names what it ran on."""
    machine = load_benchmark("ppl_noise", "ppl_noise").machine()
    assert machine["cpu"] and machine["cores"] >= 1 and machine["threads"] == torch.get_num_threads()
    assert machine["torch"] == torch.__version__
