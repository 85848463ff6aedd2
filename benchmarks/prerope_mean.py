"""Research (session 13, QUALITY.md "Session 13"): remove the key mean *before* RoPE instead of after it.

The format subtracts a per-channel key mean from the post-RoPE keys. A constant post-RoPE offset shifts all of a
query's scores equally (softmax ignores it), but most of the keys' offset is constant *before* RoPE: after it, that
offset turns with the position (pair i by theta_i * p), so a post-RoPE mean catches only its slowly turning part
(and what it catches depends on the position range it was measured on: QUALITY.md "Session 12"). Here each layer's
pre-RoPE key mean m (stdlib text, sink token left out) is rotated to each key's position, RoPE(m, p), subtracted
before quantizing and added back exactly after dequantizing: the codes carry only k - RoPE(m, p). The added-back
term is not softmax-invariant (it is a real positional signal), so it must be exact; it costs no bytes per token
(m is a per-layer constant, RoPE(m, p) a function of the position).

Measured with the library's RQCache (calibration="prompt": its key mean is then the prompt's residual mean) wrapped
to subtract / add RoPE(m, p); SmolLM2's RoPE from the model's own rotary embedding. Harness: prefill 512, 256
teacher-forced steps in one chunk, license windows 0 / 8192 / 16384 (the presets' 1K harness), or `--prefill 7679
--decode 512 --offsets 24576,32768,40960` (8K).

    .venv/bin/python benchmarks/prerope_mean.py --configs "iso K3V3,planar K3V3"
    .venv/bin/python benchmarks/prerope_mean.py --energy      # the key energy each mean leaves (2048 stdlib tokens)
    .venv/bin/python benchmarks/prerope_mean.py --angles      # float error of RoPE_p(m) at 8K / 128K / 1M
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers.models.llama.modeling_llama as llama
from presets import MIXED, V3_LAYERS, WINDOWED_MIXED

from rqcompile import models
from rqcompile.cache import RQCache
from rqcompile.calibrate import calibrate
from rqcompile.config import RQConfig
from rqcompile.eval import decode_time_ppl, kl_divergence, license_corpus, stdlib_corpus
from rqcompile.quant.rope_offset import RopeSpec, rope_offset

WIDTHS = {"K3V3": dict(bits=3), "K4V3": dict(key_bits=4, value_bits=3), "K3V2": dict(key_bits=3, value_bits=2)}
WIDTHS["K4V4"] = dict(bits=4)
WIDTHS.update({k: MIXED[k] for k in ("K4/3 V3", "K3 V3/2", "K3/2 V2")})
WIDTHS.update({k: WINDOWED_MIXED[k] for k in ("K4 V3/2 (11)", "K3 V3/2 (11)")})  # the 8K presets with the window
# session 15: other ways to spend 3.5 bits/element (head_dim 64: 3.25 + 15 of the 60 layer K/V tensors one bit wider)
WIDTHS["K4 V3/2"] = MIXED["K4 V3/2"]
WIDTHS["K3 V4/3"] = dict(bits=3, layer_bits=tuple((i, 3, 4) for i in V3_LAYERS))
WIDTHS["K4/3 V4/3"] = dict(bits=3, layer_bits=tuple((i, 4 if i >= 7 else 3, 4 if i < 7 else 3) for i in range(15)))


def _keys_around_rope(model, ids: torch.Tensor, chunk: int, skip_first: int) -> list[list[tuple]]:
    """Per chunk of `chunk` tokens, per layer: (keys entering RoPE, keys leaving it), [H, T, d] float64, each chunk's
    first `skip_first` tokens (the attention sink) left out."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = llama.apply_rotary_pos_emb

    def spy(q, k, cos, sin, unsqueeze_dim=1):
        q_out, k_out = real(q, k, cos, sin, unsqueeze_dim)
        seen.append((k[0, :, skip_first:].double(), k_out[0, :, skip_first:].double()))
        return q_out, k_out

    llama.apply_rotary_pos_emb = spy
    try:
        for a in range(0, ids.shape[1] - skip_first, chunk):
            model(ids[:, a : a + chunk])
    finally:
        llama.apply_rotary_pos_emb = real
    layers = model.config.num_hidden_layers
    return [seen[i : i + layers] for i in range(0, len(seen), layers)]


