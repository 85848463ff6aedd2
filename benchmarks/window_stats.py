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
_WIDTH = r"K[\d.]+(?:/[\d.]+)? ?V[\d.]+(?:/[\d.]+)?(?: \([\d-]+\))?"  # K4V4, K4/3 V3, K4/3 V3 (5-19): presets.py
_CELLS = r"[-+]\d+\.\d+%(?: / [-+]\d+\.\d+%)*"
_ROW = re.compile(
    rf"^(?P<backend>\w+) (?P<width>{_WIDTH})\s+(?P<variant>.+?)\s+(?P<deltas>{_CELLS}) \(KL (?P<kls>[^;]+);"
)


def parse_rows(text: str) -> list[dict]:
    """Every logged row: backend, widths, variant, the windows' offsets (from the log's `windows ...` line), per-window
    ppl deltas (%) and KLs."""
    rows, offsets = [], None
    for line in text.splitlines():
        header = re.search(r"\bwindows (\d+(?:,\d+)*)", line)
        if header:
            offsets = [int(o) for o in header[1].split(",")]
        m = _ROW.match(line.strip())
        if m is None or m["backend"] not in _BACKENDS:
            continue
        deltas = [float(d.strip().rstrip("%")) for d in m["deltas"].split("/")]
        kls = [float(k) for k in m["kls"].split("/")]
        if len(deltas) != len(kls) or (offsets is not None and len(offsets) != len(deltas)):
            raise ValueError(f"{len(deltas)} ppl deltas, {len(kls)} KLs and windows {offsets} in: {line}")
        row = dict(backend=m["backend"], width=m["width"].strip(), variant=m["variant"], offsets=offsets)
        rows.append(dict(row, deltas=deltas, kls=kls))
    return rows


# two-sided 95% Student t quantiles by degrees of freedom; _t95 takes the nearest tabulated one at or below (a wider
# interval, never a narrower one)
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


def _key(row: dict) -> tuple:
    return row["backend"], row["width"], row["variant"]


def _paired(row: dict, ref: dict | None) -> dict:
    """Mean and 95% CI of row - ref window by window (ppl points, KL), or {} unless both cover the same windows."""
    if ref is None or ref is row or ref["offsets"] != row["offsets"] or len(ref["deltas"]) != len(row["deltas"]):
        return {}
    return dict(
        delta=mean_ci([a - b for a, b in zip(row["deltas"], ref["deltas"], strict=True)]),
        kl=mean_ci([a - b for a, b in zip(row["kls"], ref["kls"], strict=True)]),
    )


def summarize(rows: list[dict], baseline: list[dict] = ()) -> list[dict]:
    """Per row: mean ppl delta / KL with CIs, the median delta, and two paired differences over the same windows:
    to the Hadamard row of the same widths and variant (`vs_hadamard`, block backends), and to the row of the same
    config in `baseline` (`vs_baseline`, e.g. another run with one setting changed)."""
    hadamard = {(r["width"], r["variant"]): r for r in rows if r["backend"] == "hadamard"}
    base = {_key(r): r for r in baseline}
    out = []
    for r in rows:
        d, dci = mean_ci(r["deltas"])
        k, kci = mean_ci(r["kls"])
        s = dict(r, windows=len(r["deltas"]), delta=d, delta_ci=dci, kl=k, kl_ci=kci)
        s["delta_median"] = sorted(r["deltas"])[len(r["deltas"]) // 2]
        s["vs_hadamard"] = _paired(r, hadamard.get((r["width"], r["variant"])))
        s["vs_baseline"] = _paired(r, base.get(_key(r)))
        out.append(s)
    return out


def _pm(mean: float, ci: float, fmt: str) -> str:
    return f"{mean:{fmt}}" if math.isnan(ci) else f"{mean:{fmt}} ± {ci:{fmt[1:] if fmt[0] == '+' else fmt}}"


def _vs(paired: dict) -> tuple[str, str]:
    if not paired:
        return "-", "-"
    return _pm(*paired["delta"], "+.2f") + " pts", _pm(*paired["kl"], "+.4f")


def markdown(summary: list[dict]) -> str:
    with_base = any(s["vs_baseline"] for s in summary)
    head = "| config | windows | ppl delta (mean ± 95% CI) | median | KL (mean ± 95% CI) | vs hadamard: ppl | KL |"
    lines = [head + (" vs baseline: ppl | KL |" if with_base else ""), "|---" * (9 if with_base else 7) + "|"]
    for s in summary:
        cells = [
            f"{s['backend']} {s['width']}",
            str(s["windows"]),
            f"{_pm(s['delta'], s['delta_ci'], '+.2f')}%",
            f"{s['delta_median']:+.2f}%",
            _pm(s["kl"], s["kl_ci"], ".4f"),
            *_vs(s["vs_hadamard"]),
            *(_vs(s["vs_baseline"]) if with_base else ()),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("logs", nargs="+", type=Path)
    p.add_argument(
        "--baseline", type=Path, help="a log of the same configs and windows to compare with, window by window"
    )
    p.add_argument("--json", type=Path, help="write the summary here")
    args = p.parse_args()
    rows = [r for path in args.logs for r in parse_rows(path.read_text())]
    if not rows:
        raise SystemExit(f"no result rows in {', '.join(map(str, args.logs))}")
    summary = summarize(rows, parse_rows(args.baseline.read_text()) if args.baseline else ())
    print(markdown(summary))
    if args.json:
        args.json.write_text(json.dumps(dict(logs=[str(p) for p in args.logs], rows=summary), indent=1) + "\n")


if __name__ == "__main__":
    main()
