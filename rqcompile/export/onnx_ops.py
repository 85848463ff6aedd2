"""ONNX translations of rq::quantize / rq::dequantize / rq::attention / rq::attention_lse for
`torch.onnx.export(dynamo=True)`.

Each translation is a plain Python function over `onnxscript.opset18` ops (the `@onnxscript.script` form fails for
multi-output ops, see DESIGN.md §4); the exporter calls it with symbolic tensors for tensor arguments and Python
values for `bits`, `group`, `head_dim`, `dtype`, `sm_scale`. The math follows docs/FORMAT.md and
`rqcompile.quant.quantizer` step by step so codes match the reference bit for bit except at exact decision ties.

Two flavours, differing only in how codes are packed and unpacked:

- ``standard``: BitShift / BitwiseAnd / BitwiseOr on uint8 (onnxruntime).
- ``tensorrt``: no bitwise ops (the TensorRT ONNX parser has none) and uint8 only where a graph input is cast to
  int32 or a result is cast to uint8 for a graph output (TensorRT allows UINT8 only as network I/O); unpacking is
  int32 Div/Mod, packing a float multiply-add of the codes, lookups are Gather. No custom domains.

Static sizes (heads, head_dim, rotation blocks) are read from the quant-state tensors, which are initializers with
known shapes; batch and sequence lengths stay dynamic (Reshape uses 0 = "copy this dim").

A calibrated bit allocation's layout (the ops' trailing `perm` / `widths` arguments) is translated too: `perm`
[H, d] reorders channels per head by one Gather over the flattened (head, channel) axis (the inverse order, for
outputs, by a ScatterElements of the small index vector), and each run of equal widths is packed and unpacked by its
own bit planes at its byte offset, its codes indexing its own slice of `levels` (one Gather with per-coordinate
codebook offsets). Uniform states (no layout arguments) translate to exactly the graphs they always did.

rq::attention / rq::attention_lse's optional `rope_ab` [B, Hq, Tq, 2h] / `rope_inv_freq` [h] (a pre-RoPE key
offset's score term, `RQConfig.rope_key_mean`) add sum_i rope_ab[..., i] cos(j theta_i) + rope_ab[..., h + i]
sin(j theta_i) for the key at cache slot j to the materialized scores before `sm_scale` (and so to the lse), with
Range / Cos / Sin / MatMul, the same ops in both flavours; without them the graph is exactly what it was before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from onnxscript import opset18 as op

from rqcompile.quant.packing import packed_size, planes, runs

Runs = tuple[tuple[int, int, int], ...]  # (width, start, count) of each run of equal widths

FLAVOURS = ("standard", "tensorrt")

# ONNX TensorProto element types used here.
_FLOAT, _UINT8, _INT32, _INT64, _FLOAT16 = 1, 2, 6, 7, 10
_TORCH_TO_ONNX = {torch.float32: 1, torch.float16: 10, torch.bfloat16: 16, torch.float64: 11}
_TINY = float(torch.finfo(torch.float32).tiny)
# Rotation blocks up to this size are applied by broadcast-multiply + ReduceSum, larger ones (hadamard) by MatMul.
_ELEMENTWISE_MAX_BLOCK = 4


def _ints(*values: int) -> Any:
    return op.Constant(value_ints=list(values))


def _onnx_dtype(dtype: Any) -> int:
    """The exporter passes `torch.dtype` arguments as onnx_ir DataType (an int enum); accept torch dtypes too."""
    if isinstance(dtype, torch.dtype):
        return _TORCH_TO_ONNX[dtype]
    return int(dtype)


def _static(dim: Any, what: str) -> int:
    if not isinstance(dim, int):
        raise ValueError(f"ONNX translation of rq ops needs a static {what}, got {dim!r}")
    return dim


def _rotate(u: Any, rotation: Any, dim: int, *, inverse: bool) -> Any:
    """Block-diagonal rotation of u [B, H, T, dim] by blocks [H, nb, b, b] (docs/FORMAT.md)."""
    heads, nb, b, _ = (_static(s, "rotation shape") for s in rotation.shape)
    padding = nb * b - dim
    if padding:
        u = op.Pad(u, _ints(0, 0, 0, 0, 0, 0, 0, padding))
    ub = op.Reshape(u, _ints(0, 0, 0, nb, b))  # [B, H, T, nb, b]
    if b <= _ELEMENTWISE_MAX_BLOCK:
        # y[..., j, i] = sum_k R[h, j, i, k] u[..., j, k]; inverse uses R[h, j, k, i].
        blocks = op.Transpose(rotation, perm=[0, 1, 3, 2]) if inverse else rotation
        prod = op.Mul(op.Unsqueeze(ub, _ints(4)), op.Unsqueeze(blocks, _ints(1)))  # [B, H, T, nb, b, b]
        y = op.ReduceSum(prod, _ints(-1), keepdims=0)
    else:
        # Row-vector form: y = u @ R^T (forward), u @ R (inverse), batched over [B, H, nb].
        blocks = rotation if inverse else op.Transpose(rotation, perm=[0, 1, 3, 2])
        ut = op.Transpose(ub, perm=[0, 1, 3, 2, 4])  # [B, H, nb, T, b]
        y = op.Transpose(op.MatMul(ut, blocks), perm=[0, 1, 3, 2, 4])
    y = op.Reshape(y, _ints(0, 0, 0, nb * b))
    if padding:
        y = op.Slice(y, _ints(0), _ints(dim), _ints(3))
    return y


def _per_head(t: Any) -> Any:
    """[H, d] -> [H, 1, d], broadcastable against [B, H, T, d]."""
    return op.Unsqueeze(t, _ints(1))


# --- packing -------------------------------------------------------------------------------------------------


def _pack_standard(codes: Any, bits: int, dim: int) -> Any:
    """Float codes [B, H, T, dim] -> uint8 bytes, with BitShift / BitwiseAnd / BitwiseOr."""
    codes = op.Cast(codes, to=_UINT8)
    out, shift = [], 0
    for width in planes(bits):
        per_byte = 8 // width
        plane = op.BitShift(codes, op.Constant(value=_u8(shift)), direction="RIGHT")
        plane = op.BitwiseAnd(plane, op.Constant(value=_u8((1 << width) - 1)))
        plane = op.Reshape(plane, _ints(0, 0, 0, dim // per_byte, per_byte))
        shifted = op.BitShift(plane, op.Constant(value=_u8(*[width * i for i in range(per_byte)])), direction="LEFT")
        byte = op.Gather(shifted, op.Constant(value_int=0), axis=4)
        for i in range(1, per_byte):
            byte = op.BitwiseOr(byte, op.Gather(shifted, op.Constant(value_int=i), axis=4))
        out.append(byte)
        shift += width
    return out[0] if len(out) == 1 else op.Concat(*out, axis=-1)


def _unpack_standard(packed: Any, bits: int, dim: int, offset: int = 0) -> Any:
    """uint8 bytes (from byte `offset`) -> int64 codes [B, H, T, dim], with BitShift / BitwiseAnd / BitwiseOr."""
    codes, start, shift = None, offset, 0
    for width in planes(bits):
        per_byte = 8 // width
        nbytes = dim // per_byte
        chunk = op.Slice(packed, _ints(start), _ints(start + nbytes), _ints(3))
        shifts = op.Constant(value=_u8(*[width * i for i in range(per_byte)]))
        plane = op.BitShift(op.Unsqueeze(chunk, _ints(4)), shifts, direction="RIGHT")
        plane = op.BitwiseAnd(plane, op.Constant(value=_u8((1 << width) - 1)))
        plane = op.Reshape(plane, _ints(0, 0, 0, dim))
        if shift:
            plane = op.BitShift(plane, op.Constant(value=_u8(shift)), direction="LEFT")
        codes = plane if codes is None else op.BitwiseOr(codes, plane)
        start += nbytes
        shift += width
    return op.Cast(codes, to=_INT64)


def _pack_tensorrt(codes: Any, bits: int, dim: int) -> Any:
    """Float codes -> uint8 bytes by exact float arithmetic (Floor / Mul / ReduceSum); the only uint8 is the Cast."""
    return op.Cast(_tensorrt_bytes(codes, bits, dim), to=_UINT8)


def _tensorrt_bytes(codes: Any, bits: int, dim: int) -> Any:
    """Float codes [B, H, T, dim] -> the packed byte values, still float (exact: integers below 256)."""
    out, rest = [], codes
    for width in planes(bits):
        per_byte = 8 // width
        if width == bits:
            plane = rest
        else:  # split off the low `width` bits: high = floor(c / 2^w), low = c - 2^w * high
            high = op.Floor(op.Mul(rest, op.Constant(value_float=1.0 / (1 << width))))
            plane = op.Sub(rest, op.Mul(high, op.Constant(value_float=float(1 << width))))
            rest = high
        plane = op.Reshape(plane, _ints(0, 0, 0, dim // per_byte, per_byte))
        weights = op.Constant(value_floats=[float(1 << (width * i)) for i in range(per_byte)])
        out.append(op.ReduceSum(op.Mul(plane, weights), _ints(-1), keepdims=0))
    return out[0] if len(out) == 1 else op.Concat(*out, axis=-1)


def _unpack_tensorrt(packed: Any, bits: int, dim: int) -> Any:
    """uint8 bytes -> int32 codes: one Cast to int32, then Div / Mod per bit plane (no bitwise ops)."""
    return _unpack_int32(op.Cast(packed, to=_INT32), bits, dim)


def _unpack_int32(data: Any, bits: int, dim: int, offset: int = 0) -> Any:
    """int32 byte values (from byte `offset`) -> int32 codes [B, H, T, dim] by Div / Mod per bit plane."""
    codes, start, scale = None, offset, 1
    for width in planes(bits):
        per_byte = 8 // width
        nbytes = dim // per_byte
        chunk = op.Unsqueeze(op.Slice(data, _ints(start), _ints(start + nbytes), _ints(3)), _ints(4))
        divisors = op.Cast(_ints(*[1 << (width * i) for i in range(per_byte)]), to=_INT32)
        plane = op.Mod(op.Div(chunk, divisors), op.Cast(_ints(1 << width), to=_INT32))
        plane = op.Reshape(plane, _ints(0, 0, 0, dim))
        if scale != 1:
            plane = op.Mul(plane, op.Cast(_ints(scale), to=_INT32))
        codes = plane if codes is None else op.Add(codes, plane)
        start += nbytes
        scale <<= width
    return codes


def _u8(*values: int) -> Any:
    """A uint8 constant tensor (1-D, or a scalar for one value)."""
    import numpy as np
    import onnx_ir as ir

    array = np.array(values if len(values) > 1 else values[0], dtype=np.uint8)
    return ir.tensor(array)


_PACK = {"standard": (_pack_standard, _unpack_standard), "tensorrt": (_pack_tensorrt, _unpack_tensorrt)}


# --- calibrated bit allocation: runs of widths and the per-head channel order ----------------------------------


def _runs(widths: list[int] | None, dim: int) -> Runs | None:
    """(width, start, count) of each run of a mixed layout; None when the op got no `widths` (uniform)."""
    if widths is None:
        return None
    if len(widths) != dim:
        raise ValueError(f"layout has {len(widths)} widths for head_dim {dim}")
    return runs(tuple(int(w) for w in widths))


def _codebook_size(layout: Runs) -> int:
    return sum(2**width for width, _, _ in layout)


def _level_offsets(layout: Runs, index_type: int, shape: tuple[int, ...]) -> Any:
    """Per stored coordinate, where its run's codebook starts in `levels`: an index constant of `shape`."""
    import onnx

    values, level = [], 0
    for width, _, count in layout:
        values += [level] * count
        level += 2**width
    return op.Constant(value=onnx.helper.make_tensor("level_offsets", index_type, list(shape), values))


