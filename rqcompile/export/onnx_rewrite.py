"""Graph rewrites applied to an exported ONNX model before it is handed to TensorRT.

`widen_uint8`: TensorRT accepts UINT8 only as network input/output. A whole-LM export moves packed codes through
cache writes (ScatterND from `index_copy`), slices and concats in uint8, which the TensorRT-ready rq translations
alone cannot prevent. Every byte value fits int32 exactly, so the graph can carry them as int32 in between: cast
uint8 inputs to int32 first thing, turn internal casts/constants to uint8 into int32, and cast back to uint8 only
right before a graph output. The numbers computed are unchanged.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper, numpy_helper

_SUFFIX = "__i32"


def _uint8_names(graph: onnx.GraphProto) -> set[str]:
    return {
        v.name
        for v in [*graph.input, *graph.output, *graph.value_info]
        if v.type.tensor_type.elem_type == TensorProto.UINT8
    }


def widen_uint8(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy of `model` whose uint8 tensors exist only at graph inputs/outputs (as int32 in between)."""
    model = onnx.shape_inference.infer_shapes(model)
    graph = model.graph
    renames: dict[str, str] = {}
    head: list[onnx.NodeProto] = []
    for value in graph.input:
        if value.type.tensor_type.elem_type == TensorProto.UINT8:
            renames[value.name] = value.name + _SUFFIX
            head.append(helper.make_node("Cast", [value.name], [value.name + _SUFFIX], to=TensorProto.INT32))
    for init in graph.initializer:
        if init.data_type == TensorProto.UINT8:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype("int32"), init.name))
    for node in graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.UINT8:
                attr.i = TensorProto.INT32
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.UINT8:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype("int32"), attr.t.name))
    # Outputs that were uint8 are now produced as int32: rename the producer's output and cast back at the edge.
    tail = []
    for value in graph.output:
        if value.type.tensor_type.elem_type != TensorProto.UINT8 or value.name in renames:
            continue
        wide = value.name + _SUFFIX
        for node in graph.node:
            node.output[:] = [wide if name == value.name else name for name in node.output]
            node.input[:] = [wide if name == value.name else name for name in node.input]
        tail.append(helper.make_node("Cast", [wide], [value.name], to=TensorProto.UINT8))
    nodes = head + list(graph.node) + tail
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]  # stale types; re-inferred below
    model = onnx.shape_inference.infer_shapes(model)
    stray = _uint8_names(model.graph) - {v.name for v in [*model.graph.input, *model.graph.output]}
    if stray:
        raise ValueError(f"widen_uint8 left uint8 tensors inside the graph: {sorted(stray)}")
    return model
