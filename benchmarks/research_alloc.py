"""Issue 6 research: calibrated per-coordinate bit allocation (reverse water-filling) for the block backends.

Idea: a block rotation cannot equalize channel energies the way a dense Hadamard does. Instead of fighting the
anisotropy, spend it: give more bits to the rotated coordinates whose error costs most (keys: E[q_i^2] var(k_i),
the variance they add to attention scores; values: var(v_i) ||W_o column i||^2) and fewer to the rest, at the same
average. For Gaussian sources the gain over uniform bits at equal rate is 0.5 log2(AM/GM) of the weights.

Fake-quant only (a DynamicCache that stores quantize-dequantize results); not a format yet.

    .venv/bin/python benchmarks/research_alloc.py stats
    .venv/bin/python benchmarks/research_alloc.py ppl
"""

from __future__ import annotations

import argparse
import contextlib
import functools

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from rqcompile.eval import decode_time_ppl, kl_divergence, license_corpus, stdlib_corpus
from rqcompile.models import load_smollm2
from rqcompile.quant.codebook import boundaries, codebook, lloyd_max_distortion
from rqcompile.quant.rotations import make_rotation, rotate

PREFILL, DECODE = 512, 512
OFFSETS = (0, 8192)
SEARCH = (0.85, 1.0, 1.15, 1.3, 1.5)


@contextlib.contextmanager
def capture_qkv(model, sink):
    def fn(module, query, key, value, attention_mask, **kw):
        sink.setdefault(module.layer_idx, []).append((query.float(), key.float(), value.float()))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)

    AttentionInterface.register("research_qkv", fn)
    prev = model.config._attn_implementation
    model.set_attn_implementation("research_qkv")
    try:
        yield
    finally:
        model.set_attn_implementation(prev)


