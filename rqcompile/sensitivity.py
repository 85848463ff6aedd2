"""Which layers' keys does retrieval need? Measure it per model, then give those layers the wider keys.

Why: at long contexts the compressed cache's worst case is retrieval, a token predicted by looking a long way back
(SmolLM2 at 8K tokens: +77% ppl on text that copies its prompt with 3-bit keys, +1.5% on prose). 4-bit keys in
half the layers fix much of it, but only in the right half: on SmolLM2 layers 5-19 cut the copying windows' KL by
twice what layers 0-4 + 10-19 do at the same bytes (QUALITY.md "Session 36"), and those layers differ per model.

The probe: a passage of sample text, unrelated text, then the passage again, so that the second copy is predicted
by looking back at the first (what induction heads do). For each attention layer in turn, only that layer's keys
are quantized (everything else, its values included, stays exact) and the KL of the copy's predictions against the
exact model is that layer's score. One layer at a time keeps the scores free of the interactions that made
"upgrade one layer of an all-3-bit cache" too noisy to rank with (QUALITY.md "Session 36", retrieval_probe).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from rqcompile.cache import _LINEAR_TYPES, PROMPT, RQCache, RQCacheLayer
from rqcompile.calibrate import Calibration
from rqcompile.config import RQConfig
from rqcompile.eval.corpus import stdlib_corpus
from rqcompile.eval.metrics import _check_ids, decode_time_ppl, kl_divergence

# Stdlib token offsets of the built-in probe passages (past the first 2048 tokens, which `calibrate` reads).
PASSAGE_OFFSETS = (8192, 16384, 24576)


@dataclass(frozen=True)
class KeySensitivity:
    """Per attention layer, the mean KL (nats/token) of the copy's predictions when only that layer's keys are
    quantized at `key_bits`: how much retrieval loses through that layer's key error."""

    kl: dict[int, float]
    key_bits: float
    source: str = ""

    def ranked(self) -> list[int]:
        """Attention layers, most sensitive first (ties: lower layer first)."""
        return sorted(self.kl, key=lambda layer: (-self.kl[layer], layer))

    def raise_keys(self, config: RQConfig, layers: int, bits: int = 4) -> RQConfig:
        """`config` with `bits`-wide keys in its `layers` most sensitive layers (`layer_bits`); every other width
        (values, other layers, earlier `layer_bits` entries) as `config` has it. A chosen layer whose keys are wider
        than `bits` already is an error, not a silent narrowing."""
        if not 0 <= layers <= len(self.kl):
            raise ValueError(f"layers must be in 0..{len(self.kl)} (the attention layers probed), got {layers}")
        chosen = set(self.ranked()[:layers])
        narrowed = sorted(layer for layer in chosen if config.bits_for(layer, "k") > bits)
        if narrowed:
            raise ValueError(f"raise_keys(bits={bits}) would narrow the wider keys of layers {narrowed}")
        entries = {layer: (key_bits, value_bits) for layer, key_bits, value_bits in config.layer_bits}
        for layer in chosen:
            entries[layer] = (bits, config.bits_for(layer, "v"))
        return config.replace(layer_bits=tuple((layer, *entries[layer]) for layer in sorted(entries)))


class _ProbeCache(RQCache):
    """`RQCache` whose only compressed tensor is layer `probed`'s keys (None: none; `part="v"`: its values instead);
    every other attention layer, and the probed layer's other part, are returned exact. Records which layers are
    attention layers."""

    def __init__(self, config: RQConfig, probed: int | None, part: str = "k", **cache_kwargs: Any) -> None:
        if part not in ("k", "v"):
            raise ValueError(f"part must be 'k' or 'v', got {part!r}")
        self.probed, self.part = probed, part
        self.attention_layers: list[int] = []
        self._exact = DynamicLayer()
        super().__init__(config, **cache_kwargs)

    def _make_layer(self, layer_type: str, idx: int, sliding_window: int | None):
        if idx == self.probed or layer_type in _LINEAR_TYPES:
            return super()._make_layer(layer_type, idx, sliding_window)
        # every token kept, the model's mask applies any sliding window: what the compressed layers do too
        return DynamicLayer()

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._ensure(layer_idx, linear=False)
        layer = self.layers[layer_idx]
        if layer_idx not in self.attention_layers:
            self.attention_layers.append(layer_idx)
        if isinstance(layer, RQCacheLayer):
            keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
            exact_keys, exact_values = self._exact.update(key_states, value_states)
            return (keys, exact_values) if self.part == "k" else (exact_keys, values)
        if isinstance(layer, DynamicLayer):
            return layer.update(key_states, value_states)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)  # its clear error


