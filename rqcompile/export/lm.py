"""Export a whole LM (prefill + decode step programs) into an artifact directory, for any target.

The state-sharing decision (issue 5): an AOTInductor package owns its buffers as constants, and an ONNX graph drops
buffer mutation altogether, so neither can keep the K/V cache *inside* two programs that must see the same cache.
Every exported program is therefore **functional**:

    step(input_ids, cache_position, *state) -> (logits, *new_state)

where `state` is every buffer the captured program mutates (K/V caches - uint8 codes + fp16 norms once compressed -,
conv and recurrent states of linear-attention layers), in a fixed order recorded in the manifest. The loader
(`rqcompile.runtime.loaded`) owns the state tensors, feeds them to prefill or decode and keeps what comes back; the
weights and quant state are the programs' constants (inside each ONNX graph; for AOTInductor written once beside the
code-only packages, see `rqcompile.export.aoti`). The cost is that each program returns whole new cache
tensors (one copy per step on CPU; fine at the sizes here, and the price of portability).

Prefill length: prefill is exported with a dynamic prompt length, except when its graph holds a `scan` (the chunked
gated-delta rule of hybrid models): Inductor (torch 2.13) fails on a scan over a symbolic number of chunks
(`KeyError: s..` in `decompose_scan_to_while_loop`), so such models get a prefill program of one static length
(`prefill_chunk`, default min(64, max_cache_len)); the loader runs whole chunks through it (at any start position)
and the remaining < chunk tokens through the decode program. ONNX keeps the dynamic prefill. The same static
program is the fallback where torch.export cannot keep the prompt length symbolic at all: on CUDA, the launch code
of the rq Triton ops (traced with fake tensors) specializes it in contiguity checks (torch 2.11, session 21); the
artifact's notes say which reason applied.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from rqcompile.config import RQConfig
from rqcompile.passes.functional import FunctionalStep, has_scan
from rqcompile.passes.values_per_token import values_per_token

__all__ = ["FunctionalLM", "FunctionalStep", "export_lm", "functional_programs", "mutated_buffers"]

PROGRAM_KIND = "functional-step-v1"


def mutated_buffers(ep: torch.export.ExportedProgram) -> list[str]:
    """FQNs of the buffers an ExportedProgram writes in place, in graph order (training IR or functionalized)."""
    sig = ep.graph_signature
    names = list(dict.fromkeys(sig.buffers_to_mutate.values()))
    in2buf = sig.inputs_to_buffers
    for node in ep.graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload) or not target._schema.is_mutable:
            continue
        for arg_schema, arg in zip(target._schema.arguments, node.args):
            written = arg_schema.alias_info is not None and arg_schema.alias_info.is_write
            if written and isinstance(arg, torch.fx.Node) and arg.name in in2buf and in2buf[arg.name] not in names:
                names.append(in2buf[arg.name])
    return names


@dataclass
class FunctionalLM:
    """The functional prefill/decode programs of an LM plus what a loader needs to run them."""

    prefill: torch.export.ExportedProgram
    decode: torch.export.ExportedProgram
    state_names: list[str]
    state_init: list[torch.Tensor]  # zeros of each state tensor's shape/dtype (an empty cache)
    max_cache_len: int
    batch_size: int
    prefill_len: int | None  # None: dynamic prompt length; else the one static length of `prefill`
    model_config: Any = None
    rq_config: RQConfig | None = None
    quant_states: Any = None
    vocab_size: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def state_layout(self) -> list[dict[str, Any]]:
        return [
            {"name": n, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
            for n, t in zip(self.state_names, self.state_init)
        ]

    @property
    def device_type(self) -> str:
        """Where the programs were traced ("cpu", "cuda"): an AOTInductor package runs only there."""
        return self.state_init[0].device.type if self.state_init else "cpu"

    def runner(self, eos: list[int] | None = None):
        """Run these ExportedPrograms in process through the same state threading as `rqcompile.load`."""
        from rqcompile.runtime.loaded import StateRunner

        spec = program_manifest(self, {}, eos)["program"]
        return StateRunner(spec, self.prefill.module(), self.decode.module(), device=str(self.state_init[0].device))

    def example_inputs(self, which: str, prompt_len: int | None = None) -> tuple[torch.Tensor, ...]:
        t = 1 if which == "decode" else (prompt_len or self.prefill_len or min(self.max_cache_len, 8))
        device = self.state_init[0].device if self.state_init else "cpu"
        ids = torch.zeros(self.batch_size, t, dtype=torch.long, device=device)
        return (ids, torch.arange(t, device=device), *[s.clone() for s in self.state_init])


def _configs(program: Any) -> tuple[Any, RQConfig | None]:
    """(HF model config, RQConfig or None) of a CapturedLM (config = HF) or a CompiledLM (config = RQConfig)."""
    config = getattr(program, "config", None)
    rq = getattr(program, "rq_config", None)
    if isinstance(config, RQConfig):
        rq, config = config, getattr(program, "model_config", None)
    return getattr(program, "model_config", None) or config, rq


def functional_programs(
    program: Any, *, prefill: str = "auto", prefill_chunk: int | None = None, for_target: str = "aoti"
) -> FunctionalLM:
    """Re-export a captured (`CapturedLM`) or compiled (`CompiledLM`) LM's programs in functional form.

    `prefill`: "dynamic" (symbolic prompt length; a ValueError where torch.export cannot keep it symbolic),
    "static" (one length, `prefill_chunk`), or "auto" = dynamic unless the target is AOTInductor and the prefill
    graph holds a scan, or the dynamic export fails (see the module docstring).
    """
    max_len, batch = int(program.max_cache_len), int(program.batch_size)
    model_config, rq_config = _configs(program)
    quant_states = getattr(program, "quant_states", None)
    if hasattr(program, "functional_step"):  # CompiledLM: rewritten GraphModules + its own functional form
        decode_step, prefill_step = program.functional_step("decode"), program.functional_step("prefill")
        names = list(program.cache_names)
        if for_target != "aoti" and rq_config is not None and rq_config.value_layout == "keys":
            # ONNX / TensorRT store V per token: the same codes, in the order their translations read and write
            decode_step = FunctionalStep(values_per_token(program.decode_module), names)
            prefill_step = FunctionalStep(values_per_token(program.prefill_module), names)
            rq_config = rq_config.replace(value_layout="coordinates")
            quant_states = {
                layer: {kind: replace(state, along_keys=False) for kind, state in states.items()}
                for layer, states in quant_states.items()
            }
        live = program.cache_tensors() if callable(program.cache_tensors) else program.cache_tensors
        state_init = [torch.zeros_like(t) for t in live]
        scan = has_scan(prefill_step)
    else:  # CapturedLM: ExportedPrograms mutating their buffers
        names = mutated_buffers(program.decode)
        names += [n for n in mutated_buffers(program.prefill) if n not in names]
        buffers = dict(program.decode.module().named_buffers())
        state_init = [torch.zeros_like(buffers[name]) for name in names]
        decode_step, prefill_step = FunctionalStep(program.decode, names), FunctionalStep(program.prefill, names)
        scan = has_scan(program.prefill.graph_module)
    if prefill not in ("auto", "dynamic", "static"):
        raise ValueError(f"prefill must be 'auto', 'dynamic' or 'static', got {prefill!r}")
    why_static = None
    if prefill == "static":
        why_static = "asked for"
    elif prefill == "auto" and for_target == "aoti" and scan:
        why_static = "the graph holds a scan"
    chunk = min(prefill_chunk or 64, max_len)  # the static prefill's length, where there is one
    if chunk < 2 and (why_static is not None or prefill_chunk is not None):
        raise ValueError(f"prefill_chunk must be >= 2, got {chunk}")
    prefill_len = None if why_static is None else chunk
    out = FunctionalLM(
        prefill=None,  # type: ignore[arg-type]
        decode=None,  # type: ignore[arg-type]
        state_names=names,
        state_init=state_init,
        max_cache_len=max_len,
        batch_size=batch,
        prefill_len=prefill_len,
        model_config=model_config,
        rq_config=rq_config,
        quant_states=quant_states,
    )
    n_state = len(names)
    with torch.no_grad():
        out.decode = torch.export.export(decode_step, out.example_inputs("decode"), strict=False)
        if prefill_len is None:
            dim = torch.export.Dim("prompt_len", min=2, max=max_len)
            shapes = ({1: dim}, {0: dim}, tuple([None] * n_state))
            example = out.example_inputs("prefill", min(max_len, 70))  # > one gated-delta chunk (see capture)
            try:
                out.prefill = torch.export.export(prefill_step, example, dynamic_shapes=shapes, strict=False)
            except torch._dynamo.exc.UserError as exc:  # the prompt length could not stay symbolic
                if prefill == "dynamic":
                    raise ValueError(
                        f"the prefill program cannot be exported with a dynamic prompt length ({exc}); "
                        "export it with prefill='static' (prompts run in fixed-size chunks)"
                    ) from exc
                # seen on CUDA: torch specializes the prompt length in the rq kernels' launch checks
                why_static = "torch.export could not keep the prompt length dynamic"
                out.prefill_len = prefill_len = chunk
        if prefill_len is not None:
            out.prefill = torch.export.export(prefill_step, out.example_inputs("prefill"), strict=False)
            out.notes.append(f"prefill exported at a static length of {prefill_len} tokens ({why_static})")
    logits_meta = out.decode.graph.output_node().args[0][0].meta.get("val")
    out.vocab_size = int(logits_meta.shape[-1]) if logits_meta is not None else None
    return out


def _eos(model_config: Any, eos_token_id: int | Sequence[int] | None) -> list[int] | None:
    if eos_token_id is None and model_config is not None:
        eos_token_id = getattr(model_config, "eos_token_id", None)
        if eos_token_id is None and isinstance(model_config, dict):
            eos_token_id = model_config.get("eos_token_id")
    if eos_token_id is None:
        return None
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]


def program_manifest(fn: FunctionalLM, files: dict[str, str], eos: list[int] | None, **more: Any) -> dict[str, Any]:
    """The manifest's `program` section: entry points, the cache layout the loader allocates, sizes."""
    return {
        "program": {
            "kind": PROGRAM_KIND,
            "files": files,
            "inputs": ["input_ids", "cache_position", *fn.state_names],
            "outputs": ["logits", *fn.state_names],
            "state": fn.state_layout,
            "prefill_len": fn.prefill_len,
            "max_cache_len": fn.max_cache_len,
            "batch_size": fn.batch_size,
            "device": fn.device_type,
            "vocab_size": fn.vocab_size,
            "eos_token_id": eos,
            "notes": fn.notes,
            **more,
        }
    }


