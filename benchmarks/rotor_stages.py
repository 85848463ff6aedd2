"""Rotor's full mixing, session 9's stages against session 8's (QUALITY.md "Session 9"), with the quality pins'
harness (tests/test_quality_pins.py: prefill 512, 256 teacher-forced decode steps in one chunk, one license window)
and the drop-in caches' default calibration (`calibration="prompt"`).

Session 8's stages were Haar-random rotors with the leftover coordinate (g mod 3) in a fixed slot; session 9's are
the flattest 3D rotation in random signed orientations, with the leftover slot moving each stage. The old generator
is patched in for the second half of the run.

    .venv/bin/python benchmarks/rotor_stages.py                 # window 0
    .venv/bin/python benchmarks/rotor_stages.py --offset 8192   # a second window
"""

from __future__ import annotations

import argparse

import torch

from rqcompile import models
from rqcompile.cache import RQCache
from rqcompile.config import RQConfig
from rqcompile.eval import decode_time_ppl, kl_divergence, license_corpus
from rqcompile.quant import rotations

PREFILL, DECODE = 512, 256
ROWS = {
    "rotor K4V3, full mixing": RQConfig(residual_window=0, backend="rotor", key_bits=4, value_bits=3),
    "rotor K3V3, full mixing": RQConfig(residual_window=0, backend="rotor"),
}


def session8_shuffle(group: int, b: int) -> torch.Tensor:
    """The perfect shuffle with the trailing partial block kept in place (never mixed)."""
    whole = group - group % b
    return torch.cat([torch.arange(whole).view(whole // b, b).T.flatten(), torch.arange(whole, group)])


def session8_blocks(radix: int, group: int, gen: torch.Generator) -> torch.Tensor:
    """Haar-random rotors for radix 3 (the one-stage rotor backend's blocks for d = g)."""
    if radix != 3:
        return SESSION9_BLOCKS(radix, group, gen)
    return rotations._head_blocks("rotor", group, group, gen, "full")


SESSION9_BLOCKS = rotations.stage_blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--offset", type=int, default=0, help="license-corpus token offset of the window (0)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tok = models.load_smollm2()
    ids = license_corpus(tok, PREFILL + DECODE + 1, offset=args.offset)
    reference = decode_time_ppl(model, ids, prefill=PREFILL, decode=DECODE, chunk=DECODE)
    print(f"window {args.offset}: fp ppl {reference.ppl:.3f}")
    for generator in ("session 9", "session 8"):
        if generator == "session 8":
            rotations.shuffle_perm = session8_shuffle
            rotations.stage_blocks = session8_blocks
        for name, config in ROWS.items():
            result = decode_time_ppl(
                model, ids, lambda c=config: RQCache(c, calibration="prompt"), PREFILL, DECODE, chunk=DECODE
            )
            kl = kl_divergence(reference, result).mean().item()
            print(f"{generator}  {name}: ppl delta {100 * (result.ppl / reference.ppl - 1):+.2f}%  KL {kl:.4f}")


if __name__ == "__main__":
    main()
