"""The decode step's V write, packed per token (`index_copy_` of rq::quantize's codes) against packed along keys
(`rq::write_along_keys`, a read-modify-write of the touched 16-token blocks), CUDA-graph medians at Qwen3.5-27B's
KV shape (4 heads, head_dim 256, 3 bits).

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/write_along_keys_bench.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton

import rqcompile.ops  # noqa: F401  (registers torch.ops.rq.*)

HEADS, DIM, BITS = 4, 256, 3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--tokens", default="1,16")
    args = parser.parse_args()
    rows = []
    nbytes = DIM * BITS // 8
    for batch in (int(b) for b in args.batches.split(",")):
        buffer = torch.randint(0, 256, (batch, HEADS, 32768, nbytes), dtype=torch.uint8, device="cuda")
        for tokens in (int(t) for t in args.tokens.split(",")):
            codes = torch.randint(0, 256, (batch, HEADS, tokens, nbytes), dtype=torch.uint8, device="cuda")
            position = torch.arange(20007, 20007 + tokens, device="cuda")
            copy_ms = triton.testing.do_bench_cudagraph(lambda b=buffer, p=position, c=codes: b.index_copy_(2, p, c))
            along_ms = triton.testing.do_bench_cudagraph(
                lambda b=buffer, p=position, c=codes: torch.ops.rq.write_along_keys(b, c, p, BITS)
            )
            rows.append(
                {"batch": batch, "tokens": tokens, "index_copy_us": copy_ms * 1e3, "along_keys_us": along_ms * 1e3}
            )
            print(f"B{batch} t={tokens}: index_copy_ {copy_ms * 1e3:.1f} us, write_along_keys {along_ms * 1e3:.1f} us")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "write_along_keys.json"), "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
