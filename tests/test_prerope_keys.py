"""benchmarks/prerope_keys.py (session 39 research): its RoPE algebra and the transform it measures must be right,
or its 24-window numbers would measure a bug rather than keys quantized before RoPE."""

from __future__ import annotations

import pytest
import torch
from benchmark_modules import load_benchmark
from tiny_models import tiny_llama

from rqcompile.cache import RQCache
from rqcompile.config import RQConfig
from rqcompile.quant.rope_offset import RopeSpec, static_rope_spec, unrotate


@pytest.fixture(scope="module")
def pre():
    return load_benchmark("prerope_keys", "prerope_keys")


def _spec(half: int = 4) -> RopeSpec:
    return RopeSpec(1.0 / 100.0 ** (torch.arange(half).float() / half), 1.0)


def _score_error(a: torch.Tensor, s_k: torch.Tensor, s_q: torch.Tensor) -> torch.Tensor:
    """tr(S_k M) tr(S_q M^-1) with M = A^T A: what a mixed norm group's error costs a score."""
    m = a.transpose(-1, -2) @ a
    return torch.einsum("hij,hji->h", s_k, m) * torch.einsum("hij,hji->h", s_q, torch.linalg.inv(m))


def test_rotate_undoes_unrotate(pre):
    spec = _spec()
    x = torch.randn(2, 3, 5, 8)
    positions = torch.tensor([[0, 3, 17, 100, 511]])
    assert torch.allclose(pre.rotate(unrotate(x, positions, spec), positions, spec), x, atol=1e-5)
    assert not torch.allclose(unrotate(x, positions, spec), x, atol=1e-2)  # it does turn


def test_the_turned_average_is_the_mean_over_distances_of_the_turned_queries(pre):
    """A key D tokens before its query scores against R_D q in its pre-RoPE frame: (R_{p+D} q) . (R_p k)."""
    spec, span = _spec(), 7
    q = torch.randn(50, 8, dtype=torch.float64)
    s_q = (q.T @ q / 50)[None]
    turned = [pre.rotate(q[None, None].float(), torch.full((1, 50), d), spec)[0, 0].double() for d in range(span)]
    want = torch.stack([t.T @ t / 50 for t in turned]).mean(0)
    assert torch.allclose(pre._turned_average(s_q, spec, span)[0], want, atol=1e-5)
    assert not torch.allclose(pre._turned_average(s_q, spec, 1)[0], want, atol=1e-2)  # the distances matter


def test_the_geometric_mean_transform_minimizes_the_predicted_score_error(pre):
    torch.manual_seed(0)
    d = 8
    x, y = torch.randn(2, 3, 40, d, dtype=torch.float64)
    s_k, s_q = x.transpose(1, 2) @ x / 40, y.transpose(1, 2) @ y / 40
    a = pre.geometric_mean_transform(s_k, s_q)
    best = _score_error(a, s_k, s_q)
    diagonal = torch.diag_embed((s_q.diagonal(dim1=-2, dim2=-1) / s_k.diagonal(dim1=-2, dim2=-1)).pow(0.25))
    assert (best <= _score_error(torch.eye(d, dtype=torch.float64).expand(3, d, d), s_k, s_q) + 1e-9).all()
    assert (best <= _score_error(diagonal, s_k, s_q) + 1e-9).all()
    for _ in range(20):
        other = a + 0.05 * torch.randn(3, d, d, dtype=torch.float64)
        assert (best <= _score_error(other, s_k, s_q) + 1e-9).all()
    # scaled so that the transformed keys keep their energy
    assert torch.allclose(torch.einsum("hij,hjk,hik->h", a, s_k, a), s_k.diagonal(dim1=-2, dim2=-1).sum(-1))


def test_a_patched_cache_reads_back_the_keys_it_was_given(pre, monkeypatch):
    """Through the pre-RoPE path (a random full transform, 4-bit codes) the keys a layer returns are the keys it was
    given, to 4-bit accuracy, at every position: the position handling and the offset are right."""
    model = tiny_llama()
    spec = static_rope_spec(model.config)
    torch.manual_seed(1)
    rotation = torch.linalg.qr(torch.randn(2, 64, 64)).Q
    a = rotation * torch.logspace(-1, 1, 64, base=2.0)  # condition number 4, as a calibrated transform's order
    monkeypatch.setattr(pre, "TRANSFORMS", {0: (a, torch.linalg.inv(a))})
    monkeypatch.setattr(pre.cache_module.RQCacheLayer, "_append_compressed", pre._append)
    monkeypatch.setattr(pre.cache_module.RQCacheLayer, "_materialize", pre._read)
    cache = RQCache(RQConfig(bits=4, residual_window=0), model_config=model.config)
    pre_keys = torch.randn(1, 2, 48, 64) + 2.0  # a large pre-RoPE mean, as real keys have
    keys = pre.rotate(pre_keys, torch.arange(48)[None], spec)
    values = torch.randn(1, 2, 48, 64)
    cache.update(keys[:, :, :40], values[:, :, :40], 0)
    got, _ = cache.update(keys[:, :, 40:], values[:, :, 40:], 0)  # a second write: positions continue at 40
    assert cache.layers[0].rope is not None
    error = (got.float() - keys).norm(dim=-1) / keys.norm(dim=-1)
    assert error[:, :, 0].max() == 0  # the exact sink token
    assert 0 < error[:, :, 1:].max() < 0.1
    # a read that forgets to turn the keys back to their positions is far off
    monkeypatch.setattr(pre, "rotate", lambda x, positions, spec: x)
    wrong, _ = cache.update(keys[:, :, :0], values[:, :, :0], 0)
    assert ((wrong.float() - keys).norm(dim=-1) / keys.norm(dim=-1))[:, :, 1:].max() > 0.5
