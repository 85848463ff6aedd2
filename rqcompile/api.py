"""`rqcompile.apply`: capture a causal LM, compress its K/V cache in the graph, (optionally) fuse attention.

    calibration = rqcompile.calibrate(model, tokenizer=tokenizer)   # or (model, input_ids); a few seconds
    lm = rqcompile.apply(model, backend="iso", bits=3, max_cache_len=1024, calibration=calibration)
    lm.generate(input_ids, max_new_tokens=64)
    lm.memory_report()
    lm.compile()            # torch.compile(fullgraph=True) of both programs

The result runs the two rewritten programs (unlifted GraphModules sharing one set of buffers: packed K/V codes,
fp16 norms, quantizer parameters and the linear-attention states of hybrid models; with `sink_tokens` /
`residual_window`, also the sink and recent-window buffers that hold those tokens in the model dtype, exactly as the
eager `RQCache`). Attention is fused into `rq::attention` over the packed codes (with sink/window tokens:
`rq::attention_lse` merged with attention over the exact tokens). `exported()` re-exports them as
ExportedPrograms (for AOTInductor / ONNX), `functional_step()` gives the cache-as-inputs/outputs form ONNX needs.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import fx, nn

from rqcompile.cache import MemoryReport
from rqcompile.calibrate import Calibration
from rqcompile.config import KEY_LAYOUT_BITS, RQConfig
from rqcompile.passes.capture import AttentionSite, LinearAttentionState, capture
from rqcompile.passes.decode_key_range import decode_key_range
from rqcompile.passes.functional import FunctionalStep, has_scan
from rqcompile.passes.fuse_attention import fuse_attention
from rqcompile.passes.kv_compress import SiteRewrite, compress_kv_cache
from rqcompile.passes.rope_table import rope_table
from rqcompile.quant.quantizer import QuantState
from rqcompile.quant.rope_offset import check_same_rope, rope_spec
from rqcompile.quant.rotations import STAGED_BACKENDS
from rqcompile.runtime.cuda_graph import GraphedStep
from rqcompile.runtime.generate import SamplingConfig, generate

__all__ = ["CompiledLM", "FunctionalStep", "apply"]


def _compilable(gm: fx.GraphModule) -> fx.GraphModule:
    """A plain GraphModule over the same graph and tensors, without export's input-guard submodule and hooks.

    `ep.module()` calls a `_guards_fn` submodule (input shape checks) that Dynamo cannot trace ("Attempt to trace
    generator"); shapes are guarded by torch.compile itself, so the compiled copy drops that call.
    """
    graph = copy.deepcopy(gm.graph)
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    return fx.GraphModule(gm, graph)


def _compile_by_layer(gm: fx.GraphModule, **options: Any) -> fx.GraphModule:
    """`gm` split into one submodule per decoder layer (and one before, one after), each `torch.compile`d."""
    from rqcompile.passes.split_by_layer import split_by_layer

    split = split_by_layer(gm)
    for name, sub in list(split.named_children()):
        if name.startswith("submod_"):
            setattr(split, name, torch.compile(sub, **options))
    return split


class CompiledLM:
    """A causal LM whose K/V cache is stored compressed by rewritten graph programs; see `apply`."""

    def __init__(
        self,
        *,
        prefill: fx.GraphModule,
        decode: fx.GraphModule,
        config: RQConfig,
        model_config: Any,
        sites: list[AttentionSite],
        linear_states: list[LinearAttentionState],
        quant_states: dict[int, dict[str, QuantState]],
        buffers: dict[str, torch.Tensor],
        rewrites: list[SiteRewrite],
        max_cache_len: int,
        batch_size: int,
        prefill_logits: str,
        fused: bool,
    ):
        self.prefill_module = prefill
        self.decode_module = decode
        self.config = config
        self.model_config = model_config
        self.sites = sites
        self.linear_states = linear_states
        self.quant_states = quant_states
        self.buffers = buffers
        self.rewrites = rewrites
        self.max_cache_len = max_cache_len
        self.batch_size = batch_size
        self.prefill_logits = prefill_logits
        self.fused = fused
        self._prefill_fn: Callable = prefill
        self._decode_fn: Callable = decode
        self.compiled = False
        self._exported: dict[str, torch.export.ExportedProgram] = {}

    # -- running -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        """T >= 2 tokens at positions `cache_position` -> logits (last or all positions, as captured). Inputs move
        to the programs' device (the generation loop makes its positions on the CPU), as `LoadedLM` does."""
        return self._prefill_fn(input_ids.to(self.device), cache_position.to(self.device))

    @torch.no_grad()
    def decode(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        """One token per row at position `cache_position` [1] -> logits [B, 1, V]."""
        return self._decode_fn(input_ids.to(self.device), cache_position.to(self.device))

    @property
    def device(self) -> torch.device:
        """Where the programs' buffers (caches, quantizer states) live."""
        return next(iter(self.buffers.values())).device

    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 32,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        eos_token_id: int | Iterable[int] | None = None,
        streamer: Callable[[torch.Tensor], None] | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Prompt [B, T] -> prompt + new tokens (rqcompile.runtime.generate; CacheOverflowError past the cache).
        Rows are unpadded prompts of equal length; an `attention_mask` marking padding is refused."""
        sampling = SamplingConfig(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        return generate(
            self,
            input_ids,
            max_new_tokens,
            sampling=sampling,
            eos_token_id=eos_token_id,
            streamer=streamer,
            attention_mask=attention_mask,
        )

    def compile(
        self,
        *,
        dynamic_prefill: bool | None = None,
        regional: bool = False,
        prefill: bool = True,
        cuda_graph: bool = False,
        **options: Any,
    ) -> CompiledLM:
        """Lower both programs through `torch.compile(fullgraph=True, **options)` (in place; returns self).

        Decode has static shapes: one compilation serves every step (the position is a tensor). Prefill is compiled
        dynamic in the prompt length, except when its graph holds a `scan` (Qwen3.5's chunked gated delta rule):
        Inductor in torch 2.13 fails on a scan with a symbolic length ("KeyError: s70"), so that prefill is compiled
        per prompt length (`dynamic_prefill=None` picks; pass True/False to force).

        `mode="reduce-overhead"` (CUDA graphs) applies to the decode program only: a decode step is a few ms of
        small kernels whose launch cost it removes, while prefill runs once per prompt, at a new length each time.

        `regional=True` compiles each decoder layer as its own program (`rqcompile.passes.split_by_layer`): layers
        of one kind give identical graphs, which Inductor's cache compiles once, so a deep model compiles in about
        the time of its first layers of each kind (the whole 64-layer program of Qwen3.5-27B takes longer than its
        16 layers' ~4 min otherwise); a step then makes one call per layer from Python. Per-layer CUDA graphs
        (`mode="reduce-overhead"`) failed on torch 2.11 CUDA; `cuda_graph=True` below graphs the whole step instead.
        Qwen3.5's prefill gains little from it: Inductor does not cache graphs holding a `scan`, so each
        linear-attention layer of the prefill program compiles anew (48 of them in Qwen3.5-27B). `prefill=False`
        leaves the prefill program eager (it runs once per prompt) and compiles the decode program only.

        `cuda_graph=True` (CUDA only) captures the whole compiled decode step in one CUDA graph on its first call and
        replays it from then on (`rqcompile.runtime.cuda_graph.GraphedStep`); with `regional=True` this is what
        removes the per-layer launch cost (torch 2.11's per-layer `mode="reduce-overhead"` failed). BENCHMARKS.md
        "Session 12": 19.0 ms/token for Qwen3.5-27B at 8K with it, 79.3 without (session 11). The returned logits are
        overwritten by the next step, as with `mode="reduce-overhead"`.
        """
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the programs on a CUDA device; they are on {self.device}")
        options = {"fullgraph": True, **options}
        prefill_options = {k: v for k, v in options.items() if not (k == "mode" and v == "reduce-overhead")}
        if dynamic_prefill is None:
            dynamic_prefill = not has_scan(self.prefill_module)
        prefill_options = {"dynamic": dynamic_prefill, **prefill_options}
        compile_program = _compile_by_layer if regional else torch.compile
        self._decode_fn = compile_program(_compilable(self.decode_module), **options)
        if prefill:
            self._prefill_fn = compile_program(_compilable(self.prefill_module), **prefill_options)
        if cuda_graph:
            self._decode_fn = GraphedStep(self._decode_fn, self._recurrent_state)
        self.compiled = True
        return self

    # -- inspection ----------------------------------------------------------------------------------------------
    @property
    def cache_names(self) -> list[str]:
        """Names of the state buffers, in the order `functional_step` takes them: K codes/norms, V codes/norms, then
        the exact-token buffers (`{k|v}_sink_i`, `{k|v}_window_i`, when configured), then linear-attention states."""
        kv = [n for s in self.sites for n in (f"k_codes_{s.layer_idx}", f"k_norms_{s.layer_idx}")] + [
            n for s in self.sites for n in (f"v_codes_{s.layer_idx}", f"v_norms_{s.layer_idx}")
        ]
        exact = [n for s in self.sites for n in self._exact_names(s.layer_idx)]
        return kv + exact + self._linear_names()

    def _linear_names(self) -> list[str]:
        """Linear-attention conv / recurrent state buffers, in `cache_names` order."""
        return [n for st in self.linear_states for n in (st.conv_buffer, st.recurrent_buffer)]

    def _recurrent_state(self) -> list[torch.Tensor]:
        """The state a decode step updates from its old value (linear-attention conv / recurrent states), unlike the
        K/V buffers, where a step writes its position afresh."""
        return [self.decode_module.get_buffer(n) for n in self._linear_names()]

    def _exact_names(self, layer_idx: int) -> list[str]:
        """Sink / recent-window buffers of one layer (model dtype), as created by `compress_kv_cache`."""
        names = [f"{kind}_{part}_{layer_idx}" for part in ("sink", "window") for kind in "kv"]
        return [n for n in names if n in self.buffers]

    def cache_tensors(self) -> list[torch.Tensor]:
        """The live state tensors (shared by both programs), in `cache_names` order."""
        return [self.decode_module.get_buffer(n) for n in self.cache_names]

    def functional_step(self, which: Literal["prefill", "decode"] = "decode") -> FunctionalStep:
        """The program as `forward(input_ids, cache_position, *cache) -> (logits, *new_cache)` (ONNX form)."""
        program = self.decode_module if which == "decode" else self.prefill_module
        return FunctionalStep(program, self.cache_names)

    def export(self, path: str, *, target: Literal["aoti", "onnx", "tensorrt"] = "aoti", **options: Any):
        """Write a deployable artifact (see `rqcompile.export.lm.export_lm` for `options`); load it with
        `rqcompile.load(path)`."""
        from rqcompile.export.lm import export_lm  # export sits above the compiler in the layering

        return export_lm(self, path, target=target, **options)

    def exported(self, which: Literal["prefill", "decode"] = "decode") -> torch.export.ExportedProgram:
        """The rewritten program re-exported (strict=False: it is a GraphModule) with its buffers lifted.

        prefill is dynamic in the prompt length like the captured one. Cached after the first call.
        """
        if which not in self._exported:
            device = self.device
            if which == "decode":
                args = (
                    torch.zeros(self.batch_size, 1, dtype=torch.long, device=device),
                    torch.zeros(1, dtype=torch.long, device=device),
                )
                dynamic = None
                program = self.decode_module
            else:
                t = min(self.max_cache_len, 70)
                args = (
                    torch.zeros(self.batch_size, t, dtype=torch.long, device=device),
                    torch.arange(t, device=device),
                )
                dim = torch.export.Dim("prompt_len", min=2, max=self.max_cache_len)
                dynamic = ((None, dim), (dim,))
                program = self.prefill_module
            saved = [t.clone() for t in self.cache_tensors()]
            with torch.no_grad():
                self._exported[which] = torch.export.export(program, args, dynamic_shapes=dynamic, strict=False)
            for live, old in zip(self.cache_tensors(), saved, strict=True):
                live.copy_(old)  # export runs the program once on the sample inputs
        return self._exported[which]

    def memory_report(self) -> MemoryReport:
        """Bytes allocated by the compressed K/V buffers (plus sink / recent-window buffers, and a CUDA decode
        program's rope table, `passes.rope_table`, shared out over the layers: it grows with max_cache_len) vs a bf16
        cache of the same max_cache_len (real tensors)."""
        tables = [t for n, t in self.decode_module.named_buffers() if n.startswith("rq_rope_table")]
        table_bytes = sum(t.untyped_storage().nbytes() for t in tables)
        share, rest = divmod(table_bytes, len(self.sites))  # each layer's share of the table, the rest on the first
        layers = {}
        for index, site in enumerate(self.sites):
            i = site.layer_idx
            tensors = [self.buffers[f"{kind}_{part}_{i}"] for kind in "kv" for part in ("codes", "norms")]
            compressed = sum(t.untyped_storage().nbytes() for t in tensors)
            exact = sum(self.buffers[n].untyped_storage().nbytes() for n in self._exact_names(i))
            bf16 = 2 * 2 * self.batch_size * site.num_kv_heads * site.max_cache_len * site.head_dim
            layers[i] = {
                "tokens": site.max_cache_len,
                "compressed_bytes": compressed,
                "window_bytes": exact,  # sink + recent-window tokens in the model dtype
                "rope_table_bytes": share + (rest if index == 0 else 0),
                "bf16_bytes": bf16,
            }
        return MemoryReport(layers)

    def rewrite_report(self) -> str:
        lines = [str(r) for r in self.rewrites]
        lines.append(f"rotation: {self._describe_rotation()}")
        if self.config.rope_key_mean:
            offset = (
                "each layer's pre-RoPE mean turned to the key's slot, removed before quantizing, added back on read"
            )
            lines.append(f"keys: {offset} (rope_key_mean)")
        fused = "attention: fused into rq::attention (rq::attention_lse + exact tokens where sink/window are held)"
        if self.fused and self.decode_module.meta.get("rq_decode_key_range"):
            fused += "; decode steps read their keys as a range, without a mask"
        lines.append(fused if self.fused else "attention: not fused (dequantize + SDPA)")
        return "\n".join(lines)

    def _describe_rotation(self) -> str:
        """What `rotation_stages` resolved to at this model's head dimension (the config may say None)."""
        state = next(iter(self.quant_states.values()))["k"]
        backend, group = self.config.backend, state.group
        if backend not in STAGED_BACKENDS:  # hadamard (dense) or none: nothing to compose
            return "hadamard, dense per norm group" if backend == "hadamard" else "none"
        stages = self.config.stage_count(state.head_dim)
        if stages == 1:
            return f"{backend}, one layer of {state.rotation.shape[-1]}x{state.rotation.shape[-1]} blocks"
        return f"{backend}, {stages} block layers mixing each {group}-coordinate norm group (stored dense per group)"

    def __repr__(self) -> str:
        return (
            f"CompiledLM({self.config}, sites={[s.layer_idx for s in self.sites]}, max_cache_len={self.max_cache_len}, "
            f"batch_size={self.batch_size}, fused={self.fused}, compiled={self.compiled})"
        )


_CALIBRATED_BACKENDS = ("planar", "iso", "rotor")  # block rotations need the channel statistics (QUALITY.md)


def _device(model: nn.Module) -> torch.device:
    return next(iter(model.parameters()), torch.empty(0)).device


def _value_layout(config: RQConfig, sites: list, device: torch.device, max_cache_len: int, fuse: bool) -> str:
    """`RQConfig.value_layout` resolved for these programs. Auto (None): V packed along keys where the fused decode
    kernel reads it in place, so it pays (CUDA; every site's decode shape keys-m's: norm groups of 128, <= 16 query
    heads per KV head, V at 2 or 3 bits; whole 16-token blocks); per token elsewhere, where every reader would
    re-pack a copy of the cache first."""
    if config.value_layout is not None:
        return config.value_layout
    if device.type != "cuda" or not fuse or config.bit_allocation or max_cache_len % 16 or not sites:
        return "coordinates"
    from rqcompile.kernels.attention import keys_m_applies

    for site in sites:
        group = config.group_for(site.head_dim)
        k_bits, v_bits = (int(config.bits_for(site.layer_idx, kind)) for kind in "kv")
        rows = site.num_heads // site.num_kv_heads  # one query token per decode step
        groups = site.head_dim // group
        if v_bits not in KEY_LAYOUT_BITS or not keys_m_applies(site.head_dim, k_bits, v_bits, groups, groups, rows, 1):
            return "coordinates"
    return "keys"


def _check_calibration(config: RQConfig, calibration: Calibration | None) -> None:
    """A calibrated bit allocation needs the calibration's error weights: say so before the (slow) capture."""
    if calibration is not None and not isinstance(calibration, Calibration):
        raise ValueError(
            f"calibration={calibration!r}: apply needs a rqcompile.Calibration (rqcompile.calibrate(model, "
            "tokenizer=tok)); the compiled programs carry it as constants ('prompt' is for the eager caches)"
        )
    has_rope_mean = calibration is not None and calibration.has_rope_mean
    if has_rope_mean and config.rope_key_mean is False:
        raise ValueError(
            "this Calibration was measured with rope_key_mean=True (its key statistics are those of the keys without "
            "their pre-RoPE mean): use it with RQConfig(rope_key_mean=None or True), or calibrate with "
            "rope_key_mean=False"
        )
    if config.rope_key_mean and not has_rope_mean:
        raise ValueError(
            "RQConfig(rope_key_mean=True) needs each layer's pre-RoPE key mean from sample text: pass "
            "calibration=rqcompile.calibrate(model, tokenizer=tokenizer) (it measures them by default; compiled "
            "programs cannot measure them on the prompt as the drop-in caches do)"
        )
    if calibration is None and config.backend in _CALIBRATED_BACKENDS:
        measured = (  # SmolLM2, decode-time perplexity, iso 3-bit: QUALITY.md "Defaults" / "Staged rotations"
            "iso 3-bit +127% vs +28%" if config.resolved_rotation_stages == 1 else "iso 3-bit fully mixed +38% vs +10%"
        )
        warnings.warn(
            f"rqcompile: {config.backend} {config.bits}-bit without calibration loses much more quality than with it "
            f"({measured} decode-time perplexity on SmolLM2); pass "
            "calibration=rqcompile.calibrate(model, tokenizer=tokenizer) (built-in text, a few seconds) or "
            "rqcompile.calibrate(model, input_ids) (the drop-in caches calibrate on the prompt by default; "
            "compiled programs cannot)",
            UserWarning,
            stacklevel=3,
        )
    if not config.bit_allocation:
        return
    if calibration is None or not any(name == "weight" for _, _, name in calibration.stats):
        raise ValueError(
            f"RQConfig.bit_allocation={config.bit_allocation} needs a calibration with error weights: pass "
            "calibration=rqcompile.calibrate(model, ids) (error_weights=True, the default), or use uniform bits "
            "(bit_allocation=())"
        )


def apply(
    model: nn.Module,
    backend: str = "iso",
    bits: float = 3,
    *,
    key_bits: float | None = None,
    value_bits: float | None = None,
    max_cache_len: int = 1024,
    batch_size: int = 1,
    seed: int = 0,
    calibration: Calibration | None = None,
    fuse: bool | None = None,
    config: RQConfig | None = None,
    prefill_logits: Literal["last", "all"] = "last",
) -> CompiledLM:
    """Capture `model` (prefill + decode programs), compress every full-attention K/V cache, optionally fuse.

    `config` overrides backend/bits/key_bits/value_bits/seed when given; its `sink_tokens` / `residual_window`
    keep those tokens in the model dtype exactly as the eager `RQCache` does. `fuse` (`None` or `True`: fuse, `False`:
    keep dequantize + SDPA) replaces each site's dequantize + SDPA by `rq::attention` over the packed codes, or, with
    sink/window tokens, by `rq::attention_lse` over the codes merged with attention over the exact tokens. The
    model's own weights are shared, not copied; its float K/V caches are never allocated beyond capture (the capture
    wrapper's are dropped).

    `calibration` (`rqcompile.calibrate(model, tokenizer=tok)`) folds the model's per-channel key mean (and K/V
    scales, when measured: `key_scale=True, value_scale=True`, for one block layer) into the format; the block backends
    need it for good quality and warn without it. A config with `bit_allocation`
    needs it (its per-channel error weights decide the layout; `ValueError` without). The defaults (iso, 3 bits, one
    exact sink token, the 32 most recent tokens exact, scale search, rotations mixing each whole norm group) are the
    best measured uniform preset (QUALITY.md "Defaults", "Session 11"). The programs also remove each layer's pre-RoPE
    key mean turned to the key's position (`RQConfig.rope_key_mean`, the best measured configuration, QUALITY.md
    "Session 14") exactly when the Calibration carries it, which `calibrate` measures by default; `rope_key_mean=True`
    without such a Calibration, or False with one, is a `ValueError` before the capture. On CUDA the fused programs
    store V's codes packed along keys where the decode kernel reads them in place (`RQConfig.value_layout`, auto by
    default: same codes and bytes, -13 to -15% attention time on the H200); `lm.config` holds the resolved layout.
    With the pre-RoPE key offset on CUDA the decode program also holds the offset term's cos / sin per slot
    (`passes.rope_table`: fp16, 2 x 16-64 values per slot, one table for all layers), which its attention reads
    instead of computing (-12 to -16% attention time at batch 8 and at 128K keys, H200).
    """
    if config is None:
        config = RQConfig(backend=backend, bits=bits, key_bits=key_bits, value_bits=value_bits, seed=seed)
    fuse = True if fuse is None else fuse
    _check_calibration(config, calibration)
    # auto: on exactly when the Calibration carries pre-RoPE key means; the programs and artifacts keep the bool
    config = config.replace(rope_key_mean=calibration is not None and calibration.has_rope_mean)
    rope = rope_spec(model.config) if config.rope_key_mean else None  # before the capture: a clear error if no RoPE
    if rope is not None and calibration.rope is not None:
        check_same_rope(calibration.rope, rope)
    captured = capture(
        model,
        max_cache_len=max_cache_len,
        batch_size=batch_size,
        prefill_logits=prefill_logits,
        materialize_cache=False,
    )
    config = config.replace(value_layout=_value_layout(config, captured.sites, _device(model), max_cache_len, fuse))
    buffers: dict[str, torch.Tensor] = {}
    quant_states: dict[int, dict[str, QuantState]] = {}
    shared = {"buffers": buffers, "quant_states": quant_states, "rope": rope}
    prefill = compress_kv_cache(captured.prefill, captured.sites, config, calibration, **shared)
    decode = compress_kv_cache(captured.decode, captured.sites, config, calibration, **shared)
    if fuse:
        fuse_attention(prefill)
        decode_key_range(fuse_attention(decode))  # one token: its mask is a key range, read without a mask
        if config.rope_key_mean and _device(model).type == "cuda":
            rope_table(decode)  # the decode kernel reads the offset term's cos / sin instead of computing them
    return CompiledLM(
        prefill=prefill,
        decode=decode,
        config=config,
        model_config=captured.config,
        sites=list(captured.sites),
        linear_states=list(captured.linear_states),
        quant_states=quant_states,
        buffers=buffers,
        rewrites=list(prefill.meta["rq_kv_compress"]),
        max_cache_len=max_cache_len,
        batch_size=batch_size,
        prefill_logits=prefill_logits,
        fused=fuse,
    )
