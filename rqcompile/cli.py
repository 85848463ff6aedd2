"""The `rqcompile` command line: export, generate, evaluate, benchmark and inspect compressed-KV LMs.

    rqcompile export --demo -o smollm2-aoti                 # SmolLM2-135M, iso 3-bit calibrated, AOTInductor
    rqcompile export MODEL_DIR --target onnx -o out         # any llama/qwen3/qwen3_5 checkpoint directory
    rqcompile generate smollm2-aoti --prompt "What is the capital of France?"
    rqcompile generate --demo --prompt "Hello" --bits 3     # eager compressed cache (RQCache), no export
    rqcompile export --demo --bits 3.5 --bit-allocation 2,3,4,5,6 -o out   # calibrated bit allocation
    rqcompile eval --demo --bits 3                          # decode-time perplexity vs the uncompressed cache
    rqcompile bench --demo                                  # CPU decode-step timing, RQCache vs uncompressed
    rqcompile inspect smollm2-aoti                          # manifest, memory per layer, bits/element

Heavy imports (torch, transformers) happen inside the commands, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

BACKENDS = ("planar", "iso", "rotor", "hadamard", "none")


# --- models -------------------------------------------------------------------------------------------------------


def _tiny_qwen3_5():
    from rqcompile.models import tiny_qwen3_5

    return tiny_qwen3_5()


def _load_model(args) -> tuple[Any, Any, str | None]:
    """(model, tokenizer or None, tokenizer directory or None) from --demo / --tiny-qwen3_5 / a model path."""
    if args.tiny_qwen3_5:
        return _tiny_qwen3_5(), None, None
    if args.demo or not args.model:
        from rqcompile.models import default_cache_dir, load_smollm2

        _progress(f"loading SmolLM2-135M-Instruct (first run converts the GGUF, ~20 s) from {default_cache_dir()}")
        model, tok = load_smollm2()
        return model, tok, str(default_cache_dir())
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="float32").eval()
    try:
        tok = AutoTokenizer.from_pretrained(args.model)
    except Exception:  # noqa: BLE001 - a model directory without tokenizer files is fine for ids-only use
        tok = None
    return model, tok, args.model if tok is not None else None


def _progress(message: str) -> None:
    print(f"[rqcompile] {message}", file=sys.stderr, flush=True)


def _stages(text: str) -> int | str:
    if text == "full":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an int or 'full'") from None


def _rq_config(args):
    from rqcompile.config import RQConfig

    try:
        return RQConfig(
            backend=args.backend,
            bits=args.bits,
            key_bits=args.key_bits,
            value_bits=args.value_bits,
            sink_tokens=args.sink_tokens,
            residual_window=args.residual_window,
            bit_allocation=tuple(args.bit_allocation or ()),
            rotation_stages=args.rotation_stages,
            rope_key_mean=args.rope_key_mean,
        )
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None


def _calibration(args, config, model, tok):
    """The calibration `config` needs, measured on `--calibration-tokens` of Python standard-library text (never
    the evaluation corpus), as every measured preset is (QUALITY.md): key mean and K/V scales for one layer of
    blocks, the key mean only for hadamard and mixed (staged) rotations (once a norm group is mixed, scales measured
    on sample text hurt: QUALITY.md "Staged rotations in the format"), plus the error weights `--bit-allocation`
    needs. None with `--no-calibration`, for backend `none`, or for a model without a tokenizer (an error with
    `--bit-allocation`, which cannot do without)."""
    if args.no_calibration or config.backend == "none":
        if config.bit_allocation:
            raise SystemExit("error: --bit-allocation needs a calibration; drop --no-calibration (or backend none)")
        return None

    from rqcompile.calibrate import QUERY_SCALES, calibrate

    count = args.calibration_tokens
    if tok is not None:
        from rqcompile.eval import stdlib_corpus

        ids, source = stdlib_corpus(tok, count), "stdlib"
    elif args.tiny_qwen3_5:  # random weights: random tokens are as representative as any text
        ids, source = _random_ids(model.config.vocab_size, count), "random ids"
    elif config.bit_allocation:
        raise SystemExit(
            "error: --bit-allocation needs a calibration on sample text, and this model has no tokenizer to encode "
            "it with; add the tokenizer files to the model directory, or drop --bit-allocation (uniform bits)"
        )
    else:
        _progress("no tokenizer to encode calibration text with: the cache is not calibrated (lower quality)")
        return None
    _progress(f"calibrating on {count} tokens ({source})")
    scales = config.calibrates_scales  # one block layer: RMS scales; mixed groups: key scales from the queries
    return calibrate(
        model,
        ids,
        key_scale=True if scales else QUERY_SCALES,
        value_scale=scales,
        rope_key_mean=config.rope_key_mean,
        source=source,
    )


def _configured(args, model, tok):
    """The config and its calibration, with `--wide-keys N`: 4-bit keys in the N attention layers
    `rqcompile.key_sensitivity` finds retrieval needs most (a copy probe on stdlib text, one pass per layer)."""
    config = _rq_config(args)
    if args.wide_keys and config.bit_allocation:  # before the calibration's and the probe's minutes
        raise SystemExit("error: --wide-keys widens whole layers' keys; --bit-allocation sets widths per coordinate")
    if args.wide_keys and config.k_bits >= 4:
        raise SystemExit(f"error: --wide-keys gives layers 4-bit keys; these keys are {config.k_bits:g}-bit already")
    calibration = _calibration(args, config, model, tok)
    prompt_means = getattr(args, "prompt_means", False)  # the eager commands' option
    if prompt_means and calibration is None:
        raise SystemExit(
            "error: --prompt-means re-measures the calibration's key means on the prompt, and there is no "
            "calibration (--no-calibration, backend none, or a model without a tokenizer)"
        )
    if not args.wide_keys:
        return config, calibration
    from rqcompile.sensitivity import key_sensitivity

    if tok is not None:
        probe = {"tokenizer": tok}
    elif args.tiny_qwen3_5:  # random weights: random tokens probe them as well as any text
        probe = {"input_ids": _random_ids(model.config.vocab_size, 256), "passage": 128, "gap": 128}
    else:
        raise SystemExit("error: --wide-keys probes the model on sample text; this model has no tokenizer to encode it")
    _progress(f"probing which layers' keys retrieval needs (--wide-keys {args.wide_keys}; one pass per layer)")
    found = key_sensitivity(model, config, calibration=calibration, prompt_means=prompt_means, **probe)
    try:
        config = found.raise_keys(config, args.wide_keys)
    except ValueError as exc:
        raise SystemExit(f"error: --wide-keys: {exc}") from None
    _progress(f"4-bit keys in layers {sorted(found.ranked()[: args.wide_keys])}")
    return config, calibration


def _random_ids(vocab: int, length: int):
    import torch

    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(0))


def _eager_caches(args, config, model, calibration):
    """A factory of the drop-in cache `generate` / `eval` / `bench` run: `--prompt-means` (checked by `_configured`)
    re-measures the calibration's key means on each prompt (`RQCache(prompt_means=True)`)."""
    from rqcompile.cache import RQCache

    return lambda: RQCache(config, model_config=model.config, calibration=calibration, prompt_means=args.prompt_means)


