"""Attention over a compressed cache plus the tokens it holds exactly (`RQConfig.sink_tokens` / `residual_window`).

`kv_compress` reads such a cache through `exact_read`: the dequantized codes, except positions [0, S) taken from the
sink buffer and the W most recent positions <= max(cache_position) taken from the ring. `attention_with_exact_tokens`
computes SDPA over that same cache without materializing it: rq::attention_lse scores the packed codes with the
exact positions masked out, plain torch ops attend over the S + W exact tokens, and the two partial softmaxes are
merged by their log-sum-exp. Everything is static-shaped torch ops (no data-dependent shapes), so the function exports
(ONNX, AOTInductor) and compiles with the graph that `fuse_attention` puts it in.
"""

from __future__ import annotations

import torch

import rqcompile.ops  # noqa: F401  (registers torch.ops.rq.*)
from rqcompile.quant.rope_offset import rope_constant_term, rope_score_weights

__all__ = ["attention_with_exact_tokens", "exact_positions"]

_NEG_INF = float("-inf")


def exact_positions(
    length: int, sink: int, window: int, cache_position: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`exact_read`'s rule, per slot instead of per position.

    Returns (covered bool [length]: positions read from the sink or ring; slot_pos int64 [S + W]: the position each
    sink slot, then each ring slot, holds; slot_ok bool [S + W]: whether that slot is read, i.e. a ring slot whose
    position is negative (not yet written) or below S (the sink's, which wins in `exact_read`) is not)."""
    slot_pos, slot_ok, last = _exact_slots(sink, window, cache_position)
    positions = torch.arange(length, device=cache_position.device, dtype=torch.int64)
    covered = positions < sink
    if window:
        covered = covered | ((positions > last - window) & (positions <= last))
    return covered, slot_pos, slot_ok


def _exact_slots(
    sink: int, window: int, cache_position: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`exact_positions`' slot_pos and slot_ok, and the last position [1] (int64)."""
    last = cache_position.amax(dim=0, keepdim=True).to(torch.int64)  # [1]; amax without dim has no ONNX translation
    sink_pos = torch.arange(sink, device=cache_position.device, dtype=torch.int64)
    ring = torch.arange(window, device=cache_position.device, dtype=torch.int64)
    ring_pos = last - torch.remainder(last - ring, window) if window else ring  # as `exact_write` fills the ring
    slot_pos = torch.cat([sink_pos, ring_pos])
    slot_ok = torch.cat([sink_pos >= 0, (ring_pos >= sink) & (ring_pos >= 0)])
    return slot_pos, slot_ok, last


def _mask_columns(attn_mask: torch.Tensor | None, keep: torch.Tensor, columns: torch.Tensor | None = None):
    """A mask (bool / additive float, SDPA style) with key j dropped where `keep[j]` is False; `columns` first picks
    the mask's key columns (at positions `columns`). None -> a bool mask of `keep`."""
    if attn_mask is None:
        return keep.view(1, 1, 1, -1)
    if columns is not None:
        # unused slots may hold negative positions; Where, not clamp (an int64 Clip has no TensorRT translation)
        attn_mask = attn_mask.index_select(-1, torch.where(columns >= 0, columns, torch.zeros_like(columns)))
    if attn_mask.dtype == torch.bool:
        return attn_mask & keep
    return torch.where(keep, attn_mask, torch.tensor(_NEG_INF, dtype=attn_mask.dtype, device=attn_mask.device))


def _exact_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor, sm_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (out [B, Hq, Tq, d], lse [B, Hq, Tq]) of q over a few keys k/v [B, H, E, d] (query head h reads KV head
    h // (Hq/H)); a fully masked row gives out 0 and lse -inf, with no NaN on the way."""
    batch, q_heads, q_len, dim = q.shape
    heads = k.shape[1]
    qf = q.float().unflatten(1, (heads, q_heads // heads))  # [B, H, rep, Tq, d]
    scores = (qf @ k.float().unsqueeze(2).transpose(-1, -2)).flatten(1, 2) * sm_scale  # [B, Hq, Tq, E]
    if attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, _NEG_INF)
    else:
        scores = scores + attn_mask.float()
    top = scores.amax(dim=-1, keepdim=True)
    top = torch.where(top == _NEG_INF, torch.zeros_like(top), top)
    weights = torch.exp(scores - top)
    total = weights.sum(dim=-1, keepdim=True)
    probs = (weights / torch.where(total > 0, total, torch.ones_like(total))).unflatten(1, (heads, -1))
    out = (probs @ v.float().unsqueeze(2)).flatten(1, 2)
    return out, (torch.log(total) + top).squeeze(-1)


def _merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """Softmax over the union of two disjoint key sets from each set's (out, lse); 0 where both are fully masked."""
    top = torch.maximum(lse_a, lse_b)
    top = torch.where(top == _NEG_INF, torch.zeros_like(top), top)
    wa, wb = torch.exp(lse_a - top), torch.exp(lse_b - top)
    total = wa + wb
    total = torch.where(total > 0, total, torch.ones_like(total))
    return (out_a.float() * (wa / total).unsqueeze(-1)) + (out_b * (wb / total).unsqueeze(-1))


def attention_with_exact_tokens(
    q: torch.Tensor,
    k_codes: torch.Tensor,
    k_norms: torch.Tensor,
    v_codes: torch.Tensor,
    v_norms: torch.Tensor,
    k_rotation: torch.Tensor,
    k_mean: torch.Tensor,
    k_scale: torch.Tensor,
    k_levels: torch.Tensor,
    v_rotation: torch.Tensor,
    v_mean: torch.Tensor,
    v_scale: torch.Tensor,
    v_levels: torch.Tensor,
    k_bits: int,
    v_bits: int,
    k_sink: torch.Tensor | None,
    v_sink: torch.Tensor | None,
    k_window: torch.Tensor | None,
    v_window: torch.Tensor | None,
    cache_position: torch.Tensor,
    attn_mask: torch.Tensor | None,
    sm_scale: float,
    kv_len: torch.Tensor | None = None,
    k_perm: torch.Tensor | None = None,
    v_perm: torch.Tensor | None = None,
    k_widths: list[int] | None = None,
    v_widths: list[int] | None = None,
    k_rope_mean: torch.Tensor | None = None,
    rope_inv_freq: torch.Tensor | None = None,
    v_along_keys: bool = False,
    causal: bool = False,
    rope_table: torch.Tensor | None = None,
) -> torch.Tensor:
    """SDPA of q [B, Hq, Tq, d] over `exact_read(dequantize(codes), sink, window, cache_position)` (K and V), GQA by
    head grouping, in q's dtype. The compressed arguments are rq::attention's, plus `k_mean`: rq::attention_lse's
    scores leave out the key mean (softmax ignores it), but against exact keys it matters, so it is added to the
    compressed part's lse. `kv_len` (optional int [B]) only bounds the compressed keys read, as for rq::attention.
    `k_rope_mean` ([H, d], `offset_base`) with `rope_inv_freq` [h]: the codes hold the keys without their pre-RoPE
    offset (`RQConfig.rope_key_mean`), whose score term rq::attention_lse adds per key (`rope_ab`) and whose
    unrotated coordinates join the key mean's term (`rope_table`: rq::attention_lse's, as `passes.rope_table` gives
    it). `v_along_keys`: V's codes are packed along keys.

    `causal` (with `attn_mask` and `kv_len` None; one query token): the query sees the keys at positions <=
    cache_position, what the capture's decode mask says (`passes.decode_key_range`). The compressed keys it may read
    are then one range, [sink, position - window + 1), given to rq::attention_lse as `kv_start` and `kv_len`: no
    mask is built or read.
    """
    sink = 0 if k_sink is None else k_sink.shape[2]
    window = 0 if k_window is None else k_window.shape[2]
    kv_start = 0
    if causal:  # no [max_cache_len] mask at all: the compressed keys as a range, the exact slots up to the position
        if attn_mask is not None or kv_len is not None or q.shape[2] != 1:
            raise ValueError("causal=True takes one query token, no attn_mask and no kv_len (its position gives both)")
        slot_pos, slot_ok, last = _exact_slots(sink, window, cache_position)
        kv_len = (last - window + 1).to(torch.int32).expand(q.shape[0])  # <= 0 early on: no compressed keys yet
        kv_start = sink
        mask_c, mask_e = None, (slot_ok & (slot_pos <= last)).view(1, 1, 1, -1)
    else:
        covered, slot_pos, slot_ok = exact_positions(k_codes.shape[2], sink, window, cache_position)
        mask_c, mask_e = _mask_columns(attn_mask, ~covered), _mask_columns(attn_mask, slot_ok, slot_pos)
    rope_ab, half = None, 0
    if k_rope_mean is not None:
        half = rope_inv_freq.shape[0]
        rope_ab = rope_score_weights(q, k_rope_mean, half)
    out_c, lse_c = torch.ops.rq.attention_lse(
        q,
        k_codes,
        k_norms,
        v_codes,
        v_norms,
        k_rotation,
        k_scale,
        k_levels,
        v_rotation,
        v_mean,
        v_scale,
        v_levels,
        k_bits,
        v_bits,
        mask_c,
        sm_scale,
        kv_len,
        k_perm,
        v_perm,
        k_widths,
        v_widths,
        rope_ab,
        rope_inv_freq,
        v_along_keys,
        kv_start,
        rope_table,
    )
    rep = q.shape[1] // k_mean.shape[0]
    mean_term = (q.float() * k_mean.repeat_interleave(rep, dim=0)[:, None, :]).sum(-1)  # [B, Hq, Tq]
    if k_rope_mean is not None:
        mean_term = mean_term + rope_constant_term(q, k_rope_mean, half)
    mean_term = mean_term * sm_scale
    k_exact = torch.cat([t for t in (k_sink, k_window) if t is not None], dim=2)
    v_exact = torch.cat([t for t in (v_sink, v_window) if t is not None], dim=2)
    out_e, lse_e = _exact_attention(q, k_exact, v_exact, mask_e, sm_scale)
    return _merge(out_c, lse_c + mean_term, out_e, lse_e).to(q.dtype)
