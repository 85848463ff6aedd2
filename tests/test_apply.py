"""Specification of `rqcompile.apply` / `CompiledLM`: same logits and tokens as the eager compressed cache (RQCache)
with the same backend / bits / seed / calibration, real memory of the compressed buffers, capacity errors, and a
`torch.compile` lowering with no graph breaks and no recompiles across decode steps.
"""

from __future__ import annotations

import inspect

import pytest
import tiny_models
import torch
from torch._dynamo.utils import counters

from rqcompile.api import CompiledLM, apply
from rqcompile.cache import RQCache, RQCacheLayer
from rqcompile.calibrate import Calibration, calibrate
from rqcompile.config import RQConfig
from rqcompile.passes.exact_attention import attention_with_exact_tokens
from rqcompile.passes.kv_compress import KVCompressError
from rqcompile.runtime.generate import CacheOverflowError

MAX_LEN = 40
PROMPT = 9
TOTAL = 15
MODELS = ["qwen3_5", "qwen3", "llama"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def models(one_thread):
    return {name: tiny_models.ALL[name]() for name in MODELS}


@pytest.fixture(scope="module")
def lms(models) -> dict[str, CompiledLM]:
    """The defaults (iso, 3 bits, one sink token, fused), uncalibrated: `apply` says what that costs."""
    lms = {}
    for name, m in models.items():
        with pytest.warns(UserWarning, match="iso 3-bit without calibration"):
            lms[name] = apply(m, max_cache_len=MAX_LEN, prefill_logits="all")
    return lms


def _ids(n: int = TOTAL, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, tiny_models.VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _eager(model, cache: RQCache, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits of the eager model with the compressed cache: prefill `prompt` tokens, then one token at a time. The
    caches given here pass `calibration` explicitly (None where `apply` got none): the drop-in caches calibrate on
    the prompt by default, `apply`'s programs only with a `Calibration`."""
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        outs = [model(ids[:, :prompt], use_cache=True, **{kw: cache}).logits]
        for i in range(prompt, ids.shape[1]):
            outs.append(model(ids[:, i : i + 1], use_cache=True, **{kw: cache}).logits)
    return torch.cat(outs, dim=1)


def _steps(lm: CompiledLM, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits of the compiled programs: prefill `prompt` tokens, then one token at a time, on `ids`' device (each
    step's logits copied: a CUDA-graphed step reuses its output buffer)."""
    outs = [lm.prefill(ids[:, :prompt], torch.arange(prompt, device=ids.device))]
    for i in range(prompt, ids.shape[1]):
        outs.append(lm.decode(ids[:, i : i + 1], torch.tensor([i], device=ids.device)).clone())
    return torch.cat(outs, dim=1)


def _eager_greedy(model, cache: RQCache, ids: torch.Tensor, new: int) -> torch.Tensor:
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out, step = ids, ids
    with torch.no_grad():
        for _ in range(new):
            token = model(step, use_cache=True, **{kw: cache}).logits[:, -1].argmax(-1, keepdim=True)
            out, step = torch.cat([out, token], dim=1), token
    return out


@pytest.mark.parametrize("name", MODELS)
def test_logits_equal_the_eager_compressed_cache(models, lms, name):
    lm, ids = lms[name], _ids()
    ref = _eager(models[name], RQCache(lm.config, model_config=models[name].config, calibration=None), ids, PROMPT)
    got = _steps(lm, ids, PROMPT)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_greedy_generation_equals_the_eager_compressed_cache(models, lms, name):
    lm, ids = lms[name], _ids(PROMPT, seed=3)
    ref = _eager_greedy(models[name], RQCache(lm.config, model_config=models[name].config, calibration=None), ids, 12)
    assert torch.equal(lm.generate(ids, 12), ref)


def test_attributes(lms):
    lm = lms["qwen3_5"]
    assert lm.config.backend == "iso" and lm.config.bits == 3 and lm.config.sink_tokens == 1
    assert lm.model_config.model_type.startswith("qwen3_5")
    assert [s.layer_idx for s in lm.sites] == [1, 3]
    assert set(lm.quant_states) == {1, 3}
    assert lm.quant_states[1]["k"].bits == 3 and lm.quant_states[3]["v"].head_dim == 64
    assert len(lm.rewrites) == 4


def test_other_backend_mixed_bits_and_calibration_equal_eager(models):
    model = models["llama"]
    gen = torch.Generator().manual_seed(5)
    calib = Calibration(
        {(layer, "k", "mean"): torch.randn(2, 64, generator=gen) * 0.1 for layer in range(2)}
        | {(layer, "k", "scale"): torch.rand(2, 64, generator=gen) + 0.5 for layer in range(2)}
    )
    lm = apply(
        model,
        "iso",
        key_bits=4,
        value_bits=2,
        max_cache_len=MAX_LEN,
        calibration=calib,
        fuse=True,
        seed=7,
        prefill_logits="all",
    )
    assert (lm.config.k_bits, lm.config.v_bits, lm.config.seed) == (4, 2, 7)
    ids = _ids()
    ref = _eager(model, RQCache(lm.config, model_config=model.config, calibration=calib), ids, PROMPT)
    torch.testing.assert_close(_steps(lm, ids, PROMPT), ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(lm.quant_states[0]["k"].mean, calib.get(0, "k", "mean"))


@pytest.mark.parametrize("fuse", [True, False])
def test_per_layer_bits_and_scale_search_equal_eager(models, fuse):
    """`layer_bits` gives each layer its own code width (and buffer size); `scale_search` changes only the encoder."""
    from rqcompile.config import SCALE_SEARCH

    model = models["llama"]
    config = RQConfig(backend="rotor", key_bits=3, value_bits=2, layer_bits=((1, 4, 3),), scale_search=SCALE_SEARCH)
    lm = apply(model, config=config, max_cache_len=MAX_LEN, fuse=fuse, prefill_logits="all")
    assert [(lm.quant_states[i]["k"].bits, lm.quant_states[i]["v"].bits) for i in (0, 1)] == [(3, 2), (4, 3)]
    assert lm.buffers["k_codes_1"].shape[-1] == 64 * 4 // 8 and lm.buffers["k_codes_0"].shape[-1] == 64 * 3 // 8
    ids = _ids()
    ref = _eager(model, RQCache(config, model_config=model.config, calibration=None), ids, PROMPT)
    torch.testing.assert_close(_steps(lm, ids, PROMPT), ref, atol=1e-4, rtol=1e-4)


def test_memory_report_counts_the_real_buffers(lms):
    for lm in lms.values():
        report = lm.memory_report()
        per_site = 2 * 1 * 2 * MAX_LEN * (64 * 3 // 8 + 2 * (64 // 64))  # K+V, B=1, H=2: codes + fp16 norms
        # K+V, B=1, H=2: the sink token and the default 32-token window ring, 64 fp32 values each (the model dtype)
        exact = 2 * 1 * 2 * (1 + 32) * 64 * 4
        assert report.compressed_bytes == (per_site + exact) * len(lm.sites)
        assert report.bf16_bytes == 2 * 2 * 2 * MAX_LEN * 64 * len(lm.sites)
        assert report.compressed_bytes - exact * len(lm.sites) == sum(
            t.untyped_storage().nbytes() for t in lm.cache_tensors()[: 4 * len(lm.sites)]
        )
        # 3-bit + a norm per 64 (4.92x) plus 33 exact fp32 tokens: at 40 positions the exact tokens cost more than the
        # codes (the window pays off at long contexts: +0.013 bits/element at 32K in bf16)
        assert round(report.ratio, 2) == 0.54


def test_the_rewrite_report_says_what_rotation_the_default_resolved_to(models):
    report = apply(models["llama"], max_cache_len=16).rewrite_report()  # iso, head_dim 64: 4**3 mixes the group
    assert "rotation: iso, 3 block layers mixing each 64-coordinate norm group" in report
    one = apply(models["llama"], config=RQConfig(backend="planar", rotation_stages=1), max_cache_len=16)
    assert "rotation: planar, one layer of 2x2 blocks" in one.rewrite_report()
    assert "pre-RoPE" not in report  # only with RQConfig(rope_key_mean=True)
    assert "decode steps read their keys as a range" in report  # passes.decode_key_range
    unfused = apply(models["llama"], fuse=False, max_cache_len=16).rewrite_report()
    assert "not fused" in unfused and "as a range" not in unfused


def test_apply_leaves_no_float_kv_cache_allocated(models):
    """No float K/V cache of max_cache_len may stay alive once the programs are rewritten to the compressed one
    (capture runs against zero-stride placeholders; tests/test_capture.py checks that it never allocates one)."""
    import gc

    max_len = 3001  # a length no other tensor here has
    lm = apply(models["llama"], "planar", 3, max_cache_len=max_len)
    gc.collect()
    live = [
        t
        for t in gc.get_objects()
        if type(t) is torch.Tensor and t.dim() == 4 and t.shape[2] == max_len and t.dtype == torch.float32
    ]
    assert sum(t.untyped_storage().nbytes() for t in live) == 0  # placeholders only (or nothing) may remain
    assert lm.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3).shape == (1, 6)  # the programs still run


def test_cache_overflow_is_a_clear_error(lms):
    lm = lms["llama"]
    with pytest.raises(CacheOverflowError, match="longer than the cache"):
        lm.generate(_ids(MAX_LEN + 1), 1)
    with pytest.raises(CacheOverflowError, match="lower max_new_tokens"):
        lm.generate(_ids(30), 20)


def test_padded_prompts_are_a_clear_error(lms):
    """The programs take no attention mask: a tokenizer's mask is accepted when it marks no padding (same output as
    without it) and refused when it does, instead of attending the pads as text."""
    lm = lms["llama"]
    ids = _ids(6)
    plain = lm.generate(ids, 3)
    assert torch.equal(lm.generate(ids, 3, attention_mask=torch.ones_like(ids)), plain)
    padded = torch.ones_like(ids)
    padded[:, 0] = 0
    with pytest.raises(ValueError, match="cannot run padded prompts"):
        lm.generate(ids, 3, attention_mask=padded)
    with pytest.raises(ValueError, match="does not match input_ids"):
        lm.generate(ids, 3, attention_mask=torch.ones(1, 2, dtype=torch.long))


def test_model_without_attention_is_a_clear_error():
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    kwargs = tiny_models._qwen3_5_text_kwargs() | {"num_hidden_layers": 2, "layer_types": ["linear_attention"] * 2}
    torch.manual_seed(0)
    model = Qwen3_5ForCausalLM(Qwen3_5TextConfig(intermediate_size=64, **kwargs)).eval()
    with pytest.raises(KVCompressError, match="no attention subgraph matched.*found 0 aten.index_copy_"):
        apply(model, max_cache_len=8)


def test_functional_step_takes_and_returns_the_cache(lms):
    lm = lms["llama"]
    ids = _ids()
    lm.prefill(ids[:, :PROMPT], torch.arange(PROMPT))
    before = [t.clone() for t in lm.cache_tensors()]
    step = lm.functional_step("decode")
    logits, *new = step(ids[:, PROMPT : PROMPT + 1], torch.tensor([PROMPT]), *before)
    assert all(torch.equal(a, b) for a, b in zip(before, lm.cache_tensors(), strict=True))  # nothing hidden mutated
    ref = lm.decode(ids[:, PROMPT : PROMPT + 1], torch.tensor([PROMPT]))
    torch.testing.assert_close(logits, ref)
    assert all(torch.equal(a, b) for a, b in zip(new, lm.cache_tensors(), strict=True))
    assert len(new) == len(lm.cache_names)


def _compile_check(
    name: str, models, steps: int, config: RQConfig | None = None, calibration: Calibration | None = None
) -> None:
    model = models[name]
    lm = apply(model, "planar", 3, max_cache_len=PROMPT + steps + 2, config=config, calibration=calibration)
    ids = _ids(PROMPT, seed=4)
    eager_tokens = lm.generate(ids, steps + 1)
    eager_logits = _steps(lm, _ids(PROMPT + 3, seed=5), PROMPT)
    lm.compile()
    torch._dynamo.reset()
    counters.clear()
    lm.generate(ids, 2)  # compiles prefill and decode once
    compiled_graphs = counters["stats"]["unique_graphs"]
    assert compiled_graphs == 2 and not counters["graph_break"]
    tokens = lm.generate(ids, steps + 1)  # `steps` decode steps
    assert counters["stats"]["unique_graphs"] == compiled_graphs, "recompiled during decode"
    assert not counters["recompiles"] and not counters["graph_break"]
    assert torch.equal(tokens, eager_tokens)
    torch.testing.assert_close(_steps(lm, _ids(PROMPT + 3, seed=5), PROMPT), eager_logits, atol=1e-4, rtol=1e-4)


def test_compile_matches_eager_without_graph_breaks_or_recompiles(models):
    _compile_check("llama", models, steps=8)


def test_cuda_graphs_are_asked_for_the_decode_program_only(models, monkeypatch):
    """mode="reduce-overhead" pays off for the decode step (small kernels, the same shapes every step); prefill runs
    once per prompt at a new length, so it is compiled in the default mode."""
    asked = []
    monkeypatch.setattr(torch, "compile", lambda fn, **options: asked.append(options) or fn)
    apply(models["llama"], "planar", 3, max_cache_len=16).compile(mode="reduce-overhead")
    decode, prefill = asked
    assert decode == {"fullgraph": True, "mode": "reduce-overhead"}
    assert "mode" not in prefill and prefill["fullgraph"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen3_5", "llama"])
def test_compile_32_decode_steps(models, name):
    _compile_check(name, models, steps=32)


# -- uncompressed tokens (sink_tokens / residual_window): the same tokens exact as the eager RQCache -----------------

EXACT = RQConfig(backend="planar", bits=3, sink_tokens=3, residual_window=5)
EXACT_MODELS = ["llama", "qwen3_5"]


@pytest.fixture(scope="module")
def exact_lms(models) -> dict[str, CompiledLM]:
    return {
        name: apply(models[name], config=EXACT, max_cache_len=MAX_LEN, prefill_logits="all") for name in EXACT_MODELS
    }


@pytest.mark.parametrize("name", EXACT_MODELS)
def test_sink_and_window_logits_equal_the_eager_cache(models, exact_lms, name):
    """Prompts shorter than S, between S and W, longer than both (prefill attends to its own last W tokens exactly and
    to the earlier ones quantized), then decode steps past W; one program pair serves every sequence in turn. The
    programs are fused: rq::attention_lse on the codes merged with attention over the exact tokens."""
    lm, ids = exact_lms[name], _ids()
    assert lm.fused
    for prompt in (2, 4, PROMPT):
        ref = _eager(models[name], RQCache(EXACT, model_config=models[name].config, calibration=None), ids, prompt)
        torch.testing.assert_close(_steps(lm, ids, prompt), ref, atol=1e-4, rtol=1e-4)
    plain = _eager(
        models[name], RQCache(EXACT.replace(sink_tokens=0, residual_window=0), calibration=None), ids, PROMPT
    )
    assert (plain - ref).abs().max() > 1e-2  # the exact tokens do change the logits


@pytest.mark.parametrize(
    "config",
    [
        RQConfig(backend="iso", key_bits=4, value_bits=2, seed=3, sink_tokens=1),
        RQConfig(backend="rotor", bits=2, residual_window=3),
    ],
    ids=["sink-only", "window-only"],
)
def test_sink_only_and_window_only_with_calibration_equal_eager(models, config):
    model = models["llama"]
    gen = torch.Generator().manual_seed(2)
    calib = Calibration(
        {(layer, "k", "mean"): torch.randn(2, 64, generator=gen) * 0.1 for layer in range(2)}
        | {(layer, "v", "scale"): torch.rand(2, 64, generator=gen) + 0.5 for layer in range(2)}
    )
    lm = apply(model, config=config, max_cache_len=MAX_LEN, calibration=calib, prefill_logits="all")
    ids = _ids()
    ref = _eager(model, RQCache(config, model_config=model.config, calibration=calib), ids, PROMPT)
    torch.testing.assert_close(_steps(lm, ids, PROMPT), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("name", EXACT_MODELS)
def test_sink_and_window_on_the_gpu_equal_the_eager_cache(models, name):
    """The same on CUDA, where both paths run the Triton kernels: the fused programs rq::quantize + rq::attention_lse
    merged with the exact tokens, the eager cache rq::quantize / rq::dequantize + SDPA. Full mixing (the default
    rotation) and a window longer than the prompt's tail, decoded past it."""
    import copy

    model = copy.deepcopy(models[name]).cuda()
    config = EXACT.replace(backend="iso", rotation_stages=None)
    lm = apply(model, config=config, max_cache_len=MAX_LEN, prefill_logits="all")
    ids = _ids().cuda()
    ref = _eager(model, RQCache(config, model_config=model.config, calibration=None), ids, PROMPT)
    plain = _eager(model, RQCache(config.replace(residual_window=0), calibration=None), ids, PROMPT)
    got = _steps(lm, ids, PROMPT)
    assert torch.isfinite(got).all()
    err, effect = (got - ref).abs().max().item(), (plain - ref).abs().max().item()
    assert err < 0.2 * effect and err < 2e-2, (err, effect)


def test_sink_and_window_greedy_generation_equals_eager(models, exact_lms):
    lm, ids = exact_lms["qwen3_5"], _ids(PROMPT, seed=3)
    ref = _eager_greedy(
        models["qwen3_5"], RQCache(EXACT, model_config=models["qwen3_5"].config, calibration=None), ids, 12
    )
    assert torch.equal(lm.generate(ids, 12), ref)


def test_sink_and_window_sites_fuse_into_attention_over_codes_and_exact_tokens(models, exact_lms):
    lm = exact_lms["llama"]
    assert lm.fused
    ops = torch.ops.rq
    for gm in (lm.prefill_module, lm.decode_module):
        targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
        assert targets.count(attention_with_exact_tokens) == len(lm.sites)  # rq::attention_lse + exact tokens
        assert ops.dequantize.default not in targets
        assert torch.ops.aten.scaled_dot_product_attention.default not in targets
    unfused = apply(models["llama"], config=RQConfig(residual_window=4), max_cache_len=8, fuse=False)
    targets = [n.target for n in unfused.decode_module.graph.nodes if n.op == "call_function"]
    assert not unfused.fused and attention_with_exact_tokens not in targets and ops.dequantize.default in targets


def _fused_exact(model, config: RQConfig, calibration: Calibration | None = None) -> CompiledLM:
    return apply(model, config=config, max_cache_len=MAX_LEN, calibration=calibration, prefill_logits="all")


@pytest.mark.parametrize("name", EXACT_MODELS)
@pytest.mark.parametrize(
    "config",
    [EXACT, RQConfig(backend="iso", key_bits=4, value_bits=2, seed=3, sink_tokens=1), RQConfig(residual_window=4)],
    ids=["sink-and-window", "sink-only", "window-only"],
)
def test_fused_exact_attention_logits_equal_the_eager_cache(models, name, config):
    """With a calibrated key mean (not a constant shift against exact keys): prompts shorter and longer than S and
    W, then decode steps; rq::attention_lse reads the codes, no dequantize or SDPA is left at any site."""
    model = models[name]
    gen = torch.Generator().manual_seed(4)
    layers = range(model.config.num_hidden_layers)  # linear-attention layers' entries are never read
    calib = Calibration(
        {(layer, "k", "mean"): torch.randn(2, 64, generator=gen) * 0.3 for layer in layers}
        | {(layer, "v", "scale"): torch.rand(2, 64, generator=gen) + 0.5 for layer in layers}
    )
    lm, ids = _fused_exact(model, config, calib), _ids()
    for gm in (lm.prefill_module, lm.decode_module):
        targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
        assert targets.count(attention_with_exact_tokens) == len(lm.sites)
        assert torch.ops.rq.dequantize.default not in targets
        assert torch.ops.aten.scaled_dot_product_attention.default not in targets
    for prompt in (2, PROMPT):
        ref = _eager(model, RQCache(config, model_config=model.config, calibration=calib), ids, prompt)
        torch.testing.assert_close(_steps(lm, ids, prompt), ref, atol=1e-4, rtol=1e-4)


def test_sink_and_window_memory_and_functional_step(exact_lms):
    lm = exact_lms["llama"]
    report = lm.memory_report()
    exact_per_layer = 2 * 1 * 2 * (3 + 5) * 64 * 4  # K+V, B=1, H=2, S+W tokens, fp32 (the model dtype)
    assert all(m["window_bytes"] == exact_per_layer for m in report.layers.values())
    codes = 2 * 1 * 2 * MAX_LEN * (64 * 3 // 8 + 2)
    assert report.compressed_bytes == (codes + exact_per_layer) * len(lm.sites)
    assert report.compressed_bytes == sum(t.untyped_storage().nbytes() for t in lm.cache_tensors())
    names = lm.cache_names
    assert names[8:] == [f"{kv}_{part}_{i}" for i in (0, 1) for part in ("sink", "window") for kv in "kv"]
    ids = _ids()
    lm.prefill(ids[:, :PROMPT], torch.arange(PROMPT))
    before = [t.clone() for t in lm.cache_tensors()]
    logits, *new = lm.functional_step("decode")(ids[:, PROMPT : PROMPT + 1], torch.tensor([PROMPT]), *before)
    assert all(torch.equal(a, b) for a, b in zip(before, lm.cache_tensors(), strict=True))
    torch.testing.assert_close(logits, lm.decode(ids[:, PROMPT : PROMPT + 1], torch.tensor([PROMPT])))
    assert all(torch.equal(a, b) for a, b in zip(new, lm.cache_tensors(), strict=True))
    assert not torch.equal(new[names.index("k_window_0")], before[names.index("k_window_0")])


@pytest.mark.slow
def test_compile_with_sink_and_window(models):
    _compile_check("llama", models, steps=8, config=EXACT)


@pytest.mark.slow
def test_sink_and_window_onnx_round_trip(models, exact_lms, tmp_path):
    """The export helpers take the extra state generically: ONNX graphs generate the same tokens."""
    pytest.importorskip("onnxruntime")
    import rqcompile
    from rqcompile.export.lm import export_lm, functional_programs

    lm, ids = exact_lms["llama"], _ids(PROMPT, seed=6)
    reference = lm.generate(ids, 8)
    fn = functional_programs(lm, for_target="onnx")
    assert "k_window_0" in fn.state_names and "v_sink_1" in fn.state_names
    export_lm(fn, tmp_path / "onnx", target="onnx", progress=False)
    assert torch.equal(rqcompile.load(tmp_path / "onnx").generate(ids, 8, eos_token_id=[]), reference)


def test_export_method_writes_an_artifact_that_load_runs_token_identically(tmp_path):
    import rqcompile

    lm = apply(tiny_models.tiny_llama(), backend="iso", bits=4, max_cache_len=32)
    ids = _ids(6)
    expected = lm.generate(ids, max_new_tokens=5)
    lm.export(str(tmp_path / "artifact"), target="onnx")
    assert torch.equal(rqcompile.load(tmp_path / "artifact").generate(ids, max_new_tokens=5), expected)


@pytest.mark.parametrize("factory,batch", [("tiny_qwen3_5_moe", 1), ("tiny_llama", 2)])
def test_greedy_generation_equals_the_eager_cache_for_moe_and_batches(factory, batch):
    model = getattr(tiny_models, factory)()
    ids = torch.randint(3, 100, (batch, 7), generator=torch.Generator().manual_seed(0))
    lm = apply(model, backend="rotor", bits=3, max_cache_len=24, batch_size=batch)
    eager = model.generate(
        ids,
        past_key_values=RQCache(RQConfig(backend="rotor", bits=3), calibration=None),
        max_new_tokens=6,
        do_sample=False,
    )
    assert torch.equal(lm.generate(ids, max_new_tokens=6), eager)


# -- calibrated bit allocation: mixed widths and a per-head channel order, as the eager RQCache -----------------------

ALLOC = RQConfig(
    backend="planar", key_bits=3.5, value_bits=3, bit_allocation=(2, 3, 4, 5, 6), sink_tokens=0, residual_window=0
)


@pytest.fixture(scope="module")
def llama_calibration(models) -> Calibration:
    ids = torch.randint(0, tiny_models.VOCAB, (1, 96), generator=torch.Generator().manual_seed(9))
    return calibrate(models["llama"], ids)


@pytest.mark.parametrize("fuse", [False, True])
def test_calibrated_bit_allocation_equals_the_eager_cache(models, llama_calibration, fuse):
    model, calib = models["llama"], llama_calibration
    lm = apply(model, config=ALLOC, calibration=calib, max_cache_len=MAX_LEN, fuse=fuse, prefill_logits="all")
    k = lm.quant_states[0]["k"]
    assert not k.uniform and len(set(k.widths)) > 1 and k.bits_per_code == 3.5
    assert k.perm is lm.buffers["rq_k_perm_0"] and lm.buffers["k_codes_0"].shape[-1] == k.code_bytes == 28
    if fuse:  # rq::attention carries the layout (k_perm, v_perm, k_widths, v_widths after kv_len)
        (node, *_) = [n for n in lm.decode_module.graph.nodes if n.target == torch.ops.rq.attention.default]
        assert [str(a) for a in node.args[17:19]] == ["rq_k_perm_0", "rq_v_perm_0"]
        assert node.args[19] == list(k.widths) and node.args[20] == list(lm.quant_states[0]["v"].widths)
    ids = _ids()
    ref = _eager(model, RQCache(ALLOC, model_config=model.config, calibration=calib), ids, PROMPT)
    torch.testing.assert_close(_steps(lm, ids, PROMPT), ref, atol=1e-4, rtol=1e-4)
    assert "3.5-bit avg (" in lm.rewrite_report()


@pytest.mark.parametrize("fuse", [False, True])
def test_a_value_mean_in_the_calibration_is_added_back_as_by_the_eager_cache(models, fuse):
    """`calibrate(value_mean=True)`: V is quantized around its channel mean; the fused attention adds the mean back
    to its output (attention weights sum to 1), the unfused path to each dequantized value, like the eager cache."""
    model = models["llama"]
    ids = torch.randint(0, tiny_models.VOCAB, (1, 96), generator=torch.Generator().manual_seed(9))
    calib = calibrate(model, ids, value_mean=True)
    assert calib.get(0, "v", "mean").abs().max() > 0
    config = RQConfig(backend="iso", bits=3)
    lm = apply(model, config=config, calibration=calib, max_cache_len=MAX_LEN, fuse=fuse, prefill_logits="all")
    assert torch.equal(lm.quant_states[0]["v"].mean, calib.get(0, "v", "mean"))
    ids = _ids()
    ref = _eager(model, RQCache(config, model_config=model.config, calibration=calib), ids, PROMPT)
    torch.testing.assert_close(_steps(lm, ids, PROMPT), ref, atol=1e-4, rtol=1e-4)


def test_bit_allocation_without_calibration_is_refused_before_capture(models):
    with pytest.raises(ValueError, match="bit_allocation=.*needs a calibration with error weights"):
        apply(models["llama"], config=ALLOC, max_cache_len=8)
    no_weights = Calibration({(0, "k", "mean"): torch.zeros(2, 64)})
    with pytest.raises(ValueError, match="needs a calibration with error weights"):
        apply(models["llama"], config=ALLOC, calibration=no_weights, max_cache_len=8)
    with pytest.raises(ValueError, match="apply needs a rqcompile.Calibration .*'prompt' is for the eager caches"):
        apply(models["llama"], calibration="prompt", max_cache_len=8)


def test_a_cuda_graph_needs_the_programs_on_a_cuda_device(lms):
    with pytest.raises(ValueError, match="cuda_graph=True needs the programs on a CUDA device"):
        lms["llama"].compile(cuda_graph=True)


@pytest.mark.gpu
def test_the_per_layer_compiled_step_replayed_from_one_cuda_graph_equals_the_eager_programs(models):
    """`compile(regional=True, prefill=False, cuda_graph=True)` (the whole-model setup of BENCHMARKS.md "Session 11")
    on the hybrid model: teacher-forced logits and the final cache state as the eager programs', so the warm-up runs
    that capturing needs leave the linear-attention state as it was."""
    import copy

    model = copy.deepcopy(models["qwen3_5"]).cuda()
    with pytest.warns(UserWarning, match="without calibration"):
        eager = apply(model, max_cache_len=MAX_LEN, prefill_logits="all")
        graphed = apply(model, max_cache_len=MAX_LEN, prefill_logits="all")
    graphed.compile(regional=True, prefill=False, cuda_graph=True)
    ids = _ids().cuda()

    want, got = _steps(eager, ids, PROMPT), _steps(graphed, ids, PROMPT)
    assert torch.isfinite(got).all()
    assert (got - want).abs().max().item() < 2e-2
    for name, a, b in zip(eager.cache_names, eager.cache_tensors(), graphed.cache_tensors(), strict=True):
        if a.dtype == torch.uint8:  # packed codes: a rare flip from float rounding in the compiled rotation
            assert (a != b).float().mean().item() < 1e-3, name
        else:
            assert (a.float() - b.float()).abs().max().item() < 2e-2, name


# -- the pre-RoPE key offset (RQConfig.rope_key_mean): the same keys as the eager cache, on every path ----------------
ROPE_WINDOW = RQConfig(rope_key_mean=True, residual_window=4)  # + the default sink token
ROPE_PLAIN = RQConfig(rope_key_mean=True, sink_tokens=0, residual_window=0)
DEFAULT_SHORT_WINDOW = RQConfig(residual_window=4)  # rope_key_mean left to "auto"


def _rope_calibration(model) -> Calibration:
    """A post-RoPE residual mean and a large pre-RoPE key mean per layer (linear-attention layers' are never read)."""
    gen = torch.Generator().manual_seed(4)
    layers = range(model.config.get_text_config(decoder=True).num_hidden_layers)
    return Calibration(
        {(layer, "k", "mean"): torch.randn(2, 64, generator=gen) * 0.3 for layer in layers}
        | {(layer, "k", "rope_mean"): torch.randn(2, 64, generator=gen) * 2 for layer in layers}
    )


@pytest.mark.parametrize("name", ["qwen3_5", "llama"])  # partial rotary (a quarter of the head) and full rotary
@pytest.mark.parametrize("config", [ROPE_PLAIN, ROPE_WINDOW], ids=["codes-only", "sink-and-window"])
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "dequantize+sdpa"])
def test_rope_key_mean_logits_equal_the_eager_cache(models, name, config, fuse):
    """The programs subtract RoPE_slot(m) before rq::quantize and add it back on read (fused: as rq::attention's
    per-key score term), as the eager cache does: same logits over a prefill and decode steps."""
    model = models[name]
    calib = _rope_calibration(model)
    lm = apply(model, config=config, max_cache_len=MAX_LEN, calibration=calib, fuse=fuse, prefill_logits="all")
    ids = _ids()
    ref = _eager(model, RQCache(config, model_config=model.config, calibration=calib), ids, PROMPT)
    torch.testing.assert_close(_steps(lm, ids, PROMPT), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "dequantize+sdpa"])
def test_rope_key_mean_with_a_calibrated_bit_allocation_equals_eager(models, fuse):
    """The offset composes with a bit allocation's layout (per-head channel order, mixed widths): `calibrate` measures
    the error weights on the offset-free keys, and the programs equal the eager cache."""
    model = models["llama"]
    ids = torch.randint(0, tiny_models.VOCAB, (1, 200), generator=torch.Generator().manual_seed(1))
    calib = calibrate(model, ids, key_scale=True, value_scale=True, rope_key_mean=True, chunk=100)
    config = ALLOC.replace(rope_key_mean=True, residual_window=4)
    lm = apply(model, config=config, max_cache_len=MAX_LEN, calibration=calib, fuse=fuse, prefill_logits="all")
    ref = _eager(model, RQCache(config, model_config=model.config, calibration=calib), _ids(), PROMPT)
    torch.testing.assert_close(_steps(lm, _ids(), PROMPT), ref, atol=1e-4, rtol=1e-4)


def test_rope_key_mean_is_in_play(models):
    """The equality above is not vacuous: the same programs without the offset (the Calibration's residual mean
    only) give other logits, and so does the eager cache without it."""
    model = models["llama"]
    calib = _rope_calibration(model)
    plain_calib = Calibration({key: t for key, t in calib.stats.items() if key[2] != "rope_mean"})
    ids = _ids()
    got = _steps(apply(model, config=ROPE_WINDOW, max_cache_len=MAX_LEN, calibration=calib), ids, PROMPT)
    plain_config = ROPE_WINDOW.replace(rope_key_mean=False)
    plain = _steps(apply(model, config=plain_config, max_cache_len=MAX_LEN, calibration=plain_calib), ids, PROMPT)
    eager_plain = _eager(model, RQCache(plain_config, calibration=plain_calib), ids, PROMPT)
    assert (plain[:, -1] - got[:, -1]).abs().max() > 1e-2
    assert (eager_plain[:, -1] - got[:, -1]).abs().max() > 1e-2


def test_rope_key_mean_graphs_hold_the_offset_and_no_materialized_cache(models):
    """After kv_compress each site subtracts the offset from its new keys; after fuse_attention the keys are read
    only by rq::attention (with its rope_ab / rope_inv_freq arguments) or attention_with_exact_tokens: no
    dequantize, no add_slot_offset, no SDPA left."""
    from rqcompile.passes.kv_compress import add_slot_offset, subtract_slot_offset
    from rqcompile.quant.rope_offset import rope_score_weights

    model, calib = models["llama"], _rope_calibration(models["llama"])
    for config, reader in ((ROPE_PLAIN, torch.ops.rq.attention.default), (ROPE_WINDOW, attention_with_exact_tokens)):
        unfused = apply(model, config=config, max_cache_len=MAX_LEN, calibration=calib, fuse=False)
        targets = [n.target for n in unfused.decode_module.graph.nodes if n.op == "call_function"]
        assert targets.count(subtract_slot_offset) == targets.count(add_slot_offset) == len(unfused.sites)
        lm = apply(model, config=config, max_cache_len=MAX_LEN, calibration=calib)
        for gm in (lm.prefill_module, lm.decode_module):
            nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
            targets = [n.target for n in nodes]
            assert targets.count(subtract_slot_offset) == targets.count(reader) == len(lm.sites)
            for gone in (
                add_slot_offset,
                torch.ops.rq.dequantize.default,
                torch.ops.aten.scaled_dot_product_attention.default,
            ):
                assert gone not in targets
            if reader is torch.ops.rq.attention.default:
                assert targets.count(rope_score_weights) == len(lm.sites)
                calls = [n for n in nodes if n.target is reader]
                assert all(len(n.args) == 23 and n.args[21] is not None for n in calls)
        assert "pre-RoPE mean" in lm.rewrite_report() and "pre-RoPE" not in unfused.rewrite_report().replace(
            "pre-RoPE mean", ""
        )
        assert "pre-RoPE mean" in lm.rewrite_report()
        names = dict(lm.prefill_module.named_buffers())
        assert names["rq_k_rope_mean_0"].shape == (2, 64) and names["rq_rope_inv_freq_0"].dtype == torch.float32


@pytest.mark.parametrize("config", [ROPE_PLAIN, ROPE_WINDOW], ids=["codes-only", "sink-and-window"])
def test_rope_table_gives_every_rope_site_one_shared_cos_sin_table_and_changes_no_logit(models, config):
    """passes.rope_table (what `apply` runs on a CUDA decode program; here by hand on the CPU's): every site that
    reads the offset term gets `rope_table=` one buffer for the whole program, fp16 [max_cache_len, 2 ROPE_K] of the
    model's frequencies; the program's logits stay exactly what they were (the torch implementation ignores it), and
    the memory report counts the table's bytes."""
    from rqcompile.kernels.rope_term import rope_table as build_table
    from rqcompile.passes.rope_table import rope_table

    model = models["qwen3_5"]  # partial rotary: 8 of 32 pairs, ROPE_K 16
    lm = apply(model, config=config, max_cache_len=MAX_LEN, calibration=_rope_calibration(model))
    assert "rq_rope_table" not in dict(lm.decode_module.named_buffers())  # not on the CPU
    ids = _ids()
    before, held = _steps(lm, ids, PROMPT), lm.memory_report().compressed_bytes
    rope_table(lm.decode_module)
    reader = torch.ops.rq.attention.default if config is ROPE_PLAIN else attention_with_exact_tokens
    calls = [n for n in lm.decode_module.graph.nodes if n.op == "call_function" and n.target is reader]
    assert len(calls) == len(lm.sites) == lm.decode_module.meta["rq_rope_table"]
    assert {n.kwargs["rope_table"].target for n in calls} == {"rq_rope_table"}
    table = lm.decode_module.get_buffer("rq_rope_table")
    inv_freq = lm.decode_module.get_buffer("rq_rope_inv_freq_3")
    assert table.shape == (MAX_LEN, 32) and torch.equal(table, build_table(inv_freq, MAX_LEN))
    assert torch.equal(_steps(lm, ids, PROMPT), before)
    assert lm.memory_report().compressed_bytes == held + MAX_LEN * 32 * 2  # it grows with the cache: counted
    rope_table(lm.decode_module)  # again: nothing to add
    assert lm.decode_module.meta["rq_rope_table"] == 0


def test_a_decode_program_with_a_rope_table_exports_to_onnx_without_it(models, tmp_path):
    """A CUDA model's decode program carries the table; its ONNX export computes the term from the frequencies (the
    translation ignores the table, and no initializer holds it) and generates what the programs generate."""
    pytest.importorskip("onnxruntime")
    import onnx

    import rqcompile
    from rqcompile.passes.rope_table import rope_table

    model = models["llama"]
    lm = apply(model, config=ROPE_WINDOW, max_cache_len=MAX_LEN, calibration=_rope_calibration(model))
    ids = _ids(PROMPT, seed=6)
    reference = lm.generate(ids, 8)
    assert rope_table(lm.decode_module).meta["rq_rope_table"] == len(lm.sites)
    lm.export(str(tmp_path / "onnx"), target="onnx")
    assert torch.equal(rqcompile.load(tmp_path / "onnx").generate(ids, 8, eos_token_id=[]), reference)
    graph = onnx.load(str(tmp_path / "onnx" / "decode.onnx"), load_external_data=False).graph
    assert not [t.name for t in [*graph.input, *graph.initializer] if "rope_table" in t.name]


def test_rope_table_leaves_programs_without_the_offset_alone(models):
    from rqcompile.passes.rope_table import rope_table

    lm = apply(models["llama"], config=RQConfig(residual_window=4), max_cache_len=MAX_LEN)
    code = lm.decode_module.code
    assert rope_table(lm.decode_module).meta["rq_rope_table"] == 0 and lm.decode_module.code == code


def test_rope_key_mean_needs_a_calibration_that_measured_it(models):
    """Compiled programs cannot measure the prompt: `apply` asks for `calibrate(..., rope_key_mean=True)`, and a
    Calibration measured that way is refused without the option (its key statistics are of the offset-free keys).
    Both before the capture."""
    model, calib = models["llama"], _rope_calibration(models["llama"])
    plain = Calibration({key: t for key, t in calib.stats.items() if key[2] != "rope_mean"})
    for calibration in (None, plain):
        with pytest.raises(ValueError, match="rope_key_mean=True\\) needs each layer's pre-RoPE key mean"):
            apply(model, config=ROPE_PLAIN, calibration=calibration)
    with pytest.raises(ValueError, match="use it with RQConfig\\(rope_key_mean=None or True\\)"):
        apply(model, config=RQConfig(rope_key_mean=False), calibration=calib)


@pytest.mark.parametrize("name", ["qwen3_5", "llama"])
def test_by_default_apply_removes_the_offset_exactly_when_the_calibration_carries_it(models, name):
    """The defaults are the best measured configuration (QUALITY.md "Session 15"): `calibrate(model, ids)` measures
    the pre-RoPE key means, `apply(model, calibration=calib)` then removes the offset, and its logits equal the
    default drop-in cache given the same Calibration (no model_config: the Calibration carries the RoPE). A
    Calibration measured without it gives programs without it; so does no Calibration."""
    model = models[name]
    vocab = model.config.get_text_config(decoder=True).vocab_size
    sample = torch.randint(0, vocab, (1, 128), generator=torch.Generator().manual_seed(2))
    calib = calibrate(model, sample, chunk=64)
    config = DEFAULT_SHORT_WINDOW  # the defaults, with a window short enough for this sequence to be quantized
    lm = apply(model, config=config, max_cache_len=MAX_LEN, calibration=calib, prefill_logits="all")
    assert lm.config.rope_key_mean is True and "pre-RoPE" in lm.rewrite_report()
    ids = _ids()
    got = _steps(lm, ids, PROMPT)
    torch.testing.assert_close(
        got, _eager(model, RQCache(config, calibration=calib), ids, PROMPT), atol=1e-4, rtol=1e-4
    )
    without = calibrate(model, sample, chunk=64, rope_key_mean=False)
    plain = apply(model, config=config, max_cache_len=MAX_LEN, calibration=without, prefill_logits="all")
    assert plain.config.rope_key_mean is False
    assert (_steps(plain, ids, PROMPT)[:, -1] - got[:, -1]).abs().max() > 1e-2  # the equality above is not vacuous


def test_rope_key_mean_compiles_without_graph_breaks(models):
    _compile_check("llama", models, steps=4, config=ROPE_WINDOW, calibration=_rope_calibration(models["llama"]))


@pytest.mark.slow
def test_rope_key_mean_onnx_round_trip(models, tmp_path):
    """The offset's buffers travel as the ONNX graphs' initializers: the exported LM generates the same tokens."""
    pytest.importorskip("onnxruntime")
    import rqcompile

    model = models["llama"]
    lm = apply(model, config=ROPE_WINDOW, max_cache_len=MAX_LEN, calibration=_rope_calibration(model))
    ids = _ids(PROMPT, seed=6)
    reference = lm.generate(ids, 8)
    lm.export(str(tmp_path / "onnx"), target="onnx")
    loaded = rqcompile.load(tmp_path / "onnx")
    assert loaded.artifact.rq_config.rope_key_mean
    assert torch.equal(loaded.generate(ids, 8, eos_token_id=[]), reference)


@pytest.mark.gpu
def test_the_default_calibration_on_the_gpu_equals_the_eager_cache(models):
    """On CUDA: `apply` with `calibrate()`'s default Calibration (post- and pre-RoPE key means, key scales from the
    queries) on the Triton kernels equals the eager cache given the same Calibration, far closer than the programs
    without any calibration."""
    import copy

    model = copy.deepcopy(models["qwen3_5"]).cuda()
    vocab = model.config.get_text_config(decoder=True).vocab_size
    sample = torch.randint(0, vocab, (1, 128), generator=torch.Generator().manual_seed(2)).cuda()
    calib = calibrate(model, sample, chunk=64)
    assert calib.has_rope_mean and calib.get(next(iter(calib.layers)), "k", "scale") is not None
    lm = apply(model, config=DEFAULT_SHORT_WINDOW, max_cache_len=MAX_LEN, calibration=calib, prefill_logits="all")
    ids = _ids().cuda()
    got = _steps(lm, ids, PROMPT)
    ref = _eager(model, RQCache(DEFAULT_SHORT_WINDOW, calibration=calib), ids, PROMPT)
    plain = _eager(model, RQCache(DEFAULT_SHORT_WINDOW, calibration=None), ids, PROMPT)
    assert torch.isfinite(got).all()
    err, effect = (got - ref).abs().max().item(), (plain - ref).abs().max().item()
    assert err < 0.2 * effect and err < 2e-2, (err, effect)


@pytest.mark.gpu
def test_rope_key_mean_on_the_gpu_equals_the_eager_cache(models):
    """On CUDA (Triton kernels on both sides): the fused programs' logits equal the eager cache's within the usual
    kernel-vs-kernel tolerance, far closer than the same programs without the offset."""
    import copy

    model = copy.deepcopy(models["qwen3_5"]).cuda()
    calib = _rope_calibration(model)
    lm = apply(model, config=ROPE_WINDOW, max_cache_len=MAX_LEN, calibration=calib, prefill_logits="all")
    assert lm.decode_module.meta["rq_rope_table"] == len(lm.sites)  # passes.rope_table ran (CUDA only)
    ids = _ids().cuda()
    got = _steps(lm, ids, PROMPT)
    ref = _eager(model, RQCache(ROPE_WINDOW, model_config=model.config, calibration=calib), ids, PROMPT)
    plain = _eager(model, RQCache(ROPE_WINDOW.replace(rope_key_mean=False), calibration=None), ids, PROMPT)
    assert torch.isfinite(got).all()
    err, effect = (got - ref).abs().max().item(), (plain - ref).abs().max().item()
    assert err < 0.2 * effect and err < 2e-2, (err, effect)


# -- V's codes packed along keys (RQConfig(value_layout="keys")): the same numbers in another byte order -------------

ALONG_KEYS_LEN = 48  # a multiple of the 16-token block


def _along_keys_pair(model, fuse: bool = True, **config) -> tuple[CompiledLM, CompiledLM]:
    """The programs with V packed per token and along keys, otherwise the same config."""
    base = RQConfig(backend="planar", bits=3, **config)
    return tuple(
        apply(
            model,
            config=base.replace(value_layout=layout),
            max_cache_len=ALONG_KEYS_LEN,
            prefill_logits="all",
            fuse=fuse,
        )
        for layout in ("coordinates", "keys")
    )


@pytest.mark.parametrize("name", ["llama", "qwen3_5"])
@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize(
    "exact", [{"sink_tokens": 0, "residual_window": 0}, {"residual_window": 5}], ids=["all-coded", "sink-and-window"]
)
def test_values_packed_along_keys_give_the_logits_of_values_packed_per_token(models, name, fuse, exact):
    """Prompts that end inside a 16-token block and on its edge, decode steps across blocks: the codes are the same,
    only their order in memory differs, so every logit is the same."""
    per_token, along = _along_keys_pair(models[name], fuse, **exact)
    ids = _ids(40, seed=6)
    for prompt in (9, 16):
        torch.testing.assert_close(_steps(along, ids, prompt), _steps(per_token, ids, prompt), atol=1e-5, rtol=1e-5)


def test_values_packed_along_keys_are_written_by_block_and_read_in_place(models):
    """The graph: V's codes are written by rq::write_along_keys (no index_copy_ on them), K's as before, and the
    fused attention reads V along keys; the buffer holds the layout (pack_along_keys of the per-token codes)."""
    from rqcompile.quant.packing import pack_along_keys

    per_token, along = _along_keys_pair(models["llama"], residual_window=0)
    write = torch.ops.rq.write_along_keys.default
    for gm in (along.prefill_module, along.decode_module):
        calls = [n for n in gm.graph.nodes if n.op == "call_function"]
        assert sum(n.target is write for n in calls) == len(along.sites)
        copied = [n.args[0].target for n in calls if n.target is torch.ops.aten.index_copy_.default]
        assert not any(t.startswith("v_codes") for t in copied) and sum(t.startswith("k_codes") for t in copied)
        attention = [n for n in calls if n.target in (torch.ops.rq.attention.default, attention_with_exact_tokens)]
        assert len(attention) == len(along.sites) and all(n.kwargs.get("v_along_keys") for n in attention)
    ids = _ids(40, seed=6)
    _steps(along, ids, 20), _steps(per_token, ids, 20)
    layer = along.sites[0].layer_idx
    stored = along.decode_module.get_buffer(f"v_codes_{layer}")
    assert torch.equal(stored, pack_along_keys(per_token.decode_module.get_buffer(f"v_codes_{layer}"), 3, 64))


def test_values_packed_along_keys_need_whole_blocks_and_the_programs(models):
    with pytest.raises(KVCompressError, match="multiple of 16"):
        apply(models["llama"], config=RQConfig(value_layout="keys"), max_cache_len=40)
    with pytest.raises(ValueError, match="value_layout"):  # the eager caches dequantize; they gain nothing from it
        RQCacheLayer(RQConfig(value_layout="keys"), layer_idx=0)


def test_values_packed_along_keys_compile_without_graph_breaks(models):
    per_token, along = _along_keys_pair(models["llama"])
    ids = _ids(PROMPT, seed=4)
    eager = along.generate(ids, 9)
    along.compile()
    torch._dynamo.reset()
    counters.clear()
    assert torch.equal(along.generate(ids, 9), eager) and torch.equal(per_token.generate(ids, 9), eager)
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 2


def _keys_m_flags(monkeypatch, flag: str) -> list:
    """A spy on keys-m's eager launches: the list each launch appends its `flag` meta-argument to."""
    from rqcompile.kernels import attention as kattn

    seen, real = [], kattn._attn_keys_m_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(kwargs[flag])
                return real[grid](*args, **kwargs)

            return launch

        def __getattr__(self, name):
            return getattr(real, name)

    monkeypatch.setattr(kattn, "_attn_keys_m_kernel", Spy())
    return seen


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "torch.compile"])
def test_values_packed_along_keys_on_the_gpu_are_read_in_place_by_keys_m(monkeypatch, compiled):
    """On CUDA at head_dim 128 (keys-m's shape): the decode steps' attention reads V along keys in place (the
    kernel's VKEYS build, no per-token copy), the Triton write kernel fills the blocks, and the logits are the
    per-token layout's (the same codes; the kernels' sums differ only in order)."""
    model = tiny_models.tiny_llama_head_dim_128().cuda()
    vkeys = _keys_m_flags(monkeypatch, "VKEYS") if not compiled else []  # wrap_triton takes the kernel itself
    per_token, along = _along_keys_pair(model, residual_window=4)
    ids = _ids(40, seed=6).cuda()
    if compiled:
        along.compile()
    got, ref = _steps(along, ids, 9), _steps(per_token, ids, 9)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, atol=2e-3, rtol=2e-3)
    assert compiled or (True in vkeys and False in vkeys)  # eager: both layouts ran keys-m, one of them VKEYS


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "torch.compile"])
def test_a_calibrated_decode_on_keys_m_reads_the_rope_table_and_gives_the_logits_it_gives_without(
    monkeypatch, compiled
):
    """On CUDA at head_dim 128 (keys-m's shape) with the pre-RoPE key offset: the decode program holds the table,
    keys-m's decode launches read it (ROPE_TABLE), and the logits, eager or compiled, are those of the same programs
    computing the cos / sin (the same codes; the term's cos / sin differ by fp16 rounding and the turned angles'
    drift), while the offset itself moves them far more."""
    from unittest import mock

    import rqcompile.api

    model = tiny_models.tiny_llama_head_dim_128().cuda()
    gen = torch.Generator().manual_seed(4)
    calib = Calibration(
        {(layer, "k", "mean"): torch.randn(2, 128, generator=gen) * 0.3 for layer in range(2)}
        | {(layer, "k", "rope_mean"): torch.randn(2, 128, generator=gen) * 2 for layer in range(2)}
    )
    config = RQConfig(rope_key_mean=True, residual_window=4)
    lm = apply(model, config=config, max_cache_len=48, calibration=calib, prefill_logits="all")
    with mock.patch.object(rqcompile.api, "rope_table", lambda gm: gm):
        turned = apply(model, config=config, max_cache_len=48, calibration=calib, prefill_logits="all")
    plain_calib = Calibration({key: t for key, t in calib.stats.items() if key[2] != "rope_mean"})
    plain_config = config.replace(rope_key_mean=False)
    plain = apply(model, config=plain_config, max_cache_len=48, calibration=plain_calib, prefill_logits="all")
    assert lm.decode_module.meta["rq_rope_table"] == len(lm.sites) and "rq_rope_table" not in turned.decode_module.meta
    assert lm.memory_report().compressed_bytes == turned.memory_report().compressed_bytes + 48 * 128 * 2
    tables = []
    if compiled:
        for program in (lm, turned, plain):
            program.compile()
    else:  # wrap_triton takes the kernel itself
        tables = _keys_m_flags(monkeypatch, "ROPE_TABLE")
    ids = _ids(40, seed=6).cuda()
    got = _steps(lm, ids, 9)
    assert compiled or (tables and all(tables))  # eager: every keys-m launch (the decode steps') read the table
    ref, without = _steps(turned, ids, 9), _steps(plain, ids, 9)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, atol=2e-3, rtol=2e-3)
    assert (without - ref).abs().max().item() > 0.1


