"""Is an ONNX graph buildable by TensorRT? A static check against the TensorRT ONNX parser's operator list.

TensorRT cannot be installed here (DESIGN.md §5), so the TensorRT-ready ONNX flavour is verified by walking the
graph: every node must be an operator the parser supports (list below), with a supported data type, in the default
domain, at an opset TensorRT parses; no bitwise ops; and uint8 only at graph inputs/outputs, touched only by Cast
(the parser doc: "UINT8 is only supported as network input or output tensor types"). `build_engine` then builds an
engine on a machine that has TensorRT, importing it lazily.

Operator data: onnx/onnx-tensorrt `docs/operators.md` for TensorRT 10.0 (commit 96e7811, 2024-06-17). "Supported
Types" there is the type of an operator's data input; the checker compares it with the node's first input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import onnx

SOURCE = "onnx/onnx-tensorrt docs/operators.md, TensorRT 10.0 (commit 96e7811)"
MIN_OPSET = 9
MAX_OPSET = 21
BITWISE_OPS = frozenset({"BitShift", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "BitwiseNot"})
_DEFAULT_DOMAINS = ("", "ai.onnx")

# Operator -> supported data types, as listed by the parser doc (every operator marked "Y").
_SUPPORTED_TYPES: dict[str, str] = {
    "Abs": "FP32 FP16 BF16 INT32 INT64",
    "Acos": "FP32 FP16 BF16",
    "Acosh": "FP32 FP16 BF16",
    "Add": "FP32 FP16 BF16 INT32 INT64",
    "And": "BOOL",
    "ArgMax": "FP32 FP16 BF16 INT32 INT64",
    "ArgMin": "FP32 FP16 BF16 INT32 INT64",
    "Asin": "FP32 FP16 BF16",
    "Asinh": "FP32 FP16 BF16",
    "Atan": "FP32 FP16 BF16",
    "Atanh": "FP32 FP16 BF16",
    "AveragePool": "FP32 FP16 BF16",
    "BatchNormalization": "FP32 FP16 BF16",
    "Cast": "FP32 FP16 BF16 INT32 INT64 UINT8 BOOL",
    "CastLike": "FP32 FP16 BF16 INT32 INT64 UINT8 BOOL",
    "Ceil": "FP32 FP16 BF16",
    "Celu": "FP32 FP16 BF16",
    "Clip": "FP32 FP16 BF16",
    "Concat": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Constant": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "ConstantOfShape": "FP32 FP16 BF16 INT32 INF64 BOOL",
    "Conv": "FP32 FP16 BF16",
    "ConvTranspose": "FP32 FP16 BF16",
    "Cos": "FP32 FP16 BF16",
    "Cosh": "FP32 FP16 BF16",
    "CumSum": "FP32 FP16 BF16",
    "DeformConv": "FP32 FP16",
    "DepthToSpace": "FP32 FP16 BF16 INT32 INT64",
    "DequantizeLinear": "INT8 FP8 INT4",
    "Div": "FP32 FP16 BF16 INT32 INT64",
    "Dropout": "FP32 FP16 BF16",
    "Einsum": "FP32 FP16 BF16",
    "Elu": "FP32 FP16 BF16",
    "Equal": "FP32 FP16 BF16 INT32 INT64",
    "Erf": "FP32 FP16 BF16",
    "Exp": "FP32 FP16 BF16",
    "Expand": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "EyeLike": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Flatten": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Floor": "FP32 FP16 BF16",
    "Gather": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "GatherElements": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "GatherND": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Gelu": "FP32 FP16 BF16 INT8 INT32 INT64",
    "Gemm": "FP32 FP16 BF16",
    "GlobalAveragePool": "FP32 FP16 BF16",
    "GlobalLpPool": "FP32 FP16 BF16",
    "GlobalMaxPool": "FP32 FP16 BF16",
    "Greater": "FP32 FP16 BF16 INT32 INT64",
    "GreaterOrEqual": "FP32 FP16 BF16 INT32 INT64",
    "GridSample": "FP32 FP16",
    "GroupNormalization": "FP32 FP16 BF16",
    "GRU": "FP32 FP16 BF16",
    "HardSigmoid": "FP32 FP16 BF16",
    "HardSwish": "FP32 FP16 BF16",
    "Hardmax": "FP32 FP16 BF16",
    "Identity": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "If": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "ImageScaler": "FP32 FP16 BF16",
    "InstanceNormalization": "FP32 FP16 BF16",
    "IsInf": "FP32 FP16 BF16",
    "IsNaN": "FP32 FP16 BF16 INT32 INT64",
    "LayerNormalization": "FP32 FP16 BF16",
    "LeakyRelu": "FP32 FP16 BF16",
    "Less": "FP32 FP16 BF16 INT32 INT64",
    "LessOrEqual": "FP32 FP16 BF16 INT32 INT64",
    "Log": "FP32 FP16 BF16",
    "LogSoftmax": "FP32 FP16 BF16",
    "Loop": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "LRN": "FP32 FP16 BF16",
    "LSTM": "FP32 FP16 BF16",
    "LpNormalization": "FP32 FP16 BF16",
    "LpPool": "FP32 FP16 BF16",
    "MatMul": "FP32 FP16 BF16",
    "Max": "FP32 FP16 BF16 INT32 INT64",
    "MaxPool": "FP32 FP16 BF16",
    "Mean": "FP32 FP16 BF16 FP8 INT32 INT64",
    "MeanVarianceNormalization": "FP32 FP16 BF16",
    "Min": "FP32 FP16 BF16 INT32 INT64",
    "Mish": "FP32 FP16",
    "Mod": "FP32 FP16 BF16 INT32 INT64",
    "Mul": "FP32 FP16 BF16 INT32 INT64",
    "Neg": "FP32 FP16 BF16 INT32 INT64",
    "NonMaxSuppression": "FP32 FP16",
    "NonZero": "FP32 FP16",
    "Not": "BOOL",
    "OneHot": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Or": "BOOL",
    "Pad": "FP32 FP16 BF16 INT32 INT64",
    "ParametricSoftplus": "FP32 FP16 BF16",
    "Pow": "FP32 FP16 BF16",
    "PRelu": "FP32 FP16 BF16",
    "QuantizeLinear": "FP32 FP16 BF16",
    "RandomNormal": "FP32 FP16 BF16",
    "RandomNormalLike": "FP32 FP16 BF16",
    "RandomUniform": "FP32 FP16 BF16",
    "RandomUniformLike": "FP32 FP16 BF16",
    "Range": "FP32 FP16 BF16 INT32 INT64",
    "Reciprocal": "FP32 FP16 BF16",
    "ReduceL1": "FP32 FP16 BF16 INT32 INT64",
    "ReduceL2": "FP32 FP16 BF16 INT32 INT64",
    "ReduceLogSum": "FP32 FP16 BF16 INT32 INT64",
    "ReduceLogSumExp": "FP32 FP16 BF16 INT32 INT64",
    "ReduceMax": "FP32 FP16 BF16 INT32 INT64",
    "ReduceMean": "FP32 FP16 BF16 INT32 INT64",
    "ReduceMin": "FP32 FP16 BF16 INT32 INT64",
    "ReduceProd": "FP32 FP16 BF16 INT32 INT64",
    "ReduceSum": "FP32 FP16 BF16 INT32 INT64",
    "ReduceSumSquare": "FP32 FP16 BF16 INT32 INT64",
    "Relu": "FP32 FP16 BF16 INT32 INT64",
    "Reshape": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Resize": "FP32 FP16 BF16",
    "ReverseSequence": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "RNN": "FP32 FP16 BF16",
    "RoiAlign": "FP32 FP16",
    "Round": "FP32 FP16 BF16",
    "ScaledTanh": "FP32 FP16 BF16",
    "Scan": "FP32 FP16 BF16",
    "Scatter": "FP32 FP16 BF16 INT32 INT64",
    "ScatterElements": "FP32 FP16 BF16 INT32 INT64",
    "ScatterND": "FP32 FP16 BF16 INT32 INT64",
    "Selu": "FP32 FP16 BF16",
    "Shape": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Shrink": "FP32 FP16 BF16 INT32 INT64",
    "Sigmoid": "FP32 FP16 BF16",
    "Sign": "FP32 FP16 BF16 INT32 INT64",
    "Sin": "FP32 FP16 BF16",
    "Sinh": "FP32 FP16 BF16",
    "Size": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Slice": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Softmax": "FP32 FP16 BF16",
    "Softplus": "FP32 FP16 BF16",
    "Softsign": "FP32 FP16 BF16",
    "SpaceToDepth": "FP32 FP16 BF16 INT32 INT64",
    "Split": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Sqrt": "FP32 FP16 BF16",
    "Squeeze": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Sub": "FP32 FP16 BF16 INT32 INT64",
    "Sum": "FP32 FP16 BF16 INT32 INT64",
    "Tan": "FP32 FP16 BF16",
    "Tanh": "FP32 FP16 BF16",
    "ThresholdedRelu": "FP32 FP16 BF16",
    "Tile": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "TopK": "FP32 FP16 BF16 INT32 INT64",
    "Transpose": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Trilu": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Unsqueeze": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Upsample": "FP32 FP16 BF16",
    "Where": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Xor": "BOOL",
}
# Operators the parser doc marks "N".
UNSUPPORTED_OPS = frozenset(
    {
        "AffineGrid",
        "Bernoulli",
        "BitShift",
        "BitwiseAnd",
        "BitwiseNot",
        "BitwiseOr",
        "BitwiseXor",
        "BlackmanWindow",
        "Col2Im",
        "CenterCropPad",
        "Compress",
        "ConcatFromSequence",
        "ConvInteger",
        "DFT",
        "Det",
        "DynamicQuantizeLinear",
        "HammingWindow",
        "HannWindow",
        "ImageDecoder",
        "MatMulInteger",
        "MaxRoiPool",
        "MaxUnpool",
        "MelWeightMatrix",
        "Multinomial",
        "NegativeLogLikelihoodLoss",
        "Optional",
        "OptionalGetElement",
        "OptionalHasElement",
        "QLinearConv",
        "QLinearMatMul",
        "RegexFullMatch",
        "STFT",
        "SequenceAt",
        "SequenceConstruct",
        "SequenceEmpty",
        "SequenceErase",
        "SequenceInsert",
        "SequenceLength",
        "SequenceMap",
        "SoftmaxCrossEntropyLoss",
        "SplitToSequence",
        "StringConcat",
        "StringNormalizer",
        "StringSplit",
        "TfIdfVectorizer",
        "Unique",
    }
)
SUPPORTED_OPS: dict[str, frozenset[str]] = {name: frozenset(types.split()) for name, types in _SUPPORTED_TYPES.items()}

_TYPE_NAMES = {
    onnx.TensorProto.FLOAT: "FP32",
    onnx.TensorProto.FLOAT16: "FP16",
    onnx.TensorProto.BFLOAT16: "BF16",
    onnx.TensorProto.DOUBLE: "DOUBLE",
    onnx.TensorProto.INT32: "INT32",
    onnx.TensorProto.INT64: "INT64",
    onnx.TensorProto.INT8: "INT8",
    onnx.TensorProto.UINT8: "UINT8",
    onnx.TensorProto.BOOL: "BOOL",
    onnx.TensorProto.INT16: "INT16",
    onnx.TensorProto.UINT16: "UINT16",
    onnx.TensorProto.UINT32: "UINT32",
    onnx.TensorProto.UINT64: "UINT64",
    onnx.TensorProto.STRING: "STRING",
}


@dataclass(frozen=True)
class Offence:
    """One reason a node (or the model) would not build in TensorRT."""

    node: str
    op_type: str
    reason: str

    def __str__(self) -> str:
        return f"{self.node} ({self.op_type}): {self.reason}"


@dataclass
class TensorRTReport:
    """Result of `check_tensorrt`: the model's opset, the op types seen, and every offence found."""

    opset: int | None
    op_types: set[str] = field(default_factory=set)
    offences: list[Offence] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.offences

    def offending_nodes(self) -> list[str]:
        return sorted({o.node for o in self.offences})

    def format(self, limit: int = 20) -> str:
        if self.ok:
            return f"TensorRT-ready: opset {self.opset}, {len(self.op_types)} op types, no offences ({SOURCE})"
        lines = [f"{len(self.offences)} TensorRT incompatibilities (checked against {SOURCE}):"]
        lines += [f"  - {o}" for o in self.offences[:limit]]
        if len(self.offences) > limit:
            lines.append(f"  ... and {len(self.offences) - limit} more")
        return "\n".join(lines)


