"""Drop-in transformers caches that keep K/V compressed: `model.generate(..., past_key_values=IsoQuantCache(bits=3))`.

Each full-attention (or sliding-window) layer stores only packed codes and fp16 norms (plus an optional window of the
most recent tokens uncompressed). On every forward the layer returns the dequantized history for the model's own
attention; that copy is transient (one layer at a time), never kept. Linear-attention layers of hybrid models
(Qwen3.5's gated delta net) keep transformers' own conv/recurrent state untouched.

Quantization is per token, so a token's dequantized value never depends on which other tokens are cached: crop,
reorder and batch operations on the compressed store give the same results as on a cache of dequantized values.

Calibration: by default each attention layer measures its key mean (and, for one layer of blocks, K/V scales) on its
first K/V, the prompt (`calibration="prompt"`); `calibration=None` is uncalibrated, a `rqcompile.Calibration` is used
as given, or with `prompt_means=True` with its key means measured on each prompt (`RQCache` says more).

Left-padded batches (batched `generate`): the exact sink token of each row is its first real token and
`calibration="prompt"` measures only real tokens. The cache learns the padding from the position ids the model passes
to `Cache.update` (transformers 5.24 does; `generate` numbers a left-padded row's pads 0 and its tokens from 0), or
from `RQCache.set_attention_mask` (needed on transformers 5.17, or when calling the model without position ids).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, LinearAttentionLayer

from rqcompile.calibrate import MIN_PROMPT_TOKENS, PROMPT, Calibration, channel_stats, too_little_spread
from rqcompile.config import RQConfig
from rqcompile.ops import dequantize_state, quantize_state
from rqcompile.quant.quantizer import QuantState, make_state
from rqcompile.quant.rope_offset import RopeSpec, check_same_rope, rope_offset, rope_spec, static_rope_spec, unrotate

_LINEAR_TYPES = ("linear_attention", "conv", "mamba")


def _storage_bytes(*tensors: torch.Tensor | None) -> int:
    """Bytes actually allocated behind these tensors (each storage counted once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


class _PromptByDefault:
    """The caches' `calibration` default: calibrate on the prompt exactly as an explicit `"prompt"`, except that a
    prompt too short to measure (< MIN_PROMPT_TOKENS after the sink token) stays uncalibrated silently: short chat
    prompts are common, and the user did not ask for the calibration. An explicit `"prompt"` warns then."""

    def __repr__(self) -> str:
        return "'prompt' (default)"

    def __reduce__(self) -> str:  # copy, deepcopy and pickle keep the one instance (identity is what counts)
        return "_PROMPT_BY_DEFAULT"


_PROMPT_BY_DEFAULT = _PromptByDefault()


def _check_calibration(calibration: Any) -> None:
    if calibration is _PROMPT_BY_DEFAULT:
        return
    if calibration is not None and calibration != PROMPT and not isinstance(calibration, Calibration):
        raise ValueError(
            f"calibration={calibration!r}: pass a rqcompile.Calibration (rqcompile.calibrate(model, ...)), "
            f"{PROMPT!r} (measure it on each sequence's prompt) or None"
        )


def _check_prompt_means(prompt_means: bool, calibration: Any) -> None:
    if prompt_means and not isinstance(calibration, Calibration):
        raise ValueError(
            "prompt_means=True measures a Calibration's key means afresh on each prompt and keeps the rest of it: "
            "pass calibration=rqcompile.calibrate(model, tokenizer=tokenizer) with it "
            f"(got calibration={calibration!r}; calibration='prompt' measures all of its statistics on the prompt)"
        )


def _resolve_rope(config: RQConfig, model_config: Any, calibration: Any) -> tuple[RQConfig, RopeSpec | None]:
    """`config` with `rope_key_mean` decided, and the RoPE the offset turns with (None when off).

    Auto (None) follows what is known: a Calibration turns it on when it holds pre-RoPE means (its key statistics
    are those of the offset-free keys), a prompt calibration when `model_config` gives a RoPE the offset supports.
    The RoPE comes from `model_config`, else from the Calibration that was measured with it."""
    calibrated = isinstance(calibration, Calibration)
    has_mean = calibrated and calibration.has_rope_mean
    want = config.rope_key_mean
    if want is None:
        if calibrated:
            want = has_mean
        elif calibration is None:
            want = False  # nothing measured: no offset to remove
        else:  # the prompt
            want = model_config is not None and static_rope_spec(model_config) is not None
    if not want:
        if has_mean:
            raise ValueError(
                "this Calibration was measured for RQConfig(rope_key_mean=True) (its key statistics are those of the "
                "keys without their pre-RoPE mean): use it with rope_key_mean=None or True, or calibrate with "
                "rope_key_mean=False"
            )
        return config.replace(rope_key_mean=False), None
    if calibrated and not has_mean:
        raise ValueError(
            "RQConfig(rope_key_mean=True), but this Calibration has no pre-RoPE key mean: calibrate with "
            "rope_key_mean=True (or None, the default), or use calibration='prompt'"
        )
    measured = calibration.rope if calibrated else None
    if model_config is not None:
        spec = rope_spec(model_config)
        if measured is not None:
            check_same_rope(measured, spec)
    elif measured is not None:
        spec = measured
    else:
        raise ValueError(
            "RQConfig(rope_key_mean=True) needs the model's RoPE: pass model_config=model.config to the cache"
        )
    return config.replace(rope_key_mean=True), spec


def _cat(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    return new if old is None else torch.cat([old, new], dim=-2)


def _tokens_from_positions(position_ids: Any, batch: int, length: int) -> torch.Tensor | None:
    """Which of a sequence's first `length` positions hold real tokens, [batch, length] bool, read from the position
    ids the model was given for them ([batch or 1, length]). Rows of consecutive positions are unpadded; a row
    numbered as `generate` numbers a left-padded one (`attention_mask.cumsum(-1) - 1`, pads at 0: 0 0 0 1 2 ...) has
    its leading pads marked. None when the position ids are missing or of another form (right padding, packing)."""
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2 or position_ids.shape[-1] != length:
        return None
    if position_ids.shape[0] not in (1, batch) or position_ids.is_floating_point():
        return None
    p = position_ids.long()
    if length == 1 or bool((p[:, 1:] - p[:, :-1] == 1).all()):
        return torch.ones(batch, length, dtype=torch.bool, device=p.device)
    ramp = torch.arange(length, device=p.device)
    pads = length - 1 - p[:, -1:]  # [rows, 1]: pads before the tokens 0 .. p[-1]
    real = ramp >= pads
    if not bool(((pads >= 0) & (pads < length)).all()) or not torch.equal(p, torch.where(real, ramp - pads, 0)):
        return None
    return real.expand(batch, length)


def _first_tokens(tokens: torch.Tensor, count: int) -> torch.Tensor:
    """Positions [B, count] of each row's first `count` real tokens (`tokens` [B, T] bool)."""
    length = tokens.shape[-1]
    ramp = torch.arange(length, device=tokens.device)
    return torch.where(tokens, ramp, ramp + length).sort(dim=-1).values[:, :count]


def _prompt_sample(key_states: torch.Tensor, tokens: torch.Tensor | None) -> tuple[int, torch.Tensor | None]:
    """What a prompt calibration measures: (tokens in the longest row, the [B, T] mask of them or None for all after
    the first). Each row's first real token, the attention sink, is left out."""
    if tokens is None:
        return key_states.shape[-2] - 1, None
    measured = tokens.clone()
    measured.scatter_(1, _first_tokens(tokens, 1), False)
    return int(measured.sum(-1).max()), measured


class RQCacheLayer(CacheLayerMixin):
    """One attention layer's compressed K/V store. `calibration` and `prompt_means` as `RQCache`'s, but None
    (uncalibrated) by default: `RQCache` passes each layer its own."""

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(
        self,
        config: RQConfig,
        layer_idx: int,
        calibration: Calibration | str | None = None,
        rope: RopeSpec | None = None,
        prompt_means: bool = False,
        **kw: Any,
    ) -> None:
        super().__init__()
        _check_calibration(calibration)
        _check_prompt_means(prompt_means, calibration)
        if config.rope_key_mean and rope is None:
            raise ValueError(
                "RQConfig(rope_key_mean=True) needs the model's RoPE: build the cache with model_config=model.config"
            )
        if config.value_layout == "keys":
            raise ValueError(
                "RQConfig(value_layout='keys') is read and written by rqcompile.apply's programs; the eager caches "
                "store V per token (value_layout='coordinates' or None): they dequantize the whole history for the "
                "model's attention, which gains nothing from the other layout"
            )
        self.config = config
        self.rope = rope if config.rope_key_mean else None
        self.k_rope_mean: torch.Tensor | None = None
        # prompt_means: the layer calibrates on the prompt, and `base` gives all the rest (and all of it for a prompt
        # too short to measure)
        self.base: Calibration | None = calibration if prompt_means else None
        self.calibration = PROMPT if calibration is _PROMPT_BY_DEFAULT or prompt_means else calibration
        # a prompt too short to calibrate on warns only when calibration="prompt" was asked for explicitly
        self.warn_short_prompt = calibration is not _PROMPT_BY_DEFAULT and not prompt_means  # and a degenerate one
        self.layer_idx = layer_idx
        self.k_state: QuantState | None = None
        self.v_state: QuantState | None = None
        self._clear()

    def _clear(self) -> None:
        if self.calibration == PROMPT:  # the next sequence calibrates on its own prompt
            self.k_state = self.v_state = self.k_rope_mean = None
        self.k_codes = self.k_norms = self.v_codes = self.v_norms = None
        self.k_window = self.v_window = None
        self.k_sink = self.v_sink = None
        # a padded batch: each row's first sink_tokens real tokens, exact, and their positions [B, S] (the stores
        # above then hold every position from 0, pads included: the model's mask hides the pads)
        self.k_row_sink = self.v_row_sink = self.row_sink_index = None
        self.row_start = None  # rope_key_mean in a padded batch: each row's first real token (its position 0)
        self.is_initialized = False

    # -- transformers layer API ---------------------------------------------------------------------------------
    def lazy_initialization(
        self, key_states: torch.Tensor, value_states: torch.Tensor, tokens: torch.Tensor | None = None
    ) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        _, heads, _, head_dim = key_states.shape
        if self.base is not None and self.layer_idx not in self.base.layers:
            raise ValueError(
                f"layer {self.layer_idx}: the Calibration given with prompt_means=True has no statistics for this "
                f"layer (it has layers {self.base.layers}): was it measured on another model?"
            )
        if self.rope is not None:
            if tokens is not None:
                self.row_start = _first_tokens(tokens, 1)[:, 0].clone()
            if self.k_rope_mean is None or self.k_rope_mean.shape != (heads, head_dim):
                self.k_rope_mean = self._rope_mean(key_states, tokens)
            # the post-RoPE statistics below are those of what is quantized: the keys without their offset
            key_states = key_states - self._offset(0, key_states.shape[-2]).to(key_states.dtype)
        if self.k_state is None or self.k_state.num_heads != heads or self.k_state.head_dim != head_dim:
            stats = self._stats(key_states, value_states, tokens)
            make = lambda kind: make_state(  # noqa: E731
                self.config,
                layer_idx=self.layer_idx,
                kind=kind,
                num_heads=heads,
                head_dim=head_dim,
                mean=stats(kind, "mean"),
                scale=stats(kind, "scale"),
                weight=stats(kind, "weight"),
            ).to(self.device)
            self.k_state, self.v_state = make("k"), make("v")
        self.is_initialized = True

    def _positions(self, start: int, length: int) -> torch.Tensor:
        """Positions [B or 1, length] of cache slots start..start+length: a padded row's count from its first real
        token (the position ids transformers gives a left-padded row)."""
        slots = torch.arange(start, start + length, device=self.device)[None]
        return slots if self.row_start is None else slots - self.row_start[:, None]

    def _offset(self, start: int, length: int) -> torch.Tensor:
        """RoPE_p(m) [B or 1, H, length, d] float32 for cache slots start..start+length (`RQConfig.rope_key_mean`)."""
        return rope_offset(self.k_rope_mean, self._positions(start, length), self.rope)

    def _rope_mean(self, key_states: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
        """The pre-RoPE key mean [H, d]: from the Calibration, or (PROMPT) the prompt's keys turned back to the
        pre-RoPE frame, its sink token left out; zeros (no offset) when uncalibrated or the prompt is too short."""
        heads, head_dim = key_states.shape[1], key_states.shape[-1]
        zeros = torch.zeros(heads, head_dim, device=self.device)
        calib = self.calibration
        if calib is None:
            return zeros
        if calib != PROMPT:
            mean = calib.get(self.layer_idx, "k", "rope_mean")
            if mean is None:
                raise ValueError(
                    f"layer {self.layer_idx}: RQConfig(rope_key_mean=True), but this Calibration has no pre-RoPE key "
                    "mean ('rope_mean'); use calibration='prompt' (the drop-in caches' default)"
                )
            return mean.float().to(self.device)
        count, measured = _prompt_sample(key_states, tokens)
        if count < MIN_PROMPT_TOKENS:  # _stats warns about the short prompt
            return zeros if self.base is None else self._base_rope_mean()
        pre = unrotate(key_states.detach(), self._positions(0, key_states.shape[-2]), self.rope)
        if measured is None:
            return channel_stats(pre[:, :, 1:], mean=True, scale=False)["mean"]
        return channel_stats(pre, mean=True, scale=False, tokens=measured)["mean"]

    def _stats(self, key_states: torch.Tensor, value_states: torch.Tensor, tokens: torch.Tensor | None = None):
        """(kind, name) -> this layer's calibration tensor or None: from the Calibration, or with PROMPT measured on
        these first K/V (the prompt) as `calibrate` measures sample text: key mean, K/V scales where the rotation
        keeps coordinates apart (`RQConfig.calibrates_scales`), sink token left out.
        `tokens` ([B, T] bool, a padded batch): only these positions are measured, each row's first one left out."""
        calib = self.calibration
        if calib is None:
            return lambda kind, name: None
        if calib != PROMPT:
            return self._calibration_stats(calib)
        found = self._prompt_stats(key_states, value_states, tokens)
        if self.base is None:
            return (lambda kind, name: None) if found is None else (lambda kind, name: found[kind].get(name))
        if found is None:  # a prompt too short (or too repetitive) to measure: the Calibration as it is
            if self.rope is not None:  # its pre-RoPE mean too (no key is stored before this returns)
                self.k_rope_mean = self._base_rope_mean()
            return self._calibration_stats(self.base)
        base = self._calibration_stats(self.base)
        return lambda kind, name: found["k"]["mean"] if (kind, name) == ("k", "mean") else base(kind, name)

    def _base_rope_mean(self) -> torch.Tensor:
        mean = self.base.get(self.layer_idx, "k", "rope_mean")
        if mean is None:
            raise ValueError(f"layer {self.layer_idx}: the Calibration has pre-RoPE key means, but not for this layer")
        return mean.float().to(self.device)

    def _calibration_stats(self, calib: Calibration):
        if self.rope is None and calib.get(self.layer_idx, "k", "rope_mean") is not None:
            raise ValueError(
                f"layer {self.layer_idx}: this Calibration was measured for RQConfig(rope_key_mean=True) (its key "
                "statistics are those of the keys without their pre-RoPE mean); use it with rope_key_mean=True"
            )
        return lambda kind, name: calib.get(self.layer_idx, kind, name)

    def _prompt_stats(self, key_states: torch.Tensor, value_states: torch.Tensor, tokens: torch.Tensor | None):
        """kind -> {name: tensor} measured on the prompt, or None for a prompt too short or repetitive to measure."""
        key_states, value_states = key_states.detach(), value_states.detach()  # statistics, not part of a graph
        count, measured = _prompt_sample(key_states, tokens)
        if count < MIN_PROMPT_TOKENS:
            if self.warn_short_prompt:  # the same text from every layer: Python's default filter shows it once
                warnings.warn(
                    f"rqcompile: calibration='prompt', but the prompt has {count} tokens after the sink token "
                    f"(< {MIN_PROMPT_TOKENS}): the cache stays uncalibrated for this sequence (until reset())",
                    UserWarning,
                    stacklevel=5,
                )
            return None
        if measured is None:
            found = {
                kind: channel_stats(x[:, :, 1:], mean=kind == "k", scale=True)
                for kind, x in (("k", key_states), ("v", value_states))
            }
        else:
            found = {
                kind: channel_stats(x, mean=kind == "k", scale=True, tokens=measured)
                for kind, x in (("k", key_states), ("v", value_states))
            }
        if any(too_little_spread(stats["scale"]) for stats in found.values()):  # e.g. one token repeated
            if self.warn_short_prompt:
                warnings.warn(  # one text for all layers: Python's default filter shows it once
                    "rqcompile: calibration='prompt', but the prompt's K/V have channels with almost no spread (a "
                    "repetitive prompt?): layers where that is so stay uncalibrated for this sequence (until reset())",
                    UserWarning,
                    stacklevel=5,
                )
            return None
        if not self.config.calibrates_scales:  # mixed norm groups: the key mean only (the guard above still applies)
            found = {kind: {k: v for k, v in stats.items() if k != "scale"} for kind, stats in found.items()}
        return found

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        *args: Any,
        tokens: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new K/V [B, H, T, d] and return the layer's whole history. `tokens` ([B, T] bool, the first K/V of a
        sequence only): which positions are real tokens in a padded batch. Then each row's first `sink_tokens` real
        tokens are its exact sink and only real tokens enter a prompt calibration; the pads are stored like any
        token (the model's attention mask hides them)."""
        if self.config.check_finite:  # before a prompt calibration could measure them
            for name, tensor in (("key", key_states), ("value", value_states)):
                if not torch.isfinite(tensor).all():
                    raise ValueError(
                        f"layer {self.layer_idx}: {name} states contain NaN/inf; refusing to write them to the cache"
                    )
        tokens = self._check_tokens(tokens, key_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states, tokens)
        if tokens is not None:
            self._keep_row_sinks(key_states, value_states, tokens)
        sink_room = self.config.sink_tokens - (0 if self.k_sink is None else self.k_sink.shape[-2])
        if sink_room > 0 and self.row_sink_index is None and self.get_seq_length() == self._sink_length():
            # clone: a slice would keep the whole prefill's K/V storage alive
            self.k_sink = _cat(self.k_sink, key_states[:, :, :sink_room].clone())
            self.v_sink = _cat(self.v_sink, value_states[:, :, :sink_room].clone())
            key_states, value_states = key_states[:, :, sink_room:], value_states[:, :, sink_room:]
            if key_states.shape[-2] == 0:
                return self._materialize()
        window = self.config.residual_window
        if window == 0:
            self._append_compressed(key_states, value_states)
        else:
            self.k_window = _cat(self.k_window, key_states)
            self.v_window = _cat(self.v_window, value_states)
            overflow = self.k_window.shape[-2] - window
            if overflow > 0:
                self._append_compressed(self.k_window[:, :, :overflow], self.v_window[:, :, :overflow])
                self.k_window = self.k_window[:, :, overflow:].clone()
                self.v_window = self.v_window[:, :, overflow:].clone()
        return self._materialize()

    def _check_tokens(self, tokens: torch.Tensor | None, key_states: torch.Tensor) -> torch.Tensor | None:
        """`tokens` validated; None when there is no padding (the unpadded layout: sink tokens first)."""
        if tokens is None:
            return None
        batch, length = key_states.shape[0], key_states.shape[-2]
        if self.get_seq_length() > 0:
            raise ValueError(
                f"layer {self.layer_idx}: which tokens are padding can only be given with a sequence's first K/V "
                f"(this layer already holds {self.get_seq_length()} tokens)"
            )
        if tokens.shape != (batch, length) or tokens.dtype != torch.bool:
            raise ValueError(
                f"layer {self.layer_idx}: tokens must be a bool mask [batch, tokens] = [{batch}, {length}], "
                f"got {tokens.dtype} {tuple(tokens.shape)}"
            )
        tokens = tokens.to(key_states.device)
        if bool(tokens.all()):
            return None
        sink = self.config.sink_tokens
        fewest = int(tokens.sum(-1).min())
        if fewest < max(sink, 1):
            raise ValueError(
                f"layer {self.layer_idx}: a row of this padded batch has {fewest} real tokens in its first forward; "
                f"each row needs at least {max(sink, 1)} (sink_tokens={sink}) there"
            )
        return tokens

    def _keep_row_sinks(self, keys: torch.Tensor, values: torch.Tensor, tokens: torch.Tensor) -> None:
        """A padded batch's first K/V: each row's first `sink_tokens` real tokens, kept exact beside the stores."""
        index = _first_tokens(tokens, self.config.sink_tokens)  # [B, S]
        if index.shape[-1] == 0:
            return
        gather = index[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[-1])
        self.k_row_sink, self.v_row_sink = keys.gather(2, gather), values.gather(2, gather)
        self.row_sink_index = index

    def _append_compressed(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        if self.rope is not None:  # quantize what is left of the keys after their positional offset
            start = self._sink_length() + (0 if self.k_codes is None else self.k_codes.shape[-2])
            keys = keys.float() - self._offset(start, keys.shape[-2])
        k_codes, k_norms = quantize_state(keys, self.k_state)
        v_codes, v_norms = quantize_state(values, self.v_state)
        self.k_codes, self.k_norms = _cat(self.k_codes, k_codes), _cat(self.k_norms, k_norms)
        self.v_codes, self.v_norms = _cat(self.v_codes, v_codes), _cat(self.v_norms, v_norms)

    def _materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized history (+ window) for the model's attention; a transient copy, never stored."""
        keys, values = [], []
        if self.k_sink is not None:
            keys.append(self.k_sink)
            values.append(self.v_sink)
        if self.k_codes is not None and self.k_codes.shape[-2] > 0:
            if self.rope is None:
                keys.append(dequantize_state(self.k_codes, self.k_norms, self.k_state, self.dtype))
            else:  # the positional offset added back, exactly
                k = dequantize_state(self.k_codes, self.k_norms, self.k_state, torch.float32)
                k = k + self._offset(self._sink_length(), k.shape[-2])
                keys.append(k.to(self.dtype))
            values.append(dequantize_state(self.v_codes, self.v_norms, self.v_state, self.dtype))
        if self.k_window is not None:
            keys.append(self.k_window)
            values.append(self.v_window)
        keys, values = torch.cat(keys, dim=-2), torch.cat(values, dim=-2)
        if self.row_sink_index is not None:  # each padded row's exact sink over its dequantized copy
            index = self.row_sink_index[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[-1])
            keys.scatter_(2, index, self.k_row_sink)
            values.scatter_(2, index, self.v_row_sink)
        return keys, values

    def _sink_length(self) -> int:
        return 0 if self.k_sink is None else self.k_sink.shape[-2]

    def get_seq_length(self) -> int:
        compressed = 0 if self.k_codes is None else self.k_codes.shape[-2]
        recent = 0 if self.k_window is None else self.k_window.shape[-2]
        return self._sink_length() + compressed + recent

    def get_mask_sizes(self, query_length: int, *args: Any) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # transformers < 5.16 name
        return -1

    def reset(self) -> None:
        self._clear()

    _BATCHED = (
        "k_codes",
        "k_norms",
        "v_codes",
        "v_norms",
        "k_window",
        "v_window",
        "k_sink",
        "v_sink",
        "k_row_sink",
        "v_row_sink",
        "row_sink_index",
        "row_start",
    )

    def _map(self, fn) -> None:
        for name in self._BATCHED:
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, fn(tensor))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        """Drop tokens from the end. Negative: how many to remove; positive (transformers < 5.18): length to keep."""
        length = self.get_seq_length()
        keep = length + tokens_to_remove if tokens_to_remove <= 0 else min(tokens_to_remove, length)
        keep = max(keep, 0)
        if self.row_sink_index is not None:
            if keep == 0:
                self.k_row_sink = self.v_row_sink = self.row_sink_index = None
            elif keep <= int(self.row_sink_index.max()):
                raise ValueError(
                    f"layer {self.layer_idx}: cannot crop this padded batch to {keep} tokens: a row's sink token is at "
                    f"position {int(self.row_sink_index.max())} (crop to 0 or past the sink tokens)"
                )
        sink = self._sink_length()
        compressed = 0 if self.k_codes is None else self.k_codes.shape[-2]
        if self.k_window is not None:
            self.k_window = self.k_window[:, :, : max(keep - sink - compressed, 0)].clone()
            self.v_window = self.v_window[:, :, : max(keep - sink - compressed, 0)].clone()
        if self.k_codes is not None and keep - sink < compressed:
            for name in ("k_codes", "k_norms", "v_codes", "v_norms"):
                setattr(self, name, getattr(self, name)[:, :, : max(keep - sink, 0)].clone())
        if self.k_sink is not None and keep < sink:
            self.k_sink, self.v_sink = self.k_sink[:, :, :keep].clone(), self.v_sink[:, :, :keep].clone()

    def offload(self) -> None:
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        self._map(lambda t: t.to(self.device, non_blocking=True))

    # -- memory accounting --------------------------------------------------------------------------------------
    def memory(self) -> dict[str, int]:
        """Bytes allocated for this layer, and what a bf16 cache of the same tokens would take."""
        compressed = _storage_bytes(self.k_codes, self.k_norms, self.v_codes, self.v_norms)
        window = _storage_bytes(
            self.k_window,
            self.v_window,
            self.k_sink,
            self.v_sink,
            self.k_row_sink,
            self.v_row_sink,
            self.row_sink_index,
            self.row_start,
        )
        tokens = self.get_seq_length()
        if self.k_state is None or tokens == 0:
            return {"tokens": tokens, "compressed_bytes": compressed, "window_bytes": window, "bf16_bytes": 0}
        batch = next(t for t in (self.k_codes, self.k_window, self.k_sink) if t is not None).shape[0]
        bf16 = 2 * 2 * batch * self.k_state.num_heads * tokens * self.k_state.head_dim
        return {"tokens": tokens, "compressed_bytes": compressed, "window_bytes": window, "bf16_bytes": bf16}


class RQSlidingCacheLayer(RQCacheLayer):
    """A sliding-window layer. It keeps every token (compressed) and lets the model's mask apply the window.

    Results are exact with respect to the window; memory is not bounded by the window (yet).
    """

    is_sliding = True

    def __init__(
        self,
        config: RQConfig,
        layer_idx: int,
        calibration: Calibration | str | None = None,
        sliding_window: int | None = None,
        rope: RopeSpec | None = None,
        prompt_means: bool = False,
        **kw: Any,
    ) -> None:
        super().__init__(config, layer_idx, calibration, rope, prompt_means)
        self.sliding_window = sliding_window


@dataclass(frozen=True)
class MemoryReport:
    """Bytes held by a cache, measured from the tensors it allocated."""

    layers: dict[int, dict[str, int]]

    @property
    def compressed_bytes(self) -> int:
        """Everything the compressed cache allocates: codes and norms, exact tokens, and (compiled CUDA programs)
        each layer's share of the rope table."""
        parts = ("compressed_bytes", "window_bytes", "rope_table_bytes")
        return sum(m.get(part, 0) for m in self.layers.values() for part in parts)

    @property
    def bf16_bytes(self) -> int:
        return sum(m["bf16_bytes"] for m in self.layers.values())

    @property
    def ratio(self) -> float:
        return self.bf16_bytes / self.compressed_bytes if self.compressed_bytes else float("nan")

    def versus_bf16(self) -> str:
        """The ratio in words: a short context, held mostly as exact sink and window tokens plus fixed metadata,
        can take more bytes than bf16, and "0.78x smaller" would hide that."""
        if self.ratio >= 1:
            return f"{self.ratio:.2f}x smaller than bf16"
        return f"{1 / self.ratio:.2f}x larger than bf16"

    def __str__(self) -> str:
        return (
            f"{len(self.layers)} compressed layers: {self.compressed_bytes:,} bytes held vs {self.bf16_bytes:,} "
            f"for bf16 ({self.versus_bf16()})"
        )


class RQCache(Cache):
    """A transformers `Cache` whose attention layers are compressed as `config` says.

    Pass the model config (`RQCache(cfg, model_config=model.config)`) to lay out hybrid and sliding-window layers up
    front, and to let the default prompt calibration remove the keys' pre-RoPE mean (`RQConfig.rope_key_mean`, on by
    default wherever the RoPE is known: QUALITY.md "Session 15"); without it, layers are created as the model first
    touches them (linear-attention layers when the model asks for conv/recurrent state, compressed attention layers
    on `update`), and a prompt-calibrated cache keeps the post-RoPE key mean only. `rq_config` is the config with
    `rope_key_mean` resolved.

    `calibration`:

    - `"prompt"`, the default: each attention layer measures its key mean (what `rqcompile.calibrate` measures on sample
      text; plus K/V scales for one layer of blocks, `RQConfig.calibrates_scales`: once the rotation mixes the norm
      group, scales hurt) on the first K/V it is given (the prompt's forward), its first token (the attention sink) left
      out, and keeps them for the whole sequence: decode steps, and later turns fed to the same cache, do not change
      them. Measured on SmolLM2 (the default config, two windows of the 1K harness, QUALITY.md "Session 11"): KL 0.0288
      / 0.0189 against 0.0605 / 0.0669 uncalibrated and 0.0276 / 0.0258 with the stdlib key mean; at 8K tokens (three
      windows) 0.246 against 0.422 with the prompt's scales too (the session-10 behaviour). A prompt with fewer than
      `MIN_PROMPT_TOKENS` (8) tokens after its first (a padded batch: in its longest row) is not measured: the cache
      stays uncalibrated for the whole sequence, silently by default, with a warning when `calibration="prompt"` is
      passed explicitly; likewise each layer whose prompt K/V have a channel with almost no spread (a repetitive prompt;
      `MIN_PROMPT_SCALE`). The rows of a batch share one measurement, pooled over all their real tokens, so a row's
      output in a batch is not exactly what it is alone. `reset()` forgets the measurement: the next prompt is measured
      afresh.
    - a `rqcompile.Calibration` (`rqcompile.calibrate(model, tokenizer=tok)`): used for every sequence; by default
      it also holds the pre-RoPE key means with their RoPE, and key scales from the queries, which a prompt
      calibration cannot measure (at 8K tokens the better of the two for iso: QUALITY.md "Session 15").
    - a Calibration with `prompt_means=True`: each sequence's key means (post- and pre-RoPE) are measured on its
      prompt as `"prompt"` measures them, everything else (key scales from the queries, error weights, any value
      statistics) comes from the Calibration, and a prompt too short or repetitive to measure uses the Calibration as
      it is. The best calibration measured at 8K tokens for all three block backends (mean KL of three windows,
      prompt / Calibration -> this: iso 0.1616 / 0.1331 -> 0.1025, planar 0.1047 / 0.1147 -> 0.1028, rotor 0.1362 /
      0.1382 -> 0.1087) and at 1K without the window; at 1K with the window better than the Calibration alone, mixed
      against the prompt alone (QUALITY.md "Session 16"). Eager caches only: `apply`'s programs carry their
      Calibration as constants.
    - None: uncalibrated (lower quality for the block backends: about 2x the KL above).

    The compiled path differs: `rqcompile.apply` refuses `"prompt"` (its programs carry the calibration as
    constants) and runs uncalibrated, with a warning, unless given `calibration=rqcompile.calibrate(...)`. To compare
    an eager cache with `apply`'s programs, give both the same `Calibration`, or `calibration=None` here.

    Left-padded batches: each row's exact sink token (`sink_tokens`) is its first real token and a prompt
    calibration measures real tokens only. The cache reads the padding from the position ids the model passes to
    `update` (transformers 5.24 passes them; `generate` derives them from the attention mask); on transformers that
    do not pass them (5.17), or when calling the model without position ids, call `set_attention_mask` before the
    prompt. A batch whose padding cannot be known gets a warning.
    """

    def __init__(
        self,
        config: RQConfig | None = None,
        *,
        model_config: Any = None,
        calibration: Calibration | str | None = _PROMPT_BY_DEFAULT,
        prompt_means: bool = False,
        **overrides: Any,
    ) -> None:
        config = (config or RQConfig()).replace(**overrides) if overrides else (config or RQConfig())
        _check_calibration(calibration)
        _check_prompt_means(prompt_means, calibration)
        self.calibration = PROMPT if calibration is _PROMPT_BY_DEFAULT else calibration
        self.prompt_means = prompt_means
        config, self._rope = _resolve_rope(config, model_config, self.calibration)
        self.rq_config = config
        self._layer_calibration = calibration  # what each layer is given: the default stays silent on short prompts
        self._attention_mask: torch.Tensor | None = None
        self._tokens_memo: tuple[Any, torch.Tensor | None] = (None, None)
        self._warned_unknown_padding = False
        self._model_config = model_config
        layers: list = []
        if model_config is not None:
            text_config = model_config.get_text_config(decoder=True)
            window = getattr(text_config, "sliding_window", None)
            layer_types = getattr(text_config, "layer_types", None) or (
                ["sliding_attention" if window else "full_attention"] * text_config.num_hidden_layers
            )
            layers = [self._make_layer(kind, idx, window) for idx, kind in enumerate(layer_types)]
        super().__init__(layers=layers)

    def _make_layer(self, layer_type: str, idx: int, sliding_window: int | None):
        if layer_type == "full_attention":
            return RQCacheLayer(self.rq_config, idx, self._layer_calibration, self._rope, self.prompt_means)
        if layer_type in ("sliding_attention", "chunked_attention"):
            return RQSlidingCacheLayer(
                self.rq_config,
                idx,
                self._layer_calibration,
                sliding_window=sliding_window,
                rope=self._rope,
                prompt_means=self.prompt_means,
            )
        if layer_type in _LINEAR_TYPES:
            return LinearAttentionLayer()
        raise ValueError(
            f"layer {idx} has type {layer_type!r}, which rqcompile caches do not support "
            f"(supported: full/sliding attention, linear attention)"
        )

    def _ensure(self, layer_idx: int, linear: bool) -> None:
        """Grow the lazily built layer list: the model touches layers in order during the first forward."""
        while len(self.layers) <= layer_idx:
            idx = len(self.layers)
            if idx == layer_idx and linear:
                self.layers.append(LinearAttentionLayer())
            else:
                self.layers.append(self._make_layer("full_attention", idx, None))

    # -- padding ----------------------------------------------------------------------------------------------
    def set_attention_mask(self, attention_mask: torch.Tensor | None) -> None:
        """Say which positions of the next prompt are padding: its 2D attention mask [B, T] (1 = token, 0 = pad), as
        the tokenizer returns it with `padding=True`. Call it before the prompt's forward / `generate`; `reset()`
        forgets it. Needed only where the model does not pass position ids to the cache (transformers 5.17) or when
        calling the model without them; it overrides what position ids say. `generate` with `num_beams` /
        `num_return_sequences` repeats each row, and so does the mask here. None: forget a mask set before."""
        if any(layer.get_seq_length() > 0 for layer in self.layers if isinstance(layer, RQCacheLayer)):
            raise ValueError(
                "set_attention_mask describes the prompt: call it before the first forward (or after reset())"
            )
        if attention_mask is None:
            self._attention_mask = None
            return
        mask = torch.as_tensor(attention_mask)
        if mask.dim() != 2:
            raise ValueError(f"attention_mask must be 2D [batch, tokens], got shape {tuple(mask.shape)}")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
        self._attention_mask = mask.bool()

    def _prompt_tokens(self, key_states: torch.Tensor, kwargs: dict) -> torch.Tensor | None:
        """For a sequence's first K/V: which positions are real tokens ([B, T] bool, None: all of them or unknown)."""
        batch, length = key_states.shape[0], key_states.shape[-2]
        if self._attention_mask is not None:
            mask = self._attention_mask
            if mask.shape[-1] != length or batch % mask.shape[0]:
                raise ValueError(
                    f"the attention mask given to set_attention_mask is {tuple(mask.shape)}, but the prompt's first "
                    f"forward is [batch {batch}, {length} tokens]: pass the mask of exactly the tokens of that forward"
                )
            return mask.repeat_interleave(batch // mask.shape[0], dim=0).to(key_states.device)
        inner = kwargs.get("kwargs")
        positions = (inner if isinstance(inner, dict) else kwargs).get("position_ids")
        if positions is not None and positions is self._tokens_memo[0]:  # every layer of one forward
            tokens = self._tokens_memo[1]
        else:
            tokens = _tokens_from_positions(positions, batch, length)
            self._tokens_memo = (positions, tokens)
        measures_prompt = self.calibration == PROMPT or self.prompt_means
        if tokens is None and batch > 1 and (self.rq_config.sink_tokens > 0 or measures_prompt):
            self._warn_unknown_padding(batch, positions is None)
        return tokens

    def _warn_unknown_padding(self, batch: int, missing: bool) -> None:
        if self._warned_unknown_padding:
            return
        self._warned_unknown_padding = True
        why = (
            "the model does not pass position ids to the cache (transformers 5.17 does not; 5.24 does)"
            if missing
            else "the position ids the model passes are not those of a left-padded batch"
        )
        warnings.warn(
            f"rqcompile: a batch of {batch} sequences, and the cache cannot tell which positions are padding: {why}. "
            "If the batch is padded, call cache.set_attention_mask(attention_mask) before the prompt; otherwise a "
            "padded row's exact sink token is a pad, and calibration='prompt' measures the pads",
            UserWarning,
            stacklevel=4,
        )

    def reset(self) -> None:
        super().reset()
        self._attention_mask = None
        self._tokens_memo = (None, None)
        self._warned_unknown_padding = False

    # -- attention layers ------------------------------------------------------------------------------------
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._ensure(layer_idx, linear=False)
        layer = self.layers[layer_idx]
        if not isinstance(layer, RQCacheLayer):
            raise ValueError(f"layer {layer_idx} is a {type(layer).__name__}, not an attention layer")
        if layer.get_seq_length() == 0:  # a sequence's first K/V: which positions are padding?
            kwargs = {**kwargs, "tokens": self._prompt_tokens(key_states, kwargs)}
        return layer.update(key_states, value_states, *args, **kwargs)

    # -- linear-attention layers (hybrid models): created on first touch ---------------------------------------
    def update_conv_state(self, conv_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._ensure(layer_idx, linear=True)
        return super().update_conv_state(conv_states, layer_idx, *args, **kwargs)

    def update_recurrent_state(
        self, recurrent_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        self._ensure(layer_idx, linear=True)
        return super().update_recurrent_state(recurrent_states, layer_idx, *args, **kwargs)

    def get_conv_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
        if layer_idx >= len(self.layers):
            return None
        return super().get_conv_state(layer_idx, state_idx)

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
        if layer_idx >= len(self.layers):
            return None
        return super().get_recurrent_state(layer_idx, state_idx)

    # -- reporting -------------------------------------------------------------------------------------------
    @property
    def is_compileable(self) -> bool:
        return False

    def memory_report(self) -> MemoryReport:
        """Bytes actually allocated by the compressed layers, against bf16 for the same tokens."""
        return MemoryReport(
            {i: layer.memory() for i, layer in enumerate(self.layers) if isinstance(layer, RQCacheLayer)}
        )

    def __repr__(self) -> str:
        kinds = {type(layer).__name__ for layer in self.layers}
        return f"{type(self).__name__}({self.rq_config}, layers={len(self.layers)} {sorted(kinds)})"


class _BackendCache(RQCache):
    """An RQCache whose config is `RQConfig(backend=<the class's>, bits=bits, **options)`."""

    backend: ClassVar[str]

    def __init__(
        self,
        bits: int = 3,
        *,
        model_config: Any = None,
        calibration: Calibration | str | None = _PROMPT_BY_DEFAULT,
        prompt_means: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(
            RQConfig(backend=self.backend, bits=bits, **options),
            model_config=model_config,
            calibration=calibration,
            prompt_means=prompt_means,
        )


class PlanarQuantCache(_BackendCache):
    """Compressed cache with 2D Givens rotations (the fastest encoder with `rotation_stages=1`; by default its
    layers mix each norm group like the other backends'). `calibration` and `prompt_means` as `RQCache`'s: by default
    measured on the prompt."""

    backend = "planar"


class IsoQuantCache(_BackendCache):
    """Compressed cache with 4D quaternion rotations (`q_L v conj(q_R)`); the default backend. `calibration` and
    `prompt_means` as `RQCache`'s: by default measured on the prompt."""

    backend = "iso"


class RotorQuantCache(_BackendCache):
    """Compressed cache with 3D Clifford-algebra rotors. `calibration` and `prompt_means` as `RQCache`'s: by default
    measured on the prompt."""

    backend = "rotor"


__all__ = [
    "RQCache",
    "RQCacheLayer",
    "RQSlidingCacheLayer",
    "PlanarQuantCache",
    "IsoQuantCache",
    "RotorQuantCache",
    "MemoryReport",
]
