"""Research (session 12, QUALITY.md "Tried in session 12"): key scales from the queries that read the keys.

A rotation that mixes the norm group spreads the quantization error of `k / s` evenly over the group, so channel c's
key error is ~ s_c^2 times a common factor, and it moves a score by q_c times that error: the score error's variance
`(sum_c E[q_c^2] s_c^2) (sum_j E[k_j^2] / s_j^2)` is smallest for `s_c = (E[k_c^2] / E[q_c^2])^(1/4)`. Three ways to
measure it on 2048 stdlib tokens (512-token chunks), all on top of the stdlib key mean:

- "per channel": centred Var[k_c] and E[q_c^2] per channel;
- "pairs, centred": both channels of a RoPE pair (i, i + d/2) get the pair's mean statistics (which do not depend on
  the position), centred variance;
- "pairs, uncentred": the same with E[k^2] about zero (what a slowly turning pair looks like far from where it was
  measured).

Everything is derived from `rqcompile.calibrate`'s own statistics (RMS scales at power 1, error weights = Var[k] E[q^2];
per-head constants cancel in the normalization), so the library needs no option for it. The quality pins' harness:
prefill 512, 256 decode steps in one chunk, the default config (iso 3-bit, full mixing, sink, search) and its
backends, with and without the 32-token window (SmolLM2: RoPE on all 64 channels of a head).

    .venv/bin/python benchmarks/query_key_scales.py 0 && .venv/bin/python benchmarks/query_key_scales.py 8192
"""

from __future__ import annotations

import sys

import torch

from rqcompile import models
from rqcompile.cache import RQCache
from rqcompile.calibrate import Calibration, calibrate
from rqcompile.config import RQConfig
from rqcompile.eval import decode_time_ppl, kl_divergence, license_corpus, stdlib_corpus

PREFILL, DECODE = 512, 256


def query_key_scale(energy: torch.Tensor, query_power: torch.Tensor, pairs: bool) -> torch.Tensor:
    """(energy / E[q^2])^(1/4) per channel ([H, d]), RoPE pairs averaged first if `pairs`, mean 1 per head."""
    if pairs:
        half = energy.shape[-1] // 2
        energy, query_power = ((t[..., :half] + t[..., half:]).repeat(1, 2) / 2 for t in (energy, query_power))
    scale = (energy / query_power).pow(0.25)
    return scale / scale.mean(-1, keepdim=True)


def with_query_scales(
    key_mean: Calibration, centred: Calibration, energy_from: Calibration, pairs: bool
) -> Calibration:
    """`key_mean`'s key mean plus query key scales. `key_mean` also holds the error weights (Var[k] E[q^2]),
    `centred` the RMS scales at power 1 (sqrt(Var[k])), `energy_from` the RMS scales the key energy is read from
    (`centred`, or measured without the mean for E[k^2] about zero)."""
    stats = {k: v for k, v in key_mean.stats.items() if k[2] == "mean"}
    for layer in key_mean.layers:
        variance = centred.get(layer, "k", "scale").pow(2)
        query_power = key_mean.get(layer, "k", "weight") / variance
        energy = energy_from.get(layer, "k", "scale").pow(2)
        stats[(layer, "k", "scale")] = query_key_scale(energy, query_power, pairs)
    return Calibration(stats)


def main() -> None:
    offset = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    torch.set_num_threads(1)
    model, tok = models.load_smollm2()
    ids = license_corpus(tok, PREFILL + DECODE + 1, offset=offset)
    ref = decode_time_ppl(model, ids, prefill=PREFILL, decode=DECODE, chunk=DECODE)
    text = stdlib_corpus(tok, 2048)
    key_mean = calibrate(
        model, text, key_scale=False, rope_key_mean=False
    )  # key mean + error weights (Var[k] E[q^2], centred)
    centred = calibrate(
        model, text, key_scale=True, scale_power=1.0, error_weights=False, rope_key_mean=False
    )  # ~ sqrt(Var[k])
    uncentred = calibrate(
        model, text, key_mean=False, key_scale=True, scale_power=1.0, error_weights=False, rope_key_mean=False
    )

    calibrations = {
        "key mean": key_mean,
        "per channel": with_query_scales(key_mean, centred, centred, pairs=False),
        "pairs, centred": with_query_scales(key_mean, centred, centred, pairs=True),
        "pairs, uncentred": with_query_scales(key_mean, centred, uncentred, pairs=True),
    }
    print(f"window {offset}, fp ppl {ref.ppl:.3f}; cells: ppl delta, KL", flush=True)
    for window in (0, 32):
        for backend in ("iso", "planar", "rotor", "hadamard"):
            config = RQConfig(backend=backend, residual_window=window)
            cells = []
            for calibration in calibrations.values():

                def make(config=config, calibration=calibration) -> RQCache:
                    return RQCache(config, calibration=calibration)

                result = decode_time_ppl(model, ids, make, PREFILL, DECODE, chunk=DECODE)
                kl = kl_divergence(ref, result).mean().item()
                cells.append(f"{100 * (result.ppl / ref.ppl - 1):+6.2f}% {kl:.4f}")
            print(f"w{window:<2d} {backend:9s} " + " | ".join(cells), flush=True)
    print("columns: " + " | ".join(calibrations))


if __name__ == "__main__":
    main()
