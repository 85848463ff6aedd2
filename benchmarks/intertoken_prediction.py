"""Research (session 17): could a token's K/V be predicted from the previous tokens' (predictive / delta coding
across positions, as CacheGen does), so that fewer bits code the rest? Measured on what the cache quantizes,
`u = (x - mean) / scale` (the library's prompt means and stdlib query key scales, iso 3-bit states), on license text
(offset 0, 1,024 tokens): the residual energy after the best linear prediction from the previous token (one
coefficient per (layer, K|V, head)), and after the best of the previous 8 tokens chosen per token (an oracle).

    cd benchmarks && ../.venv/bin/python intertoken_prediction.py
"""

from __future__ import annotations

import torch
from learned_rotations import capture_inputs

from rqcompile import models
from rqcompile.cache import RQCache
from rqcompile.calibrate import Calibration, calibrate
from rqcompile.config import RQConfig
from rqcompile.eval import license_corpus, stdlib_corpus


def residual_energy(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head of u [H, N, d]: ||u_t - a u_(t-1)||^2 / ||u_t||^2 with the best a, and ||u_t - u_best||^2 / ||u_t||^2
    with u_best the closest of the previous 8 tokens (chosen per token: an oracle)."""
    prev, cur = u[:, :-1], u[:, 1:]
    a = (prev * cur).sum((1, 2), keepdim=True) / prev.pow(2).sum((1, 2), keepdim=True)
    linear = (cur - a * prev).pow(2).sum((1, 2)) / cur.pow(2).sum((1, 2))
    best = None
    for lag in range(1, 9):
        err = (u[:, 8:] - u[:, 8 - lag : -lag]).pow(2).sum(-1)
        best = err if best is None else torch.minimum(best, err)
    return linear, best.sum(1) / u[:, 8:].pow(2).sum((1, 2))


def main() -> None:
    torch.set_num_threads(1)
    model, tok = models.load_smollm2()
    lib = calibrate(model, stdlib_corpus(tok, 2048), key_scale="query", rope_key_mean=True, source="stdlib")
    calib = Calibration({k: v for k, v in lib.stats.items() if k[2] != "weight"}, "stdlib", lib.rope)
    ids = license_corpus(tok, 1025, offset=0).reshape(-1)
    inputs = capture_inputs(
        model, lambda: RQCache(RQConfig(residual_window=0), calibration=calib, prompt_means=True), ids, 1024
    )
    for kind in ("k", "v"):
        found = [residual_energy(u) for (_, k), u in inputs.items() if k == kind]
        linear = torch.cat([f[0] for f in found])
        oracle = torch.cat([f[1] for f in found])
        print(
            f"{kind.upper()}: residual energy after the best linear prediction from the previous token: mean "
            f"{linear.mean():.3f} (heads {linear.min():.3f}-{linear.max():.3f}); after the best of the previous 8 "
            f"tokens (oracle): mean {oracle.mean():.3f}"
        )


if __name__ == "__main__":
    main()
