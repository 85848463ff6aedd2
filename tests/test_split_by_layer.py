"""`split_by_layer`: the rewritten program as one submodule per decoder layer, so equal layers compile once."""

from __future__ import annotations

import pytest
import tiny_models
import torch
from torch import fx
from torch._dynamo.utils import counters

from rqcompile import apply
from rqcompile.api import _compilable
from rqcompile.passes.split_by_layer import split_by_layer

MAX_LEN = 48

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def model():
    return tiny_models.tiny_qwen3_5()  # linear, full, linear, full attention


def _lm(model):
    with pytest.warns(UserWarning, match="without calibration"):
        return apply(model, max_cache_len=MAX_LEN)


def _ids(n: int = 20) -> torch.Tensor:
    return torch.randint(0, tiny_models.VOCAB, (1, n), generator=torch.Generator().manual_seed(3))


def test_each_decoder_layer_becomes_a_submodule_and_equal_layers_have_equal_code(model):
    """submod_0: work before the layers (embedding, mask, rotary tables); submod_{i+1}: layer i; the last: final norm
    and LM head. Layers of one kind read different tensors under the same names, so their code is identical."""
    lm = _lm(model)
    split = split_by_layer(_compilable(lm.decode_module))
    subs = {name: sub for name, sub in split.named_children() if name.startswith("submod_")}
    assert list(subs) == [f"submod_{i}" for i in range(model.config.num_hidden_layers + 2)]
    linear, full = (subs["submod_1"], subs["submod_3"]), (subs["submod_2"], subs["submod_4"])
    assert linear[0].code == linear[1].code and full[0].code == full[1].code and linear[0].code != full[0].code
    ops = lambda sub: {n.target for n in sub.graph.nodes if n.op == "call_function"}  # noqa: E731
    assert torch.ops.rq.quantize.default in ops(full[0]) and torch.ops.rq.quantize.default not in ops(linear[0])
    assert torch.ops.aten.embedding.default in ops(subs["submod_0"])
    # the tensors are the program's own: the layer writes the cache buffers the CompiledLM reports
    held = {id(t) for t in full[1].buffers()}
    assert id(lm.buffers["k_codes_3"]) in held and id(lm.buffers["k_codes_1"]) not in held


def test_the_split_programs_generate_what_the_whole_programs_generate(model):
    whole, split = _lm(model), _lm(model)
    split._decode_fn = split_by_layer(_compilable(split.decode_module))
    split._prefill_fn = split_by_layer(_compilable(split.prefill_module))
    ids = _ids()
    assert torch.equal(whole.generate(ids, 10), split.generate(ids, 10))
    for name, a, b in zip(whole.cache_names, whole.cache_tensors(), split.cache_tensors(), strict=True):
        assert torch.equal(a, b), name


def test_a_graph_without_decoder_layers_is_refused():
    with pytest.raises(ValueError, match="no node of the program belongs to a decoder layer"):
        split_by_layer(fx.symbolic_trace(lambda x: x + 1))


def test_regional_compile_compiles_each_kind_of_layer_once(model):
    """`CompiledLM.compile(regional=True)`: one compiled program per region, no graph break or recompile over the
    decode steps, the eager program's tokens, and Inductor's cache serving the repeated layers: at least a hit for
    each decode layer after the first of its kind (more when the cache is warm from an earlier run; prefill's linear
    layers carry their scan subgraph and were measured to hit for the full-attention layer only)."""
    lm = _lm(model)
    ids = _ids()
    eager = lm.generate(ids, 6)
    torch._dynamo.reset()
    counters.clear()
    lm.compile(regional=True)
    tokens = lm.generate(ids, 6)
    assert torch.equal(tokens, eager)
    regions = 2 * (model.config.num_hidden_layers + 2)  # prefill and decode
    assert counters["stats"]["unique_graphs"] == regions
    assert not counters["graph_break"] and not counters["recompiles"]
    assert counters["inductor"]["fxgraph_cache_hit"] >= 2
