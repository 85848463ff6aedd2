"""`RQConfig(rope_key_mean=True)`: the keys' pre-RoPE mean, turned to each key's position, is removed before
quantizing and added back exactly after dequantizing (rqcompile/quant/rope_offset.py; QUALITY.md "Session 13")."""

from __future__ import annotations

import sys

import pytest
import torch
from test_cache import _left_padded, _tell_padding
from tiny_models import tiny_llama, tiny_qwen3, tiny_qwen3_5
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

import rqcompile
from rqcompile.cache import IsoQuantCache, RQCache
from rqcompile.calibrate import Calibration
from rqcompile.config import RQConfig
from rqcompile.quant.rope_offset import rope_offset, rope_spec, unrotate

HEADS, DIM = 2, 64


def _config(**rope) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=128,
        num_attention_heads=4,
        num_key_value_heads=HEADS,
        head_dim=DIM,
        num_hidden_layers=1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, **rope},
    )


def test_the_offset_is_the_models_own_rope_of_the_mean():
    """RoPE_p(m) equals transformers' apply_rotary_pos_emb of m at p, and `unrotate` inverts it."""
    config = _config()
    mean = torch.randn(HEADS, DIM)
    positions = torch.tensor([[0, 1, 7, 300, 4095]])
    cos, sin = LlamaRotaryEmbedding(config)(mean, positions)
    broadcast = mean[None, :, None, :].expand(1, HEADS, positions.shape[1], DIM)
    _, want = apply_rotary_pos_emb(broadcast, broadcast, cos, sin)
    got = rope_offset(mean, positions, rope_spec(config))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    back = unrotate(got, positions, rope_spec(config))
    torch.testing.assert_close(back, broadcast, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen3, tiny_qwen3_5], ids=lambda f: f.__name__)
