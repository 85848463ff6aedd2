"""Research (session 16, dropped): `prompt_means=True` plus the values' channel mean measured on the prompt too.

The option measures only the key means on the prompt; the format also carries a value mean (which every decoder adds
back). This patches the cache layer to measure it on the prompt (sink token left out) and compares, on the presets'
1K harness (prefill 512, 256 teacher-forced steps, license windows 0 / 8192 / 16384), against the option as it is.
Result: level or worse (QUALITY.md "Session 16").

    .venv/bin/python benchmarks/prompt_value_mean.py --window 0 \
        --configs "iso K3V3,planar K3V3,rotor K3V3,iso K4/3 V3,iso K3 V3/2"
"""

from __future__ import annotations

import argparse
import time

import torch
from presets import MIXED

from rqcompile import models
from rqcompile.cache import RQCache, RQCacheLayer
from rqcompile.calibrate import calibrate, channel_stats
from rqcompile.config import RQConfig
from rqcompile.eval import decode_time_ppl, kl_divergence, license_corpus, stdlib_corpus

WIDTHS = {"K3V3": dict(bits=3), **MIXED}
_measured = RQCacheLayer._stats


def _with_value_mean(self, key_states, value_states, tokens=None):
    """The option's statistics, and the value mean of the prompt (batch 1: every token after the sink)."""
    found = _measured(self, key_states, value_states, tokens)
    mean = channel_stats(value_states.detach()[:, :, 1:], mean=True, scale=False)["mean"]
    return lambda kind, name: mean if (kind, name) == ("v", "mean") else found(kind, name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--window", type=int, default=0)
    p.add_argument("--configs", default="iso K3V3")
    args = p.parse_args()
    torch.set_num_threads(1)
    model, tok = models.load_smollm2()
    calib = calibrate(model, stdlib_corpus(tok, 4096), key_scale="query", rope_key_mean=True, source="stdlib")
    windows = [license_corpus(tok, 769, offset=o) for o in (0, 8192, 16384)]
    refs = [decode_time_ppl(model, ids, prefill=512, decode=256, chunk=256) for ids in windows]
    for spec in args.configs.split(","):
        backend, widths = spec.strip().split(" ", 1)
        config = RQConfig(backend=backend, residual_window=args.window, **WIDTHS[widths])
        for value_mean in (False, True):
            RQCacheLayer._stats = _with_value_mean if value_mean else _measured
            t0, kls, deltas = time.perf_counter(), [], []
            for ids, ref in zip(windows, refs, strict=True):
                make = lambda c=config: RQCache(c, calibration=calib, prompt_means=True)  # noqa: E731
                result = decode_time_ppl(model, ids, make, 512, 256, chunk=256)
                kls.append(kl_divergence(ref, result).mean().item())
                deltas.append(100 * (result.ppl / ref.ppl - 1))
            cells = " / ".join(f"{d:+.2f}%" for d in deltas)
            print(
                f"{spec:12s} w{args.window} value mean from the prompt {value_mean!s:5s} {cells} (KL "
                f"{' / '.join(f'{k:.4f}' for k in kls)}; mean {sum(kls) / 3:.4f}, ppl {sum(deltas) / 3:+.2f}%) "
                f"{time.perf_counter() - t0:.0f}s",
                flush=True,
            )
    RQCacheLayer._stats = _measured


if __name__ == "__main__":
    main()
