"""Specification of `rqcompile.passes.capture`: what the exported programs look like and that they compute the model.

Every test runs on tiny random models (tests/tiny_models.py); each model is exported once per module.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tiny_models
import torch
from transformers import DynamicCache

from rqcompile.passes.capture import ATTN_IMPLEMENTATION, CapturedLM, CaptureModule, capture

aten = torch.ops.aten
B = 2
MAX_LEN = 96  # > one 64-token chunk of the gated delta rule
PROMPT = 70
STEPS = 3
MODELS = ["llama", "qwen3", "qwen3_5", "qwen3_5_moe"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def models(one_thread) -> dict[str, torch.nn.Module]:
    return {name: tiny_models.ALL[name]() for name in MODELS}


@pytest.fixture(scope="module")
def captured(models) -> dict[str, CapturedLM]:
    return {name: capture(m, max_cache_len=MAX_LEN, batch_size=B, prefill_logits="all") for name, m in models.items()}


def _reference(model: torch.nn.Module, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits of the plain eager model: prefill `prompt` tokens, then one token at a time with its DynamicCache."""
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        outs = [model(ids[:, :prompt], use_cache=True, **{kw: cache}).logits]
        for i in range(prompt, ids.shape[1]):
            outs.append(model(ids[:, i : i + 1], use_cache=True, **{kw: cache}).logits)
    return torch.cat(outs, dim=1)