def _pack_layout(codes: Any, layout: Runs, flavour: str) -> Any:
    """Float codes [B, H, T, d] -> uint8 bytes, each run packed by its own bit planes, runs in order."""
    parts = []
    for width, start, count in layout:
        piece = op.Slice(codes, _ints(start), _ints(start + count), _ints(3))
        parts.append(
            _pack_standard(piece, width, count) if flavour == "standard" else _tensorrt_bytes(piece, width, count)
        )
    packed = op.Concat(*parts, axis=-1)
    return packed if flavour == "standard" else op.Cast(packed, to=_UINT8)  # one uint8 Cast, for the output


def _layout_indices(packed: Any, layout: Runs, flavour: str) -> Any:
    """uint8 bytes -> indices into `levels` [B, H, T, d]: each run unpacked at its byte offset, plus the start of its
    codebook (int64 for onnxruntime, int32 for TensorRT)."""
    data = op.Cast(packed, to=_INT32) if flavour == "tensorrt" else packed
    parts, offset = [], 0
    for width, _, count in layout:
        unpack = _unpack_int32 if flavour == "tensorrt" else _unpack_standard
        parts.append(unpack(data, width, count, offset))
        offset += count * width // 8
    index_type = _INT32 if flavour == "tensorrt" else _INT64
    dim = sum(count for _, _, count in layout)
    return op.Add(op.Concat(*parts, axis=-1), _level_offsets(layout, index_type, (dim,)))


