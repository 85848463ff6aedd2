"""Calibration: per-channel key mean and scales measured on sample text, folded into the format's mean/scale.

Why: real keys have a few channels far larger than the rest (and a per-channel offset). A 2-4 dimensional block
rotation cannot spread that energy the way a dense Hadamard does, so the Gaussian codebook clips the big channels.
Subtracting the per-channel key mean is exact for attention (it shifts all of a query's scores equally) and dividing
by the per-channel RMS equalizes the channels before the block rotation; both are undone by dequantization, and in
the rotated-space attention they fold into q (the scale) or vanish (the key mean).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from rqcompile.quant.rope_offset import RopeSpec, rope_offset, rope_spec, static_rope_spec, unrotate

_KINDS = ("k", "v")
_FIELDS = ("mean", "scale", "weight", "rope_mean")


@dataclass
class Calibration:
    """Per-layer, per-KV-head channel statistics: `stats[(layer, "k"|"v", "mean"|"scale"|"weight")] -> [H, d]`
    float32. `weight` is each channel's error weight, what calibrated bit allocation (`RQConfig.bit_allocation`)
    distributes bits by; `(layer, "k", "rope_mean")` the keys' pre-RoPE mean, what `RQConfig.rope_key_mean` removes,
    and `rope` the model's RoPE it was measured with, so that a drop-in cache can use it without `model_config`."""

    stats: dict[tuple[int, str, str], torch.Tensor] = field(default_factory=dict)
    source: str = ""
    rope: RopeSpec | None = None

    def get(self, layer_idx: int, kind: str, name: str) -> torch.Tensor | None:
        return self.stats.get((layer_idx, kind, name))

    @property
    def has_rope_mean(self) -> bool:
        """Whether it holds pre-RoPE key means: its key statistics are then those of the keys without that offset,
        and a cache using it removes the offset (`RQConfig.rope_key_mean`)."""
        return any(name == "rope_mean" for _, _, name in self.stats)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {
            f"calibration.{layer}.{kind}.{name}": t.contiguous() for (layer, kind, name), t in self.stats.items()
        }
        if self.rope is not None:
            tensors["rope.inv_freq"] = self.rope.inv_freq.contiguous()
            tensors["rope.scaling"] = torch.tensor([self.rope.scaling], dtype=torch.float64)
        return tensors

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], source: str = "") -> Calibration:
        stats = {}
        tensors = dict(tensors)
        inv_freq, scaling = tensors.pop("rope.inv_freq", None), tensors.pop("rope.scaling", None)
        if (inv_freq is None) != (scaling is None):
            raise ValueError("calibration tensors hold one of rope.inv_freq / rope.scaling without the other")
        for key, tensor in tensors.items():
            parts = key.split(".")
            if len(parts) != 4 or parts[0] != "calibration" or parts[2] not in _KINDS or parts[3] not in _FIELDS:
                raise ValueError(f"unexpected calibration tensor {key!r}")
            stats[(int(parts[1]), parts[2], parts[3])] = tensor.float()
        rope = None if inv_freq is None else RopeSpec(inv_freq.float(), float(scaling.reshape(-1)[0]))
        return cls(stats, source, rope)

    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _, _ in self.stats})


_ATTN_NAME = "rqcompile_calibration_capture"


