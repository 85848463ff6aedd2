"""Research (session 15): key scales from the queries, averaged over RoPE pairs, on top of the pre-RoPE key offset.

Session 12 (QUALITY.md "Tried in session 12 and dropped") measured per-channel key scales
`s_c = (E[k_c^2] / E[q_c^2])^(1/4)` (the Cauchy-Schwarz optimum of a score error spread evenly over a mixed norm group):
better at 1K tokens, broken at 8K, because post-RoPE per-channel statistics depend on the positions they were measured
at. The same ratio averaged over each RoPE pair (i, i + d_rot/2) is position-invariant (RoPE turns a pair, keeping its
energy), but then gave up most of the 1K gain. Since then the keys' pre-RoPE mean is removed (`rope_key_mean`), which
took most of the slowly turning offset out of the key energy; this asks whether pair-averaged query scales help now.

Everything comes from one `calibrate(..., key_scale=True, scale_power=1.0, rope_key_mean=True)` on stdlib text: its
K scale is the per-channel RMS of the offset-free keys, its K error weight `var(k_c) E[q_c^2]`, so `E[q_c^2]` is
weight / scale^2 (up to a constant per head). Harness: the presets' 1K harness (prefill 512, 256 teacher-forced steps
in one chunk, license windows 0 / 8192 / 16384, no window of exact tokens), or `--prefill 7679 --decode 512 --offsets
24576,32768,40960 --window 32` (8K).

    .venv/bin/python benchmarks/pair_query_scales.py --configs "iso K3V3,planar K3V3"
"""

from __future__ import annotations

import argparse
import time

from presets import MIXED
from quality_harness import Harness, add_arguments, row
from retrieval_layers import layer_set

from rqcompile.cache import RQCache
from rqcompile.calibrate import Calibration, calibrate
from rqcompile.config import RQConfig

LIBRARY = "+ query key scales ^0.25, calibrate(key_scale='query')"
WIDTHS = {
    "K4V4": dict(bits=4),
    "K4V3": dict(key_bits=4, value_bits=3),
    "K3V3": dict(bits=3),
    "K3V2": dict(key_bits=3, value_bits=2),
    **MIXED,
}


def query_scales(calib: Calibration, rotary_dims: int, paired: bool, power: float, kind: str = "k") -> dict:
    """Per layer: K scales (E[k^2] / E[q^2])^power, pair-averaged over RoPE pairs when `paired`, mean 1 per head.
    kind "v": V scales (E[v^2] / ||W_o[:, c]||^2)^power (the same optimum for a value error reaching the output)."""
    out = {}
    half = rotary_dims // 2
    for layer in calib.layers:
        scale, weight = calib.get(layer, kind, "scale"), calib.get(layer, kind, "weight")
        if scale is None or weight is None:
            continue
        energy = scale.pow(2)  # the offset-free keys' per-channel variance (scale_power=1), up to a constant
        queries = weight / energy.clamp_min(1e-12)  # E[q^2] up to a constant
        if paired:
            for x in (energy, queries):
                pair = 0.5 * (x[:, :half] + x[:, half:rotary_dims])
                x[:, :half], x[:, half:rotary_dims] = pair, pair
        s = (energy / queries.clamp_min(1e-12)).pow(power)
        out[layer] = s / s.mean(-1, keepdim=True)
    return out