def _probe_ids(tokenizer, input_ids: torch.Tensor | None, passage: int, gap: int, passages: int) -> list[torch.Tensor]:
    """[1, passage + gap + passage + 1] id sequences: passage, gap, the passage again (+1 id for the last target)."""
    if input_ids is not None:
        ids = _check_ids(input_ids, 0)  # [T] or [1, T]
        if ids.shape[1] < passage + gap:
            raise ValueError(
                f"input_ids has {ids.shape[1]} tokens; the probe needs passage + gap = {passage + gap} of them"
            )
        sources = [ids[:, : passage + gap]]
    else:
        sources = [stdlib_corpus(tokenizer, passage + gap, offset=o) for o in PASSAGE_OFFSETS[:passages]]
    return [torch.cat([s, s[:, :passage], s[:, passage : passage + 1]], dim=1) for s in sources]


def key_sensitivity(
    model,
    config: RQConfig | None = None,
    *,
    tokenizer=None,
    input_ids: torch.Tensor | None = None,
    calibration: Calibration | str | None = PROMPT,
    prompt_means: bool = False,
    passage: int = 512,
    gap: int = 1024,
    passages: int = 2,
    progress: bool | None = None,
) -> KeySensitivity:
    """Score every attention layer of `model` by how much quantizing its keys alone costs retrieval (module doc).

    The probe text: with `tokenizer`, `passages` passages of the built-in stdlib text (up to
    `len(PASSAGE_OFFSETS)`, scores averaged); with `input_ids` instead, its first `passage + gap` tokens, one probe.
    Layer `i`'s keys are quantized as `config` (default `RQConfig()`) quantizes them without its `layer_bits`
    overrides, so that every layer is scored at the same width, and without the recent window (it would keep the
    copy's nearest keys exact; where retrieval looks is what is measured). `calibration` / `prompt_means` as
    `RQCache` takes them: use what the cache will be given. Cost: one exact pass and one pass per attention layer
    over `2 * passage + gap` tokens, for each passage (SmolLM2-135M, 2-core CPU, 2 threads: 230 s in all; one
    H200: 38 s in SmolLM2's shapes, 156 s at Qwen3.5-27B's dimensions).

    `KeySensitivity.raise_keys(config, layers=n)` then gives the `n` highest-scoring layers wider keys. Measured on
    SmolLM2 at 8K tokens (QUALITY.md "Session 37"): its 15 layers against the hand-chosen 5-19 at the same bytes,
    mean KL 0.041 vs 0.045 (iso) and 0.033 vs 0.037 (planar) over six windows the probe never saw.
    """
    return _layer_scores(
        model, config, "k", tokenizer=tokenizer, input_ids=input_ids, calibration=calibration,
        prompt_means=prompt_means, passage=passage, gap=gap, passages=passages, progress=progress,
    )  # fmt: skip


def _layer_scores(
    model,
    config: RQConfig | None,
    part: str,
    *,
    tokenizer,
    input_ids: torch.Tensor | None,
    calibration: Calibration | str | None,
    prompt_means: bool,
    passage: int,
    gap: int,
    passages: int,
    progress: bool | None,
) -> KeySensitivity:
    """`key_sensitivity`'s probe for one `part` ("k", or "v": only the probed layer's values quantized, a research
    variant; QUALITY.md "Session 38" found value layers chosen this way level with the presets'). `key_bits` of the
    result is the probed part's width."""
    if (tokenizer is None) == (input_ids is None):
        raise ValueError("key_sensitivity needs exactly one of tokenizer (built-in stdlib text) or input_ids")
    if passage < 1 or gap < 0:
        raise ValueError(f"passage must be >= 1 and gap >= 0, got passage={passage}, gap={gap}")
    if not 1 <= passages <= len(PASSAGE_OFFSETS):
        raise ValueError(f"passages must be in 1..{len(PASSAGE_OFFSETS)}, got {passages}")
    from tqdm.auto import tqdm

    config = (config or RQConfig()).replace(layer_bits=(), residual_window=0)
    probes = _probe_ids(tokenizer, input_ids, passage, gap, passages)
    prefill = passage + gap
    cache_kwargs = {"model_config": model.config, "calibration": calibration, "prompt_means": prompt_means}

    def run(ids: torch.Tensor, probed: int | None) -> tuple[Any, _ProbeCache]:
        cache = _ProbeCache(config, probed, part, **cache_kwargs)
        result = decode_time_ppl(model, ids, lambda: cache, prefill, passage, progress=False, chunk=passage)
        return result, cache

    totals: dict[int, float] = {}
    with torch.no_grad():
        for n, ids in enumerate(probes):
            reference, seen = run(ids, None)
            if not seen.attention_layers:
                raise ValueError(
                    "key_sensitivity saw no attention layer: the model does not write its K/V through the cache"
                )
            bar = tqdm(seen.attention_layers, desc=f"{part} sensitivity {n + 1}/{len(probes)}", unit="layer",
                       disable=None if progress is None else not progress, leave=False)  # fmt: skip
            for layer in bar:
                probed, _ = run(ids, layer)
                kl = kl_divergence(reference, probed).mean().item()
                totals[layer] = totals.get(layer, 0.0) + kl / len(probes)
    source = "input_ids" if input_ids is not None else f"stdlib, {len(probes)} x ({passage}, gap {gap}, copy)"
    return KeySensitivity(kl=totals, key_bits=config.k_bits if part == "k" else config.v_bits, source=source)