def test_by_default_values_are_packed_along_keys_only_where_the_gpu_decode_kernel_reads_them_in_place(models):
    """value_layout=None ("auto") resolves per program: on the CPU every reader would re-pack a copy, so V stays per
    token; on CUDA, keys where every site's decode shape is the keys-m kernel's (norm groups of 128, <= 16 query
    heads per KV head, V at 2-3 bits, whole 16-token blocks, fused attention)."""
    from rqcompile.api import _value_layout
    from rqcompile.passes.capture import AttentionSite

    with pytest.warns(UserWarning):
        assert apply(models["llama"], max_cache_len=48).config.value_layout == "coordinates"  # the CPU
    cuda = torch.device("cuda")
    site = AttentionSite(3, "k", "v", num_kv_heads=4, num_heads=24, head_dim=256, max_cache_len=4096)  # Qwen3.5-27B
    auto = RQConfig()
    assert _value_layout(auto, [site], cuda, 4096, fuse=True) == "keys"
    assert _value_layout(auto, [site], torch.device("cpu"), 4096, fuse=True) == "coordinates"
    assert _value_layout(auto, [site], cuda, 4096, fuse=False) == "coordinates"  # dequantize + SDPA: re-packs
    assert _value_layout(auto, [site], cuda, 4100, fuse=True) == "coordinates"  # not whole blocks
    assert _value_layout(auto.replace(value_bits=4), [site], cuda, 4096, fuse=True) == "coordinates"
    assert _value_layout(auto.replace(layer_bits=((3, 3, 4),)), [site], cuda, 4096, fuse=True) == "coordinates"
    small = AttentionSite(0, "k", "v", num_kv_heads=2, num_heads=4, head_dim=64, max_cache_len=4096)  # SmolLM2-like
    assert _value_layout(auto, [site, small], cuda, 4096, fuse=True) == "coordinates"
    wide = AttentionSite(0, "k", "v", num_kv_heads=1, num_heads=32, head_dim=128, max_cache_len=4096)  # 32 rows
    assert _value_layout(auto, [wide], cuda, 4096, fuse=True) == "coordinates"
    assert _value_layout(auto.replace(value_layout="keys"), [small], torch.device("cpu"), 48, fuse=True) == "keys"


@pytest.mark.gpu
def test_a_batch_on_the_gpu_attends_each_row_to_its_own_valid_keys():
    """apply's programs at batch 2 on CUDA (the default layout: V along keys at head_dim 128) against the eager
    cache: every row's logits, decode steps included. Session 20 found rows b >= 1 reading past an expanded kv_len
    (the whole static cache, or too few keys); a batch-1 test cannot see that."""
    model = tiny_models.tiny_llama_head_dim_128().cuda()
    config = model.config
    with pytest.warns(UserWarning):
        lm = apply(model, max_cache_len=ALONG_KEYS_LEN * 4, batch_size=2, prefill_logits="all")
    assert lm.config.value_layout == "keys"
    ids = torch.cat([_ids(40, seed=7), _ids(40, seed=8)]).cuda()
    got = _steps(lm, ids, 9)
    cache = RQCache(lm.config.replace(value_layout="coordinates"), model_config=config, calibration=None)
    ref = _eager(model, cache, ids, 9)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, atol=2e-2, rtol=2e-2)