def _describe_bits(args) -> str:
    if not args.bit_allocation:
        return f"{args.bits} bits"
    return f"{args.bits} bits on average, widths {','.join(map(str, args.bit_allocation))}"


def _prompt_ids(args, tok, vocab: int):
    import torch

    if args.prompt_ids:
        return torch.tensor([[int(t) for t in args.prompt_ids.split(",")]])
    if tok is None:
        raise SystemExit("this model has no tokenizer: pass --prompt-ids 1,2,3")
    if getattr(tok, "chat_template", None) and not args.raw:
        messages = [{"role": "user", "content": args.prompt}]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tok(text, return_tensors="pt").input_ids
    return tok(args.prompt, return_tensors="pt").input_ids


# --- commands -----------------------------------------------------------------------------------------------------


def cmd_export(args) -> int:
    import torch

    from rqcompile.export.lm import export_lm

    torch.manual_seed(0)
    model, tok, tok_dir = _load_model(args)
    if args.uncompressed:
        from rqcompile.passes.capture import capture

        _progress("capturing prefill + decode (uncompressed cache)")
        program = capture(model, max_cache_len=args.max_cache_len, batch_size=args.batch_size)
    else:
        try:
            from rqcompile.api import apply
        except ImportError as exc:
            raise SystemExit(f"rqcompile.api is not available ({exc}); use --uncompressed") from exc
        config, calibration = _configured(args, model, tok)
        _progress(f"capturing and compressing the K/V cache ({args.backend}, {_describe_bits(args)})")
        program = apply(
            model,
            config=config,
            calibration=calibration,
            max_cache_len=args.max_cache_len,
            batch_size=args.batch_size,
        )
    _progress(f"exporting to {args.output} (target {args.target})")
    t0 = time.perf_counter()
    try:
        art = export_lm(
            program, args.output, target=args.target, tokenizer_dir=tok_dir, overwrite=args.overwrite, progress=True
        )
    except Exception as exc:
        if type(exc).__name__ == "TensorRTNotInstalledError":
            print(f"error: {exc}", file=sys.stderr)
            return 3
        raise
    size = sum(e["size"] for e in art.manifest["files"].values())
    print(f"wrote {art.path} ({args.target}, {size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.0f} s")
    return 0


