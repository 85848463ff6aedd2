"""Drop-in transformers caches that keep K/V compressed: `model.generate(..., past_key_values=IsoQuantCache(bits=3))`.

Each full-attention (or sliding-window) layer stores only packed codes and fp16 norms (plus an optional window of the
most recent tokens uncompressed). On every forward the layer returns the dequantized history for the model's own
attention; that copy is transient (one layer at a time), never kept. Linear-attention layers of hybrid models
(Qwen3.5's gated delta net) keep transformers' own conv/recurrent state untouched.

Quantization is per token, so a token's dequantized value never depends on which other tokens are cached: crop,
reorder and batch operations on the compressed store give the same results as on a cache of dequantized values.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, LinearAttentionLayer

from rqcompile.calibrate import MIN_PROMPT_TOKENS, PROMPT, Calibration, channel_stats
from rqcompile.config import RQConfig
from rqcompile.ops import dequantize_state, quantize_state
from rqcompile.quant.quantizer import QuantState, make_state

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


def _check_calibration(calibration: Any) -> None:
    if calibration is not None and calibration != PROMPT and not isinstance(calibration, Calibration):
        raise ValueError(
            f"calibration={calibration!r}: pass a rqcompile.Calibration (rqcompile.calibrate(model, ...)), "
            f"{PROMPT!r} (measure it on each sequence's prompt) or None"
        )


def _cat(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    return new if old is None else torch.cat([old, new], dim=-2)


class RQCacheLayer(CacheLayerMixin):
    """One attention layer's compressed K/V store."""

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(
        self, config: RQConfig, layer_idx: int, calibration: Calibration | str | None = None, **kw: Any
    ) -> None:
        super().__init__()
        _check_calibration(calibration)
        self.config = config
        self.calibration = calibration
        self.layer_idx = layer_idx
        self.k_state: QuantState | None = None
        self.v_state: QuantState | None = None
        self._clear()

    def _clear(self) -> None:
        if self.calibration == PROMPT:  # the next sequence calibrates on its own prompt
            self.k_state = self.v_state = None
        self.k_codes = self.k_norms = self.v_codes = self.v_norms = None
        self.k_window = self.v_window = None
        self.k_sink = self.v_sink = None
        self.is_initialized = False

    # -- transformers layer API ---------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        _, heads, _, head_dim = key_states.shape
        if self.k_state is None or self.k_state.num_heads != heads or self.k_state.head_dim != head_dim:
            stats = self._stats(key_states, value_states)
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

    def _stats(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """(kind, name) -> this layer's calibration tensor or None: from the Calibration, or with PROMPT measured on
        these first K/V (the prompt) as `calibrate` measures sample text: key mean, K/V scales, sink token left out."""
        calib = self.calibration
        if calib is None:
            return lambda kind, name: None
        if calib != PROMPT:
            return lambda kind, name: calib.get(self.layer_idx, kind, name)
        tokens = key_states.shape[-2] - 1
        if tokens < MIN_PROMPT_TOKENS:
            warnings.warn(
                f"rqcompile: layer {self.layer_idx} was asked to calibrate on its prompt, which has {tokens} tokens "
                f"after the sink token (< {MIN_PROMPT_TOKENS}); it stays uncalibrated for this sequence",
                UserWarning,
                stacklevel=4,
            )
            return lambda kind, name: None
        found = {
            kind: channel_stats(x[:, :, 1:], mean=kind == "k", scale=True)
            for kind, x in (("k", key_states), ("v", value_states))
        }
        return lambda kind, name: found[kind].get(name)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.config.check_finite:  # before a prompt calibration could measure them
            for name, tensor in (("key", key_states), ("value", value_states)):
                if not torch.isfinite(tensor).all():
                    raise ValueError(
                        f"layer {self.layer_idx}: {name} states contain NaN/inf; refusing to write them to the cache"
                    )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        sink_room = self.config.sink_tokens - (0 if self.k_sink is None else self.k_sink.shape[-2])
        if sink_room > 0 and self.get_seq_length() == self._sink_length():
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

    def _append_compressed(self, keys: torch.Tensor, values: torch.Tensor) -> None:
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
            keys.append(dequantize_state(self.k_codes, self.k_norms, self.k_state, self.dtype))
            values.append(dequantize_state(self.v_codes, self.v_norms, self.v_state, self.dtype))
        if self.k_window is not None:
            keys.append(self.k_window)
            values.append(self.v_window)
        return torch.cat(keys, dim=-2), torch.cat(values, dim=-2)

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

    def _map(self, fn) -> None:
        for name in ("k_codes", "k_norms", "v_codes", "v_norms", "k_window", "v_window", "k_sink", "v_sink"):
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
        window = _storage_bytes(self.k_window, self.v_window, self.k_sink, self.v_sink)
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
        **kw: Any,
    ) -> None:
        super().__init__(config, layer_idx, calibration)
        self.sliding_window = sliding_window


