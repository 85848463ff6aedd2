"""Calibration measures per-channel key statistics and folds them into the format's mean/scale."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_llama, tiny_qwen3_5

from rqcompile.cache import RQCache
from rqcompile.calibrate import Calibration, calibrate
from rqcompile.config import RQConfig
from rqcompile.ops import dequantize_state, quantize_state
from rqcompile.quant.quantizer import make_state


def _ids(model, length=48, seed=0):
    return torch.randint(3, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen3_5])
def test_calibration_covers_every_attention_layer_with_head_by_channel_stats(factory):
    model = factory()
    calib = calibrate(model, _ids(model), key_scale=True, value_scale=True)
    attention_layers = [
        i
        for i, kind in enumerate(getattr(model.config, "layer_types", None) or ["full_attention"] * 99)
        if kind == "full_attention" and i < model.config.num_hidden_layers
    ]
    assert calib.layers == attention_layers
    shape = (model.config.num_key_value_heads, model.config.head_dim)
    for layer in attention_layers:
        assert calib.get(layer, "k", "mean").shape == shape
        scale = calib.get(layer, "k", "scale")
        assert scale.shape == shape and bool((scale > 0).all())
        assert torch.allclose(scale.mean(-1), torch.ones(shape[0]), atol=1e-5)
        assert calib.get(layer, "v", "scale") is not None and calib.get(layer, "v", "mean") is None
    with_v_mean = calibrate(model, _ids(model), value_mean=True)
    for layer in attention_layers:
        assert with_v_mean.get(layer, "v", "mean").shape == shape
        assert torch.equal(with_v_mean.get(layer, "k", "mean"), calib.get(layer, "k", "mean"))
    assert model.config._attn_implementation != "rqcompile_calibration_capture", "attention routing must be restored"


def test_calibration_round_trips_through_flat_tensors():
    calib = Calibration({(1, "k", "mean"): torch.randn(2, 64), (1, "k", "scale"): torch.rand(2, 64) + 0.1})
    again = Calibration.from_tensors(calib.to_tensors())
    assert again.stats.keys() == calib.stats.keys()
    assert all(torch.equal(again.stats[k], calib.stats[k]) for k in calib.stats)
    with pytest.raises(ValueError, match="unexpected calibration tensor"):
        Calibration.from_tensors({"calibration.1.q.mean": torch.zeros(1)})


def _outlier_keys(heads: int, dim: int) -> torch.Tensor:
    torch.manual_seed(0)
    channel_scale = torch.ones(heads, dim)
    channel_scale[:, [3, 17, 40]] = 30.0  # a few huge channels, as real keys have
    offset = torch.randn(heads, dim) * 2
    return torch.randn(1, heads, 512, dim) * channel_scale[:, None] + offset[:, None]


def _error(keys: torch.Tensor, config: RQConfig, **stats) -> float:
    state = make_state(config, layer_idx=0, kind="k", num_heads=keys.shape[1], head_dim=keys.shape[-1], **stats)
    return (dequantize_state(*quantize_state(keys, state), state, torch.float32) - keys).pow(2).mean().item()


def test_channel_scale_and_mean_cut_the_error_of_block_rotations_on_keys_with_outlier_channels():
    keys = _outlier_keys(heads=2, dim=64)
    centred = keys - keys.mean(2, keepdim=True)
    rms = centred.pow(2).mean(2).sqrt()[0]
    blocks = RQConfig(backend="planar", bits=3, rotation_stages=1)
    tuned = _error(keys, blocks, mean=keys.mean(2)[0], scale=rms / rms.mean(-1, keepdim=True))
    assert tuned < 0.2 * _error(keys, blocks)


def test_the_key_mean_cuts_the_error_of_a_fully_mixing_rotation_on_keys_with_an_offset():
    """A rotation that mixes the whole group spreads outlier channels itself (scales add little, QUALITY.md), but a
    constant offset still costs it bits on every vector: the mean removes that."""
    keys = _outlier_keys(heads=2, dim=64)
    mixed = RQConfig(backend="planar", bits=3)  # the default: full mixing
    assert _error(keys, mixed, mean=keys.mean(2)[0]) < 0.8 * _error(keys, mixed)


def test_a_calibrated_cache_uses_the_calibrated_state():
    model = tiny_llama()
    calib = calibrate(model, _ids(model, seed=1), key_scale=True, value_scale=True)
    cache = RQCache(RQConfig(backend="iso", bits=3), calibration=calib)
    model(_ids(model), past_key_values=cache, use_cache=True)
    layer = cache.layers[0]
    assert torch.equal(layer.k_state.mean, calib.get(0, "k", "mean"))
    assert torch.equal(layer.v_state.scale, calib.get(0, "v", "scale"))
    assert torch.equal(layer.v_state.mean, torch.zeros_like(layer.v_state.mean))


def test_badly_shaped_calibration_is_refused():
    with pytest.raises(ValueError, match="expected \\(2, 64\\)"):
        make_state(RQConfig(), layer_idx=0, kind="k", num_heads=2, head_dim=64, mean=torch.zeros(3, 64))
    with pytest.raises(ValueError, match="positive"):
        make_state(RQConfig(), layer_idx=0, kind="k", num_heads=2, head_dim=64, scale=torch.zeros(2, 64))


def test_repetitive_calibration_text_is_refused():
    """Text that is one token repeated gives channels without spread, whose scales would wreck every later token
    (QUALITY.md "Degenerate prompts"): a clear error, not a calibration that silently ruins quality. Varied text of
    the same length calibrates, at any scale power."""
    model = tiny_llama()
    with pytest.raises(ValueError, match="almost no spread"):
        calibrate(model, torch.full((1, 48), 7), key_scale=True, value_scale=True)
    for power in (0.6, 0.8, 1.0):
        assert calibrate(model, _ids(model), key_scale=True, value_scale=True, scale_power=power).layers


def test_channel_stats_of_selected_tokens_are_the_stats_of_those_tokens_alone():
    """`channel_stats(..., tokens=mask)` (a padded batch's real tokens) measures exactly the selected samples, as if
    the other positions were not there; a mask of the wrong shape, or selecting nothing, is refused."""
    from rqcompile.calibrate import channel_stats

    torch.manual_seed(0)
    x = torch.randn(2, 3, 10, 64)
    x[1, :, :4] = 1e3  # padding: wild values that must not count
    tokens = torch.ones(2, 10, dtype=torch.bool)
    tokens[1, :4] = False
    got = channel_stats(x, mean=True, scale=True, tokens=tokens)
    want = channel_stats(torch.cat([x[0], x[1, :, 4:]], dim=1)[None], mean=True, scale=True)
    assert got.keys() == want.keys() == {"mean", "scale"}
    assert all(torch.allclose(got[name], want[name], atol=1e-6) for name in got)
    with pytest.raises(ValueError, match=r"tokens must be \[B, T\] = \(2, 10\)"):
        channel_stats(x, mean=True, scale=True, tokens=tokens[:, 1:])
    with pytest.raises(ValueError, match="no token selected"):
        channel_stats(x, mean=True, scale=True, tokens=torch.zeros_like(tokens))


# -- key scales from the queries (`calibrate(key_scale="query")`) -------------------------------------------------
def _turned(pre: torch.Tensor, start: int) -> torch.Tensor:
    """rotate_half RoPE (base 10000, every pair) of pre-RoPE keys [1, H, T, d] at positions start..start+T."""
    from rqcompile.quant.rope_offset import RopeSpec, rope_offset

    d = pre.shape[-1]
    spec = RopeSpec(1.0 / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float) / d))
    positions = torch.arange(start, start + pre.shape[2])[None]
    half = d // 2
    out = torch.empty_like(pre)
    # RoPE of each key: rope_offset turns one [H, d] vector per position, so go key by key through the batch dim
    for t in range(pre.shape[2]):
        out[:, :, t] = rope_offset(pre[0, :, t], positions[:, t : t + 1], spec)[0, :, 0]
    assert out.shape[-1] == 2 * half
    return out


def test_query_key_scales_are_fine_where_queries_read_and_coarse_where_keys_are_large():
    """s_c = (E[k_c^2] / E[q_c^2])^(1/4), mean 1 per head: the Cauchy-Schwarz optimum of a score error spread evenly
    over a mixed norm group. More key energy or less query energy in a channel gives it a coarser step."""
    from rqcompile.calibrate import query_key_scales

    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 2, 4000, 8, generator=g) * torch.tensor([1.0, 1, 1, 1, 4, 1, 1, 1])
    queries = torch.ones(2, 8)
    queries[:, 2] = 16.0
    s = query_key_scales(keys, queries, centred=True)
    torch.testing.assert_close(s.mean(-1), torch.ones(2))
    assert torch.all(s[:, 4] > 1.8 * s[:, 0]) and torch.all(s[:, 2] < 0.6 * s[:, 0])
    ratio = (s[:, 4] / s[:, 0]) ** 4  # energy 16x -> scale 2x
    torch.testing.assert_close(ratio, torch.full((2,), 16.0), rtol=0.15, atol=0)


def test_pair_averaged_query_scales_do_not_depend_on_the_positions_they_were_measured_at():
    """A RoPE pair turned within the context keeps its energy, not the split between its two channels: averaged over
    the pair, the scales measured at positions 0.. and 5000.. agree; kept per channel they need not."""
    from rqcompile.calibrate import query_key_scales

    g = torch.Generator().manual_seed(1)
    pre = torch.randn(1, 2, 512, 16, generator=g) * torch.linspace(0.5, 3.0, 16)  # channel energies differ in pairs
    queries = torch.ones(2, 16)
    turning = torch.ones(8, dtype=torch.bool)
    early, late = _turned(pre, 0), _turned(pre, 5000)
    torch.testing.assert_close(
        query_key_scales(early, queries, centred=False, turning=turning),
        query_key_scales(late, queries, centred=False, turning=turning),
        rtol=0.03,
        atol=0,
    )
    steady = torch.zeros(8, dtype=torch.bool)  # per channel: the slow pairs' split changes with the position
    a = query_key_scales(early, queries, centred=False, turning=steady)
    b = query_key_scales(late, queries, centred=False, turning=steady)
    assert (a - b).abs().max() > 0.1


def test_calibrate_measures_query_scales_and_a_cache_uses_them():
    """`calibrate(key_scale="query")` stores K scales from the queries (mean 1 per head; the pairs RoPE turns within
    the model's context averaged), V gets none; a cache given the Calibration quantizes with them; bad values are
    refused."""
    model = tiny_llama()
    ids = torch.randint(0, model.config.vocab_size, (1, 96), generator=torch.Generator().manual_seed(2))
    calib = calibrate(model, ids, key_scale="query", chunk=48)
    scale = calib.get(0, "k", "scale")
    torch.testing.assert_close(scale.mean(-1), torch.ones(scale.shape[0]))
    assert scale.std() > 0.01 and calib.get(0, "v", "scale") is None
    cache = RQCache(calibration=calib)
    model(ids, past_key_values=cache, use_cache=True)
    torch.testing.assert_close(cache.layers[0].k_state.scale, scale.to(cache.layers[0].k_state.scale.dtype))
    with pytest.raises(ValueError, match="key_scale must be True, False or 'query'"):
        calibrate(model, ids, key_scale="queries")
