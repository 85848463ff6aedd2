"""Quantize v1 vs v2 (benchmarks/NOTES.md "Quantize v2") on [1, 4, 65536, 256] bf16, timed in one process: the
median of triton.testing.do_bench, each against the measured device copy bandwidth, plus the fraction of codes v2
writes differently from v1 (v1 matches the reference bit for bit on planar/iso).

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/quantize_variants.py
"""

from __future__ import annotations

import time

import torch
from triton.testing import do_bench

from rqcompile.config import RQConfig
from rqcompile.kernels.quantize import launch_quantize
from rqcompile.quant import quantizer


def main() -> None:
    x = torch.randn(1, 4, 65536, 256, device="cuda", dtype=torch.bfloat16)
    src = torch.randn(2**29, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_bw = 4 * src.numel() / (do_bench(lambda: dst.copy_(src), return_mode="median") * 1e-3)
    print(f"GPU {torch.cuda.get_device_name(0)}, copy bandwidth {copy_bw / 1e9:.0f} GB/s", flush=True)
    for backend, search in (("planar", None), ("planar", ()), ("iso", None)):
        config = RQConfig(residual_window=0, rotation_stages=1, backend=backend, bits=3)
        config = config if search is None else config.replace(scale_search=search)
        st = quantizer.make_state(config, layer_idx=1, kind="k", num_heads=4, head_dim=256).to("cuda")
        args = (x, st.rotation, st.mean, st.scale, st.levels, 3, st.group)
        out = {}
        for variant in ("v1", "v2"):
            t0 = time.time()
            codes, norms = launch_quantize(*args, variant=variant)
            torch.cuda.synchronize()
            build = time.time() - t0
            ms = do_bench(lambda a=args, v=variant: launch_quantize(*a, variant=v), return_mode="median")
            nbytes = x.numel() * 2 + codes.numel() * codes.element_size() + norms.numel() * 2
            out[variant] = codes
            print(
                f"{backend:6s} search {'off' if search == () else 'on '} {variant}: {ms:.3f} ms, "
                f"{nbytes / ms / 1e6:.0f} GB/s = {nbytes / (ms * 1e-3) / copy_bw:.1%} of copy",
                f"(first call {build:.0f} s)",
                flush=True,
            )
        diff = (out["v1"] != out["v2"]).float().mean().item()
        print(f"{backend:6s} codes bytes differing v1 vs v2: {diff:.2e}", flush=True)


if __name__ == "__main__":
    main()
