"""Triton kernels against the reference quantizer.

Without CUDA the kernels run under TRITON_INTERPRET=1 on CPU tensors at small sizes (part of the normal suite);
the `gpu` tests run them through the rq ops on CUDA at real sizes. Every check draws fresh random inputs; outputs
come from torch.empty in the launchers, and on CUDA the caching allocator's memory is filled with NaN before each
run so an unwritten element shows; NaN never passes. Codes may differ from the reference only exactly at decision
boundaries (rounding of the rotation/norm sums): their rate is bounded and a differing code is off by one.
"""

from __future__ import annotations

import importlib
import math
import os
from dataclasses import replace

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # also set by conftest.py, before any kernel module is imported

import triton  # noqa: E402,F401  (a dev dependency: a missing triton must fail, not skip)

import rqcompile.ops  # noqa: E402,F401
from rqcompile.config import RQConfig  # noqa: E402
from rqcompile.kernels import attention as kattn  # noqa: E402
from rqcompile.kernels import quantize as kquant  # noqa: E402
from rqcompile.quant import quantizer  # noqa: E402
from rqcompile.quant.packing import unpack  # noqa: E402
from rqcompile.quant.rotations import rotate  # noqa: E402

if not HAS_CUDA:  # make sure the @triton.jit functions were built in interpreter mode
    kquant = importlib.reload(kquant)
    kattn = importlib.reload(kattn)


@pytest.fixture(autouse=True)
def _interpret_mode(monkeypatch):
    """Rebuild the kernels in interpreter mode right before each CPU test (earlier tests may have imported triton
    state that makes module-import-time decoration stale)."""
    global kquant, kattn
    if not HAS_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        kquant = importlib.reload(kquant)
        kattn = importlib.reload(kattn)


MAX_FLIPPED_GROUPS = 2e-3  # fraction of norm groups whose codes may differ from the reference (float ties)


def _state(backend, bits, kind, heads, dim, device="cpu", calibrated=True, seed=0):
    st = quantizer.make_state(
        RQConfig(backend=backend, bits=bits, seed=seed), layer_idx=2, kind=kind, num_heads=heads, head_dim=dim
    )
    if calibrated:
        g = torch.Generator().manual_seed(seed + 17)
        st = replace(
            st, mean=torch.randn(heads, dim, generator=g) * 0.3, scale=torch.rand(heads, dim, generator=g) + 0.5
        )
    return st.to(device)


def _poison(device):
    """Fill the CUDA caching allocator's free memory with NaN, so unwritten kernel outputs show up as NaN."""
    if device == "cuda":
        junk = torch.empty(256 * 1024 * 1024, dtype=torch.float32, device="cuda")
        junk.fill_(float("nan"))
        del junk


def _check_codes(codes, norms, ref_codes, ref_norms, x, st):
    """The kernel's codes and norms equal the reference's, except in rare groups where float rounding tipped a
    decision (a code at a boundary, or the scale search's pick between two near-equal candidates); there the
    kernel's reconstruction must be as close to the input as the reference's."""
    bits, dim = st.bits, st.head_dim
    assert not torch.isnan(norms.float()).any()
    got, want = unpack(codes, bits, dim), unpack(ref_codes, bits, dim)
    flipped = (got != want).unflatten(-1, (st.num_groups, -1)).any(-1)  # groups where the two differ
    assert flipped.float().mean().item() <= MAX_FLIPPED_GROUPS
    rel = (norms.float() - ref_norms.float()).abs() / ref_norms.float().abs().clamp_min(1e-6)
    assert rel[~flipped].max().item() < 2e-3  # one fp16 rounding step
    if flipped.any():
        target = rotate((x.float() - st.mean[:, None]) / st.scale[:, None], st.rotation)
        target = target.unflatten(-1, (st.num_groups, -1))

        def group_error(c, n):
            rec = quantizer.dequantize_rotated(c, n, st.levels, bits, dim).unflatten(-1, (st.num_groups, -1))
            return (rec - target).pow(2).sum(-1)

        err, ref_err = group_error(codes, norms)[flipped], group_error(ref_codes, ref_norms)[flipped]
        scale = target.pow(2).sum(-1)[flipped]
        assert (err <= ref_err * 1.02 + 1e-4 * scale).all(), (err - ref_err).max()


def _quantize_case(backend, bits, dim, device, tokens, batch=2, heads=2, strided=True):
    st = _state(backend, bits, "k", heads, dim, device)
    x = torch.randn(batch, tokens, heads, dim, device=device) * 2
    x = x.transpose(1, 2) if strided else x.reshape(batch, heads, tokens, dim)
    _poison(device)
    if device == "cuda":
        codes, norms = torch.ops.rq.quantize(x, st.rotation, st.mean, st.scale, st.levels, bits, st.group)
    else:
        codes, norms = kquant.launch_quantize(x, st.rotation, st.mean, st.scale, st.levels, bits, st.group)
    ref_codes, ref_norms = quantizer.quantize(x, st.rotation, st.mean, st.scale, st.levels, bits, st.group)
    _check_codes(codes, norms, ref_codes, ref_norms, x, st)
    # dequantize of the reference codes
    _poison(device)
    if device == "cuda":
        out = torch.ops.rq.dequantize(
            ref_codes, ref_norms, st.rotation, st.mean, st.scale, st.levels, bits, dim, x.dtype
        )
    else:
        out = kquant.launch_dequantize(
            ref_codes, ref_norms, st.rotation, st.mean, st.scale, st.levels, bits, dim, x.dtype
        )
    ref = quantizer.dequantize(ref_codes, ref_norms, st.rotation, st.mean, st.scale, st.levels, bits, dim)
    assert not torch.isnan(out).any()
    assert ((out - ref).norm() / ref.norm()).item() < 1e-4


