"""`prompt_means=True`: a drop-in cache given a `Calibration` measures the key means (post- and pre-RoPE) afresh on
each prompt and takes everything else, key scales from the queries first, from the Calibration (QUALITY.md
"Session 16": the best calibration measured at 8K tokens for all three block backends)."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_models import tiny_llama, tiny_qwen3_5

import rqcompile
from rqcompile.cache import IsoQuantCache, PlanarQuantCache, RotorQuantCache, RQCache
from rqcompile.calibrate import Calibration
from rqcompile.config import RQConfig
from rqcompile.eval.window_view import BothViewsCache


def _ids(model, tokens: int, seed: int) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def calibration(llama):
    """calibrate()'s defaults (key means post- and pre-RoPE, key scales from the queries, error weights) on other
    tokens than the prompts below."""
    return rqcompile.calibrate(llama, _ids(llama, 96, seed=11), chunk=96)


def _prefill(model, cache: RQCache, ids: torch.Tensor) -> RQCache:
    model(ids, past_key_values=cache, use_cache=True)
    return cache


def test_the_means_are_the_prompts_and_the_rest_is_the_calibrations(llama, calibration):
    """The first layer's pre-RoPE and post-RoPE key means are what a prompt-calibrated cache measures on the same
    prompt (later layers' keys depend on what the earlier ones returned); every layer's key scales are the
    Calibration's (the prompt cannot measure them: they need the queries)."""
    ids = _ids(llama, 40, seed=2)
    combined = _prefill(llama, IsoQuantCache(bits=3, calibration=calibration, prompt_means=True), ids)
    prompt = _prefill(llama, IsoQuantCache(bits=3, model_config=llama.config), ids)
    assert combined.rq_config.rope_key_mean is True
    mine, theirs = combined.layers[0], prompt.layers[0]
    torch.testing.assert_close(mine.k_rope_mean, theirs.k_rope_mean, rtol=0, atol=0)
    torch.testing.assert_close(mine.k_state.mean, theirs.k_state.mean, rtol=0, atol=0)
    assert not torch.allclose(mine.k_rope_mean, calibration.get(0, "k", "rope_mean"), atol=1e-3)
    for layer, mine in enumerate(combined.layers):
        want = calibration.get(layer, "k", "scale")
        torch.testing.assert_close(mine.k_state.scale, want, rtol=0, atol=0)
        assert not torch.allclose(want, torch.ones_like(want))  # the scales really differ from the prompt's (none)


def test_it_writes_what_a_calibration_holding_the_prompts_means_writes(llama, calibration):
    """The whole meaning of the option: the cache behaves exactly as one given a Calibration whose key means are
    replaced by those it measured on the prompt (nothing else of the Calibration changes, nothing else is measured)."""
    ids = _ids(llama, 40, seed=3)
    combined = IsoQuantCache(bits=3, residual_window=4, calibration=calibration, prompt_means=True)
    out = llama.generate(ids, past_key_values=combined, max_new_tokens=8, do_sample=False)
    stats = dict(calibration.stats)
    for layer, measured in enumerate(combined.layers):
        stats[(layer, "k", "rope_mean")] = measured.k_rope_mean
        stats[(layer, "k", "mean")] = measured.k_state.mean
    by_hand = IsoQuantCache(bits=3, residual_window=4, calibration=Calibration(stats, "by hand", calibration.rope))
    assert torch.equal(out, llama.generate(ids, past_key_values=by_hand, max_new_tokens=8, do_sample=False))
    assert combined.layers[1].k_codes is not None  # tokens really were quantized
    assert torch.equal(combined.layers[1].k_codes, by_hand.layers[1].k_codes)


def test_a_prompt_too_short_to_measure_uses_the_calibration_as_it_is(llama, calibration):
    """Short chat prompts are common: instead of staying uncalibrated (the prompt calibration's fallback), the cache
    uses the Calibration whole, silently."""
    ids = _ids(llama, 6, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the cache warns with UserWarning
        combined = _prefill(llama, IsoQuantCache(bits=3, calibration=calibration, prompt_means=True), ids)
    given = _prefill(llama, IsoQuantCache(bits=3, calibration=calibration), ids)
    for mine, theirs in zip(combined.layers, given.layers, strict=True):
        assert torch.equal(mine.k_rope_mean, theirs.k_rope_mean)
        assert torch.equal(mine.k_state.mean, theirs.k_state.mean)


def test_a_repetitive_prompt_uses_the_calibration_as_it_is(llama, calibration):
    """A prompt whose K/V barely vary (one token repeated) cannot be measured either: the Calibration's means, the
    pre-RoPE one included, replace what was measured."""
    ids = torch.full((1, 32), 7)
    combined = _prefill(llama, IsoQuantCache(bits=3, calibration=calibration, prompt_means=True), ids)
    for layer, mine in enumerate(combined.layers):
        torch.testing.assert_close(mine.k_rope_mean, calibration.get(layer, "k", "rope_mean"), rtol=0, atol=0)
        torch.testing.assert_close(mine.k_state.mean, calibration.get(layer, "k", "mean"), rtol=0, atol=0)


def test_reset_measures_the_next_prompt_afresh(llama, calibration):
    cache = IsoQuantCache(bits=3, calibration=calibration, prompt_means=True)
    first = _prefill(llama, cache, _ids(llama, 40, seed=5)).layers[0].k_rope_mean.clone()
    cache.reset()
    second = _prefill(llama, cache, _ids(llama, 40, seed=6)).layers[0].k_rope_mean
    fresh = _prefill(llama, IsoQuantCache(bits=3, calibration=calibration, prompt_means=True), _ids(llama, 40, seed=6))
    assert not torch.equal(first, second)
    torch.testing.assert_close(second, fresh.layers[0].k_rope_mean, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [PlanarQuantCache, IsoQuantCache, RotorQuantCache], ids=lambda c: c.__name__)
def test_every_drop_in_cache_takes_it(cls, llama, calibration):
    cache = _prefill(llama, cls(bits=3, calibration=calibration, prompt_means=True), _ids(llama, 24, seed=7))
    assert cache.prompt_means and cache.layers[0].base is calibration


def test_batched_generate_on_a_hybrid_model():
    """Qwen3.5 (linear-attention layers, partial rotary), a left-padded batch through generate: runs, and the key
    means are the prompt's real tokens' (those a prompt-calibrated cache measures)."""
    model = tiny_qwen3_5()
    text = model.config.get_text_config(decoder=True)
    calibration = rqcompile.calibrate(model, _ids(model, 64, seed=8), chunk=64)
    ids = torch.randint(1, text.vocab_size, (2, 20), generator=torch.Generator().manual_seed(9))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    caches = [
        IsoQuantCache(bits=3, residual_window=4, calibration=calibration, prompt_means=True),
        IsoQuantCache(bits=3, residual_window=4, model_config=model.config),
    ]
    for cache in caches:
        cache.set_attention_mask(mask)
        out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=6, do_sample=False)
        assert out.shape == (2, 26)
    # the first attention layer (later ones see what the earlier ones returned)
    first = next(i for i, layer in enumerate(caches[0].layers) if hasattr(layer, "k_state"))
    torch.testing.assert_close(caches[0].layers[first].k_rope_mean, caches[1].layers[first].k_rope_mean, rtol=0, atol=0)


def test_the_window_view_keeps_the_option(llama, calibration):
    """The chunked evaluation of windowed caches rebuilds the cache: it must measure the same way."""
    view = BothViewsCache(IsoQuantCache(bits=3, calibration=calibration, prompt_means=True))
    assert view.prompt_means and view.calibration is calibration


def test_bad_uses_give_clear_errors(llama, calibration):
    for calib in ("prompt", None):
        with pytest.raises(ValueError, match="prompt_means=True .* pass calibration=rqcompile.calibrate"):
            IsoQuantCache(bits=3, calibration=calib, prompt_means=True)
    with pytest.raises(ValueError, match="prompt_means=True"):
        IsoQuantCache(bits=3, prompt_means=True)  # the default calibration is the prompt's
    with pytest.raises(ValueError, match="measured for RQConfig\\(rope_key_mean=True\\)"):
        IsoQuantCache(bits=3, calibration=calibration, prompt_means=True, rope_key_mean=False)
    other_model = Calibration({k: v for k, v in calibration.stats.items() if k[0] == 0}, "layer 0", calibration.rope)
    cache = RQCache(RQConfig(), calibration=other_model, prompt_means=True)
    with pytest.raises(ValueError, match="layer 1: .* no statistics for this layer"):
        _prefill(llama, cache, _ids(llama, 24, seed=10))


@pytest.mark.gpu
def test_on_the_gpu_it_measures_what_the_cpu_measures(llama, calibration):
    """On CUDA (a Calibration measured there, the Triton kernels writing): the first layer's means are the CPU
    cache's within float rounding, generate runs, and a short prompt falls back to the Calibration there too."""
    import copy

    model = copy.deepcopy(llama).cuda()
    calib = rqcompile.calibrate(model, _ids(llama, 96, seed=11).cuda(), chunk=96)
    ids = _ids(llama, 40, seed=12)
    cpu = _prefill(llama, IsoQuantCache(bits=3, calibration=calibration, prompt_means=True), ids)
    gpu = IsoQuantCache(bits=3, calibration=calib, prompt_means=True, residual_window=4)
    out = model.generate(ids.cuda(), past_key_values=gpu, max_new_tokens=8, do_sample=False)
    assert out.shape == (1, 48) and gpu.layers[0].k_codes.is_cuda
    torch.testing.assert_close(gpu.layers[0].k_rope_mean.cpu(), cpu.layers[0].k_rope_mean, rtol=1e-4, atol=1e-4)
    short = _prefill(model, IsoQuantCache(bits=3, calibration=calib, prompt_means=True), ids[:, :6].cuda())
    torch.testing.assert_close(short.layers[0].k_rope_mean, calib.get(0, "k", "rope_mean").cuda(), rtol=0, atol=0)
