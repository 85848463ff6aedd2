"""`torch.library` custom ops for the compressed cache: rq::quantize, rq::dequantize, rq::attention (and
rq::attention_lse, which also returns each query row's log-sum-exp so a caller can merge it with attention over other
keys, see `rqcompile.passes.exact_attention`).

They are functional (no `mutates_args`): the cache write stays an ordinary `index_copy_` of their outputs, which
torch.export, Inductor, AOTInductor and the ONNX exporter all understand (a mutating custom op reaches the ONNX
exporter as `auto_functionalized_v2`, which it cannot translate). The exception is rq::write_along_keys, the write
of V's codes packed along keys (`RQConfig.value_layout="keys"`; the ONNX exports store V per token instead,
`passes.values_per_token`): a 16-token block is read, modified and written back in place. The default
implementation is the plain-torch reference from `rqcompile.quant.quantizer`; `rqcompile.kernels` registers Triton
implementations for CUDA.
"""

from __future__ import annotations

import math

import torch

from rqcompile.quant import quantizer
from rqcompile.quant.packing import layout_size, pack, unpack_along_keys, write_along_keys_


@torch.library.custom_op("rq::quantize", mutates_args=())
def quantize(
    x: torch.Tensor,
    rotation: torch.Tensor,
    mean: torch.Tensor,
    scale: torch.Tensor,
    levels: torch.Tensor,
    bits: int,
    group: int,
    perm: torch.Tensor | None = None,
    widths: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, H, T, d] -> (codes uint8 [B, H, T, d*bits/8], norms fp16 [B, H, T, d/group]).

    A calibrated bit allocation passes `widths` (one per stored coordinate, replacing `bits`) and `perm` [H, d]
    (the channel order the rotation reads); docs/FORMAT.md, "Bit allocation"."""
    return quantizer.quantize(x, rotation, mean, scale, levels, _layout(bits, widths), group, perm)


def _layout(bits: int, widths: list[int] | None) -> int | tuple[int, ...]:
    return bits if widths is None else tuple(widths)


def _code_bytes(dim: int, bits: int, widths: list[int] | None) -> int:
    return layout_size((bits,) * dim if widths is None else widths)


@quantize.register_fake
def _(x, rotation, mean, scale, levels, bits, group, perm=None, widths=None):
    batch, heads, tokens, dim = x.shape
    codes = x.new_empty((batch, heads, tokens, _code_bytes(dim, bits, widths)), dtype=torch.uint8)
    norms = x.new_empty((batch, heads, tokens, dim // group), dtype=torch.float16)
    return codes, norms


@torch.library.custom_op("rq::dequantize", mutates_args=())
def dequantize(
    codes: torch.Tensor,
    norms: torch.Tensor,
    rotation: torch.Tensor,
    mean: torch.Tensor,
    scale: torch.Tensor,
    levels: torch.Tensor,
    bits: int,
    head_dim: int,
    dtype: torch.dtype,
    perm: torch.Tensor | None = None,
    widths: list[int] | None = None,
    along_keys: bool = False,
) -> torch.Tensor:
    """(codes, norms) -> reconstructed K/V [B, H, T, head_dim] in `dtype`. `along_keys`: the codes are packed
    along keys (`RQConfig.value_layout="keys"`; T a multiple of 16)."""
    return reference_dequantize(
        codes, norms, rotation, mean, scale, levels, bits, head_dim, dtype, perm, widths, along_keys
    )


def reference_dequantize(
    codes, norms, rotation, mean, scale, levels, bits, head_dim, dtype, perm=None, widths=None, along_keys=False
) -> torch.Tensor:
    """rq::dequantize's torch implementation (any device), with the op's arguments."""
    codes = coordinates_layout(codes, bits, head_dim, along_keys)
    layout = _layout(bits, widths)
    return quantizer.dequantize(codes, norms, rotation, mean, scale, levels, layout, head_dim, dtype, perm)


def coordinates_layout(codes: torch.Tensor, bits: int, dim: int, along_keys: bool) -> torch.Tensor:
    """Codes packed along keys re-packed per token (the layout the reference math and the non-keys-m kernels
    read); other codes as they are. A whole copy of the codes: the fallback, not the fast path."""
    if not along_keys:
        return codes
    return pack(unpack_along_keys(codes, bits, dim), bits)


@dequantize.register_fake
def _(codes, norms, rotation, mean, scale, levels, bits, head_dim, dtype, perm=None, widths=None, along_keys=False):
    return codes.new_empty((*codes.shape[:-1], head_dim), dtype=dtype)


@torch.library.custom_op("rq::write_along_keys", mutates_args=("buffer",))
def write_along_keys(buffer: torch.Tensor, codes: torch.Tensor, cache_position: torch.Tensor, bits: int) -> None:
    """Write new tokens' codes (uint8 [B, H, t, bytes], packed per token as rq::quantize returns them) into a cache
    buffer packed along keys (uint8 [B, H, L, bytes], L a multiple of 16) at `cache_position` (int64 [t], consecutive
    positions, as transformers passes them): a read-modify-write of the 16-token blocks they touch; every other token's
    bits are kept. The one rq op that mutates: a block holds 16 tokens, so a token's codes cannot be `index_copy_`'d."""
    write_along_keys_(buffer, codes, cache_position, bits, buffer.shape[-1] * 8 // bits)


@write_along_keys.register_fake
def _(buffer, codes, cache_position, bits):
    return None


@torch.library.custom_op("rq::attention", mutates_args=())
def attention(
    q: torch.Tensor,
    k_codes: torch.Tensor,
    k_norms: torch.Tensor,
    v_codes: torch.Tensor,
    v_norms: torch.Tensor,
    k_rotation: torch.Tensor,
    k_scale: torch.Tensor,
    k_levels: torch.Tensor,
    v_rotation: torch.Tensor,
    v_mean: torch.Tensor,
    v_scale: torch.Tensor,
    v_levels: torch.Tensor,
    k_bits: int,
    v_bits: int,
    attn_mask: torch.Tensor | None,
    sm_scale: float,
    kv_len: torch.Tensor | None = None,
    k_perm: torch.Tensor | None = None,
    v_perm: torch.Tensor | None = None,
    k_widths: list[int] | None = None,
    v_widths: list[int] | None = None,
    rope_ab: torch.Tensor | None = None,
    rope_inv_freq: torch.Tensor | None = None,
    v_along_keys: bool = False,
    kv_start: int = 0,
    rope_table: torch.Tensor | None = None,
) -> torch.Tensor:
    """SDPA of q [B, Hq, Tq, d] over the compressed cache, computed in the rotated space (GQA by head grouping).

    `kv_len` (optional int [B]): keys at positions >= kv_len[b] are masked, on top of `attn_mask`; `kv_start` (an
    int): keys at positions < kv_start too. With a mask, kv_len lets a kernel stop reading a static cache at the last
    valid key instead of streaming (and masking) all of max_cache_len; without one (a one-token decode step whose
    mask is a key range: `passes.decode_key_range`) the two bounds are the whole mask, and a kernel reads no mask.
    `k_perm`/`v_perm`, `k_widths`/`v_widths`: a calibrated bit allocation's layout (as for rq::quantize).

    `rope_ab` (float32 [B, Hq, Tq, 2h]) with `rope_inv_freq` (float32 [h]): a score term that turns with the key's
    slot j, added to q . k before `sm_scale`: sum_i rope_ab[..., i] cos(j theta_i) + rope_ab[..., h + i] sin(j theta_i),
    the angle computed as float32(j) * theta_i. It is q . RoPE_j(m) for a pre-RoPE key offset m
    (`RQConfig.rope_key_mean`; `rqcompile.quant.rope_offset.rope_score_weights` makes `rope_ab` from q and m).

    `v_along_keys`: V's codes are packed along keys (`RQConfig.value_layout="keys"`).

    `rope_table` (optional, with `rope_ab`): `rqcompile.kernels.rope_term.rope_table(rope_inv_freq, n)` for n >= the
    cache's slots, the term's cos / sin per slot in fp16, which the CUDA decode kernel then reads instead of computing
    them (`passes.rope_table`). It changes no result beyond fp16 rounding of the cos / sin; the torch implementation
    ignores it.
    """
    args = (q, k_codes, k_norms, v_codes, v_norms, k_rotation, k_scale, k_levels, v_rotation, v_mean, v_scale)
    args += (v_levels, k_bits, v_bits, attn_mask, sm_scale, kv_len, k_perm, v_perm, k_widths, v_widths)
    return reference_attention(*args, rope_ab, rope_inv_freq, v_along_keys, kv_start)


def reference_attention(
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
    attn_mask,
    sm_scale,
    kv_len=None,
    k_perm=None,
    v_perm=None,
    k_widths=None,
    v_widths=None,
    rope_ab=None,
    rope_inv_freq=None,
    v_along_keys: bool = False,
    kv_start: int = 0,
    return_lse: bool = False,
):
    """rq::attention's (`return_lse`: rq::attention_lse's) torch implementation, any device, the op's arguments."""
    check_kv_len(kv_len, q.shape[0])
    v_codes = coordinates_layout(v_codes, v_bits, q.shape[-1], v_along_keys)
    attn_mask = mask_with_key_range(attn_mask, kv_len, k_codes.shape[2], kv_start, k_codes.device)
    if rope_ab is not None:
        attn_mask = _with_score_bias(attn_mask, sm_scale * rope_score_bias(rope_ab, rope_inv_freq, k_codes.shape[2]))
    group_k = q.shape[-1] // k_norms.shape[-1]
    group_v = q.shape[-1] // v_norms.shape[-1]
    k = quantizer.QuantState(
        k_rotation, torch.zeros_like(k_scale), k_scale, k_levels, _layout(k_bits, k_widths), group_k, k_perm
    )
    v = quantizer.QuantState(v_rotation, v_mean, v_scale, v_levels, _layout(v_bits, v_widths), group_v, v_perm)
    return quantizer.rotated_attention(q, k_codes, k_norms, v_codes, v_norms, k, v, attn_mask, sm_scale, return_lse)


