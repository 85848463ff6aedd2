"""Research (session 17): rotations learned on calibration text instead of random ones (issue 6's untried candidate).

Each (layer, K|V, kv-head) rotation is fitted to what the cache quantizes on stdlib text, `u = (x - mean) / scale`,
by alternating, as in ITQ (Gong & Lazebnik): the codes given the rotation (the library's own encoder, scale search
included), then the rotation given the codes. The reconstruction in the rotated space is `||u|| L / ||L||` (L the
chosen levels: the stored norm restores the length), which a rotation does not change, so the rotation step is an
orthogonal Procrustes problem, and each alternation can only lower the squared error.

- `butterfly`: the staged rotation's own structure (the default "full" mixing: blocks of the backend, a perfect
  shuffle between stages), each block fitted by block-coordinate descent: with every other stage fixed, one stage's
  blocks are independent Procrustes problems of size b x b (det +1 kept). The rotation stays a product of
  block-diagonal layers, as the issue asks; it starts from the library's random one.
- `dense`: one unconstrained g x g Procrustes rotation per norm group: the upper bound of what fitting can do (not
  block-structured).

Evaluation: the presets' 1K harness (prefill 512, 256 teacher-forced steps, license windows 0 / 8192 / 16384, no
window) with `RQCache(config, calibration=calibrate(key_scale="query"), prompt_means=True)`, the rotations swapped in by
a research patch of the cache's `make_state`; also the held-out relative MSE on license text.

    .venv/bin/python benchmarks/learned_rotations.py --configs "iso K3V3" --methods random,butterfly,dense
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from pair_query_scales import WIDTHS
from quality_harness import Harness, add_arguments, row

import rqcompile.cache as cache_module
import rqcompile.quant.quantizer as quantizer_module
from rqcompile.cache import RQCache
from rqcompile.config import RQConfig
from rqcompile.eval.metrics import cache_kwarg
from rqcompile.quant.quantizer import _run_table, _search_codes, codebook_size
from rqcompile.quant.rotations import (
    STAGE_SEED_STRIDE,
    _block_diag,
    head_generator,
    shuffle_perm,
    stage_blocks,
    stage_radices,
)


def capture_inputs(model, make_cache, ids: torch.Tensor, chunk: int) -> dict[tuple[int, str], torch.Tensor]:
    """What each (layer, K|V) state quantizes on `ids`, as `u = (x - mean) / scale` [H, N, d] (the sink token of each
    chunk left out), each chunk prefilled into a fresh cache."""
    seen: dict[int, list[torch.Tensor]] = {}
    original = quantizer_module.quantize

    def recording(x, rotation, mean, scale, *args, **kwargs):
        u = (x.float() - mean[:, None, :]) / scale[:, None, :]
        seen.setdefault(rotation.data_ptr(), []).append(u[:, :, 1:].transpose(0, 1).flatten(1, 2))
        return original(x, rotation, mean, scale, *args, **kwargs)

    out: dict[tuple[int, str], list[torch.Tensor]] = {}
    quantizer_module.quantize = recording
    try:
        for start in range(0, ids.numel() - chunk + 1, chunk):
            seen.clear()
            cache = make_cache()
            with torch.no_grad():
                model(ids[start : start + chunk][None], **{cache_kwarg(model): cache}, use_cache=True)
            for layer_idx, layer in enumerate(cache.layers):
                for kind, state in (("k", layer.k_state), ("v", layer.v_state)):
                    out.setdefault((layer_idx, kind), []).extend(seen[state.rotation.data_ptr()])
    finally:
        quantizer_module.quantize = original
    return {key: torch.cat(parts, 1) for key, parts in out.items()}


def targets(y: torch.Tensor, table, candidates: torch.Tensor) -> torch.Tensor:
    """The reconstruction `||y|| L / ||L||` of rotated groups y [N, g] by the library's encoder."""
    norm = y.norm(dim=-1, keepdim=True)
    unit = y / norm.clamp_min(1e-30)
    _, chosen = _search_codes(unit[:, None], table, candidates)  # [N, 1 group, g]
    chosen = chosen[:, 0]
    return norm * chosen / chosen.norm(dim=-1, keepdim=True).clamp_min(1e-30)