def _wide_scale_search(candidates: tuple[float, ...]) -> None:
    """Research patch: the caches build 4-bit states with these scale candidates (the library has one set for all)."""
    import rqcompile.cache as cache_module

    build = cache_module.make_state

    def make_state(config, *, layer_idx, kind, **kw):
        if config.bits_for(layer_idx, kind) >= 4:
            config = config.replace(scale_search=candidates)
        return build(config, layer_idx=layer_idx, kind=kind, **kw)

    cache_module.make_state = make_state


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="iso K3V3,planar K3V3,rotor K3V3,hadamard K3V3")
    p.add_argument("--window", type=int, default=0)
    add_arguments(p)
    p.add_argument("--powers", default="0.25", help="exponents of the ratio to try, comma-separated")
    p.add_argument("--only", default="", help="'|'-separated substrings of the variant names to run")
    p.add_argument("--seed", type=int, default=0, help="RQConfig.seed: the random rotations' seed")
    p.add_argument("--scale-search", default="", help="comma-separated scale candidates (default: the library's)")
    p.add_argument(
        "--wide-scale-search",
        default="",
        help="research: comma-separated scale candidates for 4-bit K/V states only (the rest keep --scale-search)",
    )
    p.add_argument(
        "--k4-layers",
        default="",
        help="research: the layers of 'K4/3 V3' with 4-bit keys, e.g. '5-19' or '0-4+10-19' (default: K4_LAYERS)",
    )
    p.add_argument(
        "--v3-layers", default="", help="research: the layers of 'K3 V3/2' with 3-bit values (default V3_LAYERS)"
    )
    p.add_argument(
        "--k3-layers", default="", help="research: the layers of 'K3/2 V2' with 3-bit keys (default K4_LAYERS)"
    )
    args = p.parse_args()
    if args.k4_layers:
        WIDTHS["K4/3 V3"] = dict(bits=3, layer_bits=tuple((i, 4, 3) for i in layer_set(args.k4_layers)))
    if args.v3_layers:
        WIDTHS["K3 V3/2"] = dict(
            key_bits=3, value_bits=2, layer_bits=tuple((i, 3, 3) for i in layer_set(args.v3_layers))
        )
    if args.k3_layers:
        WIDTHS["K3/2 V2"] = dict(bits=2, layer_bits=tuple((i, 3, 2) for i in layer_set(args.k3_layers)))
    if args.wide_scale_search:
        _wide_scale_search(tuple(float(c) for c in args.wide_scale_search.split(",")))
    harness = Harness.load(args)
    model, text = harness.model, harness.calibration_text
    full = calibrate(
        model, text, key_scale=True, value_scale=True, scale_power=1.0, rope_key_mean=True, source="stdlib"
    )
    base = Calibration({k: v for k, v in full.stats.items() if k[2] in ("mean", "rope_mean")}, "stdlib", full.rope)
    variants = {"rope_key_mean, stdlib key means (the default calibrate)": base}
    for power in (float(x) for x in args.powers.split(",")):
        for paired in (True, False):
            scales = query_scales(full, full.rope.dims, paired, power)
            stats = {**base.stats, **{(layer, "k", "scale"): s for layer, s in scales.items()}}
            name = f"+ query key scales ^{power:g}, {'RoPE pairs' if paired else 'per channel'}"
            variants[name] = Calibration(stats, name, full.rope)
    # the library's rule (calibrate(key_scale="query")): per channel for the pairs that turn by less than one radian
    # within the model's context (max_position_embeddings), pair-averaged for the rest
    lib = calibrate(model, text, key_scale="query", rope_key_mean=True, source="stdlib")
    name = LIBRARY
    variants[name] = Calibration({k: v for k, v in lib.stats.items() if k[2] != "weight"}, name, lib.rope)
    value_scales = query_scales(full, 0, False, 0.25, kind="v")  # values: no RoPE, per channel
    stats = {**variants[name].stats, **{(layer, "v", "scale"): s for layer, s in value_scales.items()}}
    name = "+ query key scales (calibrate) + output value scales"
    variants[name] = Calibration(stats, name, lib.rope)
    layers = f", K4/3 V3's 4-bit keys in {args.k4_layers}" if args.k4_layers else ""
    layers += f", K3 V3/2's 3-bit values in {args.v3_layers}" if args.v3_layers else ""
    layers += f", K3/2 V2's 3-bit keys in {args.k3_layers}" if args.k3_layers else ""
    print(f"prefill {args.prefill}, decode {args.decode}, windows {args.offsets}, w{args.window}{layers}", flush=True)
    for spec in args.configs.split(","):
        backend, widths = spec.strip().split(" ", 1)
        config = RQConfig(backend=backend, residual_window=args.window, seed=args.seed, **WIDTHS[widths])
        if args.scale_search:
            config = config.replace(scale_search=tuple(float(c) for c in args.scale_search.split(",")))
        prompt = {  # the drop-in default: the prompt's key means (the offset on: model_config), alone or with
            # the rest of the stdlib Calibration (its query key scales): RQCache(prompt_means=True), session 16
            "prompt + offset (the drop-in default with model_config)": None,
            "prompt + offset + stdlib query key scales": variants[LIBRARY],
        }
        for name, calibration in {**variants, **prompt}.items():
            if args.only and not any(part in name for part in args.only.split("|")):
                continue
            if name in prompt and calibration is None:
                make = lambda c=config: RQCache(c, model_config=model.config)  # noqa: E731
            elif name in prompt:
                make = lambda c=config, cal=calibration: RQCache(c, calibration=cal, prompt_means=True)  # noqa: E731
            else:
                make = lambda c=config, cal=calibration: RQCache(c, calibration=cal)  # noqa: E731
            t0 = time.perf_counter()
            cells = row(*harness.score(make))
            print(f"{spec:14s} {name:56s} {cells} {time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