def cmd_generate(args) -> int:
    import torch

    from rqcompile.eval.metrics import cache_kwarg
    from rqcompile.runtime.generate import SamplingConfig

    sampling = SamplingConfig(
        do_sample=args.temperature > 0, temperature=args.temperature or 1.0, top_p=args.top_p, seed=args.seed
    )
    if args.artifact:
        from rqcompile.runtime.loaded import load

        if args.prompt_means:
            raise SystemExit(
                "error: --prompt-means applies to the eager cache; an artifact carries its calibration as constants"
            )

        lm = load(args.artifact)
        ids = _prompt_ids(args, lm.tokenizer, 0)
        room = lm.max_cache_len - ids.shape[1] + 1  # the last new token is never written to the cache
        if room < 1:
            raise SystemExit(
                f"the prompt has {ids.shape[1]} tokens but the artifact's cache holds {lm.max_cache_len} positions; "
                "re-export with a larger --max-cache-len"
            )
        new_tokens = args.max_new_tokens
        if new_tokens > room:
            _progress(f"--max-new-tokens {new_tokens} > the {room} the cache leaves after the prompt: using {room}")
            new_tokens = room
        out = lm.generate(ids, new_tokens, sampling=sampling)
        tok = lm.tokenizer
    else:
        model, tok, _ = _load_model(args)
        ids = _prompt_ids(args, tok, model.config.vocab_size)
        config, calibration = _configured(args, model, tok)
        make_cache = _eager_caches(args, config, model, calibration)
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=args.max_new_tokens,
                do_sample=sampling.do_sample,
                **{cache_kwarg(model): make_cache()},
                pad_token_id=getattr(tok, "eos_token_id", None) if tok is not None else 0,
            )
    new = out[0, ids.shape[1] :]
    print(tok.decode(new, skip_special_tokens=True) if tok is not None else ",".join(map(str, new.tolist())))
    return 0