def _attention_case(backend, kb, vb, dim, device, tk, batch=2, heads=2, rep=3, tq=1, mask_kind=None, splits=None):
    ks, vs = _state(backend, kb, "k", heads, dim, device), _state(backend, vb, "v", heads, dim, device, seed=1)
    k = torch.randn(batch, heads, tk, dim, device=device) * 2
    v = torch.randn(batch, heads, tk, dim, device=device)
    kc, kn = quantizer.quantize(k, ks.rotation, ks.mean, ks.scale, ks.levels, kb, ks.group)
    vc, vn = quantizer.quantize(v, vs.rotation, vs.mean, vs.scale, vs.levels, vb, vs.group)
    q = torch.randn(batch, heads * rep, tq, dim, device=device)
    mask, kv_len = None, None
    if mask_kind == "bool":
        mask = torch.rand(batch, 1, 1, tk, device=device) > 0.3
        mask[0] = False  # fully masked rows: the reference gives V's mean there
    elif mask_kind == "float":
        mask = torch.randn(batch, heads * rep, tq, tk, device=device)
    elif mask_kind == "causal":
        mask = torch.ones(tq, tk, dtype=torch.bool, device=device).tril(tk - tq)
    elif mask_kind == "kv_len":
        kv_len = torch.randint(1, tk + 1, (batch,), device=device)
    sm = 1 / math.sqrt(dim)
    ref_mask = mask
    if kv_len is not None:
        ref_mask = torch.arange(tk, device=device)[None, None, None, :] < kv_len[:, None, None, None]
    ref = quantizer.rotated_attention(q, kc, kn, vc, vn, ks, vs, ref_mask, sm)
    args = (q, kc, kn, vc, vn, ks.rotation, ks.scale, ks.levels, vs.rotation, vs.mean, vs.scale, vs.levels, kb, vb)
    _poison(device)
    if device == "cuda" and kv_len is None and splits is None:
        out = torch.ops.rq.attention(*args, mask, sm)
    else:
        out = kattn.launch_attention(*args, mask, sm, kv_len=kv_len, num_splits=splits)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not torch.isnan(out).any()
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < 3e-3, err  # fp16 tensor-core operands, fp32 accumulation


# ---------------------------------------------------------------- CPU, TRITON_INTERPRET=1, small sizes


cpu_only = pytest.mark.skipif(HAS_CUDA, reason="interpreter tests run where there is no GPU")


@cpu_only
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("backend", ["planar", "iso", "rotor", "hadamard", "none"])
def test_quantize_interpret(backend, bits):
    _quantize_case(backend, bits, 64, "cpu", tokens=19)


@cpu_only
def test_quantize_interpret_two_groups_and_odd_rotor():
    _quantize_case("rotor", 3, 256, "cpu", tokens=5, batch=1, heads=1)  # 256 % 3 == 1, groups of 128
    _quantize_case("planar", 4, 32, "cpu", tokens=9, strided=False)


@cpu_only
def test_quantize_interpret_nan_propagates_into_norm():
    st = _state("planar", 3, "k", 2, 64)
    x = torch.randn(1, 2, 4, 64)
    x[0, 1, 2, 7] = float("nan")
    _, norms = kquant.launch_quantize(x, st.rotation, st.mean, st.scale, st.levels, 3, st.group)
    assert torch.isnan(norms[0, 1, 2]).all() and not torch.isnan(norms[0, 0]).any()


@cpu_only
@pytest.mark.parametrize(
    "backend,kb,vb,kw",
    [
        ("planar", 3, 3, {"splits": 3}),
        ("iso", 4, 2, {}),
        ("rotor", 2, 4, {"splits": 2}),
        ("hadamard", 3, 3, {}),
        ("planar", 3, 3, {"mask_kind": "bool", "splits": 3}),
        ("planar", 2, 2, {"mask_kind": "float", "tq": 3}),
        ("iso", 3, 3, {"mask_kind": "causal", "tq": 4, "splits": 2}),
        ("planar", 3, 3, {"mask_kind": "kv_len", "splits": 3}),
    ],
)
def test_attention_interpret(backend, kb, vb, kw):
    _attention_case(backend, kb, vb, 64, "cpu", tk=130, **kw)


@cpu_only
def test_attention_interpret_head_dim_256():
    _attention_case("planar", 3, 3, 256, "cpu", tk=40, batch=1, heads=1, rep=2)


# ---------------------------------------------------------------- GPU, through the rq ops, real sizes


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("backend", ["planar", "iso", "rotor", "hadamard", "none"])
def test_quantize_gpu(backend, bits):
    _quantize_case(backend, bits, 256, "cuda", tokens=3000, batch=2, heads=4)
    _quantize_case(backend, bits, 128, "cuda", tokens=1000, batch=3, heads=2)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize(
    "backend,kb,vb,kw",
    [
        ("planar", 3, 3, {}),
        ("iso", 4, 2, {"batch": 8}),
        ("rotor", 2, 4, {}),
        ("hadamard", 3, 3, {}),
        ("planar", 3, 3, {"mask_kind": "bool"}),
        ("planar", 3, 3, {"mask_kind": "float", "tq": 5}),
        ("iso", 3, 3, {"mask_kind": "causal", "tq": 64}),
        ("planar", 3, 3, {"mask_kind": "kv_len"}),
        ("planar", 3, 3, {"splits": 1}),
    ],
)
def test_attention_gpu(backend, kb, vb, kw):
    _attention_case(backend, kb, vb, 256, "cuda", tk=kw.pop("tk", 9000), heads=4, rep=6, **kw)
    _attention_case(backend, kb, vb, 128, "cuda", tk=777, heads=2, rep=4)
