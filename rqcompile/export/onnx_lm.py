"""ONNX / TensorRT targets: the functional prefill and decode programs as two ONNX graphs in one artifact.

ONNX has no buffer mutation (the exporter silently drops it, DESIGN.md §4), so the graphs take the cache state as
explicit inputs after `input_ids` and `cache_position` and return it after `logits`, in the manifest's order. rq
custom ops go through `onnx_ops.translation_table(flavour)`; weights and quant state are initializers. Both graphs
read the same weights, so after export their initializers (>= `SHARE_MIN_BYTES`) are moved, once per distinct
content, into one external data file (`WEIGHTS_FILE`) that both graphs reference by offset: the artifact holds the
weights once instead of once per graph.

The ``tensorrt`` target writes the TensorRT-ready flavour (no bitwise ops, uint8 only at graph I/O), which
`export_onnx` widens and statically checks (`check_tensorrt`); the report is recorded in the manifest. After the
artifact is written, `build_engine` is called for the decode and prefill graphs: where TensorRT is missing (always,
here) it raises `TensorRTNotInstalledError`, and the artifact with the checked ONNX stays in place - `rqcompile.load`
runs it with onnxruntime, and `trtexec` builds the engine on a machine that has TensorRT.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from rqcompile.export.artifact import Artifact, write_artifact
from rqcompile.export.lm import FunctionalLM, program_manifest

PREFILL_FILE = "prefill.onnx"
DECODE_FILE = "decode.onnx"
WEIGHTS_FILE = "weights.onnx.data"
SHARE_MIN_BYTES = 1024  # smaller initializers (scalars, shapes) stay inside their graph
ALIGN = 4096  # page-aligned offsets: onnxruntime can map the file


def share_initializers(root: Path, graphs: list[str], data_file: str = WEIGHTS_FILE) -> None:
    """Rewrite the ONNX graphs in `root` so that their large initializers live once in `root / data_file`.

    Each initializer's bytes are written at most once (keyed by dtype, shape and content), at a page-aligned offset;
    every graph's initializer then points there (`data_location = EXTERNAL`). Any external data files the exporter
    wrote are removed afterwards.
    """
    import onnx
    from onnx import external_data_helper, numpy_helper

    models = {name: onnx.load(str(root / name)) for name in graphs}  # with their external data, if any
    before = {p for p in root.iterdir() if p.name not in graphs}
    written: dict[str, tuple[int, int]] = {}
    with open(root / data_file, "wb") as out:
        for model in models.values():
            for init in model.graph.initializer:
                if not init.HasField("raw_data"):
                    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init), init.name))
                raw = init.raw_data
                if len(raw) < SHARE_MIN_BYTES:
                    continue
                key = hashlib.sha256(f"{init.data_type}:{tuple(init.dims)}\n".encode() + raw).hexdigest()
                if key not in written:
                    out.write(b"\0" * (-out.tell() % ALIGN))
                    written[key] = (out.tell(), len(raw))
                    out.write(raw)
                offset, length = written[key]
                init.ClearField("external_data")
                external_data_helper.set_external_data(init, location=data_file, offset=offset, length=length)
                init.ClearField("raw_data")
                init.data_location = onnx.TensorProto.EXTERNAL
    for path in before:
        path.unlink()
    for name, model in models.items():
        onnx.save(model, str(root / name))


def _export_graph(ep, args, out: Path, flavour: str) -> tuple[list[str], list[str]]:
    """Export one program; returns the ONNX graph's input and output names."""
    import onnx

    from rqcompile.export.onnx_ops import export_onnx

    export_onnx(ep, args, out, flavour=flavour)
    model = onnx.load(str(out), load_external_data=False)
    return [i.name for i in model.graph.input], [o.name for o in model.graph.output]


def write_onnx(
    fn: FunctionalLM,
    path: str | Path,
    *,
    eos: list[int] | None = None,
    tokenizer_dir: str | Path | None = None,
    flavour: str = "standard",
    overwrite: bool = False,
    progress: bool | None = None,
    build_engines: bool = True,
) -> Artifact:
    """Write the ONNX (or TensorRT-ready ONNX) artifact; for flavour 'tensorrt' then build engines (see module doc)."""
    from tqdm.auto import tqdm

    io: dict[str, dict[str, list[str]]] = {}
    reports: dict[str, dict] = {}

    def build(staging: Path) -> None:
        steps = [
            ("prefill", fn.prefill, fn.example_inputs("prefill"), PREFILL_FILE),
            ("decode", fn.decode, fn.example_inputs("decode"), DECODE_FILE),
        ]
        bar = tqdm(steps, desc=f"ONNX ({flavour})", unit="graph", disable=None if progress is None else not progress)
        for name, ep, args, file in bar:
            bar.set_postfix_str(name)
            inputs, outputs = _export_graph(ep, args, staging / file, flavour)
            io[name] = {"inputs": inputs, "outputs": outputs}
            if flavour == "tensorrt":
                from rqcompile.export.tensorrt_check import check_tensorrt

                report = check_tensorrt(staging / file)
                reports[name] = {"ok": report.ok, "opset": report.opset, "op_types": sorted(report.op_types)}

    target = "tensorrt" if flavour == "tensorrt" else "onnx"
    files = {"prefill": PREFILL_FILE, "decode": DECODE_FILE, "weights": WEIGHTS_FILE}

    # the manifest's program section needs the graphs' I/O names, known only after `build`: stage in two steps
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp))
        staged = Path(tmp)
        share_initializers(staged, [PREFILL_FILE, DECODE_FILE])

        def copy(staging: Path) -> None:
            for item in staged.iterdir():
                item.rename(staging / item.name)

        extra = program_manifest(fn, files, eos, runtime="onnxruntime", onnx_io=io, onnx_flavour=flavour)
        if reports:
            extra["tensorrt"] = {"checked": reports, "engine": None}
        artifact = write_artifact(
            path,
            target=target,
            rq_config=fn.rq_config,
            model_config=fn.model_config,
            quant_states=fn.quant_states,
            tokenizer_dir=tokenizer_dir,
            build=copy,
            extra=extra,
            overwrite=overwrite,
        )
    if flavour == "tensorrt" and build_engines:
        build_tensorrt_engines(artifact)
    return artifact


def build_tensorrt_engines(artifact: Artifact) -> list[Path]:
    """Build `.engine` files next to the checked ONNX graphs (outside the artifact's hashed file list).

    Raises `TensorRTNotInstalledError` where TensorRT is missing; the artifact stays valid and loadable.
    """
    from rqcompile.export.tensorrt_check import TensorRTNotInstalledError, build_engine

    engines = []
    for file in (DECODE_FILE, PREFILL_FILE):
        try:
            engines.append(build_engine(artifact.file(file)))
        except TensorRTNotInstalledError as exc:
            raise TensorRTNotInstalledError(
                f"{exc}\nThe artifact {artifact.path} was written with the TensorRT-checked ONNX graphs "
                f"({PREFILL_FILE}, {DECODE_FILE}); `rqcompile.load` runs them with onnxruntime meanwhile."
            ) from exc
    return engines