def _run_codes(flat: Any, levels: Any, layout: Runs) -> Any:
    """Float codes of coordinates [..., d]: each run's count of its own codebook's decision boundaries exceeded."""
    parts, level = [], 0
    for width, start, count in layout:
        piece = op.Slice(flat, _ints(start), _ints(start + count), _ints(-1))
        parts.append(_boundary_codes(piece, _boundaries(levels, 2**width, level)))
        level += 2**width
    return op.Concat(*parts, axis=-1)


def _layout_codes(unit: Any, levels: Any, layout: Runs, groups: int, searched: int, index_type: int) -> Any:
    """Float codes [B, H, T, G, g] of the unit groups under a mixed layout; with scale candidates, the search of
    `_search_codes` (largest cosine per norm group, the first candidate on ties), candidates on axis 3 here."""
    dim = sum(count for _, _, count in layout)
    size, g = _codebook_size(layout), dim // groups
    flat = op.Reshape(unit, _ints(0, 0, 0, dim))
    if not searched:
        return op.Reshape(_run_codes(flat, levels, layout), _ints(0, 0, 0, groups, g))
    candidates = op.Reshape(op.Slice(levels, _ints(size), _ints(size + searched), _ints(0)), _ints(searched, 1))
    codes = _run_codes(op.Div(op.Unsqueeze(flat, _ints(-2)), candidates), levels, layout)  # [B, H, T, A, d]
    chosen = op.Gather(levels, op.Add(op.Cast(codes, to=index_type), _level_offsets(layout, index_type, (dim,))))
    chosen = op.Reshape(chosen, _ints(0, 0, 0, searched, groups, g))
    dot = op.ReduceSum(op.Mul(op.Unsqueeze(unit, _ints(3)), chosen), _ints(-1), keepdims=0)  # [B, H, T, A, G]
    length = op.Sqrt(op.ReduceSum(op.Mul(chosen, chosen), _ints(-1), keepdims=0))
    cosine = op.Div(dot, op.Max(length, op.Constant(value_float=_TINY)))
    best = op.Cast(op.GreaterOrEqual(cosine, op.ReduceMax(cosine, _ints(3), keepdims=1)), to=_FLOAT)
    order = op.Unsqueeze(op.Constant(value=_float_tensor([float(searched - i) for i in range(searched)])), _ints(1))
    first = op.Mul(best, order)
    pick = op.Cast(op.Equal(first, op.ReduceMax(first, _ints(3), keepdims=1)), to=_FLOAT)  # one-hot on axis 3
    codes = op.Reshape(codes, _ints(0, 0, 0, searched, groups, g))
    return op.ReduceSum(op.Mul(codes, op.Unsqueeze(pick, _ints(-1))), _ints(3), keepdims=0)


