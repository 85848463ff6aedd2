"""How much of a config's decode-time ppl delta is noise (session 35): the 1K harness (quality_harness.py) with the
units' code decisions jittered by a few float ulps.

Session 35 changed the format's tie rule: 4 codes of 44M moved one config's ppl delta on the pins' window from +7.18%
to +10.90% while its KL moved 0.1397 -> 0.1418. That is the size of change an exact tie, another float summation
order or another device makes. Here each seed multiplies every unit by (1 + 2^-20 r), r uniform in [-1, 1] from a
seeded generator, right before its boundary compares (`quantizer.boundary_codes`, which the drop-in cache's
reference encoder calls), so only units within ~1e-6 (relative) of a boundary change code; the stored norms follow
the codes as always. The first row of each config is the unperturbed run. Reported per window: ppl delta and KL per
seed, and their spread; "flips" counts the unit codes that changed over all of a run's compares (every scale
candidate's, not only the kept one's).

    .venv/bin/python benchmarks/ppl_noise.py --seeds 8 --offsets 0,8192 --out benchmarks/results/ppl_noise_s35.json

Configs (`--configs`, comma-separated names of CONFIGS): the default drop-in cache (prompt calibration, as the README
builds it), and two presets of QUALITY.md's "Session 14" table without the recent window.

`--pins` runs every quality pin of tests/test_quality_pins.py instead, on the pins' own harness (its window, 256
steps, its calibrations), and prints each pin's bounds beside the range the seeds reach, marking the bounds a seed
crosses: a pin must hold on any machine whose float sums round otherwise, not only on the one it was set on.
`--comparisons` does the same for the test module's COMPARISONS (KL with a method / without it, same bytes).

    .venv/bin/python benchmarks/ppl_noise.py --pins --seeds 6 --out benchmarks/results/ppl_noise_pins_s35.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from presets import MIXED  # noqa: E402
from quality_harness import Harness, add_arguments  # noqa: E402

from rqcompile import models  # noqa: E402
from rqcompile.cache import RQCache  # noqa: E402
from rqcompile.config import RQConfig  # noqa: E402
from rqcompile.eval import decode_time_ppl, license_corpus  # noqa: E402
from rqcompile.quant import quantizer  # noqa: E402

CONFIGS = {
    "default": RQConfig(),
    "iso K4/3 V3": RQConfig(**MIXED["K4/3 V3"], residual_window=0),
    "iso K3 V3/2": RQConfig(**MIXED["K3 V3/2"], residual_window=0),
}
JITTER = 2.0**-20


def jittered(seed: int, flips: list[int]):
    """A `boundary_codes` that codes u (1 + JITTER r) and counts the codes that differ from u's own."""
    exact = quantizer.boundary_codes
    generator = torch.Generator().manual_seed(seed)

    def codes(u: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
        r = torch.rand(u.shape, generator=generator, dtype=torch.float32) * 2 - 1
        out = exact(u * (1 + JITTER * r), bounds)
        flips[0] += int((out != exact(u, bounds)).sum())
        return out

    return codes


def pins_noise(seeds: int, only: set[str]) -> dict:
    """Every pin of tests/test_quality_pins.py under the jitter, on the pins' harness: per pin its runs and bounds."""
    pins, smollm2, ids, reference = _pins_harness()
    calibrations, out = {}, {}
    for name, (config, kind, (low, high), kl_high) in sorted(pins.PINS.items()):
        if only and name not in only:
            continue
        if kind not in calibrations:
            calibrations[kind] = pins.make_calibration(kind, smollm2)
        runs = []
        for seed in [-1, *range(seeds)]:
            with _jitter(seed) as flips:
                delta, kl, _ = pins._measure(
                    smollm2, ids, reference, config, calibrations[kind], prompt_means=kind == "prompt means"
                )
            runs.append({"seed": seed, "ppl_delta": delta, "kl": kl, "flips": flips[0]})
        d, k = [r["ppl_delta"] for r in runs], [r["kl"] for r in runs]
        crossed = [what for what, bad in (("floor", min(d) <= low), ("ceiling", max(d) >= high)) if bad]
        crossed += ["KL"] if max(k) >= kl_high else []
        out[name] = {"runs": runs, "bounds": [low, high], "kl_bound": kl_high, "crossed": crossed}
        print(
            f"{name}: ppl delta {d[0]:+.2f}% (seeds {min(d):+.2f} .. {max(d):+.2f}, pinned {low} .. {high}), "
            f"KL {k[0]:.4f} (seeds {min(k):.4f} .. {max(k):.4f}, pinned < {kl_high})"
            + (f"  CROSSED: {', '.join(crossed)}" if crossed else ""),
            flush=True,
        )
    return out


def comparisons_noise(seeds: int) -> dict:
    """Every comparison of tests/test_quality_pins.py (COMPARISONS) under the jitter: per comparison, KL with and
    without the method in each run (both caches jittered by the same seed) and their ratio against its bound."""
    pins, smollm2, ids, reference = _pins_harness()
    calibrations, out = {}, {}
    for name, (with_it, without_it, kind, bound) in sorted(pins.COMPARISONS.items()):
        if kind not in calibrations:
            calibrations[kind] = pins.make_calibration(kind, smollm2)
        runs = []
        for seed in [-1, *range(seeds)]:
            kls = []
            for config in (with_it, without_it):
                with _jitter(seed):
                    kls.append(pins._measure(smollm2, ids, reference, config, calibrations[kind])[1])
            runs.append({"seed": seed, "kl_with": kls[0], "kl_without": kls[1], "ratio": kls[0] / kls[1]})
        ratios = [r["ratio"] for r in runs]
        crossed = max(ratios) >= bound
        out[name] = {"runs": runs, "bound": bound, "crossed": crossed}
        print(
            f"{name}: KL ratio {ratios[0]:.3f} (seeds {min(ratios):.3f} .. {max(ratios):.3f}, pinned < {bound})"
            + ("  CROSSED" if crossed else ""),
            flush=True,
        )
    return out


@contextlib.contextmanager
def _jitter(seed: int) -> Iterator[list[int]]:
    """The reference encoder's boundary compares jittered by `seed` (-1: exact) while inside; yields the flip count."""
    exact, flips = quantizer.boundary_codes, [0]
    quantizer.boundary_codes = exact if seed < 0 else jittered(seed, flips)
    try:
        yield flips
    finally:
        quantizer.boundary_codes = exact


def _pins_harness():
    """tests/test_quality_pins.py (whose tables and `_measure` the --pins and --comparisons modes use), SmolLM2, the
    pins' window and its unquantized reference scores."""
    tests = Path(__file__).resolve().parent.parent / "tests"
    sys.path.insert(0, str(tests))
    import test_quality_pins as pins  # noqa: PLC0415  (a test module: imported only for these modes)

    torch.set_num_threads(1)
    smollm2 = models.load_smollm2()
    ids = license_corpus(smollm2[1], pins.PREFILL + pins.DECODE + 1)
    reference = decode_time_ppl(smollm2[0], ids, prefill=pins.PREFILL, decode=pins.DECODE, chunk=pins.DECODE)
    return pins, smollm2, ids, reference


def machine() -> dict:
    """What the numbers depend on beyond the code (session 42: another CPU moved every pin's KL by -18..+28%)."""
    import platform

    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--pins", action="store_true", help="every pin of tests/test_quality_pins.py instead")
    parser.add_argument("--only", default="", help="with --pins: these pins only (comma-separated names)")
    parser.add_argument(
        "--comparisons", action="store_true", help="every comparison of tests/test_quality_pins.py instead"
    )
    parser.add_argument("--out", default="")
    parser.set_defaults(offsets="0,8192")
    args = parser.parse_args()
    if args.pins or args.comparisons:
        results = {"command": " ".join(sys.argv), "machine": machine(), "jitter": JITTER}
        if args.pins:
            results["pins"] = pins_noise(args.seeds, set(filter(None, args.only.split(","))))
        if args.comparisons:
            results["comparisons"] = comparisons_noise(args.seeds)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
        return
    harness = Harness.load(args)
    results = {"command": " ".join(sys.argv), "machine": machine(), "jitter": JITTER}
    results.update(prefill=args.prefill, decode=args.decode)
    results["offsets"], results["configs"] = args.offsets, {}
    for name in args.configs.split(","):
        config = CONFIGS[name]
        runs = []
        for seed in [-1, *range(args.seeds)]:
            t0 = time.time()
            with _jitter(seed) as flips:
                deltas, kls = harness.score(
                    lambda c=config: RQCache(c, calibration="prompt", model_config=harness.model.config)
                )
            runs.append({"seed": seed, "ppl_delta": deltas, "kl": kls, "flips": flips[0]})
            cells = " / ".join(f"{d:+.2f}% (KL {k:.4f})" for d, k in zip(deltas, kls, strict=True))
            print(f"{name} seed {seed:2d}: {cells}, {flips[0]} flips, {time.time() - t0:.0f} s", flush=True)
        results["configs"][name] = runs
        for w, offset in enumerate(args.offsets.split(",")):
            d = [r["ppl_delta"][w] for r in runs]
            k = [r["kl"][w] for r in runs]
            print(
                f"{name} window {offset}: ppl delta {min(d):+.2f} .. {max(d):+.2f}% (sd {statistics.stdev(d):.2f}), "
                f"KL {min(k):.4f} .. {max(k):.4f} (sd {statistics.stdev(k):.4f}) over {len(runs)} runs",
                flush=True,
            )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
