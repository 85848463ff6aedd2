"""The functional form of a cache-mutating program: the cache goes in as inputs and comes back as outputs.

ONNX drops buffer mutation and an AOTInductor package owns its constants, so both export paths (and
`CompiledLM.functional_step`) run a program through this wrapper, with the caller owning the cache tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import fx, nn


class FunctionalStep(nn.Module):
    """`forward(input_ids, cache_position, *state) -> (logits, *new_state)` around a buffer-mutating program.

    `state_names` name the program's buffers that hold the cache, in the order the state tensors are passed. The
    incoming state is cloned and bound to those buffers with `functional_call`, so the inputs are never mutated and
    the graph has no aliasing between inputs and outputs. Weights and quantizer parameters stay the program's own.
    """

    def __init__(self, program: torch.export.ExportedProgram | nn.Module, state_names: Sequence[str]):
        super().__init__()
        self.inner = program.module() if isinstance(program, torch.export.ExportedProgram) else program
        self.state_names = list(state_names)

    def forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor, *state: torch.Tensor):
        if len(state) != len(self.state_names):
            raise ValueError(
                f"expected {len(self.state_names)} cache tensors ({', '.join(self.state_names)}), got {len(state)}"
            )
        bound = {name: tensor.clone() for name, tensor in zip(self.state_names, state, strict=True)}
        logits = torch.func.functional_call(self.inner, bound, (input_ids, cache_position), strict=False)
        return (logits, *[bound[name] for name in self.state_names])


def has_scan(root: nn.Module) -> bool:
    """Whether any graph under `root` holds a `scan` (Qwen3.5's chunked linear-attention prefill)."""
    for module in root.modules():
        if isinstance(module, fx.GraphModule):
            for node in module.graph.nodes:
                if node.op == "call_function" and node.target is torch.ops.higher_order.scan:
                    return True
    return False