def _channel_index(perm: Any, heads: int, dim: int) -> Any:
    """Flat gather index over (head, channel) [H*d]: position (h, j) reads channel perm[h, j] of head h."""
    import onnx

    offsets = onnx.helper.make_tensor("head_offsets", _INT64, [heads, 1], [h * dim for h in range(heads)])
    return op.Reshape(op.Add(op.Cast(perm, to=_INT64), op.Constant(value=offsets)), _ints(heads * dim))


def _inverse_index(index: Any, size: int) -> Any:
    """The inverse of a flat permutation index: position index[i] reads i (every slot is written once)."""
    positions = _ints(*range(size))
    return op.ScatterElements(positions, index, positions, axis=0)


def _gather_channels(u: Any, index: Any, heads: int, dim: int) -> Any:
    """u [B, H, T, d] with its channels reordered per head by a flat (head, channel) index (`_channel_index`)."""
    flat = op.Reshape(op.Transpose(u, perm=[0, 2, 1, 3]), _ints(0, 0, heads * dim))  # [B, T, H*d]
    picked = op.Reshape(op.Gather(flat, index, axis=2), _ints(0, 0, heads, dim))
    return op.Transpose(picked, perm=[0, 2, 1, 3])


def _permute(u: Any, perm: Any, heads: int, dim: int, *, inverse: bool = False) -> Any:
    """`rqcompile.quant.quantizer._permute`: channels in `perm` order per head (or back), identity for None."""
    if perm is None:
        return u
    index = _channel_index(perm, heads, dim)
    return _gather_channels(u, _inverse_index(index, heads * dim) if inverse else index, heads, dim)


# --- the three ops ---------------------------------------------------------------------------------------------


def _boundaries(levels: Any, count: int, start: int = 0) -> Any:
    """(cb[1:] + cb[:-1]) * 0.5 of the codebook cb = levels[start : start + count], as the reference computes them."""
    upper = op.Slice(levels, _ints(start + 1), _ints(start + count), _ints(0))
    lower = op.Slice(levels, _ints(start), _ints(start + count - 1), _ints(0))
    return op.Mul(op.Add(upper, lower), op.Constant(value_float=0.5))


