"""Issue 6 research harness: quick decode-time measurements of quantizer variants on SmolLM2-135M.

Not a benchmark of record (benchmarks/presets.py is): it patches the reference quantizer / `make_state` in-process to
try ideas before they become part of the format. Every run: calibration on stdlib text, evaluation on two windows of
the license corpus (offsets 0 and 8192), prefill 512 + 512 teacher-forced steps fed `chunk=512` at a time (valid:
no residual window), ppl delta and mean KL against the fp cache per window.

    .venv/bin/python benchmarks/quality_research.py EXPERIMENT [--out benchmarks/results/research_EXPERIMENT.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

import rqcompile.cache as cache_mod
import rqcompile.quant.quantizer as qmod
from rqcompile.cache import RQCache
from rqcompile.calibrate import Calibration, calibrate
from rqcompile.config import SCALE_SEARCH, RQConfig
from rqcompile.eval import decode_time_ppl, kl_divergence, license_corpus, stdlib_corpus
from rqcompile.models import load_smollm2
from rqcompile.quant.rotations import BLOCK_SIZE, head_generator, make_rotation

PREFILL, DECODE = 512, 512
OFFSETS = (0, 8192)
_ORIG_QUANTIZE = qmod.quantize
_ORIG_MAKE_STATE = qmod.make_state


class Harness:
    def __init__(self, calib_tokens: int = 4096, scale_power: float = 0.8):
        torch.set_num_threads(1)
        torch.set_grad_enabled(False)
        self.model, self.tok = load_smollm2()
        self.windows = [license_corpus(self.tok, PREFILL + DECODE + 1, offset=o) for o in OFFSETS]
        self.refs = [
            decode_time_ppl(self.model, ids, prefill=PREFILL, decode=DECODE, chunk=DECODE) for ids in self.windows
        ]
        self._calibs: dict = {}
        self.calib_tokens, self.scale_power = calib_tokens, scale_power

    def calibration(self, tokens: int | None = None, power: float | None = None, value_scale: bool = True):
        key = (tokens or self.calib_tokens, power or self.scale_power, value_scale)
        if key not in self._calibs:
            ids = stdlib_corpus(self.tok, key[0])
            self._calibs[key] = calibrate(
                self.model, ids, key_scale=True, value_scale=value_scale, scale_power=key[1], rope_key_mean=False
            )
        return self._calibs[key]

    def key_mean(self) -> Calibration:
        full = self.calibration()
        return Calibration({k: v for k, v in full.stats.items() if k[1] == "k" and k[2] == "mean"})

    def run(self, config: RQConfig, calib: Calibration | None, label: str = "") -> dict:
        chunk = 1 if config.residual_window else DECODE
        out = {"label": label, "config": config.to_dict(), "ppl": [], "delta_pct": [], "kl": []}
        t0 = time.perf_counter()
        for ids, ref in zip(self.windows, self.refs):
            res = decode_time_ppl(
                self.model, ids, lambda: RQCache(config, calibration=calib), PREFILL, DECODE, chunk=chunk
            )
            out["ppl"].append(res.ppl)
            out["delta_pct"].append(100 * (res.ppl / ref.ppl - 1))
            out["kl"].append(kl_divergence(ref, res).mean().item())
        out["seconds"] = time.perf_counter() - t0
        d, k = out["delta_pct"], out["kl"]
        print(
            f"{label:40s} delta {d[0]:+6.1f}% {d[1]:+6.1f}%  KL {k[0]:.4f} {k[1]:.4f}  mean KL {sum(k) / len(k):.4f}"
            f"  ({out['seconds']:.0f}s)",
            flush=True,
        )
        return out


@contextlib.contextmanager
def patched(quantize=None, make_state=None):
    """Swap the reference quantizer (what rq::quantize runs on CPU) and/or the cache's make_state."""
    if quantize is not None:
        qmod.quantize = quantize
    if make_state is not None:
        cache_mod.make_state = make_state
    try:
        yield
    finally:
        qmod.quantize = _ORIG_QUANTIZE
        cache_mod.make_state = _ORIG_MAKE_STATE


