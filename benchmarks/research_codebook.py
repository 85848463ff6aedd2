"""Research (QUALITY.md, "Tried in session 4"): per-(layer, K|V) codebooks fitted by 1-D Lloyd-Max on the calibration
text's rotated unit coordinates (2048 stdlib tokens) instead of the Gaussian Lloyd-Max codebook. Format-neutral: the
levels are stored per state already. Quality pins' harness (prefill 512, 256 decode steps), two license windows.

    .venv/bin/python benchmarks/research_codebook.py
"""

from __future__ import annotations

import dataclasses
import time

import torch
from transformers import DynamicCache

import rqcompile.cache as rq_cache
from rqcompile import models
from rqcompile.cache import RQCache
from rqcompile.calibrate import calibrate
from rqcompile.config import RQConfig
from rqcompile.eval import decode_time_ppl, kl_divergence, license_corpus, stdlib_corpus
from rqcompile.quant.codebook import boundaries
from rqcompile.quant.quantizer import make_state
from rqcompile.quant.rotations import rotate


def calibration_kv(model, ids: torch.Tensor) -> dict[int, dict[str, torch.Tensor]]:
    """Post-RoPE K/V of every layer on `ids`, in chunks of 512, each chunk's first token (the sink) left out."""
    kv: dict[int, dict[str, list]] = {}
    with torch.no_grad():
        for start in range(0, ids.shape[1], 512):
            cache = DynamicCache()
            model(ids[:, start : start + 512], past_key_values=cache, use_cache=True)
            for i, layer in enumerate(cache.layers):
                kv.setdefault(i, {"k": [], "v": []})
                kv[i]["k"].append(layer.keys[:, :, 1:].float())
                kv[i]["v"].append(layer.values[:, :, 1:].float())
    return {i: {kind: torch.cat(parts, 2) for kind, parts in d.items()} for i, d in kv.items()}


def lloyd_max(unit: torch.Tensor, levels: torch.Tensor, iters: int = 30) -> torch.Tensor:
    """1-D Lloyd-Max on (a 400K sample of) the coordinates, starting from `levels`."""
    x = unit.flatten()
    x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))[:400_000]]
    fitted = levels.clone()
    for _ in range(iters):
        codes = (x[:, None] > boundaries(fitted)).sum(-1)
        for j in range(fitted.numel()):
            members = x[codes == j]
            if members.numel():
                fitted[j] = members.mean()
        fitted, _ = fitted.sort()
    return fitted


def fitted_states(config: RQConfig, kv, calib) -> dict:
    states = {}
    for i, tensors in kv.items():
        for kind, x in tensors.items():
            state = make_state(
                config,
                layer_idx=i,
                kind=kind,
                num_heads=x.shape[1],
                head_dim=x.shape[-1],
                mean=calib.get(i, kind, "mean"),
                scale=calib.get(i, kind, "scale"),
            )
            u = (x - state.mean[:, None, :]) / state.scale[:, None, :]
            y = rotate(u, state.rotation).unflatten(-1, (x.shape[-1] // state.group, state.group))
            unit = y / y.norm(dim=-1, keepdim=True).clamp_min(1e-30)
            count = 2**state.bits
            levels = torch.cat([lloyd_max(unit, state.levels[:count]), state.levels[count:]])
            states[(i, kind)] = dataclasses.replace(state, levels=levels)
    return states


def measure(model, config: RQConfig, calib, states, ids, reference) -> tuple[float, float]:
    """(ppl delta %, KL) of RQCache(config) whose states are `states` (None: the library's own)."""
    real = rq_cache.make_state

    def patched(cfg, *, layer_idx, kind, **kwargs):
        return states[(layer_idx, kind)]

    if states is not None:
        rq_cache.make_state = patched
    try:
        result = decode_time_ppl(model, ids, lambda: RQCache(config, calibration=calib), 512, 256, chunk=256)
    finally:
        rq_cache.make_state = real
    return 100 * (result.ppl / reference.ppl - 1), kl_divergence(reference, result).mean().item()


def main() -> None:
    torch.set_num_threads(1)
    model, tok = models.load_smollm2()
    calib = calibrate(model, tokenizer=tok, key_scale=True, value_scale=True, rope_key_mean=False)
    kv = calibration_kv(model, stdlib_corpus(tok, 2048))
    print("| window | backend | Gaussian codebook: ppl delta, KL | fitted codebooks: ppl delta, KL |")
    print("|---|---|---|---|")
    for offset in (0, 8192):
        ids = license_corpus(tok, 769, offset=offset)
        reference = decode_time_ppl(model, ids, prefill=512, decode=256, chunk=256)
        for backend in ("iso", "planar", "rotor"):
            config = RQConfig(residual_window=0, rotation_stages=1, backend=backend, bits=3)
            start = time.perf_counter()
            base = measure(model, config, calib, None, ids, reference)
            fitted = measure(model, config, calib, fitted_states(config, kv, calib), ids, reference)
            print(
                f"| {offset} | {backend} 3-bit | {base[0]:+.1f}%, {base[1]:.3f} | {fitted[0]:+.1f}%, {fitted[1]:.3f} |"
                f" <!-- {time.perf_counter() - start:.0f} s -->",
                flush=True,
            )


if __name__ == "__main__":
    main()