@contextlib.contextmanager
def _capturing(model, sink: dict[int, list], modules: dict[int, torch.nn.Module], skip_first: int):
    """Temporarily route the model's attention through a function that records post-RoPE K and V, and the sum and
    count of the queries' squares per channel (not the queries: there are Hq/H times more of them), per layer."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def capture(module, query, key, value, attention_mask, **kwargs):
        q = query.detach()[:, :, skip_first:].float()
        q2 = (q.pow(2).sum(dim=(0, 2)), q.shape[0] * q.shape[2])  # ([Hq, d], tokens)
        sink.setdefault(module.layer_idx, []).append((key.detach().float(), value.detach().float(), q2))
        modules[module.layer_idx] = module
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(_ATTN_NAME, capture)
    previous = model.config._attn_implementation
    model.set_attn_implementation(_ATTN_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


# `RQCache(calibration=PROMPT)`, the drop-in caches' default: each layer measures its key mean and K/V scales on the
# first tokens it is given (the prompt), skipping the sink token, as `calibrate` does on sample text (QUALITY.md
# "Defaults (session 4)").
PROMPT = "prompt"
# Fewer prompt tokens than this after the sink token (a padded batch: in its longest row): the cache stays
# uncalibrated for the whole sequence (an explicit calibration="prompt" warns; the default is silent). 8, not 16:
# on SmolLM2 (iso 3-bit + sink, 256 decode steps, three license windows; QUALITY.md "Left padding", files
# benchmarks/results/padding_short*.json) 8 measured tokens already cut KL by 1.6-2.6x against no calibration (0.36 /
# 0.33 / 0.50 vs 0.70 / 0.84 / 0.81) and 12 by 1.7-2.9x, while 4 gained nothing (0.65 / 0.75 / 1.05 vs 0.70 / 0.83 /
# 0.82: one window worse). Pinned in tests/test_cache.py.
MIN_PROMPT_TOKENS = 8
# A prompt whose K/V give some channel a scale below this (the stored per-channel scale, normalized to average 1
# per head) measured nothing usable for that layer, which then stays uncalibrated. On SmolLM2 (iso 3-bit, 256 decode
# steps; QUALITY.md "Degenerate prompts") a prompt of one token repeated 16 times gave scales down to 0.0003 and
# decode-time ppl 429,042 for an fp 42 (uncalibrated: 65); with this guard at 0.05 some layers still calibrated
# (ppl 219), at 0.08 none did (65). 80 real prompts of 9-64 tokens (license and stdlib text) never went below 0.097
# and their results are unchanged; 2048 stdlib tokens stay above 0.22.
MIN_PROMPT_SCALE = 0.08
# `calibrate(key_scale=QUERY_SCALES)`: key scales from the keys' and the queries' energies (`query_key_scales`).
QUERY_SCALES = "query"
DEFAULT_CALIBRATION_TOKENS = 2048  # stdlib tokens; 4096 measured no better (QUALITY.md, "Tried ... and dropped")


def calibrate(
    model,
    input_ids: torch.Tensor | None = None,
    *,
    tokenizer=None,
    num_tokens: int = DEFAULT_CALIBRATION_TOKENS,
    key_mean: bool = True,
    key_scale: bool | str = QUERY_SCALES,
    value_mean: bool = False,
    value_scale: bool = False,
    error_weights: bool = True,
    scale_power: float = 0.8,
    skip_first: int = 1,
    chunk: int = 512,
    source: str = "",
    rope_key_mean: bool | None = None,
) -> Calibration:
    """Measure channel statistics of every attention layer's K (and V) on `input_ids` ([B, T] or [T]), or, with
    `tokenizer` instead, on the first `num_tokens` tokens of the built-in calibration text (Python standard-library
    sources, which every Python install has; the quality measurements in QUALITY.md use it and evaluate on other text).

    `key_scale=True` / `value_scale=True`: per-channel RMS (after removing the mean) raised to `scale_power` (1
    equalizes the channels fully; less keeps some of their spread), normalized to average 1 per head; only their
    ratios matter since every norm group is renormalized. That is the calibration of the one-block-layer presets
    (`rotation_stages=1`; `RQConfig.calibrates_scales` says which a config wants); RMS scales hurt rotations that mix
    the whole norm group (QUALITY.md "Staged rotations in the format", "Session 11"). What those want instead is the
    default, `key_scale="query"`: key scales from the keys' and the queries' energies (`query_key_scales`), which
    make a score's error smallest once the group is mixed (QUALITY.md "Session 15": with the pre-RoPE offset, mean KL
    -10% to -31% at 1K tokens, -26% at 8K for iso 3-bit); `key_scale=False` measures the key mean only.
    `value_mean` also measures V's channel mean, which every decoder adds back (the format carries a mean for K and
    V; QUALITY.md "Tried in session 8": KL -9% / -22% on two windows with the default rotation, ppl mixed). The
    first `skip_first` tokens of each chunk are left out of the statistics: they are the attention sink, atypical,
    and kept uncompressed by `RQConfig.sink_tokens`. `error_weights` also measures each channel's error weight
    (variance times importance, `_importance`), normalized to mean 1 per head, which `RQConfig.bit_allocation` needs.
    `rope_key_mean` also measures each layer's pre-RoPE key mean (`rope_mean`, the keys turned back to the pre-RoPE
    frame with the model's RoPE; each chunk starts at position 0), which `RQConfig.rope_key_mean` removes; the key
    statistics are then measured on what that cache quantizes, the keys without their positional offset, and the
    Calibration carries the RoPE. None (default): measured when the model has a RoPE the offset supports (a static
    one, `rope_offset.rope_spec`), the best measured configuration (QUALITY.md "Session 14"); True insists (an error
    otherwise); False gives the statistics of the format without the offset.
    """
    if scale_power <= 0:
        raise ValueError(f"scale_power must be > 0, got {scale_power}")
    if key_scale not in (True, False, QUERY_SCALES):
        raise ValueError(f"key_scale must be True, False or {QUERY_SCALES!r}, got {key_scale!r}")
    if (input_ids is None) == (tokenizer is None):
        raise ValueError("calibrate needs exactly one of input_ids (token ids) or tokenizer (built-in stdlib text)")
    if rope_key_mean is None:
        rope = static_rope_spec(model.config)
    else:
        rope = rope_spec(model.config) if rope_key_mean else None  # before the forwards: a clear error if no RoPE
    if tokenizer is not None:
        from rqcompile.eval.corpus import stdlib_corpus

        input_ids = stdlib_corpus(tokenizer, num_tokens)
        source = source or f"stdlib {num_tokens} tokens"
    ids = input_ids.reshape(1, -1) if input_ids.dim() == 1 else input_ids
    sink: dict[int, list] = {}
    modules: dict[int, torch.nn.Module] = {}
    with torch.no_grad(), _capturing(model, sink, modules, skip_first):
        for start in range(0, ids.shape[1], chunk):  # independent windows: bounded memory, no cache needed
            model(ids[:, start : start + chunk].to(model.device), use_cache=False)
    if not sink:
        raise ValueError(
            "calibration saw no attention layer: the model does not route attention through transformers'"
            " attention interface"
        )
    stats: dict[tuple[int, str, str], torch.Tensor] = {}
    if rope is not None:
        for layer_idx, pieces in sink.items():
            stats[(layer_idx, "k", "rope_mean")], sink[layer_idx] = _without_rope_mean(pieces, rope, skip_first)
    turning = _turning_pairs(model.config, rope) if key_scale == QUERY_SCALES else None
    for layer_idx, pieces in sink.items():
        for kind, want_mean, want_scale in (("k", key_mean, key_scale), ("v", value_mean, value_scale)):
            x = torch.cat([p[0 if kind == "k" else 1][:, :, skip_first:] for p in pieces], dim=2)  # [B, H, T, d]
            by_query = kind == "k" and want_scale == QUERY_SCALES
            found = channel_stats(x, mean=want_mean, scale=bool(want_scale) and not by_query, scale_power=scale_power)
            if by_query:
                queries = _importance("k", pieces, modules[layer_idx], x.shape[1])
                found["scale"] = query_key_scales(x, queries, centred=want_mean, turning=turning)
                want_scale = False  # the spread guard below is for RMS scales; these are tamed by the fourth root
            if want_scale and too_little_spread(found["scale"], scale_power):
                raise ValueError(
                    f"the calibration text gives layer {layer_idx}'s {kind.upper()} channels with almost no spread "
                    "(a repetitive text?); scales measured on it would blow up the quantization error of real "
                    "text: calibrate on varied text, e.g. rqcompile.calibrate(model, tokenizer=tok) (built-in text)"
                )
            stats.update({(layer_idx, kind, name): t for name, t in found.items()})
            if error_weights:
                flat = x.transpose(0, 1).flatten(1, 2)  # [H, B*T, d]
                centred = flat - flat.mean(1)[:, None] if want_mean else flat  # what is quantized
                variance = centred.pow(2).mean(1)
                importance = _importance(kind, pieces, modules[layer_idx], flat.shape[0]).to(variance.device)
                weight = variance * importance
                stats[(layer_idx, kind, "weight")] = weight / weight.mean(-1, keepdim=True).clamp_min(1e-30)
    return Calibration(stats, source, rope)


def query_key_scales(
    keys: torch.Tensor, queries: torch.Tensor, *, centred: bool, turning: torch.Tensor | None = None
) -> torch.Tensor:
    """K scales [H, d] `(E[k_c^2] / E[q_c^2])^(1/4)`, mean 1 per head (`calibrate(key_scale="query")`).

    Why: once a rotation mixes the norm group, the quantization error spreads evenly over the group's coordinates, so
    channel c's key error is set by its scale and moves a score by the query's channel c; the score error's variance,
    `(sum_c E[q_c^2] s_c^2) (sum_c E[k_c^2] / s_c^2)`, is smallest for this `s` (Cauchy-Schwarz). Post-RoPE
    statistics of a pair (c, c + h) that RoPE turns within the context depend on the positions they were measured at
    (QUALITY.md "Tried in session 12"); its energy does not, so for the pairs `turning` marks ([h] bool, over the
    first 2h coordinates) both energies are averaged over the pair; the rest keep their own. `keys` [B, H, T, d] as
    quantized (centred: their mean removed), `queries` [H, d] the mean square of the queries reading each KV head."""
    flat = keys.float().transpose(0, 1).flatten(1, 2)  # [H, N, d]
    energy = (flat - flat.mean(1)[:, None] if centred else flat).pow(2).mean(1)
    queries = queries.float().to(energy.device).clone()
    if turning is not None and turning.any():
        half = turning.numel()
        idx = torch.nonzero(turning.to(energy.device)).flatten()
        for x in (energy, queries):
            pair = 0.5 * (x[:, idx] + x[:, idx + half])
            x[:, idx], x[:, idx + half] = pair, pair
    ratio = energy.clamp_min(1e-12) / queries.clamp_min(1e-12)
    ratio = ratio / ratio.mean(-1, keepdim=True)
    s = ratio.clamp(1e-6, 1e6).pow(0.25)
    return s / s.mean(-1, keepdim=True)


def _turning_pairs(model_config, rope: RopeSpec | None) -> torch.Tensor | None:
    """[h] bool: the RoPE pairs that turn by more than one radian within the model's context
    (`max_position_embeddings`; every pair when unknown), whose per-channel statistics do not hold at every position.
    None without RoPE."""
    spec = rope if rope is not None else static_rope_spec(model_config)
    if spec is None:
        return None
    text = model_config.get_text_config(decoder=True) if hasattr(model_config, "get_text_config") else model_config
    context = getattr(text, "max_position_embeddings", None)
    if not context:
        return torch.ones(spec.inv_freq.numel(), dtype=torch.bool)
    return spec.inv_freq.float() * float(context) > 1.0


def _without_rope_mean(pieces: list, spec: RopeSpec, skip_first: int) -> tuple[torch.Tensor, list]:
    """A layer's pre-RoPE key mean [H, d] from its captured chunks (keys at positions 0..T-1), and the chunks with
    that mean, turned to each key's position, taken off their keys."""

    def positions(keys: torch.Tensor) -> torch.Tensor:
        return torch.arange(keys.shape[-2], device=keys.device)[None]

    pre = torch.cat([unrotate(p[0], positions(p[0]), spec)[:, :, skip_first:] for p in pieces], dim=2)
    mean = channel_stats(pre, mean=True, scale=False)["mean"]
    return mean, [(p[0] - rope_offset(mean, positions(p[0]), spec), *p[1:]) for p in pieces]


