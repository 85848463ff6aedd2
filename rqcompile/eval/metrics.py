"""Decode-time quality metrics for KV caches: perplexity, KL to a full-precision reference, greedy agreement.

Everything is measured at *decode time*: the context is prefilled once, then tokens are fed one at a time through
the cache under test, so every read of an earlier token's K/V goes through that cache (a single full-sequence
forward would mostly read the fresh, uncompressed K/V and hide the cache's error). `make_cache` is a zero-argument
callable returning a fresh cache, which keeps the harness agnostic to the cache class.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from rqcompile.cache import RQCache
from rqcompile.eval.window_view import window_view

MakeCache = Callable[[], object]


def reference_cache() -> DynamicCache:
    """The full-precision reference: transformers' plain `DynamicCache`."""
    return DynamicCache()


@dataclass
class DecodeResult:
    """Scores of the `decode` teacher-forced steps. `token_nll[i]` is the NLL of `ids[prefill + 1 + i]` predicted
    after feeding `ids[prefill + i]`; `logprobs` (float32 `[decode, vocab]`, optional) are those steps' full
    next-token log-distributions, for KL."""

    nll: float
    ppl: float
    token_nll: torch.Tensor
    logprobs: torch.Tensor | None
    seconds: float

    @property
    def n_tokens(self) -> int:
        return self.token_nll.numel()


