"""The presets' 1K quality harness, shared by the research scripts (QUALITY.md "Session 14" onwards): SmolLM2-135M,
a prefill of 512 license tokens, 256 teacher-forced steps scored in one chunk, license windows 0 / 8192 / 16384
(`--prefill 7679 --decode 512 --offsets 24576,32768,40960` for the 8K harness); the fp model's logits are the
reference. Calibration on stdlib text (`--tokens`), evaluation on license text: no tuning on what is scored."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from rqcompile import models
from rqcompile.calibrate import Calibration, calibrate
from rqcompile.eval import decode_time_ppl, kl_divergence, license_corpus, stdlib_corpus


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=4096, help="stdlib tokens to calibrate on")
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--decode", type=int, default=256)
    parser.add_argument("--offsets", default="0,8192,16384", help="license windows' token offsets")


@dataclass
class Harness:
    model: torch.nn.Module
    tokenizer: object
    calibration_text: torch.Tensor
    windows: list[torch.Tensor]
    refs: list
    prefill: int
    decode: int

    @classmethod
    def load(cls, args: argparse.Namespace) -> Harness:
        """SmolLM2 on one thread, the stdlib calibration text and the license windows with their fp references."""
        torch.set_num_threads(1)
        model, tok = models.load_smollm2()
        windows = [license_corpus(tok, args.prefill + args.decode + 1, offset=int(o)) for o in args.offsets.split(",")]
        refs = [
            decode_time_ppl(model, ids, prefill=args.prefill, decode=args.decode, chunk=args.decode) for ids in windows
        ]
        return cls(model, tok, stdlib_corpus(tok, args.tokens), windows, refs, args.prefill, args.decode)

    def query_scale_calibration(self) -> Calibration:
        """`calibrate(key_scale="query")` with the pre-RoPE offset, without the error weights: what the
        `prompt_means=True` rows take their key scales from."""
        lib = calibrate(self.model, self.calibration_text, key_scale="query", rope_key_mean=True, source="stdlib")
        return Calibration({k: v for k, v in lib.stats.items() if k[2] != "weight"}, "stdlib", lib.rope)

    def score(self, make_cache) -> tuple[list[float], list[float]]:
        """Per window: the ppl delta in % and the mean KL against the fp model, for caches from `make_cache()`."""
        deltas, kls = [], []
        for ids, ref in zip(self.windows, self.refs, strict=True):
            result = decode_time_ppl(self.model, ids, make_cache, self.prefill, self.decode, chunk=self.decode)
            kls.append(kl_divergence(ref, result).mean().item())
            deltas.append(100 * (result.ppl / ref.ppl - 1))
        return deltas, kls


def row(deltas: list[float], kls: list[float]) -> str:
    """`+a% / +b% / +c% (KL x / y / z; mean m)`, the research logs' cell format."""
    kl = " / ".join(f"{k:.4f}" for k in kls)
    return f"{' / '.join(f'{d:+.2f}%' for d in deltas)} (KL {kl}; mean {sum(kls) / len(kls):.4f})"
