"""One generation loop for every runnable form of an LM: captured, rewritten, compiled, AOTI- or ONNX-loaded.

A program is anything with `prefill(input_ids [B, T], cache_position [T]) -> logits [B, 1 or T, V]` and
`decode(input_ids [B, 1], cache_position [1]) -> logits [B, 1, V]` that keeps its own cache state. The loop owns
positions, the cache-length check, sampling, stop tokens and streaming.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch


class StepProgram(Protocol):
    max_cache_len: int
    batch_size: int

    def prefill(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor: ...

    def decode(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor: ...


class CacheOverflowError(ValueError):
    """A prompt or generation needs more positions than the cache was built with."""


@dataclass(frozen=True)
class SamplingConfig:
    """Greedy when `do_sample` is False; otherwise temperature / top-k / top-p sampling with a seeded generator."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


STOP_CHECK_EVERY = 8  # decode steps between the host's checks that every row has finished (each one waits for the GPU)


def _next_token(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]."""
    if not sampling.do_sample:
        return logits.argmax(-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > sampling.top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


def check_capacity(prompt_len: int, max_new_tokens: int, max_cache_len: int) -> None:
    """Refuse, before any work, a request the cache cannot hold (the last new token is never written back)."""
    if prompt_len < 1:
        raise ValueError("the prompt must have at least one token")
    need = prompt_len + max(max_new_tokens - 1, 0)
    if prompt_len > max_cache_len:
        raise CacheOverflowError(f"prompt of {prompt_len} tokens is longer than the cache ({max_cache_len} positions)")
    if need > max_cache_len:
        raise CacheOverflowError(
            f"{prompt_len} prompt + {max_new_tokens} new tokens need {need} cache positions, but the cache has "
            f"{max_cache_len}; lower max_new_tokens to {max_cache_len - prompt_len + 1} or rebuild with a larger "
            "max_cache_len"
        )


@torch.no_grad()
def generate(
    program: StepProgram,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    sampling: SamplingConfig | None = None,
    eos_token_id: int | Iterable[int] | None = None,
    streamer: Callable[[torch.Tensor], None] | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Prompt [B, T] -> prompt + generated ids [B, T + n], stopping early once every row has emitted a stop token.

    Every row is a whole prompt of the same length: the programs share one position per step and take no attention
    mask, so a padded row's pads would be attended as text. `attention_mask` (as a tokenizer returns it) is accepted
    to say so and refused if it marks any padding. Rows that finished keep emitting their stop token (as
    transformers pads finished rows). `streamer` gets each new [B] token tensor as soon as it exists.
    """
    sampling = sampling or SamplingConfig()
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, tokens], got {tuple(input_ids.shape)}")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}"
            )
        if not bool(attention_mask.bool().all()):
            raise ValueError(
                "this program takes no attention mask, so it cannot run padded prompts (the pads would be attended "
                "as text): give it prompts of equal length, one per row, or run a padded batch through the model "
                "with a drop-in cache (IsoQuantCache and friends handle left padding)"
            )
    batch, prompt_len = input_ids.shape
    if batch != program.batch_size:
        raise ValueError(f"this program was built for batch {program.batch_size}, got {batch}")
    check_capacity(prompt_len, max_new_tokens, program.max_cache_len)
    stops = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None

    if prompt_len == 1:
        logits = program.decode(input_ids, torch.arange(1))
    else:
        logits = program.prefill(input_ids, torch.arange(prompt_len))
    # Tokens stay where the logits are: the next step takes them from there, and the host waits for the device only
    # to look at "has every row finished?", every STOP_CHECK_EVERY steps (each step with a streamer, which gets
    # every token on the host anyway). Steps run past the stop are cut off below, so the result is the same.
    device = logits.device
    stop_ids = torch.tensor(sorted(stops), device=device) if stops else None
    check_every = 1 if streamer is not None else STOP_CHECK_EVERY
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    generated = []
    for step in range(max_new_tokens):
        token = _next_token(logits[:, -1], sampling, generator)
        if stops:
            token = torch.where(finished, torch.full_like(token, next(iter(stops))), token)
            finished |= torch.isin(token, stop_ids)
        generated.append(token[:, None])
        if streamer is not None:
            streamer(token.to(input_ids.device))
        if step == max_new_tokens - 1 or (stops and (step + 1) % check_every == 0 and bool(finished.all())):
            break
        logits = program.decode(token[:, None], torch.tensor([prompt_len + step]))
    out = torch.cat(generated, dim=1)
    if stops:  # the first step by which every row had emitted a stop token ends the output
        all_done = torch.isin(out, stop_ids).cummax(dim=1).values.all(dim=0)
        if bool(all_done.any()):
            out = out[:, : int(all_done.int().argmax()) + 1]
    return torch.cat([input_ids, out.to(input_ids.device)], dim=1)
