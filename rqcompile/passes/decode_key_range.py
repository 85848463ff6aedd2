"""Give a one-token decode step's fused attention its keys as a range instead of a mask.

`capture` builds one mask for all layers, `key_position <= cache_position` ([1, 1, T, L] bool). In the decode
program (T = 1) that mask is a key range, keys [0, position]: after `fuse_attention` each site still reads it (a
[L] byte row per call, the kernels' one-row mask path: +6-11% attention time on the H200, session 22) and computes
its `kv_len` from it (`valid_kv_length`, a reduction over L). This pass recognizes the capture's mask by its ops
and rewrites every fused site that reads it to take the range from `cache_position` directly:

    rq.attention(..., mask, s, valid_kv_length(mask, B), ...)
 -> rq.attention(..., None, s, decode_kv_len(cache_position, B), ...)

    attention_with_exact_tokens(..., cache_position, mask, s, valid_kv_length(mask, B), ...)
 -> attention_with_exact_tokens(..., cache_position, None, s, None, ..., causal=True)

(`causal=True`: the compressed part reads keys [sink, position - window + 1) through rq::attention_lse's `kv_len`
and `kv_start`, the exact part its slots at positions <= position). The mask ops, and any `valid_kv_length` left
without users, are removed. Sites whose mask is anything else (another shape, a user's mask, a prefill's causal
block) are left as they are; `gm.meta["rq_decode_key_range"]` counts the rewritten ones.
"""

from __future__ import annotations

import torch
from torch import fx

import rqcompile.ops  # noqa: F401  (registers torch.ops.rq.*)
from rqcompile.passes.exact_attention import attention_with_exact_tokens
from rqcompile.passes.fuse_attention import valid_kv_length

__all__ = ["decode_key_range", "decode_kv_len"]

aten = torch.ops.aten
ATTENTION = torch.ops.rq.attention.default
_MASK, _KV_LEN = 14, 16  # rq::attention's positional indices of attn_mask and kv_len
_EXACT_POSITION, _EXACT_MASK, _EXACT_KV_LEN = 19, 20, 22  # attention_with_exact_tokens' likewise
_ARANGE = (aten.arange.default, aten.arange.start, aten.arange.start_step)


def decode_kv_len(cache_position: torch.Tensor, batch: int) -> torch.Tensor:
    """int32 [batch]: one past the position of a one-token step, the keys its causal mask lets it see."""
    return (cache_position[-1:] + 1).to(torch.int32).expand(batch)


def _val_shape(node: fx.Node) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _unsqueezed(node, dim: int | None = None):
    """The input of `node` if it is an unsqueeze (at `dim`, when given), else None."""
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target is aten.unsqueeze.default:
        if dim is None or node.args[1] == dim:
            return node.args[0]
    return None


def _is_key_positions(node, length: int) -> bool:
    """Whether `node` is arange(length) (0, 1, ..., length - 1) of integers."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in _ARANGE):
        return False
    args = node.args
    if node.target is aten.arange.default:
        start, end, step = 0, args[0], 1
    elif node.target is aten.arange.start:
        start, end, step = args[0], args[1], 1
    else:
        start, end, step = args
    dtype = node.kwargs.get("dtype")
    return (start, end, step) == (0, length, 1) and (dtype is None or not dtype.is_floating_point)


def _one_token_positions(mask) -> fx.Node | None:
    """The positions node p ([1]) when `mask` is the capture's decode mask arange(L)[None] <= p[:, None], lifted to
    [1, 1, 1, L] by unsqueezes; None for any other mask."""
    shape = _val_shape(mask)
    if shape is None or len(shape) != 4 or shape[:3] != (1, 1, 1):
        return None
    node = mask
    while (inner := _unsqueezed(node)) is not None:
        node = inner
    compares = (aten.le.Tensor, aten.ge.Tensor)
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in compares):
        return None
    keys, positions = node.args if node.target is aten.le.Tensor else node.args[::-1]
    keys, positions = _unsqueezed(keys, 0), _unsqueezed(positions, 1)
    if not _is_key_positions(keys, shape[3]) or _val_shape(positions) != (1,):
        return None
    return positions


def _erase_dead(graph: fx.Graph, node, erased: set) -> None:
    """Remove `node` and then its inputs, as long as they are pure call_function nodes left without users."""
    if node in erased or not isinstance(node, fx.Node) or node.op != "call_function" or node.users or node.is_impure():
        return
    inputs = list(node.all_input_nodes)
    graph.erase_node(node)
    erased.add(node)
    for parent in inputs:
        _erase_dead(graph, parent, erased)


def decode_key_range(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite (in place) the fused sites of a one-token program whose mask is the capture's key range (module doc).
    Returns `gm`; `gm.meta["rq_decode_key_range"]` counts the rewritten sites."""
    graph = gm.graph
    rewritten, masks, lens = 0, set(), set()
    kv_lens: dict[tuple, fx.Node] = {}  # one decode_kv_len per (position, batch), shared by the sites
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (ATTENTION, attention_with_exact_tokens):
            continue
        exact = node.target is attention_with_exact_tokens
        mask_at, len_at = (_EXACT_MASK, _EXACT_KV_LEN) if exact else (_MASK, _KV_LEN)
        if len(node.args) <= len_at:
            continue
        mask = node.args[mask_at]
        positions = _one_token_positions(mask)
        q_shape = _val_shape(node)  # the output's: [B, Hq, T, d], as q's
        if positions is None or q_shape is None or q_shape[2] != 1:
            continue
        if exact and node.args[_EXACT_POSITION] is not positions:
            continue  # its exact slots follow another position than the mask's
        args = list(node.args)
        old_len = args[len_at]
        args[mask_at] = None
        if exact:
            args[len_at] = None
            node.kwargs = {**node.kwargs, "causal": True}
        else:
            key = (positions, q_shape[0])
            if key not in kv_lens:
                with graph.inserting_after(positions):
                    kv_lens[key] = graph.call_function(decode_kv_len, key)
            args[len_at] = kv_lens[key]
        node.args = tuple(args)
        masks.add(mask)
        if isinstance(old_len, fx.Node) and old_len.target is valid_kv_length:
            lens.add(old_len)
        rewritten += 1
    erased: set = set()
    for node in [*lens, *masks]:
        _erase_dead(graph, node, erased)
    graph.lint()
    gm.recompile()
    gm.meta["rq_decode_key_range"] = rewritten
    return gm