def cache_kwarg(model) -> str:
    """transformers 5.2x renamed the forward argument `past_key_values` to `cache` (the old name warns, and goes
    in 5.40); 5.17 only knows `past_key_values`."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _check_ids(ids: torch.Tensor, need: int) -> torch.Tensor:
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"ids must be [T] or [1, T], got {tuple(ids.shape)}")
    if ids.shape[1] < need:
        raise ValueError(f"need at least {need} token ids, got {ids.shape[1]}")
    return ids


@torch.inference_mode()
def decode_time_ppl(
    model,
    ids: torch.Tensor,
    make_cache: MakeCache = reference_cache,
    prefill: int = 512,
    decode: int = 512,
    keep_logprobs: bool = True,
    progress: bool | None = None,
    chunk: int = 1,
) -> DecodeResult:
    """Prefill `ids[:prefill]` into `make_cache()`, then feed `ids[prefill : prefill + decode]` `chunk` tokens at a
    time (default one).

    Each fed token's output predicts the following id, so `prefill + decode + 1` ids are needed and the scored
    targets are `ids[prefill + 1 : prefill + decode + 1]`; none of them is predicted by the prefill pass itself.

    `chunk > 1` gives the same scores as one-at-a-time feeding (up to float rounding) for a cache whose stored value
    of a token never depends on when it is read - e.g. `RQCache` without `residual_window`, which quantizes each
    token on write and returns the dequantized history, the chunk's own tokens included, so every query still reads
    every earlier K/V (and its own) through the compressed store under the causal mask. An `RQCache` with a
    `residual_window` is scored through `window_view` (each query of a chunk sees the window it would have seen fed
    alone). It does *not* hold for other caches that keep recent tokens exact (KIVI's fp16 residual): use `chunk=1`.
    `progress=None` shows a bar only on a terminal.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    ids = _check_ids(ids, prefill + decode + 1).to(model.device)
    cache = make_cache()
    with contextlib.ExitStack() as stack:
        if chunk > 1 and isinstance(cache, RQCache) and cache.rq_config.residual_window > 0:
            cache = stack.enter_context(window_view(model, cache))
        return _decode(model, ids, cache, prefill, decode, keep_logprobs, progress, chunk)


def _decode(model, ids, cache, prefill, decode, keep_logprobs, progress, chunk) -> DecodeResult:
    kw = {cache_kwarg(model): cache, "use_cache": True}
    t0 = time.perf_counter()
    model(input_ids=ids[:, :prefill], logits_to_keep=1, **kw)
    nll = torch.empty(decode, dtype=torch.float64)
    logprobs = [] if keep_logprobs else None
    starts = range(0, decode, chunk)
    steps = tqdm(starts, desc="decode", leave=False, disable=None if progress is None else not progress)
    for i in steps:
        pos, n = prefill + i, min(chunk, decode - i)
        out = model(input_ids=ids[:, pos : pos + n], **kw)
        lp = torch.log_softmax(out.logits[0, -n:].float(), dim=-1)
        nll[i : i + n] = -lp.gather(-1, ids[0, pos + 1 : pos + n + 1, None]).squeeze(-1).double().cpu()
        if logprobs is not None:
            logprobs.append(lp.cpu())
    seconds = time.perf_counter() - t0
    mean = nll.mean().item()
    return DecodeResult(
        nll=mean,
        ppl=math.exp(mean),
        token_nll=nll,
        logprobs=torch.cat(logprobs) if logprobs is not None else None,
        seconds=seconds,
    )


@torch.inference_mode()
def full_forward_ppl(model, ids: torch.Tensor, prefill: int = 512, decode: int = 512) -> float:
    """Ppl of the same targets as `decode_time_ppl` from ONE forward pass with no cache: the exactness reference."""
    ids = _check_ids(ids, prefill + decode + 1).to(model.device)
    logits = model(input_ids=ids[:, : prefill + decode], use_cache=False).logits[0, prefill:].float()
    nll = torch.nn.functional.cross_entropy(logits, ids[0, prefill + 1 : prefill + decode + 1], reduction="mean")
    return math.exp(nll.item())


def kl_divergence(reference: DecodeResult, test: DecodeResult) -> torch.Tensor:
    """Per-step KL(p_ref || p_test) in nats, `[decode]`; both runs must have kept their logprobs."""
    if reference.logprobs is None or test.logprobs is None:
        raise ValueError("both results need logprobs (decode_time_ppl(..., keep_logprobs=True))")
    if reference.logprobs.shape != test.logprobs.shape:
        raise ValueError(f"shape mismatch {tuple(reference.logprobs.shape)} vs {tuple(test.logprobs.shape)}")
    ref = reference.logprobs.double()
    return (ref.exp() * (ref - test.logprobs.double())).sum(-1).clamp_min(0.0)


def kl_vs_reference(
    model,
    ids: torch.Tensor,
    make_cache: MakeCache,
    prefill: int = 512,
    decode: int = 512,
    reference: DecodeResult | None = None,
    progress: bool | None = None,
) -> float:
    """Mean over decode steps of KL(p_ref || p_test), reference = plain `DynamicCache` (pass a precomputed
    `reference` to reuse it across caches). To get ppl and KL from one run, call `decode_time_ppl` and
    `kl_divergence` directly."""
    if reference is None:
        reference = decode_time_ppl(model, ids, reference_cache, prefill, decode, progress=progress)
    test = decode_time_ppl(model, ids, make_cache, prefill, decode, progress=progress)
    return kl_divergence(reference, test).mean().item()


@torch.inference_mode()
def greedy_tokens(
    model, prompt_ids: torch.Tensor, make_cache: MakeCache = reference_cache, n: int = 64, progress: bool | None = None
) -> torch.Tensor:
    """`n` greedy tokens after the prompt (no early stop at EOS), one step at a time through `make_cache()`."""
    ids = _check_ids(prompt_ids, 1).to(model.device)
    kw = {cache_kwarg(model): make_cache(), "use_cache": True}
    logits = model(input_ids=ids, logits_to_keep=1, **kw).logits
    out = torch.empty(n, dtype=torch.long)
    for i in tqdm(range(n), desc="greedy", leave=False, disable=None if progress is None else not progress):
        nxt = logits[0, -1].argmax()
        out[i] = nxt
        if i + 1 < n:
            logits = model(input_ids=nxt.view(1, 1), **kw).logits
    return out


@dataclass
class GreedyAgreement:
    """`prefix`: fraction of the n tokens before the first divergence (1.0 = identical). `overall`: fraction of
    positions with equal tokens; after a divergence each run continues from its own tokens, so it can re-align."""

    prefix: float
    overall: float
    first_divergence: int | None
    reference: torch.Tensor
    test: torch.Tensor


def greedy_agreement(
    model,
    prompt_ids: torch.Tensor,
    make_cache: MakeCache,
    n: int = 64,
    reference: torch.Tensor | None = None,
    progress: bool | None = None,
) -> GreedyAgreement:
    """Compare `n` greedy tokens with `make_cache()` against the plain-`DynamicCache` greedy tokens."""
    if reference is None:
        reference = greedy_tokens(model, prompt_ids, reference_cache, n, progress)
    test = greedy_tokens(model, prompt_ids, make_cache, n, progress)
    same = reference[:n] == test
    diff = (~same).nonzero()
    first = int(diff[0]) if len(diff) else None
    return GreedyAgreement(
        prefix=(n if first is None else first) / n,
        overall=same.float().mean().item(),
        first_divergence=first,
        reference=reference,
        test=test,
    )


@dataclass
class ForcedAgreement:
    """Greedy agreement measured by teacher forcing the reference's greedy tokens through the test cache.

    `prefix`: fraction of the n reference tokens before the first position where the test model's argmax differs -
    exactly the prefix agreement of a free-running greedy generation, since until that position both see the same
    tokens. `top1`: fraction of the n positions whose argmax equals the reference token (each position conditioned
    on the reference's own tokens, unlike a free run, which continues from its own)."""

    prefix: float
    top1: float
    first_divergence: int | None


@torch.inference_mode()
def forced_greedy_agreement(
    model,
    prompt_ids: torch.Tensor,
    make_cache: MakeCache,
    reference: torch.Tensor,
    chunk: int | None = None,
) -> ForcedAgreement:
    """Prefill the prompt, then feed `reference[:-1]` (`chunk` tokens per forward, default all at once; use 1 for
    caches that keep recent tokens exact, see `decode_time_ppl`) and compare each step's argmax with the next
    reference token."""
    ids = _check_ids(prompt_ids, 1).to(model.device)
    reference = reference.to(model.device)
    n = reference.numel()
    kw = {cache_kwarg(model): make_cache(), "use_cache": True}
    predictions = [model(input_ids=ids, logits_to_keep=1, **kw).logits[0, -1:].argmax(-1)]
    chunk = chunk or max(n - 1, 1)
    for start in range(0, n - 1, chunk):
        fed = reference[start : min(start + chunk, n - 1)]
        predictions.append(model(input_ids=fed[None], **kw).logits[0].argmax(-1))
    same = torch.cat(predictions) == reference
    diff = (~same).nonzero()
    first = int(diff[0]) if len(diff) else None
    return ForcedAgreement(
        prefix=(n if first is None else first) / n, top1=same.float().mean().item(), first_divergence=first
    )
