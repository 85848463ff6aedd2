"""Research (session 17): keep the prompt tokens that attention concentrates on exact ("heavy hitters", as H2O keeps
them), beside the sink token: how much KL does that buy per byte, against spending the bytes on more bits?

The rate-distortion check (`noise_bound.py`) says a better per-token quantizer cannot close issue 6's gap; this asks
whether information the per-token coder does not use, which tokens the model reads, can. An oracle selection: per
layer, the S prompt positions (the sink left out) that received the most attention from the prompt's last 128
queries (summed over heads) in the fp model, kept exact in the model dtype by a research patch of the cache layer
(its padded-batch row sinks: exact K/V scattered over the dequantized history). Against the same S chosen at random
and the S most recent prompt tokens. Bytes: each exact token costs its K and V in bf16 per layer (counted below as
bits/element over the evaluated 768 tokens, on top of the format's).

Harness: `quality_harness` (1K, no window), `RQCache(config, calibration=..., prompt_means=True)`.

    cd benchmarks && ../.venv/bin/python heavy_hitters.py --configs "iso K3V3" --sizes 8,16,32
"""

from __future__ import annotations

import argparse
import time

import torch
from pair_query_scales import WIDTHS
from quality_harness import Harness, add_arguments, row

from rqcompile.cache import RQCache, RQCacheLayer
from rqcompile.config import RQConfig

_update = RQCacheLayer.update


def attention_received(model, prompt: torch.Tensor, last: int = 128) -> list[torch.Tensor]:
    """Per layer: [T] attention each prompt position received from the prompt's last `last` queries, all heads."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(prompt[None], output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    return [a[0, :, -last:, :].sum((0, 1)) for a in out.attentions]


def select(kind: str, size: int, received: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
    """Per layer: the positions kept exact (always 0, the sink, plus `size` chosen by `kind`)."""
    out = []
    for scores in received:
        length = scores.numel()
        if kind == "oracle":
            chosen = scores[1:].topk(size).indices + 1
        elif kind == "random":
            chosen = torch.randperm(length - 1, generator=generator)[:size] + 1
        elif kind == "recent":
            chosen = torch.arange(length - size, length)
        else:
            raise ValueError(kind)
        out.append(torch.cat([torch.zeros(1, dtype=torch.long), chosen.sort().values]))
    return out


def patch(positions: list[torch.Tensor] | None) -> None:
    """Research patch: on its first (prefill) update each layer keeps those prompt positions exact."""
    if positions is None:
        RQCacheLayer.update = _update
        return

    def update(self, key_states, value_states, *args, **kwargs):
        first = self.get_seq_length() == 0
        out = _update(self, key_states, value_states, *args, **kwargs)
        if not first:
            return out
        index = positions[self.layer_idx].to(key_states.device)[None].expand(key_states.shape[0], -1)
        gather = index[:, None, :, None].expand(-1, key_states.shape[1], -1, key_states.shape[-1])
        self.k_row_sink, self.v_row_sink = key_states.gather(2, gather), value_states.gather(2, gather)
        self.row_sink_index = index
        return self._materialize()

    RQCacheLayer.update = update


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="iso K3V3")
    p.add_argument("--sizes", default="8,16,32", help="exact tokens per layer besides the sink")
    p.add_argument("--kinds", default="oracle,random,recent")
    add_arguments(p)
    args = p.parse_args()
    harness = Harness.load(args)
    calib = harness.query_scale_calibration()
    received = [attention_received(harness.model, ids.reshape(-1)[: args.prefill]) for ids in harness.windows]
    evaluated = args.prefill + args.decode
    print(f"prefill {args.prefill}, decode {args.decode}, windows {args.offsets}, no window", flush=True)
    for spec in args.configs.split(","):
        backend, widths = spec.strip().split(" ", 1)
        config = RQConfig(backend=backend, residual_window=0, **WIDTHS[widths])
        make = lambda c=config: RQCache(c, calibration=calib, prompt_means=True)  # noqa: E731
        t0 = time.perf_counter()
        print(f"{spec:14s} {'sink only':22s} +0.000 bits  {row(*harness.score(make))} {time.perf_counter() - t0:.0f}s")
        for size in (int(s) for s in args.sizes.split(",")):
            extra = size * 16 / evaluated  # bf16 K/V of `size` tokens, per element of the evaluated sequence
            for kind in args.kinds.split(","):
                t0, deltas, kls = time.perf_counter(), [], []
                for w, (ids, ref) in enumerate(zip(harness.windows, harness.refs, strict=True)):
                    patch(select(kind, size, received[w], torch.Generator().manual_seed(w)))
                    one = Harness(harness.model, None, None, [ids], [ref], harness.prefill, harness.decode)
                    d, k = one.score(make)
                    deltas += d
                    kls += k
                patch(None)
                name = f"{kind} {size}"
                print(
                    f"{spec:14s} {name:22s} +{extra:.3f} bits  {row(deltas, kls)} {time.perf_counter() - t0:.0f}s",
                    flush=True,
                )


if __name__ == "__main__":
    main()
