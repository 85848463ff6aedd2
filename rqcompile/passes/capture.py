"""Capture a transformers causal LM as `torch.export` programs whose whole cache state lives in module buffers.

Why our own wrapper: transformers' executorch wrapper cannot export hybrid models (qwen3_5 fails with
"'LinearAttentionLayer' object has no attribute 'keys'"), and `torch.export(..., strict=False)` turns the tensors of
its cache objects into lifted constants. Here every piece of state is an `nn.Module` buffer of `CaptureModule`, so
the cache writes appear as in-place buffer mutations that a graph pass can find and rewrite. Export is non-strict:
strict export (Dynamo) keeps a real clone of every buffer it reads, which for `apply` at 1M positions means the whole
float K/V cache its zero-stride placeholders exist to avoid (64 GiB for Qwen3.5-27B; OOM on the H200 in session 8).

Programs (both are `CaptureModule.forward(input_ids, cache_position) -> logits`, mutating the buffers in place):

- prefill: `input_ids` int64 [B, T], `cache_position` int64 [T] (the absolute positions of the T tokens, normally
  `arange(start, start + T)`), T dynamic in [2, max_cache_len] (dim name "prompt_len"). Returns logits [B, 1, V] for
  the last position (`prefill_logits="last"`, the default) or [B, T, V] (`prefill_logits="all"`).
- decode: `input_ids` [B, 1], `cache_position` [1]. Returns logits [B, 1, V]. A one-token prompt is run with the
  decode program (it is the same function at T=1).

All B rows share the same positions (no padding / per-row attention mask). A call whose first position is 0 starts a
new sequence: the linear-attention states are zeroed first (K/V need no reset, stale entries are masked out).

Buffers of `CaptureModule` (names are buffer FQNs; in an ExportedProgram they are lifted to placeholders named
`b_<name>`, see `ExportedProgram.graph_signature.inputs_to_buffers`; in `ep.module()` they are buffers again):

- `k_cache_{i}`, `v_cache_{i}`: [B, num_kv_heads, max_cache_len, head_dim] in the model dtype, for every
  full-attention layer i (all layers of llama/qwen3, every `full_attention_interval`-th layer of qwen3_5).
- `conv_state_{i}`: [B, conv_dim, conv_kernel - 1] (model dtype) and `recurrent_state_{i}`:
  [B, num_v_heads, k_head_dim, v_head_dim] (float32), for every gated-delta-net linear-attention layer i of qwen3_5.

Graph structure of one full-attention layer in the export training IR (before `run_decompositions()`), which the
K/V-compression pass matches (`CapturedLM.sites` lists the layers and buffer names):

    k_new = <RoPE'd keys [B, Hkv, T, D]>;  v_new = <values [B, Hkv, T, D]>
    k_all = aten.index_copy_.default(b_k_cache_i, 2, cache_position, k_new)
    v_all = aten.index_copy_.default(b_v_cache_i, 2, cache_position, v_new)
    # GQA only (num_heads > num_kv_heads), for k_all and v_all each (repeat_kv):
    #   aten.unsqueeze.default(x, 2) -> aten.expand.default(x, [B, Hkv, n_rep, L, D])
    #   -> aten.reshape.default(x, [B, Hq, L, D])
    out = aten.scaled_dot_product_attention.default(q, k_rep, v_rep, attn_mask=mask, scale=head_dim**-0.5)

`mask` is one bool tensor [1, 1, T, L] (`key_position <= query_position`) shared by all layers; `q` is [B, Hq, T, D].
The layer-specific pieces (q/k norms, partial RoPE, Qwen3.5's output gate) are the model's own code, unchanged.
Linear-attention layers are computed by `_gated_delta_net` (a re-implementation of transformers'
`Qwen3_5GatedDeltaNet` math over the module's own parameters: HF's chunked kernel loops over a data-dependent
number of chunks, which a dynamic prompt length cannot export); in the prefill program the inter-chunk recurrence is
a `torch.ops.higher_order.scan` (Inductor lowers it to a while loop, the ONNX exporter to Scan).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ATTN_IMPLEMENTATION",
    "AttentionSite",
    "CaptureModule",
    "CapturedLM",
    "LinearAttentionState",
    "capture",
]

#: Name under which `capture_attention` is registered in transformers' `AttentionInterface`.
ATTN_IMPLEMENTATION = "rqcompile_capture"

_SUPPORTED_MODEL_TYPES = {
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "qwen3_5",
    "qwen3_5_text",
    "qwen3_5_moe",
    "qwen3_5_moe_text",
}
_CHUNK = 64  # chunk length of the chunked gated delta rule (as in transformers / FLA)


@dataclass(frozen=True)
class AttentionSite:
    """One full-attention layer: where its K/V live and their geometry."""

    layer_idx: int
    k_buffer: str
    v_buffer: str
    num_kv_heads: int
    num_heads: int
    head_dim: int
    max_cache_len: int


@dataclass(frozen=True)
class LinearAttentionState:
    """One gated-delta-net layer's state buffers (not compressed, listed so passes can leave them alone)."""

    layer_idx: int
    conv_buffer: str
    recurrent_buffer: str


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, Hkv, L, D] -> [B, Hkv * n_rep, L, D] as unsqueeze -> expand -> reshape (the structure the pass matches)."""
    b, h, s, d = x.shape
    return x.unsqueeze(2).expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def capture_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention function used during capture: repeat_kv + one SDPA, the same on every transformers version.

    transformers' own "sdpa" function differs between versions (enable_gqa, pack_gqa for one query token, slicing
    for is_causal), so the captured graph would differ too; this one is fixed.
    """
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1:
        key = _repeat_kv(key, n_rep)
        value = _repeat_kv(value, n_rep)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, capture_attention)