def _boundary_codes(u: Any, bounds: Any) -> Any:
    """Float codes of u [...] against the boundaries [L - 1], `rqcompile.quant.quantizer.boundary_codes`: the count
    of boundaries exceeded, a u exactly on one rounding toward zero (below 0 it counts the boundary)."""
    u = op.Unsqueeze(u, _ints(-1))
    on_below_zero = op.And(op.Less(u, op.Constant(value_float=0.0)), op.Equal(u, bounds))  # (no bool Where in ORT)
    above = op.Or(op.Greater(u, bounds), on_below_zero)
    return op.ReduceSum(op.Cast(above, to=_FLOAT), _ints(-1), keepdims=0)


def _search_codes(unit: Any, levels: Any, count: int, searched: int, index_type: int) -> Any:
    """Scale search (docs/FORMAT.md), as `rqcompile.quant.quantizer._search_codes`: the codes of `unit / c` for the
    candidate c with the largest cosine to `unit`, the first one on ties. Float codes [B, H, T, G, g]; no ArgMax
    (its int64 output): the first maximum is found by weighting ties with decreasing constants."""
    candidates = op.Reshape(op.Slice(levels, _ints(count), _ints(count + searched), _ints(0)), _ints(searched, 1))
    scaled = op.Div(op.Unsqueeze(unit, _ints(-2)), candidates)  # [B, H, T, G, A, g]
    codes = _boundary_codes(scaled, _boundaries(levels, count))  # [B, H, T, G, A, g]
    chosen = op.Gather(levels, op.Cast(codes, to=index_type), axis=0)
    dot = op.ReduceSum(op.Mul(op.Unsqueeze(unit, _ints(-2)), chosen), _ints(-1), keepdims=0)  # [B, H, T, G, A]
    length = op.Sqrt(op.ReduceSum(op.Mul(chosen, chosen), _ints(-1), keepdims=0))
    cosine = op.Div(dot, op.Max(length, op.Constant(value_float=_TINY)))
    best = op.Cast(op.GreaterOrEqual(cosine, op.ReduceMax(cosine, _ints(-1), keepdims=1)), to=_FLOAT)
    first = op.Mul(best, op.Constant(value=_float_tensor([float(searched - i) for i in range(searched)])))
    pick = op.Cast(op.Equal(first, op.ReduceMax(first, _ints(-1), keepdims=1)), to=_FLOAT)  # one-hot [.., A]
    return op.ReduceSum(op.Mul(codes, op.Unsqueeze(pick, _ints(-1))), _ints(-2), keepdims=0)


def _float_tensor(values: list[float]) -> Any:
    import onnx

    return onnx.helper.make_tensor("values", onnx.TensorProto.FLOAT, [len(values)], values)


