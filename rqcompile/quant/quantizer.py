"""The reference quantizer: plain torch, fp32 math (the encoder's rotation accumulated in fp64), any device. Every
kernel and export is checked against it.

`QuantState` holds one (layer, K|V)'s parameters as tensors; the functions below implement docs/FORMAT.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from rqcompile.config import RQConfig
from rqcompile.quant.codebook import boundaries, codebook
from rqcompile.quant.packing import layout_size, pack, runs, unpack
from rqcompile.quant.rotations import make_rotation, rotate

Widths = int | tuple[int, ...]


@dataclass(frozen=True)
class QuantState:
    """Parameters of one layer's K (or V) quantizer; see docs/FORMAT.md for each tensor's meaning.

    `widths` is the bit width of each stored coordinate (an int means every coordinate has it); `perm` ([H, d]
    int64, or None for the identity) is the channel order the rotation reads, set by calibrated bit allocation so
    that coordinates of one width are contiguous."""

    rotation: torch.Tensor  # [H, nb, b, b] float32
    mean: torch.Tensor  # [H, d] float32
    scale: torch.Tensor  # [H, d] float32
    levels: torch.Tensor  # one codebook per run of equal widths, then A >= 0 encoder scale candidates
    widths: Widths
    group: int
    perm: torch.Tensor | None = None  # [H, d] int64
    along_keys: bool = False  # codes packed along keys (RQConfig.value_layout="keys", docs/FORMAT.md)

    def __post_init__(self) -> None:
        widths = _widths(self.widths, self.mean.shape[-1])
        object.__setattr__(self, "widths", widths)
        runs(widths)  # checks the layout
        if self.perm is not None and tuple(self.perm.shape) != tuple(self.mean.shape):
            raise ValueError(f"perm has shape {tuple(self.perm.shape)}, expected {tuple(self.mean.shape)}")
        if self.along_keys and (self.perm is not None or len(set(widths)) != 1 or widths[0] not in (2, 3)):
            raise ValueError("codes packed along keys are uniform 2- or 3-bit codes without a channel order (perm)")

    @property
    def uniform(self) -> bool:
        return len(set(self.widths)) == 1 and self.perm is None

    @property
    def bits(self) -> int:
        """The width of every coordinate; a mixed layout has none (use `widths` / `bits_per_code`)."""
        if len(set(self.widths)) != 1:
            raise ValueError(f"this quantizer mixes widths {sorted(set(self.widths))}; it has no single bit width")
        return self.widths[0]

    @property
    def bits_per_code(self) -> float:
        return sum(self.widths) / len(self.widths)

    @property
    def codebook(self) -> torch.Tensor:
        """All reconstruction levels (what decoders read): each run's codebook, in run order."""
        return self.levels[: codebook_size(self.widths)]

    @property
    def scale_candidates(self) -> torch.Tensor:
        """Scale factors the encoder tries per norm group (empty: the plain quantizer)."""
        return self.levels[codebook_size(self.widths) :]

    @property
    def num_heads(self) -> int:
        return self.mean.shape[0]

    @property
    def head_dim(self) -> int:
        return self.mean.shape[1]

    @property
    def code_bytes(self) -> int:
        return layout_size(self.widths)

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
            perm=None if self.perm is None else self.perm.to(device),
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"rotation": self.rotation, "mean": self.mean, "scale": self.scale, "levels": self.levels}
        if self.perm is not None:
            out["perm"] = self.perm
        return out


def _widths(widths: Widths, dim: int) -> tuple[int, ...]:
    if isinstance(widths, int) and not isinstance(widths, bool):
        return (widths,) * dim
    out = tuple(int(w) for w in widths)
    if len(out) != dim:
        raise ValueError(f"{len(out)} code widths for head_dim {dim}")
    return out


def codebook_size(widths: Widths) -> int:
    """Number of codebook levels a layout reads: 2**w for each run of equal widths."""
    widths = (widths,) if isinstance(widths, int) else widths
    if isinstance(widths, tuple) and len(widths) == 1:
        return 2 ** widths[0]
    return sum(2**w for w, _, _ in runs(widths))


