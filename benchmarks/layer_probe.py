"""Research: `key_sensitivity`'s per-layer probe for keys or values at any widths, with the quality harness's
calibration (stdlib query key scales + the prompt's means: what the 1K / 8K harness rows use), on SmolLM2.

    .venv/bin/python benchmarks/layer_probe.py --backend iso --part v --key-bits 3 --value-bits 2
    .venv/bin/python benchmarks/layer_probe.py --backend iso --part k --key-bits 2 --value-bits 2

Prints each layer's KL, the ranking and the top `--top` layers as a `pair_query_scales.py --v3-layers / --k3-layers`
spec (QUALITY.md "Session 38": value layers chosen this way for K3 V3/2, 3-bit-key layers for K3/2 V2).
"""

from __future__ import annotations

import argparse
import time

import torch
from quality_harness import Harness, add_arguments

from rqcompile import RQConfig
from rqcompile.sensitivity import _layer_scores


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.add_argument("--backend", default="iso")
    p.add_argument("--part", choices=("k", "v"), default="k", help="which part of the probed layer is quantized")
    p.add_argument("--key-bits", type=int, default=3)
    p.add_argument("--value-bits", type=int, default=3)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    harness = Harness.load(args)  # (its windows are not read: only the model, tokenizer and calibration text)
    torch.set_num_threads(args.threads)
    config = RQConfig(backend=args.backend, key_bits=args.key_bits, value_bits=args.value_bits)
    t0 = time.perf_counter()
    found = _layer_scores(
        harness.model, config, args.part, tokenizer=harness.tokenizer, input_ids=None,
        calibration=harness.query_scale_calibration(), prompt_means=True, passage=512, gap=1024, passages=2,
        progress=False,
    )  # fmt: skip
    print(f"{args.backend} K{args.key_bits}V{args.value_bits}, part {args.part} ({found.source}): "
          f"{time.perf_counter() - t0:.0f} s")  # fmt: skip
    print("KL {" + ", ".join(f"{i}: {found.kl[i]:.5f}" for i in sorted(found.kl)) + "}")
    print(f"ranked {found.ranked()}")
    top = sorted(found.ranked()[: args.top])
    print(f"top {args.top}: {'+'.join(str(i) for i in top)}")


if __name__ == "__main__":
    main()
