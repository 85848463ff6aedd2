"""The TensorRT-readiness checker: the TensorRT flavour passes, the standard flavour and hand-made bad graphs fail.

TensorRT itself is not installable here, so this static check is what stands between an export and a failed
`trtexec` on the deployment machine; each rule is exercised by a graph that breaks it.
"""

from __future__ import annotations

import importlib.util
import warnings

import onnx
import pytest
import torch
from onnx import TensorProto, helper

pytest.importorskip("onnxscript")

from rqcompile import ops  # noqa: E402,F401
from rqcompile.config import RQConfig  # noqa: E402
from rqcompile.export.onnx_ops import export_onnx  # noqa: E402
from rqcompile.export.tensorrt_check import (  # noqa: E402
    BITWISE_OPS,
    SUPPORTED_OPS,
    UNSUPPORTED_OPS,
    TensorRTCompatibilityError,
    TensorRTNotInstalledError,
    assert_tensorrt_ready,
    build_engine,
    check_tensorrt,
)
from rqcompile.quant.quantizer import make_state  # noqa: E402


class CacheStep(torch.nn.Module):
    """Quantize new K/V into packed codes and attend over them: every rq op in one graph."""

    def __init__(self) -> None:
        super().__init__()
        config = RQConfig(backend="rotor", bits=3)
        self.k = make_state(config, layer_idx=0, kind="k", num_heads=2, head_dim=64)
        self.v = make_state(config, layer_idx=0, kind="v", num_heads=2, head_dim=64)
        for prefix, state in (("k_", self.k), ("v_", self.v)):
            for name, tensor in state.tensors().items():
                self.register_buffer(prefix + name, tensor)

    def forward(self, q, keys, values, mask):
        k_codes, k_norms = torch.ops.rq.quantize(keys, self.k_rotation, self.k_mean, self.k_scale, self.k_levels, 3, 64)
        v_codes, v_norms = torch.ops.rq.quantize(
            values, self.v_rotation, self.v_mean, self.v_scale, self.v_levels, 3, 64
        )
        recon = torch.ops.rq.dequantize(
            v_codes, v_norms, self.v_rotation, self.v_mean, self.v_scale, self.v_levels, 3, 64, torch.float32
        )
        out = torch.ops.rq.attention(
            q,
            k_codes,
            k_norms,
            v_codes,
            v_norms,
            self.k_rotation,
            self.k_scale,
            self.k_levels,
            self.v_rotation,
            self.v_mean,
            self.v_scale,
            self.v_levels,
            3,
            3,
            mask,
            0.125,
        )
        return out, recon, k_codes, k_norms, v_codes, v_norms  # codes leave the graph as uint8 outputs


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("trt")
    args = (torch.randn(2, 4, 3, 64), torch.randn(2, 2, 3, 64), torch.randn(2, 2, 3, 64), torch.ones(2, 1, 3, 3) > 0)
    paths = {}
    for flavour in ("standard", "tensorrt"):
        path = root / f"{flavour}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # export_onnx itself runs the checker on the tensorrt flavour and would raise here.
            export_onnx(CacheStep().eval(), args, path, flavour=flavour)
        paths[flavour] = str(path)
    return paths


class CacheWrite(torch.nn.Module):
    """The cache write of a whole-LM export: quantized codes index_copy'd into a uint8 cache passed in and out."""

    def __init__(self) -> None:
        super().__init__()
        state = make_state(RQConfig(bits=3), layer_idx=0, kind="k", num_heads=2, head_dim=64)
        for name, tensor in state.tensors().items():
            self.register_buffer(name, tensor)

    def forward(self, cache_codes, cache_norms, x, position):
        codes, norms = torch.ops.rq.quantize(x, self.rotation, self.mean, self.scale, self.levels, 3, 64)
        cache_codes = cache_codes.index_copy(2, position, codes)
        cache_norms = cache_norms.index_copy(2, position, norms)
        keys = torch.ops.rq.dequantize(
            cache_codes, cache_norms, self.rotation, self.mean, self.scale, self.levels, 3, 64, torch.float32
        )
        return cache_codes, cache_norms, keys