def cmd_eval(args) -> int:
    import torch
    from transformers import DynamicCache

    from rqcompile.eval import decode_time_ppl, license_corpus

    torch.manual_seed(0)
    model, tok, _ = _load_model(args)
    need = args.prefill + args.decode + 1
    if tok is not None:
        ids = license_corpus(tok, need)
    else:
        ids = torch.randint(0, model.config.vocab_size, (1, need), generator=torch.Generator().manual_seed(0))
    config, calibration = _configured(args, model, tok)
    make_cache = _eager_caches(args, config, model, calibration)
    _progress(f"decode-time perplexity: prefill {args.prefill}, decode {args.decode} tokens")
    ref = decode_time_ppl(
        model, ids, lambda: DynamicCache(config=model.config), args.prefill, args.decode, progress=True
    )
    test = decode_time_ppl(
        model,
        ids,
        make_cache,
        args.prefill,
        args.decode,
        progress=True,
    )
    delta = 100 * (test.ppl / ref.ppl - 1)
    result = {"uncompressed_ppl": ref.ppl, "compressed_ppl": test.ppl, "delta_percent": delta, "config": str(config)}
    print(
        json.dumps(result) if args.json else f"uncompressed ppl {ref.ppl:.3f}  {config}: {test.ppl:.3f} ({delta:+.2f}%)"
    )
    return 0


