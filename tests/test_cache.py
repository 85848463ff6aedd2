"""Drop-in caches: they behave like a transformers cache of dequantized values, while holding only codes + norms."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_llama, tiny_qwen3, tiny_qwen3_5
from transformers import DynamicCache
from transformers.cache_utils import LinearAttentionLayer

from rqcompile.cache import IsoQuantCache, MemoryReport, PlanarQuantCache, RotorQuantCache, RQCache, RQCacheLayer
from rqcompile.calibrate import MIN_PROMPT_TOKENS, calibrate, channel_stats
from rqcompile.config import RQConfig
from rqcompile.ops import dequantize_state, quantize_state
from rqcompile.quant.quantizer import make_state


class FakeQuantCache(DynamicCache):
    """Reference: a plain DynamicCache that stores each new token already quantized and dequantized, except the first
    `sink_tokens` tokens of the sequence, stored as they are. Uncalibrated, or with `calibration="prompt"` each
    layer's states carry the statistics of its first K/V (first token left out) when there are enough of them: the
    key mean, and K/V scales where the rotation keeps coordinates apart (`RQConfig.calibrates_scales`). With a
    `residual_window` it stores the exact history and returns it with every token but the sink and the last
    `residual_window` ones quantized and dequantized (per-token quantization: re-quantizing the history each step
    gives the same values as quantizing each token once)."""

    def __init__(self, config: RQConfig, model_config, calibration: str | None = None) -> None:
        super().__init__(config=model_config)
        self.rq_config = config
        self.calibration = calibration
        self.states: dict[int, tuple] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        heads, head_dim = key_states.shape[1], key_states.shape[-1]
        if layer_idx not in self.states:
            stats = {"k": {}, "v": {}}
            if self.calibration == "prompt" and key_states.shape[-2] - 1 >= MIN_PROMPT_TOKENS:
                scale = self.rq_config.calibrates_scales
                stats = {
                    kind: channel_stats(x[:, :, 1:], mean=kind == "k", scale=scale)
                    for kind, x in (("k", key_states), ("v", value_states))
                }
            make = lambda kind: make_state(
                self.rq_config,
                layer_idx=layer_idx,
                kind=kind,
                num_heads=heads,
                head_dim=head_dim,
                mean=stats[kind].get("mean"),
                scale=stats[kind].get("scale"),
            )
            self.states[layer_idx] = (make("k"), make("v"))
        k_state, v_state = self.states[layer_idx]
        window, sink = self.rq_config.residual_window, self.rq_config.sink_tokens
        if window:  # the exact history, viewed with all but the sink and the window quantized
            keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
            start, stop = sink, max(keys.shape[-2] - window, sink)

            def view(x, s):
                quantized = dequantize_state(*quantize_state(x[:, :, start:stop], s), s, x.dtype)
                return torch.cat([x[:, :, :start], quantized, x[:, :, stop:]], dim=2)

            return view(keys, k_state), view(values, v_state)
        seen = self.get_seq_length(layer_idx) if layer_idx < len(self.layers) else 0
        exact = min(max(sink - seen, 0), key_states.shape[-2])

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


@pytest.mark.parametrize(
    "cache_cls,backend", [(PlanarQuantCache, "planar"), (IsoQuantCache, "iso"), (RotorQuantCache, "rotor")]
)
def test_each_named_cache_is_an_rq_cache_of_its_backend(cache_cls, backend):
    """`XQuantCache(bits, **options)` is `RQCache(RQConfig(backend=x, bits=bits, **options))`."""
    cache = cache_cls(bits=4, residual_window=8)
    assert isinstance(cache, RQCache)
    assert cache.rq_config == RQCache(RQConfig(backend=backend, bits=4, residual_window=8)).rq_config


@pytest.mark.parametrize("cache_cls", [PlanarQuantCache, IsoQuantCache, RotorQuantCache])
@pytest.mark.parametrize("calibration", ["default", None])
def test_quickstart_generate_matches_a_cache_of_dequantized_values(model, cache_cls, calibration):
    """The quickstart (`cache_cls(bits=3)`: calibrated on its prompt, the last 32 tokens exact) and an uncalibrated
    cache generate exactly what a cache of dequantized values, with the same statistics and window, generates. The
    prompt is longer than the window, and generation moves tokens out of it."""
    ids = _prompt(model, length=40)
    cache = cache_cls(bits=3) if calibration == "default" else cache_cls(bits=3, calibration=None)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=8, do_sample=False)
    reference = model.generate(
        ids,
        past_key_values=FakeQuantCache(cache.rq_config, model.config, cache.calibration),
        max_new_tokens=8,
        do_sample=False,
    )
    assert torch.equal(out, reference)
    assert cache.get_seq_length() == ids.shape[1] + 7  # the last generated token is never fed back
    calibrated = cache.layers[_first_attention_layer(model)].k_state.mean.any()
    assert calibrated == (calibration == "default")


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
    cache = PlanarQuantCache(bits=3, sink_tokens=0, residual_window=0)  # codes and norms only (exact tokens: own bytes)
    model.generate(_prompt(model, length=40), past_key_values=cache, max_new_tokens=10, do_sample=False)
    report = cache.memory_report()
    assert report.ratio == pytest.approx(expected_ratio, rel=0.02)
    assert round(expected_ratio, 2) in (4.92, 5.12)
    layer = cache.layers[0]
    # Only codes and norms are held: no tensor of the cache has the model's float dtype.
    assert layer.k_codes.dtype == torch.uint8 and layer.k_norms.dtype == torch.float16
    assert layer.k_window is None and layer.keys is None and layer.values is None


def test_a_memory_report_says_larger_when_a_short_context_outweighs_bf16():
    """A short chat is held mostly as exact sink and window tokens plus fixed metadata and can take more bytes than
    bf16: the report says "larger" there rather than "0.78x smaller"."""
    long = MemoryReport({0: {"compressed_bytes": 100, "window_bytes": 0, "bf16_bytes": 431}})
    short = MemoryReport({0: {"compressed_bytes": 1000, "window_bytes": 290, "bf16_bytes": 1000}})
    assert long.versus_bf16() == "4.31x smaller than bf16" and "(4.31x smaller than bf16)" in str(long)
    assert short.versus_bf16() == "1.29x larger than bf16" and "(1.29x larger than bf16)" in str(short)


def test_separate_key_and_value_bits_are_stored_at_their_own_width():
    model = tiny_llama()
    cache = RQCache(RQConfig(backend="iso", key_bits=4, value_bits=2, residual_window=0))
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
    cfg = RQConfig(backend="rotor", bits=3, residual_window=0)  # every token past the sink in the compressed store
    ours, reference = RQCache(cfg, calibration=None), FakeQuantCache(cfg, model.config)
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
    """Beam search with the default prompt calibration (`generate` repeats the prompt for the beams before the
    prefill, so the pooled measurement is that of the prompt) and the beams reordered in the compressed store."""
    ids = _prompt(model, batch=1)
    cfg = RQConfig(backend="planar", bits=4, residual_window=0)  # the beams reordered in the compressed store
    kwargs = dict(max_new_tokens=6, num_beams=3, do_sample=False, num_return_sequences=2)
    got = model.generate(ids, past_key_values=RQCache(cfg), **kwargs)
    want = model.generate(ids, past_key_values=FakeQuantCache(cfg, model.config, "prompt"), **kwargs)
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
    cache = PlanarQuantCache(bits=2, sink_tokens=2, residual_window=0)
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
    cache = RQCache(cfg, model_config=config, calibration=None)
    got = model.generate(ids, past_key_values=cache, max_new_tokens=8, do_sample=False)
    want = model.generate(ids, past_key_values=FakeQuantCache(cfg, config), max_new_tokens=8, do_sample=False)
    assert torch.equal(got, want)
    assert all(layer.is_sliding for layer in cache.layers)


def test_prompt_calibration_measures_each_sequence_on_its_own_prompt():
    """`calibration="prompt"` with one layer of blocks: each layer measures its key mean and K/V scales on the first
    K/V it is given (the prompt), sink token left out, exactly as `calibrate` measures sample text. Layer 0 sees the
    same K/V as `calibrate` on that prompt, so its statistics are equal (later layers see K/V shaped by the compressed
    layers before them). `reset()` starts a new sequence, which measures its own prompt."""
    model = tiny_llama()
    ids = _prompt(model, batch=1, length=40)
    cache = RQCache(RQConfig(backend="iso", bits=3, rotation_stages=1), calibration="prompt")
    model(ids, past_key_values=cache, use_cache=True)
    reference = calibrate(model, ids, key_scale=True, value_scale=True, error_weights=False, rope_key_mean=False)
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


@pytest.mark.parametrize("backend", ["iso", "planar", "rotor", "hadamard"])
def test_prompt_calibration_of_a_mixed_norm_group_measures_the_key_mean_only(backend):
    """Once a rotation mixes the whole norm group (the default full mixing, hadamard), per-channel scales hurt
    (QUALITY.md "Session 10": KL 0.422 with the prompt's scales vs 0.293 without, at 8K tokens): the prompt gives the
    key mean only, as `calibrate(..., key_scale=False, value_scale=False)` measures it, and the scales stay 1."""
    model = tiny_llama()
    ids = _prompt(model, batch=1, length=40)
    config = RQConfig(backend=backend, bits=3)
    assert not config.calibrates_scales and config.replace(rotation_stages=1).calibrates_scales != (
        backend == "hadamard"
    )
    cache = RQCache(config, calibration="prompt")
    model(ids, past_key_values=cache, use_cache=True)
    reference = calibrate(model, ids, key_scale=False, value_scale=False, error_weights=False, rope_key_mean=False)
    layer = cache.layers[0]
    assert torch.allclose(layer.k_state.mean, reference.get(0, "k", "mean"), atol=1e-6)
    assert layer.k_state.mean.abs().max() > 1e-3  # really measured
    assert torch.all(layer.k_state.scale == 1) and torch.all(layer.v_state.scale == 1)


def _calibrated(cache) -> list[bool]:
    """Per compressed layer: do its states carry a measured key mean (an uncalibrated state's mean is zero)?"""
    return [bool(layer.k_state.mean.any()) for layer in cache.layers if isinstance(layer, RQCacheLayer)]


@pytest.mark.parametrize("cache_cls", [RQCache, PlanarQuantCache, IsoQuantCache, RotorQuantCache])
def test_the_default_calibration_is_measured_on_the_prompt_and_none_stays_uncalibrated(cache_cls):
    """Every drop-in cache calibrates on its prompt unless told otherwise: after the prompt's forward each layer's
    states are exactly those of an explicit `calibration="prompt"` (layer 0: `calibrate` on that prompt's K/V), so
    the logits are the same; `calibration=None` keeps the uncalibrated states, and its logits differ."""
    model = tiny_llama()
    ids = _prompt(model, batch=1, length=48)  # longer than the default window: some tokens are quantized
    make = (lambda **kw: RQCache(RQConfig(), **kw)) if cache_cls is RQCache else (lambda **kw: cache_cls(bits=3, **kw))
    caches = {"default": make(), "prompt": make(calibration="prompt"), "none": make(calibration=None)}
    logits = {name: model(ids, past_key_values=c, use_cache=True).logits for name, c in caches.items()}
    assert caches["default"].calibration == "prompt" and caches["none"].calibration is None
    default, explicit, none = (caches[name].layers[0] for name in ("default", "prompt", "none"))
    reference = calibrate(model, ids, error_weights=False, rope_key_mean=False)
    assert torch.allclose(default.k_state.mean, reference.get(0, "k", "mean"), atol=1e-6)
    for kind in "kv":
        for name in ("mean", "scale"):
            got, want = getattr(default, f"{kind}_state"), getattr(explicit, f"{kind}_state")
            assert torch.equal(getattr(got, name), getattr(want, name)), (kind, name)
    assert torch.equal(logits["default"], logits["prompt"])
    assert all(_calibrated(caches["default"])) and not any(_calibrated(caches["none"]))
    assert torch.all(none.k_state.scale == 1) and torch.all(none.v_state.scale == 1)
    assert not torch.allclose(logits["default"], logits["none"], atol=1e-3)


def test_a_short_prompt_stays_uncalibrated_silently_by_default_but_warns_when_prompt_was_asked_for():
    """A prompt with fewer than MIN_PROMPT_TOKENS tokens after its first is not measured: the cache stays
    uncalibrated for the whole sequence (decode steps do not calibrate it later). Short chat prompts are common, so
    the default says nothing; an explicit `calibration="prompt"` warns (the same text from every layer)."""
    import warnings

    model = tiny_llama()
    short = _prompt(model, batch=1, length=MIN_PROMPT_TOKENS)  # MIN_PROMPT_TOKENS - 1 after the sink
    default = IsoQuantCache(bits=3)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model.generate(short, past_key_values=default, max_new_tokens=MIN_PROMPT_TOKENS + 2, do_sample=False)
    assert not [w for w in seen if "rqcompile" in str(w.message)]
    assert not any(_calibrated(default))
    assert all(torch.all(layer.k_state.scale == 1) for layer in default.layers)
    explicit = IsoQuantCache(bits=3, calibration="prompt")
    with pytest.warns(
        UserWarning, match=r"prompt has 7 tokens after the sink token \(< 8\).* stays uncalibrated"
    ) as seen:
        model(short, past_key_values=explicit, use_cache=True)
    ours = {str(w.message) for w in seen if "rqcompile" in str(w.message)}
    assert len(ours) == 1  # one text for all layers: Python's default filter shows it once
    assert not any(_calibrated(explicit))


def test_a_repetitive_prompt_leaves_the_layers_it_cannot_measure_uncalibrated():
    """A prompt of one repeated token gives some channels almost no spread; scales measured on it would blow up
    every later token's error (SmolLM2: decode-time ppl 429,042 for an fp 42, QUALITY.md "Degenerate prompts").
    A layer whose measured scales fall below MIN_PROMPT_SCALE stays uncalibrated instead: silently by default, with
    one warning when `calibration="prompt"` was asked for. A varied prompt of the same length still calibrates."""
    import warnings

    model = tiny_llama()
    repeated = torch.full((1, 24), 7)
    default = IsoQuantCache(bits=3)
    with warnings.catch_warnings(record=True) as seen, torch.no_grad():
        warnings.simplefilter("always")
        model(repeated, past_key_values=default, use_cache=True)
    assert not [w for w in seen if "rqcompile" in str(w.message)]
    assert not any(_calibrated(default))
    assert all(torch.all(layer.k_state.scale == 1) for layer in default.layers)
    explicit = IsoQuantCache(bits=3, calibration="prompt")
    with pytest.warns(UserWarning, match="channels with almost no spread") as seen, torch.no_grad():
        model(repeated, past_key_values=explicit, use_cache=True)
    assert len({str(w.message) for w in seen if "rqcompile" in str(w.message)}) == 1
    varied = IsoQuantCache(bits=3)
    with torch.no_grad():
        model(_prompt(model, batch=1, length=24), past_key_values=varied, use_cache=True)
    assert all(_calibrated(varied))


def test_a_copied_default_cache_keeps_the_default_calibration():
    """`copy.deepcopy(cache)` (transformers' prompt-reuse recipe) keeps the default: silent on a short prompt,
    calibrated on a long one."""
    import copy
    import warnings

    model = tiny_llama()
    cache = copy.deepcopy(IsoQuantCache(bits=3))
    with warnings.catch_warnings(record=True) as seen, torch.no_grad():
        warnings.simplefilter("always")
        model(_prompt(model, batch=1, length=4), past_key_values=cache, use_cache=True)
    assert not [w for w in seen if "rqcompile" in str(w.message)] and not any(_calibrated(cache))
    cache = copy.deepcopy(cache)  # a used one too
    cache.reset()
    with torch.no_grad():
        model(_prompt(model, batch=1, length=20), past_key_values=cache, use_cache=True)
    assert all(_calibrated(cache))


def test_eight_prompt_tokens_after_the_sink_are_enough_to_calibrate():
    """MIN_PROMPT_TOKENS is 8 (was 16): on SmolLM2 (QUALITY.md "Left padding", benchmarks/results/
    padding_short_min4.json) prompt calibration on 8 tokens after the sink already cut KL against no calibration on
    all three windows (0.36 / 0.33 / 0.50 vs 0.70 / 0.84 / 0.81), while 4 tokens gained nothing (one window worse).
    A 9-token prompt calibrates, an 8-token one does not."""
    assert MIN_PROMPT_TOKENS == 8
    model = tiny_llama()
    for length, calibrated in ((MIN_PROMPT_TOKENS + 1, True), (MIN_PROMPT_TOKENS, False)):
        cache = IsoQuantCache(bits=3)
        model(_prompt(model, batch=1, length=length), past_key_values=cache, use_cache=True)
        assert _calibrated(cache) == [calibrated] * model.config.num_hidden_layers, length


def test_reset_recalibrates_the_default_cache_on_the_next_prompt():
    """The default calibration belongs to one sequence: after `reset()` the next prompt is measured afresh (a prompt
    too short to measure leaves the next sequence free to calibrate, and a measured one is not carried over)."""
    model = tiny_llama()
    cache = IsoQuantCache(bits=3)
    model(_prompt(model, batch=1, length=4), past_key_values=cache, use_cache=True)  # too short: uncalibrated
    assert not any(_calibrated(cache))
    for seed in (1, 2):
        cache.reset()
        ids = _prompt(model, batch=1, length=20, seed=seed)
        model(ids, past_key_values=cache, use_cache=True)
        want = calibrate(model, ids, error_weights=False, rope_key_mean=False).get(0, "k", "mean")
        assert torch.allclose(cache.layers[0].k_state.mean, want, atol=1e-6), seed


def test_calibration_must_be_a_calibration_prompt_or_none():
    with pytest.raises(ValueError, match="calibration='stdlib': pass a rqcompile.Calibration"):
        IsoQuantCache(bits=3, calibration="stdlib")


# -- left-padded batches ------------------------------------------------------------------------------------------
def _left_padded(model, lengths=(12, 8, 5), seed=3):
    """A batch as a tokenizer with padding_side="left" gives it: rows of `lengths` tokens, pads (id 0) in front."""
    longest = max(lengths)
    rows = [_prompt(model, batch=1, length=n, seed=seed + i)[0] for i, n in enumerate(lengths)]
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, longest - row.numel() :] = row
        mask[b, longest - row.numel() :] = 1
    return ids, mask


def _model_passes_position_ids_to_the_cache(model) -> bool:
    """transformers 5.24 passes the attention's keyword arguments (position_ids among them) to Cache.update; 5.17
    passes none."""
    seen = {}

    class Probe(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            inner = kwargs.get("kwargs", kwargs)
            seen["position_ids"] = inner.get("position_ids") if isinstance(inner, dict) else None
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    model(_prompt(model, length=3), past_key_values=Probe(config=model.config), use_cache=True)
    return seen.get("position_ids") is not None


def _tell_padding(cache, model, mask, told: str) -> None:
    """How the cache learns the padding: from the position ids the model passes it (transformers 5.24), or from
    `set_attention_mask` (any version)."""
    if told == "set_attention_mask":
        cache.set_attention_mask(mask)
    elif not _model_passes_position_ids_to_the_cache(model):
        pytest.skip("this transformers does not pass position ids to Cache.update: set_attention_mask is the way")


TOLD = ["position ids", "set_attention_mask"]


def _first_attention_layer(model) -> int:
    types = getattr(model.config, "layer_types", None) or ["full_attention"]
    return types.index("full_attention")


@pytest.mark.parametrize("told", TOLD)
@pytest.mark.parametrize(
    "options", [dict(residual_window=0), dict(sink_tokens=2, residual_window=3)], ids=["sink1", "sink2-window3"]
)
def test_each_left_padded_row_keeps_its_own_first_real_tokens_exact(model, told, options):
    """Batched generation with left padding: the exact sink token of every row is that row's first real token, not
    the padding in front of it (the pads are stored, compressed, like any token; the attention mask hides them). The
    cache learns the padding from the position ids `generate` passes it (transformers 5.24), or from
    `set_attention_mask` (any version). The first attention layer sees the same K/V as an exact cache, so its
    history is compared with a DynamicCache's, position by position."""
    ids, mask = _left_padded(model)
    cache = IsoQuantCache(bits=3, **options)
    _tell_padding(cache, model, mask, told)
    exact = DynamicCache(config=model.config)
    for c in (cache, exact):
        model.generate(ids, attention_mask=mask, past_key_values=c, max_new_tokens=1, do_sample=False)
    idx = _first_attention_layer(model)
    keys, values = cache.layers[idx]._materialize()
    want_keys, want_values = exact.layers[idx].keys, exact.layers[idx].values
    sink, window = options.get("sink_tokens", 1), options.get("residual_window", 0)
    for b, first in enumerate((mask == 0).sum(-1).tolist()):
        exact_positions = set(range(first, first + sink)) | set(range(ids.shape[1] - window, ids.shape[1]))
        for t in range(first, ids.shape[1]):
            same = torch.equal(keys[b, :, t], want_keys[b, :, t]) and torch.equal(values[b, :, t], want_values[b, :, t])
            assert same == (t in exact_positions), (b, t)


@pytest.mark.parametrize("told", TOLD)
def test_a_left_padded_row_generates_what_it_generates_alone(told):
    """What a padded row generates does not depend on the padding: a row of 18 tokens padded to 24 in a batch gives
    the same greedy tokens as the row alone, at 3 bits (with the padding as its sink token it did not). Without
    calibration, or with a fixed `Calibration`; `calibration="prompt"` (the default) pools the whole batch's real
    tokens, so there a row in a batch is not exactly the row alone (the next test)."""
    model = tiny_llama()
    for seed in range(3):
        ids, mask = _left_padded(model, lengths=(24, 18), seed=seed)
        cache = IsoQuantCache(bits=3, calibration=None)
        _tell_padding(cache, model, mask, told)
        batch = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=8, do_sample=False)
        alone_cache = IsoQuantCache(bits=3, calibration=None)
        alone = model.generate(ids[1:, 6:], past_key_values=alone_cache, max_new_tokens=8, do_sample=False)
        assert torch.equal(batch[1, 6:], alone[0]), seed


@pytest.mark.parametrize("told", TOLD)
def test_prompt_calibration_of_a_padded_batch_measures_only_the_real_tokens(told):
    """`calibration="prompt"` on a left-padded batch measures exactly the rows' real tokens, each row's first (its
    sink) left out: the first layer's statistics are those of the rows run unpadded, pooled. The pads' K/V never
    enter them."""
    model = tiny_llama()
    ids, mask = _left_padded(model, lengths=(30, 24, 20))
    cache = RQCache(RQConfig(rotation_stages=1), calibration="prompt")  # one block layer: key mean and scales
    _tell_padding(cache, model, mask, told)
    model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0), past_key_values=cache)
    rows_keys, rows_values = [], []
    for b in range(ids.shape[0]):
        alone = DynamicCache(config=model.config)
        model(ids[b : b + 1, mask[b] == 1], past_key_values=alone, use_cache=True)
        rows_keys.append(alone.layers[0].keys[:, :, 1:])
        rows_values.append(alone.layers[0].values[:, :, 1:])
    want_k = channel_stats(torch.cat(rows_keys, dim=2), mean=True, scale=True)
    want_v = channel_stats(torch.cat(rows_values, dim=2), mean=False, scale=True)
    layer = cache.layers[0]
    assert torch.allclose(layer.k_state.mean, want_k["mean"], atol=1e-5)
    assert torch.allclose(layer.k_state.scale, want_k["scale"], atol=1e-5)
    assert torch.allclose(layer.v_state.scale, want_v["scale"], atol=1e-5)


