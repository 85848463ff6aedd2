"""Specification of the `values_per_token` pass: programs storing V packed along keys -> programs storing the same
codes per token (what the ONNX / TensorRT exports need), asserted by the ops present and absent after it and by the
logits of both programs."""

from __future__ import annotations

import warnings

import pytest
import tiny_models
import torch

from rqcompile.api import apply
from rqcompile.config import RQConfig
from rqcompile.passes.exact_attention import attention_with_exact_tokens
from rqcompile.passes.functional import FunctionalStep
from rqcompile.passes.values_per_token import values_per_token

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

WRITE = torch.ops.rq.write_along_keys.default
INDEX_COPY = torch.ops.aten.index_copy_.default


def _lm(fuse: bool, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # uncalibrated planar
        return apply(
            tiny_models.tiny_llama(),
            config=RQConfig(backend="planar", value_layout="keys", **config),
            max_cache_len=32,
            prefill_logits="all",
            fuse=fuse,
        )


def _calls(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function"]


def _v_codes_copies(gm) -> int:
    return sum(n.target is INDEX_COPY and n.args[0].target.startswith("v_codes") for n in _calls(gm))


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "dequantize+sdpa"])
@pytest.mark.parametrize("exact", [{}, {"sink_tokens": 0, "residual_window": 0}], ids=["sink-and-window", "none"])
def test_block_writes_become_row_writes_and_no_reader_reads_along_keys(fuse, exact):
    lm = _lm(fuse, **exact)
    sites = len(lm.sites)
    for gm in (lm.prefill_module, lm.decode_module):
        assert sum(n.target is WRITE for n in _calls(gm)) == sites and _v_codes_copies(gm) == 0
        out = values_per_token(gm)
        calls = _calls(out)
        assert not any(n.target is WRITE for n in calls) and _v_codes_copies(out) == sites
        assert not any(n.kwargs.get("v_along_keys") or n.kwargs.get("along_keys") for n in calls)
        assert not any(n.target is torch.ops.rq.dequantize.default and len(n.args) > 11 and n.args[11] for n in calls)
        if fuse:  # every fused reader of V now reads the per-token write's result
            readers = [n for n in calls if n.target in (torch.ops.rq.attention.default, attention_with_exact_tokens)]
            assert readers and all(n.args[3].target is INDEX_COPY for n in readers)
        assert sum(n.target is WRITE for n in _calls(gm)) == sites  # the input program is untouched


def test_the_per_token_programs_compute_the_same_logits_from_an_empty_cache():
    lm = _lm(True, residual_window=4)
    names = lm.cache_names
    steps = {
        layout: (FunctionalStep(prefill, names), FunctionalStep(decode, names))
        for layout, prefill, decode in (
            ("keys", lm.prefill_module, lm.decode_module),
            ("tokens", values_per_token(lm.prefill_module), values_per_token(lm.decode_module)),
        )
    }
    ids = torch.randint(0, tiny_models.VOCAB, (1, 20), generator=torch.Generator().manual_seed(3))
    logits = {}
    for layout, (prefill, decode) in steps.items():
        state = [torch.zeros_like(t) for t in lm.cache_tensors()]
        out, *state = prefill(ids[:, :11], torch.arange(11), *state)
        outs = [out]
        for i in range(11, 20):
            out, *state = decode(ids[:, i : i + 1], torch.tensor([i]), *state)
            outs.append(out)
        logits[layout] = torch.cat(outs, 1)
    torch.testing.assert_close(logits["tokens"], logits["keys"], atol=1e-5, rtol=1e-5)
