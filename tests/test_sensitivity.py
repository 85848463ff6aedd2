"""`key_sensitivity` scores each attention layer by what quantizing its keys alone costs a copy of earlier text, and
`KeySensitivity.raise_keys` gives the highest-scoring layers wider keys."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import tiny_llama, tiny_qwen3_5

from rqcompile import KeySensitivity, RQConfig, key_sensitivity, models
from rqcompile.sensitivity import _ProbeCache

pytestmark = pytest.mark.usefixtures("one_thread")


def _ids(model, length: int) -> torch.Tensor:
    return torch.randint(3, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("part", ["k", "v"])
def test_probe_cache_compresses_the_probed_layers_part_and_nothing_else(part):
    """Keys by default; values (the research variant QUALITY.md "Session 38" measured) with part="v"."""
    model = tiny_llama(num_hidden_layers=3)
    cache = _ProbeCache(RQConfig(residual_window=0), 1, part, model_config=model.config, calibration=None)
    shape = (1, 2, 20, 64)
    for layer in range(3):
        keys, values = torch.randn(shape), torch.randn(shape)
        got = dict(zip("kv", cache.update(keys, values, layer), strict=True))
        sent = {"k": keys, "v": values}
        for kind in "kv":
            if layer == 1 and kind == part:
                assert not torch.equal(got[kind], sent[kind]), f"the probed layer's {kind} must be quantized"
                assert torch.equal(got[kind][:, :, :1], sent[kind][:, :, :1]), "the sink token stays exact"
                rel = (got[kind] - sent[kind]).norm() / sent[kind].norm()
                assert 0.02 < rel < 0.5, f"3-bit {kind} should be close but not equal, relative error {rel:.3f}"
            else:
                assert torch.equal(got[kind], sent[kind]), f"layer {layer}'s {kind} is not probed: it must stay exact"
    assert cache.attention_layers == [0, 1, 2]
    assert cache.get_seq_length() == 20
    with pytest.raises(ValueError, match="part must be 'k' or 'v'"):
        _ProbeCache(RQConfig(), 1, "q", model_config=model.config)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen3_5])
def test_every_attention_layer_gets_a_finite_score_and_only_those(factory):
    model = factory()
    layer_types = getattr(model.config, "layer_types", None) or ["full_attention"] * model.config.num_hidden_layers
    attention = [i for i, kind in enumerate(layer_types) if kind == "full_attention"]
    found = key_sensitivity(model, input_ids=_ids(model, 40), passage=16, gap=8, calibration=None)
    assert sorted(found.kl) == attention
    assert all(math.isfinite(kl) and kl >= 0 for kl in found.kl.values())
    assert any(kl > 0 for kl in found.kl.values()), "quantized keys must change some prediction"
    assert found.ranked() == sorted(attention, key=lambda i: -found.kl[i])


def test_the_probe_is_deterministic():
    model = tiny_llama()
    first = key_sensitivity(model, input_ids=_ids(model, 40), passage=16, gap=8)
    again = key_sensitivity(model, input_ids=_ids(model, 40), passage=16, gap=8)
    assert first == again


def test_raise_keys_widens_the_top_layers_keys_and_keeps_every_other_width():
    scores = KeySensitivity(kl={0: 0.1, 1: 0.5, 2: 0.3, 3: 0.0}, key_bits=3)
    config = RQConfig(bits=3, value_bits=2, layer_bits=((0, 3, 3),))
    raised = scores.raise_keys(config, layers=2)
    assert raised.layer_bits == ((0, 3, 3), (1, 4, 2), (2, 4, 2))
    assert raised.replace(layer_bits=()) == config.replace(layer_bits=())
    assert scores.raise_keys(config, layers=3).layer_bits == ((0, 4, 3), (1, 4, 2), (2, 4, 2))
    assert scores.raise_keys(config, layers=0) == config
    with pytest.raises(ValueError, match=r"layers must be in 0\.\.4"):
        scores.raise_keys(config, layers=5)
    with pytest.raises(ValueError, match=r"raise_keys\(bits=3\) would narrow the wider keys of layers \[1, 2\]"):
        scores.raise_keys(RQConfig(bits=4), layers=2, bits=3)


def test_bad_arguments_get_clear_errors():
    model = tiny_llama()
    with pytest.raises(ValueError, match="exactly one of tokenizer"):
        key_sensitivity(model)
    with pytest.raises(ValueError, match="needs passage \\+ gap = 24"):
        key_sensitivity(model, input_ids=_ids(model, 20), passage=16, gap=8)
    with pytest.raises(ValueError, match="passages must be in 1..3"):
        key_sensitivity(model, input_ids=_ids(model, 40), passages=4)


class _NoCacheLM(torch.nn.Module):
    """An LM that never writes K/V to the cache it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.config = tiny_llama().config
        self.embed = torch.nn.Embedding(self.config.vocab_size, self.config.vocab_size)
        self.device = torch.device("cpu")

    def forward(self, input_ids, past_key_values=None, use_cache=True, logits_to_keep=0):
        return type("Out", (), {"logits": self.embed(input_ids)})()


def test_a_model_without_attention_the_cache_sees_is_refused():
    with pytest.raises(ValueError, match="saw no attention layer"):
        key_sensitivity(_NoCacheLM(), input_ids=torch.arange(3, 30), passage=8, gap=4)


@pytest.fixture(scope="module")
def smollm2():
    return models.load_smollm2()


def test_on_smollm2_fewer_key_bits_cost_retrieval_more_and_layer_18_leads(smollm2):
    """The real model: 2-bit keys must cost more than 4-bit keys in total, and the layer the 8K copying windows
    found most in need of wide keys (18, QUALITY.md "Session 36") must rank first, as it does in the library probes
    QUALITY.md "Session 37" reports (iso and planar, two passages)."""
    model, tok = smollm2
    probe = {"tokenizer": tok, "passage": 64, "gap": 64, "passages": 1}
    two = key_sensitivity(model, RQConfig(bits=2), **probe)
    four = key_sensitivity(model, RQConfig(bits=4), **probe)
    assert sorted(two.kl) == list(range(30))
    assert sum(two.kl.values()) > 2 * sum(four.kl.values())
    assert two.ranked()[0] == 18 and four.ranked()[0] == 18


@pytest.mark.gpu
@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen3_5])
def test_on_the_gpu_it_scores_what_the_cpu_scores(factory):
    """On CUDA the probed layer's keys are written by the Triton kernels, not the torch reference; both code the same
    units, so each layer's score must be the CPU's up to float rounding (the model's own GPU matmuls included)."""
    import copy

    model = factory()
    ids = _ids(model, 40)
    probe = {"input_ids": ids, "passage": 16, "gap": 8, "calibration": None}
    cpu = key_sensitivity(model, **probe)
    gpu = key_sensitivity(copy.deepcopy(model).cuda(), **probe)
    assert sorted(gpu.kl) == sorted(cpu.kl)
    for layer, kl in cpu.kl.items():
        assert math.isfinite(gpu.kl[layer])
        assert gpu.kl[layer] == pytest.approx(kl, rel=0.05, abs=1e-6), f"layer {layer}"