def relative_error(u: torch.Tensor, rotation: torch.Tensor, table, candidates: torch.Tensor) -> float:
    """||y - y_hat||^2 / ||y||^2 over the samples u [N, g] for a [g, g] rotation."""
    y = u @ rotation.T
    return float((y - targets(y, table, candidates)).pow(2).sum() / y.pow(2).sum())


def procrustes(cross: torch.Tensor) -> torch.Tensor:
    """The rotation R (det +1) maximizing trace(R^T cross), cross = sum target v^T ([..., b, b])."""
    u, _, vh = torch.linalg.svd(cross)
    det = torch.linalg.det(u @ vh)
    fix = torch.ones(cross.shape[:-1], dtype=cross.dtype)
    fix[..., -1] = det.sign()
    return (u * fix[..., None, :]) @ vh


def stage_matrices(backend: str, group: int, layer: int, head: int, kind: str, seed: int = 0):
    """The library's staged rotation of one head's first norm group as (radices, [per stage: blocks [nb, b, b]],
    [per stage: the permutation matrix before it, or None])."""
    radices = stage_radices(backend, group, "full")
    blocks, perms = [], []
    for stage, radix in enumerate(radices):
        gen = head_generator(seed + STAGE_SEED_STRIDE * stage, layer, head, kind)
        blocks.append(stage_blocks(radix, group, gen))
        if stage:
            p = shuffle_perm(group, radices[stage - 1])
            perms.append(torch.eye(group, dtype=torch.float64)[p])  # (P M)[i] = M[p[i]]
        else:
            perms.append(None)
    return radices, blocks, perms