def search_quantize(alphas: tuple[float, ...], least_squares: bool = True, max_candidate: bool = False):
    """Per-group scale search: codes of y / (n * alpha) for each alpha, keep the smallest reconstruction error."""
    from rqcompile.quant.codebook import boundaries
    from rqcompile.quant.packing import pack
    from rqcompile.quant.rotations import rotate

    def quantize(x, rotation, mean, scale, levels, bits, group):
        dim = x.shape[-1]
        u = (x.float() - mean[:, None, :]) / scale[:, None, :]
        y = rotate(u, rotation).unflatten(-1, (dim // group, group))  # [B, H, T, G, g]
        n = y.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        al = torch.tensor(alphas, dtype=y.dtype)
        cand = al.view(-1, 1, 1, 1, 1, 1).expand(-1, *n.shape).clone()  # [K, B, H, T, G, 1]
        if max_candidate:
            amax = y.abs().amax(-1, keepdim=True) / (n * levels[-1])
            cand = torch.cat([cand, amax[None]], 0)
        unit = y[None] / (n[None] * cand)
        codes = (unit.unsqueeze(-1) > boundaries(levels)).sum(-1)  # [K, B, H, T, G, g]
        chosen = levels[codes]
        cc = (chosen * chosen).sum(-1, keepdim=True).clamp_min(1e-30)
        if least_squares:
            a = (chosen * y[None]).sum(-1, keepdim=True) / cc
        else:
            a = n[None] / cc.sqrt()
        err = ((y[None] - a * chosen) ** 2).sum(-1)  # [K, B, H, T, G]
        best = err.argmin(0)  # [B, H, T, G]
        codes = codes.gather(0, best[None, ..., None].expand(1, *codes.shape[1:])).squeeze(0)
        a = a.squeeze(-1).gather(0, best[None]).squeeze(0)
        return pack(codes.flatten(-2), bits), a.to(torch.float16)

    return quantize


def layer_bits_make_state(k_bits_by_layer: dict[int, int], v_bits_by_layer: dict[int, int] | None = None):
    def make_state(config, *, layer_idx, kind, **kw):
        table = k_bits_by_layer if kind == "k" else (v_bits_by_layer or {})
        if layer_idx in table:
            config = config.replace(**{("key_bits" if kind == "k" else "value_bits"): table[layer_idx]})
        return _ORIG_MAKE_STATE(config, layer_idx=layer_idx, kind=kind, **kw)

    return make_state


def kind_only_make_state(kind_kept: str):
    """Scale search only on keys (or only on values): the other kind's state keeps the bare codebook."""

    def make_state(config, *, layer_idx, kind, **kw):
        if kind != kind_kept:
            config = config.replace(scale_search=())
        return _ORIG_MAKE_STATE(config, layer_idx=layer_idx, kind=kind, **kw)

    return make_state


def permuted_make_state(perm_fn):
    """Rotation = blockdiag(R) @ P as one dense [H, 1, d, d] block (research only: correct, but not O(d))."""

    def make_state(config, *, layer_idx, kind, num_heads, head_dim, mean=None, scale=None):
        state = _ORIG_MAKE_STATE(
            config, layer_idx=layer_idx, kind=kind, num_heads=num_heads, head_dim=head_dim, mean=mean, scale=scale
        )
        if config.backend == "hadamard" or state.group != head_dim:
            return state
        rot = state.rotation  # [H, nb, b, b]
        heads, nb, b, _ = rot.shape
        dense = torch.zeros(heads, nb * b, nb * b)
        for j in range(nb):
            dense[:, j * b : (j + 1) * b, j * b : (j + 1) * b] = rot[:, j]
        dense = dense[:, :head_dim, :head_dim]
        if head_dim % b:  # rotor leftover: keep the identity on the dropped padding
            pass
        perms = perm_fn(layer_idx, kind, num_heads, head_dim, mean, scale)  # [H, d] long: new position i <- old p[i]
        pmat = torch.zeros(heads, head_dim, head_dim)
        pmat[torch.arange(heads)[:, None], torch.arange(head_dim)[None, :], perms] = 1.0
        full = dense @ pmat
        return qmod.replace(state, rotation=full[:, None])

    return make_state


STAGE_SEED = 1000  # stage s > 1 draws its blocks from the library generator with seed + STAGE_SEED * (s - 1)


def stride_perm(dim: int, b: int) -> torch.Tensor:
    """New position i <- old p[i]: the perfect shuffle of the (nb, b) grid of blocks, so each next-stage block takes one
    coordinate from b consecutive blocks of the previous stage (one radix-b butterfly step). Repeated between stages
    it widens the mixing to b, b^2, b^3 ... coordinates. Rotor's leftover coordinate (64 = 21 x 3 + 1) is the
    library's identity block and stays where it is."""
    whole = dim - dim % b
    p = torch.arange(whole).view(whole // b, b).T.flatten()
    return torch.cat([p, torch.arange(whole, dim)])


def dense_blocks(blocks: torch.Tensor, dim: int) -> torch.Tensor:
    """[H, nb, b, b] blocks -> [H, d, d] block-diagonal matrix (rotor's padded block cropped: identity there)."""
    return torch.stack([torch.block_diag(*head) for head in blocks.double()])[:, :dim, :dim]


def staged_rotation(config: RQConfig, state, layer_idx: int, kind: str, stages: int) -> torch.Tensor:
    """R = B_s P ... P B_1 as a dense [H, d, d] matrix: B_1 is the library's own rotation for this (layer, K|V),
    each later B_i the same backend's generator with another seed; P = `stride_perm`."""
    heads, dim = state.num_heads, state.head_dim
    perm = stride_perm(dim, BLOCK_SIZE[config.backend])
    full = dense_blocks(state.rotation, dim)
    for s in range(1, stages):
        blocks = make_rotation(
            config.backend,
            heads,
            dim,
            state.group,
            seed=config.seed + STAGE_SEED * s,
            layer_idx=layer_idx,
            kind=kind,
            iso_mode=config.iso_mode,
        )
        full = dense_blocks(blocks, dim) @ full[:, perm]  # (P M)[i] = M[p[i]]: permute the previous stage's output
    eye = torch.eye(dim, dtype=full.dtype).expand_as(full)
    assert torch.allclose(full @ full.transpose(-1, -2), eye, atol=1e-5), "staged rotation is not orthogonal"
    return full.float()


def staged_make_state(stages: int):
    """Multi-stage block rotation folded into one dense [H, 1, d, d] block (research only: correct, but not O(d)).

    Calibration is untouched: the quantizer still computes (x - mean) / scale first and rotates that, exactly as
    the normal path; only the rotation tensor is replaced. Hadamard keeps its own rotation."""

    def make_state(config, *, layer_idx, kind, **kw):
        state = _ORIG_MAKE_STATE(config, layer_idx=layer_idx, kind=kind, **kw)
        if config.backend == "hadamard" or state.group != state.head_dim:
            return state
        full = staged_rotation(config, state, layer_idx, kind, stages)
        return qmod.replace(state, rotation=full[:, None])

    return make_state


HAAR_SEED = 7777


def haar_make_state(config, *, layer_idx, kind, **kw):
    """A Haar-random dense rotation per head (QR of a Gaussian matrix): full mixing, the ceiling of any staged
    block rotation, and hadamard's structure-free counterpart."""
    state = _ORIG_MAKE_STATE(config, layer_idx=layer_idx, kind=kind, **kw)
    dim = state.head_dim
    mats = []
    for head in range(state.num_heads):
        gen = head_generator(config.seed + HAAR_SEED, layer_idx, head, kind)
        q, r = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
        mats.append(q * torch.sign(torch.diagonal(r)))
    return qmod.replace(state, rotation=torch.stack(mats).float()[:, None])


def unchecked_bits(config: RQConfig, bits: int) -> RQConfig:
    """RQConfig refuses widths above 4; the reference quantizer and packing take 1..8, enough for a check that a
    rotation round-trips (8-bit codes: ppl ~ fp)."""
    object.__setattr__(config, "bits", bits)
    return config


def mixing_width(config: RQConfig, stages: int, heads: int = 1, dim: int = 64) -> float:
    """Mean number of input coordinates each output coordinate of the staged rotation depends on (sanity check)."""
    state = _ORIG_MAKE_STATE(config, layer_idx=0, kind="k", num_heads=heads, head_dim=dim)
    full = staged_rotation(config, state, 0, "k", stages)
    return (full.abs() > 1e-6).sum(-1).float().mean().item()


def rope_pairs(layer_idx, kind, heads, dim, mean, scale):
    half = dim // 2
    order = torch.stack([torch.arange(half), torch.arange(half) + half], -1).flatten()  # (0, 32, 1, 33, ...)
    return order.expand(heads, dim)


def make_energy_perm(energy_by_layer):
    """Blocks of b channels: sort channels by calibrated energy, deal them so every block has a high and a low one."""

    def perm(layer_idx, kind, heads, dim, mean, scale, b=4):
        e = energy_by_layer[(layer_idx, kind)]  # [H, d]
        out = []
        for h in range(heads):
            order = torch.argsort(e[h], descending=True)
            nb = dim // b
            # snake: block j gets ranks j, 2nb-1-j, 2nb+j, 4nb-1-j, ...
            blocks = [[] for _ in range(nb)]
            for r, ch in enumerate(order.tolist()):
                row, col = divmod(r, nb)
                blocks[col if row % 2 == 0 else nb - 1 - col].append(ch)
            out.append(torch.tensor([c for blk in blocks for c in blk]))
        return torch.stack(out)

    return perm


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("experiment")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--search", default="", help="comma-separated scale_search candidates for every config")
    parser.add_argument("--seeds", default="0", help="comma-separated rotation seeds (experiment stages)")
    args = parser.parse_args(argv)
    search = tuple(float(c) for c in args.search.split(",") if c)
    seeds = tuple(int(c) for c in args.seeds.split(",") if c)
    h = Harness()
    print(f"fp ppl {[r.ppl for r in h.refs]}", flush=True)
    rows = []
    exp = args.experiment
    full = h.calibration()
    km = h.key_mean()
    bitsets = {
        "K4V4": dict(bits=4),
        "K4V3": dict(key_bits=4, value_bits=3),
        "K3V3": dict(bits=3),
        "K3V2": dict(key_bits=3, value_bits=2),
    }
    backends = ("planar", "iso", "rotor", "hadamard")

    def cal(b):
        return km if b == "hadamard" else full

    if exp == "baseline":
        for name, bits in bitsets.items():
            for b in backends:
                rows.append(
                    h.run(
                        RQConfig(residual_window=0, rotation_stages=1, backend=b, sink_tokens=1, **bits),
                        cal(b),
                        f"{b} {name}",
                    )
                )
    elif exp == "search":
        variants = {
            "ls": search_quantize((1.0,)),
            "search5-ls": search_quantize((0.85, 1.0, 1.15, 1.3, 1.5)),
            "search5-len": search_quantize((0.85, 1.0, 1.15, 1.3, 1.5), least_squares=False),
            "search5max-ls": search_quantize((0.85, 1.0, 1.15, 1.3, 1.5), max_candidate=True),
        }
        for name in ("K3V3", "K4V3"):
            for b in backends:
                cfg = RQConfig(residual_window=0, rotation_stages=1, backend=b, sink_tokens=1, **bitsets[name])
                rows.append(h.run(cfg, cal(b), f"{b} {name} base"))
                for vname, fn in variants.items():
                    with patched(quantize=fn):
                        rows.append(h.run(cfg, cal(b), f"{b} {name} {vname}"))
    elif exp == "search2":
        grids = {
            "s5": (0.85, 1.0, 1.15, 1.3, 1.5),
            "s3": (1.0, 1.2, 1.45),
            "s8": (0.8, 0.9, 1.0, 1.1, 1.2, 1.35, 1.5, 1.7),
            "s12": (0.75, 0.85, 0.95, 1.0, 1.05, 1.15, 1.25, 1.35, 1.5, 1.65, 1.8, 2.0),
        }
        for b in ("planar", "iso", "rotor"):
            base = RQConfig(residual_window=0, rotation_stages=1, backend=b, sink_tokens=1, bits=3)
            for gname, grid in grids.items():
                rows.append(h.run(base.replace(scale_search=grid), cal(b), f"{b} K3V3 {gname}"))
            with patched(make_state=kind_only_make_state("k")):
                rows.append(h.run(base.replace(scale_search=grids["s5"]), cal(b), f"{b} K3V3 s5 keys only"))
            with patched(make_state=kind_only_make_state("v")):
                rows.append(h.run(base.replace(scale_search=grids["s5"]), cal(b), f"{b} K3V3 s5 values only"))
    elif exp == "search4":  # candidate sets at 4-bit keys
        grids = {
            "s5": (0.85, 1.0, 1.15, 1.3, 1.5),
            "s12": (0.75, 0.85, 0.95, 1.0, 1.05, 1.15, 1.25, 1.35, 1.5, 1.65, 1.8, 2.0),
        }
        for b in ("iso", "rotor"):
            for gname, grid in grids.items():
                cfg = RQConfig(
                    residual_window=0,
                    rotation_stages=1,
                    backend=b,
                    sink_tokens=1,
                    key_bits=4,
                    value_bits=3,
                    scale_search=grid,
                )
                rows.append(h.run(cfg, cal(b), f"{b} K4V3 {gname}"))
    elif exp == "perm":
        energy = {}
        for (layer, kind, field), t in full.stats.items():
            if field == "scale":
                energy[(layer, kind)] = t
        for name in ("K3V3", "K4V3"):
            for b in ("planar", "iso", "rotor"):
                cfg = RQConfig(
                    residual_window=0, rotation_stages=1, backend=b, sink_tokens=1, scale_search=search, **bitsets[name]
                )
                rows.append(h.run(cfg, full, f"{b} {name} base"))
                with patched(make_state=permuted_make_state(rope_pairs)):
                    rows.append(h.run(cfg, full, f"{b} {name} rope-pairs"))
                bs = {"planar": 2, "iso": 4, "rotor": 3}[b]
                if 64 % bs == 0:
                    fn = make_energy_perm(energy)
                    with patched(make_state=permuted_make_state(lambda *a, fn=fn, bs=bs: fn(*a, b=bs))):
                        rows.append(h.run(cfg, full, f"{b} {name} energy-deal"))
                    # uncalibrated scale: the permutation alone against raw energy
    elif exp == "stages":
        # Second / third block layer after a stride permutation (butterfly): mixes b^s coordinates at O(d) per stage.
        grid = search or SCALE_SEARCH
        blocks = ("iso", "planar", "rotor")
        for b in blocks:
            print(
                f"{b} mixing width, stages 1/2/3:",
                [mixing_width(RQConfig(residual_window=0, rotation_stages=1, backend=b), s) for s in (1, 2, 3)],
            )
        for b in blocks:  # correctness: at 8 bits the staged rotation must give ~fp ppl
            wide = unchecked_bits(
                RQConfig(residual_window=0, rotation_stages=1, backend=b, sink_tokens=1, scale_search=grid), 8
            )
            with patched(make_state=staged_make_state(3)):
                rows.append(h.run(wide, full, f"{b} K8V8 stages 3 full"))
        # every seed redraws all rotations (hadamard's signs too): the spread over seeds is the noise to beat
        for seed, name in ((seed, name) for seed in seeds for name in ("K3V3", "K4V3")):
            cfg = RQConfig(
                residual_window=0, rotation_stages=1, sink_tokens=1, scale_search=grid, seed=seed, **bitsets[name]
            )
            tag = f"{name} seed {seed}"
            rows.append(h.run(cfg.replace(backend="hadamard"), km, f"hadamard {tag} mean"))
            for cname, calib in (("full", full), ("mean", km)):  # ceiling: a dense random rotation of the head
                with patched(make_state=haar_make_state):
                    rows.append(h.run(cfg, calib, f"haar {tag} {cname}"))
            for b in blocks:
                c = cfg.replace(backend=b)
                rows.append(h.run(c, full, f"{b} {tag} stages 1 full (library)"))
                if b == "iso":  # the dense fold of stage 1 must match the library path; mean-only reference
                    with patched(make_state=staged_make_state(1)):
                        rows.append(h.run(c, full, f"{b} {tag} stages 1 full (dense)"))
                    rows.append(h.run(c, km, f"{b} {tag} stages 1 mean (library)"))
                for stages in (2, 3):
                    for cname, calib in (("full", full), ("mean", km)):
                        with patched(make_state=staged_make_state(stages)):
                            rows.append(h.run(c, calib, f"{b} {tag} stages {stages} {cname}"))
                more = {"iso": 4, "planar": 6}.get(b)  # iso: past full support; planar: 2^6 = a whole group
                for cname, calib in (("full", full), ("mean", km)) if more else ():
                    with patched(make_state=staged_make_state(more)):
                        rows.append(h.run(c, calib, f"{b} {tag} stages {more} {cname}"))
    elif exp == "alloc":
        # From the "layers" experiment: 4-bit keys help most in layers 0-4, 15-19, 10-14 (iso K3V3 KL -0.047, -0.047,
        # -0.037 of 0.235). 15 of 30 layers at K4 = 3.5 bits/element; control: the even layers.
        chosen = tuple(range(0, 5)) + tuple(range(10, 20))
        even = tuple(range(0, 30, 2))
        for b in ("iso", "rotor", "planar", "hadamard"):
            base = RQConfig(residual_window=0, rotation_stages=1, backend=b, sink_tokens=1, bits=3, scale_search=search)
            for name, layers in (("K4@0-4,10-19", chosen), ("K4@even", even)):
                cfg = base.replace(layer_bits=tuple((i, 4, 3) for i in layers))
                rows.append(h.run(cfg, cal(b), f"{b} K3V3 {name}"))
                if b != "iso":
                    break
        for b in ("iso", "hadamard"):  # ~3.0 bits: K3, V3 in half the layers, V2 elsewhere
            base = RQConfig(
                residual_window=0,
                rotation_stages=1,
                backend=b,
                sink_tokens=1,
                key_bits=3,
                value_bits=2,
                scale_search=search,
            )
            for name, layers in (("V3@0-4,10-19", chosen), ("V3@even", even)):
                cfg = base.replace(layer_bits=tuple((i, 3, 3) for i in layers))
                rows.append(h.run(cfg, cal(b), f"{b} K3V2 {name}"))
    elif exp == "vlayers":
        # V3 in one range of layers, V2 elsewhere (K3): which layers' values carry the error at 2 bits?
        for lo, hi in ((0, 5), (5, 10), (10, 15), (15, 20), (20, 25), (25, 30)):
            cfg = RQConfig(
                residual_window=0,
                rotation_stages=1,
                backend="iso",
                sink_tokens=1,
                key_bits=3,
                value_bits=2,
                scale_search=search,
            )
            cfg = cfg.replace(layer_bits=tuple((i, 3, 3) for i in range(lo, hi)))
            rows.append(h.run(cfg, full, f"iso K3V2 V3@{lo}-{hi}"))
    elif exp == "group":
        # norm group 32 (two fp16 norms per 64-dim head: +0.25 bits/element) against a 4-bit half of the layers
        for b in ("iso", "rotor", "planar", "hadamard"):
            for name, bits in (("K3V3", dict(bits=3)), ("K3V2", dict(key_bits=3, value_bits=2))):
                cfg = RQConfig(
                    residual_window=0,
                    rotation_stages=1,
                    backend=b,
                    sink_tokens=1,
                    norm_group=32,
                    scale_search=search,
                    **bits,
                )
                rows.append(h.run(cfg, cal(b), f"{b} {name} g32"))
        for sink in (2, 4):
            cfg = RQConfig(
                residual_window=0, rotation_stages=1, backend="iso", sink_tokens=sink, bits=3, scale_search=search
            )
            rows.append(h.run(cfg, full, f"iso K3V3 sink {sink}"))
    elif exp == "power":
        for p in (0.6, 1.0):
            c = h.calibration(power=p)
            for b in ("iso",):
                rows.append(
                    h.run(
                        RQConfig(
                            residual_window=0, rotation_stages=1, backend=b, sink_tokens=1, bits=3, scale_search=search
                        ),
                        c,
                        f"{b} K3V3 power {p}",
                    )
                )
        for n in (16384,):
            c = h.calibration(tokens=n)
            for b in ("iso",):
                rows.append(
                    h.run(
                        RQConfig(
                            residual_window=0, rotation_stages=1, backend=b, sink_tokens=1, bits=3, scale_search=search
                        ),
                        c,
                        f"{b} K3V3 calib {n}",
                    )
                )
    elif exp == "layers":
        # K4 in one contiguous range of layers, K3 elsewhere (V3): which layers carry the key error?
        for b in ("iso",):
            for lo, hi in ((0, 5), (5, 10), (10, 15), (15, 20), (20, 25), (25, 30), (0, 3), (3, 9)):  # noqa: B007
                table = {i: 4 for i in range(lo, hi)}
                with patched(make_state=layer_bits_make_state(table)):
                    cfg = RQConfig(
                        residual_window=0, rotation_stages=1, backend=b, sink_tokens=1, bits=3, scale_search=search
                    )
                    rows.append(h.run(cfg, full, f"{b} K3V3 K4@{lo}-{hi}"))
    else:
        raise SystemExit(f"unknown experiment {exp}")
    if args.out:
        args.out.write_text(json.dumps({"experiment": exp, "fp_ppl": [r.ppl for r in h.refs], "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
