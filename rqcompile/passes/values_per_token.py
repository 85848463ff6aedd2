"""Turn programs that store V's codes packed along keys (`RQConfig(value_layout="keys")`) into programs that store
them per token, with the same codes.

Why: the ONNX / TensorRT translations read and write codes per token (a cache write there is a ScatterND of whole
rows); a block read-modify-write has no translation. The two layouts hold the same codes, so an exported program
computes what the programs it came from compute; only the byte order of its V cache differs (its artifact records
`value_layout="coordinates"`). What changes, per V site:

    rq.write_along_keys(<get_attr v_codes_i>, codes, cache_position, bits)      # in place
    ... reads of <get_attr v_codes_i> after it

becomes

    written = aten.index_copy_.default(<get_attr v_codes_i>, 2, cache_position, codes)
    ... the same reads, of `written`

and every `along_keys=True` / `v_along_keys=True` reader (rq::dequantize, rq::attention(_lse),
`attention_with_exact_tokens`) loses the flag.
"""

from __future__ import annotations

import copy

import torch
from torch import fx

from rqcompile.passes.exact_attention import attention_with_exact_tokens

_WRITE = torch.ops.rq.write_along_keys.default
_INDEX_COPY = torch.ops.aten.index_copy_.default
_DEQUANTIZE = torch.ops.rq.dequantize.default
_DEQUANTIZE_ALONG_KEYS = 11  # rq::dequantize's positional index of `along_keys`
_V_READERS = (torch.ops.rq.attention.default, torch.ops.rq.attention_lse.default, attention_with_exact_tokens)


def values_per_token(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule (sharing `gm`'s buffers and parameters, `gm` untouched) whose V writes and reads are per
    token. A program without V packed along keys comes back as an equal copy."""
    graph = copy.deepcopy(gm.graph)  # nodes and the output's codegen; no tensors
    order = {node: i for i, node in enumerate(graph.nodes)}
    for write in [n for n in graph.nodes if n.op == "call_function" and n.target is _WRITE]:
        buffer, codes, cache_position, _ = write.args
        with graph.inserting_before(write):
            written = graph.call_function(_INDEX_COPY, (buffer, 2, cache_position, codes))
        for user in list(buffer.users):
            if user is not written and user is not write and order.get(user, -1) > order[write]:
                user.replace_input_with(buffer, written)
        graph.erase_node(write)
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is _DEQUANTIZE:
            if len(node.args) > _DEQUANTIZE_ALONG_KEYS:
                node.args = node.args[:_DEQUANTIZE_ALONG_KEYS] + (False,)
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "along_keys"}
        elif node.target in _V_READERS:
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "v_along_keys"}
    graph.lint()
    out = fx.GraphModule(gm, graph)
    out.meta.update(gm.meta)
    return out
