"""Specification of rq::attention_lse (reference) and `attention_with_exact_tokens`: SDPA over `exact_read`'s cache
(sink + recent window held exactly, the rest dequantized) without materializing it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rqcompile import ops
from rqcompile.config import RQConfig
from rqcompile.passes.exact_attention import attention_with_exact_tokens
from rqcompile.passes.kv_compress import exact_read, exact_write
from rqcompile.quant.quantizer import make_state

HEADS, Q_HEADS, DIM, LENGTH = 2, 6, 64, 20


def _states(layout: bool = False, seed: int = 0):
    """K/V states with a non-zero calibrated mean and scale (the key mean matters once exact keys are mixed in)."""
    gen = torch.Generator().manual_seed(seed)
    cfg = RQConfig(backend="iso", key_bits=4, value_bits=3, bit_allocation=(2, 3, 4, 5, 6) if layout else ())
    states = []
    for kind in "kv":
        extra = {"weight": torch.rand(HEADS, DIM, generator=gen) + 0.1} if layout else {}
        states.append(
            make_state(
                cfg,
                layer_idx=0,
                kind=kind,
                num_heads=HEADS,
                head_dim=DIM,
                mean=torch.randn(HEADS, DIM, generator=gen),
                scale=torch.rand(HEADS, DIM, generator=gen) + 0.5,
                **extra,
            )
        )
    return states


def _mask(kind: str | None, q_len: int, cache_position: torch.Tensor, batch: int = 2):
    """A causal static-cache mask (key j visible to query i iff j <= cache_position[i]), with a few extra holes."""
    if kind is None:
        return None
    allowed = torch.arange(LENGTH)[None, :] <= cache_position[:, None]  # [Tq, L]
    allowed = allowed.expand(batch, 1, q_len, LENGTH).clone()
    allowed[1, :, :, 1] = False  # batch row 1 never sees position 1 (a sink position) nor 5
    allowed[1, :, :, 5] = False
    if kind == "bool":
        return allowed
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))


def _run(sink: int, window: int, cache_position: torch.Tensor, mask_kind: str | None, layout: bool = False):
    """(fused result, SDPA over exact_read) after writing a random sequence up to max(cache_position)."""
    torch.manual_seed(1)
    k_state, v_state = _states(layout)
    last = int(cache_position.max()) + 1
    keys, values = torch.randn(2, HEADS, LENGTH, DIM), torch.randn(2, HEADS, LENGTH, DIM)
    keys[:, :, last:] = values[:, :, last:] = 0.0  # never written
    kc, kn = ops.quantize_state(keys, k_state)
    vc, vn = ops.quantize_state(values, v_state)
    written = torch.arange(last)
    held = {}
    for name, x in (("k", keys), ("v", values)):
        for part, size in (("sink", sink), ("window", window)):
            if size:
                empty = torch.zeros(2, HEADS, size, DIM)
                held[f"{name}_{part}"] = exact_write(empty, x[:, :, :last], written, part == "window")
    q = torch.randn(2, Q_HEADS, len(cache_position), DIM)
    mask = _mask(mask_kind, len(cache_position), cache_position)

    def exact(codes, norms, state, name):
        deq = ops.dequantize_state(codes, norms, state, torch.float32)
        return exact_read(deq, held.get(name + "_sink"), held.get(name + "_window"), cache_position).repeat_interleave(
            Q_HEADS // HEADS, dim=1
        )

    expected = F.scaled_dot_product_attention(
        q, exact(kc, kn, k_state, "k"), exact(vc, vn, v_state, "v"), attn_mask=mask
    )
    k_bits, k_perm, k_widths = ops.layout_args(k_state)
    v_bits, v_perm, v_widths = ops.layout_args(v_state)
    got = attention_with_exact_tokens(
        q,
        kc,
        kn,
        vc,
        vn,
        k_state.rotation,
        k_state.mean,
        k_state.scale,
        k_state.levels,
        v_state.rotation,
        v_state.mean,
        v_state.scale,
        v_state.levels,
        k_bits,
        v_bits,
        held.get("k_sink"),
        held.get("v_sink"),
        held.get("k_window"),
        held.get("v_window"),
        cache_position,
        mask,
        1.0 / math.sqrt(DIM),
        None,
        k_perm,
        v_perm,
        k_widths,
        v_widths,
    )
    return got, expected


PREFILL = torch.arange(9)  # T = 9 > W: the prompt's first tokens are read quantized, its last W exactly
DECODE = torch.tensor([12])
SHORT = torch.arange(2)  # fewer tokens than the window: ring slots of negative positions must not be attended


# -- rq::attention_lse (reference) ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_attention_lse_is_rq_attention_plus_the_logsumexp_of_the_dequantized_scores(mask_kind):
    k_state, v_state = _states()
    kc, kn = ops.quantize_state(torch.randn(2, HEADS, LENGTH, DIM), k_state)
    vc, vn = ops.quantize_state(torch.randn(2, HEADS, LENGTH, DIM), v_state)
    q = torch.randn(2, Q_HEADS, 3, DIM)
    mask = _mask(mask_kind, 3, torch.tensor([4, 9, 13]))
    kv_len = torch.tensor([14, 11])
    out, lse = ops.attention_lse_state(q, kc, kn, vc, vn, k_state, v_state, mask, kv_len=kv_len)
    torch.testing.assert_close(out, ops.attention_state(q, kc, kn, vc, vn, k_state, v_state, mask, kv_len=kv_len))
    keys = ops.dequantize_state(kc, kn, k_state, torch.float32) - k_state.mean[:, None, :]  # lse leaves the mean out
    scores = q @ keys.repeat_interleave(3, dim=1).transpose(-1, -2) / math.sqrt(DIM)
    full = ops.mask_with_key_range(mask, kv_len, LENGTH)
    if full is not None:
        scores = scores.masked_fill(~full, float("-inf")) if full.dtype == torch.bool else scores + full
    torch.testing.assert_close(lse, torch.logsumexp(scores, dim=-1), atol=1e-4, rtol=1e-4)


def test_attention_lse_of_a_fully_masked_row_is_minus_infinity_and_its_output_the_value_mean():
    """A row that attends nothing accumulates 0 in the rotated space, un-rotated to V's mean (as rq::attention)."""
    k_state, v_state = _states()
    kc, kn = ops.quantize_state(torch.randn(1, HEADS, LENGTH, DIM), k_state)
    vc, vn = ops.quantize_state(torch.randn(1, HEADS, LENGTH, DIM), v_state)
    mask = torch.ones(1, 1, 2, LENGTH, dtype=torch.bool)
    mask[0, 0, 1] = False
    out, lse = ops.attention_lse_state(torch.randn(1, Q_HEADS, 2, DIM), kc, kn, vc, vn, k_state, v_state, mask)
    assert torch.isfinite(lse[:, :, 0]).all() and (lse[:, :, 1] == float("-inf")).all()
    torch.testing.assert_close(out[0, :, 1], v_state.mean.repeat_interleave(Q_HEADS // HEADS, dim=0))


def test_attention_lse_passes_the_torch_library_checks():
    k_state, v_state = _states(layout=True)
    kc, kn = ops.quantize_state(torch.randn(1, HEADS, LENGTH, DIM), k_state)
    vc, vn = ops.quantize_state(torch.randn(1, HEADS, LENGTH, DIM), v_state)
    k_bits, k_perm, k_widths = ops.layout_args(k_state)
    v_bits, v_perm, v_widths = ops.layout_args(v_state)
    args = (torch.randn(1, Q_HEADS, 2, DIM), kc, kn, vc, vn, k_state.rotation, k_state.scale, k_state.levels)
    args += (v_state.rotation, v_state.mean, v_state.scale, v_state.levels, k_bits, v_bits, None, 0.125)
    args += (torch.tensor([9]), k_perm, v_perm, k_widths, v_widths)
    torch.library.opcheck(torch.ops.rq.attention_lse.default, args)


# -- attention_with_exact_tokens -------------------------------------------------------------------------------------


@pytest.mark.parametrize("sink, window", [(2, 0), (0, 4), (2, 4), (1, 1)], ids=["sink", "window", "both", "one-one"])
@pytest.mark.parametrize("cache_position", [PREFILL, DECODE, SHORT], ids=["prefill", "decode", "short"])
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_equals_sdpa_over_exact_read(sink, window, cache_position, mask_kind):
    got, expected = _run(sink, window, cache_position, mask_kind)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)


def test_without_a_mask_every_key_is_attended_once():
    got, expected = _run(2, 4, DECODE, None)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("cache_position", [PREFILL, DECODE], ids=["prefill", "decode"])
def test_a_bit_allocation_layout_reads_the_same_cache(cache_position):
    got, expected = _run(2, 4, cache_position, "bool", layout=True)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)


def test_a_window_longer_than_the_sequence_so_far_attends_only_written_positions():
    got, expected = _run(0, 8, torch.arange(3), "bool")  # 5 ring slots hold negative positions
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)
