"""The K/V-compression rewrite: every attention cache write becomes quantize -> two packed writes -> dequantize.

Level: the *unlifted* GraphModule of a captured program (`ExportedProgram.module()`; an ExportedProgram passed in is
unlifted first). Why there and not in the ExportedProgram itself: the pass must replace buffers (a float cache
[B, H, L, d] becomes uint8 codes and fp16 norms, and the quantizer parameters become new buffers). In an
ExportedProgram buffers are lifted placeholders tied to `state_dict`, `graph_signature` (inputs_to_buffers,
buffers_to_mutate) and the range constraints, all of which would have to be edited consistently; in the unlifted
GraphModule a buffer is just a `get_attr` node plus `register_buffer`, and an in-place `index_copy_` on it is the
cache write. The rewritten module runs as is (eager), under `torch.compile`, and re-exports to a fresh
ExportedProgram (`torch.export.export(gm, ...)`) for AOTInductor / ONNX.

What is matched (structure only, no model names), in the export training IR:

    written = aten.index_copy_.default(<get_attr cache buffer>, 2, cache_position, new)   # K and V each
    [aten.unsqueeze -> aten.expand -> aten.reshape]                                       # repeat_kv, GQA only
    aten.scaled_dot_product_attention.default(q, <K path>, <V path>, mask, scale=...)

and rewritten, per K and V of every matched site, to

    codes, norms = rq.quantize(new, rotation, mean, scale, levels, bits, group)
    codes_all = aten.index_copy_.default(<get_attr {k|v}_codes_i>, 2, cache_position, codes)   # uint8 [B,H,L,d*b/8]
    norms_all = aten.index_copy_.default(<get_attr {k|v}_norms_i>, 2, cache_position, norms)   # fp16  [B,H,L,d/g]
    written' = rq.dequantize(codes_all, norms_all, rotation, mean, scale, levels, bits, d, dtype)

V's codes packed along keys (`RQConfig.value_layout="keys"`) cannot be `index_copy_`'d per token (a 16-token block
shares its words): their write is `rq.write_along_keys(<get_attr v_codes_i>, codes, cache_position, bits)`, in place,
and the dequantize reads the buffer with `along_keys=True` (trailing `perm=None, widths=None, True`).

`written'` replaces `written` everywhere, so repeat_kv and SDPA are untouched (`fuse_attention` then removes the
materialized cache). The old float cache buffers are deleted from the module. Quantizer parameters live in buffers
`rq_{k|v}_{rotation|mean|scale|levels}_{i}`; `buffers=` lets two programs (prefill and decode) share one set of
tensors, so they keep one cache.

A calibrated bit allocation (`RQConfig.bit_allocation`) gives a state a layout: per-coordinate `widths` and a per-head
channel order `perm`. Its ops then take the two trailing arguments `rqcompile.ops.layout_args` gives, `perm` as one
more buffer `rq_{k|v}_perm_{i}` (get_attr, like the rotation) and `widths` as a list constant:

    rq.quantize(new, rotation, mean, scale, levels, max(widths), group, <get_attr rq_{k|v}_perm_i>, [w_0, ..., w_d-1])
    rq.dequantize(codes_all, norms_all, rotation, mean, scale, levels, max(widths), d, dtype, <perm>, [widths])

Uniform states keep the seven / nine argument calls above, so their graphs are unchanged.

Uncompressed tokens (`config.sink_tokens = S`, `config.residual_window = W`, as the eager `RQCacheLayer`): every token
is still quantized into the codes at its position, and two more static-shaped buffers per K/V hold tokens in the model
dtype: `{k|v}_sink_i` [B, H, S, d] (position p < S in slot p) and `{k|v}_window_i` [B, H, W, d], a ring (position p
in slot p % W). Per K/V the graph gains

    sink' = aten.copy_.default(<get_attr {k|v}_sink_i>, exact_write(<same>, new, cache_position, False))
    window' = aten.copy_.default(<get_attr {k|v}_window_i>, exact_write(<same>, new, cache_position, True))
    exact = exact_read(written', sink', window', cache_position)       # replaces `written` instead of written'

`exact_write` / `exact_read` are Python functions of torch ops (where / index_select / argmax / remainder, no
data-dependent shapes); re-export and torch.compile trace them into aten. On read the dequantized [B, H, L, d] takes
the sink values at positions < S and the ring's at the W most recent positions
`max(cache_position) - W < p <= max(cache_position)`. That is the eager cache's rule: it appends the step's tokens to
its window *before* attention, so a prefill of T > W tokens attends to its first T - W (non-sink) tokens quantized and
to its last W exactly. No reset is needed for a new sequence: every position <= max(cache_position) that the read
takes from the sink or ring was written in the current sequence. S and W are clamped to max_cache_len. `fuse_attention`
fuses such sites into `attention_with_exact_tokens` (codes + the sink / ring buffers, no materialized cache).

The pre-RoPE key offset (`config.rope_key_mean`, `rope=` the model's RopeSpec, the means from the Calibration's
`rope_mean`; docs/FORMAT.md "Pre-RoPE key offset"): each K site gains buffers `rq_k_rope_mean_i` [H, d] (m with the
attention scaling folded in) and `rq_rope_inv_freq_i` [h], and

    residual = subtract_slot_offset(new, rope_mean, cache_position, inv_freq)    # float32, fed to rq.quantize
    written' = add_slot_offset(rq.dequantize(..., torch.float32), rope_mean, inv_freq, dtype)

(exact tokens are written from `new` itself). `fuse_attention` turns the read into rq::attention's `rope_ab` term.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

import rqcompile.ops  # noqa: F401  (registers torch.ops.rq.*)
from rqcompile.calibrate import Calibration
from rqcompile.config import RQConfig
from rqcompile.ops import layout_args
from rqcompile.quant.packing import KEY_BLOCK
from rqcompile.quant.quantizer import QuantState, make_state
from rqcompile.quant.rope_offset import RopeSpec, offset_base, slot_offset

aten = torch.ops.aten

__all__ = [
    "AttentionMatch",
    "KVCompressError",
    "add_slot_offset",
    "exact_read",
    "exact_write",
    "SiteRewrite",
    "compress_kv_cache",
    "find_attention_sites",
    "subtract_slot_offset",
    "to_graph_module",
    "width_label",
]

#: ops that repeat_kv (and harmless layout changes) may put between the cache write and SDPA
VIEW_OPS = {
    aten.unsqueeze.default,
    aten.expand.default,
    aten.reshape.default,
    aten.view.default,
    aten._unsafe_view.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.alias.default,
}
SDPA = aten.scaled_dot_product_attention.default
INDEX_COPY = aten.index_copy_.default
WRITE_ALONG_KEYS = torch.ops.rq.write_along_keys.default


class KVCompressError(ValueError):
    """The graph has no attention subgraph the pass can rewrite (or it does not agree with the sites given)."""


@dataclass(frozen=True)
class AttentionMatch:
    """One matched attention subgraph: the SDPA node and the K/V cache writes (with the view chains between)."""

    sdpa: fx.Node
    k_write: fx.Node
    v_write: fx.Node
    k_buffer: str
    v_buffer: str


@dataclass(frozen=True)
class SiteRewrite:
    """What the pass did to one K or V cache: shapes and the bytes allocated before and after."""

    layer_idx: int
    kind: str  # "k" | "v"
    buffer: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    codes_buffer: str
    codes_shape: tuple[int, ...]
    norms_buffer: str
    norms_shape: tuple[int, ...]
    bits: float  # the code width; with a calibrated bit allocation, the average over `widths`
    bytes_before: int
    bytes_after: int
    exact_buffers: tuple[str, ...] = ()  # sink / recent-window buffers in the model dtype (see the module docstring)
    exact_bytes: int = 0
    widths: tuple[int, ...] = ()  # per stored coordinate, when they are mixed (calibrated bit allocation)

    def __str__(self) -> str:
        text = (
            f"layer {self.layer_idx} {self.kind.upper()}: {self.buffer} {list(self.shape)} {self.dtype} "
            f"({self.bytes_before:,} B) -> {self.codes_buffer} uint8 {list(self.codes_shape)} + {self.norms_buffer} "
            f"fp16 {list(self.norms_shape)} ({self.bytes_after:,} B, {width_label(self.widths or self.bits)})"
        )
        if self.exact_buffers:
            text += f" + exact tokens in {' + '.join(self.exact_buffers)} ({self.exact_bytes:,} B, {self.dtype})"
        return text


def width_label(widths: float | tuple[int, ...]) -> str:
    """A code width for reports: `3-bit`, or `3.5-bit avg (2-6)` for a mixed layout (a calibrated bit allocation has
    no single width, so the average and the range are shown)."""
    if not isinstance(widths, tuple):
        return f"{widths:g}-bit"
    if len(set(widths)) == 1:
        return f"{widths[0]}-bit"
    return f"{sum(widths) / len(widths):.3g}-bit avg ({min(widths)}-{max(widths)})"


def exact_write(buffer: torch.Tensor, new: torch.Tensor, cache_position: torch.Tensor, ring: bool) -> torch.Tensor:
    """The new contents of a sink (`ring=False`: slot s holds position s) or recent-window ring (`ring=True`: slot s
    holds the latest position p <= max(cache_position) with p % n == s) buffer [B, H, n, d] after writing `new`
    [B, H, T, d] at `cache_position` [T]. Slots whose position is not among the new tokens keep their value.
    Static shapes and torch ops only (where / index_select / argmax), so it exports and compiles with the graph.
    """
    n = buffer.shape[2]
    slots = torch.arange(n, device=cache_position.device, dtype=cache_position.dtype)
    if ring:
        last = cache_position.amax(dim=0, keepdim=True)  # [1]; amax without dim has no ONNX translation
        slots = last - torch.remainder(last - slots, n)
    match = cache_position.unsqueeze(0) == slots.unsqueeze(1)  # [n, T]: at most one True per row
    picked = new.index_select(2, match.to(torch.int64).argmax(dim=1))
    return torch.where(match.any(dim=1).unsqueeze(-1), picked, buffer)


def exact_read(
    dequantized: torch.Tensor,
    sink: torch.Tensor | None,
    window: torch.Tensor | None,
    cache_position: torch.Tensor,
) -> torch.Tensor:
    """The cache [B, H, L, d] attention reads: dequantized codes, except positions < S (from `sink` [B, H, S, d]) and
    the W most recent positions <= max(cache_position) (from the ring `window` [B, H, W, d]), held exactly."""
    length = dequantized.shape[2]
    positions = torch.arange(length, device=cache_position.device, dtype=cache_position.dtype)
    out = dequantized
    if window is not None:
        size = window.shape[2]
        last = cache_position.amax(dim=0, keepdim=True)  # [1]; amax without dim has no ONNX translation
        recent = (positions > last - size) & (positions <= last)
        out = torch.where(recent.unsqueeze(-1), window.index_select(2, torch.remainder(positions, size)), out)
    if sink is not None:
        size = sink.shape[2]
        held = (positions < size).unsqueeze(-1)
        out = torch.where(held, sink.index_select(2, positions.clamp(max=size - 1)), out)
    return out


def subtract_slot_offset(
    new: torch.Tensor, base: torch.Tensor, cache_position: torch.Tensor, inv_freq: torch.Tensor
) -> torch.Tensor:
    """The new keys [B, H, T, d] without their pre-RoPE offset turned to their slots (`RQConfig.rope_key_mean`),
    float32, as the eager cache quantizes them."""
    return new.float() - slot_offset(base, cache_position, inv_freq)


def add_slot_offset(
    dequantized: torch.Tensor, base: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """The dequantized keys (float32 [B, H, L, d]) with the pre-RoPE offset of every slot added back, in `dtype`."""
    slots = torch.arange(dequantized.shape[2], device=dequantized.device)
    return (dequantized + slot_offset(base, slots, inv_freq)).to(dtype)


def to_graph_module(program: fx.GraphModule | torch.export.ExportedProgram) -> fx.GraphModule:
    """The unlifted GraphModule (buffers as `get_attr`) of a program; a GraphModule is returned as is."""
    if isinstance(program, torch.export.ExportedProgram):
        return program.module()
    if isinstance(program, fx.GraphModule):
        return program
    raise TypeError(f"expected a torch.fx.GraphModule or torch.export.ExportedProgram, got {type(program).__name__}")


def _is_call(node: Any, target: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target == target


def _through_views(node: fx.Node) -> fx.Node:
    """Walk from an SDPA input back through repeat_kv / view ops to the node producing the tensor."""
    while node.op == "call_function" and node.target in VIEW_OPS:
        node = node.args[0]
    return node


def _cache_write_buffer(node: fx.Node) -> str | None:
    """If `node` is `index_copy_(<buffer get_attr>, 2, index, source)` on a 4-d buffer, that buffer's name."""
    if not _is_call(node, INDEX_COPY):
        return None
    target, dim = node.args[0], node.args[1]
    if not (isinstance(target, fx.Node) and target.op == "get_attr"):
        return None
    val = target.meta.get("val")
    ndim = val.dim() if isinstance(val, torch.Tensor) else 4
    if ndim != 4 or dim not in (2, -2):
        return None
    return str(target.target)