@attention.register_fake
def _(q, *args, **kwargs):  # only q's shape decides the output
    return q.new_empty(q.shape)  # contiguous, like every implementation


@torch.library.custom_op("rq::attention_lse", mutates_args=())
def attention_lse(
    q: torch.Tensor,
    k_codes: torch.Tensor,
    k_norms: torch.Tensor,
    v_codes: torch.Tensor,
    v_norms: torch.Tensor,
    k_rotation: torch.Tensor,
    k_scale: torch.Tensor,
    k_levels: torch.Tensor,
    v_rotation: torch.Tensor,
    v_mean: torch.Tensor,
    v_scale: torch.Tensor,
    v_levels: torch.Tensor,
    k_bits: int,
    v_bits: int,
    attn_mask: torch.Tensor | None,
    sm_scale: float,
    kv_len: torch.Tensor | None = None,
    k_perm: torch.Tensor | None = None,
    v_perm: torch.Tensor | None = None,
    k_widths: list[int] | None = None,
    v_widths: list[int] | None = None,
    rope_ab: torch.Tensor | None = None,
    rope_inv_freq: torch.Tensor | None = None,
    v_along_keys: bool = False,
    kv_start: int = 0,
    rope_table: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """rq::attention plus `lse` float32 [B, Hq, Tq]: the natural-log sum-exp of each query row's scaled, masked
    scores (-inf for a fully masked row, whose output is V's mean, as rq::attention's). Two attentions over disjoint
    key sets merge exactly by their lse. The scores omit the key mean's term `sm_scale * q . k_mean` (softmax ignores
    it; a merge with other keys must add it); the `rope_ab` term, which does depend on the key, is included.
    `rope_table` as for rq::attention."""
    args = (q, k_codes, k_norms, v_codes, v_norms, k_rotation, k_scale, k_levels, v_rotation, v_mean, v_scale)
    args += (v_levels, k_bits, v_bits, attn_mask, sm_scale, kv_len, k_perm, v_perm, k_widths, v_widths)
    return reference_attention_lse(*args, rope_ab, rope_inv_freq, v_along_keys, kv_start)


def reference_attention_lse(*args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """rq::attention_lse's torch implementation (any device), with the op's arguments."""
    return reference_attention(*args, **kwargs, return_lse=True)


@attention_lse.register_fake
def _(q, *args, **kwargs):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


def mask_with_key_range(
    attn_mask: torch.Tensor | None,
    kv_len: torch.Tensor | None,
    tk: int,
    kv_start: int = 0,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """`attn_mask` (bool or additive float, SDPA-style) with keys >= kv_len[b] and keys < kv_start masked as well
    (a bool [B or 1, 1, 1, tk] mask on `device` when `attn_mask` is None)."""
    check_kv_start(kv_start)
    if kv_len is None and not kv_start:
        return attn_mask
    keys = torch.arange(tk, device=kv_len.device if kv_len is not None else device)
    valid = (keys >= kv_start)[None, :]
    if kv_len is not None:
        valid = valid & (keys < kv_len[:, None])
    valid = valid[:, None, None, :]
    if attn_mask is None:
        return valid
    if attn_mask.dtype == torch.bool:
        return attn_mask & valid
    return torch.where(valid, attn_mask, torch.tensor(float("-inf"), dtype=attn_mask.dtype, device=attn_mask.device))


def check_kv_len(kv_len: torch.Tensor | None, batch: int) -> None:
    """kv_len: None, or an integer tensor [B] (or [1]: one length for every batch row). A float length would be
    truncated by the kernels where the reference compares with it; a 2-D one or the wrong B would be read past."""
    if kv_len is None:
        return
    integer = not (kv_len.dtype.is_floating_point or kv_len.dtype.is_complex or kv_len.dtype == torch.bool)
    if not integer or kv_len.dim() != 1 or kv_len.shape[0] not in (1, batch):
        raise ValueError(
            f"kv_len must be an integer tensor [B] or [1] (valid keys per batch row, B = {batch}), got "
            f"{kv_len.dtype} {tuple(kv_len.shape)}"
        )


def check_kv_start(kv_start: int) -> None:
    if not isinstance(kv_start, int) or isinstance(kv_start, bool) or kv_start < 0:
        raise ValueError(f"kv_start must be an int >= 0 (the first key position attended), got {kv_start!r}")


def rope_score_bias(rope_ab: torch.Tensor, rope_inv_freq: torch.Tensor, tk: int) -> torch.Tensor:
    """float32 [B, Hq, Tq, tk]: rq::attention's `rope_ab` term for key slots 0..tk-1 (before `sm_scale`)."""
    half = rope_inv_freq.numel()
    if rope_ab.shape[-1] != 2 * half:
        raise ValueError(f"rope_ab has {rope_ab.shape[-1]} weights per query, expected 2 x {half} (rope_inv_freq)")
    slots = torch.arange(tk, device=rope_ab.device, dtype=torch.float32)
    angles = slots[:, None] * rope_inv_freq.float().to(rope_ab.device)  # [tk, h], float32(j) * theta_i
    ab = rope_ab.float()
    return ab[..., :half] @ angles.cos().T + ab[..., half:] @ angles.sin().T


def _with_score_bias(attn_mask: torch.Tensor | None, bias: torch.Tensor) -> torch.Tensor:
    """An additive float mask: `bias` where `attn_mask` (bool / additive float / None) lets a key through."""
    if attn_mask is None:
        return bias
    if attn_mask.dtype == torch.bool:
        return bias.masked_fill(~attn_mask, float("-inf"))
    return bias + attn_mask.float()


def layout_args(state: quantizer.QuantState) -> tuple[int, torch.Tensor | None, list[int] | None]:
    """(bits, perm, widths) as the rq ops take them: a uniform state passes only `bits`."""
    if state.uniform:
        return state.widths[0], None, None
    return max(state.widths), state.perm, list(state.widths)


def quantize_state(x: torch.Tensor, state: quantizer.QuantState) -> tuple[torch.Tensor, torch.Tensor]:
    """rq::quantize with one QuantState's parameters."""
    bits, perm, widths = layout_args(state)
    return torch.ops.rq.quantize(
        x, state.rotation, state.mean, state.scale, state.levels, bits, state.group, perm, widths
    )


def dequantize_state(
    codes: torch.Tensor, norms: torch.Tensor, state: quantizer.QuantState, dtype: torch.dtype
) -> torch.Tensor:
    """rq::dequantize with one QuantState's parameters."""
    bits, perm, widths = layout_args(state)
    return torch.ops.rq.dequantize(
        codes,
        norms,
        state.rotation,
        state.mean,
        state.scale,
        state.levels,
        bits,
        state.head_dim,
        dtype,
        perm,
        widths,
        state.along_keys,
    )


def attention_state(
    q: torch.Tensor,
    k_codes: torch.Tensor,
    k_norms: torch.Tensor,
    v_codes: torch.Tensor,
    v_norms: torch.Tensor,
    k: quantizer.QuantState,
    v: quantizer.QuantState,
    attn_mask: torch.Tensor | None = None,
    sm_scale: float | None = None,
    kv_len: torch.Tensor | None = None,
) -> torch.Tensor:
    """rq::attention with two QuantStates' parameters."""
    return torch.ops.rq.attention(
        *_state_args(q, k_codes, k_norms, v_codes, v_norms, k, v, attn_mask, sm_scale, kv_len)
    )


def attention_lse_state(
    q: torch.Tensor,
    k_codes: torch.Tensor,
    k_norms: torch.Tensor,
    v_codes: torch.Tensor,
    v_norms: torch.Tensor,
    k: quantizer.QuantState,
    v: quantizer.QuantState,
    attn_mask: torch.Tensor | None = None,
    sm_scale: float | None = None,
    kv_len: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """rq::attention_lse with two QuantStates' parameters."""
    return torch.ops.rq.attention_lse(
        *_state_args(q, k_codes, k_norms, v_codes, v_norms, k, v, attn_mask, sm_scale, kv_len)
    )


def _state_args(q, k_codes, k_norms, v_codes, v_norms, k, v, attn_mask, sm_scale, kv_len) -> tuple:
    """rq::attention's / rq::attention_lse's arguments from two QuantStates (sm_scale None: 1/sqrt(d)); no rope
    term."""
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    k_bits, k_perm, k_widths = layout_args(k)
    v_bits, v_perm, v_widths = layout_args(v)
    return (
        q,
        k_codes,
        k_norms,
        v_codes,
        v_norms,
        k.rotation,
        k.scale,
        k.levels,
        v.rotation,
        v.mean,
        v.scale,
        v.levels,
        k_bits,
        v_bits,
        attn_mask,
        sm_scale,
        kv_len,
        k_perm,
        v_perm,
        k_widths,
        v_widths,
        None,
        None,
        v.along_keys,
    )


# CUDA: Triton implementations (eager, torch.compile and AOTInductor); CPU keeps the reference above.
try:
    from rqcompile.kernels import register as _register_kernels
except ImportError:  # pragma: no cover - no triton
    pass
else:
    _register_kernels()
