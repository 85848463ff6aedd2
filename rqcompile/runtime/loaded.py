"""`rqcompile.load(path)`: run an exported artifact (AOTInductor or ONNX) without transformers model code or weights.

The artifact's programs are functional (`step(input_ids, cache_position, *state) -> (logits, *state)`, see
`rqcompile.export.lm`); `LoadedLM` owns the state tensors (allocated from the manifest's cache layout), threads them
through prefill and decode, and exposes the `StepProgram` interface, so generation is `runtime.generate.generate`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from rqcompile.export.artifact import Artifact, ArtifactError, read_artifact
from rqcompile.runtime.generate import SamplingConfig, generate

__all__ = ["LoadedLM", "StateRunner", "load"]

Step = Callable[..., Sequence[torch.Tensor]]


class StateRunner:
    """Functional step programs + the state they thread: the `StepProgram` interface (`prefill`, `decode`,
    `max_cache_len`, `batch_size`). `spec` is the manifest's `program` section (state layout, sizes, prefill_len)."""

    def __init__(self, spec: dict[str, Any], prefill: Step, decode: Step, *, device: str = "cpu"):
        self.device = torch.device(device)
        self.max_cache_len = int(spec["max_cache_len"])
        self.batch_size = int(spec["batch_size"])
        self.prefill_len = spec.get("prefill_len")
        self.eos_token_id = spec.get("eos_token_id")
        self.state_layout = spec["state"]
        self._prefill, self._decode = prefill, decode
        self.reset()

    def reset(self) -> None:
        """Allocate an empty cache (a call at position 0 also starts a new sequence inside the programs)."""
        self.state = [
            torch.zeros(s["shape"], dtype=getattr(torch, s["dtype"]), device=self.device) for s in self.state_layout
        ]

    def _run(self, step: Step, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        out = step(input_ids.to(self.device), cache_position.to(self.device), *self.state)
        self.state = list(out[1:])
        return out[0]

    def decode(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        return self._run(self._decode, input_ids, cache_position)

    def prefill(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        if self.prefill_len is None:
            return self._run(self._prefill, input_ids, cache_position)
        # static-length prefill program: whole chunks through it, the rest token by token through decode
        chunk, total = int(self.prefill_len), input_ids.shape[1]
        logits, start = None, 0
        while total - start >= chunk:
            logits = self._run(
                self._prefill, input_ids[:, start : start + chunk], cache_position[start : start + chunk]
            )
            start += chunk
        for i in range(start, total):
            logits = self._run(self._decode, input_ids[:, i : i + 1], cache_position[i : i + 1])
        return logits[:, -1:]


class LoadedLM(StateRunner):
    """A loaded artifact as a `StepProgram`, plus its tokenizer and `generate`."""

    def __init__(self, artifact: Artifact, prefill: Step, decode: Step, *, device: str = "cpu", backend: str = ""):
        self.artifact = artifact
        self.backend = backend
        self.constants: dict[str, torch.Tensor] = {}  # AOTI: weights the packages point into (kept alive here)
        self._tokenizer = None
        super().__init__(artifact.manifest["program"], prefill, decode, device=device)

    @property
    def tokenizer(self):
        """The artifact's tokenizer (transformers' tokenizer classes only - no model code); None if it has none."""
        if self._tokenizer is None and self.artifact.tokenizer_path is not None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.artifact.tokenizer_path))
        return self._tokenizer

    def generate(
        self,
        input_ids: torch.Tensor | str,
        max_new_tokens: int = 32,
        *,
        sampling: SamplingConfig | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        streamer: Callable[[torch.Tensor], None] | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | str:
        """Token ids [B, T] -> ids [B, T + n] (or a prompt string -> the generated text, with the tokenizer).
        Rows are unpadded prompts of equal length (`attention_mask`: see `rqcompile.runtime.generate`)."""
        text = isinstance(input_ids, str)
        if text:
            if self.tokenizer is None:
                raise ArtifactError(f"{self.artifact.path} has no tokenizer; pass token ids instead of a string")
            input_ids = self.tokenizer(input_ids, return_tensors="pt").input_ids
        eos = self.eos_token_id if eos_token_id is None else eos_token_id
        out = generate(
            self,
            input_ids,
            max_new_tokens,
            sampling=sampling,
            eos_token_id=eos,
            streamer=streamer,
            attention_mask=attention_mask,
        )
        if text:
            return self.tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True)
        return out

    def __repr__(self) -> str:
        return (
            f"LoadedLM({self.artifact.path}, target={self.artifact.target}, backend={self.backend}, "
            f"batch={self.batch_size}, max_cache_len={self.max_cache_len}, state={len(self.state_layout)} tensors)"
        )


def _aoti_steps(artifact: Artifact, device: str) -> tuple[Step, Step, dict[str, torch.Tensor]]:
    """Load both packages and bind the artifact's one copy of the constants to each (see rqcompile.export.aoti).

    Returns the packages and the constant tensors, which the caller must keep alive (`user_managed=True`: the
    packages hold pointers into them, so prefill and decode share one copy in memory)."""
    from torch._inductor import aoti_load_package

    import rqcompile.ops  # noqa: F401 - rq custom ops are extern calls inside the packages

    spec = artifact.manifest["program"]
    files, constants = spec["files"], spec.get("constants")
    runners = {name: aoti_load_package(str(artifact.file(files[name]))) for name in ("prefill", "decode")}
    if constants is None:  # packages that embed their own constants
        return runners["prefill"], runners["decode"], {}
    tensors = artifact.load_tensors(constants["file"], device=device)
    for name, runner in runners.items():
        mapping: dict[str, str] = constants[name]
        expected = set(runner.get_constant_fqns())
        if set(mapping) != expected or any(key not in tensors for key in mapping.values()):
            raise ArtifactError(
                f"{artifact.path}: the manifest's constants for {name} do not match what {files[name]} expects "
                f"({len(mapping)} listed, {len(expected)} expected); the artifact is inconsistent, re-export it"
            )
        runner.load_constants(
            {fqn: tensors[key] for fqn, key in mapping.items()}, check_full_update=True, user_managed=True
        )
    return runners["prefill"], runners["decode"], tensors


def _onnx_steps(artifact: Artifact, providers: Sequence[str] | None) -> tuple[Step, Step, str]:
    import onnxruntime as ort

    if providers is None:
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    files = artifact.manifest["program"]["files"]

    def session(relpath: str) -> Step:
        sess = ort.InferenceSession(str(artifact.file(relpath)), providers=list(providers))
        names = [i.name for i in sess.get_inputs()]

        def step(*tensors: torch.Tensor) -> list[torch.Tensor]:
            feeds = {n: t.detach().cpu().contiguous().numpy() for n, t in zip(names, tensors, strict=True)}
            return [torch.from_numpy(o) for o in sess.run(None, feeds)]

        return step

    return session(files["prefill"]), session(files["decode"]), ",".join(providers)


def load(path: str | Path, *, device: str | None = None, providers: Sequence[str] | None = None) -> LoadedLM:
    """Verify (sha256, versions) and load an exported LM artifact; AOTInductor or ONNX (onnxruntime: CUDA provider
    if available, else CPU; `providers` overrides). A TensorRT artifact runs its checked ONNX through onnxruntime.

    `device`: where an AOTInductor artifact runs (e.g. "cuda:1"); default: the device type it was compiled for,
    which is also the only one it can run on."""
    artifact = read_artifact(path)
    spec: dict[str, Any] | None = artifact.manifest.get("program")
    if not spec or spec.get("kind") != "functional-step-v1":
        raise ArtifactError(
            f"{artifact.path} holds no exported LM programs (target {artifact.target!r}); export one with "
            "`rqcompile export` or rqcompile.export.lm.export_lm"
        )
    if artifact.target == "aoti":
        built_for = spec.get("device", "cpu")  # artifacts written before the field existed were CPU-only
        device = device or built_for
        if torch.device(device).type != built_for:
            raise ArtifactError(
                f"{artifact.path}: its AOTInductor packages were compiled for {built_for!r} and cannot run on "
                f"{device!r}; load it with device={built_for!r}, or export the model again on {device!r}"
            )
        if built_for == "cuda" and not torch.cuda.is_available():
            raise ArtifactError(
                f"{artifact.path}: its AOTInductor packages were compiled for CUDA and this process sees no CUDA "
                "device; run it on a GPU machine, or export the model again on the CPU (or to ONNX)"
            )
        prefill, decode, constants = _aoti_steps(artifact, device)
        lm = LoadedLM(artifact, prefill, decode, device=device, backend="aoti")
        lm.constants = constants  # the packages point into these tensors
        return lm
    if artifact.target in ("onnx", "tensorrt"):
        prefill, decode, used = _onnx_steps(artifact, providers)
        return LoadedLM(artifact, prefill, decode, device="cpu", backend=f"onnxruntime[{used}]")
    raise ArtifactError(f"rqcompile.load cannot run target {artifact.target!r}")