def test_the_offset_matches_each_models_own_rotary_embedding(make):
    """Llama, Qwen3 and Qwen3.5 (partial rotary over a quarter of the head, multimodal RoPE sections): RoPE_p(m) is
    exactly what the model's rotary embedding and apply_rotary_pos_emb make of m at position p."""
    model = make()
    rotary = next(m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding"))
    modeling = sys.modules[type(rotary).__module__]
    text = model.config.get_text_config(decoder=True)
    heads, dim = text.num_key_value_heads, text.head_dim
    mean = torch.randn(heads, dim, generator=torch.Generator().manual_seed(4))
    positions = torch.tensor([[0, 3, 77, 1000]])
    cos, sin = rotary(mean, positions)
    broadcast = mean[None, :, None, :].expand(1, heads, positions.shape[1], dim)
    _, want = modeling.apply_rotary_pos_emb(broadcast, broadcast, cos, sin)
    torch.testing.assert_close(rope_offset(mean, positions, rope_spec(model.config)), want, rtol=1e-6, atol=1e-6)


def test_partial_rotary_turns_only_the_rotary_coordinates():
    spec = rope_spec(_config(partial_rotary_factor=0.25))
    assert spec.dims == DIM // 4
    mean = torch.randn(HEADS, DIM)
    got = rope_offset(mean, torch.tensor([[5, 9]]), spec)
    assert torch.equal(got[..., spec.dims :], mean[None, :, None, spec.dims :].expand(1, HEADS, 2, -1))
    assert not torch.allclose(got[..., : spec.dims], mean[None, :, None, : spec.dims].expand(1, HEADS, 2, -1))


def _keys_with_a_pre_rope_offset(config, batch=1, tokens=96, seed=0):
    """Post-RoPE keys whose pre-RoPE form is a large constant offset plus noise, as real keys are (QUALITY.md)."""
    g = torch.Generator().manual_seed(seed)
    offset = 4 * torch.randn(HEADS, DIM, generator=g)
    pre = offset[None, :, None, :] + torch.randn(batch, HEADS, tokens, DIM, generator=g)
    positions = torch.arange(tokens)[None].expand(batch, -1)
    cos, sin = LlamaRotaryEmbedding(config)(pre, positions)
    keys, _ = apply_rotary_pos_emb(pre, pre, cos, sin)
    return keys, torch.randn(batch, HEADS, tokens, DIM, generator=g)


def test_removing_the_pre_rope_mean_cuts_the_key_error_and_keeps_exact_tokens_exact():
    """On keys with a constant pre-RoPE offset, the cache that removes it reconstructs the compressed keys with far
    less error than the post-RoPE key mean alone; the sink and the recent window stay bit-exact; values unchanged."""
    config = _config()
    keys, values = _keys_with_a_pre_rope_offset(config)
    errors = {}
    for rope_key_mean in (False, True):
        rq = RQConfig(rope_key_mean=rope_key_mean, sink_tokens=1, residual_window=8)
        cache = RQCache(rq, model_config=config)
        got_k, got_v = cache.update(keys[:, :, :64], values[:, :, :64], 0)
        got_k, got_v = cache.update(keys[:, :, 64:], values[:, :, 64:], 0)  # a second write: positions go on
        assert torch.equal(got_k[:, :, :1], keys[:, :, :1]) and torch.equal(got_k[:, :, -8:], keys[:, :, -8:])
        compressed = slice(1, keys.shape[-2] - 8)
        errors[rope_key_mean] = (got_k[:, :, compressed] - keys[:, :, compressed]).pow(2).sum() / keys[
            :, :, compressed
        ].pow(2).sum()
        errors[("v", rope_key_mean)] = got_v
    assert errors[True] < 0.5 * errors[False], (errors[True], errors[False])
    assert torch.equal(errors[("v", True)], errors[("v", False)])


def test_a_left_padded_row_counts_its_positions_from_its_first_real_token():
    """With the mean given by a Calibration (nothing pooled over the batch), a left-padded row's real tokens come back
    exactly as the same row's alone: its offset is turned by the position ids the model gives that row."""
    model = tiny_llama()
    ids, mask = _left_padded(model, lengths=(14, 9))
    heads = model.config.num_key_value_heads
    g = torch.Generator().manual_seed(1)
    stats = {(i, "k", "rope_mean"): 2 * torch.randn(heads, 64, generator=g) for i in range(2)}
    calibration = Calibration(stats, "test")

    def keys_of(input_ids, attention_mask):
        cache = IsoQuantCache(
            bits=3, model_config=model.config, calibration=calibration, rope_key_mean=True, residual_window=0
        )
        _tell_padding(cache, model, attention_mask, "set_attention_mask")
        positions = (attention_mask.cumsum(-1) - 1).clamp_min(0)  # as generate gives a left-padded batch
        model(input_ids, attention_mask=attention_mask, position_ids=positions, past_key_values=cache, use_cache=True)
        return cache.layers[1]._materialize()[0]

    batched = keys_of(ids, mask)
    row = mask[1].bool()
    alone = keys_of(ids[1:, row], mask[1:, row])
    torch.testing.assert_close(batched[1:, :, row], alone, rtol=1e-4, atol=1e-4)


def test_calibrate_measures_the_same_pre_rope_mean_as_the_prompt_calibration():
    """`calibrate(..., rope_key_mean=True)` on the prompt's own tokens (one chunk) stores the pre-RoPE key mean the
    cache measures on that prompt, and a cache given that Calibration writes the same codes. In the first layer only:
    later layers' keys depend on the compressed cache the earlier ones returned, which calibrate does not use."""
    model = tiny_llama()
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(2))
    calibration = rqcompile.calibrate(model, ids, key_scale=False, rope_key_mean=True, error_weights=False, chunk=64)
    prompt = IsoQuantCache(bits=3, model_config=model.config, rope_key_mean=True, residual_window=0)
    given = IsoQuantCache(
        bits=3, model_config=model.config, rope_key_mean=True, residual_window=0, calibration=calibration
    )
    for cache in (prompt, given):
        model(ids, past_key_values=cache, use_cache=True)
    torch.testing.assert_close(prompt.layers[0].k_rope_mean, calibration.get(0, "k", "rope_mean"), rtol=0, atol=1e-6)
    torch.testing.assert_close(prompt.layers[0].k_state.mean, given.layers[0].k_state.mean, rtol=0, atol=1e-6)
    assert torch.equal(prompt.layers[0].k_codes, given.layers[0].k_codes)
    assert calibration.get(1, "k", "rope_mean") is not None
    with pytest.raises(ValueError, match="measured for RQConfig\\(rope_key_mean=True\\)"):
        IsoQuantCache(bits=3, calibration=calibration, rope_key_mean=False)


def test_generate_on_a_hybrid_model_with_a_zero_offset_is_the_plain_cache():
    """Qwen3.5 (linear-attention layers beside partial-rotary full attention), batched greedy generate: with a zero
    pre-RoPE mean the option changes nothing, bit for bit: its path through generate (the hybrid layer list, the
    float32 residual, decode steps, the window) adds nothing of its own. (The positions are checked above.)"""
    model = tiny_qwen3_5()
    text = model.config.get_text_config(decoder=True)
    zeros = torch.zeros(text.num_key_value_heads, text.head_dim)
    calibration = Calibration({(i, "k", "rope_mean"): zeros for i in range(text.num_hidden_layers)}, "zeros")
    ids = torch.randint(1, text.vocab_size, (2, 20), generator=torch.Generator().manual_seed(5))
    outs = []
    for options in (dict(calibration=None), dict(calibration=calibration, rope_key_mean=True)):
        cache = IsoQuantCache(bits=3, model_config=model.config, residual_window=4, **options)
        outs.append(model.generate(ids, past_key_values=cache, max_new_tokens=6, do_sample=False))
        assert any(getattr(layer, "k_codes", None) is not None for layer in cache.layers)
    assert torch.equal(outs[0], outs[1])


