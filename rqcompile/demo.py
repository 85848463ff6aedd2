"""The main job on the embedded defaults: the real SmolLM2-135M-Instruct and a small random Qwen3.5 (hybrid).

For each backend at 3 bits, next to the uncompressed cache: answer a chat prompt and print the bytes the cache
actually holds. Run: `python -m rqcompile.demo` (or `bash scripts/bootstrap.sh demo` on a fresh machine).
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import DynamicCache

from rqcompile.cache import IsoQuantCache, PlanarQuantCache, RotorQuantCache, RQCache
from rqcompile.eval.metrics import cache_kwarg

QUESTIONS = ("What is the capital of France?", "Name three primary colors.")


def _dynamic_bytes(cache: DynamicCache) -> int:
    return sum(
        layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if getattr(layer, "keys", None) is not None
    )


def _chat(model, tok, question: str, cache, max_new_tokens: int) -> str:
    ids = tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        out = model.generate(
            ids,
            **{cache_kwarg(model): cache},
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.eos_token_id,
        )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def _first_token_margin(model, tok, question: str) -> str:
    """The uncompressed model's two likeliest first answer tokens and their log-probability gap: where the gap is a
    few hundredths of a nat, any perturbation (a compressed cache's too) can flip the whole greedy answer."""
    ids = tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        top = model(ids).logits[0, -1].float().log_softmax(-1).topk(2)
    first, second = (tok.decode(int(i)) for i in top.indices)
    gap = float(top.values[0] - top.values[1])
    return f"uncompressed first token {first!r}, then {second!r} {gap:.2f} nats behind"


def smollm2_demo(bits: int, max_new_tokens: int) -> None:
    from rqcompile.models import load_smollm2

    t0 = time.perf_counter()
    model, tok = load_smollm2()
    print(f"SmolLM2-135M-Instruct loaded in {time.perf_counter() - t0:.1f}s (fp32, CPU)")
    from rqcompile.calibrate import calibrate
    from rqcompile.config import RQConfig

    t0 = time.perf_counter()
    calib = calibrate(model, tokenizer=tok)  # 2048 tokens of stdlib text: key means, key scales from the queries
    print(f"calibrated on 2048 tokens of Python stdlib sources in {time.perf_counter() - t0:.0f}s")
    preset = RQConfig(backend="iso", key_bits=4, value_bits=3, sink_tokens=1)
    # the best measured 3.5 bits/element preset (QUALITY.md, "Session 3"): calibrated bit allocation
    allocated = RQConfig(backend="iso", key_bits=3.5, value_bits=3, sink_tokens=1, bit_allocation=(2, 3, 4, 5, 6))
    caches = {
        "bf16-equivalent (DynamicCache)": DynamicCache,
        f"planar {bits}-bit, uncalibrated": lambda: PlanarQuantCache(bits=bits, calibration=None),
        f"iso {bits}-bit, uncalibrated": lambda: IsoQuantCache(bits=bits, calibration=None),
        f"rotor {bits}-bit, uncalibrated": lambda: RotorQuantCache(bits=bits, calibration=None),
        f"iso {bits}-bit calibrated on the prompt (the drop-in default)": lambda: IsoQuantCache(
            bits=bits, model_config=model.config
        ),
        f"iso {bits}-bit, stdlib calibration": lambda: IsoQuantCache(bits=bits, calibration=calib),
        f"iso {bits}-bit, stdlib + the prompt's means": lambda: IsoQuantCache(
            bits=bits, calibration=calib, prompt_means=True
        ),
        "iso K4/V3 calibrated + sink": lambda: RQCache(preset, calibration=calib),
        "iso K3.5/V3 bit-allocated + sink": lambda: RQCache(allocated, calibration=calib),
    }
    for question in QUESTIONS:
        print(f"\nQ: {question} ({_first_token_margin(model, tok, question)})")
        for name, make in caches.items():
            cache = make()
            answer = _chat(model, tok, question, cache, max_new_tokens)
            if isinstance(cache, RQCache):
                report = cache.memory_report()
                held = f"{report.compressed_bytes:>8,} B held, {report.versus_bf16()}"
            else:
                fp32 = _dynamic_bytes(cache)
                held = f"{fp32 // 2:>8,} B as bf16 ({fp32:,} B held in fp32)"
            print(f"  {name:<32} {held} | {answer!r}")
    _long_prompt(model, tok, bits)


def _long_prompt(model, tok, bits: int) -> None:
    """The chats above fit in the default 32-token exact window (plus the sink token), so they hold more bytes than
    bf16; a long prompt is where the cache compresses: 2,048 tokens of license text, 16 greedy tokens after it."""
    from rqcompile.eval import license_corpus

    ids = license_corpus(tok, 2048)
    reference = model.generate(ids, max_new_tokens=16, do_sample=False)
    cache = IsoQuantCache(bits=bits, model_config=model.config)
    out = model.generate(ids, **{cache_kwarg(model): cache}, max_new_tokens=16, do_sample=False)
    agree = (out[0, 2048:] == reference[0, 2048:]).float().mean().item()
    report = cache.memory_report()
    print(
        f"\n2,048-token prompt (license text), IsoQuantCache(bits={bits}, model_config=model.config) (defaults): "
        f"{report.compressed_bytes:,} B "
        f"held, {report.versus_bf16()}; greedy agreement with the uncompressed cache over 16 tokens "
        f"{agree:.0%}"
    )


def smollm2_compiled_demo(bits: int, max_new_tokens: int) -> None:
    """The compiler path: capture, rewrite the attention subgraphs, run the rewritten programs."""
    import rqcompile
    from rqcompile.models import load_smollm2

    model, tok = load_smollm2()
    # calibrate's default, and the CLI's for the default full mixing: the key means, post- and pre-RoPE, and key scales
    # from the queries (RMS scales measured on sample text hurt a mixed group, QUALITY.md "Staged rotations in the
    # format"; the query scales do not, "Session 15")
    calib = rqcompile.calibrate(model, tokenizer=tok)
    question = QUESTIONS[0]
    ids = tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    print(f"\nrqcompile.apply(SmolLM2, bits={bits}, calibration=calib) (iso, full mixing, one sink token, fused) ...")
    t0 = time.perf_counter()
    lm = rqcompile.apply(model, bits=bits, calibration=calib, max_cache_len=ids.shape[1] + max_new_tokens)
    print(f"  built in {time.perf_counter() - t0:.0f}s; {lm.memory_report()}")
    out = lm.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id)
    print(f"  Q: {question}\n  A: {tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()!r}")