def cmd_bench(args) -> int:
    import torch
    from transformers import DynamicCache

    from rqcompile.eval.metrics import cache_kwarg

    if torch.cuda.is_available():
        print("CUDA is available: for kernel and decode-attention timings use  python benchmarks/gpu_bench.py")
    torch.manual_seed(0)
    model, tok, _ = _load_model(args)
    ids = torch.randint(0, model.config.vocab_size, (1, args.prefill + args.steps + 1))
    config, calibration = _configured(args, model, tok)
    make_cache = _eager_caches(args, config, model, calibration)
    rows = []
    from tqdm.auto import tqdm

    for name, make in (
        ("uncompressed", lambda: DynamicCache(config=model.config)),
        (str(config), make_cache),
    ):
        kw = {cache_kwarg(model): make(), "use_cache": True}  # 'cache' where transformers renamed it
        with torch.no_grad():
            model(input_ids=ids[:, : args.prefill], **kw)
            times = []
            for i in tqdm(range(args.steps), desc=name[:30], leave=False):
                pos = args.prefill + i
                t0 = time.perf_counter()
                model(input_ids=ids[:, pos : pos + 1], **kw)
                times.append(time.perf_counter() - t0)
        times.sort()
        rows.append((name, 1000 * times[len(times) // 2]))
    for name, ms in rows:
        print(f"{name:<60} {ms:8.2f} ms/step (median of {args.steps}, CPU, eager)")
    return 0


def _format_arithmetic(rq: dict[str, Any] | None, head_dim: int | None) -> list[str]:
    if not rq or not head_dim:
        return ["format: uncompressed cache (no rq_config)"]
    group = rq.get("norm_group") or min(head_dim, 128)
    allocation = rq.get("bit_allocation") or ()
    lines = []
    for kind, bits in (("K", rq.get("key_bits") or rq["bits"]), ("V", rq.get("value_bits") or rq["bits"])):
        per = bits + 16 * (head_dim // group) / head_dim
        code = f"{bits:g} bits/code" + (
            f" on average (widths {min(allocation)}-{max(allocation)})" if allocation else ""
        )
        lines.append(
            f"format {kind}: {code} + one fp16 norm per {group} coords = {per:.3f} bits/element "
            f"({16 / per:.2f}x smaller than bf16)"
        )
    return lines


def _layout_lines(art) -> list[str]:
    """One line per (layer, K|V) whose widths are mixed (calibrated bit allocation): average, range and runs.
    Uniform artifacts print nothing here (their single width is in the format lines)."""
    from rqcompile.export.artifact import format_widths
    from rqcompile.passes.kv_compress import width_label

    lines = []
    for layer, states in sorted(art.quant_states().items()):
        for kind, state in sorted(states.items()):
            if not state.uniform:
                perm = "" if state.perm is None else ", per-head channel order (perm)"
                lines.append(
                    f"layout     layer {layer} {kind.upper()}: {width_label(state.widths)}: "
                    f"{format_widths(state.widths)}{perm}"
                )
    return lines


def cmd_inspect(args) -> int:
    from rqcompile.export.artifact import read_artifact

    art = read_artifact(args.artifact)
    m = art.manifest
    if args.json:
        print(json.dumps(m, indent=2))
        return 0
    prog = m.get("program") or {}
    print(f"artifact   {art.path}")
    versions = f"format {m['format_version']}, torch {m.get('torch')}, rqcompile {m.get('rqcompile')}"
    print(f"target     {m['target']}  ({versions})")
    mc = m.get("model_config") or {}
    print(f"model      {mc.get('model_type')}  layers {mc.get('num_hidden_layers')}  vocab {mc.get('vocab_size')}")
    print(f"rq_config  {m.get('rq_config')}")
    if prog:
        print(
            f"programs   {prog['files']}  batch {prog['batch_size']}  max_cache_len {prog['max_cache_len']}  "
            f"prefill_len {prog['prefill_len'] or 'dynamic'}  eos {prog['eos_token_id']}"
        )
        import math

        itemsize = {"uint8": 1, "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "int32": 4, "int64": 8}
        total = 0
        print("state      name                      shape                dtype      bytes")
        for s in prog["state"]:
            nbytes = math.prod(s["shape"]) * itemsize.get(s["dtype"], 4)
            total += nbytes
            print(f"           {s['name']:<25} {str(s['shape']):<20} {s['dtype']:<10} {nbytes:>10,}")
        print(f"           total state {total:,} bytes ({total / 2**20:.2f} MiB)")
    head_dim = mc.get("head_dim") or (
        mc["hidden_size"] // mc["num_attention_heads"]
        if mc.get("hidden_size") and mc.get("num_attention_heads")
        else None
    )
    for line in _format_arithmetic(m.get("rq_config"), head_dim) + _layout_lines(art):
        print(line)
    print(f"files      {len(m['files'])} (sha256-verified)")
    return 0


# --- parser -------------------------------------------------------------------------------------------------------


def _model_args(p: argparse.ArgumentParser, positional: bool = True) -> None:
    g = p.add_argument_group("model (one of)")
    if positional:
        g.add_argument("model", nargs="?", help="transformers checkpoint directory (llama / qwen3 / qwen3_5)")
    else:
        g.add_argument("--model", help="transformers checkpoint directory (llama / qwen3 / qwen3_5)")
    g.add_argument("--demo", action="store_true", help="the built-in SmolLM2-135M-Instruct (default)")
    g.add_argument("--tiny-qwen3_5", action="store_true", help="a tiny random-weight hybrid Qwen3.5 (for smoke tests)")


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (an integer >= 0)")
    return value


def _bits(text: str) -> int | float:
    """A code width: 2, 3 or 4 (RQConfig checks), or a fractional average such as 3.5 with --bit-allocation."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of bits") from None
    return int(value) if value.is_integer() else value


def _widths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of widths, e.g. 2,3,4,5,6") from None


def _quant_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("compression")
    g.add_argument("--backend", choices=BACKENDS, default="iso", help="rotation before quantizing (default iso)")
    g.add_argument(
        "--bits",
        type=_bits,
        default=3,
        help="bits per coordinate: 2, 3 or 4 (default 3); an average with --bit-allocation",
    )
    g.add_argument("--key-bits", type=_bits, help="override bits for keys")
    g.add_argument("--value-bits", type=_bits, help="override bits for values")
    g.add_argument(
        "--bit-allocation",
        type=_widths,
        metavar="W,W,...",
        help="calibrated bit allocation: code widths a coordinate may get (e.g. 2,3,4,5,6); the bits above are then "
        "averages (e.g. 3.5). Calibrates the model first (on --calibration-tokens of Python stdlib text)",
    )
    g.add_argument(
        "--calibration-tokens",
        type=int,
        default=2048,
        help="length of the Python stdlib calibration text the cache is calibrated on (default 2048)",
    )
    g.add_argument(
        "--no-calibration",
        action="store_true",
        help="do not calibrate (faster start, much lower quality for the block backends; QUALITY.md)",
    )
    g.add_argument(
        "--sink-tokens",
        type=int,
        default=1,
        help="first tokens kept uncompressed (default 1, the attention sink; 0 disables)",
    )
    g.add_argument(
        "--residual-window",
        type=int,
        default=32,
        help="most recent tokens kept uncompressed (default 32: the largest quality gain measured at long contexts; "
        "0 disables)",
    )
    g.add_argument(
        "--rope-key-mean",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also remove the keys' pre-RoPE mean, turned to each key's position (KL -13%% to -45%% on SmolLM2, "
        "QUALITY.md 'Session 14'); default: on for models with a static RoPE (the calibration measures it), "
        "--no-rope-key-mean for the format without it",
    )
    g.add_argument(
        "--wide-keys",
        type=_count,
        default=0,
        metavar="N",
        help="4-bit keys in the N attention layers whose key error costs retrieval most, found by a copy probe on "
        "stdlib text (rqcompile.key_sensitivity; one forward per layer first). About half the layers buys long-context "
        "retrieval (QUALITY.md 'Session 37'); default 0",
    )
    g.add_argument(
        "--rotation-stages",
        type=_stages,
        default=None,
        metavar="S|full",
        help="layers of blocks composed with shuffles between them; 'full' (the default for planar/iso/rotor "
        "without --bit-allocation) mixes each whole norm group, 1 keeps the block-diagonal rotation (QUALITY.md "
        "'Staged rotations')",
    )


def _prompt_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", default="What is the capital of France?", help="prompt text (chat template applied)")
    p.add_argument("--prompt-ids", help="comma-separated token ids instead of --prompt")
    p.add_argument("--raw", action="store_true", help="do not apply the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)


def _eager_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--prompt-means",
        action="store_true",
        help="measure the key means afresh on each prompt and keep the rest of the stdlib calibration (its key "
        "scales from the queries): RQCache(prompt_means=True), the best calibration measured at 8K tokens "
        "(QUALITY.md 'Session 16')",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rqcompile",
        description="KV-cache compression compiler: rotate + Lloyd-Max quantize the K/V cache, export, run.",
        epilog="Run `rqcompile COMMAND --help` for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    for name, help_text in (
        ("export", "compress a model's K/V cache in the graph and export an artifact (AOTInductor / ONNX / TensorRT)"),
        ("apply", "same as export"),
    ):
        p = sub.add_parser(name, help=help_text, description=help_text)
        _model_args(p)
        _quant_args(p)
        p.add_argument("-o", "--output", required=True, help="artifact directory to write")
        p.add_argument("--target", choices=("aoti", "onnx", "tensorrt"), default="aoti", help="default aoti")
        p.add_argument("--max-cache-len", type=int, default=256, help="cache positions (prompt + new tokens)")
        p.add_argument("--batch-size", type=int, default=1)
        p.add_argument("--uncompressed", action="store_true", help="export the captured program without compression")
        p.add_argument("--overwrite", action="store_true", help="replace an existing artifact")
        p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "generate",
        help="generate text from an artifact, or from a model with the eager compressed cache",
        description="Generate from an exported artifact (rqcompile.load), or from a model with RQCache.",
    )
    p.add_argument("artifact", nargs="?", help="artifact directory (omit to use a model with the eager cache)")
    _model_args(p, positional=False)
    _quant_args(p)
    _prompt_args(p)
    _eager_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "eval",
        help="decode-time perplexity of a compression config vs the uncompressed cache",
        description="Quick quality check: prefill, then score each decoded token (license-text corpus).",
    )
    _model_args(p)
    _quant_args(p)
    p.add_argument("--prefill", type=int, default=128)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--json", action="store_true", help="print one JSON line")
    _eager_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "bench",
        help="CPU timing of decode steps: eager compressed cache vs uncompressed",
        description="Median eager decode-step time on this machine (on CUDA, see benchmarks/gpu_bench.py).",
    )
    _model_args(p)
    _quant_args(p)
    p.add_argument("--prefill", type=int, default=64)
    p.add_argument("--steps", type=int, default=16)
    _eager_args(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "inspect",
        help="show an artifact's manifest, cache memory per layer and the format arithmetic",
        description="Verify an artifact (sha256, versions) and print what it holds.",
    )
    p.add_argument("artifact", help="artifact directory")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
