"""Prompt calibration on degenerate prompts (issue 6 robustness): decode-time quality of the drop-in cache's default
(`calibration="prompt"`) when the prompt is a run of one repeated token, two alternating tokens or a list of numbers,
against no calibration and the fp cache, on SmolLM2; real prompts of the same length as the control. Each prompt is
followed by the same 256 tokens of license text, teacher-forced in one chunk.

    .venv/bin/python benchmarks/degenerate_prompts.py [--thresholds 0,0.05] [--out FILE.json]

`--thresholds`: values of `rqcompile.calibrate.MIN_PROMPT_SCALE` to compare (0 disables the guard).
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
from pathlib import Path

import torch

from rqcompile import IsoQuantCache
from rqcompile.eval import license_corpus, stdlib_corpus
from rqcompile.eval.metrics import decode_time_ppl, kl_divergence
from rqcompile.models import load_smollm2

calibrate_module = importlib.import_module("rqcompile.calibrate")  # `rqcompile.calibrate` is also a function's name


def prompts(tok) -> dict[str, torch.Tensor]:
    the, a_b = tok.encode(" the"), tok.encode(" a b")
    return {
        "one token x16": torch.full((1, 16), the[0]),
        "two tokens alternating x16": torch.tensor([a_b * 8]),
        "numbers 0-11": torch.tensor([tok.encode(" ".join(str(i) for i in range(12)))]),
        "license text, 16 tokens": license_corpus(tok, 16, offset=100),
        "stdlib text, 16 tokens": stdlib_corpus(tok, 2016)[:, 2000:],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--thresholds", default="0,0.05")
    ap.add_argument("--decode", type=int, default=256)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    model, tok = load_smollm2()
    text = license_corpus(tok, args.decode + 1, offset=4096)
    rows = []
    for name, prompt in prompts(tok).items():
        ids = torch.cat([prompt, text], 1)
        n = prompt.shape[1]
        ref = decode_time_ppl(model, ids, prefill=n, decode=args.decode, chunk=args.decode)
        configs = [("none", None, 0.0)] + [
            (f"prompt, guard {t}", "prompt", float(t)) for t in args.thresholds.split(",")
        ]
        for label, calibration, threshold in configs:
            calibrate_module.MIN_PROMPT_SCALE = threshold
            out = decode_time_ppl(
                model,
                ids,
                make_cache=lambda c=calibration: IsoQuantCache(bits=3, calibration=c),
                prefill=n,
                decode=args.decode,
                chunk=args.decode,
            )
            kl = kl_divergence(ref, out).mean().item()
            rows.append({"prompt": name, "config": label, "fp_ppl": ref.ppl, "ppl": out.ppl, "kl": kl})
            print(f"{name:28s} {label:18s} ppl {out.ppl:12.2f} (fp {ref.ppl:6.2f})  KL {kl:.4f}", flush=True)
    if args.out:
        meta = {"command": "benchmarks/degenerate_prompts.py", "machine": platform.processor() or platform.machine()}
        args.out.write_text(json.dumps({"meta": {**meta, "torch": torch.__version__}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
