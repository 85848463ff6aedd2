"""Calibration measures per-channel key statistics and folds them into the format's mean/scale."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_llama, tiny_qwen3_5

from rqcompile.cache import RQCache
from rqcompile.calibrate import QUERY, Calibration, calibrate, query_key_scale
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


def _score_error(keys: torch.Tensor, queries: torch.Tensor, config: RQConfig, **stats) -> float:
    """Mean squared error of the attention scores q . k over every (query, key) pair, per head."""
    state = make_state(config, layer_idx=0, kind="k", num_heads=keys.shape[1], head_dim=keys.shape[-1], **stats)
    error = dequantize_state(*quantize_state(keys, state), state, torch.float32) - keys  # [1, H, T, d]
    return torch.einsum("bhqd,bhtd->bhqt", queries, error).pow(2).mean().item()


def test_query_key_scales_cut_the_score_error_of_a_fully_mixing_rotation():
    """Keys whose large channels are not the ones the queries read (as RoPE's slow and fast pairs): with the key
    mean alone or RMS scales the quantization error lands evenly on every channel; scales from the queries move it to
    the channels the queries ignore. `query_key_scale` is the score-error optimum for a mixed group (its docstring):
    lower than either alternative, on the scores, which is what attention sees."""
    keys = _outlier_keys(heads=2, dim=64)
    torch.manual_seed(1)
    query_std = torch.ones(2, 64)
    query_std[:, 32:] = 0.1  # the queries barely read the second half of the channels
    queries = torch.randn(1, 2, 256, 64) * query_std[:, None]
    mean = keys.mean(2)[0]
    variance = (keys - keys.mean(2, keepdim=True)).pow(2).mean(2)[0]
    mixed = RQConfig(backend="iso", bits=3)  # the default: full mixing
    by_query = _score_error(keys, queries, mixed, mean=mean, scale=query_key_scale(variance, query_std.pow(2)))
    rms = variance.sqrt() / variance.sqrt().mean(-1, keepdim=True)
    assert by_query < 0.7 * _score_error(keys, queries, mixed, mean=mean)
    assert by_query < 0.7 * _score_error(keys, queries, mixed, mean=mean, scale=rms)


def test_query_key_scale_is_the_fourth_root_of_key_energy_over_query_power_with_mean_one():
    energy, power = torch.rand(3, 16) + 0.5, torch.rand(3, 16) + 0.5
    scale = query_key_scale(energy, power)
    expected = (energy / power).pow(0.25)
    torch.testing.assert_close(scale, expected / expected.mean(-1, keepdim=True))
    power[0, 5] = 0.0  # a channel no query reads: finite, and larger than any read channel of its head
    floored = query_key_scale(energy, power)
    assert torch.isfinite(floored).all() and floored[0, 5] == floored[0].max()


def test_both_channels_of_a_rope_pair_get_the_scale_of_the_pair():
    """RoPE turns channel i with i + r/2 by a position-dependent angle, so per-channel statistics of a short text
    do not hold at long positions; the pair's mean statistics do. Channels past the rotary ones keep their own."""
    energy, power = torch.rand(2, 16) + 0.5, torch.rand(2, 16) + 0.5
    scale = query_key_scale(energy, power, rotary_dims=8)
    torch.testing.assert_close(scale[:, :4], scale[:, 4:8])

    def paired(x: torch.Tensor) -> torch.Tensor:
        pair = (x[:, :4] + x[:, 4:8]) / 2
        return torch.cat([pair, pair, x[:, 8:]], -1)

    ratio = paired(energy) / paired(power)
    torch.testing.assert_close(scale, ratio.pow(0.25) / ratio.pow(0.25).mean(-1, keepdim=True))


def test_calibrate_measures_query_key_scales_from_the_queries_that_read_each_key_head():
    """`key_scale="query"` on the hybrid model (partial RoPE: 16 of 64 channels turn): the scale is shared within
    each RoPE pair, and on the channels RoPE leaves alone it is `(Var[k] / E[q^2])^(1/4)`: with RMS scales at power 1
    (`sqrt(Var[k])`) and the error weights (`Var[k] E[q^2]`) from the same text, `scale^4 * weight / rms^4` is one
    constant per head there. Values get no scale; the key mean is the one measured without scales."""
    model = tiny_qwen3_5()
    ids = _ids(model)
    by_query = calibrate(model, ids, key_scale=QUERY)
    rms = calibrate(model, ids, key_scale=True, scale_power=1.0)
    for layer in by_query.layers:
        scale, weight = by_query.get(layer, "k", "scale"), by_query.get(layer, "k", "weight")
        assert torch.allclose(scale.mean(-1), torch.ones(scale.shape[0]), atol=1e-5)
        torch.testing.assert_close(scale[:, :8], scale[:, 8:16])
        ratio = (scale.pow(4) * weight / rms.get(layer, "k", "scale").pow(4))[:, 16:]
        torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-3, atol=0)
        assert not torch.allclose(scale[:, 16:], rms.get(layer, "k", "scale")[:, 16:].sqrt(), rtol=1e-2)
        assert by_query.get(layer, "v", "scale") is None
        assert torch.equal(by_query.get(layer, "k", "mean"), rms.get(layer, "k", "mean"))


def test_unknown_scale_kinds_are_refused():
    model = tiny_llama()
    with pytest.raises(ValueError, match="key_scale must be True, False or 'query'"):
        calibrate(model, _ids(model), key_scale="rms")
    with pytest.raises(ValueError, match="value_scale True or False"):
        calibrate(model, _ids(model), value_scale=QUERY)
