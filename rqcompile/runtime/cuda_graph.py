"""One decode step replayed from one CUDA graph: what removes the launch cost of a step made of many small calls.

Used by `CompiledLM.compile(cuda_graph=True)` (the per-layer compiled programs, whose own per-layer CUDA graphs,
`mode="reduce-overhead"`, fail on torch 2.11) and by benchmarks/e2e_bench.py to give the bf16 baseline the same
treatment, so that a comparison measures the cache, not the launch overhead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class GraphedStep:
    """`step(input_ids, cache_position) -> logits` replayed from one CUDA graph: each call copies token and position
    into the static inputs and replays; the graph is (re)captured on the first call and whenever the input shapes
    change. The returned logits are overwritten by the next call.

    Capturing needs warm-up runs of the step, which write the cache: the K/V of the step's position (written afresh
    by the real run) and any state a step advances from its old value (a linear-attention layer's conv / recurrent
    state), which `saved_state()` returns so that it is saved before the warm-up and restored after it."""

    def __init__(self, step: Callable, saved_state: Callable[[], list[torch.Tensor]] = list):
        self.step = step
        self.saved_state = saved_state
        self.graph: torch.cuda.CUDAGraph | None = None

    def __call__(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        if self.graph is None or (input_ids.shape, cache_position.shape) != self._shapes:
            self._capture(input_ids, cache_position)
        self.input_ids.copy_(input_ids)
        self.cache_position.copy_(cache_position)
        self.graph.replay()
        return self.logits

    def _capture(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> None:
        self.input_ids, self.cache_position = input_ids.clone(), cache_position.clone()
        self._shapes = (input_ids.shape, cache_position.shape)
        saved = [t.clone() for t in self.saved_state()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # compiles (first call) and lets lazy allocations happen outside the capture
                self.step(self.input_ids, self.cache_position)
        torch.cuda.current_stream().wait_stream(side)
        for live, old in zip(self.saved_state(), saved, strict=True):
            live.copy_(old)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.step(self.input_ids, self.cache_position)