def _sdpa_kv(node: fx.Node) -> tuple[fx.Node, fx.Node]:
    k = node.args[1] if len(node.args) > 1 else node.kwargs["key"]
    v = node.args[2] if len(node.args) > 2 else node.kwargs["value"]
    return k, v


def _describe(gm: fx.GraphModule) -> str:
    """What the graph has instead: counts of cache-write-like and attention-like ops."""
    writes = [n for n in gm.graph.nodes if _is_call(n, INDEX_COPY)]
    sdpas = [n for n in gm.graph.nodes if _is_call(n, SDPA)]
    on = sorted({str(n.args[0].target) for n in writes if isinstance(n.args[0], fx.Node)})
    buffers = [name for name, _ in gm.named_buffers()]
    return (
        f"found {len(writes)} aten.index_copy_ node(s)"
        + (f" (on {', '.join(on[:8])}{'...' if len(on) > 8 else ''})" if on else "")
        + f", {len(sdpas)} aten.scaled_dot_product_attention node(s), buffers "
        + (", ".join(buffers[:8]) + ("..." if len(buffers) > 8 else "") if buffers else "none")
    )


_LOOKED_FOR = (
    "looked for aten.index_copy_.default(<cache buffer [B, H, L, d]>, 2, cache_position, new) for K and V, each "
    "reaching aten.scaled_dot_product_attention.default as its key / value (directly or through "
    "unsqueeze -> expand -> reshape)"
)


