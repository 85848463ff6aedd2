"""KIVI-style uniform KV quantization as a fake-quantizing transformers cache: the baseline rq caches must beat.

KIVI (Liu et al. 2024) quantizes keys per channel (statistics over a block of tokens, because key outliers live in
fixed channels) and values per token (groups along head_dim), asymmetric uniform with a scale and zero point.
"""

from __future__ import annotations

import functools

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def fake_quant_uniform(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Asymmetric uniform quantize-dequantize with min/max taken along `dim`; scale and zero stored as fp16."""
    levels = 2**bits - 1
    xf = x.float()
    lo = xf.amin(dim=dim, keepdim=True)
    hi = xf.amax(dim=dim, keepdim=True)
    scale = ((hi - lo) / levels).half().float()
    zero = lo.half().float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((xf - zero) / safe).clamp_(0, levels)
    return (q * scale + zero).to(x.dtype)


class KiviFakeQuantLayer(DynamicLayer):
    """One layer's cache. Keys: per-channel over each completed block of `group` tokens; the keys of the last,
    incomplete block stay full precision until the block fills (KIVI's residual, here at most `group - 1` tokens).
    Values: per token, in groups of `group` channels, quantized as soon as they are written."""

    def __init__(self, key_bits: int, value_bits: int, group: int):
        super().__init__()
        self.key_bits, self.value_bits, self.group = key_bits, value_bits, group
        self.n_quantized_keys = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        d = value_states.shape[-1]
        vg = min(self.group, d)
        if d % vg:
            raise ValueError(f"head_dim {d} is not a multiple of the value group {vg}")
        v = value_states.unflatten(-1, (d // vg, vg))
        v = fake_quant_uniform(v, self.value_bits, dim=-1).flatten(-2)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, v], dim=-2)

        start, total = self.n_quantized_keys, self.keys.shape[-2]
        full = (total - start) // self.group * self.group
        if full:
            blocks = self.keys[..., start : start + full, :]
            blocks = blocks.unflatten(-2, (full // self.group, self.group))
            blocks = fake_quant_uniform(blocks, self.key_bits, dim=-2).flatten(-3, -2)
            self.keys = torch.cat([self.keys[..., :start, :], blocks, self.keys[..., start + full :, :]], dim=-2)
            self.n_quantized_keys = start + full
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self.n_quantized_keys = min(self.n_quantized_keys, self.get_seq_length()) // self.group * self.group

    def reset(self) -> None:
        super().reset()
        self.n_quantized_keys = 0


class KiviFakeQuantCache(DynamicCache):
    """KIVI-style KV quantization baseline (keys per-channel per `group`-token block, values per-token per
    `group`-channel group, asymmetric uniform, fp16 scale+zero), for the quality harness only.

    It stores the *dequantized* values in ordinary float tensors, so it saves no memory and says nothing about speed;
    it only reproduces KIVI's rounding error. The newest keys (< `group` tokens) stay full precision, as in KIVI.
    Only plain full-attention models (one `DynamicLayer` per layer, e.g. Llama/SmolLM2) are supported.
    """

    def __init__(self, key_bits: int = 2, value_bits: int = 2, group: int = 32):
        for name, b in (("key_bits", key_bits), ("value_bits", value_bits)):
            if not 1 <= b <= 8:
                raise ValueError(f"{name} must be in 1..8, got {b}")
        if group < 1:
            raise ValueError(f"group must be positive, got {group}")
        super().__init__()
        # DynamicCache without a config appends one layer per `update` from this factory.
        self.layer_class_to_replicate = functools.partial(KiviFakeQuantLayer, key_bits, value_bits, group)