_register_attention()


class _BufferCache:
    """Duck-typed transformers `Cache`: the one method full-attention modules call, writing into static buffers.

    `update` returns the result of `index_copy_` (the whole buffer), so the write feeds attention directly.
    """

    def __init__(self, keys: dict[int, torch.Tensor], values: dict[int, torch.Tensor], cache_position: torch.Tensor):
        self.keys = keys
        self.values = values
        self.cache_position = cache_position

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.keys[layer_idx].index_copy_(2, self.cache_position, key_states)
        v = self.values[layer_idx].index_copy_(2, self.cache_position, value_states)
        return k, v


def _text_parts(model: nn.Module) -> tuple[str, Any]:
    """Attribute path (relative to the LM) of the decoder stack, and its config; ValueError if unsupported."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "lm_head"):
        raise ValueError(
            f"capture() needs a transformers *ForCausalLM model (with .config and .lm_head), got {type(model).__name__}"
        )
    inner = getattr(model, "model", None)
    path = "model"
    if inner is not None and hasattr(inner, "language_model"):  # e.g. Qwen3_5ForConditionalGeneration
        inner, path, config = inner.language_model, "model.language_model", config.get_text_config()
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if inner is None or not all(hasattr(inner, a) for a in needed):
        raise ValueError(f"capture() does not support {type(model).__name__}: expected .model with {', '.join(needed)}")
    if config.model_type not in _SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"capture() does not support model_type {config.model_type!r}; supported: "
            f"{', '.join(sorted(_SUPPORTED_MODEL_TYPES))}"
        )
    return path, config


def _layer_types(config: Any) -> list[str]:
    n = config.num_hidden_layers
    types = list(getattr(config, "layer_types", None) or ["full_attention"] * n)
    if config.model_type == "mistral" and getattr(config, "sliding_window", None):
        types = ["sliding_attention"] * n  # mistral: every layer slides when sliding_window is set
    bad = sorted({t for t in types if t not in ("full_attention", "linear_attention")})
    if bad:
        raise ValueError(
            f"capture() supports full_attention and linear_attention layers only, this model has {bad} "
            "(sliding-window attention is not supported)"
        )
    return types


def _kw_name(fn: Callable, *names: str) -> str:
    """The cache keyword a forward accepts ('cache' in transformers >= 5.2x, 'past_key_values' before)."""
    params = inspect.signature(fn).parameters
    for n in names:
        if n in params:
            return n
    raise ValueError(f"{getattr(fn, '__qualname__', fn)} accepts none of the cache keywords {names}")


def _unit_lower_inverse(strict_lower: torch.Tensor) -> torch.Tensor:
    """(I + L)^-1 for strictly lower-triangular L [..., C, C], C a power of two, by blocked 2x2 merges.

    Pure matmul/cat, so it exports and lowers everywhere (no triangular solve); log2(C) levels instead of the
    C-step forward substitution transformers unrolls under export.
    inv([[A, 0], [X, D]]) = [[A^-1, 0], [-D^-1 X A^-1, D^-1]].
    """
    *batch, c, _ = strict_lower.shape
    inv = torch.ones(*batch, c, 1, 1, dtype=strict_lower.dtype, device=strict_lower.device)
    b = 1
    while b < c:
        nb = c // (2 * b)
        blocks = strict_lower.reshape(*batch, nb, 2 * b, nb, 2 * b).diagonal(dim1=-4, dim2=-2).movedim(-1, -3)
        lower_left = blocks[..., b:, :b]  # [..., nb, b, b]
        pairs = inv.reshape(*batch, nb, 2, b, b)
        a_inv, d_inv = pairs[..., 0, :, :], pairs[..., 1, :, :]
        off = -(d_inv @ lower_left @ a_inv)
        top = torch.cat([a_inv, torch.zeros_like(a_inv)], dim=-1)
        bottom = torch.cat([off, d_inv], dim=-1)
        inv = torch.cat([top, bottom], dim=-2)
        b *= 2
    return inv.squeeze(-3)


def _chunk_step(state: torch.Tensor, xs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of C tokens of the gated delta rule (transformers' `torch_chunk_gated_delta_rule`, one iteration).

    q, k [B, H, C, dk], v [B, H, C, dv], g, beta [B, H, C]; state [B, H, dk, dv]. All shapes are static, so the
    only symbolic size under export is the number of chunks, which only the scan sees.
    """
    q, k, v, g, beta = xs
    c = q.shape[-2]
    k_beta = k * beta.unsqueeze(-1)
    v_beta = v * beta.unsqueeze(-1)
    cum = g.cumsum(dim=-1)
    upper = torch.ones(c, c, dtype=torch.bool, device=q.device).triu(1)
    pairwise = (cum.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill(upper, float("-inf")).exp()
    ut_inv = _unit_lower_inverse(((k_beta @ k.transpose(-1, -2)) * pairwise).tril(-1))
    new_values = ut_inv @ v_beta
    k_cumdecay = ut_inv @ (k_beta * cum.exp().unsqueeze(-1))
    intra = (q @ k.transpose(-1, -2)) * pairwise
    v_new = new_values - k_cumdecay @ state
    out = (q * cum.exp().unsqueeze(-1)) @ state + intra @ v_new
    k_decayed = k * (cum[..., -1:] - cum).exp().unsqueeze(-1)
    state = state * cum[..., -1].exp()[..., None, None] + k_decayed.transpose(-1, -2) @ v_new
    return state, out


def _chunked_gated_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated delta rule over T tokens (q, k [B, H, T, dk] normalized/scaled, v [B, H, T, dv], g/beta [B, H, T]).

    Same math as transformers' `torch_chunk_gated_delta_rule`; the loop over chunks is a `scan` when tracing so
    the number of chunks may be symbolic. Returns (out [B, H, T, dv], final state [B, H, dk, dv]).
    """
    b, h, t, _ = k.shape
    # Chunk count, plus one all-padding chunk so that n >= 2 provably: with n == 1 possible, export records a
    # runtime assert n != 1 (from strides of the chunked view) and short prompts would fail. Padded tokens have
    # beta = 0 and g = 0: they neither write nor decay the state.
    n = (t + _CHUNK - 1) // _CHUNK + 1
    pad = n * _CHUNK - t
    # [B, H, T, ...] -> [n, B, H, C, ...] by a gather (a reshape would need export to prove n divides n*C)
    idx = torch.arange(n, device=q.device).unsqueeze(1) * _CHUNK + torch.arange(_CHUNK, device=q.device)
    q, k, v = (F.pad(x, (0, 0, 0, pad))[:, :, idx].movedim(2, 0) for x in (q, k, v))
    g, beta = (F.pad(x, (0, pad))[:, :, idx].movedim(2, 0) for x in (g, beta))
    xs = (q, k, v, g, beta)
    if torch.compiler.is_compiling():
        from torch._higher_order_ops.scan import scan

        state, outs = scan(_chunk_step, state, xs)
    else:
        chunks = []
        for i in range(n):
            state, o = _chunk_step(state, tuple(x[i] for x in xs))
            chunks.append(o)
        outs = torch.stack(chunks)
    # Gather the T real positions out of [n, B, H, C, dv] (a reshape + [:t] would make export guard on n == 1 and
    # on pad >= 0, which it cannot prove for a symbolic T).
    pos = torch.arange(t, device=outs.device)
    out = outs[pos // _CHUNK, :, :, pos % _CHUNK]  # [T, B, H, dv]
    return out.permute(1, 2, 0, 3), state


def _recurrent_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated delta rule for one token (shapes as `_chunked_gated_delta_rule` with T = 1)."""
    q, k, v, g, beta = q[:, :, 0], k[:, :, 0], v[:, :, 0], g[:, :, 0], beta[:, :, 0]
    state = state * g.exp()[..., None, None]
    kv_mem = (state * k.unsqueeze(-1)).sum(dim=-2)
    delta = (v - kv_mem) * beta.unsqueeze(-1)
    state = state + k.unsqueeze(-1) * delta.unsqueeze(-2)
    out = (state * q.unsqueeze(-1)).sum(dim=-2)
    return out.unsqueeze(2), state


def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _gated_delta_net(
    mod: nn.Module, x: torch.Tensor, conv_buf: torch.Tensor, rec_buf: torch.Tensor, new_seq: torch.Tensor
) -> torch.Tensor:
    """Qwen3.5 gated-delta-net layer over `mod`'s parameters, state in `conv_buf` / `rec_buf` (updated in place)."""
    from transformers.activations import ACT2FN

    bsz, t, _ = x.shape
    dk, dv = mod.head_k_dim, mod.head_v_dim
    mixed = mod.in_proj_qkv(x).transpose(1, 2)  # [B, conv_dim, T]
    z = mod.in_proj_z(x).reshape(bsz, t, -1, dv)
    b = mod.in_proj_b(x)
    a = mod.in_proj_a(x)

    # causal depthwise conv with the previous (kernel - 1) inputs as left context
    prev = torch.where(new_seq, torch.zeros_like(conv_buf), conv_buf)
    full = torch.cat([prev, mixed.to(conv_buf.dtype)], dim=-1)
    conv_buf.copy_(full[:, :, -conv_buf.shape[-1] :])
    weight = mod.conv1d.weight  # [conv_dim, 1, kernel]
    conv = F.conv1d(full.to(weight.dtype), weight, mod.conv1d.bias, padding=0, groups=weight.shape[0])
    mixed = ACT2FN[mod.activation](conv).to(x.dtype).transpose(1, 2)  # [B, T, conv_dim]

    query, key, value = torch.split(mixed, [mod.key_dim, mod.key_dim, mod.value_dim], dim=-1)
    query = query.reshape(bsz, t, -1, dk)
    key = key.reshape(bsz, t, -1, dk)
    value = value.reshape(bsz, t, -1, dv)
    beta = b.sigmoid()
    g = -mod.A_log.float().exp() * F.softplus(a.float() + mod.dt_bias)
    n_rep = mod.num_v_heads // mod.num_k_heads
    if n_rep > 1:
        query = query.repeat_interleave(n_rep, dim=2)
        key = key.repeat_interleave(n_rep, dim=2)
    query, key, value, beta, g = (y.transpose(1, 2).to(torch.float32) for y in (query, key, value, beta, g))
    query = _l2norm(query) * dk**-0.5
    key = _l2norm(key)

    state = torch.where(new_seq, torch.zeros_like(rec_buf), rec_buf)
    rule = _recurrent_step if t == 1 else _chunked_gated_delta_rule
    core, state = rule(query, key, value, g, beta, state)
    rec_buf.copy_(state)

    core = core.transpose(1, 2).to(x.dtype)  # [B, T, Hv, dv]
    core = mod.norm(core.reshape(-1, dv), z.reshape(-1, dv)).reshape(bsz, t, -1)
    return mod.out_proj(core)


@contextlib.contextmanager
def _capture_attention_impl(config: Any) -> Iterator[None]:
    """Route the model's attention modules to `capture_attention` (restored on exit; no-op if already routed).

    The attention modules look the function up in `config._attn_implementation` at call time. `capture()` enters
    this around `torch.export` so the traced forward sees no config mutation (no side effects in the graph).
    """
    previous = config._attn_implementation_internal
    if previous == ATTN_IMPLEMENTATION:
        yield
        return
    config._attn_implementation_internal = ATTN_IMPLEMENTATION
    try:
        yield
    finally:
        config._attn_implementation_internal = previous


class CaptureModule(nn.Module):
    """The exportable wrapper: `forward(input_ids, cache_position) -> logits`, all cache state in buffers.

    Calling it directly runs it eagerly (same math, same buffers) - useful as the reference for passes.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        max_cache_len: int,
        batch_size: int = 1,
        prefill_logits: Literal["last", "all"] = "last",
        materialize_cache: bool = True,
    ):
        super().__init__()
        path, config = _text_parts(model)
        if max_cache_len < 2:
            raise ValueError(f"max_cache_len must be >= 2, got {max_cache_len}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if prefill_logits not in ("last", "all"):
            raise ValueError(f"prefill_logits must be 'last' or 'all', got {prefill_logits!r}")
        self.lm = model
        self._text_path = path
        self.config = config
        self.batch_size = batch_size
        self.max_cache_len = max_cache_len
        self.prefill_logits = prefill_logits
        self.layer_types = _layer_types(config)
        text = self._text()
        param = next(model.parameters())
        dtype, device = param.dtype, param.device

        self.sites: list[AttentionSite] = []
        self.linear_states: list[LinearAttentionState] = []
        self._cache_kw: dict[int, str] = {}
        for i, (layer, kind) in enumerate(zip(text.layers, self.layer_types, strict=True)):
            if kind == "linear_attention":
                mod = layer.linear_attn
                kernel = mod.conv1d.weight.shape[-1]
                conv = torch.zeros(batch_size, mod.conv_dim, kernel - 1, dtype=dtype, device=device)
                rec = torch.zeros(
                    batch_size, mod.num_v_heads, mod.head_k_dim, mod.head_v_dim, dtype=torch.float32, device=device
                )
                self.register_buffer(f"conv_state_{i}", conv, persistent=False)
                self.register_buffer(f"recurrent_state_{i}", rec, persistent=False)
                self.linear_states.append(LinearAttentionState(i, f"conv_state_{i}", f"recurrent_state_{i}"))
                continue
            attn = layer.self_attn
            head_dim = attn.head_dim
            num_heads = config.num_attention_heads
            num_kv = config.num_key_value_heads
            shape = (batch_size, num_kv, max_cache_len, head_dim)
            for kind in "kv":
                self.register_buffer(f"{kind}_cache_{i}", _float_cache(shape, dtype, device, materialize_cache), False)
            self.sites.append(
                AttentionSite(i, f"k_cache_{i}", f"v_cache_{i}", num_kv, num_heads, head_dim, max_cache_len)
            )
            self._cache_kw[i] = _kw_name(type(layer).forward, "cache", "past_key_values")

    def _text(self) -> nn.Module:
        mod = self.lm
        for part in self._text_path.split("."):
            mod = getattr(mod, part)
        return mod

    def forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        """Run T tokens at absolute positions `cache_position`, write their state, return logits (see module doc)."""
        with _capture_attention_impl(self.config):
            return self._forward(input_ids, cache_position)

    def _forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        text = self._text()
        bsz, t = input_ids.shape
        position_ids = cache_position.unsqueeze(0).expand(bsz, t)
        key_positions = torch.arange(self.max_cache_len, device=input_ids.device)
        mask = (key_positions.unsqueeze(0) <= cache_position.unsqueeze(1)).unsqueeze(0).unsqueeze(0)
        new_seq = cache_position[0] == 0

        cache = _BufferCache(
            {s.layer_idx: self.get_buffer(s.k_buffer) for s in self.sites},
            {s.layer_idx: self.get_buffer(s.v_buffer) for s in self.sites},
            cache_position,
        )
        hidden = text.embed_tokens(input_ids)
        rope_ids = position_ids
        if hasattr(text.rotary_emb, "mrope_section"):
            # multimodal RoPE (qwen3_5): one row per grid axis, all equal to the text position for text tokens;
            # transformers 5.17 requires the [3, B, T] form, later versions also accept [B, T]
            rope_ids = position_ids.unsqueeze(0).expand(3, bsz, t)
        position_embeddings = text.rotary_emb(hidden, rope_ids)
        for i, layer in enumerate(text.layers):
            if self.layer_types[i] == "linear_attention":
                residual = hidden
                h = layer.input_layernorm(hidden)
                h = _gated_delta_net(
                    layer.linear_attn,
                    h,
                    self.get_buffer(f"conv_state_{i}"),
                    self.get_buffer(f"recurrent_state_{i}"),
                    new_seq,
                )
                hidden = residual + h
                residual = hidden
                h = layer.mlp(layer.post_attention_layernorm(hidden))
                if isinstance(h, tuple):
                    h = h[0]
                hidden = residual + h
            else:
                out = layer(
                    hidden,
                    attention_mask=mask,
                    position_ids=position_ids,
                    position_embeddings=position_embeddings,
                    **{self._cache_kw[i]: cache},
                )
                hidden = out[0] if isinstance(out, tuple) else out
        hidden = text.norm(hidden)
        if self.prefill_logits == "last":
            hidden = hidden[:, -1:, :]
        return self.lm.lm_head(hidden)


@dataclass
class CapturedLM:
    """Result of `capture`: the two programs, the wrapper they were exported from, and the K/V sites.

    `prefill.module()` / `decode.module()` give runnable GraphModules (training IR with buffers); `module` runs the same
    computation eagerly. Buffer names in `sites` / `linear_states` are FQNs of `module`'s buffers.
    """

    prefill: torch.export.ExportedProgram
    decode: torch.export.ExportedProgram
    sites: list[AttentionSite]
    linear_states: list[LinearAttentionState]
    config: Any
    batch_size: int
    max_cache_len: int
    module: CaptureModule
    prefill_logits: str = "last"
    layer_types: list[str] = field(default_factory=list)


def capture(
    model: nn.Module,
    *,
    max_cache_len: int,
    batch_size: int = 1,
    dtype: torch.dtype | None = None,
    prefill_logits: Literal["last", "all"] = "last",
    materialize_cache: bool = True,
) -> CapturedLM:
    """Export `model` (a llama / mistral / qwen2 / qwen3 / qwen3_5 / qwen3_5_moe causal LM) as prefill + decode.

    `dtype` is the dtype of the K/V buffers and must match the model's (cast the model first); None takes the
    model's. The model is used as is (eval mode is expected); its config's attention implementation is swapped to
    `ATTN_IMPLEMENTATION` only while the wrapper runs. `materialize_cache=False` captures against zero-memory
    placeholder K/V caches: for programs that are rewritten to another cache before they run (`rqcompile.apply`).
    """
    param = next(model.parameters())
    if dtype is not None and dtype != param.dtype:
        raise ValueError(
            f"dtype {dtype} differs from the model's {param.dtype}: cast the model first (model.to(dtype))"
        )
    module = CaptureModule(
        model,
        max_cache_len=max_cache_len,
        batch_size=batch_size,
        prefill_logits=prefill_logits,
        materialize_cache=materialize_cache,
    )
    device = param.device
    sample_t = min(max_cache_len, _CHUNK + 6)  # > one chunk: a one-chunk sample specializes the chunk count
    ids = torch.zeros(batch_size, sample_t, dtype=torch.long, device=device)
    pos = torch.arange(sample_t, device=device)
    prompt_len = torch.export.Dim("prompt_len", min=2, max=max_cache_len)
    with torch.no_grad(), _capture_attention_impl(module.config):
        prefill = torch.export.export(
            module,
            (ids, pos),
            dynamic_shapes={"input_ids": {1: prompt_len}, "cache_position": {0: prompt_len}},
            strict=False,
        )
        decode = torch.export.export(module, (ids[:, :1], pos[:1]), strict=False)
    _reset_buffers(module)
    return CapturedLM(
        prefill=prefill,
        decode=decode,
        sites=list(module.sites),
        linear_states=list(module.linear_states),
        config=module.config,
        batch_size=batch_size,
        max_cache_len=max_cache_len,
        module=module,
        prefill_logits=prefill_logits,
        layer_types=list(module.layer_types),
    )


def _float_cache(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, materialize: bool) -> torch.Tensor:
    """A zero K/V cache; unmaterialized, one zero expanded to `shape` (stride 0, no memory): export traces shapes
    only, and a program that is rewritten to a compressed cache never reads it - so `apply` at 1M positions does not
    first need the whole float cache free (64 GiB for Qwen3.5-27B)."""
    if materialize:
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.zeros((), dtype=dtype, device=device).expand(shape)


def _reset_buffers(module: nn.Module) -> None:
    for buf in module.buffers(recurse=False):
        if 0 not in buf.stride():  # an unmaterialized cache is already zero (and cannot be written)
            buf.zero_()
