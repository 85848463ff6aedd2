"""Research (session 39, not in the format): keys quantized in the pre-RoPE frame through a full per-head transform.

    cd benchmarks && PRE_ROPE_SPAN=8192 ../.venv/bin/python prerope_keys.py pair_query_scales.py \
        --only "stdlib query key scales" --offsets 1024,3072,...,48128 --configs "iso K3 V3/2"

Why: the calibrated key scales (`calibrate.query_key_scales`) minimize a score's error over *diagonal* transforms
of the post-RoPE keys: for the error `e` of a key quantized as `y = T k` in a mixed norm group, `E[(q . e)^2]` is
proportional to `tr(S_k M) tr(S_q M^-1)` with `M = T^T T`, whose minimum over all `M` is the matrix geometric mean
`S_k^-1 # S_q`. A post-RoPE transform that holds at every position must commute with RoPE, which leaves only the
diagonal (and 2x2 pair blocks): on SmolLM2 the best such full transform predicts only 4% less score error than the
diagonal scales (stdlib -> license statistics, positions 0..511). Before RoPE the keys' statistics do not depend on
the position, so a full transform is position-proof there; what a key error costs is then set by the queries turned
by the distance between query and key, `S_q,eff = avg_D R_D S_q,pre R_D^T`. Predicted score-error variance against
today's diagonal scales: 0.57 with distances up to 512, 0.74 up to 8192 (`PRE_ROPE_SPAN`).

What the wrapper does: it patches `RQCacheLayer` so that a layer with a RoPE offset stores its keys as
`A unrotate_p(k - RoPE_p(m))` (A = M^1/2 from 2,048 stdlib tokens; the config's rotation, codebook and scale
search on top, the key mean and scales of the Calibration dropped: A replaces them) and reads them back as
`RoPE_p(A^-1 y) + RoPE_p(m)`. Bytes per token are unchanged. What it would cost: a fused decode kernel could no
longer score in the rotated space with q rotated once (the key's RoPE sits between A^-1 and q), so each key tile
would need a dense un-transform before the dot; the eager caches, which dequantize anyway, would not.
"""

from __future__ import annotations

import dataclasses
import os
import runpy
import sys

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from rqcompile import cache as cache_module
from rqcompile.eval.corpus import stdlib_corpus
from rqcompile.models import load_smollm2
from rqcompile.quant.rope_offset import RopeSpec, _cos_sin, static_rope_spec, unrotate

SPAN = int(os.environ.get("PRE_ROPE_SPAN", "8192"))  # query-key distances the transform is averaged over
TRANSFORMS: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (A, A^-1), [H, d, d] float32


def rotate(x: torch.Tensor, positions: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    """RoPE_p of pre-RoPE vectors x [B, H, T, d] (the inverse of `unrotate`)."""
    half = spec.dims // 2
    cos, sin = _cos_sin(positions, spec)
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    s = spec.scaling
    return torch.cat([s * (x1 * cos - x2 * sin), s * (x2 * cos + x1 * sin), rest], dim=-1)


def _turned_average(s_q: torch.Tensor, spec: RopeSpec, span: int) -> torch.Tensor:
    """avg over D in [0, span) of R_D S R_D^T for S [H, d, d] (float64): the queries as a key D tokens back sees
    them in its pre-RoPE frame."""
    d, half = s_q.shape[-1], spec.dims // 2
    angles = torch.arange(span, dtype=torch.float64)[:, None] * spec.inv_freq.double()[None]
    ones = torch.ones(span, d - 2 * half, dtype=torch.float64)
    c = torch.cat([angles.cos(), angles.cos(), ones], 1)
    s = torch.cat([angles.sin(), angles.sin(), 0 * ones], 1)
    p = torch.zeros(d, d, dtype=torch.float64)  # rotate_half: R_D x = c * x + s * (p x)
    p[:half, half : 2 * half] = -torch.eye(half, dtype=torch.float64)
    p[half : 2 * half, :half] = torch.eye(half, dtype=torch.float64)

    def outer(a, b):
        return (a[:, :, None] * b[:, None, :]).mean(0)

    return outer(c, c) * s_q + outer(c, s) * (s_q @ p.T) + outer(s, c) * (p @ s_q) + outer(s, s) * (p @ s_q @ p.T)


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(m)
    return v @ torch.diag_embed(w.clamp_min(0).sqrt()) @ v.transpose(-1, -2)


def geometric_mean_transform(s_k: torch.Tensor, s_q: torch.Tensor) -> torch.Tensor:
    """A = M^1/2 with M = S_k^-1 # S_q = S_k^-1/2 (S_k^1/2 S_q S_k^1/2)^1/2 S_k^-1/2, [H, d, d] float64, scaled
    so that E|A k|^2 = E|k|^2."""
    eye = torch.eye(s_k.shape[-1], dtype=s_k.dtype)
    s_k = s_k + 1e-6 * s_k.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None] * eye
    root = _sqrt_psd(s_k)
    inv_root = torch.linalg.inv(root)
    m = inv_root @ _sqrt_psd(root @ s_q @ root) @ inv_root
    a = _sqrt_psd(m)
    gain = torch.einsum("hij,hji->h", s_k, m) / s_k.diagonal(dim1=-2, dim2=-1).sum(-1)
    return a / gain.sqrt()[:, None, None]