def _run(prefill, decode, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    with torch.no_grad():
        outs = [prefill(ids[:, :prompt], torch.arange(prompt))]
        for i in range(prompt, ids.shape[1]):
            outs.append(decode(ids[:, i : i + 1], torch.tensor([i])))
    return torch.cat(outs, dim=1)


def _calls(ep: torch.export.ExportedProgram, target) -> list[torch.fx.Node]:
    return [n for n in ep.graph.nodes if n.op == "call_function" and n.target == target]


# --- metadata -------------------------------------------------------------------------------------------------------


def test_sites_list_full_attention_layers_only(captured):
    c = captured["qwen3_5"]
    assert c.layer_types == ["linear_attention", "full_attention", "linear_attention", "full_attention"]
    assert [s.layer_idx for s in c.sites] == [1, 3]
    assert [s.layer_idx for s in c.linear_states] == [0, 2]
    site = c.sites[0]
    assert (site.k_buffer, site.v_buffer) == ("k_cache_1", "v_cache_1")
    assert (site.num_heads, site.num_kv_heads, site.head_dim, site.max_cache_len) == (4, 2, 64, MAX_LEN)
    assert c.module.get_buffer("k_cache_1").shape == (B, 2, MAX_LEN, 64)
    assert c.module.get_buffer("conv_state_0").shape == (B, 2 * 2 * 32 + 4 * 32, 3)  # conv_dim, kernel - 1
    assert c.module.get_buffer("recurrent_state_0").dtype == torch.float32
    assert [s.layer_idx for s in captured["llama"].sites] == [0, 1]
    assert captured["llama"].linear_states == []


# --- graph structure the KV-compression pass matches ----------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("program", ["prefill", "decode"])
def test_each_full_attention_layer_is_two_index_copies_into_one_sdpa(captured, name, program):
    c = captured[name]
    ep = getattr(c, program)
    buffer_of = ep.graph_signature.inputs_to_buffers  # placeholder name -> buffer FQN
    (cache_position,) = [n for n in ep.graph.nodes if n.op == "placeholder" and n.name == "cache_position"]
    writes = _calls(ep, aten.index_copy_.default)
    sdpas = _calls(ep, aten.scaled_dot_product_attention.default)
    assert len(writes) == 2 * len(c.sites) and len(sdpas) == len(c.sites)

    written = {buffer_of[w.args[0].name]: w for w in writes}
    for site in c.sites:
        k_write, v_write = written[site.k_buffer], written[site.v_buffer]
        for w in (k_write, v_write):
            assert w.args[1] == 2 and w.args[2] is cache_position
        # GQA: index_copy_ -> unsqueeze -> expand -> reshape -> sdpa (key and value operands)
        reps = site.num_heads // site.num_kv_heads
        operands = []
        for w in (k_write, v_write):
            (node,) = w.users
            if reps > 1:
                assert node.target == aten.unsqueeze.default
                (node,) = node.users
                assert node.target == aten.expand.default
                (node,) = node.users
                assert node.target == aten.reshape.default
                operands.append(node)
                (node,) = node.users
            assert node.target == aten.scaled_dot_product_attention.default
        assert node.args[1] is operands[0] and node.args[2] is operands[1]
        assert node.kwargs["scale"] == pytest.approx(site.head_dim**-0.5)


def test_linear_attention_state_is_written_in_place_and_prefill_scans_over_chunks(captured):
    c = captured["qwen3_5"]
    for ep in (c.prefill, c.decode):
        buffer_of = ep.graph_signature.inputs_to_buffers
        copied = {buffer_of.get(n.args[0].name) for n in _calls(ep, aten.copy_.default)}
        for st in c.linear_states:
            assert {st.conv_buffer, st.recurrent_buffer} <= copied
    scans = [n for n in c.prefill.graph.nodes if n.op == "call_function" and "scan" in str(n.target)]
    assert len(scans) == len(c.linear_states)


# --- numerics -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_exported_prefill_then_decode_matches_eager_model(models, captured, name):
    torch.manual_seed(1)
    ids = torch.randint(0, tiny_models.VOCAB, (B, PROMPT + STEPS))
    c = captured[name]
    got = _run(c.prefill.module(), c.decode.module(), ids, PROMPT)  # the two programs share the buffers
    torch.testing.assert_close(got, _reference(models[name], ids, PROMPT), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_eager_wrapper_at_batch_1_matches_eager_model(models, name):
    torch.manual_seed(2)
    ids = torch.randint(0, tiny_models.VOCAB, (1, 20))
    wrapper = CaptureModule(models[name], max_cache_len=32, batch_size=1)  # prefill_logits="last"
    got = _run(wrapper, wrapper, ids, 17)
    ref = _reference(models[name], ids, 17)
    assert got.shape == (1, 1 + 3, tiny_models.VOCAB)
    torch.testing.assert_close(got, ref[:, 16:], atol=1e-4, rtol=1e-4)


def test_one_prefill_program_serves_many_prompt_lengths_and_restarts_at_position_0(models, captured):
    model, c = models["qwen3_5"], captured["qwen3_5"]
    prefill = c.prefill.module()
    torch.manual_seed(3)
    for t in (2, 5, 64, 65, MAX_LEN):  # each call at position 0 starts a new sequence
        ids = torch.randint(0, tiny_models.VOCAB, (B, t))
        with torch.no_grad():
            got = prefill(ids, torch.arange(t))
            ref = model(ids).logits
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_chunked_prefill_continues_from_the_cache(models, captured):
    model, c = models["qwen3_5"], captured["qwen3_5"]
    prefill = c.prefill.module()
    ids = torch.randint(0, tiny_models.VOCAB, (B, 80))
    with torch.no_grad():
        prefill(ids[:, :30], torch.arange(30))
        got = prefill(ids[:, 30:], torch.arange(30, 80))
        ref = model(ids).logits[:, 30:]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


# --- errors and side effects ----------------------------------------------------------------------------------------


def test_unmaterialized_capture_holds_no_cache_memory_and_traces_the_same_graph(models, captured):
    """For programs rewritten before they run (rqcompile.apply): placeholder caches of one element, the same
    cache writes and attention reads."""
    lean = capture(models["llama"], max_cache_len=MAX_LEN, batch_size=B, prefill_logits="all", materialize_cache=False)
    for site in lean.sites:
        for name in (site.k_buffer, site.v_buffer):
            buf = lean.module.get_buffer(name)
            assert buf.shape == (B, 2, MAX_LEN, 64) and buf.untyped_storage().nbytes() == buf.element_size()

    def cache_ops(ep):  # the writes and reads the K/V rewrite matches (layout ops around them may differ)
        names = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
        return names.count("aten.index_copy_.default"), names.count("aten.scaled_dot_product_attention.default")

    full = captured["llama"]
    assert cache_ops(lean.decode) == cache_ops(full.decode) == (2 * len(lean.sites), len(lean.sites))
    assert cache_ops(lean.prefill) == cache_ops(full.prefill)


def test_model_config_is_left_as_it_was(models, captured):
    for name in MODELS:
        assert models[name].config._attn_implementation != ATTN_IMPLEMENTATION


def test_unsupported_models_raise_value_error():
    from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="does not support"):
        capture(gpt2, max_cache_len=16)
    mistral = MistralForCausalLM(
        MistralConfig(
            num_hidden_layers=1,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=64,
            sliding_window=8,
        )
    )
    with pytest.raises(ValueError, match="sliding"):
        CaptureModule(mistral, max_cache_len=16)
    with pytest.raises(ValueError, match="dtype"):
        capture(tiny_models.tiny_llama(), max_cache_len=16, dtype=torch.bfloat16)


def test_capture_for_apply_never_allocates_the_float_cache():
    """`apply` captures against zero-stride placeholder K/V caches so that a 1M-position program does not first need
    the float cache it replaces (64 GiB for Qwen3.5-27B). Here that cache would be 2 GiB (2 layers, K and V, 2 heads,
    1M positions, 64 dims, fp32); capturing must not allocate it even for a moment: strict export's real-value clones
    of every buffer raised this process's peak by 2.6 GiB (and ran the 27B model out of memory on the H200)."""
    code = textwrap.dedent(
        """
        import resource, sys
        import tiny_models
        from rqcompile.passes.capture import capture
        model = tiny_models.tiny_llama().eval()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        capture(model, max_cache_len=1 << 20, materialize_cache=False)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)  # bytes (Linux: KiB)
        """
    )
    tests = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    grown = int(out.stdout.strip().splitlines()[-1])
    assert grown < 256 * 2**20, f"capture raised peak memory by {grown / 2**20:.0f} MiB"