def test_uint8_cache_writes_are_widened_to_int32_for_tensorrt(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from rqcompile.export.onnx_ops import translation_table
    from rqcompile.export.onnx_rewrite import widen_uint8

    cache = torch.zeros(1, 2, 8, 24, dtype=torch.uint8), torch.zeros(1, 2, 8, 1, dtype=torch.float16)
    args = (*cache, torch.randn(1, 2, 2, 64), torch.tensor([3, 4]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            CacheWrite().eval(),
            args,
            dynamo=True,
            opset_version=18,
            custom_translation_table=translation_table("tensorrt"),
        )
    raw = program.model_proto
    assert not check_tensorrt(raw).ok  # ScatterND / Transpose on uint8 inside the graph
    widened = widen_uint8(raw)
    assert check_tensorrt(widened).ok
    assert [i.type.tensor_type.elem_type for i in widened.graph.input] == [
        i.type.tensor_type.elem_type for i in raw.graph.input
    ]
    feeds = {i.name: a.numpy() for i, a in zip(raw.graph.input, args)}
    before = ort.InferenceSession(raw.SerializeToString()).run(None, feeds)
    after = ort.InferenceSession(widened.SerializeToString()).run(None, feeds)
    for a, b in zip(before, after):
        assert a.dtype == b.dtype and (a == b).all()
    assert check_tensorrt(export_onnx(CacheWrite().eval(), args, tmp_path / "w.onnx", flavour="tensorrt")).ok


def _model(nodes, inputs, outputs, opset=18, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _float(name, shape=(2, 4)):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def test_operator_list_is_the_parser_doc():
    assert len(SUPPORTED_OPS) > 140 and not set(SUPPORTED_OPS) & UNSUPPORTED_OPS
    for name in ("MatMul", "Softmax", "Gather", "Mod", "Div", "Cast", "Where", "IsNaN", "ScatterND"):
        assert name in SUPPORTED_OPS
    assert BITWISE_OPS <= UNSUPPORTED_OPS
    assert "UINT8" in SUPPORTED_OPS["Cast"] and "UINT8" not in SUPPORTED_OPS["Gather"]


def test_tensorrt_flavour_passes(exported):
    report = assert_tensorrt_ready(exported["tensorrt"])
    assert report.ok and report.opset == 18
    assert not report.op_types & BITWISE_OPS
    assert {"Div", "Mod", "Gather", "Cast"} <= report.op_types


def test_standard_flavour_fails_on_bitwise_ops_and_uint8(exported):
    report = check_tensorrt(exported["standard"])
    assert not report.ok
    flagged_ops = {o.op_type for o in report.offences}
    assert flagged_ops & BITWISE_OPS, report.format()
    assert any("uint8" in o.reason for o in report.offences)
    with pytest.raises(TensorRTCompatibilityError, match="BitShift|BitwiseAnd") as info:
        assert_tensorrt_ready(exported["standard"])
    first = info.value.report.offences[0]
    assert f"{first.node} ({first.op_type})" in str(info.value)  # the message names the offending nodes


def test_unsupported_and_unknown_ops_are_named():
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="fine_relu"),
        helper.make_node("Unique", ["a"], ["b"], name="my_unique"),
        helper.make_node("NotAnOnnxOp", ["b"], ["y"], name="mystery"),
    ]
    report = check_tensorrt(_model(nodes, [_float("x")], [_float("y")]))
    assert report.offending_nodes() == ["my_unique", "mystery"]
    with pytest.raises(TensorRTCompatibilityError, match="my_unique.*Unique.*unsupported"):
        assert_tensorrt_ready(_model(nodes, [_float("x")], [_float("y")]))


def test_custom_domain_and_opset_rules():
    node = helper.make_node("Quantize", ["x"], ["y"], name="custom", domain="rq")
    graph = helper.make_graph([node], "g", [_float("x")], [_float("y")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("rq", 1)])
    reasons = [o.reason for o in check_tensorrt(model).offences]
    assert any("custom domain 'rq'" in r for r in reasons)

    relu = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    assert check_tensorrt(_model(relu, [_float("x")], [_float("y")], opset=21)).ok
    too_new = check_tensorrt(_model(relu, [_float("x")], [_float("y")], opset=22))
    assert not too_new.ok and "opset 22" in too_new.format()


def test_uint8_only_at_graph_io_through_cast():
    u8 = lambda name: helper.make_tensor_value_info(name, TensorProto.UINT8, (2, 4))  # noqa: E731
    ok = _model(
        [
            helper.make_node("Cast", ["codes"], ["c32"], to=TensorProto.INT32, name="in_cast"),
            helper.make_node("Cast", ["c32"], ["out"], to=TensorProto.UINT8, name="out_cast"),
        ],
        [u8("codes")],
        [u8("out")],
    )
    assert check_tensorrt(ok).ok
    intermediate = _model(
        [
            helper.make_node("Cast", ["x"], ["tmp"], to=TensorProto.UINT8, name="to_u8"),
            helper.make_node("Cast", ["tmp"], ["y"], to=TensorProto.FLOAT, name="from_u8"),
        ],
        [_float("x")],
        [_float("y")],
    )
    report = check_tensorrt(intermediate)
    assert {"to_u8", "from_u8"} <= set(report.offending_nodes())
    assert "neither a graph input nor a graph output" in report.format()
    sliced = _model([helper.make_node("Identity", ["codes"], ["out"], name="u8_identity")], [u8("codes")], [u8("out")])
    assert check_tensorrt(sliced).offending_nodes() == ["u8_identity"]


def test_type_restrictions_are_checked():
    u8_matmul = _model(
        [helper.make_node("MatMul", ["a", "b"], ["y"], name="int_matmul")],
        [helper.make_tensor_value_info(n, TensorProto.INT32, (2, 2)) for n in "ab"],
        [helper.make_tensor_value_info("y", TensorProto.INT32, (2, 2))],
    )
    report = check_tensorrt(u8_matmul)
    assert report.offending_nodes() == ["int_matmul"] and "INT32 not supported" in report.format()


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
def test_build_engine_without_tensorrt_says_what_to_do(exported):
    with pytest.raises(TensorRTNotInstalledError) as info:
        build_engine(exported["tensorrt"])
    message = str(info.value)
    assert "TensorRT is not installed" in message and "PyPI" in message
    assert f"trtexec --onnx={exported['tensorrt']}" in message


def test_build_engine_checks_the_graph_before_importing_tensorrt(exported):
    with pytest.raises(TensorRTCompatibilityError):
        build_engine(exported["standard"])


def test_checker_reads_models_without_their_weights(tmp_path):
    model = _model([helper.make_node("Relu", ["x"], ["y"], name="r")], [_float("x")], [_float("y")])
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    assert check_tensorrt(path).ok and check_tensorrt(str(path)).ok