def _dequantize_rotated(
    codes: Any, norms: Any, levels: Any, bits: int, dim: int, groups: int, flavour: str, layout: Runs | None = None
) -> Any:
    """codebook[code] * norm in the rotated space, float32 [B, H, T, dim] (`layout`: a mixed one's runs)."""
    index = _PACK[flavour][1](codes, bits, dim) if layout is None else _layout_indices(codes, layout, flavour)
    values = op.Gather(levels, index, axis=0)
    values = op.Reshape(values, _ints(0, 0, 0, groups, dim // groups))
    scaled = op.Mul(values, op.Unsqueeze(op.Cast(norms, to=_FLOAT), _ints(-1)))
    return op.Reshape(scaled, _ints(0, 0, 0, dim))


def make_quantize(flavour: str = "standard") -> Callable[..., tuple[Any, Any]]:
    """Translation of rq::quantize: x [B, H, T, d] -> (codes uint8, corrected norms fp16)."""
    _check_flavour(flavour)

    def rq_quantize(x, rotation, mean, scale, levels, bits: int, group: int, perm=None, widths=None):
        heads, dim = (_static(s, "mean shape [H, d]") for s in mean.shape)
        layout = _runs(widths, dim)
        if layout is None:
            packed_size(dim, bits)
        count = 2**bits if layout is None else _codebook_size(layout)
        u = op.Div(op.Sub(op.Cast(x, to=_FLOAT), _per_head(mean)), _per_head(scale))
        u = _permute(u, perm, heads, dim)
        y = op.Reshape(_rotate(u, rotation, dim, inverse=False), _ints(0, 0, 0, dim // group, group))
        norm = op.Sqrt(op.ReduceSum(op.Mul(y, y), _ints(-1), keepdims=1))  # [B, H, T, G, 1]
        safe = op.Max(norm, op.Constant(value_float=_TINY))
        unit = op.Where(op.Greater(norm, op.Constant(value_float=0.0)), op.Div(y, safe), op.Constant(value_float=0.0))
        index_type = _INT32 if flavour == "tensorrt" else _INT64
        searched = _static(levels.shape[0], "levels length") - count  # scale candidates after the codebook
        if layout is not None:
            codes = _layout_codes(unit, levels, layout, dim // group, searched, index_type)
            index = op.Add(op.Cast(codes, to=index_type), _level_offsets(layout, index_type, (dim // group, group)))
        elif searched:
            codes = _search_codes(unit, levels, count, searched, index_type)
            index = op.Cast(codes, to=index_type)
        else:
            codes = _boundary_codes(unit, _boundaries(levels, count))  # float codes [B, H, T, G, g]
            index = op.Cast(codes, to=index_type)
        chosen = op.Gather(levels, index, axis=0)
        chosen_norm = op.Sqrt(op.ReduceSum(op.Mul(chosen, chosen), _ints(-1), keepdims=0))
        corrected = op.Div(op.Squeeze(norm, _ints(-1)), op.Max(chosen_norm, op.Constant(value_float=_TINY)))
        flat_codes = op.Reshape(codes, _ints(0, 0, 0, dim))
        if layout is None:
            packed = _PACK[flavour][0](flat_codes, bits, dim)
        else:
            packed = _pack_layout(flat_codes, layout, flavour)
        return packed, op.Cast(corrected, to=_FLOAT16)

    return rq_quantize


def _refuse_along_keys(along_keys: bool) -> None:
    if along_keys:
        raise ValueError(
            "the ONNX / TensorRT translations read codes packed per token; programs storing V along keys are "
            "exported through passes.values_per_token (export_lm does it), not translated as they are"
        )


def make_dequantize(flavour: str = "standard") -> Callable[..., Any]:
    """Translation of rq::dequantize: (codes, norms) -> x [B, H, T, head_dim] in `dtype`."""
    _check_flavour(flavour)

    def rq_dequantize(
        codes,
        norms,
        rotation,
        mean,
        scale,
        levels,
        bits: int,
        head_dim: int,
        dtype,
        perm=None,
        widths=None,
        along_keys: bool = False,
    ):
        _refuse_along_keys(along_keys)
        groups = _static(norms.shape[-1], "number of norm groups")
        heads = _static(mean.shape[0], "mean shape [H, d]")
        y = _dequantize_rotated(codes, norms, levels, bits, head_dim, groups, flavour, _runs(widths, head_dim))
        u = _permute(_rotate(y, rotation, head_dim, inverse=True), perm, heads, head_dim, inverse=True)
        return op.Cast(op.Add(op.Mul(u, _per_head(scale)), _per_head(mean)), to=_onnx_dtype(dtype))

    return rq_dequantize


def make_attention(flavour: str = "standard", *, with_lse: bool = False) -> Callable[..., Any]:
    """Translation of rq::attention (SDPA over the compressed cache in the rotated space, GQA by head grouping), or
    with `with_lse` of rq::attention_lse: the same output and each query row's log-sum-exp (float32 [B, Hq, Tq], -inf
    for a fully masked row), from the same scores. With `rope_ab` / `rope_inv_freq` (None when the op call has no
    such arguments) each key slot j's term sum_i rope_ab[..., i] cos(j theta_i) + rope_ab[..., h + i] sin(j theta_i)
    joins the scores before `sm_scale` and masking, as in `rqcompile.ops.reference_attention`. The parameters are
    spelled out: the exporter maps them to the op's inputs and attributes by name."""
    _check_flavour(flavour)

    def rq_attention(
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
        k_bits: int,
        v_bits: int,
        attn_mask,
        sm_scale: float,
        kv_len=None,
        k_perm=None,
        v_perm=None,
        k_widths=None,
        v_widths=None,
        rope_ab=None,
        rope_inv_freq=None,
        v_along_keys: bool = False,
        kv_start: int = 0,
        rope_table=None,  # the CUDA decode kernel's cos / sin (passes.rope_table): computed from rope_inv_freq here
    ):
        _refuse_along_keys(v_along_keys)
        out, scores = _attention(
            flavour,
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
            kv_len,
            k_perm,
            v_perm,
            k_widths,
            v_widths,
            rope_ab,
            rope_inv_freq,
            kv_start,
        )
        return (out, _logsumexp(scores)) if with_lse else out

    return rq_attention


def _logsumexp(scores: Any) -> Any:
    """log(sum(exp(scores))) over the last axis, shifted by the row max (0 for an all -inf row, so that row gives
    log(0) = -inf and no NaN); ReduceLogSumExp would overflow without the shift."""
    top = op.ReduceMax(scores, _ints(-1), keepdims=1)
    top = op.Where(op.Equal(top, op.Constant(value_float=float("-inf"))), op.Constant(value_float=0.0), top)
    total = op.ReduceSum(op.Exp(op.Sub(scores, top)), _ints(-1), keepdims=1)
    return op.Squeeze(op.Add(op.Log(total), top), _ints(-1))


def _rope_score_bias(scores: Any, rope_ab: Any, rope_inv_freq: Any) -> Any:
    """`rqcompile.ops.rope_score_bias`: float32 [B, Hq, Tq, Tk], the score term of the key at cache slot j,
    sum_i rope_ab[..., i] cos(a_ij) + rope_ab[..., h + i] sin(a_ij) with a_ij = float32(j) * rope_inv_freq[i].

    The slots 0..Tk-1 come from the scores' (dynamic) last dim by Range, cast to float32 (exact below 2^24, as the
    reference's float32 arange); cos and sin of the angles [Tk, h] are concatenated to [Tk, 2h] so the whole term is
    one MatMul with `rope_ab`. Shape / Squeeze / Range / Cast / Mul / Cos / Sin / Concat / Transpose / MatMul: valid
    in both flavours (all on float32 or int64 data, none on uint8)."""
    if rope_ab is None or rope_inv_freq is None:
        raise ValueError("rq::attention takes rope_ab and rope_inv_freq together (one of them is missing)")
    half = _static(rope_inv_freq.shape[0], "rope_inv_freq length")
    weights = rope_ab.shape[-1]
    if isinstance(weights, int) and weights != 2 * half:
        raise ValueError(f"rope_ab has {weights} weights per query, expected 2 x {half} (rope_inv_freq)")
    tk = op.Squeeze(op.Shape(scores, start=3, end=4), _ints(0))  # scalar int64: the cache length
    slots = op.Cast(op.Range(op.Constant(value_int=0), tk, op.Constant(value_int=1)), to=_FLOAT)  # [Tk]
    angles = op.Mul(op.Unsqueeze(slots, _ints(1)), op.Cast(rope_inv_freq, to=_FLOAT))  # [Tk, h]
    trig = op.Concat(op.Cos(angles), op.Sin(angles), axis=1)  # [Tk, 2h]
    return op.MatMul(op.Cast(rope_ab, to=_FLOAT), op.Transpose(trig, perm=[1, 0]))


def _attention(
    flavour: str,
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
    k_bits: int,
    v_bits: int,
    attn_mask,
    sm_scale: float,
    kv_len=None,
    k_perm=None,
    v_perm=None,
    k_widths=None,
    v_widths=None,
    rope_ab=None,
    rope_inv_freq=None,
    kv_start: int = 0,
) -> tuple[Any, Any]:
    """rq::attention's output in q's dtype and its masked scores [B, Hq, Tq, Tk] (float32), the `rope_ab` term
    (`_rope_score_bias`) included when given."""
    kv_heads, dim = (_static(s, "k_scale shape [H, d]") for s in k_scale.shape)
    q_heads = _static(q.shape[1], "number of query heads")
    k_groups = _static(k_norms.shape[-1], "number of key norm groups")
    v_groups = _static(v_norms.shape[-1], "number of value norm groups")
    # [B, Hq, Tq, d] -> [B, Hkv, rep*Tq, d]: query heads of one KV head side by side (same as the reference).
    qf = op.Reshape(op.Cast(q, to=_FLOAT), _ints(0, kv_heads, -1, dim))
    q_rot = _rotate(_permute(op.Mul(qf, _per_head(k_scale)), k_perm, kv_heads, dim), k_rotation, dim, inverse=False)
    k_layout, v_layout = _runs(k_widths, dim), _runs(v_widths, dim)
    k_rot = _dequantize_rotated(k_codes, k_norms, k_levels, k_bits, dim, k_groups, flavour, k_layout)
    v_rot = _dequantize_rotated(v_codes, v_norms, v_levels, v_bits, dim, v_groups, flavour, v_layout)
    scores = op.Mul(op.MatMul(q_rot, op.Transpose(k_rot, perm=[0, 1, 3, 2])), op.Constant(value_float=sm_scale))
    scores = op.Reshape(scores, _ints(0, q_heads, -1, 0))  # [B, Hq, Tq, Tk]
    if rope_ab is not None or rope_inv_freq is not None:
        bias = _rope_score_bias(scores, rope_ab, rope_inv_freq)
        scores = op.Add(scores, op.Mul(bias, op.Constant(value_float=sm_scale)))
    if attn_mask is not None:
        if attn_mask.dtype is not None and int(attn_mask.dtype) == 9:  # BOOL: True = attend
            scores = op.Where(attn_mask, scores, op.Constant(value_float=float("-inf")))
        else:
            scores = op.Add(scores, op.Cast(attn_mask, to=_FLOAT))
    if kv_len is not None or kv_start:
        scores = op.Where(_key_range(scores, kv_len, kv_start), scores, op.Constant(value_float=float("-inf")))
    probs = op.Softmax(scores, axis=-1)
    probs = op.Where(op.IsNaN(probs), op.Constant(value_float=0.0), probs)  # a fully masked row attends nothing
    acc = op.MatMul(op.Reshape(probs, _ints(0, kv_heads, -1, 0)), v_rot)  # [B, Hkv, rep*Tq, d]
    out = _permute(_rotate(acc, v_rotation, dim, inverse=True), v_perm, kv_heads, dim, inverse=True)
    out = op.Add(op.Mul(out, _per_head(v_scale)), _per_head(v_mean))
    return op.Cast(op.Reshape(out, _ints(0, q_heads, -1, dim)), to=_onnx_dtype(q.dtype)), scores


def _key_range(scores: Any, kv_len: Any, kv_start: int) -> Any:
    """bool [B or 1, 1, 1, Tk]: key slots j with kv_start <= j < kv_len[b] (`rqcompile.ops.mask_with_key_range`), the
    slots from the scores' (dynamic) last dim by Range; int64 compares, valid in both flavours. With a mask, kv_len
    only repeats what it says; without one (a decode step's key range) it is the mask."""
    tk = op.Squeeze(op.Shape(scores, start=3, end=4), _ints(0))
    slots = op.Range(op.Constant(value_int=0), tk, op.Constant(value_int=1))  # [Tk] int64
    valid = op.GreaterOrEqual(slots, op.Constant(value_int=int(kv_start)))
    if kv_len is not None:
        below = op.Less(op.Unsqueeze(slots, _ints(0)), op.Unsqueeze(op.Cast(kv_len, to=_INT64), _ints(1)))
        valid = op.And(valid, below)  # [B, Tk]
    else:
        valid = op.Unsqueeze(valid, _ints(0))
    return op.Unsqueeze(valid, _ints(1, 2))


def _check_flavour(flavour: str) -> None:
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown ONNX flavour {flavour!r}; choose one of {FLAVOURS}")


def translation_table(flavour: str = "standard") -> dict[Any, Callable[..., Any]]:
    """`custom_translation_table` for torch.onnx.export covering the rq ops."""
    import rqcompile.ops  # noqa: F401  (registers torch.ops.rq.*)

    return {
        torch.ops.rq.quantize.default: make_quantize(flavour),
        torch.ops.rq.dequantize.default: make_dequantize(flavour),
        torch.ops.rq.attention.default: make_attention(flavour),
        torch.ops.rq.attention_lse.default: make_attention(flavour, with_lse=True),
    }


def export_onnx(
    module: torch.nn.Module,
    args: tuple[Any, ...],
    path: str | Any,
    *,
    flavour: str = "standard",
    dynamic_shapes: Any = None,
    opset: int = 18,
) -> Any:
    """torch.onnx.export(dynamo=True) with the rq translations; the TensorRT flavour is widened and checked.

    Returns the saved path. Buffers of `module` become initializers (the quant state travels inside the graph).
    """
    from pathlib import Path

    path = Path(path)
    program = torch.onnx.export(
        module,
        args,
        dynamo=True,
        opset_version=opset,
        dynamic_shapes=dynamic_shapes,
        custom_translation_table=translation_table(flavour),
        verbose=False,
    )
    program.save(str(path))
    if flavour == "tensorrt":
        import onnx

        from rqcompile.export.onnx_rewrite import widen_uint8
        from rqcompile.export.tensorrt_check import assert_tensorrt_ready

        # Cache writes / slices of packed codes are uint8 in the exported graph; TensorRT wants uint8 only at I/O.
        model = widen_uint8(onnx.load(str(path), load_external_data=False))  # weights stay where they were saved
        onnx.save(model, str(path))
        assert_tensorrt_ready(path)
    return path
