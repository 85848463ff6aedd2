"""Fuse `rq::dequantize(K), rq::dequantize(V) -> [repeat_kv] -> SDPA` into one `rq::attention`.

After `compress_kv_cache` every attention site reads its cache as a dequantized float tensor of the whole
max_cache_len, repeated over the query heads for GQA. `rq::attention` instead scores the rotated query directly against
the packed codes and norms (and does GQA by head grouping), so the dequantized cache is never materialized:

    k = rq.dequantize(k_codes, k_norms, k_rot, k_mean, k_scale, k_levels, k_bits, d, dtype)   # same for v
    out = aten.scaled_dot_product_attention(q, repeat_kv(k), repeat_kv(v), mask, scale=s)
 ->
    out = rq.attention(q, k_codes, k_norms, v_codes, v_norms, k_rot, k_scale, k_levels,
                       v_rot, v_mean, v_scale, v_levels, k_bits, v_bits, mask, s)

A calibrated bit allocation's dequantize nodes carry two more arguments (`perm`, `widths`); the fused call then ends
with `kv_len, k_perm, v_perm, k_widths, v_widths` (None for a uniform side). When both sides are uniform the call is
exactly the one above. The key mean is dropped: it adds the same amount to all of a query's scores, which softmax
ignores. The fused op
also gets `kv_len = 1 + the last key any query of the row may see` (computed once per mask from the static-cache
mask), so a kernel reads the keys written so far instead of all of max_cache_len.
Only plain SDPA calls are fused (no dropout, no is_causal, no enable_gqa); anything else is left as it was and
reported in `gm.meta["rq_fuse_attention_skipped"]`.

A cache that holds tokens in the model dtype (`RQConfig.sink_tokens` / `residual_window`) reaches SDPA through
`exact_read(dequantize(...), sink, window, cache_position)`. Such a site becomes one call of
`rqcompile.passes.exact_attention.attention_with_exact_tokens` (a Python function of torch ops and rq::attention_lse,
traced into the graph on re-export, like `exact_read`):

    out = attention_with_exact_tokens(q, k_codes, k_norms, v_codes, v_norms, k_rot, k_mean, k_scale, k_levels,
                                      v_rot, v_mean, v_scale, v_levels, k_bits, v_bits, k_sink, v_sink,
                                      k_window, v_window, cache_position, mask, s, kv_len[, k_perm, ..., v_widths])

It reads packed codes for the compressed positions and the sink / ring buffers for the exact ones (the key mean is
kept here: against exact keys it is not a constant shift). `gm.meta["rq_fuse_attention_exact"]` counts these sites.

Keys read through `add_slot_offset` (`RQConfig.rope_key_mean`) keep their positional offset as a score term: the fused
call gets `rope_ab = rope_score_weights(q, rope_mean, h)` and `inv_freq` as rq::attention's last two arguments
(`attention_with_exact_tokens` gets `rope_mean, inv_freq` and does the same inside).
"""

from __future__ import annotations

import math

import torch
from torch import fx

import rqcompile.ops  # noqa: F401  (registers torch.ops.rq.*)
from rqcompile.passes.exact_attention import attention_with_exact_tokens
from rqcompile.passes.kv_compress import SDPA, VIEW_OPS, add_slot_offset, exact_read
from rqcompile.quant.rope_offset import rope_score_weights

__all__ = ["fuse_attention"]

aten = torch.ops.aten
DEQUANTIZE = torch.ops.rq.dequantize.default
ATTENTION = torch.ops.rq.attention.default


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _through_views(node: fx.Node) -> fx.Node:
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in VIEW_OPS:
        node = node.args[0]
    return node


def _is(node, target) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


def _chain_to_dequantize(node: fx.Node) -> tuple[fx.Node | None, list[fx.Node], fx.Node | None, fx.Node | None]:
    """Follow SDPA's K/V input back through view ops (and one `exact_read`, one `add_slot_offset`); the dequantize
    node (or None), the nodes passed (users before producers), the `exact_read` node (None when the cache holds no
    exact tokens) and the `add_slot_offset` node (None without `RQConfig.rope_key_mean`)."""
    views = []
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in VIEW_OPS:
        views.append(node)
        node = node.args[0]
    exact = offset = None
    if _is(node, exact_read):
        exact, node = node, node.args[0]
    if _is(node, add_slot_offset):
        offset, node = node, node.args[0]
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target == DEQUANTIZE:
        return node, views + [n for n in (exact, offset) if n is not None], exact, offset
    return None, views, exact, offset


def _dequantize_args(node: fx.Node) -> tuple:
    """rq::dequantize's twelve arguments (codes, norms, rotation, mean, scale, levels, bits, head_dim, dtype, perm,
    widths, along_keys), the optional ones filled with their defaults."""
    optional = (("perm", None), ("widths", None), ("along_keys", False))
    args = tuple(node.args)
    return args + tuple(node.kwargs.get(n, default) for n, default in optional[len(args) - 9 :])


def valid_kv_length(mask: torch.Tensor, batch: int) -> torch.Tensor:
    """int32 [batch]: 1 + the last key position that `mask` (bool True = attend, or additive float) lets any query
    of each batch row see; keys past it can be skipped without changing the result."""
    tk = mask.shape[-1]
    allowed = mask if mask.dtype == torch.bool else mask > float("-inf")
    allowed = allowed.reshape((1,) * (4 - allowed.dim()) + tuple(allowed.shape))  # SDPA broadcasting to 4-D
    positions = torch.arange(1, tk + 1, device=mask.device, dtype=torch.int32)
    last = torch.where(allowed, positions, 0).flatten(1).amax(-1)  # [B or 1]
    return last.expand(batch).to(torch.int32)


