"""Chunked decode-time scoring of caches that keep their most recent tokens exact (`RQConfig.residual_window`).

Fed one token at a time, an `RQCache` with a window of W shows the query at position p the exact K/V of its sink
tokens and of positions p-W+1 .. p, and the dequantized K/V of everything else. Fed a chunk of tokens, the real
cache returns one view for the whole chunk (the window at the chunk's end), so a chunked evaluation of a windowed
cache used to be wrong, and the one-token-at-a-time evaluation costs a forward per token: minutes at 1K tokens, an
hour at 8K. Here the cache returns *both* views of every token (dequantized, then exact: `[..., 2N, d]`) and an
attention function gives each query exactly the view one-at-a-time feeding would have given it. The prompt's
forward gets the real cache's single view (the window at the prompt's end exact), as the real cache gives it.

A token's codes do not depend on when it leaves the window (quantization is per token), so the scores equal
one-token-at-a-time feeding up to float rounding (`tests/test_models_and_eval.py` checks it on SmolLM2).
Evaluation only: batch 1, full-attention models.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from rqcompile.cache import RQCache

_ATTN_NAME = "rqcompile_window_view"


class BothViewsCache(RQCache):
    """`cache`'s configuration without its window, returning each token's dequantized and exact K/V side by side."""

    def __init__(self, cache: RQCache) -> None:
        self.window = cache.rq_config.residual_window
        self.sinks = cache.rq_config.sink_tokens
        super().__init__(
            cache.rq_config.replace(residual_window=0),
            calibration=cache._layer_calibration,
            prompt_means=cache.prompt_means,
            model_config=cache._model_config,
        )
        self.exact: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.prompt_call: dict[int, bool] = {}  # per layer: was the last update the sequence's first?

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if key_states.shape[0] != 1:
            raise ValueError(f"the window view scores one sequence at a time, got a batch of {key_states.shape[0]}")
        first = layer_idx not in self.exact
        dequantized = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        old = self.exact.get(layer_idx)
        exact = (
            (key_states, value_states)
            if old is None
            else tuple(torch.cat([o, n], dim=-2) for o, n in zip(old, (key_states, value_states), strict=True))
        )
        self.exact[layer_idx] = exact
        self.prompt_call[layer_idx] = first
        if first:  # the real cache's one view: the window at the prompt's end exact (sink tokens already are)
            start = max(key_states.shape[-2] - self.window, 0)
            return tuple(
                torch.cat([d[..., :start, :], e[..., start:, :]], dim=-2)
                for d, e in zip(dequantized, exact, strict=True)
            )
        return tuple(torch.cat([d, e], dim=-2) for d, e in zip(dequantized, exact, strict=True))

    def views_mask(self, queries: int, keys: int, device: torch.device) -> torch.Tensor:
        """[queries, 2 * keys] bool, for a forward after the prompt's: which dequantized (first half) and exact
        (second half) keys each query reads, the window ending at the query itself."""
        p = torch.arange(keys - queries, keys, device=device)[:, None]
        j = torch.arange(keys, device=device)[None, :]
        causal = j <= p
        exact = (j < self.sinks) | (j > p - self.window)
        return torch.cat([causal & ~exact, causal & exact], dim=-1)


@contextlib.contextmanager
def window_view(model, cache: RQCache) -> Iterator[BothViewsCache]:
    """Route `model`'s attention so that a chunk fed through the returned cache scores as if fed token by token."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    text_config = model.config.get_text_config(decoder=True)
    kinds = set(getattr(text_config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"} or getattr(text_config, "sliding_window", None):
        raise ValueError(f"the window view handles full-attention models only, this one has {sorted(kinds)}")
    views = BothViewsCache(cache)

    def attend(module, query, key, value, attention_mask, **kwargs):
        if views.prompt_call[module.layer_idx]:  # one view, the model's own causal mask
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        mask = views.views_mask(query.shape[-2], key.shape[-2] // 2, query.device)
        return sdpa_attention_forward(module, query, key, value, mask[None, None], **kwargs)

    AttentionInterface.register(_ATTN_NAME, attend)
    previous = model.config._attn_implementation
    model.set_attn_implementation(_ATTN_NAME)
    try:
        yield views
    finally:
        model.set_attn_implementation(previous)