def layout_codebook(widths: tuple[int, ...], group: int) -> torch.Tensor:
    """The Lloyd-Max codebook of each run, concatenated in run order."""
    return torch.cat([codebook(w, group) for w, _, _ in runs(widths)])


def make_state(
    config: RQConfig,
    *,
    layer_idx: int,
    kind: str,
    num_heads: int,
    head_dim: int,
    mean: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> QuantState:
    """The deterministic quantizer of one layer's keys (`kind="k"`) or values (`kind="v"`).

    `mean` / `scale` ([H, d]) come from calibration; by default zeros / ones. `weight` ([H, d], calibration's
    per-channel error weight) is required when `config.bit_allocation` is set: it decides which coordinates get
    more bits (`rqcompile.quant.allocation`).
    """
    for name, tensor in (("mean", mean), ("scale", scale), ("weight", weight)):
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
        stages=config.resolved_rotation_stages,
    )
    perm = None
    if config.bit_allocation:
        if weight is None:
            raise ValueError(
                f"RQConfig.bit_allocation={config.bit_allocation} needs calibration: pass "
                "calibration=rqcompile.calibrate(model, ids) (it measures the per-channel error weights), or use "
                "uniform bits (bit_allocation=())"
            )
        from rqcompile.quant.allocation import allocate_bits

        perm, widths = allocate_bits(weight.detach().float().cpu(), rotation, bits, config.bit_allocation)
    else:
        widths = (int(bits),) * head_dim
    return QuantState(
        rotation=rotation,
        mean=torch.zeros(num_heads, head_dim) if mean is None else mean.detach().float().cpu(),
        scale=torch.ones(num_heads, head_dim) if scale is None else scale.detach().float().cpu(),
        levels=torch.cat([layout_codebook(widths, group), torch.tensor(config.scale_search, dtype=torch.float32)]),
        widths=widths,
        group=group,
        perm=perm,
        along_keys=config.packs_along_keys(kind),
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
    bits: Widths,
    group: int,
    perm: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, H, T, d] -> (packed codes uint8 [B, H, T, bytes], corrected norms fp16 [B, H, T, d/group]).

    `bits`: one width, or the width of each stored coordinate (a calibrated allocation; `perm` [H, d] is then the
    channel order the rotation reads). `levels` holds each run's codebook, optionally followed by the encoder's
    scale candidates (docs/FORMAT.md, "Scale search"): each norm group is then coded at every candidate scale and
    the one whose reconstruction points closest to the group's direction is kept. Decoders only read the codebooks.
    """
    if x.dim() != 4:
        raise ValueError(f"expected x of shape [batch, heads, tokens, head_dim], got {tuple(x.shape)}")
    dim = x.shape[-1]
    if dim % group:
        raise ValueError(f"norm group {group} must divide head_dim {dim}")
    widths = _widths(bits, dim)
    table = _run_table(widths, levels)
    _check_finite(x, "K/V input")
    candidates = levels[codebook_size(widths) :]
    u = _permute((x.float() - mean[:, None, :]) / scale[:, None, :], perm)
    y = _rotate_batch_invariant(u, rotation).unflatten(-1, (dim // group, group))
    norm = y.norm(dim=-1, keepdim=True)
    unit = torch.where(norm > 0, y / norm.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(y))
    codes, chosen = _search_codes(unit, table, candidates) if candidates.numel() else _codes(unit, table)
    corrected = norm.squeeze(-1) / chosen.norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
    return pack(codes.flatten(-2), widths), corrected.to(torch.float16)


def _rotate_batch_invariant(u: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """`rotate` for the encoder, accumulated in float64 and rounded to float32.

    A token's codes must not depend on how many tokens it is quantized with (a chunked prefill, the residual window
    spilling one token or many): matrix-multiply libraries pick their accumulation order by the number of rows, and
    a one-ulp difference flips a code that sits on a decision boundary. Accumulated in float64, the float32 result is
    the same for any row count unless the exact value lies within ~1e-16 (relative) of a float32 rounding point."""
    return rotate(u.double(), rotation.double()).float()


def _run_table(widths: tuple[int, ...], levels: torch.Tensor) -> list[tuple[int, int, torch.Tensor]]:
    """(start, count, codebook) of each run of equal widths, the codebooks sliced from `levels` in run order."""
    need = codebook_size(widths)
    if levels.dim() != 1 or levels.numel() < need:
        raise ValueError(f"codebook has {levels.numel()} levels, this layout of widths needs {need}")
    table, offset = [], 0
    for width, start, count in runs(widths):
        table.append((start, count, levels[offset : offset + 2**width]))
        offset += 2**width
    return table


def _permute(u: torch.Tensor, perm: torch.Tensor | None, inverse: bool = False) -> torch.Tensor:
    """u [B, H, T, d] with channels reordered per head: `u[..., perm[h]]` (or its inverse)."""
    if perm is None:
        return u
    index = perm[None, :, None, :].expand(u.shape[0], -1, u.shape[2], -1)
    if inverse:
        return torch.empty_like(u).scatter_(-1, index, u)
    return u.gather(-1, index)


def boundary_codes(u: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """Codes of u [...] against ascending decision boundaries [L - 1]: how many boundaries u exceeds, where a u
    exactly on a boundary rounds toward zero (below 0 it counts the boundary, at or above 0 it does not). Under a
    symmetric codebook this codes -u as the mirror of u, so an encoder may search |u| alone (docs/FORMAT.md,
    "Ties"); every encoder here follows this rule."""
    u = u.unsqueeze(-1)
    return torch.where(u < 0, u >= bounds, u > bounds).sum(-1)


def _codes(unit: torch.Tensor, table) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes of the unit groups [..., G, g] (`boundary_codes` in each run's codebook) and the levels they decode
    to."""
    flat = unit.flatten(-2)
    codes, values = [], []
    for start, count, codebook_levels in table:
        c = boundary_codes(flat[..., start : start + count], boundaries(codebook_levels))
        codes.append(c)
        values.append(codebook_levels[c])
    shape = unit.shape
    return torch.cat(codes, -1).view(shape), torch.cat(values, -1).view(shape)