def find_attention_sites(gm: fx.GraphModule) -> list[AttentionMatch]:
    """Every SDPA whose key and value are (views of) in-place writes into cache buffers, in graph order."""
    matches = []
    for node in gm.graph.nodes:
        if not _is_call(node, SDPA):
            continue
        k, v = (_through_views(x) for x in _sdpa_kv(node))
        k_buf, v_buf = _cache_write_buffer(k), _cache_write_buffer(v)
        if k_buf is None or v_buf is None:
            continue
        matches.append(AttentionMatch(node, k, v, k_buf, v_buf))
    return matches


def _sites_by_buffer(sites: Any) -> dict[str, tuple[Any, str]]:
    out = {}
    for site in sites:
        out[site.k_buffer] = (site, "k")
        out[site.v_buffer] = (site, "v")
    return out


def _get_attr(graph: fx.Graph, gm: fx.GraphModule, name: str, tensor: torch.Tensor) -> fx.Node:
    if hasattr(gm, name):
        existing = getattr(gm, name)
        if existing is not tensor:
            raise KVCompressError(f"the module already has an attribute {name!r}; refusing to overwrite it")
    else:
        gm.register_buffer(name, tensor, persistent=True)
    node = graph.get_attr(name)
    node.meta["val"] = tensor
    return node