def qwen3_5_demo(bits: int) -> None:
    from rqcompile.models import tiny_qwen3_5

    model = tiny_qwen3_5(head_dim=128, vocab_size=256)
    config = model.config
    ids = torch.randint(0, 256, (1, 64))
    print(f"\nsmall random Qwen3.5 (hybrid: {config.layer_types})")
    reference = model.generate(ids, max_new_tokens=16, do_sample=False)
    for name, cache in (("planar", PlanarQuantCache(bits=bits)), ("iso", IsoQuantCache(bits=bits))):
        out = model.generate(ids, **{cache_kwarg(model): cache}, max_new_tokens=16, do_sample=False)
        agree = (out[0, 64:] == reference[0, 64:]).float().mean().item()
        print(f"  eager {name} {bits}-bit: {cache.memory_report()}; greedy agreement with uncompressed {agree:.0%}")
    import rqcompile

    calib = rqcompile.calibrate(model, torch.randint(0, 256, (1, 256)))  # random weights: random tokens will do
    lm = rqcompile.apply(model, backend="iso", bits=bits, max_cache_len=96, calibration=calib)
    compiled = lm.generate(ids, max_new_tokens=16)
    eager_cache = IsoQuantCache(bits=bits, calibration=calib)
    eager = model.generate(ids, **{cache_kwarg(model): eager_cache}, max_new_tokens=16, do_sample=False)
    same = torch.equal(compiled[0, 64:], eager[0, 64:])
    print(f"  rqcompile.apply iso {bits}-bit: {lm.memory_report()}; tokens identical to the eager cache: {same}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, default=3, choices=(2, 3, 4))
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--skip-compiled", action="store_true", help="skip rqcompile.apply on SmolLM2 (~1 min)")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    smollm2_demo(args.bits, args.max_new_tokens)
    if not args.skip_compiled:
        smollm2_compiled_demo(args.bits, args.max_new_tokens)
    qwen3_5_demo(args.bits)


if __name__ == "__main__":
    main()
