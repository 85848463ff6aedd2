"""Drop-in caches: they behave like a transformers cache of dequantized values, while holding only codes + norms."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_llama, tiny_qwen3, tiny_qwen3_5
from transformers import DynamicCache
from transformers.cache_utils import LinearAttentionLayer

from rqcompile.cache import IsoQuantCache, PlanarQuantCache, RotorQuantCache, RQCache, RQCacheLayer
from rqcompile.calibrate import calibrate
from rqcompile.config import RQConfig
from rqcompile.ops import dequantize_state, quantize_state
from rqcompile.quant.quantizer import make_state


class FakeQuantCache(DynamicCache):
    """Reference: a plain DynamicCache that stores each new token already quantized and dequantized, except the first
    `sink_tokens` tokens of the sequence, stored as they are."""

    def __init__(self, config: RQConfig, model_config) -> None:
        super().__init__(config=model_config)
        self.rq_config = config
        self.states: dict[int, tuple] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        heads, head_dim = key_states.shape[1], key_states.shape[-1]
        if layer_idx not in self.states:
            make = lambda kind: make_state(
                self.rq_config, layer_idx=layer_idx, kind=kind, num_heads=heads, head_dim=head_dim
            )
            self.states[layer_idx] = (make("k"), make("v"))
        k_state, v_state = self.states[layer_idx]
        seen = self.get_seq_length(layer_idx) if layer_idx < len(self.layers) else 0
        exact = min(max(self.rq_config.sink_tokens - seen, 0), key_states.shape[-2])

        def fake(x, s):
            quantized = dequantize_state(*quantize_state(x[:, :, exact:], s), s, x.dtype)
            return torch.cat([x[:, :, :exact], quantized], dim=2)

        return super().update(fake(key_states, k_state), fake(value_states, v_state), layer_idx, *args, **kwargs)


MODELS = {"qwen3_5": tiny_qwen3_5, "llama": tiny_llama, "qwen3": tiny_qwen3}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    return MODELS[request.param]()


def _prompt(model, batch=2, length=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (batch, length), generator=gen)


@pytest.mark.parametrize("cache_cls", [PlanarQuantCache, IsoQuantCache, RotorQuantCache])
def test_quickstart_generate_matches_a_cache_of_dequantized_values(model, cache_cls):
    ids = _prompt(model)
    cache = cache_cls(bits=3)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=8, do_sample=False)
    reference = model.generate(
        ids,
        past_key_values=FakeQuantCache(cache.rq_config, model.config),
        max_new_tokens=8,
        do_sample=False,
    )
    assert torch.equal(out, reference)
    assert cache.get_seq_length() == ids.shape[1] + 7  # the last generated token is never fed back


def test_hybrid_model_keeps_linear_attention_state_and_compresses_only_full_attention():
    model = tiny_qwen3_5()
    cache = IsoQuantCache(bits=3)
    model(_prompt(model), past_key_values=cache, use_cache=True)
    types = model.config.layer_types
    for layer_type, layer in zip(types, cache.layers):
        expected = LinearAttentionLayer if layer_type == "linear_attention" else RQCacheLayer
        assert isinstance(layer, expected)
    assert "linear_attention" in types and "full_attention" in types
    # Linear-attention states are transformers' own: same layout everywhere, and bit-identical before the first
    # compressed layer (later ones see hidden states that went through quantized attention).
    reference = DynamicCache(config=model.config)
    model(_prompt(model), past_key_values=reference, use_cache=True)
    first_full = types.index("full_attention")
    for idx, layer_type in enumerate(types):
        if layer_type == "linear_attention":
            for name in ("recurrent_states", "conv_states"):
                got, want = getattr(cache.layers[idx], name)[0], getattr(reference.layers[idx], name)[0]
                assert got.shape == want.shape and got.dtype == want.dtype
                if idx < first_full:
                    assert torch.equal(got, want)


def test_prebuilt_layout_from_model_config_equals_lazy_layout():
    model = tiny_qwen3_5()
    eager = PlanarQuantCache(bits=3, model_config=model.config)
    lazy = PlanarQuantCache(bits=3)
    ids = _prompt(model)
    a = model.generate(ids, past_key_values=eager, max_new_tokens=5, do_sample=False)
    b = model.generate(ids, past_key_values=lazy, max_new_tokens=5, do_sample=False)
    assert torch.equal(a, b)
    assert [type(x) for x in eager.layers] == [type(x) for x in lazy.layers]


@pytest.mark.parametrize("head_dim,expected_ratio", [(64, 16 / (3 + 16 / 64)), (128, 16 / (3 + 16 / 128))])
def test_bytes_held_match_the_format_arithmetic(head_dim, expected_ratio):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
    )
    model = LlamaForCausalLM(config).eval()
    cache = PlanarQuantCache(bits=3, sink_tokens=0)  # codes and norms only (a sink token adds its own bytes)
    model.generate(_prompt(model, length=40), past_key_values=cache, max_new_tokens=10, do_sample=False)
    report = cache.memory_report()
    assert report.ratio == pytest.approx(expected_ratio, rel=0.02)
    assert round(expected_ratio, 2) in (4.92, 5.12)
    layer = cache.layers[0]
    # Only codes and norms are held: no tensor of the cache has the model's float dtype.
    assert layer.k_codes.dtype == torch.uint8 and layer.k_norms.dtype == torch.float16
    assert layer.k_window is None and layer.keys is None and layer.values is None


def test_separate_key_and_value_bits_are_stored_at_their_own_width():
    model = tiny_llama()
    cache = RQCache(RQConfig(backend="iso", key_bits=4, value_bits=2))
    model(_prompt(model), past_key_values=cache, use_cache=True)
    head_dim = model.config.head_dim
    assert cache.layers[0].k_codes.shape[-1] == head_dim * 4 // 8
    assert cache.layers[0].v_codes.shape[-1] == head_dim * 2 // 8


def test_recent_window_keeps_the_last_tokens_exact():
    model = tiny_llama()
    window = 4
    cache = PlanarQuantCache(bits=2, residual_window=window, sink_tokens=0)
    exact = DynamicCache()
    ids = _prompt(model, length=10)
    model(ids, past_key_values=cache, use_cache=True)
    model(ids, past_key_values=exact, use_cache=True)
    layer = cache.layers[0]
    assert layer.k_window.shape[-2] == window and layer.k_codes.shape[-2] == 10 - window
    assert torch.equal(layer.k_window, exact.layers[0].keys[:, :, -window:])
    keys, _ = layer._materialize()
    assert not torch.allclose(keys[:, :, :-window], exact.layers[0].keys[:, :, :-window], atol=1e-3)


def _kv(cache, layer_idx):
    layer = cache.layers[layer_idx]
    return layer._materialize() if isinstance(layer, RQCacheLayer) else (layer.keys, layer.values)


def test_crop_reorder_and_batch_ops_act_on_the_compressed_store_like_on_dequantized_values():
    model = tiny_llama()
    cfg = RQConfig(backend="rotor", bits=3)
    ours, reference = RQCache(cfg), FakeQuantCache(cfg, model.config)
    ids = _prompt(model, batch=3, length=9)
    for cache in (ours, reference):
        model(ids, past_key_values=cache, use_cache=True)
        cache.crop(-2)
        cache.reorder_cache(torch.tensor([2, 0, 1]))
        cache.batch_repeat_interleave(2)
        cache.batch_select_indices(torch.tensor([0, 3, 5]))
    for idx in range(model.config.num_hidden_layers):
        for got, want in zip(_kv(ours, idx), _kv(reference, idx)):
            assert got.shape == want.shape == (3, model.config.num_key_value_heads, 7, model.config.head_dim)
            assert torch.equal(got, want)
    ours.reset()
    assert ours.get_seq_length() == 0


def test_beam_search_matches_the_dequantized_reference(model):
    ids = _prompt(model, batch=1)
    cfg = RQConfig(backend="planar", bits=4)
    kwargs = dict(max_new_tokens=6, num_beams=3, do_sample=False, num_return_sequences=2)
    got = model.generate(ids, past_key_values=RQCache(cfg), **kwargs)
    want = model.generate(ids, past_key_values=FakeQuantCache(cfg, model.config), **kwargs)
    assert torch.equal(got, want)


def test_unknown_backend_or_bits_and_nan_states_give_clear_errors():
    with pytest.raises(ValueError, match="bits=5"):
        IsoQuantCache(bits=5)
    with pytest.raises(ValueError, match="unknown backend"):
        RQCache(RQConfig(backend="turbo"))
    layer = RQCacheLayer(RQConfig(), layer_idx=0)
    bad = torch.randn(1, 2, 3, 64)
    bad[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        layer.update(bad, torch.randn(1, 2, 3, 64))


def test_sink_tokens_stay_exact_and_survive_crop():
    model = tiny_llama()
    cache = PlanarQuantCache(bits=2, sink_tokens=2)
    exact = DynamicCache()
    ids = _prompt(model, length=9)
    model(ids, past_key_values=cache, use_cache=True)
    model(ids, past_key_values=exact, use_cache=True)
    layer = cache.layers[0]
    assert layer.k_sink.shape[-2] == 2 and layer.k_codes.shape[-2] == 7 and cache.get_seq_length() == 9
    keys, _ = layer._materialize()
    assert torch.equal(keys[:, :, :2], exact.layers[0].keys[:, :, :2])
    assert not torch.allclose(keys[:, :, 2:], exact.layers[0].keys[:, :, 2:], atol=1e-3)
    cache.crop(-8)  # back into the sink: the next token refills it
    assert cache.get_seq_length() == 1 and layer.k_codes.shape[-2] == 0
    model(ids[:, 1:3], past_key_values=cache, use_cache=True)
    assert layer.k_sink.shape[-2] == 2 and layer.k_codes.shape[-2] == 1


def test_sliding_window_layers_give_the_same_generation_as_the_dequantized_reference():
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        sliding_window=6,
    )
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()
    ids = _prompt(model, batch=1, length=10)
    cfg = RQConfig(backend="iso", bits=4)
    cache = RQCache(cfg, model_config=config)
    got = model.generate(ids, past_key_values=cache, max_new_tokens=8, do_sample=False)
    want = model.generate(ids, past_key_values=FakeQuantCache(cfg, config), max_new_tokens=8, do_sample=False)
    assert torch.equal(got, want)
    assert all(layer.is_sliding for layer in cache.layers)


def test_prompt_calibration_measures_each_sequence_on_its_own_prompt():
    """`calibration="prompt"`: each layer measures its key mean and K/V scales on the first K/V it is given (the
    prompt), sink token left out, exactly as `calibrate` measures sample text. Layer 0 sees the same K/V as
    `calibrate` on that prompt, so its statistics are equal (later layers see K/V shaped by the compressed layers
    before them). `reset()` starts a new sequence, which measures its own prompt."""
    model = tiny_llama()
    ids = _prompt(model, batch=1, length=40)
    cache = RQCache(RQConfig(backend="iso", bits=3), calibration="prompt")
    model(ids, past_key_values=cache, use_cache=True)
    reference = calibrate(model, ids, error_weights=False)
    layer = cache.layers[0]
    assert torch.allclose(layer.k_state.mean, reference.get(0, "k", "mean"), atol=1e-6)
    assert torch.allclose(layer.k_state.scale, reference.get(0, "k", "scale"), atol=1e-6)
    assert torch.allclose(layer.v_state.scale, reference.get(0, "v", "scale"), atol=1e-6)
    assert not layer.v_state.mean.any()  # values get no mean (softmax cannot absorb it)
    first = layer.k_state.mean.clone()
    model.generate(ids, past_key_values=cache, max_new_tokens=2, do_sample=False)  # decode keeps the statistics
    assert torch.equal(layer.k_state.mean, first)
    cache.reset()
    model(_prompt(model, batch=1, length=40, seed=5), past_key_values=cache, use_cache=True)
    assert not torch.allclose(layer.k_state.mean, first)


def test_prompt_calibration_warns_when_the_prompt_is_too_short_to_measure():
    model = tiny_llama()
    cache = RQCache(RQConfig(backend="iso", bits=3), calibration="prompt")
    with pytest.warns(UserWarning, match="has 7 tokens after the sink token .* stays uncalibrated"):
        model(_prompt(model, batch=1, length=8), past_key_values=cache, use_cache=True)
    assert not cache.layers[0].k_state.mean.any() and torch.all(cache.layers[0].k_state.scale == 1)


def test_calibration_must_be_a_calibration_prompt_or_none():
    with pytest.raises(ValueError, match="calibration='stdlib': pass a rqcompile.Calibration"):
        IsoQuantCache(bits=3, calibration="stdlib")
