"""Split a rewritten program into one submodule per decoder layer, named so that equal layers compile once.

Why: Inductor's compile time grows with the graph, and the whole 64-layer Qwen3.5-27B decode program takes longer to
compile than one device call may run (BENCHMARKS.md). Decoder layers of one kind run the same computation on their
own weights and cache buffers; as separate submodules whose attributes have layer-independent names, the Dynamo
graphs of equal layers are identical, so Inductor's FX graph cache serves every layer after the first of its kind
("regional compilation", as torch.compiler's recipes call it for nn.Modules; here for an exported flat graph).

`split_by_layer(gm) -> GraphModule`: the top-level graph calls `submod_0` (embedding, position and mask work shared
by the layers), `submod_{i + 1}` for decoder layer i, and a last submodule (final norm, LM head); each submodule's
parameters and buffers are renamed `a0, a1, ...` in the order the submodule reads them. The tensors are shared with
`gm`, not copied, so cache buffers written by the submodules are the program's own.
"""

from __future__ import annotations

import copy
import operator
import re

import torch
from torch import fx
from torch.fx.passes.split_module import split_module

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def split_by_layer(gm: fx.GraphModule) -> fx.GraphModule:
    """One submodule per decoder layer (plus one before and one after), in program order; see the module docstring.

    Raises ValueError when the graph records no decoder layer (`nn_module_stack` names no `layers.<i>` module)."""
    parts = _partition(gm.graph)
    layers = {p for p in parts.values() if p not in (_PRE, _POST)}
    if not layers:
        raise ValueError("split_by_layer: no node of the program belongs to a decoder layer (`layers.<i>` module)")
    post = max(layers) + 2  # submod_0: before the layers; submod_{i + 1}: layer i
    index = {n: post if p == _POST else p + 1 for n, p in parts.items()}
    split = split_module(gm, gm, lambda node: index[node], keep_original_order=True)
    for call in [n for n in split.graph.nodes if n.op == "call_module"]:
        _own_attributes(split, call)
    for node in [n for n in split.graph.nodes if n.op == "get_attr" and not n.users]:
        split.graph.erase_node(node)
    split.graph._codegen = copy.deepcopy(gm.graph._codegen)  # an exported program's (un)flattening of its in/outputs
    split.recompile()
    return split


_PRE, _POST = -1, -2


def _own_layer(node: fx.Node) -> int | None:
    """The decoder layer the node was traced in, from export's module stack; None for nodes outside any layer."""
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        found = _LAYER.search(path)
        if found:
            return int(found.group(1))
    return None


def _in_named_module(node: fx.Node) -> bool:
    """Traced inside a module other than the root (e.g. the final norm or the LM head)."""
    return any(path for path, _ in (node.meta.get("nn_module_stack") or {}).values())


def _partition(graph: fx.Graph) -> dict[fx.Node, int]:
    """Node -> layer index, _PRE or _POST, for every node but placeholders, get_attrs and the output.

    Nodes traced inside a layer belong to it. The others (transformers' functional code records no module, our
    rewrite's nodes neither) go where their data flow puts them: after the last layer they depend on, into the one
    layer that uses them when there is one (so every layer computes its own inputs and equal layers stay equal),
    else before all layers (shared work such as the mask), or after them (final norm, LM head)."""
    lower: dict[fx.Node, int] = {}  # the last layer each node depends on (_PRE: none)
    for node in graph.nodes:
        deps = [lower[i] for i in node.all_input_nodes if i in lower]
        lower[node] = max([_PRE, *deps]) if node.op not in ("placeholder", "get_attr") else _PRE
        own = _own_layer(node)
        if own is not None:
            lower[node] = max(lower[node], own)
    parts: dict[fx.Node, int] = {}
    for node in reversed(graph.nodes):
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        own = _own_layer(node)
        users = {parts[u] for u in node.users if u in parts}
        to_output = any(u.op == "output" for u in node.users)
        if own is not None:
            parts[node] = own
        elif _in_named_module(node):  # the embedding and rotary tables before the layers, the norm and head after
            parts[node] = _POST if lower[node] >= 0 else _PRE
        elif lower[node] >= 0:  # after a layer: inside it (functional code) or feeding only what follows the layers
            parts[node] = _POST if to_output or users == {_POST} else lower[node]
        else:  # depends on no layer: computed by the one layer that needs it, else shared up front
            single = users - {_PRE}
            parts[node] = single.pop() if len(single) == 1 and _PRE not in users and not to_output else _PRE
    return parts


def _own_attributes(split: fx.GraphModule, call: fx.Node) -> None:
    """Make the submodule `call` runs read the tensors split_module passes it as arguments (the program's weights,
    quantizer states and cache buffers) as its own attributes, named `a0, a1, ...` in argument order, and name its
    other inputs `x0, x1, ...` and its nodes by position: equal layers then give equal code. Attributes keep the
    tensors Dynamo treats as static (no copy into CUDA graphs, in-place cache writes allowed)."""
    sub = split.get_submodule(call.target)
    graph = sub.graph
    root = torch.nn.Module()
    modules = {}  # what split_module kept as attributes: subgraphs of higher-order ops (scan's combine function)
    for node in graph.nodes:
        if node.op == "get_attr":
            value = operator.attrgetter(node.target)(sub)
            name = modules.setdefault(node.target, f"g{len(modules)}")
            setattr(root, name, value)
            node.target = name
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    kept, tensors = [], 0
    for arg, placeholder in zip(call.args, placeholders, strict=True):
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            name, tensors = f"a{tensors}", tensors + 1
            value = operator.attrgetter(arg.target)(split)
            if isinstance(value, torch.nn.Parameter):
                root.register_parameter(name, value)
            else:
                root.register_buffer(name, value)
            with graph.inserting_before(placeholder.next):
                attr = graph.create_node("get_attr", name)  # registered on the new module below
            placeholder.replace_all_uses_with(attr)
            graph.erase_node(placeholder)
        else:
            kept.append(arg)
            placeholder.target = placeholder.name = f"x{len(kept) - 1}"
    for i, node in enumerate(graph.nodes):
        if node.op not in ("placeholder", "output"):
            node.name = f"n{i}"
    setattr(split, call.target, fx.GraphModule(root, graph))
    call.args = tuple(kept)
