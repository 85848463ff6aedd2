"""End to end on one GPU: Qwen3.5-27B at its real dimensions (random bf16 weights), decode tokens/s and peak memory.

Contexts are filled with synthetic K/V (random bf16, quantized on write for the compressed caches) instead of
prefilling hundreds of thousands of tokens; the linear-attention layers get their state from a 16-token prefill.
Paths, each timed over `--steps` greedy decode steps after 2 warm-up steps (CUDA events, batch 1 by default):

- `bf16 DynamicCache`: transformers' own cache, eager (the baseline users have today);
- `RQCache (drop-in)`: `rqcompile.RQCache`, eager: stores codes, materializes each layer's dequantized K/V for SDPA;
- `apply (fused)`: `rqcompile.apply(model)`, one capture for the largest context, attention fused into
  `rq::attention` (Triton), which reads only the keys written so far (kv_len);
- `apply (fused) + torch.compile`: the same programs through `CompiledLM.compile()` (`--regional`: one compiled
  program per decoder layer, `compile(regional=True)`, so that the whole 64-layer model compiles within one run;
  `--graph-step`: `compile(cuda_graph=True)`, the whole step replayed from one CUDA graph, and the bf16 StaticCache
  baseline's compiled step replayed the same way);
- `bf16 StaticCache (GQA packed) + torch.compile` (`--bf16-attention gqa-packed`): the compiled baseline with an
  attention function that reads each KV head once (`gqa_packed_sdpa`) instead of transformers' copy of K/V expanded
  to the query heads. Its masked SDPA runs one program per (batch, KV head) on the H200 (session 22: 18.9 ms a step
  at batch 8 and 128K), so it is no efficient bf16 attention;
- `bf16 StaticCache (flex decoding) + torch.compile` (`--bf16-attention flex`): the compiled baseline with PyTorch's
  flex_attention (`flex_decode_attention`): the cache's valid keys as a block mask, GQA without a copy, split over
  the keys (Inductor's flex-decoding kernel), meant as the efficient bf16 decode attention to compare with. It gives
  SDPA's logits on a tiny model (CPU eager, H200 compiled: tests/test_bf16_baselines.py), but at Qwen3.5-27B's
  shapes on the H200 (torch 2.11) its first compiled decode step dies with an illegal memory access, with the cache
  at 131,136 slots or rounded up to 131,200 (session 22; like pytorch/pytorch#174923, and its 6 query heads per KV
  head are the case of #151359).
- `bf16 StaticCache (unmasked SDPA, timing proxy) + torch.compile` (`--bf16-attention unmasked`): what an efficient
  bf16 decode attention costs, measured without one: SDPA's fastest kernel over every slot of a cache sized to each
  context (+ 64), no mask, GQA without a copy (`unmasked_sdpa`). It reads the bytes an attention that knew the valid
  length would; its logits are wrong (it attends to the 64 spare slots too), so it times and proves nothing else.

Longest context: with the caching allocator capped at `--cap-gib` (79 GiB ~ the usable memory of an 80 GB H100),
the largest bf16 DynamicCache context among a few candidates around the predicted limit, and the compressed
drop-in cache at 1M tokens (one decode step each). Peak memory = `torch.cuda.max_memory_allocated()` over fill +
decode, weights included; cache bytes are measured from the tensors held.

    PYTHONPATH=. python3 benchmarks/e2e_bench.py --out $OUT
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import sys
import time
import traceback
from pathlib import Path
from unittest import mock

import torch

GIB = 1 << 30
RESULTS: dict = {"rows": [], "longest": [], "errors": []}
PROFILE = False  # --profile
COMPILE_OPTIONS: dict = {}  # --compile-mode: passed to every torch.compile here (the bf16 baseline's and apply's)
COMPILE_RESERVE_S = 150  # seconds of --budget-s that apply's compile + timed steps need (64 layers: ~35 s + steps)


def log(*args) -> None:
    print(*args, flush=True)


def cache_kwarg(model) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def build_model(layers: int, device: str):
    from transformers import Qwen3_5ForCausalLM

    from rqcompile.models import qwen3_5_27b_config

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Qwen3_5ForCausalLM(qwen3_5_27b_config(layers))
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def attention_layers(model) -> list[int]:
    return [i for i, t in enumerate(model.config.layer_types) if t == "full_attention"]


def free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def random_kv(batch: int, heads: int, length: int, dim: int, device) -> torch.Tensor:
    return torch.randn(batch, heads, length, dim, device=device, dtype=torch.bfloat16)


def time_decode(step, first_pos: int, steps: int, batch: int, device) -> dict:
    """Greedy decode: 2 warm-up steps, then `steps` timed with CUDA events."""
    tok = torch.zeros(batch, 1, dtype=torch.long, device=device)
    pos = first_pos
    for _ in range(2):
        tok = step(tok, pos).argmax(-1)[:, -1:]
        pos += 1
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(steps):
        tok = step(tok, pos).argmax(-1)[:, -1:]
        pos += 1
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / steps
    out = {"ms_per_step": ms, "tokens_per_s": batch * 1000.0 / ms}
    if PROFILE:
        out["profile"] = profile_steps(step, tok, pos, steps)
    return out


def profile_steps(step, tok, pos: int, steps: int) -> dict:
    """Device time per step by kernel (torch.profiler) next to the wall time: a step whose kernels add up to much
    less than its wall time is bound by the host (launches, Python), not by the GPU; large copy kernels would be
    cache buffers cloned by the compiled program."""
    from collections import defaultdict

    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            tok = step(tok, pos).argmax(-1)[:, -1:]
            pos += 1
        torch.cuda.synchronize()
    total: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            total[ev.name[:80]] += ev.device_time_total / steps / 1e3
            count[ev.name[:80]] += 1
    top = sorted(total.items(), key=lambda kv: -kv[1])[:15]
    busy = sum(total.values())
    log(f"  device time per step {busy:.2f} ms in {sum(count.values()) // steps} kernels; top:")
    for name, ms in top:
        log(f"    {ms:7.3f} ms  x{count[name] // steps:<4d} {name}")
    return {"device_ms_per_step": busy, "kernels_per_step": sum(count.values()) // steps, "top_ms": dict(top)}


# --- eager caches -------------------------------------------------------------------------------------------------


def eager_decode(model, cache, fill_layer, held_bytes, context: int, steps: int, batch: int) -> dict:
    """Prefill 16 tokens through `cache` (the linear-attention layers' state), `fill_layer` every attention layer
    with `context` synthetic tokens, then time greedy decode through transformers."""
    device = model.device
    kw = {cache_kwarg(model): cache, "use_cache": True}
    with torch.no_grad():
        model(input_ids=torch.zeros(batch, 16, dtype=torch.long, device=device), **kw)
        for i in attention_layers(model):
            fill_layer(cache.layers[i])
        held = held_bytes()

        def step(tok, pos):
            return model(input_ids=tok, cache_position=torch.tensor([pos], device=device), **kw).logits

        timing = time_decode(step, context, steps, batch, device)
    return {**timing, "cache_bytes": held, "peak_bytes": torch.cuda.max_memory_allocated()}


def bf16_dynamic(model, context: int, steps: int, batch: int) -> dict:
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cfg = model.config
    shape = (batch, cfg.num_key_value_heads, context, cfg.head_dim)
    torch.cuda.reset_peak_memory_stats()
    cache = DynamicCache(config=cfg)

    def fill(layer) -> None:
        assert isinstance(layer, DynamicLayer), type(layer)
        layer.keys, layer.values = random_kv(*shape, model.device), random_kv(*shape, model.device)

    def held() -> int:
        return sum(cache.layers[i].keys.nbytes + cache.layers[i].values.nbytes for i in attention_layers(model))

    return eager_decode(model, cache, fill, held, context, steps, batch)


GQA_PACKED = "rq_bench_gqa_packed"


def _transformers_sdpa(module, query, key, value, attention_mask, dropout, scaling, **kwargs):
    """transformers' own SDPA attention: where the bench's attention functions hand a call they do not cover."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def gqa_packed_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """A bf16 decode attention without transformers' GQA-expanded copy of K and V: a one-token query's heads of one
    KV head become the query rows of a single SDPA over that KV head (transformers 5.24 does this in eager mode only,
    `pack_gqa`; its compiled path still expands K/V every step). Anything else goes to transformers' SDPA."""
    import torch.nn.functional as F

    batch, q_heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    one_row_mask = attention_mask is None or attention_mask.shape[1] == attention_mask.shape[2] == 1
    if q_len != 1 or q_heads == kv_heads or dropout or not one_row_mask:
        return _transformers_sdpa(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    rows = query.reshape(batch, kv_heads, q_heads // kv_heads, dim)
    out = F.scaled_dot_product_attention(rows, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(batch, q_heads, 1, dim).transpose(1, 2).contiguous(), None


FLEX_DECODE = "rq_bench_flex_decode"


def flex_decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """A bf16 decode attention by `flex_attention`: each row's valid static-cache slots (a prefix: the benchmark pads
    nothing) as a block mask over their count (blocks of 128 slots past it are skipped), the query heads of a KV head
    sharing its K/V (`enable_gqa`, no copy), and Inductor's flex-decoding kernel splitting the keys over the GPU.
    Anything else (a prompt, a float mask) goes to transformers' SDPA. The count, not the bool row, is what the mask
    reads: torch 2.11's flex-decoding template failed to compile a bool row indexed by batch (`XBLOCK` undefined,
    H200, session 22)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    batch, _, q_len, _ = query.shape
    one_row_bool = (
        attention_mask is not None
        and attention_mask.dtype == torch.bool
        and attention_mask.shape[1] == attention_mask.shape[2] == 1
    )
    if q_len != 1 or dropout or not one_row_bool:
        return _transformers_sdpa(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    valid = attention_mask[:, 0, 0, :].sum(-1, dtype=torch.int32).expand(batch)  # valid slots per row
    if not torch.compiler.is_compiling():  # eager: check the prefix assumption (a host sync; compiled steps trust it)
        slots = torch.arange(attention_mask.shape[-1], device=query.device)
        if not torch.equal(attention_mask[:, 0, 0, :].expand(batch, -1), slots[None, :] < valid[:, None]):
            raise ValueError("flex_decode_attention: the valid slots are not a prefix (padding?)")

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx < valid[b]

    block_mask = create_block_mask(mask_mod, batch, None, 1, key.shape[2], device=query.device)
    out = flex_attention(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


UNMASKED = "rq_bench_unmasked_sdpa"


def unmasked_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """A timing proxy for an efficient bf16 decode attention, not a correct one: a one-token query attends to every
    slot of the static cache with SDPA's fastest kernel (no mask, GQA without a copy: `enable_gqa`), so it reads each
    K/V byte of the cache once, as an attention that knew the valid length would at a full cache. The slots past the
    valid keys (the cache is sized to the context + 64 for this proxy) are attended too, so its logits are not the
    model's but for a full cache (tests/test_bf16_baselines.py). Anything else goes to transformers' SDPA."""
    import torch.nn.functional as F

    if query.shape[2] != 1 or dropout:
        return _transformers_sdpa(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    out = F.scaled_dot_product_attention(query, key, value, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


BF16_ATTENTION = {  # --bf16-attention: (registered name, attention function, label)
    "sdpa": (None, None, ""),
    "gqa-packed": (GQA_PACKED, gqa_packed_sdpa, " (GQA packed)"),
    "flex": (FLEX_DECODE, flex_decode_attention, " (flex decoding)"),
    "unmasked": (UNMASKED, unmasked_sdpa, " (unmasked SDPA, timing proxy)"),
}


def bf16_static_compiled(
    model, contexts: list[int], steps: int, batch: int, out, graph_step: bool = False, attention: str = "sdpa"
) -> None:
    """transformers' StaticCache (bf16, max_cache_len = largest context + 64) with `torch.compile(model.forward)`:
    the compiled baseline. Like every static cache it attends over all max_cache_len slots (masked) each step.
    `graph_step`: also time the same compiled step replayed from one CUDA graph (`GraphedStep`, as
    `apply(...).compile(cuda_graph=True)` does), so the comparison with the graphed compressed step is not one of
    launch overheads. `attention`: a key of BF16_ATTENTION, the attention function in place of transformers' SDPA
    (restored after)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    before = model.config._attn_implementation
    name, fn, _ = BF16_ATTENTION[attention]
    if name:
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, sdpa_mask)  # else transformers builds no mask for it
        model.set_attn_implementation(name)
        assert model.config._attn_implementation == name, model.config._attn_implementation
    # the timing proxy reads every slot: one cache per context, sized to it (+ 64), each compiled anew
    groups = [[ctx] for ctx in contexts] if attention == "unmasked" else [contexts]
    try:
        for i, group in enumerate(groups):
            if i:
                torch._dynamo.reset()  # a new cache shape: compile afresh, not as a dynamic-shape recompile
            _bf16_static_compiled(model, group, steps, batch, out, graph_step, attention)
    finally:
        if name:
            model.set_attn_implementation(before)
            torch._dynamo.reset()  # the compiled forward read the packed attention


def _bf16_static_compiled(model, contexts, steps, batch, out, graph_step, attention) -> None:
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    from rqcompile.runtime.cuda_graph import GraphedStep

    cfg = model.config
    label = BF16_ATTENTION[attention][2]
    max_len = max(contexts) + 64
    device = model.device
    cache = StaticCache(config=cfg, max_cache_len=max_len)
    forward = torch.compile(model.forward, fullgraph=False, **COMPILE_OPTIONS)
    kw = {cache_kwarg(model): cache, "use_cache": True}
    with torch.no_grad():
        model(
            input_ids=torch.zeros(batch, 16, dtype=torch.long, device=device),
            cache_position=torch.arange(16, device=device),
            **kw,
        )

        def step(tok, pos):
            return forward(input_ids=tok, cache_position=torch.tensor([pos], device=device), **kw).logits

        graphed = GraphedStep(lambda t, p: forward(input_ids=t, cache_position=p, **kw).logits)  # captured once

        def replay(tok, pos):
            return graphed(tok, torch.tensor([pos], device=device))

        t0 = time.perf_counter()
        step(torch.zeros(batch, 1, dtype=torch.long, device=device), 16)
        RESULTS["bf16_static_compile_seconds"] = time.perf_counter() - t0
        log(f"bf16 StaticCache torch.compile warm-up: {RESULTS['bf16_static_compile_seconds']:.0f} s")
        for ctx in contexts:
            torch.cuda.reset_peak_memory_stats()
            for i in attention_layers(model):
                layer = cache.layers[i]
                assert isinstance(layer, StaticLayer), type(layer)
                layer.keys[:, :, :ctx].normal_()
                layer.values[:, :, :ctx].normal_()
            held = sum(cache.layers[i].keys.nbytes + cache.layers[i].values.nbytes for i in attention_layers(model))
            r = time_decode(step, ctx, steps, batch, device)
            r = {**r, "cache_bytes_allocated_for_max_len": held, "peak_bytes": torch.cuda.max_memory_allocated()}
            mode = f" ({COMPILE_OPTIONS['mode']})" if COMPILE_OPTIONS else ""
            record(f"bf16 StaticCache{label} + torch.compile{mode}", ctx, r, out, max_cache_len=max_len)
            if graph_step:
                r = guarded(f"bf16 static graphed {ctx}", time_decode, replay, ctx, steps, batch, device, out=out)
                if r:
                    r = {**r, "peak_bytes": torch.cuda.max_memory_allocated()}
                    path = f"bf16 StaticCache{label} + torch.compile{mode} + CUDA graph"
                    record(path, ctx, r, out, max_cache_len=max_len)


def fill_codes(state, batch: int, heads: int, context: int, dim: int, device, chunk: int = 16384):
    """(codes, norms) of `context` random tokens, quantized chunk by chunk (rq::quantize, Triton on CUDA)."""
    from rqcompile.ops import quantize_state

    codes = torch.empty(batch, heads, context, state.code_bytes, dtype=torch.uint8, device=device)
    norms = torch.empty(batch, heads, context, state.num_groups, dtype=torch.float16, device=device)
    for s in range(0, context, chunk):
        n = min(chunk, context - s)
        c, nm = quantize_state(random_kv(batch, heads, n, dim, device), state)
        codes[:, :, s : s + n], norms[:, :, s : s + n] = c, nm
    return codes, norms


def rq_dropin(model, context: int, steps: int, batch: int, config, calibration=None) -> dict:
    from rqcompile import RQCache
    from rqcompile.cache import RQCacheLayer

    cfg = model.config
    h, d = cfg.num_key_value_heads, cfg.head_dim
    torch.cuda.reset_peak_memory_stats()
    # uncalibrated, as BENCHMARKS.md recorded: the warm-up's all-zero ids are no prompt to calibrate on
    # (--rope-key-mean: the synthetic Calibration, whose pre-RoPE means the cache then removes and adds back)
    cache = RQCache(config, model_config=cfg, calibration=calibration)

    def fill(layer) -> None:
        assert isinstance(layer, RQCacheLayer), type(layer)
        layer.k_codes, layer.k_norms = fill_codes(layer.k_state, batch, h, context, d, model.device)
        layer.v_codes, layer.v_norms = fill_codes(layer.v_state, batch, h, context, d, model.device)

    return eager_decode(model, cache, fill, lambda: cache.memory_report().compressed_bytes, context, steps, batch)


# --- rqcompile.apply ---------------------------------------------------------------------------------------------


def apply_fill(lm, context: int, batch: int, device) -> None:
    cfg = lm.model_config
    with torch.no_grad():
        lm.prefill(torch.zeros(batch, 16, dtype=torch.long, device=device), torch.arange(16, device=device))
        for site in lm.sites:
            i = site.layer_idx
            for kind in "kv":
                state = lm.quant_states[i][kind]
                codes, norms = fill_codes(state, batch, cfg.num_key_value_heads, context, cfg.head_dim, device)
                lm.buffers[f"{kind}_codes_{i}"][:, :, :context] = codes
                lm.buffers[f"{kind}_norms_{i}"][:, :, :context] = norms
                del codes, norms


def apply_decode(lm, context: int, steps: int, batch: int) -> dict:
    device = lm.buffers[lm.cache_names[0]].device
    torch.cuda.reset_peak_memory_stats()
    apply_fill(lm, context, batch, device)

    def step(tok, pos):
        with torch.no_grad():
            return lm.decode(tok, torch.tensor([pos], device=device))

    timing = time_decode(step, context, steps, batch, device)
    held = sum(
        lm.buffers[n].nbytes for n in lm.cache_names if any(p in n for p in ("codes", "norms", "sink", "window"))
    )
    return {**timing, "cache_bytes_allocated_for_max_len": held, "peak_bytes": torch.cuda.max_memory_allocated()}


# --- driver ------------------------------------------------------------------------------------------------------


def record(path: str, context: int, result: dict, out: Path | None, **extra) -> None:
    row = {"path": path, "context": context, **extra, **result}
    RESULTS["rows"].append(row)
    log(
        f"{path:34s} ctx {context:>8d}: {result['ms_per_step']:8.2f} ms/step {result['tokens_per_s']:8.2f} tok/s "
        f"peak {result['peak_bytes'] / GIB:6.1f} GiB"
    )
    save(out)


def save(out: Path | None) -> None:
    if out is not None:
        (out / "e2e_bench.json").write_text(json.dumps(RESULTS, indent=1))


def guarded(what: str, fn, *args, out=None, **kw):
    try:
        return fn(*args, **kw)
    except Exception as e:  # noqa: BLE001 - every path is measured independently; the error is reported
        msg = f"{what}: {type(e).__name__}: {str(e)[:400]}"
        log("FAILED", msg)
        traceback.print_exc(limit=12)
        RESULTS["errors"].append(msg)
        save(out)
        return None
    finally:
        free()


def longest(model, args, out) -> None:
    total = torch.cuda.get_device_properties(0).total_memory
    cap = args.cap_gib * GIB
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))
    free()
    weights = sum(p.nbytes for p in model.parameters())
    per_token = 16 * model.config.num_key_value_heads * model.config.head_dim * 2 * 2  # bf16 K+V, 16 layers
    predicted = int((cap - weights - 2 * GIB) / per_token)
    RESULTS["longest_setup"] = {
        "cap_gib": args.cap_gib,
        "weights_bytes": weights,
        "bf16_bytes_per_token": per_token,
        "bf16_predicted_tokens": predicted,
    }
    log(f"cap {args.cap_gib} GiB, weights {weights / GIB:.1f} GiB, bf16 predicted max ~{predicted} tokens")
    for frac in (1.15, 1.05, 0.95, 0.85, 0.7):
        ctx = int(predicted * frac) // 1024 * 1024
        r = guarded(f"longest bf16 {ctx}", bf16_dynamic, model, ctx, 1, 1, out=out)
        RESULTS["longest"].append({"path": "bf16 DynamicCache", "context": ctx, "fits": r is not None, **(r or {})})
        log(f"  bf16 {ctx}: {'fits' if r else 'OOM/failed'}")
        save(out)
        if r is not None:
            break
    for ctx in (1 << 20, 3 << 18):
        r = guarded(f"longest rq {ctx}", rq_dropin, model, ctx, 1, 1, rq_config(args), out=out)
        RESULTS["longest"].append(
            {"path": f"RQCache {args.backend} {args.bits}-bit", "context": ctx, "fits": r is not None, **(r or {})}
        )
        log(f"  rq {ctx}: {'fits' if r else 'OOM/failed'}" + (f" peak {r['peak_bytes'] / GIB:.1f} GiB" if r else ""))
        save(out)
        if r is not None:
            break
    torch.cuda.set_per_process_memory_fraction(1.0)
    free()


def rq_config(args):
    """The compressed format every rqcompile path here uses (drop-in cache and apply): the command line's."""
    from rqcompile import RQConfig

    return RQConfig(
        backend=args.backend,
        bits=args.bits,
        sink_tokens=args.sink,
        residual_window=args.window,
        rotation_stages=args.stages,
        rope_key_mean=args.rope_key_mean,
        value_layout=args.value_layout,
    )


def synthetic_calibration(model, args):
    """`--rope-key-mean`: apply needs a Calibration with each layer's pre-RoPE key mean; random weights have no text
    worth calibrating on and the step's cost does not depend on the values, so random means of a key's scale."""
    if not args.rope_key_mean:
        return None
    from rqcompile import Calibration

    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    stats = {}
    for i in range(cfg.num_hidden_layers):
        stats[(i, "k", "rope_mean")] = torch.randn(cfg.num_key_value_heads, cfg.head_dim, generator=gen)
        stats[(i, "k", "mean")] = torch.zeros(cfg.num_key_value_heads, cfg.head_dim)
    return Calibration(stats, "synthetic (e2e_bench --rope-key-mean)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=64)
    p.add_argument("--contexts", default="8192,32768,131072")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--backend", default="iso")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument(
        "--stages", default=None, help="RQConfig.rotation_stages: an int or 'full' (default: the library's, 'full')"
    )
    p.add_argument("--sink", type=int, default=1, help="RQConfig.sink_tokens (default 1, the library default)")
    p.add_argument("--window", type=int, default=32, help="RQConfig.residual_window (default 32, the library default)")
    p.add_argument(
        "--value-layout",
        default=None,
        help="RQConfig.value_layout: coordinates or keys (apply only; the drop-in cache refuses it); default: the "
        "library's (auto: keys in apply's programs on CUDA where the decode kernel reads it in place)",
    )
    p.add_argument("--cap-gib", type=float, default=79.0)
    p.add_argument(
        "--rope-key-mean",
        action="store_true",
        help="RQConfig(rope_key_mean=True) for apply and the drop-in cache, with a synthetic Calibration (without it: "
        "rope_key_mean=False)",
    )
    p.add_argument(
        "--cap-apply", action="store_true", help="run the apply path under --cap-gib too (does it fit an 80 GB card?)"
    )
    p.add_argument("--skip", default="", help="comma list of: bf16,dropin,static,longest,apply,compile")
    p.add_argument(
        "--bf16-attention",
        choices=sorted(BF16_ATTENTION),
        default="sdpa",
        help="the compiled bf16 StaticCache baseline's attention: transformers' SDPA (K/V copied to the query heads), "
        "gqa-packed (gqa_packed_sdpa: the query heads of a KV head as query rows of one masked SDPA) or flex "
        "(flex_decode_attention: flex_attention over the valid keys' block mask, split over the keys; on the H200 with "
        "torch 2.11 it dies with an illegal memory access at Qwen3.5-27B's shapes, session 22) or unmasked "
        "(unmasked_sdpa: SDPA over every slot of a cache sized to each context, a timing proxy whose logits are wrong)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=540,
        help="the whole run's time budget in seconds (a device call's limit, less a margin): apply's compiled path "
        f"is skipped when less than {COMPILE_RESERVE_S} s of it is left after the paths before it",
    )
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--profile", action="store_true", help="profile the timed steps (device time by kernel)")
    p.add_argument(
        "--attn-variant",
        default=None,
        help="the fused attention's decode kernel (kernels.attention.VARIANTS); default: the library's",
    )
    p.add_argument(
        "--regional",
        action="store_true",
        help="compile apply's programs per decoder layer (CompiledLM.compile(regional=True); the baseline stays whole)",
    )
    p.add_argument(
        "--graph-step",
        action="store_true",
        help="compile apply's decode step with compile(cuda_graph=True): the whole step replayed from one CUDA graph"
        " (instead of one call per compiled program)",
    )
    p.add_argument(
        "--keep-decode-mask",
        action="store_true",
        help="apply's decode program keeps the capture's mask (passes.decode_key_range skipped): the attention reads a "
        "one-row mask per tile as before session 23, for an A/B against the default on one machine",
    )
    p.add_argument(
        "--no-rope-table",
        action="store_true",
        help="with --rope-key-mean: apply without passes.rope_table (the decode kernel computes the offset term's "
        "cos / sin, as before session 42)",
    )
    p.add_argument(
        "--rows-max-tokens",
        type=int,
        default=None,
        help="kernels.quantize DEFAULTS['rows_max_tokens']: 0 sends a decode step's quantize to the tiled kernel",
    )
    p.add_argument(
        "--keys-m-maxnreg",
        type=int,
        default=None,
        help="kernels.attention DEFAULTS['keys_m_maxnreg']: 0 launches keys-m uncapped everywhere (compiled calls "
        "are then decomposed into the kernels, as before session 43)",
    )
    p.add_argument(
        "--compile-mode",
        default=None,
        help="torch.compile mode for both compiled paths, e.g. reduce-overhead (CUDA graphs); default: torch's",
    )
    args = p.parse_args(argv)
    global PROFILE
    PROFILE = args.profile
    if args.attn_variant:
        from rqcompile.kernels import attention as kattn

        kattn.DEFAULTS["variant"] = args.attn_variant
    if args.keys_m_maxnreg is not None:
        from rqcompile.kernels import attention as kattn

        kattn.DEFAULTS["keys_m_maxnreg"] = args.keys_m_maxnreg
    if args.compile_mode:
        COMPILE_OPTIONS["mode"] = args.compile_mode
    if args.rows_max_tokens is not None:
        from rqcompile.kernels import quantize as kquant

        kquant.DEFAULTS["rows_max_tokens"] = args.rows_max_tokens
    mode = f" ({args.compile_mode})" if args.compile_mode else ""
    t0 = time.perf_counter()
    skip = set(filter(None, args.skip.split(",")))
    out = args.out
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    import transformers

    import rqcompile

    RESULTS["meta"] = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "command": " ".join(["benchmarks/e2e_bench.py", *(argv if argv is not None else sys.argv[1:])]),
        "layers": args.layers,
        "batch": args.batch,
        "backend": args.backend,
        "bits": args.bits,
        "sink_tokens": args.sink,
        "residual_window": args.window,
        "compile_mode": args.compile_mode,
        "regional": args.regional,
        "graph_step": args.graph_step,
        "rotation_stages": args.stages,
        "attn_variant": args.attn_variant,
        "rows_max_tokens": args.rows_max_tokens,
        "rope_key_mean": args.rope_key_mean,
        "value_layout": args.value_layout,
        "keep_decode_mask": args.keep_decode_mask,
        "no_rope_table": args.no_rope_table,
    }
    contexts = [int(c) for c in args.contexts.split(",")]
    if args.stages is not None and args.stages.isdigit():
        args.stages = int(args.stages)
    stages = rq_config(args).stage_count(256)  # Qwen3.5's head_dim
    name = args.backend + (f" s{stages}" if stages > 1 else "") + (f" w{args.window}" if args.window else "")
    name += " rope-mean" if args.rope_key_mean else ""
    name += " v-along-keys" if args.value_layout == "keys" else ""
    name += " decode-mask" if args.keep_decode_mask else ""
    name += " no-rope-table" if args.no_rope_table else ""
    model = build_model(args.layers, "cuda")
    log(
        f"model built in {time.perf_counter() - t0:.0f} s: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B "
        f"params, {torch.cuda.memory_allocated() / GIB:.1f} GiB"
    )
    for ctx in contexts:
        if "bf16" not in skip:
            r = guarded(f"bf16 {ctx}", bf16_dynamic, model, ctx, args.steps, args.batch, out=out)
            if r:
                record("bf16 DynamicCache (eager)", ctx, r, out)
        if "dropin" not in skip:
            r = guarded(
                f"dropin {ctx}",
                rq_dropin,
                model,
                ctx,
                args.steps,
                args.batch,
                rq_config(args),
                synthetic_calibration(model, args),
                out=out,
            )
            if r:
                record(f"RQCache {name} {args.bits}b (eager)", ctx, r, out)
    if "static" not in skip:
        guarded(
            "bf16 static compiled",
            bf16_static_compiled,
            model,
            contexts,
            args.steps,
            args.batch,
            out,
            args.graph_step,
            args.bf16_attention,
            out=out,
        )
    if "longest" not in skip:
        longest(model, args, out)
    if "apply" not in skip:
        if args.cap_apply:
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * GIB / total))
            RESULTS["meta"]["apply_cap_gib"] = args.cap_gib
            log(f"apply path under a {args.cap_gib} GiB allocator cap")
        t1 = time.perf_counter()
        keep_mask = mock.patch.object(rqcompile.api, "decode_key_range", lambda gm: gm)
        no_table = mock.patch.object(rqcompile.api, "rope_table", lambda gm: gm)
        with (
            keep_mask if args.keep_decode_mask else contextlib.nullcontext(),
            no_table if args.no_rope_table else contextlib.nullcontext(),
        ):
            lm = guarded(
                "apply",
                rqcompile.apply,
                model,
                config=rq_config(args),
                calibration=synthetic_calibration(model, args),
                max_cache_len=max(contexts) + 64,
                batch_size=args.batch,
                out=out,
            )
        RESULTS["apply_seconds"] = time.perf_counter() - t1
        RESULTS["meta"]["resolved_value_layout"] = getattr(getattr(lm, "config", None), "value_layout", None)
        log(
            f"apply (capture + rewrite, max_cache_len {max(contexts) + 64}): {RESULTS['apply_seconds']:.0f} s, "
            f"fused={getattr(lm, 'fused', None)}, V layout {RESULTS['meta']['resolved_value_layout']}"
        )
        if lm is not None:
            for ctx in contexts:
                r = guarded(f"apply {ctx}", apply_decode, lm, ctx, args.steps, args.batch, out=out)
                if r:
                    record(f"apply {name} {args.bits}b fused (eager)", ctx, r, out)
            left = args.budget_s - (time.perf_counter() - t0)
            if "compile" not in skip and left > COMPILE_RESERVE_S:
                t2 = time.perf_counter()
                # per layer, the decode program only: Qwen3.5's scan-based prefill layers are not cached by Inductor
                # --graph-step: the library's whole-step CUDA graph (compile(cuda_graph=True)) instead of plain calls
                lm.compile(
                    regional=args.regional, prefill=not args.regional, cuda_graph=args.graph_step, **COMPILE_OPTIONS
                )
                ok = guarded("compile warm-up", apply_decode, lm, contexts[0], 1, args.batch, out=out)
                RESULTS["compile_seconds"] = time.perf_counter() - t2
                log(f"compile + first step: {RESULTS['compile_seconds']:.0f} s")
                from torch._dynamo.utils import counters

                RESULTS["cudagraph_skips"] = dict(counters["inductor"].get("cudagraph_skips", {}) or {})
                log(f"inductor counters: {dict(counters['inductor'])}")
                region = " per layer" if args.regional else ""
                graph = " + CUDA graph" if args.graph_step else ""
                if ok:
                    for ctx in contexts:
                        r = guarded(f"compiled {ctx}", apply_decode, lm, ctx, args.steps, args.batch, out=out)
                        if r:
                            record(f"apply {name} {args.bits}b fused + torch.compile{region}{mode}{graph}", ctx, r, out)
            else:
                log(f"torch.compile skipped ({left:.0f} s of the --budget-s left, {COMPILE_RESERVE_S} needed)")
    RESULTS["total_seconds"] = time.perf_counter() - t0
    save(out)
    log("\n| path | context | ms/step | tok/s | peak GiB |\n|---|---|---|---|---|")
    for r in RESULTS["rows"]:
        log(
            f"| {r['path']} | {r['context']} | {r['ms_per_step']:.2f} | {r['tokens_per_s']:.2f} | "
            f"{r['peak_bytes'] / GIB:.1f} |"
        )
    for r in RESULTS["longest"]:
        log(
            f"longest: {r['path']} {r['context']} fits={r['fits']}"
            + (f" peak {r['peak_bytes'] / GIB:.1f} GiB" if r.get("peak_bytes") else "")
        )
    log(f"total {RESULTS['total_seconds']:.0f} s; errors: {len(RESULTS['errors'])}")


if __name__ == "__main__":
    main()