@dataclass(frozen=True)
class MemoryReport:
    """Bytes held by a cache, measured from the tensors it allocated."""

    layers: dict[int, dict[str, int]]

    @property
    def compressed_bytes(self) -> int:
        return sum(m["compressed_bytes"] + m["window_bytes"] for m in self.layers.values())

    @property
    def bf16_bytes(self) -> int:
        return sum(m["bf16_bytes"] for m in self.layers.values())

    @property
    def ratio(self) -> float:
        return self.bf16_bytes / self.compressed_bytes if self.compressed_bytes else float("nan")

    def __str__(self) -> str:
        return (
            f"{len(self.layers)} compressed layers: {self.compressed_bytes:,} bytes held vs {self.bf16_bytes:,} "
            f"for bf16 ({self.ratio:.2f}x smaller)"
        )


class RQCache(Cache):
    """A transformers `Cache` whose attention layers are compressed as `config` says.

    Pass the model config (`RQCache(cfg, model_config=model.config)`) to lay out hybrid and sliding-window layers up
    front; without it, layers are created as the model first touches them: linear-attention layers when the model
    asks for conv/recurrent state, compressed attention layers on `update`.

    `calibration`: a `rqcompile.Calibration` (`rqcompile.calibrate(model, tokenizer=tok)`), `"prompt"` (each layer
    measures the key mean and K/V scales on the first K/V it is given, the prompt, and keeps them for that sequence;
    measured about as good as calibrating on sample text, QUALITY.md) or None (uncalibrated: much lower quality
    for the block backends).
    """

    def __init__(
        self,
        config: RQConfig | None = None,
        *,
        model_config: Any = None,
        calibration: Calibration | str | None = None,
        **overrides: Any,
    ) -> None:
        config = (config or RQConfig()).replace(**overrides) if overrides else (config or RQConfig())
        _check_calibration(calibration)
        self.rq_config = config
        self.calibration = calibration
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
            return RQCacheLayer(self.rq_config, idx, self.calibration)
        if layer_type in ("sliding_attention", "chunked_attention"):
            return RQSlidingCacheLayer(self.rq_config, idx, self.calibration, sliding_window=sliding_window)
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
                self.layers.append(RQCacheLayer(self.rq_config, idx, self.calibration))

    # -- attention layers ------------------------------------------------------------------------------------
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._ensure(layer_idx, linear=False)
        layer = self.layers[layer_idx]
        if not isinstance(layer, RQCacheLayer):
            raise ValueError(f"layer {layer_idx} is a {type(layer).__name__}, not an attention layer")
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


class PlanarQuantCache(RQCache):
    """Compressed cache with 2D Givens rotations (the fastest backend)."""

    def __init__(
        self, bits: int = 3, *, model_config: Any = None, calibration: Calibration | str | None = None, **options: Any
    ) -> None:
        super().__init__(
            RQConfig(backend="planar", bits=bits, **options), model_config=model_config, calibration=calibration
        )


class IsoQuantCache(RQCache):
    """Compressed cache with 4D quaternion rotations (`q_L v conj(q_R)`)."""

    def __init__(
        self, bits: int = 3, *, model_config: Any = None, calibration: Calibration | str | None = None, **options: Any
    ) -> None:
        super().__init__(
            RQConfig(backend="iso", bits=bits, **options), model_config=model_config, calibration=calibration
        )


class RotorQuantCache(RQCache):
    """Compressed cache with 3D Clifford-algebra rotors."""

    def __init__(
        self, bits: int = 3, *, model_config: Any = None, calibration: Calibration | str | None = None, **options: Any
    ) -> None:
        super().__init__(
            RQConfig(backend="rotor", bits=bits, **options), model_config=model_config, calibration=calibration
        )


__all__ = [
    "RQCache",
    "RQCacheLayer",
    "RQSlidingCacheLayer",
    "PlanarQuantCache",
    "IsoQuantCache",
    "RotorQuantCache",
    "MemoryReport",
]
