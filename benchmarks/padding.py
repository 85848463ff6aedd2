"""Left padding and the drop-in caches (QUALITY.md, "Left padding"): a batch of license-text rows of different lengths,
left-padded to the longest as batched `generate` does (`attention_mask`, position ids = mask.cumsum - 1, pads at 0),
against the same rows run one at a time without padding. Decode-time metrics with the quality pins' harness: each
row's prompt is prefilled, then `--decode` teacher-forced tokens are fed in one forward (`decode_time_ppl(chunk=)`,
exact for a cache without a recent window); ppl delta and KL are against the unquantized model on the unpadded row.

    .venv/bin/python benchmarks/padding.py --out benchmarks/results/padding.json
    /work/venv517/bin/python benchmarks/padding.py --set-attention-mask --out benchmarks/results/padding_tf517.json
    .venv/bin/python benchmarks/padding.py --pad-sweep 0,1,16,64,128,256 --out benchmarks/results/padding_sweep.json
    .venv/bin/python benchmarks/padding.py --prompt-lengths 16,32,64,128,512 --offsets 0,8192,16384 --decode 256 \\
        --out benchmarks/results/padding_short.json

The second form is the first on transformers 5.17, which passes no position ids to caches, so the script gives the
cache the attention mask (`RQCache.set_attention_mask`). The third pads one row by several amounts and runs it
unpadded with float-rounding-sized noise (padding changes a row's K/V by rounding only, and a flipped code cascades).
The fourth measures `calibration="prompt"` against no calibration for unpadded prompts of several lengths (each
window's first `L` tokens as the prompt), the question behind making it the default.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time

import torch
import transformers
from transformers import DynamicCache

import rqcompile.cache as rq_cache
from rqcompile import models
from rqcompile.cache import RQCache
from rqcompile.calibrate import calibrate
from rqcompile.config import RQConfig
from rqcompile.eval import decode_time_ppl, kl_divergence, license_corpus
from rqcompile.eval.metrics import cache_kwarg

# (license-corpus offset, prompt length): the longest row is unpadded, the others get 25% and 50% padding
ROWS = ((0, 512), (8192, 384), (16384, 256))
CALIBRATIONS = ("none", "prompt", "stdlib")


@torch.inference_mode()
def padded_batch(
    model, rows: list[tuple[torch.Tensor, int]], make_cache, decode: int, pad_id: int, tell: bool = False
) -> list:
    """Left-pad the rows' prompts to the longest, prefill them as one batch, then feed each row's next `decode` tokens
    in one forward. Returns per row (token NLLs [decode], log-probs [decode, vocab]). `tell`: also give the cache the
    prompt's attention mask (`RQCache.set_attention_mask`, for transformers that pass no position ids to caches)."""
    longest = max(length for _, length in rows)
    batch = torch.full((len(rows), longest + decode), pad_id, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for b, (ids, length) in enumerate(rows):
        batch[b, longest - length :] = ids[0, : length + decode]
        mask[b, longest - length :] = 1
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as generate's _prepare_position_ids_for_generation
    cache = make_cache()
    if tell and hasattr(cache, "set_attention_mask"):
        cache.set_attention_mask(mask[:, :longest])
    kw = {cache_kwarg(model): cache, "use_cache": True}
    p = slice(0, longest)
    model(input_ids=batch[:, p], attention_mask=mask[:, p], position_ids=positions[:, p], logits_to_keep=1, **kw)
    d = slice(longest, longest + decode)
    logits = model(input_ids=batch[:, d], attention_mask=mask, position_ids=positions[:, d], **kw).logits
    out = []
    for b, (ids, length) in enumerate(rows):
        lp = torch.log_softmax(logits[b].float(), dim=-1)
        targets = ids[0, length + 1 : length + decode + 1]
        out.append((-lp.gather(-1, targets[:, None]).squeeze(-1).double(), lp))
    return out


def _cell(ref, nll: torch.Tensor, lp: torch.Tensor) -> dict:
    ppl = nll.mean().exp().item()
    kl = (ref.logprobs.double().exp() * (ref.logprobs.double() - lp.double())).sum(-1).clamp_min(0).mean().item()
    return {"ppl": ppl, "ppl_delta_pct": 100 * (ppl / ref.ppl - 1), "kl": kl}


def padding_experiment(model, tok, stdlib, decode: int, tell: bool = False) -> dict:
    rows = [(license_corpus(tok, length + decode + 1, offset=offset), length) for offset, length in ROWS]
    longest = max(length for _, length in ROWS)
    refs = [decode_time_ppl(model, ids, DynamicCache, length, decode, chunk=decode) for ids, length in rows]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    fp_batch = padded_batch(model, rows, DynamicCache, decode, pad_id)
    result = {"rows": [], "fp_padded_vs_unpadded": []}
    for (offset, length), ref, (nll, lp) in zip(ROWS, refs, fp_batch):
        sanity = _cell(ref, nll, lp)
        result["fp_padded_vs_unpadded"].append({"offset": offset, "prompt": length, **sanity})
        print(
            f"fp row {offset}/{length}: ppl {ref.ppl:.3f}; padded batch: ppl {sanity['ppl']:.3f}, KL {sanity['kl']:.2e}"
        )
    print(
        "| calibration | row (offset, prompt, padding) | unpadded: ppl delta, KL | left-padded batch: ppl delta, KL |"
    )
    print("|---|---|---|---|")
    for how in CALIBRATIONS:
        calibration = {"none": None, "prompt": "prompt", "stdlib": stdlib}[how]

        def make(calibration=calibration):
            return RQCache(RQConfig(residual_window=0, rotation_stages=1), calibration=calibration)

        batch = padded_batch(model, rows, make, decode, pad_id, tell)
        for (offset, length), (ids, _), ref, (nll, lp) in zip(ROWS, rows, refs, batch):
            alone = decode_time_ppl(model, ids, make, length, decode, chunk=decode)
            one = _cell(ref, alone.token_nll, alone.logprobs)
            padded = _cell(ref, nll, lp)
            pad_pct = 100 * (longest - length) // longest
            result["rows"].append(
                {
                    "calibration": how,
                    "offset": offset,
                    "prompt": length,
                    "padding_pct": pad_pct,
                    "unpadded": one,
                    "padded": padded,
                }
            )
            print(
                f"| {how} | {offset}, {length}, {pad_pct}% | {one['ppl_delta_pct']:+.1f}%, {one['kl']:.3f} | "
                f"{padded['ppl_delta_pct']:+.1f}%, {padded['kl']:.3f} |",
                flush=True,
            )
    return result


@contextlib.contextmanager
def _perturbed_embeddings(model, seed: int):
    """Input embeddings times (1 + 1e-6 N(0, 1)): a float-rounding-sized change of the unpadded run, to see how far
    the quantized results move on such noise alone (a flipped code cascades through the later layers)."""
    gen = torch.Generator().manual_seed(seed)
    hook = model.get_input_embeddings().register_forward_hook(
        lambda module, args, out: out * (1 + 1e-6 * torch.randn(out.shape, generator=gen)).to(out)
    )
    try:
        yield
    finally:
        hook.remove()


def pad_sweep_experiment(model, tok, stdlib, pads: list[int], noise_seeds: int, decode: int) -> dict:
    """One row (license offset 8192, 384-token prompt) left-padded by each of `pads` tokens (0: alone) in a batch with
    a longer unpadded companion row (offset 0). Padding changes the row's K/V by float rounding only (the padded
    attention sums in another order), but a flipped code cascades; `noise_seeds` unpadded runs with perturbed
    embeddings show how far such noise alone moves the results."""
    offset, length = 8192, 384
    ids = license_corpus(tok, length + decode + 1, offset=offset)
    ref = decode_time_ppl(model, ids, DynamicCache, length, decode, chunk=decode)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    heads = [f"{p} pads" for p in pads] + [f"alone, noise {s}" for s in range(noise_seeds)]
    print("| calibration | " + " | ".join(heads) + " |\n|---|" + "---|" * len(heads))
    out = []
    for how in CALIBRATIONS:
        calibration = {"none": None, "prompt": "prompt", "stdlib": stdlib}[how]

        def make(calibration=calibration):
            return RQCache(RQConfig(residual_window=0, rotation_stages=1), calibration=calibration)

        cells = []
        for pad in pads:
            if pad == 0:
                alone = decode_time_ppl(model, ids, make, length, decode, chunk=decode)
                cell = _cell(ref, alone.token_nll, alone.logprobs)
            else:
                companion = license_corpus(tok, length + pad + decode + 1, offset=0)
                nll, lp = padded_batch(model, [(companion, length + pad), (ids, length)], make, decode, pad_id)[1]
                cell = _cell(ref, nll, lp)
            cells.append({"pads": pad, **cell})
        for seed in range(noise_seeds):
            with _perturbed_embeddings(model, seed):
                alone = decode_time_ppl(model, ids, make, length, decode, chunk=decode)
            cells.append({"pads": 0, "noise_seed": seed, **_cell(ref, alone.token_nll, alone.logprobs)})
        out.append({"calibration": how, "cells": cells})
        print(
            f"| {how} | " + " | ".join(f"{c['ppl_delta_pct']:+.1f}%, {c['kl']:.3f}" for c in cells) + " |", flush=True
        )
    return {"row": {"offset": offset, "prompt": length}, "fp_ppl": ref.ppl, "sweep": out}


def short_prompt_experiment(model, tok, lengths: list[int], offsets: list[int], decode: int) -> dict:
    print("| prompt tokens | window | none: ppl delta, KL | prompt: ppl delta, KL |\n|---|---|---|---|")
    out = []
    for length in lengths:
        for offset in offsets:
            ids = license_corpus(tok, length + decode + 1, offset=offset)
            ref = decode_time_ppl(model, ids, DynamicCache, length, decode, chunk=decode)
            cells = {}
            for how in ("none", "prompt"):
                cal = None if how == "none" else "prompt"
                run = decode_time_ppl(
                    model,
                    ids,
                    lambda c=cal: RQCache(RQConfig(residual_window=0, rotation_stages=1), calibration=c),
                    length,
                    decode,
                    chunk=decode,
                )
                cells[how] = {
                    "ppl_delta_pct": 100 * (run.ppl / ref.ppl - 1),
                    "kl": kl_divergence(ref, run).mean().item(),
                }
            out.append({"prompt": length, "offset": offset, "fp_ppl": ref.ppl, **cells})
            n, p = cells["none"], cells["prompt"]
            print(
                f"| {length} | {offset} | {n['ppl_delta_pct']:+.1f}%, {n['kl']:.3f} | "
                f"{p['ppl_delta_pct']:+.1f}%, {p['kl']:.3f} |",
                flush=True,
            )
    return {"decode": decode, "rows": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decode", type=int, default=128, help="teacher-forced decode steps per row (128)")
    parser.add_argument(
        "--prompt-lengths", default="", help="instead: none vs prompt for these unpadded prompt lengths"
    )
    parser.add_argument("--pad-sweep", default="", help="instead: one row padded by these amounts (0 = alone)")
    parser.add_argument("--noise-seeds", type=int, default=4, help="--pad-sweep: perturbed unpadded runs (4)")
    parser.add_argument("--offsets", default="0,8192", help="license windows of --prompt-lengths (0,8192)")
    parser.add_argument("--set-attention-mask", action="store_true", help="give the caches the mask explicitly")
    parser.add_argument(
        "--min-prompt-tokens", type=int, default=None, help="research: override rqcompile.cache.MIN_PROMPT_TOKENS"
    )
    parser.add_argument("--out", default="", help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.min_prompt_tokens is not None:
        rq_cache.MIN_PROMPT_TOKENS = args.min_prompt_tokens
    model, tok = models.load_smollm2()
    meta = {
        "command": " ".join([".venv/bin/python", *sys.argv]),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} thread",
        "min_prompt_tokens": rq_cache.MIN_PROMPT_TOKENS,
    }
    start = time.perf_counter()
    if args.prompt_lengths:
        lengths = [int(x) for x in args.prompt_lengths.split(",")]
        offsets = [int(x) for x in args.offsets.split(",")]
        result = short_prompt_experiment(model, tok, lengths, offsets, args.decode)
    elif args.pad_sweep:
        pads = [int(x) for x in args.pad_sweep.split(",")]
        result = {
            "decode": args.decode,
            **pad_sweep_experiment(
                model,
                tok,
                calibrate(model, tokenizer=tok, key_scale=True, value_scale=True, rope_key_mean=False),
                pads,
                args.noise_seeds,
                args.decode,
            ),
        }
    else:
        stdlib = calibrate(model, tokenizer=tok, key_scale=True, value_scale=True, rope_key_mean=False)
        result = {"decode": args.decode, **padding_experiment(model, tok, stdlib, args.decode, args.set_attention_mask)}
    meta["seconds"] = round(time.perf_counter() - start, 1)
    print(f"{meta['seconds']} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**meta, **result}, f, indent=1)


if __name__ == "__main__":
    main()