def export_lm(
    program: Any,
    path: str | Path,
    *,
    target: str = "aoti",
    tokenizer_dir: str | Path | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    prefill: str = "auto",
    prefill_chunk: int | None = None,
    inductor_configs: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
):
    """Export a CapturedLM / CompiledLM (or a ready `FunctionalLM`) to an artifact directory; returns the Artifact.

    Targets: ``aoti`` (two AOTInductor packages, `prefill.pt2` / `decode.pt2`), ``onnx`` (two ONNX graphs with the
    cache as explicit inputs/outputs, rq ops via `onnx_ops.translation_table`), ``tensorrt`` (the TensorRT-ready
    ONNX flavour, statically checked, then `build_engine`: the artifact with the checked ONNX is written first, and
    `TensorRTNotInstalledError` is raised afterwards where TensorRT is missing). Load any of them with
    `rqcompile.load(path)`.
    """
    if target not in ("aoti", "onnx", "tensorrt"):
        raise ValueError(f"export_lm target must be 'aoti', 'onnx' or 'tensorrt', got {target!r}")
    fn = program if isinstance(program, FunctionalLM) else None
    if fn is None:
        fn = functional_programs(program, prefill=prefill, prefill_chunk=prefill_chunk, for_target=target)
    layout = None if fn.rq_config is None else fn.rq_config.value_layout
    if target != "aoti" and layout == "keys":  # a FunctionalLM made for AOTInductor, handed to ONNX
        raise ValueError(
            f"export_lm(target={target!r}): these programs store V packed along keys (value_layout={layout!r}), "
            f"which ONNX does not translate; make them with functional_programs(..., for_target={target!r})"
        )
    eos = _eos(fn.model_config, eos_token_id)
    if target == "aoti":
        from rqcompile.export.aoti import write_aoti

        return write_aoti(
            fn,
            path,
            eos=eos,
            tokenizer_dir=tokenizer_dir,
            inductor_configs=inductor_configs,
            overwrite=overwrite,
            progress=progress,
        )
    from rqcompile.export.onnx_lm import write_onnx

    return write_onnx(
        fn,
        path,
        eos=eos,
        tokenizer_dir=tokenizer_dir,
        flavour="tensorrt" if target == "tensorrt" else "standard",
        overwrite=overwrite,
        progress=progress,
    )
