"""AOTInductor target: the functional prefill and decode programs as two `.pt2` packages in one artifact.

Each package holds its own copy of the weights and quant state (constants); the cache state is passed in and out
(see `rqcompile.export.lm`). rq custom ops become extern calls, so the loader imports `rqcompile.ops` before
`aoti_load_package` (DESIGN.md §4). A package loads only under the torch major.minor that built it (artifact rules).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rqcompile.export.artifact import Artifact, write_artifact
from rqcompile.export.lm import FunctionalLM, program_manifest

PREFILL_FILE = "prefill.pt2"
DECODE_FILE = "decode.pt2"


def compile_package(ep, package_path: Path, inductor_configs: dict[str, Any] | None = None) -> Path:
    """`torch._inductor.aoti_compile_and_package` of one ExportedProgram into `package_path`."""
    from torch._inductor import aoti_compile_and_package

    import rqcompile.ops  # noqa: F401 - custom ops registered before lowering

    return Path(aoti_compile_and_package(ep, package_path=str(package_path), inductor_configs=inductor_configs))


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
    """Compile both programs into packages inside the staging directory and write the artifact atomically."""
    from tqdm.auto import tqdm

    def build(staging: Path) -> None:
        steps = [("prefill", fn.prefill, PREFILL_FILE), ("decode", fn.decode, DECODE_FILE)]
        bar = tqdm(steps, desc="AOTInductor", unit="program", disable=None if progress is None else not progress)
        for name, ep, file in bar:
            bar.set_postfix_str(name)
            compile_package(ep, staging / file, inductor_configs)

    extra = program_manifest(fn, {"prefill": PREFILL_FILE, "decode": DECODE_FILE}, eos, runtime="aoti")
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
