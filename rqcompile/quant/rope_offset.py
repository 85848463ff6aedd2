"""The keys' pre-RoPE mean turned to each key's position (`RQConfig(rope_key_mean=True)`, QUALITY.md "Session 13").

Most of a key's per-channel offset is constant *before* RoPE. After RoPE, pair i of that offset turns with the
position (angle theta_i * p), so the format's key mean, measured on post-RoPE keys, only catches the pairs that turn
slowly. With `rope_key_mean` a cache subtracts RoPE_p(m), the layer's pre-RoPE key mean m rotated to the key's
position p, before quantizing and adds it back after dequantizing. The add-back is exact and costs no bytes per token
(m is one vector per KV head, RoPE_p a function of the position); on SmolLM2 it removes about half of the energy the
codes carried and cuts KL by 16-43% (QUALITY.md). Unlike the post-RoPE mean it is not softmax-invariant (it is a
real positional signal), so every decoder must add it back.

RoPE here is transformers' rotate_half convention over the first `dims` coordinates (partial rotary leaves the rest
unrotated): y1 = s (x1 cos - x2 sin), y2 = s (x2 cos + x1 sin) with x1, x2 the two halves and s the attention
scaling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# RoPE types whose frequencies do not depend on the sequence length (dynamic types rescale them as it grows, so an
# offset subtracted at one length would be added back with other angles).
_STATIC_ROPE_TYPES = ("linear", "llama3", "yarn", "proportional")


@dataclass(frozen=True)
class RopeSpec:
    """A layer's RoPE: inverse frequencies [dims / 2] (float32) and the attention scaling of cos / sin."""

    inv_freq: torch.Tensor
    scaling: float = 1.0

    @property
    def dims(self) -> int:
        return 2 * self.inv_freq.numel()


def rope_spec(model_config) -> RopeSpec:
    """The RoPE of a transformers config (its text config for multimodal ones): default RoPE, partial rotary
    included, and the static scaled types; a clear error for dynamic ones and models without RoPE."""
    text = model_config.get_text_config(decoder=True) if hasattr(model_config, "get_text_config") else model_config
    params = dict(getattr(text, "rope_parameters", None) or {})
    if "rope_theta" not in params and getattr(text, "rope_theta", None) is not None:
        params["rope_theta"] = text.rope_theta
    rope_type = params.get("rope_type", "default")
    if "rope_theta" not in params:
        raise ValueError("rope_key_mean needs a model with RoPE; this config has no rope_theta / rope_parameters")
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    if rope_type == "default":
        dims = int(head_dim * params.get("partial_rotary_factor", getattr(text, "partial_rotary_factor", 1.0)))
        inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dims, 2, dtype=torch.float) / dims))
        return RopeSpec(inv_freq, 1.0)
    if rope_type in _STATIC_ROPE_TYPES:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](text, "cpu")
        return RopeSpec(inv_freq.float(), float(scaling))
    raise ValueError(
        f"rope_key_mean does not support RoPE type {rope_type!r} (its frequencies change with the sequence length); "
        f"supported: default, {', '.join(_STATIC_ROPE_TYPES)}"
    )


def _cos_sin(positions: torch.Tensor, spec: RopeSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of theta_i * p, [B, 1, T, dims / 2] float32 (unscaled), for broadcasting over heads."""
    angles = positions.float()[:, None, :, None] * spec.inv_freq.to(positions.device)
    return angles.cos(), angles.sin()


def rope_offset(mean: torch.Tensor, positions: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    """RoPE_p(m): the pre-RoPE key mean `mean` [H, d] at `positions` [B, T] -> [B, H, T, d] float32 (coordinates past
    `spec.dims` unrotated)."""
    half = spec.dims // 2
    cos, sin = _cos_sin(positions, spec)
    m = mean.float().to(positions.device)[None, :, None, :]
    m1, m2, rest = m[..., :half], m[..., half : 2 * half], m[..., 2 * half :]
    s = spec.scaling
    shape = (positions.shape[0], mean.shape[0], positions.shape[1])
    return torch.cat([s * (m1 * cos - m2 * sin), s * (m2 * cos + m1 * sin), rest.expand(*shape, -1)], dim=-1)


def unrotate(keys: torch.Tensor, positions: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    """Post-RoPE keys [B, H, T, d] turned back to the pre-RoPE frame (float32), to measure a prompt's pre-RoPE mean."""
    half = spec.dims // 2
    cos, sin = _cos_sin(positions, spec)
    k = keys.float()
    y1, y2, rest = k[..., :half], k[..., half : 2 * half], k[..., 2 * half :]
    s = spec.scaling
    return torch.cat([(y1 * cos + y2 * sin) / s, (y2 * cos - y1 * sin) / s, rest], dim=-1)