def prerope_key_means(model, ids: torch.Tensor, chunk: int = 512, skip_first: int = 1) -> list[torch.Tensor]:
    """Per layer [H, d]: the mean of the keys as they enter RoPE, over `ids` in chunks (each chunk's first
    `skip_first` tokens, the attention sink, left out)."""
    chunks = _keys_around_rope(model, ids, chunk, skip_first)
    count = sum(c[0][0].shape[1] for c in chunks)
    return [sum(c[layer][0].sum(1) for c in chunks).float() / count for layer in range(len(chunks[0]))]


def energy_left(model, ids: torch.Tensor, chunk: int = 512) -> None:
    """Print, for some layers, the fraction of E||k||^2 left after removing the pre-RoPE / the post-RoPE key mean
    (per KV head; chunks of `chunk` tokens, each chunk's first token left out)."""
    chunks = _keys_around_rope(model, ids, chunk, 1)
    for layer in (0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27):
        pre = torch.cat([c[layer][0] for c in chunks], 1)  # [H, T, d]
        post = torch.cat([c[layer][1] for c in chunks], 1)
        total = pre.pow(2).sum(-1).mean(-1)
        left = [(x - x.mean(1, keepdim=True)).pow(2).sum(-1).mean(-1) / total for x in (pre, post)]
        cells = [" / ".join(f"{v:.2f}" for v in f.tolist()) for f in left]
        print(f"layer {layer:2d}: energy left after the pre-RoPE mean {cells[0]}, after the post-RoPE mean {cells[1]}")


def angle_error() -> None:
    """How far RoPE_p(m) computed as the models do (fp32 theta * p) and as a decode kernel could (a tile start p0 and
    an offset j, joined by the angle-addition formula in fp32) are from the exact value (float64), relative to |m|."""
    for name, dims, theta in (("Qwen3.5 (d_rot 64, theta 1e7)", 64, 1e7), ("SmolLM2 (d 64, theta 1e5)", 64, 1e5)):
        inv = 1.0 / (theta ** (torch.arange(0, dims, 2, dtype=torch.float) / dims))
        m, half = torch.randn(1, dims, generator=torch.Generator().manual_seed(0)), dims // 2
        for p0 in (8192, 131072, 1048576):
            j = torch.arange(64)
            model = rope_offset(m, (p0 + j)[None], RopeSpec(inv))[0, 0]
            a0, aj = p0 * inv, j[:, None].float() * inv
            c, s = a0.cos() * aj.cos() - a0.sin() * aj.sin(), a0.sin() * aj.cos() + a0.cos() * aj.sin()
            tile = torch.cat([m[0, :half] * c - m[0, half:] * s, m[0, half:] * c + m[0, :half] * s], -1)
            exact = (p0 + j[:, None].double()) * inv.double()
            md, ce, se = m[0].double(), exact.cos(), exact.sin()
            exact = torch.cat([md[:half] * ce - md[half:] * se, md[half:] * ce + md[:half] * se], -1)
            err = [(x.double() - exact).norm(dim=-1).max().item() / m.norm().item() for x in (model, tile)]
            print(f"{name} at p = {p0:>7d}: model's fp32 angles {err[0]:.1e}, per-tile addition {err[1]:.1e} of |m|")