def _shared(buffers: dict[str, torch.Tensor], name: str, make) -> torch.Tensor:
    if name not in buffers:
        buffers[name] = make()
    return buffers[name]


def compress_kv_cache(
    program: fx.GraphModule | torch.export.ExportedProgram,
    sites: Any,
    config: RQConfig,
    calibration: Calibration | None = None,
    *,
    buffers: dict[str, torch.Tensor] | None = None,
    quant_states: dict[int, dict[str, QuantState]] | None = None,
    rope: RopeSpec | None = None,
) -> fx.GraphModule:
    """Rewrite every attention cache write of `program` to the compressed format (see the module docstring).

    Args:
        program: an unlifted GraphModule (`ep.module()`), rewritten in place, or an ExportedProgram (unlifted first).
        sites: the `AttentionSite`s of the capture (layer index, buffer names, geometry); every matched cache
            buffer must be one of them and every site must be matched.
        config: the compressed format (backend, bits, norm group, seed).
        calibration: optional per-layer key/value mean and scale folded into the quantizer.
        buffers: name -> tensor of already created compressed-cache / quantizer buffers, reused instead of
            allocating (so prefill and decode share one cache); new ones are added to it.
        quant_states: filled with layer -> {"k": QuantState, "v": QuantState} (the tensors of the new buffers).
        rope: the model's RoPE, needed by `config.rope_key_mean` (whose pre-RoPE key means come from `calibration`).

    Returns the GraphModule; `gm.meta["rq_kv_compress"]` is the list of `SiteRewrite`s (layer, shapes, bytes).
    Raises `KVCompressError` naming what was looked for and what was found when nothing matches.
    """
    gm = to_graph_module(program)
    if config.rope_key_mean is None:  # auto, as rqcompile.apply decides it: on when the Calibration carries it
        config = config.replace(rope_key_mean=calibration is not None and calibration.has_rope_mean)
    if not config.rope_key_mean and calibration is not None and calibration.has_rope_mean:
        raise KVCompressError(
            "kv_compress: this Calibration was measured for RQConfig(rope_key_mean=True) (its key statistics are those "
            "of the keys without their pre-RoPE mean), but the config says rope_key_mean=False"
        )
    if config.rope_key_mean and (rope is None or calibration is None):
        raise KVCompressError(
            "kv_compress: RQConfig(rope_key_mean=True) needs the model's RoPE (rope=rope_spec(model.config)) and a "
            "Calibration measured with it (rqcompile.calibrate(model, ...) measures it by default)"
        )
    buffers = {} if buffers is None else buffers
    quant_states = {} if quant_states is None else quant_states
    sites = list(sites)
    matches = find_attention_sites(gm)
    if not matches:
        raise KVCompressError(f"kv_compress: no attention subgraph matched; {_LOOKED_FOR}; {_describe(gm)}")
    by_buffer = _sites_by_buffer(sites)
    unknown = [b for m in matches for b in (m.k_buffer, m.v_buffer) if b not in by_buffer]
    if unknown:
        raise KVCompressError(
            f"kv_compress: cache buffers {unknown} feed attention but are not among the sites given "
            f"({sorted(by_buffer)})"
        )
    matched = {m.k_buffer for m in matches}
    missing = [s.layer_idx for s in sites if s.k_buffer not in matched]
    if missing:
        raise KVCompressError(
            f"kv_compress: sites of layers {missing} have no matching attention subgraph; {_LOOKED_FOR}; "
            f"{_describe(gm)}"
        )

    graph = gm.graph
    report: list[SiteRewrite] = []
    for match in matches:
        for write, buffer in ((match.k_write, match.k_buffer), (match.v_write, match.v_buffer)):
            site, kind = by_buffer[buffer]
            report.append(
                _rewrite_write(gm, graph, write, buffer, site, kind, config, calibration, buffers, quant_states, rope)
            )
    old = {r.buffer for r in report}
    for node in list(graph.nodes):  # the float caches' get_attr nodes, now unused (no global DCE: writes are impure)
        if node.op == "get_attr" and node.target in old and not node.users:
            graph.erase_node(node)
    for name in old:
        if hasattr(gm, name):
            delattr(gm, name)
    graph.lint()
    gm.recompile()
    gm.meta["rq_kv_compress"] = report
    return gm