def fold(blocks, perms, group: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each stage's matrix (its permutation, then its blocks) and their product."""
    stages = []
    for b, p in zip(blocks, perms):
        m = _block_diag(b, group)
        stages.append(m if p is None else m @ p)
    total = torch.eye(group, dtype=torch.float64)
    for m in stages:
        total = m @ total
    return stages, total


def fit_butterfly(u: torch.Tensor, blocks, perms, group: int, table, candidates, sweeps: int):
    """Block-coordinate ITQ over the stages' blocks; returns the folded [g, g] rotation."""
    blocks = [b.clone() for b in blocks]
    u = u.double()
    for _ in range(sweeps):
        stages, total = fold(blocks, perms, group)
        t = targets((u @ total.T).float(), table, candidates).double()
        for s in range(len(stages)):
            stages, _ = fold(blocks, perms, group)
            before = torch.eye(group, dtype=torch.float64)
            for m in stages[:s]:
                before = m @ before
            after = torch.eye(group, dtype=torch.float64)
            for m in stages[s + 1 :]:
                after = m @ after
            v = u @ before.T
            if perms[s] is not None:
                v = v @ perms[s].T
            goal = t @ after  # A^T t, A orthogonal
            nb, b, _ = blocks[s].shape
            whole = min(nb * b, group)
            vb = v[:, : (whole // b) * b].unflatten(-1, (-1, b))
            gb = goal[:, : (whole // b) * b].unflatten(-1, (-1, b))
            cross = torch.einsum("nji,njk->jik", gb, vb)
            fitted = procrustes(cross)
            blocks[s] = torch.cat([fitted, blocks[s][fitted.shape[0] :]], 0)
    return fold(blocks, perms, group)[1]


def fit_dense(u: torch.Tensor, start: torch.Tensor, table, candidates, sweeps: int) -> torch.Tensor:
    rotation = start.double()
    u = u.double()
    for _ in range(sweeps):
        t = targets((u @ rotation.T).float(), table, candidates).double()
        rotation = procrustes(t.T @ u)
    return rotation


def learn(method: str, config: RQConfig, inputs, sweeps: int) -> dict[tuple[int, str], torch.Tensor]:
    """Per (layer, kind): the rotation [H, d / g, g, g] float32 fitted by `method`."""
    out = {}
    for (layer, kind), u in inputs.items():
        state = quantizer_module.make_state(
            config, layer_idx=layer, kind=kind, num_heads=u.shape[0], head_dim=u.shape[-1]
        )
        group = state.group
        table = _run_table(state.widths[:group], state.levels)
        candidates = state.levels[codebook_size(state.widths) :]
        heads = []
        for h in range(u.shape[0]):
            groups = []
            for g in range(u.shape[-1] // group):
                ug = u[h, :, g * group : (g + 1) * group]
                if method == "dense":
                    groups.append(fit_dense(ug, state.rotation[h, g], table, candidates, sweeps))
                else:
                    _, blocks, perms = stage_matrices(config.backend, group, layer, h, kind, config.seed)
                    if g:  # later groups draw their blocks after the first one's: use the library's as the start
                        raise NotImplementedError("research script: one norm group per head")
                    groups.append(fit_butterfly(ug, blocks, perms, group, table, candidates, sweeps))
            heads.append(torch.stack(groups))
        out[(layer, kind)] = torch.stack(heads).float()
    return out


def held_out_error(config: RQConfig, inputs, rotations) -> float:
    """Mean over (layer, K|V, head) of the relative squared error on held-out samples."""
    errors = []
    for (layer, kind), u in inputs.items():
        state = quantizer_module.make_state(
            config, layer_idx=layer, kind=kind, num_heads=u.shape[0], head_dim=u.shape[-1]
        )
        table = _run_table(state.widths[: state.group], state.levels)
        candidates = state.levels[codebook_size(state.widths) :]
        rot = state.rotation if rotations is None else rotations[(layer, kind)]
        for h in range(u.shape[0]):
            errors.append(relative_error(u[h], rot[h, 0], table, candidates))
    return sum(errors) / len(errors)


def patch_rotations(rotations) -> None:
    """Research patch: the caches' states take these rotations (None: the library's)."""
    build = quantizer_module.make_state

    def make_state(config, *, layer_idx, kind, **kw):
        state = build(config, layer_idx=layer_idx, kind=kind, **kw)
        if rotations is None:
            return state
        return dataclasses.replace(state, rotation=rotations[(layer_idx, kind)])

    cache_module.make_state = make_state


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="iso K3V3")
    p.add_argument("--methods", default="random,butterfly,dense")
    p.add_argument("--fit-chunk", type=int, default=1024)
    p.add_argument("--sweeps", type=int, default=20)
    p.add_argument("--seeds", default="0", help="rotation seeds (the random rotations, and the fits' starts)")
    add_arguments(p)
    args = p.parse_args()
    harness = Harness.load(args)
    model, text, calib = harness.model, harness.calibration_text, harness.query_scale_calibration()
    print(f"prefill {args.prefill}, decode {args.decode}, windows {args.offsets}, fit on {args.tokens} stdlib tokens")
    for spec, seed in ((s, int(seed)) for s in args.configs.split(",") for seed in args.seeds.split(",")):
        backend, widths = spec.strip().split(" ", 1)
        config = RQConfig(backend=backend, residual_window=0, seed=seed, **WIDTHS[widths])
        make = lambda c=config: RQCache(c, calibration=calib, prompt_means=True)  # noqa: E731
        patch_rotations(None)
        t0 = time.perf_counter()
        fit_inputs = capture_inputs(model, make, text.reshape(-1), args.fit_chunk)
        held_inputs = capture_inputs(model, make, harness.windows[0].reshape(-1)[: args.prefill], args.prefill)
        print(f"captured in {time.perf_counter() - t0:.0f}s", flush=True)
        for method in args.methods.split(","):
            t0 = time.perf_counter()
            rotations = None if method == "random" else learn(method, config, fit_inputs, args.sweeps)
            fit_s = time.perf_counter() - t0
            train = held_out_error(config, fit_inputs, rotations)
            held = held_out_error(config, held_inputs, rotations)
            patch_rotations(rotations)
            print(
                f"{spec:14s} seed {seed} {method:10s} rel. error fit {train:.4f} held-out {held:.4f}  "
                f"{row(*harness.score(make))} fit {fit_s:.0f}s",
                flush=True,
            )
        patch_rotations(None)


if __name__ == "__main__":
    main()
