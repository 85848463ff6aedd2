"""Give the fused attention of a decode program the pre-RoPE key offset's cos / sin as a table.

With `RQConfig.rope_key_mean` every fused site adds the term `sum_i A_i cos(j theta_i) + B_i sin(j theta_i)` to the
score of key slot j (rq::attention's `rope_ab` / `rope_inv_freq`). The CUDA decode kernel (keys-m) otherwise computes
the cos / sin of each key tile in registers, and that costs it a quarter of its time at batch 8 (H200, 255 registers
against 203 without the term); read from a table it costs 4% (BENCHMARKS.md "Session 42"). This pass registers the
table once per distinct set of frequencies, `rope_table` fp16 [max_cache_len, 2 ROPE_K]
(`kernels.rope_term.rope_table`, 128 B per slot at Qwen3.5-27B's 32 rotary pairs), and passes it to every site:

    rq.attention(..., rope_ab, <get_attr rq_rope_inv_freq_i>, ...)
 -> rq.attention(..., rope_ab, <get_attr rq_rope_inv_freq_i>, ..., rope_table=<get_attr rq_rope_table>)

and likewise `attention_with_exact_tokens(..., k_rope_mean, inv_freq, ...)` (which hands it to rq::attention_lse).
Nothing else changes: the torch implementation ignores the table and the other kernels compute the term as before,
so the program's results are those of the program without it, up to the table's fp16 rounding of the cos / sin.
`rqcompile.apply` runs it on the decode program of a fused CUDA model; `gm.meta["rq_rope_table"]` counts the sites.
"""

from __future__ import annotations

import torch
from torch import fx

import rqcompile.ops  # noqa: F401  (registers torch.ops.rq.*)
from rqcompile.kernels.rope_term import rope_table as build_table
from rqcompile.passes.exact_attention import attention_with_exact_tokens

__all__ = ["rope_table"]

# each reader of the term: its positional index of rope_inv_freq (the K codes are argument 1 of all three)
_READERS = {
    torch.ops.rq.attention.default: 22,
    torch.ops.rq.attention_lse.default: 22,
    attention_with_exact_tokens: 28,
}


def _inv_freq(node: fx.Node) -> fx.Node | None:
    """The site's `rope_inv_freq` when it is a buffer (the programs' `rq_rope_inv_freq_i`), else None."""
    index = _READERS[node.target]
    arg = node.args[index] if len(node.args) > index else node.kwargs.get("rope_inv_freq")
    return arg if isinstance(arg, fx.Node) and arg.op == "get_attr" else None


def _slots(node: fx.Node, gm: fx.GraphModule) -> int:
    """The cache's key slots: the K codes' third dimension (a buffer, or any node with a fake value)."""
    codes = node.args[1]
    if codes.op == "get_attr":
        return int(gm.get_buffer(codes.target).shape[2])
    return int(codes.meta["val"].shape[2])


def rope_table(gm: fx.GraphModule) -> fx.GraphModule:
    """`gm` with every fused attention site that carries the rope term (and no table yet) reading its cos / sin from
    a table buffer (`rq_rope_table`, `rq_rope_table_1`, ... per distinct frequencies and slot count); in place."""
    graph = gm.graph
    tables: dict[tuple, str] = {}
    sites = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _READERS or node.kwargs.get("rope_table") is not None:
            continue
        freq_node = _inv_freq(node)
        if freq_node is None:
            continue
        freq = gm.get_buffer(freq_node.target)
        slots = _slots(node, gm)
        key = (tuple(freq.tolist()), slots, str(freq.device))
        if key not in tables:
            name = "rq_rope_table" + (f"_{len(tables)}" if tables else "")
            gm.register_buffer(name, build_table(freq, slots), persistent=True)
            tables[key] = name
        with graph.inserting_before(node):
            table = graph.get_attr(tables[key])
        node.kwargs = {**node.kwargs, "rope_table": table}
        sites += 1
    graph.lint()
    gm.recompile()
    gm.meta["rq_rope_table"] = sites
    return gm