_STATE_FIELDS = ("rotation", "mean", "scale", "levels")


def _site_state(
    config: RQConfig,
    layer: int,
    kind: str,
    head_dim: int,
    buffers: dict[str, torch.Tensor],
    quant_states: dict[int, dict[str, QuantState]],
    make: Any,
) -> QuantState:
    """The QuantState of one (layer, K|V), its tensors taken from `buffers` (created there from `make()` if absent)
    so that programs rewritten with one `buffers` dict share them.

    The layout is not a tensor: a uniform one follows from the config; a calibrated allocation's is the state already
    recorded in `quant_states` for these buffers (the second program of a pair), else `make()`'s (deterministic)."""
    names = {f: f"rq_{kind}_{f}_{layer}" for f in (*_STATE_FIELDS, "perm")}
    known = quant_states.get(layer, {}).get(kind)
    if known is not None and not all(buffers.get(names[f]) is t for f, t in known.tensors().items()):
        known = None
    fresh = None
    if known is None and (config.bit_allocation or any(names[f] not in buffers for f in _STATE_FIELDS)):
        fresh = make()
    template = known or fresh
    if template is not None:
        widths, perm = template.widths, template.perm
    else:  # uniform, every tensor shared: the layout is the config's (layer_bits overrides included)
        widths, perm = int(config.bits_for(layer, kind)), None
    params = {}
    for field in _STATE_FIELDS:
        if names[field] not in buffers:
            buffers[names[field]] = getattr(fresh, field)
        params[field] = buffers[names[field]]
    if perm is not None:
        perm = buffers.setdefault(names["perm"], perm)
    group = config.group_for(head_dim)
    return QuantState(**params, widths=widths, group=group, perm=perm, along_keys=config.packs_along_keys(kind))


