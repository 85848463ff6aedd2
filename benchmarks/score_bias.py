"""Research (session 17): does quantization noise in the keys bias attention toward the quantized keys, and does
taking the bias out of each score help?

A key's quantization error e moves its score by `q . e`, zero-mean over the error but inside an exponential:
`E exp(s + q . e) = exp(s + sigma^2 / 2)`. Summed over many keys the softmax mass of quantized keys is inflated by
about `exp(sigma^2 / 2)` against keys kept exact (the sink token, the recent window), and more for keys whose error is
larger. `sigma^2` is known without the error itself: the error is isotropic in the rotated, scaled domain with
squared norm `D ||u||^2` (D the quantizer's relative squared error at its width, `noise_bound.py`; `u = (k - offset -
mean) / scale`, whose norm the format stores), so with `sm` the softmax scale and `s` the key scales,
`sigma^2 = sm^2 D ||s * q||^2 ||u||^2 / d` per (query, key). This research attention (an `AttentionInterface` patch)
subtracts `sigma^2 / 2` from each quantized key's score (`--strength` times it); exact keys keep theirs.

Harness: `quality_harness` (1K), `RQCache(config, calibration=..., prompt_means=True)`, with or without the window
(the window's exact tokens and the sink are where the bias should show; `--window 32` is scored through the window
view, whose attention this patch does not replace, so it runs without a window only).

    cd benchmarks && ../.venv/bin/python score_bias.py --configs "iso K3V3,iso K3 V3/2" --strengths 0,1
"""

from __future__ import annotations

import argparse
import time

import torch
from pair_query_scales import WIDTHS
from quality_harness import Harness, add_arguments, row

from rqcompile.cache import RQCache
from rqcompile.config import RQConfig

# the library quantizer's relative squared error per code width, scale search on (noise_bound.py's "matched" D:
# 0.0293 at 3 bits, 0.0074 at 4; 2 bits solved from the K3/2 V2 row's mean)
D_BY_BITS = {2: 0.112, 3: 0.0293, 4: 0.0074}
_NAME = "rqcompile_score_bias_research"


class Corrected:
    """The attention function and the cache it reads the quantized keys' layout from."""

    def __init__(self, strength: float) -> None:
        self.strength = strength
        self.cache: RQCache | None = None

    def make(self, config: RQConfig, calibration) -> RQCache:
        self.cache = RQCache(config, calibration=calibration, prompt_means=True)
        return self.cache

    def bias(self, module, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """-sigma^2 / 2 per (query, key) [B, Hq, Tq, Tk], zero for exact keys."""
        layer = self.cache.layers[module.layer_idx]
        sink = layer._sink_length()
        count = 0 if layer.k_codes is None else layer.k_codes.shape[-2]
        state = layer.k_state
        quantized = keys[:, :, sink : sink + count].float()
        if layer.rope is not None:
            quantized = quantized - layer._offset(sink, count)
        u2 = ((quantized - state.mean[:, None, :]) / state.scale[:, None, :]).pow(2).sum(-1)  # [B, H, C]
        rep = query.shape[1] // keys.shape[1]
        scale = state.scale.repeat_interleave(rep, 0)  # [Hq, d]
        q2 = (query.float() * scale[None, :, None, :]).pow(2).sum(-1)  # [B, Hq, Tq]
        d = D_BY_BITS[state.bits] / query.shape[-1]
        sigma2 = module.scaling**2 * d * q2[..., None] * u2.repeat_interleave(rep, 1)[:, :, None, :]
        out = torch.zeros(*query.shape[:3], keys.shape[-2], dtype=torch.float32, device=query.device)
        out[..., sink : sink + count] = -0.5 * self.strength * sigma2
        return out

    def attend(self, module, query, key, value, attention_mask, **kwargs):
        """Plain attention (causal over the cache's positions, GQA) with the bias added to the scores."""
        tq, tk = query.shape[-2], key.shape[-2]
        rep = query.shape[1] // key.shape[1]
        k = key.repeat_interleave(rep, 1).float()
        v = value.repeat_interleave(rep, 1).float()
        scores = module.scaling * query.float() @ k.transpose(-1, -2) + self.bias(module, query, key)
        causal = torch.arange(tk)[None, :] <= torch.arange(tk - tq, tk)[:, None]
        scores = scores.masked_fill(~causal, float("-inf"))
        out = torch.softmax(scores, -1) @ v
        return out.transpose(1, 2).to(query.dtype), None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="iso K3V3")
    p.add_argument("--strengths", default="0,1", help="multiples of sigma^2 / 2 to subtract (0: plain attention)")
    add_arguments(p)
    args = p.parse_args()
    from transformers import AttentionInterface

    harness = Harness.load(args)
    calib = harness.query_scale_calibration()
    model = harness.model
    print(f"prefill {args.prefill}, decode {args.decode}, windows {args.offsets}, no window", flush=True)
    previous = model.config._attn_implementation
    for spec in args.configs.split(","):
        backend, widths = spec.strip().split(" ", 1)
        config = RQConfig(backend=backend, residual_window=0, **WIDTHS[widths])
        for strength in (float(s) for s in args.strengths.split(",")):
            corrected = Corrected(strength)
            AttentionInterface.register(_NAME, corrected.attend)
            model.set_attn_implementation(_NAME)
            t0 = time.perf_counter()
            try:
                cells = row(*harness.score(lambda c=config, k=corrected: k.make(c, calib)))
            finally:
                model.set_attn_implementation(previous)
            print(f"{spec:14s} strength {strength:g}  {cells} {time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
