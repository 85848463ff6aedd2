"""AOTInductor target: the functional prefill and decode programs as two `.pt2` packages plus one weights file.

Both programs read the same weights and quant state. Left inside the packages (Inductor's default), every
constant would be compiled into each package's shared library: two fp32 copies of the model per artifact. So the
packages are compiled with ``aot_inductor.package_constants_in_so=False`` (code only) and the constants are written
once, deduplicated by content, to ``weights.safetensors``. The manifest maps each program's constant names (the
FQNs AOTInductor asks for) to tensors in that file; the loader hands the same tensors to both packages with
`load_constants(..., user_managed=True)`, so the weights are held once on disk and once in memory.

The cache state is passed in and out (see `rqcompile.export.lm`). rq custom ops become extern calls, so the loader
imports `rqcompile.ops` before `aoti_load_package` (DESIGN.md §4). A package loads only under the torch
major.minor that built it (artifact rules).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from rqcompile.export.artifact import Artifact, ArtifactError, write_artifact
from rqcompile.export.lm import FunctionalLM, program_manifest

PREFILL_FILE = "prefill.pt2"
DECODE_FILE = "decode.pt2"
WEIGHTS_FILE = "weights.safetensors"
# Constants stay out of the packages (written once to WEIGHTS_FILE); these override any caller-provided value.
EXTERNAL_CONSTANTS = {
    "aot_inductor.package_constants_in_so": False,
    "aot_inductor.package_constants_on_disk_format": None,
}

ConstantMap = dict[str, str]  # a program's constant FQN -> key in WEIGHTS_FILE


def compile_package(ep, package_path: Path, inductor_configs: dict[str, Any] | None = None) -> Path:
    """`torch._inductor.aoti_compile_and_package` of one ExportedProgram into `package_path`, code only."""
    from torch._inductor import aoti_compile_and_package

    import rqcompile.ops  # noqa: F401 - custom ops registered before lowering

    configs = {**(inductor_configs or {}), **EXTERNAL_CONSTANTS}
    return Path(aoti_compile_and_package(ep, package_path=str(package_path), inductor_configs=configs))


def package_constant_names(package_path: Path) -> list[str]:
    """The constant FQNs a compiled package expects through `load_constants` (asks the package itself)."""
    from torch._inductor import aoti_load_package

    return list(aoti_load_package(str(package_path)).get_constant_fqns())


def _content_key(tensor: torch.Tensor) -> str:
    """Digest of dtype, shape and bytes: equal tensors (tied embeddings, both programs' weights) share one entry."""
    flat = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{flat.dtype}:{tuple(flat.shape)}\n".encode())
    digest.update(flat.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _own_storage(tensor: torch.Tensor, kept: Iterable[torch.Tensor]) -> torch.Tensor:
    """`tensor`, or a copy where it is a view or shares storage with a kept tensor (safetensors refuses both)."""
    ptr = tensor.untyped_storage().data_ptr()
    whole = tensor.storage_offset() == 0 and tensor.untyped_storage().nbytes() == tensor.nbytes
    shared = any(t.untyped_storage().data_ptr() == ptr for t in kept)
    return tensor if whole and not shared else tensor.clone()


def collect_constants(
    ep: torch.export.ExportedProgram, names: list[str], store: dict[str, torch.Tensor], seen: dict[str, str]
) -> ConstantMap:
    """Add the constants `names` of one program to `store` (key -> tensor), once per distinct content.

    `seen` maps content digests to keys across programs. A key is the first FQN that held the content; a later FQN
    with other content under an existing key gets the key `"<n>:<fqn>"`.
    """
    values = {**ep.state_dict, **ep.constants}
    missing = [n for n in names if n not in values]
    if missing:
        raise ArtifactError(f"AOTInductor asks for constants the exported program does not hold: {missing[:5]}")
    mapping = {}
    for name in names:
        tensor = values[name].detach()
        digest = _content_key(tensor)
        if digest not in seen:
            key = name if name not in store else f"{len(store)}:{name}"
            store[key] = _own_storage(tensor.cpu().contiguous(), store.values())
            seen[digest] = key
        mapping[name] = seen[digest]
    return mapping


def write_aoti(
    fn: FunctionalLM,
    path: str | Path,
    *,
    eos: list[int] | None = None,
    tokenizer_dir: str | Path | None = None,
    inductor_configs: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> Artifact:
    """Compile both programs into code-only packages, write their constants once, and the artifact atomically."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    files = {"prefill": PREFILL_FILE, "decode": DECODE_FILE, "weights": WEIGHTS_FILE}
    extra = program_manifest(fn, files, eos, runtime="aoti")
    constants: dict[str, Any] = {"file": WEIGHTS_FILE}
    extra["program"]["constants"] = constants  # filled by build() before the manifest is written

    def build(staging: Path) -> None:
        store: dict[str, torch.Tensor] = {}
        seen: dict[str, str] = {}
        steps = [("prefill", fn.prefill, PREFILL_FILE), ("decode", fn.decode, DECODE_FILE)]
        bar = tqdm(steps, desc="AOTInductor", unit="program", disable=None if progress is None else not progress)
        for name, ep, file in bar:
            bar.set_postfix_str(name)
            package = compile_package(ep, staging / file, inductor_configs)
            constants[name] = collect_constants(ep, package_constant_names(package), store, seen)
        save_file(store, str(staging / WEIGHTS_FILE), metadata={"format": "rqcompile-aoti-constants-v1"})

    return write_artifact(
        path,
        target="aoti",
        rq_config=fn.rq_config,
        model_config=fn.model_config,
        quant_states=fn.quant_states,
        tokenizer_dir=tokenizer_dir,
        build=build,
        extra=extra,
        overwrite=overwrite,
    )