class TensorRTCompatibilityError(ValueError):
    """The ONNX graph uses something the TensorRT ONNX parser cannot build; `.report` lists every offence."""

    def __init__(self, report: TensorRTReport, where: str = "ONNX model") -> None:
        super().__init__(f"{where} is not TensorRT-ready.\n{report.format()}")
        self.report = report


class TensorRTNotInstalledError(RuntimeError):
    """TensorRT is missing; the message says where the ONNX file is and how to build it elsewhere."""


def _load(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    return onnx.load(str(model), load_external_data=False)  # types and graph only; weights are not needed


def _value_types(graph: onnx.GraphProto) -> dict[str, int]:
    types: dict[str, int] = {}
    for info in [*graph.input, *graph.output, *graph.value_info]:
        if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
            types[info.name] = info.type.tensor_type.elem_type
    for init in graph.initializer:
        types[init.name] = init.data_type
    return types


def _walk(graph: onnx.GraphProto, prefix: str = ""):
    """Every node, including those inside If/Loop/Scan bodies, with a readable path for names."""
    for index, node in enumerate(graph.node):
        name = prefix + (node.name or f"{node.op_type}_{index}")
        yield name, node, graph
        for attr in node.attribute:
            subgraphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subgraphs:
                yield from _walk(sub, f"{name}/{attr.name}/")


def check_tensorrt(
    model: onnx.ModelProto | str | Path, *, min_opset: int = MIN_OPSET, max_opset: int = MAX_OPSET
) -> TensorRTReport:
    """Walk the model and list everything the TensorRT ONNX parser would reject (never raises on offences)."""
    proto = _load(model)
    try:
        proto = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # noqa: BLE001 - inference is a best effort; missing types only skip the type check
        pass
    opsets = {imp.domain: imp.version for imp in proto.opset_import}
    opset = opsets.get("", opsets.get("ai.onnx"))
    report = TensorRTReport(opset=opset)
    if opset is None or not min_opset <= opset <= max_opset:
        report.offences.append(
            Offence("<model>", "-", f"default-domain opset {opset} outside [{min_opset}, {max_opset}]")
        )
    for domain in sorted(set(opsets) - set(_DEFAULT_DOMAINS)):
        report.offences.append(Offence("<model>", "-", f"imports custom domain {domain!r}"))
    for function in proto.functions:
        report.offences.append(Offence(f"<function {function.name}>", "-", "model-local function (custom domain)"))

    top = proto.graph
    types = _value_types(top)
    io_names = {v.name for v in [*top.input, *top.output]}
    for name, node, graph in _walk(top):
        report.op_types.add(node.op_type)
        if graph is not top:
            types.update(_value_types(graph))
        for reason in _node_offences(node, types, io_names):
            report.offences.append(Offence(name, node.op_type, reason))
    for init in top.initializer:
        if init.data_type == onnx.TensorProto.UINT8:
            report.offences.append(
                Offence(init.name, "initializer", "uint8 initializer (uint8 is allowed only at I/O)")
            )
    return report


def _node_offences(node: onnx.NodeProto, types: dict[str, int], io_names: set[str]) -> list[str]:
    reasons = []
    if node.domain not in _DEFAULT_DOMAINS:
        reasons.append(f"custom domain {node.domain!r}")
        return reasons
    op_type = node.op_type
    if op_type in BITWISE_OPS:
        reasons.append("bitwise op (TensorRT has none; use the 'tensorrt' flavour: Div/Mod/Gather unpacking)")
    elif op_type in UNSUPPORTED_OPS:
        reasons.append("marked unsupported by the TensorRT ONNX parser")
    elif op_type not in SUPPORTED_OPS:
        reasons.append("not in the TensorRT ONNX parser's operator list")
    elif node.input and node.input[0] in types:
        kind = _TYPE_NAMES.get(types[node.input[0]], str(types[node.input[0]]))
        if kind not in SUPPORTED_OPS[op_type]:
            reasons.append(f"input type {kind} not supported (supported: {', '.join(sorted(SUPPORTED_OPS[op_type]))})")
    uint8_in = [n for n in node.input if n and types.get(n) == onnx.TensorProto.UINT8]
    uint8_out = [n for n in node.output if n and types.get(n) == onnx.TensorProto.UINT8]
    if (uint8_in or uint8_out) and op_type != "Cast":
        reasons.append(f"touches uint8 tensors {uint8_in + uint8_out} (only Cast may, at graph inputs/outputs)")
    for value in uint8_in + uint8_out:
        if value not in io_names:
            reasons.append(f"uint8 tensor {value!r} is neither a graph input nor a graph output")
    return reasons


def assert_tensorrt_ready(model: onnx.ModelProto | str | Path, **limits: int) -> TensorRTReport:
    """`check_tensorrt`, raising `TensorRTCompatibilityError` naming the offending nodes."""
    report = check_tensorrt(model, **limits)
    if not report.ok:
        where = str(model) if isinstance(model, (str, Path)) else "ONNX model"
        raise TensorRTCompatibilityError(report, where)
    return report


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path | None = None,
    *,
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] | None = None,
    fp16: bool = False,
    workspace_bytes: int | None = None,
) -> Path:
    """Build a serialized TensorRT engine from a TensorRT-ready ONNX file.

    `shapes` maps each dynamic input to its (min, opt, max) shapes for the optimization profile. TensorRT is imported
    here, not at module import, because it is absent on most machines (DESIGN.md §4-5).
    """
    onnx_path = Path(onnx_path)
    assert_tensorrt_ready(onnx_path)
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTNotInstalledError(
            "TensorRT is not installed, and it cannot be installed from PyPI here: the tensorrt-cu1x-libs packages "
            "are stubs that download the libraries from NVIDIA's own package index, which is unreachable. "
            f"The TensorRT-ready ONNX was written to {onnx_path} (it passed the static TensorRT check); build it on a "
            f"machine with TensorRT with:  trtexec --onnx={onnx_path} --saveEngine={onnx_path.with_suffix('.engine')}"
        ) from exc

    engine_path = Path(engine_path) if engine_path is not None else onnx_path.with_suffix(".engine")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTCompatibilityError(TensorRTReport(opset=None), f"{onnx_path} (TensorRT parser: {errors})")
    config = builder.create_builder_config()
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if shapes:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shapes.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}; see the log above")
    engine_path.write_bytes(bytes(serialized))
    return engine_path