def test_bad_uses_give_clear_errors():
    with pytest.raises(ValueError, match="model_config"):
        RQCache(RQConfig(rope_key_mean=True))
    with pytest.raises(ValueError, match="rope_key_mean must be None \\(auto\\) or a bool"):
        RQConfig(rope_key_mean="yes")
    with pytest.raises(ValueError, match="dynamic|frequencies change"):
        rope_spec(_config(rope_type="dynamic", factor=2.0))
    with pytest.raises(ValueError, match="dynamic|frequencies change"):
        RQCache(RQConfig(rope_key_mean=True), model_config=_config(rope_type="dynamic", factor=2.0))
    with pytest.raises(ValueError, match="no pre-RoPE key mean"):
        RQCache(RQConfig(rope_key_mean=True), model_config=_config(), calibration=Calibration({}, "empty"))
    # a Calibration whose layer lacks the mean the others have
    partial = Calibration({(1, "k", "rope_mean"): torch.zeros(HEADS, DIM)}, "layer 1 only")
    cache = RQCache(RQConfig(rope_key_mean=True), model_config=_config(), calibration=partial)
    keys, values = _keys_with_a_pre_rope_offset(_config(), tokens=16)
    with pytest.raises(ValueError, match="rope_mean"):
        cache.update(keys, values, 0)


# -- the default, rope_key_mean=None ("auto"): on wherever the RoPE and the mean are known ------------------------
def test_by_default_a_prompt_calibrated_cache_removes_the_offset_when_it_knows_the_rope():
    """`IsoQuantCache(bits=3, model_config=model.config)` is the best measured drop-in configuration (QUALITY.md
    "Session 14"): it resolves to rope_key_mean=True and writes what the explicit option writes. Without the model's
    RoPE (no model_config, or a RoPE whose frequencies change with the length) the default is the format without it."""
    config = _config()
    keys, values = _keys_with_a_pre_rope_offset(config)
    default, explicit = RQCache(model_config=config), RQCache(RQConfig(rope_key_mean=True), model_config=config)
    assert RQConfig().rope_key_mean is None and default.rq_config.rope_key_mean is True
    for cache in (default, explicit):
        cache.update(keys, values, 0)
    assert torch.equal(default.layers[0].k_codes, explicit.layers[0].k_codes)
    assert RQCache().rq_config.rope_key_mean is False
    assert RQCache(model_config=_config(rope_type="dynamic", factor=2.0)).rq_config.rope_key_mean is False
    assert RQCache(model_config=config, calibration=None).rq_config.rope_key_mean is False  # nothing measured


def test_calibrate_measures_the_offset_by_default_and_carries_the_rope():
    """`calibrate(model, ids)` measures the pre-RoPE key means for a model with a static RoPE and carries that RoPE,
    so a drop-in cache given the Calibration removes the offset without `model_config`, as one given both does;
    `rope_key_mean=False` measures the format without it. The RoPE survives `to_tensors` / `from_tensors`."""
    model = tiny_llama()
    ids = torch.randint(0, model.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(3))
    calibration = rqcompile.calibrate(model, ids, error_weights=False, chunk=64)
    assert calibration.has_rope_mean
    torch.testing.assert_close(calibration.rope.inv_freq, rope_spec(model.config).inv_freq, rtol=0, atol=0)
    assert not rqcompile.calibrate(model, ids, error_weights=False, chunk=64, rope_key_mean=False).has_rope_mean
    back = Calibration.from_tensors(calibration.to_tensors())
    assert back.rope.scaling == calibration.rope.scaling and torch.equal(back.rope.inv_freq, calibration.rope.inv_freq)
    caches = [
        IsoQuantCache(bits=3, calibration=back),
        IsoQuantCache(bits=3, calibration=calibration, model_config=model.config),
    ]
    for cache in caches:
        assert cache.rq_config.rope_key_mean is True
        model(ids, past_key_values=cache, use_cache=True)
    assert torch.equal(caches[0].layers[1].k_codes, caches[1].layers[1].k_codes)


def test_a_calibration_from_another_rope_is_refused():
    """Pre-RoPE means only mean something under the RoPE they were measured with: a model whose RoPE differs (here
    its base frequency) gets a clear error instead of offsets turned at the wrong angles."""
    model = tiny_llama()
    ids = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(6))
    calibration = rqcompile.calibrate(model, ids, error_weights=False, chunk=64)
    other = _config(rope_theta=500000.0)
    with pytest.raises(ValueError, match="another RoPE"):
        IsoQuantCache(bits=3, calibration=calibration, model_config=other)