def measure(model, ids: torch.Tensor, spec: RopeSpec, chunk: int = 512) -> None:
    """TRANSFORMS from pre-RoPE keys (their mean removed) and queries on `ids`, the sink token left out."""
    pieces: dict[int, list] = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        pieces.setdefault(module.layer_idx, []).append((query.detach().float(), key.detach().float()))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("rqcompile_prerope_capture", capture)
    previous = model.config._attn_implementation
    model.set_attn_implementation("rqcompile_prerope_capture")
    with torch.no_grad():
        for start in range(0, ids.shape[1], chunk):
            model(ids[:, start : start + chunk], use_cache=False)
    model.set_attn_implementation(previous)
    for layer, chunks in pieces.items():

        def pre(x):
            return unrotate(x, torch.arange(x.shape[-2])[None], spec)[:, :, 1:]

        q = torch.cat([pre(qc) for qc, _ in chunks], 2).double()  # [1, Hq, N, d]
        k = torch.cat([pre(kc) for _, kc in chunks], 2).double()  # [1, H, N, d]
        heads = k.shape[1]
        q = q[0].unflatten(0, (heads, -1)).flatten(1, 2)  # [H, group * N, d]
        k = k[0] - k[0].mean(1, keepdim=True)
        s_k = k.transpose(1, 2) @ k / k.shape[1]
        s_q = _turned_average(q.transpose(1, 2) @ q / q.shape[1], spec, SPAN)
        a = geometric_mean_transform(s_k, s_q)
        TRANSFORMS[layer] = (a.float(), torch.linalg.inv(a).float())


_append_compressed = cache_module.RQCacheLayer._append_compressed
_materialize = cache_module.RQCacheLayer._materialize


def _plain_key_state(layer):
    state = getattr(layer, "_prerope_state", None)
    if state is None or state.rotation is not layer.k_state.rotation:
        state = dataclasses.replace(
            layer.k_state, mean=torch.zeros_like(layer.k_state.mean), scale=torch.ones_like(layer.k_state.scale)
        )
        layer._prerope_state = state
    return state


def _append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
    if self.rope is None or self.layer_idx not in TRANSFORMS:
        return _append_compressed(self, keys, values)
    a, _ = TRANSFORMS[self.layer_idx]
    start = self._sink_length() + (0 if self.k_codes is None else self.k_codes.shape[-2])
    positions = self._positions(start, keys.shape[-2])
    pre = unrotate(keys.float() - self._offset(start, keys.shape[-2]), positions, self.rope)
    y = torch.einsum("hij,bhtj->bhti", a.to(pre.device), pre)
    k_codes, k_norms = cache_module.quantize_state(y, _plain_key_state(self))
    v_codes, v_norms = cache_module.quantize_state(values, self.v_state)
    self.k_codes, self.k_norms = cache_module._cat(self.k_codes, k_codes), cache_module._cat(self.k_norms, k_norms)
    self.v_codes, self.v_norms = cache_module._cat(self.v_codes, v_codes), cache_module._cat(self.v_norms, v_norms)


def _read(self) -> tuple[torch.Tensor, torch.Tensor]:
    if self.rope is None or self.layer_idx not in TRANSFORMS or self.row_sink_index is not None:
        return _materialize(self)
    _, a_inv = TRANSFORMS[self.layer_idx]
    keys, values = [], []
    if self.k_sink is not None:
        keys.append(self.k_sink)
        values.append(self.v_sink)
    if self.k_codes is not None and self.k_codes.shape[-2] > 0:
        y = cache_module.dequantize_state(self.k_codes, self.k_norms, _plain_key_state(self), torch.float32)
        start, length = self._sink_length(), y.shape[-2]
        pre = torch.einsum("hij,bhtj->bhti", a_inv.to(y.device), y)
        k = rotate(pre, self._positions(start, length), self.rope) + self._offset(start, length)
        keys.append(k.to(self.dtype))
        values.append(cache_module.dequantize_state(self.v_codes, self.v_norms, self.v_state, self.dtype))
    if self.k_window is not None:
        keys.append(self.k_window)
        values.append(self.v_window)
    return torch.cat(keys, dim=-2), torch.cat(values, dim=-2)


def install() -> None:
    """Route every RQCacheLayer with a RoPE offset and a transform in TRANSFORMS through the pre-RoPE path."""
    cache_module.RQCacheLayer._append_compressed = _append
    cache_module.RQCacheLayer._materialize = _read


if __name__ == "__main__":
    model, tokenizer = load_smollm2()
    spec = static_rope_spec(model.config)
    measure(model, stdlib_corpus(tokenizer, 2048), spec)
    del model
    print(f"pre-RoPE keys: full transforms for {len(TRANSFORMS)} layers, query distances < {SPAN}", flush=True)
    install()
    script, sys.argv = sys.argv[1], sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