def _rope_buffers(
    layer: int,
    heads: int,
    head_dim: int,
    calibration: Calibration | None,
    rope: RopeSpec | None,
    buffers: dict[str, torch.Tensor],
    device: torch.device,
) -> tuple[tuple[str, torch.Tensor], tuple[str, torch.Tensor]] | None:
    """(name, tensor) of a layer's `offset_base` [H, d] and inverse frequencies [h] (float32) for
    `RQConfig.rope_key_mean`, shared through `buffers`; None without the option."""
    if rope is None:
        return None
    mean = calibration.get(layer, "k", "rope_mean") if calibration is not None else None
    if mean is None or tuple(mean.shape) != (heads, head_dim):
        found = "none" if mean is None else list(mean.shape)
        raise KVCompressError(
            f"kv_compress: layer {layer}: RQConfig(rope_key_mean=True) needs the Calibration's pre-RoPE key mean "
            f"[{heads}, {head_dim}] ('rope_mean', from rqcompile.calibrate(..., rope_key_mean=True)); found {found}"
        )
    base_name, freq_name = f"rq_k_rope_mean_{layer}", f"rq_rope_inv_freq_{layer}"
    base = _shared(buffers, base_name, lambda: offset_base(mean, rope).to(device))
    inv_freq = _shared(buffers, freq_name, lambda: rope.inv_freq.float().to(device))
    return (base_name, base), (freq_name, inv_freq)


