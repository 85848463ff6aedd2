"""Does a token's code depend on how many tokens it was quantized with, on the GPU? (session 41)

On the CPU the reference encoder is row-count invariant (its rotation accumulates in float64: docs/FORMAT.md
"Row-count invariance"). On CUDA a call of at most `DEFAULTS["rows_max_tokens"]` tokens (a decode step, the residual
window spilling a token) runs the "rows" kernel, a longer one (a prefill) the bulk "v2" kernel, and their float32
sums need not round alike. This measures, on the same random bf16 K/V at Qwen3.5-27B's attention shape, the fraction
of norm groups whose codes or stored norms differ between
- "rows" over the whole tensor and "rows" one token per call (is the decode kernel invariant itself?),
- "rows" and "v2" over the whole tensor (a token written by a decode step vs the same token in a prefill),
- each kernel and the reference,
for every block backend's default (fully mixed, dense blocks) and one-layer (block) rotation, at 2, 3 and 4 bits.
`--onnx FLAVOUR` measures the ONNX translation of rq::quantize in onnxruntime (CPU) instead: one token per call
against the whole tensor, and the whole tensor against the reference.

    PYTHONPATH=. python benchmarks/row_count_invariance.py            # CUDA, [1, 4, 4096, 256]
    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/row_count_invariance.py --device cpu --tokens 8 --head-dim 64
    PYTHONPATH=. python benchmarks/row_count_invariance.py --device cpu --onnx standard --head-dim 64 --per-token 4096
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import torch

from rqcompile.config import RQConfig
from rqcompile.kernels.quantize import launch_quantize
from rqcompile.ops import quantize_state
from rqcompile.quant.quantizer import QuantState, make_state


def differing_groups(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> tuple:
    """(fraction of norm groups whose code bytes differ, fraction of stored norms that differ) between two
    (codes, norms) results; a row's code bytes split evenly among its groups (one norm each)."""
    codes_a, codes_b = a[0].flatten(0, 2), b[0].flatten(0, 2)
    groups = a[1].shape[-1]
    code_groups = (codes_a != codes_b).unflatten(-1, (groups, -1)).any(-1)
    norms = a[1].flatten(0, 2) != b[1].flatten(0, 2)
    return code_groups.float().mean().item(), norms.float().mean().item()


def one_token_per_call(encode, x: torch.Tensor, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, norms) of x's first `tokens` tokens, each coded by its own `encode` call."""
    calls = [encode(x[:, :, t : t + 1]) for t in range(tokens)]
    return tuple(torch.cat(parts, dim=2) for parts in zip(*calls, strict=True))


def encode(x: torch.Tensor, state: QuantState, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    return launch_quantize(
        x, state.rotation, state.mean, state.scale, state.levels, state.bits, state.group, variant=variant
    )


def measure(config: RQConfig, x: torch.Tensor, per_token: int) -> dict[str, tuple[float, float]]:
    """Each pair's differing fractions for one config; `per_token` tokens are also coded one per call."""
    heads, dim = x.shape[1], x.shape[-1]
    state = make_state(config, layer_idx=0, kind="k", num_heads=heads, head_dim=dim).to(x.device)
    rows, bulk = encode(x, state, "rows"), encode(x, state, "v2")
    reference = quantize_state(x.cpu(), state.to("cpu"))
    reference = tuple(t.to(x.device) for t in reference)
    single = one_token_per_call(lambda t: encode(t, state, "rows"), x, per_token)
    head = tuple(t[:, :, :per_token] for t in rows)
    return {
        "rows one token / rows all": differing_groups(single, head),
        "rows / v2": differing_groups(rows, bulk),
        "rows / reference": differing_groups(rows, reference),
        "v2 / reference": differing_groups(bulk, reference),
    }


class _Quantize(torch.nn.Module):
    """rq::quantize with one QuantState's parameters as buffers, for export."""

    def __init__(self, state: QuantState) -> None:
        super().__init__()
        self.bits, self.group = state.bits, state.group
        for name in ("rotation", "mean", "scale", "levels"):
            self.register_buffer(name, getattr(state, name))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.rq.quantize(x, self.rotation, self.mean, self.scale, self.levels, self.bits, self.group)


def measure_onnx(config: RQConfig, x: torch.Tensor, per_token: int, flavour: str) -> dict[str, tuple[float, float]]:
    """`measure` for the ONNX translation run in onnxruntime on the CPU."""
    import onnxruntime as ort  # noqa: PLC0415  (only this mode needs it)

    from rqcompile.export.onnx_ops import export_onnx  # noqa: PLC0415

    heads, dim = x.shape[1], x.shape[-1]
    state = make_state(config, layer_idx=0, kind="k", num_heads=heads, head_dim=dim)
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("tokens")}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export_onnx(
            _Quantize(state).eval(), (x[:, :, :5],), Path(tmp) / "q.onnx", flavour=flavour, dynamic_shapes=(dims,)
        )
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(torch.from_numpy(o) for o in session.run(None, {name: t.contiguous().numpy()}))

    whole = run(x)
    single = one_token_per_call(run, x, per_token)
    head = tuple(t[:, :, :per_token] for t in whole)
    return {
        "one token / all": differing_groups(single, head),
        "all / reference": differing_groups(whole, quantize_state(x, state)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=256)
    parser.add_argument("--per-token", type=int, default=64, help="tokens also coded one per call")
    parser.add_argument("--bits", default="2,3,4")
    parser.add_argument("--onnx", default="", help="standard | tensorrt: measure the ONNX translation instead")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, args.heads, args.tokens, args.head_dim, generator=generator)
    x = (x * (1 + 4 * (torch.rand(args.head_dim, generator=generator) < 0.05))).to(torch.bfloat16).to(args.device)
    name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    what = f"ONNX ({args.onnx}) in onnxruntime" if args.onnx else name
    print(f"{what}, x {list(x.shape)} bf16 (5% of channels 5x wider), torch {torch.__version__}")
    print("fraction of norm groups whose codes differ / of stored norms that differ")
    for backend in ("planar", "iso", "rotor"):
        for stages in ("full", 1):
            for bits in map(int, args.bits.split(",")):
                config = RQConfig(backend=backend, bits=bits, rotation_stages=stages)
                per_token = min(args.per_token, args.tokens)
                if args.onnx:
                    cells = measure_onnx(config, x.float(), per_token, args.onnx)
                else:
                    cells = measure(config, x, per_token)
                row = "  ".join(f"{k}: {c:.1e} / {n:.1e}" for k, (c, n) in cells.items())
                print(f"{backend:6s} stages {stages!s:4s} {bits} bits  {row}", flush=True)


if __name__ == "__main__":
    main()