def channel_stats(model, ids, skip_first=1, chunk=512):
    sink: dict = {}
    with torch.no_grad(), capture_qkv(model, sink):
        for s in range(0, ids.shape[1], chunk):
            model(ids[:, s : s + chunk], use_cache=False)
    cfg = model.config
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // hq if getattr(cfg, "head_dim", None) is None else cfg.head_dim
    out = {}
    for layer, pieces in sink.items():
        q = torch.cat([p[0][:, :, skip_first:] for p in pieces], 2)[0]  # [Hq, T, d]
        k = torch.cat([p[1][:, :, skip_first:] for p in pieces], 2)[0]  # [Hkv, T, d]
        v = torch.cat([p[2][:, :, skip_first:] for p in pieces], 2)[0]
        q2 = q.pow(2).mean(1).unflatten(0, (hkv, hq // hkv)).mean(1)  # [Hkv, d]
        wo = model.model.layers[layer].self_attn.o_proj.weight.float()  # [hidden, Hq*d]
        wo2 = wo.pow(2).sum(0).view(hq, d).unflatten(0, (hkv, hq // hkv)).mean(1)  # [Hkv, d]
        out[layer] = {
            "k_mean": k.mean(1),
            "k_std": k.std(1).clamp_min(1e-6),
            "v_mean": v.mean(1),
            "v_std": v.std(1).clamp_min(1e-6),
            "q2": q2,
            "wo2": wo2,
        }
    return out


def allocate(weights: torch.Tensor, avg_bits: float, widths: tuple[int, ...], unit: int = 1) -> torch.Tensor:
    """Greedy integer allocation per row of `weights` [H, d] (units of `unit` coordinates share a width):
    minimize sum w_j D(b_j) with mean b = avg_bits, b_j in `widths`."""
    dist = {0: 1.0, **{b: lloyd_max_distortion(b) for b in range(1, 9)}}
    h, d = weights.shape
    wu = weights.view(h, d // unit, unit).sum(-1)
    out = torch.empty(h, d // unit, dtype=torch.long)
    ws = sorted(widths)
    for row in range(h):
        bits = [ws[0]] * (d // unit)
        budget = round(avg_bits * d / unit) - ws[0] * (d // unit)
        while budget > 0:
            best, best_gain = None, -1.0
            for j, b in enumerate(bits):
                nxt = [w for w in ws if w > b]
                if not nxt or nxt[0] - b > budget:
                    continue
                gain = wu[row, j].item() * (dist[b] - dist[nxt[0]]) / (nxt[0] - b)
                if gain > best_gain:
                    best, best_gain = j, gain
            if best is None:
                break
            step = [w for w in ws if w > bits[best]][0] - bits[best]
            bits[best] += step
            budget -= step
        out[row] = torch.tensor(bits)
    return out.repeat_interleave(unit, dim=1)


def fake_quant(x, mean, std, rot, bits_map, group, search=SEARCH):
    """x [B, H, T, d]; bits_map [H, d] (per rotated coordinate) -> reconstruction."""
    dim = x.shape[-1]
    u = (x.float() - mean[:, None]) / std[:, None]
    y = rotate(u, rot) if rot is not None else u
    yg = y.unflatten(-1, (dim // group, group))
    n = yg.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    unit = yg / n
    bm = bits_map.unflatten(-1, (dim // group, group))[:, None]  # [H, 1, G, g]
    best, best_cos = None, None
    for c in search:
        rec = torch.zeros_like(unit)
        for b in bits_map.unique().tolist():
            sel = (bm == b).expand_as(unit)
            if b == 0:
                continue
            lv = codebook(b, group)
            codes = ((unit / c).unsqueeze(-1) > boundaries(lv)).sum(-1)
            rec = torch.where(sel, lv[codes], rec)
        cos = (unit * rec).sum(-1) / rec.norm(dim=-1).clamp_min(1e-30)
        if best is None:
            best, best_cos = rec, cos
        else:
            better = (cos > best_cos)[..., None]
            best = torch.where(better, rec, best)
            best_cos = torch.where(better[..., 0], cos, best_cos)
    rec = best * (n / best.norm(dim=-1, keepdim=True).clamp_min(1e-30))
    yr = rec.flatten(-2)
    ur = rotate(yr, rot, inverse=True) if rot is not None else yr
    return (ur * std[:, None] + mean[:, None]).to(x.dtype)


class FakeLayer(DynamicLayer):
    def __init__(self, fk, fv):
        super().__init__()
        self.fk, self.fv = fk, fv

    sink = 1

    def update(self, key_states, value_states, *a, **k):
        seen = 0 if not self.is_initialized else self.keys.shape[-2]
        keep = max(0, min(self.sink - seen, key_states.shape[-2]))
        fk, fv = self.fk(key_states), self.fv(value_states)
        fk[:, :, :keep], fv[:, :, :keep] = key_states[:, :, :keep], value_states[:, :, :keep]
        return super().update(fk, fv, *a, **k)


class FakeCache(DynamicCache):
    def __init__(self, fns, sink=1):
        super().__init__()
        FakeLayer.sink = sink
        self._fns = fns
        self._n = 0

        def factory():
            i = self._n
            self._n += 1
            return FakeLayer(*self._fns[i])

        self.layer_class_to_replicate = factory


def build_fns(
    stats, backend, kbits, vbits, widths, group=64, seed=0, unit=None, weighting="score", std_power=1.0, natural=0
):
    fns = []
    for layer in sorted(stats):
        s = stats[layer]
        pair = []
        for kind, avg in (("k", kbits), ("v", vbits)):
            h, d = s["k_mean"].shape
            rot = None
            if backend != "none":
                rot = make_rotation(backend, h, d, group, seed=seed, layer_idx=layer, kind=kind)
            mean = s[f"{kind}_mean"] if kind == "k" else torch.zeros_like(s["v_mean"])
            std = s[f"{kind}_std"] ** std_power
            std = std / std.mean(-1, keepdim=True)
            # error weight of each *standardized* channel, then averaged within rotation blocks
            resid = (s[f"{kind}_std"] / std) ** 2  # variance left in standardized units (1 if power=1)
            imp = s["q2"] if kind == "k" else s["wo2"]
            w = std**2 * (imp if weighting == "score" else torch.ones_like(imp)) * resid
            if rot is not None:
                # rotated coordinate j carries sum_i R_ji^2 w_i
                blocks = w.view(h, d // rot.shape[-1], rot.shape[-1])
                w = torch.einsum("hnij,hnj->hni", rot.pow(2), blocks).reshape(h, d)
            if widths is None:
                bmap = torch.full((h, d), avg, dtype=torch.long)
            elif natural:  # `natural` consecutive coordinates share a width, no reordering
                bmap = allocate(w, avg, widths, unit=natural)
            elif unit:  # coordinates sorted by weight, `unit` consecutive ones share a width (segment layout)
                order = w.argsort(-1, descending=True)
                ws = w.gather(-1, order)
                bs = allocate(ws, avg, widths, unit=unit)
                bmap = torch.empty_like(bs).scatter_(-1, order, bs)
            else:
                bmap = allocate(w, avg, widths)
            pair.append(functools.partial(fake_quant, mean=mean, std=std, rot=rot, bits_map=bmap, group=group))
        fns.append(tuple(pair))
    return fns


def gain_report(stats):
    for layer in sorted(stats):
        s = stats[layer]
        wk = s["q2"] * s["k_std"] ** 2
        wv = s["wo2"] * s["v_std"] ** 2
        gk = 0.5 * torch.log2(wk.mean(-1) / wk.log().mean(-1).exp())
        gv = 0.5 * torch.log2(wv.mean(-1) / wv.log().mean(-1).exp())
        gk, gv = [round(x, 2) for x in gk.tolist()], [round(x, 2) for x in gv.tolist()]
        print(f"layer {layer:2d} K gain bits {gk}  V {gv}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["stats", "ppl"])
    ap.add_argument("--configs", default="")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    torch.set_num_threads(2)
    model, tok = load_smollm2()
    stats = channel_stats(model, stdlib_corpus(tok, 4096))
    if args.what == "stats":
        gain_report(stats)
        return
    windows = [license_corpus(tok, PREFILL + DECODE + 1, offset=o) for o in OFFSETS]
    refs = [decode_time_ppl(model, ids, prefill=PREFILL, decode=DECODE, chunk=DECODE) for ids in windows]
    for spec in args.configs.split(";"):
        kw = eval(f"dict({spec})")  # research script: configs typed on the command line
        sink = kw.pop("sink", 1)
        fns = build_fns(stats, **kw)
        ds, kls = [], []
        for ids, ref in zip(windows, refs):
            res = decode_time_ppl(model, ids, lambda f=fns, s=sink: FakeCache(f, s), PREFILL, DECODE, chunk=DECODE)
            ds.append(100 * (res.ppl / ref.ppl - 1))
            kls.append(kl_divergence(ref, res).mean().item())
        print(f"{spec:70s} delta {ds[0]:+6.1f}% {ds[1]:+6.1f}% KL {sum(kls) / 2:.4f}", flush=True)


if __name__ == "__main__":
    main()
