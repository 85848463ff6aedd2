"""One launch of the decode attention kernel as a calibrated Qwen3.5-27B decode runs it (keys-m, the rope term over
32 pairs, kv_len, V packed along keys unless `--per-token`), then its mean |output|: small enough for
compute-sanitizer, which is how session 23 looked at the tiled rope patch (benchmarks/NOTES.md "Session 23": NaN with
V along keys, memcheck clean).

    PYTHONPATH=. CUDA_LAUNCH_BLOCKING=1 compute-sanitizer --tool memcheck python3 benchmarks/one_launch_probe.py 8:4096
"""

from __future__ import annotations

import argparse
import math

import torch
from attn_profile import DIM, along_keys, inputs, rope_inputs

from rqcompile.kernels.attention import launch_attention


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("shape", nargs="?", default="1:4096", help="batch:context")
    p.add_argument("--per-token", action="store_true", help="V per token instead of packed along keys")
    p.add_argument("--no-rope", action="store_true", help="without the rope term (the uncalibrated decode launch)")
    p.add_argument("--kv-start", type=int, default=0, help="keys before this are masked (apply's decode: the sink)")
    p.add_argument("--rope-scale", type=float, default=1.0, help="multiplies the rope weights (0: a term of zeros)")
    p.add_argument("--check-split", action="store_true", help="also run the split kernel, print the largest difference")
    args = p.parse_args()
    batch, ctx = (int(v) for v in args.shape.split(":"))
    torch.manual_seed(0)
    op_args, _ = inputs(batch, ctx, "iso:sfull", 3)
    if not args.per_token:
        op_args = along_keys(op_args, 3)
    rope = {} if args.no_rope else rope_inputs(batch, 32)
    if rope:
        rope["rope_ab"] *= args.rope_scale
    kv_len = torch.full((batch,), ctx, device="cuda")
    torch.cuda.synchronize()

    def launch(**kw):
        return launch_attention(
            *op_args,
            None,
            1 / math.sqrt(DIM),
            kv_len,
            **rope,
            v_along_keys=not args.per_token,
            kv_start=args.kv_start,
            **kw,
        )

    out = launch()
    torch.cuda.synchronize()
    print(f"B{batch} {ctx} {'per token' if args.per_token else 'V along keys'}: mean |out| {out.float().abs().mean()}")
    if args.check_split:
        ref = launch(variant="split")
        print(f"  split kernel: mean |out| {ref.float().abs().mean()}, max |keys-m - split| {(out - ref).abs().max()}")


if __name__ == "__main__":
    main()
