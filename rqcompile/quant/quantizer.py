"""The reference quantizer: plain torch, fp32 math, any device. Every kernel and export is checked against it.

`QuantState` holds one (layer, K|V)'s parameters as tensors; the functions below implement docs/FORMAT.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from rqcompile.config import RQConfig
from rqcompile.quant.codebook import boundaries, codebook
from rqcompile.quant.packing import pack, packed_size, unpack
from rqcompile.quant.rotations import make_rotation, rotate


@dataclass(frozen=True)
class QuantState:
    """Parameters of one layer's K (or V) quantizer; see docs/FORMAT.md for each tensor's meaning."""

    rotation: torch.Tensor  # [H, nb, b, b] float32
    mean: torch.Tensor  # [H, d] float32
    scale: torch.Tensor  # [H, d] float32
    levels: torch.Tensor  # [2**bits + A] float32: the codebook, then A >= 0 encoder scale candidates
    bits: int
    group: int

    @property
    def codebook(self) -> torch.Tensor:
        """The 2**bits reconstruction levels (what decoders read)."""
        return self.levels[: 2**self.bits]

    @property
    def scale_candidates(self) -> torch.Tensor:
        """Scale factors the encoder tries per norm group (empty: the plain quantizer)."""
        return self.levels[2**self.bits :]

    @property
    def num_heads(self) -> int:
        return self.mean.shape[0]

    @property
    def head_dim(self) -> int:
        return self.mean.shape[1]

    @property
    def code_bytes(self) -> int:
        return packed_size(self.head_dim, self.bits)

    @property
    def num_groups(self) -> int:
        return self.head_dim // self.group

    def to(self, device: torch.device | str) -> QuantState:
        return replace(
            self,
            rotation=self.rotation.to(device),
            mean=self.mean.to(device),
            scale=self.scale.to(device),
            levels=self.levels.to(device),
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"rotation": self.rotation, "mean": self.mean, "scale": self.scale, "levels": self.levels}


def make_state(
    config: RQConfig,
    *,
    layer_idx: int,
    kind: str,
    num_heads: int,
    head_dim: int,
    mean: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> QuantState:
    """The deterministic quantizer of one layer's keys (`kind="k"`) or values (`kind="v"`).

    `mean` / `scale` ([H, d]) come from calibration; by default zeros / ones.
    """
    for name, tensor in (("mean", mean), ("scale", scale)):
        if tensor is not None and tuple(tensor.shape) != (num_heads, head_dim):
            raise ValueError(
                f"calibrated {name} for layer {layer_idx} {kind} has shape {tuple(tensor.shape)}, "
                f"expected {(num_heads, head_dim)}"
            )
    if scale is not None and not bool((scale > 0).all()):
        raise ValueError(f"calibrated scale for layer {layer_idx} {kind} must be positive")
    group = config.group_for(head_dim)
    bits = config.bits_for(layer_idx, kind)
    rotation = make_rotation(
        config.backend,
        num_heads,
        head_dim,
        group,
        seed=config.seed,
        layer_idx=layer_idx,
        kind=kind,
        iso_mode=config.iso_mode,
    )
    return QuantState(
        rotation=rotation,
        mean=torch.zeros(num_heads, head_dim) if mean is None else mean.detach().float().cpu(),
        scale=torch.ones(num_heads, head_dim) if scale is None else scale.detach().float().cpu(),
        levels=torch.cat([codebook(bits, group), torch.tensor(config.scale_search, dtype=torch.float32)]),
        bits=bits,
        group=group,
    )


def _check_finite(x: torch.Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise ValueError(f"{what} contains {bad} NaN/inf values; refusing to quantize them into the cache")


def quantize(
    x: torch.Tensor,
    rotation: torch.Tensor,
    mean: torch.Tensor,
    scale: torch.Tensor,
    levels: torch.Tensor,
    bits: int,
    group: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, H, T, d] -> (packed codes uint8 [B, H, T, d*bits/8], corrected norms fp16 [B, H, T, d/group]).

    `levels` is the codebook (`2**bits` values), optionally followed by the encoder's scale candidates (docs/FORMAT.md,
    "Scale search"): each norm group is then coded at every candidate scale and the one whose reconstruction points
    closest to the group's direction is kept. Decoders only ever read the first `2**bits` values.
    """
    if x.dim() != 4:
        raise ValueError(f"expected x of shape [batch, heads, tokens, head_dim], got {tuple(x.shape)}")
    dim = x.shape[-1]
    if dim % group:
        raise ValueError(f"norm group {group} must divide head_dim {dim}")
    count = 2**bits
    if levels.dim() != 1 or levels.numel() < count:
        raise ValueError(f"codebook has {levels.numel()} levels, expected {count} for bits={bits}")
    _check_finite(x, "K/V input")
    codebook_levels, candidates = levels[:count], levels[count:]
    u = (x.float() - mean[:, None, :]) / scale[:, None, :]
    y = rotate(u, rotation).unflatten(-1, (dim // group, group))
    norm = y.norm(dim=-1, keepdim=True)
    unit = torch.where(norm > 0, y / norm.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(y))
    codes = _search_codes(unit, codebook_levels, candidates) if candidates.numel() else _codes(unit, codebook_levels)
    chosen = codebook_levels[codes]
    corrected = norm.squeeze(-1) / chosen.norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
    return pack(codes.flatten(-2), bits), corrected.to(torch.float16)


def _codes(unit: torch.Tensor, codebook_levels: torch.Tensor) -> torch.Tensor:
    """Code of each coordinate: how many decision boundaries it exceeds."""
    return (unit.unsqueeze(-1) > boundaries(codebook_levels)).sum(-1)


def _search_codes(unit: torch.Tensor, codebook_levels: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Per norm group, the codes of `unit / c` for the candidate scale `c` whose reconstruction direction is closest
    to `unit` (largest cosine <unit, L[codes]> / ||L[codes]||; the first candidate wins ties). With the stored norm
    restoring the group's length, the squared error of a group is 2 n^2 (1 - cosine), so this is the candidate of
    least reconstruction error."""
    best_codes, best_cos = None, None
    for c in candidates.unbind():
        codes = _codes(unit / c, codebook_levels)
        chosen = codebook_levels[codes]
        cos = (unit * chosen).sum(-1) / chosen.norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
        if best_codes is None:
            best_codes, best_cos = codes, cos
        else:
            better = cos > best_cos
            best_codes = torch.where(better[..., None], codes, best_codes)
            best_cos = torch.where(better, cos, best_cos)
    return best_codes


def dequantize_rotated(
    codes: torch.Tensor, norms: torch.Tensor, levels: torch.Tensor, bits: int, head_dim: int
) -> torch.Tensor:
    """Reconstruction in the rotated space (fp32): what the fused attention scores against."""
    group = head_dim // norms.shape[-1]
    values = levels[unpack(codes, bits, head_dim)].unflatten(-1, (head_dim // group, group))
    return (values * norms.float().unsqueeze(-1)).flatten(-2)


def dequantize(
    codes: torch.Tensor,
    norms: torch.Tensor,
    rotation: torch.Tensor,
    mean: torch.Tensor,
    scale: torch.Tensor,
    levels: torch.Tensor,
    bits: int,
    head_dim: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Packed codes + norms -> reconstructed x [B, H, T, d] in `dtype`."""
    y = dequantize_rotated(codes, norms, levels, bits, head_dim)
    u = rotate(y, rotation, inverse=True)
    return (u * scale[:, None, :] + mean[:, None, :]).to(dtype)


def rotated_attention(
    q: torch.Tensor,
    k_codes: torch.Tensor,
    k_norms: torch.Tensor,
    v_codes: torch.Tensor,
    v_norms: torch.Tensor,
    k: QuantState,
    v: QuantState,
    attn_mask: torch.Tensor | None = None,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """Attention of q [B, Hq, Tq, d] over a compressed cache, computed in the rotated space (fp32).

    Rotates q once, scores against codebook values times norms, accumulates values in V's rotated space and
    un-rotates once per query; equals SDPA over the dequantized cache (the key mean only shifts each query's scores
    by a constant, which softmax ignores). `attn_mask`: bool (True = attend) or additive float, broadcastable to
    [B, Hq, Tq, Tk], as in `F.scaled_dot_product_attention`.
    """
    batch, q_heads, q_len, dim = q.shape
    kv_heads = k_codes.shape[1]
    if q_heads % kv_heads:
        raise ValueError(f"{q_heads} query heads are not a multiple of {kv_heads} KV heads")
    rep = q_heads // kv_heads
    sm_scale = 1.0 / math.sqrt(dim) if sm_scale is None else sm_scale
    # Fold K's scale into q, then rotate q by K's rotation (per KV head, shared by its query heads).
    qf = q.float().unflatten(1, (kv_heads, rep)).flatten(2, 3)  # [B, Hkv, rep*Tq, d]
    q_rot = rotate(qf * k.scale[:, None, :], k.rotation)
    k_rot = dequantize_rotated(k_codes, k_norms, k.levels, k.bits, dim)  # [B, Hkv, Tk, d]
    v_rot = dequantize_rotated(v_codes, v_norms, v.levels, v.bits, dim)
    scores = (q_rot @ k_rot.transpose(-1, -2)) * sm_scale  # [B, Hkv, rep*Tq, Tk]
    scores = scores.unflatten(2, (rep, q_len)).flatten(1, 2)  # [B, Hq, Tq, Tk]
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.float()
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a fully masked row attends to nothing
    probs = probs.unflatten(1, (kv_heads, rep)).flatten(2, 3)  # [B, Hkv, rep*Tq, Tk]
    acc = probs @ v_rot
    out = rotate(acc, v.rotation, inverse=True) * v.scale[:, None, :] + v.mean[:, None, :]
    out = out.unflatten(2, (rep, q_len)).flatten(1, 2)
    return out.to(q.dtype)


def pad_to_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Repeat KV heads for grouped-query attention (reference helper)."""
    return x.repeat_interleave(heads // x.shape[1], dim=1)


__all__ = [
    "QuantState",
    "make_state",
    "quantize",
    "dequantize",
    "dequantize_rotated",
    "rotated_attention",
    "pad_to_heads",
]
