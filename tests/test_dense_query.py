"""q's rotation by a dense K rotation (kernels/dense_query.py) against the torch math: x = q * k_scale
in the stored coordinate order (k_perm), each block of G coordinates times R[h, blk]. In Triton's interpreter on the
CPU machine; at Qwen3.5-27B's shapes on a GPU (`-m gpu`)."""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # also set by conftest.py, before any kernel module is imported

from rqcompile.kernels import dense_query  # noqa: E402


def _expected(q, rotation, scale, perm, heads):
    """float64 reference: out[b, h rep + r, t, blk G + i] = sum_k R[h, blk, i, k] x[b, h rep + r, t, blk G + k]."""
    batch, q_heads, q_len, dim = q.shape
    _, nb, g, _ = rotation.shape
    rep = q_heads // heads
    order = torch.arange(dim).expand(heads, dim) if perm is None else perm
    x = q.double().view(batch, heads, rep, q_len, dim)
    x = torch.stack([x[:, h, ..., order[h]] * scale[h, order[h]].double() for h in range(heads)], dim=1)
    x = x.view(batch, heads, rep, q_len, nb, g)
    out = torch.einsum("hnik,bhrtnk->bhrtni", rotation.double(), x)
    return out.reshape(batch, q_heads, q_len, dim)


def _case(device, batch, heads, rep, q_len, dim, g, permuted):
    q = torch.randn(batch, heads * rep, q_len, dim, device=device, dtype=torch.bfloat16)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # strided, as a model's q after its transpose
    rotation = torch.linalg.qr(torch.randn(heads, dim // g, g, g, device=device, dtype=torch.float64))[0].float()
    scale = torch.rand(heads, dim, device=device) + 0.5
    perm = torch.stack([torch.randperm(dim, device=device) for _ in range(heads)]) if permuted else None
    out = dense_query.rotate_query(q, rotation, scale, perm, heads, lambda kernel: kernel)
    ref = _expected(q, rotation, scale, perm, heads)
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert torch.isfinite(out).all()
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-6


@pytest.mark.skipif(HAS_CUDA, reason="interpreter tests run where there is no GPU")
@pytest.mark.parametrize("permuted", [False, True])
@pytest.mark.parametrize("g", [16, 32])
def test_rotate_query_interpret(permuted, g):
    """3 batch rows x 2 KV heads x 3 query heads each x 2 positions; 64 coordinates in blocks of 16 or 32."""
    _case("cpu", batch=3, heads=2, rep=3, q_len=2, dim=64, g=g, permuted=permuted)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("batch", [1, 8])
def test_rotate_query_gpu(batch):
    """Qwen3.5-27B's decode shape: 24 query heads over 4 KV heads, head_dim 256 in two 128-blocks."""
    _case("cuda", batch=batch, heads=4, rep=6, q_len=1, dim=256, g=128, permuted=False)
