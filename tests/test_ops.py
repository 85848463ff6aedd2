"""Specification of rq::attention's optional `kv_len`: the same result as masking keys >= kv_len[b]."""

from __future__ import annotations

import pytest
import torch

from rqcompile import ops
from rqcompile.config import RQConfig
from rqcompile.quant.quantizer import make_state


def _cache(tokens: int = 24, batch: int = 2):
    torch.manual_seed(0)
    cfg = RQConfig(backend="iso", key_bits=4, value_bits=3)
    k = make_state(cfg, layer_idx=1, kind="k", num_heads=2, head_dim=64)
    v = make_state(cfg, layer_idx=1, kind="v", num_heads=2, head_dim=64)
    kc, kn = ops.quantize_state(torch.randn(batch, 2, tokens, 64), k)
    vc, vn = ops.quantize_state(torch.randn(batch, 2, tokens, 64), v)
    return (kc, kn, vc, vn, k, v), torch.randn(batch, 6, 3, 64)


@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_kv_len_equals_masking_the_keys_past_it(mask_kind):
    (kc, kn, vc, vn, k, v), q = _cache()
    kv_len = torch.tensor([7, 19])
    tk = kc.shape[2]
    mask = None
    if mask_kind:
        allowed = torch.rand(2, 1, 3, tk) > 0.2
        allowed[..., 0] = True
        mask = allowed if mask_kind == "bool" else torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    got = ops.attention_state(q, kc, kn, vc, vn, k, v, mask, kv_len=kv_len)
    combined = ops.mask_with_key_range(mask, kv_len, tk)
    expected = ops.attention_state(q, kc, kn, vc, vn, k, v, combined)
    torch.testing.assert_close(got, expected)
    truncated = ops.attention_state(
        q[:1],
        kc[:1, :, :7],
        kn[:1, :, :7],
        vc[:1, :, :7],
        vn[:1, :, :7],
        k,
        v,
        None if mask is None else mask[:1, ..., :7],
    )
    torch.testing.assert_close(got[:1], truncated, atol=1e-5, rtol=1e-5)  # keys past kv_len play no part


def test_attention_with_kv_len_passes_the_torch_library_checks():
    (kc, kn, vc, vn, k, v), q = _cache()
    args = (
        q,
        kc,
        kn,
        vc,
        vn,
        k.rotation,
        k.scale,
        k.levels,
        v.rotation,
        v.mean,
        v.scale,
        v.levels,
        4,
        3,
        None,
        0.125,
        torch.tensor([5, 24]),
    )
    torch.library.opcheck(torch.ops.rq.attention.default, args)
