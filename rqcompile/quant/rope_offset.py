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


def static_rope_spec(model_config) -> RopeSpec | None:
    """`rope_spec`, or None where the offset cannot be used (no RoPE, a dynamic RoPE type): what
    `RQConfig(rope_key_mean=None)` ("auto") turns the offset on by."""
    try:
        return rope_spec(model_config)
    except (ValueError, AttributeError, KeyError, TypeError):
        return None


def check_same_rope(measured: RopeSpec, model: RopeSpec) -> None:
    """A Calibration's RoPE against the model's: a pre-RoPE mean is only meaningful under the RoPE it was measured
    with."""
    same = (
        measured.inv_freq.shape == model.inv_freq.shape
        and torch.allclose(measured.inv_freq.float().cpu(), model.inv_freq.float().cpu(), rtol=1e-6, atol=0)
        and abs(measured.scaling - model.scaling) <= 1e-6 * max(1.0, abs(model.scaling))
    )
    if not same:
        raise ValueError(
            f"this Calibration's pre-RoPE key means were measured under another RoPE ({measured.dims} rotary dims, "
            f"scaling {measured.scaling:g}) than this model's ({model.dims} dims, scaling {model.scaling:g}): "
            "calibrate on this model"
        )


def _cos_sin(positions: torch.Tensor, spec: RopeSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of theta_i * p, [B, 1, T, dims / 2] float32 (unscaled), for broadcasting over heads."""
    angles = positions.float()[:, None, :, None] * spec.inv_freq.to(positions.device)
    return angles.cos(), angles.sin()


def offset_base(mean: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    """The pre-RoPE key mean [H, d] with the attention scaling folded into its rotary coordinates (float32): what
    the compiled programs store, so that RoPE_p(m) needs only the inverse frequencies."""
    half = spec.dims // 2
    m = mean.float()
    return torch.cat([spec.scaling * m[..., : 2 * half], m[..., 2 * half :]], dim=-1)


def _turn(base: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """rotate_half RoPE of `base` [1, H, 1, d] by angles whose cos / sin are [.., T, h]; the rest of d unrotated."""
    half = cos.shape[-1]
    m1, m2, rest = base[..., :half], base[..., half : 2 * half], base[..., 2 * half :]
    return torch.cat([m1 * cos - m2 * sin, m2 * cos + m1 * sin, rest.expand(*shape, -1)], dim=-1)


def rope_offset(mean: torch.Tensor, positions: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    """RoPE_p(m): the pre-RoPE key mean `mean` [H, d] at `positions` [B, T] -> [B, H, T, d] float32 (coordinates past
    `spec.dims` unrotated)."""
    cos, sin = _cos_sin(positions, spec)
    base = offset_base(mean, spec).to(positions.device)[None, :, None, :]
    return _turn(base, cos, sin, (positions.shape[0], mean.shape[0], positions.shape[1]))


def slot_offset(base: torch.Tensor, slots: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE_p(m) [1, H, T, d] float32 at cache slots `slots` [T] (position = slot: the compiled programs' unpadded
    rows) from `offset_base`'s tensor and the inverse frequencies; torch ops only, so it traces into a graph."""
    angles = slots.float()[None, None, :, None] * inv_freq  # [1, 1, T, h], float32(p) * theta_i as rope_offset
    return _turn(base[None, :, None, :], angles.cos(), angles.sin(), (1, base.shape[0], slots.shape[0]))


def rope_score_weights(q: torch.Tensor, base: torch.Tensor, half: int) -> torch.Tensor:
    """rq::attention's `rope_ab` [B, Hq, Tq, 2 half] float32: q . RoPE_j(m) = sum_i A_i cos(j theta_i) + B_i sin(j
    theta_i) with A_i = q_i m_i + q_{i+h} m_{i+h} and B_i = q_{i+h} m_i - q_i m_{i+h} (query head h reads KV head h //
    (Hq / H) of `base` [H, d]). The unrotated coordinates' term is the same for every key: `rope_constant_term`."""
    m = base.repeat_interleave(q.shape[1] // base.shape[0], dim=0)[None, :, None, :]
    qf = q.float()
    q1, q2, m1, m2 = qf[..., :half], qf[..., half : 2 * half], m[..., :half], m[..., half : 2 * half]
    return torch.cat([q1 * m1 + q2 * m2, q2 * m1 - q1 * m2], dim=-1)


def rope_constant_term(q: torch.Tensor, base: torch.Tensor, half: int) -> torch.Tensor:
    """q . m over the coordinates RoPE leaves alone (partial rotary), [B, Hq, Tq] float32: softmax ignores it, but a
    merge with attention over exact keys must add it, like the post-RoPE key mean's term."""
    m = base.repeat_interleave(q.shape[1] // base.shape[0], dim=0)[None, :, None, 2 * half :]
    return (q.float()[..., 2 * half :] * m).sum(-1)


def unrotate(keys: torch.Tensor, positions: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    """Post-RoPE keys [B, H, T, d] turned back to the pre-RoPE frame (float32), to measure a prompt's pre-RoPE mean."""
    half = spec.dims // 2
    cos, sin = _cos_sin(positions, spec)
    k = keys.float()
    y1, y2, rest = k[..., :half], k[..., half : 2 * half], k[..., 2 * half :]
    s = spec.scaling
    return torch.cat([(y1 * cos + y2 * sin) / s, (y2 * cos - y1 * sin) / s, rest], dim=-1)