def fuse_attention(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite (in place) every SDPA whose K and V are (repeated) `rq::dequantize` outputs into `rq::attention`, or,
    through `exact_read`, into `attention_with_exact_tokens`.

    Returns `gm`; `gm.meta["rq_fuse_attention"]` counts the fused sites, `["rq_fuse_attention_exact"]` those of them
    with exact tokens.
    """
    graph = gm.graph
    fused, exact, skipped = 0, 0, []
    kv_lens: dict[fx.Node, fx.Node] = {}  # one valid-length computation per mask node
    for node in list(graph.nodes):
        if not (node.op == "call_function" and node.target == SDPA):
            continue
        q = _arg(node, 0, "query")
        k_deq, k_views, k_exact, k_offset = _chain_to_dequantize(_arg(node, 1, "key"))
        v_deq, v_views, v_exact, v_offset = _chain_to_dequantize(_arg(node, 2, "value"))
        if k_deq is None or v_deq is None:
            continue
        if v_offset is not None:
            skipped.append(f"{node.name}: the values carry a positional offset (only keys can)")
            continue
        if (k_exact is None) != (v_exact is None) or (k_exact is not None and k_exact.args[3] is not v_exact.args[3]):
            skipped.append(f"{node.name}: only one of K/V holds exact tokens (or they disagree on cache_position)")
            continue
        mask = _arg(node, 3, "attn_mask")
        dropout = _arg(node, 4, "dropout_p", 0.0)
        is_causal = _arg(node, 5, "is_causal", False)
        scale = node.kwargs.get("scale", node.args[6] if len(node.args) > 6 else None)
        gqa = node.kwargs.get("enable_gqa", node.args[7] if len(node.args) > 7 else False)
        if dropout or is_causal or gqa:
            skipped.append(f"{node.name}: dropout_p={dropout} is_causal={is_causal} enable_gqa={gqa}")
            continue
        kc, kn, k_rot, k_mean, k_scale, k_levels, k_bits, head_dim, _, k_perm, k_widths, k_along = _dequantize_args(
            k_deq
        )
        vc, vn, v_rot, v_mean, v_scale, v_levels, v_bits, _, _, v_perm, v_widths, v_along = _dequantize_args(v_deq)
        if k_along:
            skipped.append(f"{node.name}: K's codes are packed along keys (rq::attention reads only V's so)")
            continue
        along = {"v_along_keys": True} if v_along else {}  # absent by default: graphs without it stay as they were
        layout = (k_perm, v_perm, k_widths, v_widths)
        sm_scale = float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)
        kv_len = None
        if isinstance(mask, fx.Node) and "val" in q.meta:
            if mask not in kv_lens:
                with graph.inserting_after(mask):
                    kv_lens[mask] = graph.call_function(valid_kv_length, (mask, q.meta["val"].shape[0]))
            kv_len = kv_lens[mask]
        with graph.inserting_before(node):
            # rq::attention's fake kernel gives its output q's strides while the kernel returns a contiguous tensor;
            # a contiguous q makes the two agree (else torch.compile fails its stride asserts on a transposed q).
            q = graph.call_function(aten.clone.default, (q,), {"memory_format": torch.contiguous_format})
            tail = layout if any(x is not None for x in layout) else ()
            rope = () if k_offset is None else tuple(k_offset.args[1:3])  # (offset base [H, d], inv_freq [h])
            if rope:
                tail = layout
            if k_exact is None:
                args = (q, kc, kn, vc, vn, k_rot, k_scale, k_levels, v_rot, v_mean, v_scale, v_levels, k_bits, v_bits)
                if rope:  # the offset's score term, q . RoPE_j(m), from q and m once per call
                    half = rope[1].meta["val"].numel()
                    weights = graph.call_function(rope_score_weights, (q, rope[0], half))
                    tail += (weights, rope[1])
                attn = graph.call_function(ATTENTION, args + (mask, sm_scale, kv_len) + tail, along)
            else:
                _, k_sink, k_window, cache_position = k_exact.args
                _, v_sink, v_window, _ = v_exact.args
                args = (q, kc, kn, vc, vn, k_rot, k_mean, k_scale, k_levels, v_rot, v_mean, v_scale, v_levels)
                args += (k_bits, v_bits, k_sink, v_sink, k_window, v_window, cache_position, mask, sm_scale, kv_len)
                attn = graph.call_function(attention_with_exact_tokens, args + tail + rope, along)
                exact += 1
        attn.meta.update({k: v for k, v in node.meta.items() if k in ("val", "tensor_meta", "stack_trace")})
        node.replace_all_uses_with(attn)
        graph.erase_node(node)
        for dead in [*k_views, *v_views, k_deq, v_deq]:  # views (and exact_read) first: users before producers
            if dead in graph.nodes and not dead.users:
                graph.erase_node(dead)
        fused += 1
    graph.lint()
    gm.recompile()
    gm.meta["rq_fuse_attention"] = fused
    gm.meta["rq_fuse_attention_exact"] = exact
    gm.meta["rq_fuse_attention_skipped"] = skipped
    return gm