def _search_codes(unit: torch.Tensor, table, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per norm group, the codes of `unit / c` for the candidate scale `c` whose reconstruction direction is closest
    to `unit` (largest cosine <unit, L[codes]> / ||L[codes]||; the first candidate wins ties). With the stored norm
    restoring the group's length, the squared error of a group is 2 n^2 (1 - cosine), so this is the candidate of
    least reconstruction error."""
    best_codes, best_values, best_cos = None, None, None
    for c in candidates.unbind():
        codes, chosen = _codes(unit / c, table)
        cos = (unit * chosen).sum(-1) / chosen.norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
        if best_codes is None:
            best_codes, best_values, best_cos = codes, chosen, cos
        else:
            better = cos > best_cos
            best_codes = torch.where(better[..., None], codes, best_codes)
            best_values = torch.where(better[..., None], chosen, best_values)
            best_cos = torch.where(better, cos, best_cos)
    return best_codes, best_values


def dequantize_rotated(
    codes: torch.Tensor, norms: torch.Tensor, levels: torch.Tensor, bits: Widths, head_dim: int
) -> torch.Tensor:
    """Reconstruction in the rotated space (fp32): what the fused attention scores against."""
    widths = _widths(bits, head_dim)
    group = head_dim // norms.shape[-1]
    idx = unpack(codes, widths, head_dim)
    values = torch.cat([cb[idx[..., s : s + n]] for s, n, cb in _run_table(widths, levels)], -1)
    values = values.unflatten(-1, (head_dim // group, group))
    return (values * norms.float().unsqueeze(-1)).flatten(-2)


def dequantize(
    codes: torch.Tensor,
    norms: torch.Tensor,
    rotation: torch.Tensor,
    mean: torch.Tensor,
    scale: torch.Tensor,
    levels: torch.Tensor,
    bits: Widths,
    head_dim: int,
    dtype: torch.dtype = torch.float32,
    perm: torch.Tensor | None = None,
) -> torch.Tensor:
    """Packed codes + norms -> reconstructed x [B, H, T, d] in `dtype`."""
    y = dequantize_rotated(codes, norms, levels, bits, head_dim)
    u = _permute(rotate(y, rotation, inverse=True), perm, inverse=True)
    return (u * scale[:, None, :] + mean[:, None, :]).to(dtype)


def rotated_scores(
    q: torch.Tensor,
    k_codes: torch.Tensor,
    k_norms: torch.Tensor,
    k: QuantState,
    attn_mask: torch.Tensor | None = None,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """Scaled, masked scores fp32 [B, Hq, Tq, Tk] of q [B, Hq, Tq, d] against the packed keys, in K's rotated space.

    K's scale folds into q, q's channels are ordered as K's were (`perm`), then q is rotated once per KV head; the
    key mean's term `sm_scale * q . mean` is left out (the same for every key of a query: softmax ignores it).
    `attn_mask`: bool (True = attend) or additive float, broadcastable to [B, Hq, Tq, Tk], as in SDPA."""
    batch, q_heads, q_len, dim = q.shape
    kv_heads = k_codes.shape[1]
    if q_heads % kv_heads:
        raise ValueError(f"{q_heads} query heads are not a multiple of {kv_heads} KV heads")
    rep = q_heads // kv_heads
    sm_scale = 1.0 / math.sqrt(dim) if sm_scale is None else sm_scale
    qf = q.float().unflatten(1, (kv_heads, rep)).flatten(2, 3)  # [B, Hkv, rep*Tq, d]
    q_rot = rotate(_permute(qf * k.scale[:, None, :], k.perm), k.rotation)
    k_rot = dequantize_rotated(k_codes, k_norms, k.levels, k.widths, dim)  # [B, Hkv, Tk, d]
    scores = (q_rot @ k_rot.transpose(-1, -2)) * sm_scale  # [B, Hkv, rep*Tq, Tk]
    scores = scores.unflatten(2, (rep, q_len)).flatten(1, 2)  # [B, Hq, Tq, Tk]
    if attn_mask is None:
        return scores
    if attn_mask.dtype == torch.bool:
        return scores.masked_fill(~attn_mask, float("-inf"))
    return scores + attn_mask.float()


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
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [B, Hq, Tq, d] over a compressed cache, computed in the rotated space (fp32).

    Scores as `rotated_scores`; values accumulate in V's rotated space and are un-rotated once per query. Equals
    SDPA over the dequantized cache. A fully masked row gets V's mean. `return_lse`: also the natural-log sum-exp of
    each row's scores, fp32 [B, Hq, Tq] (-inf for a fully masked row), with which attentions over disjoint key sets
    merge exactly.
    """
    batch, q_heads, q_len, dim = q.shape
    kv_heads = k_codes.shape[1]
    rep = q_heads // kv_heads
    scores = rotated_scores(q, k_codes, k_norms, k, attn_mask, sm_scale)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a fully masked row attends to nothing
    probs = probs.unflatten(1, (kv_heads, rep)).flatten(2, 3)  # [B, Hkv, rep*Tq, Tk]
    acc = probs @ dequantize_rotated(v_codes, v_norms, v.levels, v.widths, dim)
    out = _permute(rotate(acc, v.rotation, inverse=True), v.perm, inverse=True)
    out = out * v.scale[:, None, :] + v.mean[:, None, :]
    out = out.unflatten(2, (rep, q_len)).flatten(1, 2).to(q.dtype)
    return (out, torch.logsumexp(scores, dim=-1)) if return_lse else out


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
    "rotated_scores",
    "pad_to_heads",
]