def _rewrite_write(
    gm: fx.GraphModule,
    graph: fx.Graph,
    write: fx.Node,
    buffer: str,
    site: Any,
    kind: str,
    config: RQConfig,
    calibration: Calibration | None,
    buffers: dict[str, torch.Tensor],
    quant_states: dict[int, dict[str, QuantState]],
    rope: RopeSpec | None = None,
) -> SiteRewrite:
    cache = gm.get_buffer(buffer)
    batch, heads, length, head_dim = cache.shape
    layer = site.layer_idx
    if (heads, length, head_dim) != (site.num_kv_heads, site.max_cache_len, site.head_dim):
        raise KVCompressError(
            f"kv_compress: buffer {buffer} has shape {tuple(cache.shape)}, but its site says "
            f"[B, {site.num_kv_heads}, {site.max_cache_len}, {site.head_dim}]"
        )

    def make_quant_state() -> QuantState:
        return make_state(
            config,
            layer_idx=layer,
            kind=kind,
            num_heads=heads,
            head_dim=head_dim,
            mean=calibration.get(layer, kind, "mean") if calibration else None,
            scale=calibration.get(layer, kind, "scale") if calibration else None,
            weight=calibration.get(layer, kind, "weight") if calibration else None,
        ).to(cache.device)

    state = _site_state(config, layer, kind, head_dim, buffers, quant_states, make_quant_state)
    quant_states.setdefault(layer, {})[kind] = state
    params = state.tensors()  # rotation, mean, scale, levels (+ perm with a bit allocation): the buffers' tensors
    bits, _, widths = layout_args(state)  # perm: the get_attr of its buffer, below
    group = state.group

    codes_name, norms_name = f"{kind}_codes_{layer}", f"{kind}_norms_{layer}"
    codes = _shared(
        buffers,
        codes_name,
        lambda: torch.zeros(batch, heads, length, state.code_bytes, dtype=torch.uint8, device=cache.device),
    )
    norms = _shared(
        buffers,
        norms_name,
        lambda: torch.zeros(batch, heads, length, state.num_groups, dtype=torch.float16, device=cache.device),
    )
    if codes.shape != (batch, heads, length, state.code_bytes) or norms.shape != (
        batch,
        heads,
        length,
        state.num_groups,
    ):
        raise KVCompressError(f"kv_compress: shared buffers {codes_name}/{norms_name} have the wrong shape")
    if state.along_keys and length % KEY_BLOCK:
        raise KVCompressError(
            f"kv_compress: RQConfig(value_layout='keys') packs V in blocks of {KEY_BLOCK} tokens; max_cache_len "
            f"{length} is not a multiple of {KEY_BLOCK} (round it up)"
        )
    exact = {}  # "sink" / "window" -> (buffer name, tensor): tokens held in the model dtype
    for part, count in (("sink", config.sink_tokens), ("window", config.residual_window)):
        size = min(count, length)
        if size:
            name = f"{kind}_{part}_{layer}"
            tensor = _shared(
                buffers,
                name,
                lambda size=size: torch.zeros(batch, heads, size, head_dim, dtype=cache.dtype, device=cache.device),
            )
            if tensor.shape != (batch, heads, size, head_dim) or tensor.dtype != cache.dtype:
                raise KVCompressError(f"kv_compress: shared buffer {name} has the wrong shape or dtype")
            exact[part] = (name, tensor)

    offset = _rope_buffers(layer, heads, head_dim, calibration, rope, buffers, cache.device) if kind == "k" else None
    _, dim, index, source = write.args
    with graph.inserting_before(write):
        p = {f: _get_attr(graph, gm, f"rq_{kind}_{f}_{layer}", t) for f, t in params.items()}
        if offset is not None:  # quantize what is left of the keys after their positional offset (eager: the same)
            base, inv_freq = (_get_attr(graph, gm, name, tensor) for name, tensor in offset)
            source = graph.call_function(subtract_slot_offset, (source, base, index, inv_freq))
        # a mixed layout's trailing (perm, widths) arguments; none for a uniform state (the graph stays as it was)
        layout = () if state.uniform else (p.get("perm"), widths)
        quant = graph.call_function(
            torch.ops.rq.quantize.default,
            (source, p["rotation"], p["mean"], p["scale"], p["levels"], bits, group) + layout,
        )
        new_codes = graph.call_function(operator.getitem, (quant, 0))
        new_norms = graph.call_function(operator.getitem, (quant, 1))
        if state.along_keys:  # a read-modify-write of the 16-token blocks the new tokens fall in, in place
            codes_all = _get_attr(graph, gm, codes_name, codes)
            graph.call_function(WRITE_ALONG_KEYS, (codes_all, new_codes, index, bits))
            layout = (None, None, True)  # rq::dequantize's perm, widths, along_keys
        else:
            codes_all = graph.call_function(
                INDEX_COPY, (_get_attr(graph, gm, codes_name, codes), dim, index, new_codes)
            )
        norms_all = graph.call_function(INDEX_COPY, (_get_attr(graph, gm, norms_name, norms), dim, index, new_norms))
        restored = graph.call_function(
            torch.ops.rq.dequantize.default,
            (codes_all, norms_all, p["rotation"], p["mean"], p["scale"], p["levels"], bits, head_dim)
            + (cache.dtype if offset is None else torch.float32,)
            + layout,
        )
        if offset is not None:
            restored = graph.call_function(add_slot_offset, (restored, base, inv_freq, cache.dtype))
        written = {}
        raw = write.args[3]  # exact tokens are the model's own keys
        for part, (name, tensor) in exact.items():
            held = _get_attr(graph, gm, name, tensor)
            merged = graph.call_function(exact_write, (held, raw, index, part == "window"))
            written[part] = graph.call_function(aten.copy_.default, (held, merged))
            written[part].meta["val"] = tensor
        if exact:
            restored = graph.call_function(exact_read, (restored, written.get("sink"), written.get("window"), index))
    codes_all.meta["val"], norms_all.meta["val"] = codes, norms
    write.replace_all_uses_with(restored)
    graph.erase_node(write)
    return SiteRewrite(
        layer_idx=layer,
        kind=kind,
        buffer=buffer,
        shape=tuple(cache.shape),
        dtype=cache.dtype,
        codes_buffer=codes_name,
        codes_shape=tuple(codes.shape),
        norms_buffer=norms_name,
        norms_shape=tuple(norms.shape),
        bits=bits if state.uniform else state.bits_per_code,
        widths=() if state.uniform else state.widths,
        bytes_before=cache.untyped_storage().nbytes(),
        bytes_after=codes.untyped_storage().nbytes() + norms.untyped_storage().nbytes(),
        exact_buffers=tuple(name for name, _ in exact.values()),
        exact_bytes=sum(t.untyped_storage().nbytes() for _, t in exact.values()),
    )