def test_padding_is_read_from_the_position_ids_generate_builds():
    """The position ids of a sequence's first forward say which positions are padding when they are numbered as
    `generate` numbers a left-padded batch (mask.cumsum(-1) - 1, pads at 0); consecutive positions (from any start)
    mean no padding; any other numbering (right padding, packed sequences) says nothing."""
    from rqcompile.cache import _tokens_from_positions

    left = torch.tensor([[0, 1, 2, 3, 4], [0, 0, 0, 1, 2], [0, 0, 0, 0, 0]])
    assert _tokens_from_positions(left, 3, 5).tolist() == [
        [True] * 5,
        [False, False, True, True, True],
        [False, False, False, False, True],
    ]
    assert _tokens_from_positions(torch.arange(7, 12)[None], 2, 5).all()  # [1, T] broadcast, offset start
    assert _tokens_from_positions(torch.tensor([[0, 1, 2, 0, 0]]), 1, 5) is None  # right padding
    assert _tokens_from_positions(torch.tensor([[0, 1, 0, 1, 2]]), 1, 5) is None  # two packed sequences
    assert _tokens_from_positions(None, 2, 5) is None
    assert _tokens_from_positions(left, 3, 4) is None  # not this forward's positions


def test_a_batch_whose_padding_cannot_be_known_warns_once():
    """Without position ids (transformers 5.17) a batched prompt might be padded: the cache says so, once, and
    says what to do; `set_attention_mask` (even all ones) silences it. A single sequence cannot be padded: silent. So
    is a cache where nothing depends on the padding: no sink token and no prompt calibration (the default has one)."""
    import warnings

    k, v = torch.randn(2, 2, 20, 64), torch.randn(2, 2, 20, 64)
    cache = IsoQuantCache(bits=3)
    with pytest.warns(UserWarning, match=r"cannot tell which positions are padding.*set_attention_mask"):
        cache.update(k, v, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache.update(k, v, 1)  # once per cache
        told = IsoQuantCache(bits=3)
        told.set_attention_mask(torch.ones(2, 20, dtype=torch.long))
        told.update(k, v, 0)
        IsoQuantCache(bits=3).update(k[:1], v[:1], 0)
        IsoQuantCache(bits=3, sink_tokens=0, calibration=None).update(k, v, 0)  # nothing depends on the padding
    right = torch.arange(20).repeat(2, 1)
    right[1, 15:] = 0
    with pytest.warns(UserWarning, match="not those of a left-padded batch"):
        IsoQuantCache(bits=3).update(k, v, 0, kwargs={"position_ids": right})


def test_padding_misuse_gives_clear_errors():
    model = tiny_llama()
    ids, mask = _left_padded(model, lengths=(12, 8))
    cache = IsoQuantCache(bits=3)
    with pytest.raises(ValueError, match="only 0 .padding. and 1"):
        cache.set_attention_mask(mask * 2)
    with pytest.raises(ValueError, match="2D"):
        cache.set_attention_mask(mask[0])
    cache.set_attention_mask(mask[:, 1:])
    with pytest.raises(ValueError, match=r"set_attention_mask is \(2, 11\).*\[batch 2, 12 tokens\]"):
        model(ids, attention_mask=mask, past_key_values=cache)
    cache.reset()  # forgets the mask
    cache.set_attention_mask(mask)
    model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0), past_key_values=cache)
    with pytest.raises(ValueError, match="before the first forward"):
        cache.set_attention_mask(mask)
    with pytest.raises(ValueError, match="cannot crop this padded batch to 3 tokens"):
        cache.crop(3)  # the second row's sink token is at position 4
    cache.crop(-2)  # past the sink tokens: fine
    cache.reset()
    empty_row = mask.clone()
    empty_row[1] = 0
    cache.set_attention_mask(empty_row)
    with pytest.raises(ValueError, match="a row of this padded batch has 0 real tokens"):
        model(ids, attention_mask=mask, past_key_values=cache)


@pytest.mark.parametrize("told", TOLD)
def test_beam_search_on_a_padded_batch_keeps_every_beam_on_its_row_sink(told):
    """`generate` repeats each row for its beams / returned sequences; a mask given per row is repeated likewise,
    and reordering beams moves each row's sink with it."""
    model = tiny_llama()
    ids, mask = _left_padded(model, lengths=(9, 6))
    kwargs = dict(max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False)
    cache = RQCache(RQConfig(backend="planar", bits=4))
    _tell_padding(cache, model, mask, told)
    model.generate(ids, attention_mask=mask, past_key_values=cache, **kwargs)
    exact = DynamicCache(config=model.config)
    model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0), past_key_values=exact)
    layer = cache.layers[0]
    beams = [(0, 0)] * 3 + [(1, 3)] * 3  # (row, its first real position) of each beam the cache holds
    assert layer.row_sink_index.squeeze(-1).tolist() == [first for _, first in beams]
    keys, _ = layer._materialize()
    for beam, (row, first) in enumerate(beams):
        assert torch.equal(keys[beam, :, first], exact.layers[0].keys[row, :, first])