class PreRopeMeanCache(RQCache):
    """RQCache that quantizes k - RoPE(m, p) and returns the dequantized history plus RoPE(m, p) (batch 1, no
    padding: positions are the layer's token count). `means` None: each layer measures m on its first K (the prompt),
    un-rotated to the pre-RoPE frame, its first token left out."""

    def __init__(self, config: RQConfig, means: list[torch.Tensor] | None, rotary, **kw) -> None:
        super().__init__(config, **kw)
        self.means, self.rotary, self.measured = means, rotary, {}

    def _mean(self, layer_idx: int, key_states: torch.Tensor) -> torch.Tensor:
        if self.means is not None:
            return self.means[layer_idx]
        if layer_idx not in self.measured:
            cos, sin = self.rotary(key_states, torch.arange(key_states.shape[-2])[None])
            pre = key_states * cos[:, None] - llama.rotate_half(key_states) * sin[:, None]
            self.measured[layer_idx] = pre[0, :, 1:].double().mean(1).float()
        return self.measured[layer_idx]

    def _offset(self, layer_idx: int, start: int, length: int, like: torch.Tensor) -> torch.Tensor:
        m = self._mean(layer_idx, like).to(like.dtype)[None, :, None, :]  # [1, H, 1, d]
        pos = torch.arange(start, start + length)[None]
        cos, sin = self.rotary(like, pos)  # [1, T, d]
        return m * cos[:, None] + llama.rotate_half(m) * sin[:, None]

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        start = self.get_seq_length(layer_idx) if layer_idx < len(self.layers) else 0
        residual = key_states - self._offset(layer_idx, start, key_states.shape[-2], key_states)
        keys, values = super().update(residual, value_states, layer_idx, *args, **kwargs)
        return keys + self._offset(layer_idx, 0, keys.shape[-2], keys), values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="iso K3V3,planar K3V3,rotor K3V3,hadamard K3V3")
    parser.add_argument("--window", type=int, default=0, help="RQConfig.residual_window")
    parser.add_argument("--stages", default=None, help="RQConfig.rotation_stages (default: the library's, 'full')")
    parser.add_argument("--tokens", type=int, default=4096, help="stdlib tokens for the pre-RoPE mean")
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--decode", type=int, default=256)
    parser.add_argument("--offsets", default="0,8192,16384")
    parser.add_argument(
        "--only", default="", help="run only the variants whose name contains this ('|' separates alternatives)"
    )
    parser.add_argument("--energy", action="store_true", help="only print the key energy left by each mean")
    parser.add_argument("--angles", action="store_true", help="only print the float error of RoPE_p(m) at long p")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    if args.angles:
        angle_error()
        return
    model, tok = models.load_smollm2()
    if args.energy:
        energy_left(model, stdlib_corpus(tok, 2048))
        return
    means = prerope_key_means(model, stdlib_corpus(tok, args.tokens))
    stdlib = calibrate(
        model, stdlib_corpus(tok, args.tokens), key_scale=False, rope_key_mean=True
    )  # pre-RoPE and residual key means
    stdlib_post = calibrate(
        model, stdlib_corpus(tok, args.tokens), key_scale=False, rope_key_mean=False
    )  # the post-RoPE key mean
    rotary = model.model.rotary_emb
    prefill, decode = args.prefill, args.decode
    windows = [license_corpus(tok, prefill + decode + 1, offset=int(o)) for o in args.offsets.split(",")]
    refs = [decode_time_ppl(model, ids, prefill=prefill, decode=decode, chunk=decode) for ids in windows]
    print(f"prefill {prefill}, decode {decode}, windows {args.offsets}, w{args.window}, calibration='prompt'")
    for spec in args.configs.split(","):
        backend, widths = spec.strip().split(" ", 1)
        stages = int(args.stages) if args.stages and args.stages.isdigit() else args.stages
        config = RQConfig(backend=backend, residual_window=args.window, rotation_stages=stages, **WIDTHS[widths])
        for name, make in (
            (
                "post-RoPE key mean (the format today)",
                lambda c=config: RQCache(c.replace(rope_key_mean=False), calibration="prompt"),
            ),
            (
                "post-RoPE key mean, calibrate(stdlib)",
                lambda c=config: RQCache(c.replace(rope_key_mean=False), calibration=stdlib_post),
            ),
            ("pre-RoPE key mean (stdlib) removed", lambda c=config: PreRopeMeanCache(c, means, rotary)),
            ("pre-RoPE key mean (prompt) removed", lambda c=config: PreRopeMeanCache(c, None, rotary)),
            (
                "the same, RQConfig(rope_key_mean=True)",
                lambda c=config: RQCache(c.replace(rope_key_mean=True), model_config=model.config),
            ),
            (
                "rope_key_mean, calibrate(stdlib)",
                lambda c=config: RQCache(c.replace(rope_key_mean=True), model_config=model.config, calibration=stdlib),
            ),
        ):
            if not any(part in name for part in args.only.split("|")):
                continue
            if args.window and "removed" in name:  # window_view rebuilds the cache from its config and model_config
                print(f"{spec:14s} {name:38s} skipped: with a window only the library's rope_key_mean is measured")
                continue
            t0, cells, kls, agree = time.perf_counter(), [], [], []
            for ids, ref in zip(windows, refs):
                result = decode_time_ppl(model, ids, make, prefill, decode, chunk=decode)
                kls.append(kl_divergence(ref, result).mean().item())
                cells.append(f"{100 * (result.ppl / ref.ppl - 1):+.2f}%")
                # teacher-forced top-1 agreement with the uncompressed model (same steps as the KL)
                agree.append((ref.logprobs.argmax(-1) == result.logprobs.argmax(-1)).float().mean().item())
            mean_kl = sum(kls) / len(kls)
            kl_cells = " / ".join(f"{k:.4f}" for k in kls)
            print(f"{spec:14s} {name:38s} {' / '.join(cells)} (KL {kl_cells}; mean {mean_kl:.4f}) ", end="")
            print(f"top-1 {100 * sum(agree) / len(agree):.1f}% ", end="")
            print(f"{time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
