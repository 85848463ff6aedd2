"""Many-window statistics for the research logs of the 1K quality harness (issue 6's targets, session 36).

A ppl delta on one 256-step window moves by 1-3 points when a few dozen codes flip (QUALITY.md "Session 35"), so the
targets (<= 2% at <= 3.5 bits/element, <= 5% at <= 3.0, block backends at least as good as Hadamard) cannot be
judged from three windows. This reads the per-window cells that `pair_query_scales.py` (and every script printing
`quality_harness.row`) logs over many windows and reports, per config, the mean ppl delta and KL with a 95%
confidence interval over windows, and for each block backend the paired difference to Hadamard at the same widths
(the same windows, so the windows' own difficulty cancels).

    .venv/bin/python benchmarks/pair_query_scales.py --only "stdlib query key scales" --offsets <24 offsets> \
        --configs "iso K4/3 V3,...,hadamard K3V3" > run.log
    .venv/bin/python benchmarks/window_stats.py run.log [more.log ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

_BACKENDS = ("planar", "iso", "rotor", "hadamard")
# `iso K4/3 V3     <variant name>  +1.00% / -0.50% (KL 0.0100 / 0.0200; mean 0.0150) 42s`
_WIDTH = r"K[\d.]+(?:/[\d.]+)? ?V[\d.]+(?:/[\d.]+)?"  # K4V4, K4/3 V3, K3 V3/2 (presets.py's names)
_CELLS = r"[-+]\d+\.\d+%(?: / [-+]\d+\.\d+%)*"
_ROW = re.compile(
    rf"^(?P<backend>\w+) (?P<width>{_WIDTH})\s+(?P<variant>.+?)\s+(?P<deltas>{_CELLS}) \(KL (?P<kls>[^;]+);"
)


def parse_rows(text: str) -> list[dict]:
    """Every logged row: backend, widths, variant, per-window ppl deltas (%) and KLs."""
    rows = []
    for line in text.splitlines():
        m = _ROW.match(line.strip())
        if m is None or m["backend"] not in _BACKENDS:
            continue
        deltas = [float(d.strip().rstrip("%")) for d in m["deltas"].split("/")]
        kls = [float(k) for k in m["kls"].split("/")]
        if len(deltas) != len(kls):
            raise ValueError(f"{len(deltas)} ppl deltas but {len(kls)} KLs in: {line}")
        rows.append(dict(backend=m["backend"], width=m["width"].strip(), variant=m["variant"], deltas=deltas, kls=kls))
    return rows


# two-sided 95% Student t quantiles by degrees of freedom (normal beyond the table)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 23: 2.069, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000}  # fmt: skip


def _t95(dof: int) -> float:
    known = [d for d in _T95 if d <= dof]
    return _T95[max(known)] if known else _T95[1]


def mean_ci(xs: list[float]) -> tuple[float, float]:
    """(mean, half-width of its 95% confidence interval over the samples); half-width nan for one sample."""
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return mean, math.nan
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return mean, _t95(n - 1) * sd / math.sqrt(n)


def summarize(rows: list[dict]) -> list[dict]:
    """Per row: mean ppl delta / KL with CIs, the median delta, and the paired difference to the Hadamard row of the
    same widths and variant (block backends only; absent without one)."""
    hadamard = {(r["width"], r["variant"]): r for r in rows if r["backend"] == "hadamard"}
    out = []
    for r in rows:
        d, dci = mean_ci(r["deltas"])
        k, kci = mean_ci(r["kls"])
        s = dict(r, windows=len(r["deltas"]), delta=d, delta_ci=dci, kl=k, kl_ci=kci)
        s["delta_median"] = sorted(r["deltas"])[len(r["deltas"]) // 2]
        ref = hadamard.get((r["width"], r["variant"]))
        if r["backend"] != "hadamard" and ref is not None and len(ref["deltas"]) == len(r["deltas"]):
            s["vs_hadamard_delta"] = mean_ci([a - b for a, b in zip(r["deltas"], ref["deltas"], strict=True)])
            s["vs_hadamard_kl"] = mean_ci([a - b for a, b in zip(r["kls"], ref["kls"], strict=True)])
        out.append(s)
    return out


def _pm(mean: float, ci: float, fmt: str) -> str:
    return f"{mean:{fmt}}" if math.isnan(ci) else f"{mean:{fmt}} ± {ci:{fmt[1:] if fmt[0] == '+' else fmt}}"


def markdown(summary: list[dict]) -> str:
    lines = [
        "| config | windows | ppl delta (mean ± 95% CI) | median | KL (mean ± 95% CI) | vs hadamard: ppl "
        "| vs hadamard: KL |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        vs_d = _pm(*s["vs_hadamard_delta"], "+.2f") + " pts" if "vs_hadamard_delta" in s else "-"
        vs_k = _pm(*s["vs_hadamard_kl"], "+.4f") if "vs_hadamard_kl" in s else "-"
        lines.append(
            f"| {s['backend']} {s['width']} | {s['windows']} | {_pm(s['delta'], s['delta_ci'], '+.2f')}% "
            f"| {s['delta_median']:+.2f}% | {_pm(s['kl'], s['kl_ci'], '.4f')} | {vs_d} | {vs_k} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("logs", nargs="+", type=Path)
    p.add_argument("--json", type=Path, help="write the summary here")
    args = p.parse_args()
    rows = [r for path in args.logs for r in parse_rows(path.read_text())]
    if not rows:
        raise SystemExit(f"no result rows in {', '.join(map(str, args.logs))}")
    summary = summarize(rows)
    print(markdown(summary))
    if args.json:
        args.json.write_text(json.dumps(dict(logs=[str(p) for p in args.logs], rows=summary), indent=1) + "\n")


if __name__ == "__main__":
    main()
