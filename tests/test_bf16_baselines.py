"""benchmarks/e2e_bench.py's bf16 baselines compute transformers' attention: a faster baseline that attended to the
wrong keys would make every speed-up against it a lie. Each is swapped in for transformers' SDPA on a tiny model
with a StaticCache (batch 2, four decode steps) and must give SDPA's logits."""

from __future__ import annotations

import pytest
import torch
from benchmark_modules import load_benchmark
from tiny_models import tiny_llama, tiny_qwen3_5

E2E = load_benchmark("e2e_bench", "e2e_bench")


def _decode_logits(model, attention: str, device: str, compiled: bool) -> torch.Tensor:
    """Logits of 4 greedy decode steps after an 8-token prompt, batch 2, StaticCache of 64 slots."""
    from transformers import AttentionInterface, StaticCache
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    name, fn, _ = E2E.BF16_ATTENTION[attention]
    if name:
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, sdpa_mask)
    model.set_attn_implementation(name or "sdpa")
    cache = StaticCache(config=model.config, max_cache_len=64)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0)).to(device)
    forward = torch.compile(model.forward) if compiled else model.forward
    kw = {E2E.cache_kwarg(model): cache, "use_cache": True}
    steps = []
    with torch.no_grad():
        model(input_ids=ids, cache_position=torch.arange(8, device=device), **kw)
        tok = ids[:, -1:]
        for pos in range(8, 12):
            logits = forward(input_ids=tok, cache_position=torch.tensor([pos], device=device), **kw).logits
            tok = logits[:, -1:].argmax(-1)
            steps.append(logits.float())
    torch._dynamo.reset()
    return torch.cat(steps, 1)


@pytest.mark.parametrize("attention", ["gqa-packed", "flex"])
@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen3_5], ids=["llama", "qwen3_5"])
def test_a_bf16_baseline_attention_gives_sdpa_logits(build, attention):
    model = build().eval()
    want = _decode_logits(model, "sdpa", "cpu", compiled=False)
    got = _decode_logits(model, attention, "cpu", compiled=False)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def _one_step_logits(model, attention: str, slots: int) -> torch.Tensor:
    """Logits of one decode step after an 11-token prompt (batch 2) in a StaticCache of `slots` slots: 12 fills it."""
    from transformers import AttentionInterface, StaticCache
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    name, fn, _ = E2E.BF16_ATTENTION[attention]
    if name:
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, sdpa_mask)
    model.set_attn_implementation(name or "sdpa")
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    kw = {E2E.cache_kwarg(model): StaticCache(config=model.config, max_cache_len=slots), "use_cache": True}
    with torch.no_grad():
        model(input_ids=ids[:, :11], cache_position=torch.arange(11), **kw)  # a prompt: transformers' SDPA
        return model(input_ids=ids[:, 11:], cache_position=torch.tensor([11]), **kw).logits.float()


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen3_5], ids=["llama", "qwen3_5"])
def test_the_unmasked_timing_proxy_is_exact_only_on_a_full_cache(build):
    """`unmasked` attends to every slot: the step that fills the cache's last slot gives SDPA's logits; with empty
    slots left it does not (it attends to them). So it reads what a full cache holds, and hides no mask."""
    model = build().eval()
    full = {a: _one_step_logits(model, a, slots=12) for a in ("sdpa", "unmasked")}
    torch.testing.assert_close(full["unmasked"], full["sdpa"], atol=2e-5, rtol=0)
    spare = {a: _one_step_logits(model, a, slots=16) for a in ("sdpa", "unmasked")}
    assert (spare["unmasked"] - spare["sdpa"]).abs().max() > 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["gqa-packed", "flex"])
def test_a_compiled_bf16_baseline_attention_gives_sdpa_logits_on_the_gpu(attention):
    model = tiny_qwen3_5().to("cuda").eval()
    want = _decode_logits(model, "sdpa", "cuda", compiled=False)
    got = _decode_logits(model, attention, "cuda", compiled=True)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