def too_little_spread(scale: torch.Tensor, scale_power: float = 0.8) -> bool:
    """Whether scales measured by `channel_stats` have a channel below MIN_PROMPT_SCALE: text (a prompt, calibration
    text) too repetitive to calibrate on. The bound is set for the default power 0.8; at another power the same
    channel spread gives MIN_PROMPT_SCALE ** (power / 0.8)."""
    return float(scale.min()) < MIN_PROMPT_SCALE ** (scale_power / 0.8)


def channel_stats(
    x: torch.Tensor,
    *,
    mean: bool,
    scale: bool,
    scale_power: float = 0.8,
    tokens: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-KV-head channel statistics of K or V samples x [B, H, T, d]: {"mean": [H, d]} (with `mean`) and
    {"scale": [H, d]}: the per-channel RMS after removing the mean (when measured) raised to `scale_power`,
    normalized to average 1 per head (with `scale`). What `calibrate` stores, and what a cache calibrated on its
    prompt (`PROMPT`) measures from the prompt's own K/V. `tokens` ([B, T] bool): only these samples count (a
    padded batch's real tokens); default all."""
    if tokens is None:
        flat = x.float().transpose(0, 1).flatten(1, 2)  # [H, B*T, d]
    else:
        if tokens.shape != x.shape[:1] + x.shape[2:3]:
            raise ValueError(f"tokens must be [B, T] = {tuple(x.shape[:1] + x.shape[2:3])}, got {tuple(tokens.shape)}")
        if not tokens.any():
            raise ValueError("channel_stats: no token selected")
        flat = x.float().transpose(0, 1)[:, tokens.to(device=x.device, dtype=torch.bool)]  # [H, N, d]
    found: dict[str, torch.Tensor] = {}
    average = flat.mean(1)
    if mean:
        found["mean"] = average
    if scale:
        centred = flat - average[:, None] if mean else flat
        rms = centred.pow(2).mean(1).sqrt().clamp_min(1e-6).pow(scale_power)
        found["scale"] = rms / rms.mean(-1, keepdim=True)
    return found


def _importance(kind: str, pieces: list, module: torch.nn.Module, kv_heads: int) -> torch.Tensor:
    """How much a unit error in each channel of a KV head costs, [H, d]. Keys: `E[q_j^2]` over the query heads
    that read the KV head (a key error `e` moves a score by `q . e`). Values: `||W_o[:, j]||^2` over those query
    heads' output-projection columns (ones when the module has no `o_proj`)."""
    if kind == "k":
        q2 = sum(p[2][0] for p in pieces) / max(sum(p[2][1] for p in pieces), 1)  # E[q^2], [Hq, d]
        return q2.unflatten(0, (kv_heads, -1)).mean(1)
    d = pieces[0][1].shape[-1]
    o_proj = getattr(module, "o_proj", None)
    if o_proj is None or not hasattr(o_proj, "weight"):
        return torch.ones(kv_heads, d)
    cols = o_proj.weight.detach().float().pow(2).sum(0)  # [Hq * d]
    return cols.view(-1, d).unflatten(0, (kv_heads, -1)).mean(1)


__all__ = ["Calibration", "calibrate"]
