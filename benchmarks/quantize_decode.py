"""The decode-step quantize: the tiled kernel ("v1") against the per-row kernel ("rows", kernels/quantize_rows.py)
on Qwen3.5-27B's KV shapes (4 KV heads, head_dim 256), 1 / 4 / 16 new tokens (`--tokens`), batch 1 and 8, timed as
CUDA-graph replays (`do_bench_cudagraph` medians: a compiled decode step replays its quantize calls from a graph,
so launch overhead is not what is measured), the host time per eager call (a loop of 200 calls), and each
variant's codes against the reference quantizer.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/quantize_decode.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from triton.testing import do_bench_cudagraph

from rqcompile.config import RQConfig
from rqcompile.kernels.quantize import launch_quantize
from rqcompile.quant import quantizer

CONFIGS = {  # name: RQConfig overrides (the default is iso, 3 bits, full mixing: one dense block per norm group)
    "default (iso full mixing)": {},
    "planar, one block layer": {"backend": "planar", "rotation_stages": 1},
    "hadamard": {"backend": "hadamard"},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,8")
    p.add_argument("--tokens", default="1,4,16")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    print(f"GPU {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    rows = []
    print(
        "| config | batch | tokens | v1 us | rows us | v1 / rows | eager us per call (v1 / rows) "
        "| codes differing from the reference (v1 / rows) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, overrides in CONFIGS.items():
        st = quantizer.make_state(RQConfig(**overrides), layer_idx=1, kind="k", num_heads=4, head_dim=256).to("cuda")
        for batch in map(int, args.batches.split(",")):
            for tokens in map(int, args.tokens.split(",")):
                x = torch.randn(batch, tokens, 4, 256, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
                params = (st.rotation, st.mean, st.scale, st.levels, st.bits, st.group)
                ref, _ = quantizer.quantize(x, *params[:4], st.widths, st.group, st.perm)
                row = {"config": name, "batch": batch, "tokens": tokens}
                for variant in ("v1", "rows"):
                    t0 = time.time()
                    codes, _ = launch_quantize(x, *params, variant=variant)
                    torch.cuda.synchronize()
                    row[f"{variant}_first_call_s"] = time.time() - t0
                    row[f"{variant}_code_bytes_differing"] = (codes != ref).float().mean().item()
                    fn = lambda x=x, p=params, v=variant: launch_quantize(x, *p, variant=v)  # noqa: E731
                    row[f"{variant}_us"] = 1e3 * do_bench_cudagraph(fn, return_mode="median")
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    for _ in range(200):  # eager: host time per call (launch-bound at these sizes)
                        fn()
                    torch.cuda.synchronize()
                    row[f"{variant}_eager_us"] = 1e6 * (time.perf_counter() - t0) / 200
                rows.append(row)
                print(
                    f"| {name} | {batch} | {tokens} | {row['v1_us']:.1f} | {row['rows_us']:.1f} | "
                    f"{row['v1_us'] / row['rows_us']:.2f}x | {row['v1_eager_us']:.1f} / {row['rows_eager_us']:.1f} | "
                    f"{row['v1_code_bytes_differing']:.1e} / "
                    f"{row['rows_code_bytes_differing']:.1e} |",
                    flush=True,
                )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
        (args.out / "quantize_decode.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
