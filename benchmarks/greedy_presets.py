"""Greedy agreement of the bit-allocation presets (QUALITY.md, "Session 3"), which benchmarks/presets.py does not
measure: the fp model's 64 greedy tokens after each evaluation window's 512-token prompt, teacher-forced through the
compressed cache (`forced_greedy_agreement`: `prefix` = agreement before the first divergence, exactly a free greedy
run's; `top1` = positions whose argmax is the reference token). Calibration as presets.py (4096 stdlib tokens).

    .venv/bin/python benchmarks/greedy_presets.py --out benchmarks/results/greedy_presets.json
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
import transformers
from presets import preset_calibrations

from rqcompile.cache import RQCache
from rqcompile.config import RQConfig
from rqcompile.eval import forced_greedy_agreement, greedy_tokens, license_corpus
from rqcompile.models import load_smollm2

ALLOCATION = (2, 3, 4, 5, 6)
PRESETS = {
    "iso K4V3.5 alloc (4.0)": RQConfig(
        residual_window=0, backend="iso", key_bits=4, value_bits=3.5, bit_allocation=ALLOCATION
    ),
    "iso K3.5V3 alloc (3.5)": RQConfig(
        residual_window=0, backend="iso", key_bits=3.5, value_bits=3, bit_allocation=ALLOCATION
    ),
    "planar K3.5V3 alloc (3.5)": RQConfig(
        residual_window=0, backend="planar", key_bits=3.5, value_bits=3, bit_allocation=ALLOCATION
    ),
    "rotor K3V2.5 alloc (3.0)": RQConfig(
        residual_window=0, backend="rotor", key_bits=3, value_bits=2.5, bit_allocation=ALLOCATION
    ),
    "hadamard K3.5V3 alloc (3.5)": RQConfig(
        residual_window=0, backend="hadamard", key_bits=3.5, value_bits=3, bit_allocation=ALLOCATION
    ),
    "hadamard K3V2.5 alloc (3.0)": RQConfig(
        residual_window=0, backend="hadamard", key_bits=3, value_bits=2.5, bit_allocation=ALLOCATION
    ),
    "iso K3V3 uniform (3.25)": RQConfig(residual_window=0, rotation_stages=1, backend="iso", bits=3),
}
N = 64


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--offsets", default="0,8192,16384")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/greedy_presets.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    model, tok = load_smollm2()
    full, hadamard_calib = preset_calibrations(model, tok)
    offsets = [int(o) for o in args.offsets.split(",")]
    prompts = [license_corpus(tok, 513, offset=o)[:, :512] for o in offsets]
    references = [greedy_tokens(model, p, n=N, progress=False) for p in prompts]
    rows = []
    for name, config in PRESETS.items():
        config = config.replace(sink_tokens=1)
        calib = hadamard_calib if config.backend == "hadamard" else full
        results = [
            forced_greedy_agreement(model, p, lambda c=config, k=calib: RQCache(c, calibration=k), r)
            for p, r in zip(prompts, references)
        ]
        row = {
            "preset": name,
            "config": config.to_dict(),
            "prefix": [a.prefix for a in results],
            "top1": [a.top1 for a in results],
        }
        rows.append(row)
        print(
            f"{name:30s} prefix {[round(x, 3) for x in row['prefix']]} top1 {[round(x, 3) for x in row['top1']]}",
            flush=True,
        )
    data = {
        "n": N,
        "offsets": offsets,
        "rows": rows,
        "machine": f"{platform.processor() or platform.machine()} CPU, 1 thread",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "command": f"benchmarks/greedy_presets.py --offsets {args.offsets} --out {args.out}",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1))
    return data


if __name__ == "__main__":
    main()
