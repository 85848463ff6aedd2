"""Triton kernels against the reference quantizer.

Without CUDA the kernels run under TRITON_INTERPRET=1 on CPU tensors at small sizes (part of the normal suite);
the `gpu` tests run them through the rq ops on CUDA at real sizes. Calibrated bit allocation layouts (mixed code
widths, a per-head channel order) come from the real allocator (`make_state` with `bit_allocation`) and are
checked the same way. Every check draws fresh random inputs; outputs
come from torch.empty in the launchers, and on CUDA the caching allocator's memory is filled with NaN before each
run so an unwritten element shows; NaN never passes. Codes may differ from the reference only exactly at decision
boundaries (rounding of the rotation/norm sums): their rate is bounded and a differing code is off by one.
"""

from __future__ import annotations

import importlib
import math
import os
from dataclasses import replace

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # also set by conftest.py, before any kernel module is imported

import triton  # noqa: E402,F401  (a dev dependency: a missing triton must fail, not skip)

import rqcompile.ops  # noqa: E402
from rqcompile.config import RQConfig  # noqa: E402
from rqcompile.kernels import attention as kattn  # noqa: E402
from rqcompile.kernels import quantize as kquant  # noqa: E402
from rqcompile.kernels import rope_term  # noqa: E402
from rqcompile.quant import quantizer  # noqa: E402
from rqcompile.quant.packing import pack_along_keys, runs, unpack  # noqa: E402
from rqcompile.quant.rotations import rotate  # noqa: E402

if not HAS_CUDA:  # make sure the @triton.jit functions were built in interpreter mode
    kquant = importlib.reload(kquant)
    kattn = importlib.reload(kattn)


@pytest.fixture(autouse=True)
def _interpret_mode(monkeypatch):
    """Rebuild the kernels in interpreter mode right before each CPU test (earlier tests may have imported triton
    state that makes module-import-time decoration stale)."""
    global kquant, kattn
    if not HAS_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        kquant = importlib.reload(kquant)
        kattn = importlib.reload(kattn)


MAX_FLIPPED_GROUPS = 2e-3  # fraction of norm groups whose codes may differ from the reference (float ties)


ALLOWED_WIDTHS = (2, 3, 4, 5, 6)


def _state(backend, bits, kind, heads, dim, device="cpu", calibrated=True, seed=0, layout=False, **config):
    """A quantizer state; `layout`: a calibrated bit allocation averaging `bits` over ALLOWED_WIDTHS, from random
    heavy-tailed error weights (a few heavy channels, as real keys have), so the layout mixes several widths."""
    weight = None
    if layout:
        config["bit_allocation"] = ALLOWED_WIDTHS
        weight = torch.rand(heads, dim, generator=torch.Generator().manual_seed(seed + 5)) ** 4 * 10 + 0.01
    config.setdefault("rotation_stages", 1)  # the block kernels' own paths; staged cases ask for stages explicitly
    st = quantizer.make_state(
        RQConfig(backend=backend, bits=bits, seed=seed, **config),
        layer_idx=2,
        kind=kind,
        num_heads=heads,
        head_dim=dim,
        weight=weight,
    )
    if calibrated:
        g = torch.Generator().manual_seed(seed + 17)
        st = replace(
            st, mean=torch.randn(heads, dim, generator=g) * 0.3, scale=torch.rand(heads, dim, generator=g) + 0.5
        )
    return st.to(device)


def _poison(device):
    """Fill the CUDA caching allocator's free memory with NaN, so unwritten kernel outputs show up as NaN."""
    if device == "cuda":
        junk = torch.empty(256 * 1024 * 1024, dtype=torch.float32, device="cuda")
        junk.fill_(float("nan"))
        del junk


def _check_codes(codes, norms, ref_codes, ref_norms, x, st):
    """The kernel's codes and norms equal the reference's, except in rare groups where float rounding tipped a
    decision (a code at a boundary, or the scale search's pick between two near-equal candidates); there the
    kernel's reconstruction must be as close to the input as the reference's."""
    widths, dim = st.widths, st.head_dim
    assert not torch.isnan(norms.float()).any()
    assert codes.shape == ref_codes.shape
    got, want = unpack(codes, widths, dim), unpack(ref_codes, widths, dim)
    flipped = (got != want).unflatten(-1, (st.num_groups, -1)).any(-1)  # groups where the two differ
    # a fraction of many groups; in a small case one group (the interpreter's tl.dot sums in BLAS order, which may
    # differ between runs, so a boundary tie can tip either way)
    assert flipped.sum().item() <= max(1, MAX_FLIPPED_GROUPS * flipped.numel()), flipped.float().mean().item()
    rel = (norms.float() - ref_norms.float()).abs() / ref_norms.float().abs().clamp_min(1e-6)
    assert rel[~flipped].max().item() < 2e-3  # one fp16 rounding step
    if flipped.any():
        u = (x.float() - st.mean[:, None]) / st.scale[:, None]
        if st.perm is not None:
            u = u.gather(-1, st.perm[None, :, None, :].expand(u.shape[0], -1, u.shape[2], -1))
        target = rotate(u, st.rotation).unflatten(-1, (st.num_groups, -1))

        def group_error(c, n):
            rec = quantizer.dequantize_rotated(c, n, st.levels, widths, dim).unflatten(-1, (st.num_groups, -1))
            return (rec - target).pow(2).sum(-1)

        err, ref_err = group_error(codes, norms)[flipped], group_error(ref_codes, ref_norms)[flipped]
        scale = target.pow(2).sum(-1)[flipped]
        assert (err <= ref_err * 1.02 + 1e-4 * scale).all(), (err - ref_err).max()


def _quantize_case(backend, bits, dim, device, tokens, batch=2, heads=2, strided=True, layout=False, **config):
    st = _state(backend, bits, "k", heads, dim, device, layout=layout, **config)
    bits, perm, widths = rqcompile.ops.layout_args(st)  # perm and widths: None for a uniform state
    if layout:  # a layout the kernels must take, not hand to the reference
        assert kquant.quantize_supported(torch.empty(1, 1, 1, dim), st.rotation, bits, st.group, widths, st.levels)
        assert kquant.dequantize_supported(torch.empty(1, 1, 1, dim // st.group), st.rotation, dim, widths, st.levels)
    x = torch.randn(batch, tokens, heads, dim, device=device) * 2
    x = x.transpose(1, 2) if strided else x.reshape(batch, heads, tokens, dim)
    params = (st.rotation, st.mean, st.scale, st.levels)
    _poison(device)
    if device == "cuda":
        codes, norms = torch.ops.rq.quantize(x, *params, bits, st.group, perm, widths)
    else:
        codes, norms = kquant.launch_quantize(x, *params, bits, st.group, perm=perm, widths=widths)
    ref_codes, ref_norms = quantizer.quantize(x, *params, st.widths, st.group, st.perm)
    _check_codes(codes, norms, ref_codes, ref_norms, x, st)
    # dequantize of the reference codes
    _poison(device)
    if device == "cuda":
        out = torch.ops.rq.dequantize(ref_codes, ref_norms, *params, bits, dim, x.dtype, perm, widths)
    else:
        out = kquant.launch_dequantize(ref_codes, ref_norms, *params, bits, dim, x.dtype, perm=perm, widths=widths)
    ref = quantizer.dequantize(ref_codes, ref_norms, *params, st.widths, dim, perm=st.perm)
    assert not torch.isnan(out).any()
    assert ((out - ref).norm() / ref.norm()).item() < 1e-4


def _attention_case(
    backend,
    kb,
    vb,
    dim,
    device,
    tk,
    batch=2,
    heads=2,
    rep=3,
    tq=1,
    mask_kind=None,
    splits=None,
    layout=False,
    lse=False,
    rope_h=None,
    variant=None,
    decode=None,
    v_along_keys=False,
    kv_start=0,
    rope_table=False,
    **config,
):
    """The kernels against the reference; `lse`: rq::attention_lse, its lse checked too; `rope_h`: with a rope_ab
    term over that many pairs (_rope_inputs); `rope_table`: its cos / sin passed as rope_term.rope_table; `variant`,
    `decode`: launch_attention's (CPU and direct launches); `v_along_keys`: V re-packed along keys
    (packing.pack_along_keys), launched directly. mask_kind "key_range": no mask, keys kv_start <= j < kv_len[b] (a
    decode step's range, passes.decode_key_range), batch row 0's empty."""
    ks = _state(backend, kb, "k", heads, dim, device, layout=layout, **config)
    vs = _state(backend, vb, "v", heads, dim, device, seed=1, layout=layout, **config)
    kb, k_perm, k_widths = rqcompile.ops.layout_args(ks)
    vb, v_perm, v_widths = rqcompile.ops.layout_args(vs)
    k = torch.randn(batch, heads, tk, dim, device=device) * 2
    v = torch.randn(batch, heads, tk, dim, device=device)
    kc, kn = quantizer.quantize(k, ks.rotation, ks.mean, ks.scale, ks.levels, ks.widths, ks.group, ks.perm)
    vc, vn = quantizer.quantize(v, vs.rotation, vs.mean, vs.scale, vs.levels, vs.widths, vs.group, vs.perm)
    q = torch.randn(batch, heads * rep, tq, dim, device=device)
    mask, kv_len = None, None
    if mask_kind == "bool":
        mask = torch.rand(batch, 1, 1, tk, device=device) > 0.3
        mask[0] = False  # fully masked rows: the reference gives V's mean there
    elif mask_kind == "float":
        mask = torch.randn(batch, heads * rep, tq, tk, device=device)
    elif mask_kind == "causal":
        mask = torch.ones(tq, tk, dtype=torch.bool, device=device).tril(tk - tq)
    elif mask_kind == "kv_len":
        kv_len = torch.randint(1, tk + 1, (batch,), device=device)
    elif mask_kind == "key_range":
        kv_len = torch.randint(kv_start + 1, tk + 1, (batch,), device=device)
        kv_len[0] = kv_start - 2  # nothing compressed to read yet: a fully masked row
    sm = 1 / math.sqrt(dim)
    ref_mask = mask
    if kv_len is not None:
        ref_mask = torch.arange(tk, device=device)[None, None, None, :] < kv_len[:, None, None, None]
        ref_mask = ref_mask & (torch.arange(tk, device=device) >= kv_start)
    ref = quantizer.rotated_attention(q, kc, kn, vc, vn, ks, vs, ref_mask, sm)
    args = (q, kc, kn, vc, vn, ks.rotation, ks.scale, ks.levels, vs.rotation, vs.mean, vs.scale, vs.levels, kb, vb)
    layout_args = (k_perm, v_perm, k_widths, v_widths)
    rope = (None, None)
    if rope_h:  # the reference with the term (the op's torch implementation), which must move the output
        rope = _rope_inputs(batch, heads * rep, tq, rope_h, device)
        plain, ref = ref, rqcompile.ops.reference_attention(*args, ref_mask, sm, None, *layout_args, *rope)
        assert ((plain - ref).norm() / ref.norm()).item() > 0.1
    if layout or rope_h:  # a call the kernels must take, not hand to the reference
        assert layout == (kattn.kernel_layouts(dim, kb, vb, *layout_args) is not None)
        assert kattn.attention_supported(
            q, kc, vc, kb, vb, kn, vn, k_widths, v_widths, ks.levels, vs.levels, k_perm, v_perm, rope[0]
        )
    if v_along_keys:
        args = (*args[:3], pack_along_keys(vc, vb, dim), *args[4:])
    _poison(device)
    direct = kv_len is not None or splits or variant or decode or v_along_keys or rope_table
    if device == "cuda" and not direct:
        op = torch.ops.rq.attention_lse if lse else torch.ops.rq.attention
        out = op(*args, mask, sm, None, *layout_args, *rope)
    else:
        out = kattn.launch_attention(
            *args,
            mask,
            sm,
            kv_len,
            *layout_args,
            *rope,
            num_splits=splits,
            with_lse=lse,
            variant=variant,
            decode=decode,
            v_along_keys=v_along_keys,
            kv_start=kv_start,
            rope_table=rope_term.rope_table(rope[1], tk + 5) if rope_table else None,  # any table of >= tk slots
        )
    if lse:
        out, got_lse = out
        _check_lse(got_lse, rqcompile.ops.reference_attention_lse(*args, ref_mask, sm, None, *layout_args, *rope)[1])
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not torch.isnan(out).any()
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < 3e-3, err  # fp16 tensor-core operands, fp32 accumulation


def _rope_inputs(batch, q_heads, tq, h, device):
    """rope_ab [B, Hq, Tq, 2h] and default RoPE's inverse frequencies for h pairs (theta 10000: the fastest pair turns
    one radian per slot), weights scaled so that the term moves the softmax about as much as q . k does."""
    ab = torch.randn(batch, q_heads, tq, 2 * h, device=device) * 3 * math.sqrt(8 / h)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 2 * h, 2, dtype=torch.float32, device=device) / (2 * h))
    return ab, inv_freq


def _check_lse(got, ref):
    """Same -inf rows (fully masked); elsewhere within the fp16-operand error of the scores."""
    assert got.dtype == torch.float32 and got.shape == ref.shape
    masked = ref == float("-inf")
    assert torch.equal(got == float("-inf"), masked) and not torch.isnan(got).any()
    err = (got[~masked] - ref[~masked]).abs().max().item() if (~masked).any() else 0.0
    assert err < 2e-2 * max(1.0, ref[~masked].abs().max().item()), err


# ---------------------------------------------------------------- CPU, TRITON_INTERPRET=1, small sizes


cpu_only = pytest.mark.skipif(HAS_CUDA, reason="interpreter tests run where there is no GPU")


@cpu_only
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("backend", ["planar", "iso", "rotor", "hadamard", "none"])
def test_quantize_interpret(backend, bits):
    _quantize_case(backend, bits, 64, "cpu", tokens=19)


@cpu_only
def test_quantize_interpret_two_groups_and_odd_rotor():
    _quantize_case("rotor", 3, 256, "cpu", tokens=5, batch=1, heads=1)  # 256 % 3 == 1, groups of 128
    _quantize_case("planar", 4, 32, "cpu", tokens=9, strided=False)


@cpu_only
def test_quantize_interpret_staged_rotations():
    """A staged rotation is stored as dense per-group blocks: the kernels take hadamard's dense path for it."""
    _quantize_case("iso", 3, 64, "cpu", tokens=7, rotation_stages=3)
    _quantize_case("rotor", 2, 256, "cpu", tokens=5, batch=1, heads=1, rotation_stages=2)  # two groups of 128


@cpu_only
@pytest.mark.parametrize("lse", [False, True])
def test_attention_interpret_staged_rotations(lse):
    _attention_case("iso", 4, 3, 64, "cpu", tk=70, splits=2, lse=lse, rotation_stages=3)


# what a launch may do in torch besides its kernels: allocate, view, and the interpreter's own copies of the buffers
_MEMORY_OPS = {"empty", "new_empty", "set_", "copy_", "view", "detach"}


@cpu_only
@pytest.mark.parametrize("backend,stages", [("iso", "full"), ("hadamard", 1)])
def test_a_dense_rotation_runs_inside_the_kernels_without_torch_arithmetic(backend, stages):
    """The default's dense per-group rotation: q is rotated by its own kernel and the combine step un-rotates the
    output, so an eager decode call launches no torch matmuls, casts or elementwise ops around the attention kernels
    (each was a separate small launch, ~25 us of every call on the H200), and the result is the reference's."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    ks = _state(backend, 3, "k", 2, 128, "cpu", rotation_stages=stages)
    vs = _state(backend, 3, "v", 2, 128, "cpu", seed=1, rotation_stages=stages)
    assert ks.rotation.shape[-1] > 4 and vs.rotation.shape[-1] > 4  # dense blocks
    k, v = torch.randn(2, 2, 48, 128) * 2, torch.randn(2, 2, 48, 128)
    kc, kn = quantizer.quantize(k, ks.rotation, ks.mean, ks.scale, ks.levels, ks.widths, ks.group, ks.perm)
    vc, vn = quantizer.quantize(v, vs.rotation, vs.mean, vs.scale, vs.levels, vs.widths, vs.group, vs.perm)
    q = torch.randn(2, 6, 1, 128).to(torch.bfloat16)
    args = (q, kc, kn, vc, vn, ks.rotation, ks.scale, ks.levels, vs.rotation, vs.mean, vs.scale, vs.levels, 3, 3)
    with Record() as record:
        out = kattn.launch_attention(*args, None, 128**-0.5, num_splits=2)
    assert record.ops <= _MEMORY_OPS, record.ops - _MEMORY_OPS
    ref = quantizer.rotated_attention(q.float(), kc, kn, vc, vn, ks, vs, None, 128**-0.5)
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2  # bf16 output


def test_a_dense_rotation_that_does_not_tile_head_dim_is_refused_by_the_launcher():
    """Blocks the kernels cannot take (never produced for a supported call) get a clear error, not wrong numbers."""
    rotation = torch.eye(24).expand(2, 3, 24, 24)  # 3 x 24 = 72 != 64, and 24 is not a power of two
    q = torch.randn(1, 2, 1, 64)
    codes = torch.zeros(1, 2, 16, 24, dtype=torch.uint8)
    norms = torch.ones(1, 2, 16, 1)
    ones = torch.ones(2, 64)
    levels = torch.linspace(-1, 1, 8)
    with pytest.raises(ValueError, match="dense rotation blocks"):
        kattn.launch_attention(
            q, codes, norms, codes, norms, rotation, ones, levels, rotation, ones * 0, ones, levels, 3, 3, None, 0.125
        )


def test_quantize_tiles_shrink_to_the_tokens_written():
    """A decode step quantizes one token per head: 1-row tiles (dense rotations then multiply without tl.dot),
    instead of 8 rows (block rotations) and 64 (dense); a few tokens with a dense rotation take tl.dot's 16."""
    assert kquant._block_t(256, False, 1) == 1 and kquant._block_t(256, False, 3) == 4
    assert kquant._block_t(256, False, 5000) == kquant.DEFAULTS["block_t"]
    assert kquant._block_t(256, True, 1) == 1 and kquant._block_t(256, True, 3) == 16
    assert kquant._block_t(256, True, 20) == 32
    assert kquant._block_t(256, True, 5000) == kquant.DEFAULTS["block_t_dense"]
    assert kquant._block_t(256, True, None) == kquant.DEFAULTS["block_t_dense"]  # symbolic lengths: one build


@cpu_only
@pytest.mark.parametrize("backend,stages", [("planar", 1), ("iso", 1), ("rotor", 1), ("hadamard", 1), ("iso", 3)])
def test_quantize_interpret_one_token_per_head(backend, stages):
    """The decode step's call (one token, the smallest tiles) against the reference, with the scale search; and a few
    tokens (dense: a 16-row tile, mostly empty)."""
    _quantize_case(backend, 3, 64, "cpu", tokens=1, rotation_stages=stages)
    _quantize_case(backend, 3, 256, "cpu", tokens=1, batch=1, rotation_stages=stages)
    _quantize_case(backend, 2, 128, "cpu", tokens=3, batch=1, rotation_stages=stages)


@cpu_only
def test_quantize_interpret_nan_propagates_into_norm():
    st = _state("planar", 3, "k", 2, 64)
    x = torch.randn(1, 2, 4, 64)
    x[0, 1, 2, 7] = float("nan")
    _, norms = kquant.launch_quantize(x, st.rotation, st.mean, st.scale, st.levels, 3, st.group)
    assert torch.isnan(norms[0, 1, 2]).all() and not torch.isnan(norms[0, 0]).any()


@cpu_only
@pytest.mark.parametrize(
    "backend,kb,vb,kw",
    [
        ("planar", 3, 3, {"splits": 3}),
        ("iso", 4, 2, {}),
        ("rotor", 2, 4, {"splits": 2}),
        ("hadamard", 3, 3, {}),
        ("planar", 3, 3, {"mask_kind": "bool", "splits": 3}),
        ("planar", 2, 2, {"mask_kind": "float", "tq": 3}),
        ("iso", 3, 3, {"mask_kind": "causal", "tq": 4, "splits": 2}),
        ("planar", 3, 3, {"mask_kind": "kv_len", "splits": 3}),
    ],
)
def test_attention_interpret(backend, kb, vb, kw):
    _attention_case(backend, kb, vb, 64, "cpu", tk=130, **kw)


@cpu_only
@pytest.mark.parametrize(
    "backend,kb,vb,kw",
    [
        ("planar", 3, 3, {"splits": 3}),
        ("iso", 4, 2, {"mask_kind": "bool", "splits": 2}),  # a fully masked batch row: lse -inf
        ("rotor", 2, 4, {"mask_kind": "float", "tq": 3}),
        ("iso", 3, 3, {"mask_kind": "causal", "tq": 4, "splits": 2}),
        ("planar", 3, 3, {"mask_kind": "kv_len", "splits": 3}),
        ("hadamard", 3, 3, {}),  # dense V: the combine kernel un-rotates the output and writes the lse
    ],
)
def test_attention_lse_interpret(backend, kb, vb, kw):
    _attention_case(backend, kb, vb, 64, "cpu", tk=130, lse=True, **kw)


@cpu_only
@pytest.mark.parametrize("mask_kind", ["bool", "causal"])
def test_attention_lse_interpret_layout(mask_kind):
    """A bit-allocation layout state (widths 2..6 from random positive error weights): the layout kernel's lse."""
    _attention_case("iso", 3.5, 3, 64, "cpu", tk=70, tq=3, mask_kind=mask_kind, splits=2, layout=True, lse=True)


@cpu_only
@pytest.mark.parametrize("backend", ["planar", "rotor", "hadamard"])
def test_attention_combine_splits_columns_over_programs(backend, monkeypatch):
    """The combine step reads all splits of a row in one load, BLOCK_D output columns per program: rotation blocks
    across column chunks (rotor: blocks of 3 in chunks of 16) and a dense block whose outputs are shared by four
    programs (hadamard, 64 x 64, 16 columns each) still add up."""
    monkeypatch.setattr(kattn, "COMBINE_TILE", 32)  # 16 columns per program
    monkeypatch.setattr(kattn, "COMBINE_DENSE_COLS", 16)
    _attention_case(backend, 3, 3, 64, "cpu", tk=400, splits=5, lse=True, mask_kind="kv_len")  # 4 splits


@cpu_only
def test_the_combine_step_unrotates_a_whole_dense_block_in_one_program(monkeypatch):
    """More output columns per program than a dense block has (COMBINE_DENSE_COLS is 128, the default rotation's
    block): one program per 64 x 64 block, its outputs and lse as the reference's."""
    monkeypatch.setattr(kattn, "COMBINE_DENSE_COLS", 128)
    _attention_case("hadamard", 3, 3, 64, "cpu", tk=400, splits=5, lse=True, mask_kind="kv_len")


@cpu_only
def test_more_splits_than_the_combine_step_reads_is_an_error(monkeypatch):
    """Splits past what one load of the combine step holds would be dropped from the output: refused instead."""
    monkeypatch.setattr(kattn, "COMBINE_BLOCK_S", 2)
    with pytest.raises(RuntimeError, match="at most 2"):
        _attention_case("planar", 3, 3, 64, "cpu", tk=400, splits=5)


@cpu_only
def test_a_dense_rotation_covers_every_query_row_of_a_prefill_chunk():
    """A dense rotation with more query rows per KV head than a decode step has (3 query heads x 6 positions): q's
    rotation and the combine step's un-rotation and lse cover every row."""
    _attention_case("hadamard", 3, 3, 64, "cpu", tk=100, rep=3, tq=6, splits=2, lse=True, mask_kind="causal")


@cpu_only
def test_attention_interpret_head_dim_256():
    _attention_case("planar", 3, 3, 256, "cpu", tk=40, batch=1, heads=1, rep=2)


# Calibrated bit allocation: layouts from the allocator (widths 2..6 in runs of 16, or of 8 where head_dim is not a
# multiple of 16; a per-head block order), and one hand-made layout with every width 8..1 (eight runs).
LAYOUT_QUANTIZE_CASES = [
    ("planar", 3.5, 64, {}),  # runs 5/4/3/2
    ("iso", 3, 64, {}),
    ("rotor", 4, 64, {}),  # blocks of 3 straddle the runs
    ("hadamard", 3.5, 64, {}),  # dense rotation, whole groups reordered
    ("none", 4, 64, {}),  # runs 6/5/3/2
    ("none", 4, 128, {"scale_search": ()}),  # five runs, no scale search
    ("iso", 3.5, 256, {}),  # groups of 128, a run across the group boundary
    ("planar", 3.5, 40, {"norm_group": 8}),  # runs of 8, runs across groups
]
LAYOUT_ATTENTION_CASES = [
    ("planar", 3.5, 3, {"mask_kind": "bool", "splits": 3}),
    ("iso", 3, 3.5, {"mask_kind": "float", "tq": 3}),
    ("rotor", 4, 3, {"mask_kind": "causal", "tq": 4, "splits": 2}),
    ("hadamard", 3.5, 3, {}),  # dense K and V: q rotated by its own kernel, the output by the combine step
    ("none", 4, 2.5, {"mask_kind": "kv_len", "splits": 3}),
]


def _layout_runs(backend, bits, kind, dim, seed=0, **config):
    st = _state(backend, bits, kind, 2, dim, seed=seed, layout=True, **config)
    return st.group, runs(st.widths)


def test_layout_cases_cover_every_allocated_width_and_runs_across_norm_groups():
    """The layout cases below exercise what they are meant to (the allocator decides the layouts)."""
    found = [_layout_runs(b, bits, "k", dim, **cfg) for b, bits, dim, cfg in LAYOUT_QUANTIZE_CASES]
    found += [_layout_runs(b, kb, "k", 64) for b, kb, _, _ in LAYOUT_ATTENTION_CASES]
    found += [_layout_runs(b, vb, "v", 64, seed=1) for b, _, vb, _ in LAYOUT_ATTENTION_CASES]
    found += [_layout_runs("none", 4, "k", 256), _layout_runs("iso", 3.5, "v", 256, seed=1)]
    assert {w for _, rs in found for w, _, _ in rs} == set(ALLOWED_WIDTHS)
    assert max(len(rs) for _, rs in found) >= 5
    assert any(s // g != (s + n - 1) // g for g, rs in found for _, s, n in rs)
    assert any(n % 16 for _, rs in found for _, _, n in rs)  # runs of 8


def _every_width_state(dim=128, heads=2, seed=0):
    """A hand-made layout: widths 8, 7, ..., 1 in runs of dim / 8 (every plane combination, eight runs) and a
    random order of the rotation's blocks per head."""
    from rqcompile.quant.allocation import block_order
    from rqcompile.quant.quantizer import layout_codebook

    st = _state("planar", 3, "k", heads, dim, seed=seed)
    widths = tuple(w for w in range(8, 0, -1) for _ in range(dim // 8))
    perm = block_order(torch.rand(heads, dim, generator=torch.Generator().manual_seed(seed + 9)), 2)
    levels = torch.cat([layout_codebook(widths, st.group), st.scale_candidates])
    return replace(st, levels=levels, widths=widths, perm=perm)


@cpu_only
@pytest.mark.parametrize("backend,bits,dim,config", LAYOUT_QUANTIZE_CASES)
def test_quantize_interpret_layout(backend, bits, dim, config):
    _quantize_case(backend, bits, dim, "cpu", tokens=11, layout=True, **config)


@cpu_only
@pytest.mark.parametrize("backend,kb,vb,kw", LAYOUT_ATTENTION_CASES)
def test_attention_interpret_layout(backend, kb, vb, kw):
    _attention_case(backend, kb, vb, 64, "cpu", tk=130, layout=True, **kw)


@cpu_only
def test_attention_interpret_layout_head_dim_256():
    """Groups of 128 with runs across them (norms per element) next to runs inside one group (norms after the dot),
    five K runs."""
    _attention_case("none", 4, 3.5, 256, "cpu", tk=40, batch=1, heads=1, rep=2, layout=True, splits=2)


@cpu_only
def test_kernels_read_every_width_and_eight_runs():
    st = _every_width_state()
    bits, perm, widths = rqcompile.ops.layout_args(st)
    params = (st.rotation, st.mean, st.scale, st.levels)
    x = torch.randn(2, 2, 9, 128) * 2
    codes, norms = kquant.launch_quantize(x, *params, bits, st.group, perm=perm, widths=widths)
    ref_codes, ref_norms = quantizer.quantize(x, *params, st.widths, st.group, st.perm)
    _check_codes(codes, norms, ref_codes, ref_norms, x, st)
    out = kquant.launch_dequantize(ref_codes, ref_norms, *params, bits, 128, x.dtype, perm=perm, widths=widths)
    ref = quantizer.dequantize(ref_codes, ref_norms, *params, st.widths, 128, perm=st.perm)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-4
    # attention with this layout for both K and V (eight run slots each)
    k, v, q = torch.randn(2, 2, 70, 128) * 2, torch.randn(2, 2, 70, 128), torch.randn(2, 6, 1, 128)
    kc, kn = quantizer.quantize(k, *params, st.widths, st.group, st.perm)
    vc, vn = quantizer.quantize(v, *params, st.widths, st.group, st.perm)
    mask = torch.rand(2, 1, 1, 70) > 0.3
    sm = 1 / math.sqrt(128)
    ref = quantizer.rotated_attention(q, kc, kn, vc, vn, st, st, mask, sm)
    kattn_args = (q, kc, kn, vc, vn, st.rotation, st.scale, st.levels, st.rotation, st.mean, st.scale, st.levels)
    assert kattn.attention_supported(q, kc, vc, bits, bits, kn, vn, widths, widths, st.levels, st.levels, perm, perm)
    out = kattn.launch_attention(*kattn_args, bits, bits, mask, sm, None, perm, perm, widths, widths, num_splits=2)
    assert ((out - ref).norm() / ref.norm()).item() < 3e-3


@cpu_only
def test_single_width_calls_outside_2_to_4_bits_take_the_layout_code_path():
    """A uniform width the single-width code paths do not pack (here 5) runs as a one-run layout, not as garbage."""
    st = _every_width_state()
    widths = (5,) * 128
    st = replace(st, widths=widths, perm=None, levels=torch.cat([quantizer.layout_codebook(widths, 128)]))
    x = torch.randn(1, 2, 5, 128)
    codes, norms = kquant.launch_quantize(x, st.rotation, st.mean, st.scale, st.levels, 5, st.group)
    ref_codes, ref_norms = quantizer.quantize(x, st.rotation, st.mean, st.scale, st.levels, 5, st.group)
    _check_codes(codes, norms, ref_codes, ref_norms, x, st)


@cpu_only
def test_cuda_dispatch_sends_layouts_to_the_kernels():
    """The rq ops' CUDA implementations (`rqcompile.kernels`) take the layout arguments, positionally or by name,
    run the kernels for layouts they read and keep the reference for the rest (run here in the interpreter)."""
    from rqcompile import kernels

    ks = _state("none", 4, "k", 2, 64, layout=True)
    vs = _state("planar", 3.5, "v", 2, 64, seed=1, layout=True)
    kb, k_perm, k_widths = rqcompile.ops.layout_args(ks)
    vb, v_perm, v_widths = rqcompile.ops.layout_args(vs)
    x = torch.randn(2, 2, 40, 64)
    k_params = (ks.rotation, ks.mean, ks.scale, ks.levels)
    assert kernels._quantize_ok(x, *k_params, kb, ks.group, k_perm, k_widths)
    kc, kn = kernels._quantize_launch(x, *k_params, kb, ks.group, k_perm, k_widths)
    ref_codes, ref_norms = quantizer.quantize(x, *k_params, ks.widths, ks.group, ks.perm)
    _check_codes(kc, kn, ref_codes, ref_norms, x, ks)
    assert kernels._dequantize_ok(kc, kn, *k_params, kb, 64, torch.float32, k_perm, k_widths)
    out = kernels._dequantize_launch(kc, kn, *k_params, kb, 64, torch.float32, perm=k_perm, widths=k_widths)
    ref = quantizer.dequantize(kc, kn, *k_params, ks.widths, 64, perm=ks.perm)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-4

    vc, vn = quantizer.quantize(x, vs.rotation, vs.mean, vs.scale, vs.levels, vs.widths, vs.group, vs.perm)
    q = torch.randn(2, 4, 1, 64)
    args = (q, kc, kn, vc, vn, ks.rotation, ks.scale, ks.levels, vs.rotation, vs.mean, vs.scale, vs.levels, kb, vb)
    args = (*args, None, 0.125)
    layout = {"k_perm": k_perm, "v_perm": v_perm, "k_widths": k_widths, "v_widths": v_widths}
    assert kernels._attention_ok(*args, None, *layout.values())
    assert kernels._attention_ok(*args, kv_len=None, **layout)
    ref = rqcompile.ops.reference_attention(*args, None, *layout.values())
    out = kernels._attention_launch(*args, kv_len=None, **layout)
    assert ((out - ref).norm() / ref.norm()).item() < 3e-3

    # layouts the attention kernel does not read go to the reference: runs of 8, more than MAX_RUNS runs
    eights = [4] * 8 + [3] * 56
    many = [3 - i // 16 % 2 for i in range(256)]  # 16 runs of 16
    assert not kernels._attention_ok(*args, None, k_perm, v_perm, eights, v_widths)
    q256 = torch.empty(1, 2, 1, 256)
    n256 = torch.empty(1, 2, 1, 2)
    wide = (q256, kc, n256, vc, n256, *args[5:])
    assert not kernels._attention_ok(*wide, None, None, None, many, None)
    assert kernels._quantize_ok(x, *k_params, kb, ks.group, None, eights)


# ---------------------------------------------------------------- GPU, through the rq ops, real sizes


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("backend", ["planar", "iso", "rotor", "hadamard", "none"])
def test_quantize_gpu(backend, bits):
    _quantize_case(backend, bits, 256, "cuda", tokens=3000, batch=2, heads=4)
    _quantize_case(backend, bits, 128, "cuda", tokens=1000, batch=3, heads=2)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("backend,stages", [("planar", 1), ("iso", 1), ("hadamard", 1), ("iso", "full")])
def test_quantize_one_token_gpu(backend, stages):
    """A decode step's call: one token per head (1-row / 16-row tiles), batch 8, Qwen3.5-27B's head_dim."""
    _quantize_case(backend, 3, 256, "cuda", tokens=1, batch=8, heads=4, rotation_stages=stages)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("backend,stages", [("iso", "full"), ("rotor", 3)])
def test_quantize_staged_gpu(backend, stages):
    _quantize_case(backend, 3, 256, "cuda", tokens=3000, batch=2, heads=4, rotation_stages=stages)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize(
    "backend,kb,vb,kw",
    [
        ("planar", 3, 3, {}),
        ("iso", 4, 2, {"batch": 8}),
        ("iso", 3, 3, {"rotation_stages": "full"}),  # dense per-group blocks: q and the output rotated by kernels
        ("rotor", 2, 4, {}),
        ("hadamard", 3, 3, {}),
        ("planar", 3, 3, {"mask_kind": "bool"}),
        ("planar", 3, 3, {"mask_kind": "float", "tq": 5}),
        ("iso", 3, 3, {"mask_kind": "causal", "tq": 64}),
        ("planar", 3, 3, {"mask_kind": "kv_len"}),
        ("planar", 3, 3, {"splits": 1}),
    ],
)
def test_attention_gpu(backend, kb, vb, kw):
    _attention_case(backend, kb, vb, 256, "cuda", tk=kw.pop("tk", 9000), heads=4, rep=6, **kw)
    _attention_case(backend, kb, vb, 128, "cuda", tk=777, heads=2, rep=4)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize(
    "backend,kb,vb,layout,kw",
    [
        ("planar", 3, 3, False, {}),
        ("hadamard", 3, 3, False, {}),
        ("iso", 3, 3, False, {"mask_kind": "causal", "tq": 64}),
        ("planar", 3, 3, False, {"mask_kind": "bool"}),
        ("planar", 3, 3, False, {"mask_kind": "kv_len"}),
        ("planar", 3.5, 3, True, {}),
        ("iso", 3.5, 3, True, {"mask_kind": "float", "tq": 5}),
    ],
)
def test_attention_lse_gpu(backend, kb, vb, layout, kw):
    """rq::attention_lse at real sizes: the same output as rq::attention and the reference's lse."""
    _attention_case(backend, kb, vb, 256, "cuda", tk=kw.pop("tk", 9000), heads=4, rep=6, layout=layout, lse=True, **kw)
    _attention_case(backend, kb, vb, 128, "cuda", tk=777, heads=2, rep=4, layout=layout, lse=True)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("backend,bits", [("planar", 3.5), ("iso", 3), ("rotor", 4), ("hadamard", 3.5), ("none", 4)])
def test_quantize_layout_gpu(backend, bits):
    _quantize_case(backend, bits, 256, "cuda", tokens=3000, batch=2, heads=4, layout=True)
    _quantize_case(backend, bits, 128, "cuda", tokens=1000, batch=3, heads=2, layout=True)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize(
    "backend,kb,vb,kw",
    [
        ("planar", 3.5, 3, {}),
        ("iso", 3, 3.5, {"batch": 8}),
        ("rotor", 4, 3, {}),
        ("hadamard", 3.5, 3, {}),
        ("none", 4, 3.5, {}),  # five K runs with 6-bit codes (table loads)
        ("planar", 3.5, 3, {"mask_kind": "bool"}),
        ("planar", 3, 3.5, {"mask_kind": "float", "tq": 5}),
        ("iso", 3.5, 3, {"mask_kind": "causal", "tq": 64}),
        ("planar", 3.5, 3.5, {"mask_kind": "kv_len"}),
        ("planar", 3.5, 3, {"splits": 1}),
    ],
)
def test_attention_layout_gpu(backend, kb, vb, kw):
    _attention_case(backend, kb, vb, 256, "cuda", tk=kw.pop("tk", 9000), heads=4, rep=6, layout=True, **kw)
    _attention_case(backend, kb, vb, 128, "cuda", tk=777, heads=2, rep=4, layout=True)


# ---------------------------------------------------------------- prmt table decode (attention DECODE=1)


def _prmt_blocks(bits, codes):
    """The asm operands (per block of prmt.CODES[bits] codes) of codes [N, d] packed in the cache format."""
    import numpy as np

    from rqcompile.kernels import prmt
    from rqcompile.quant.packing import pack

    dim = codes.shape[-1]
    words = pack(codes, bits).contiguous().view(torch.int32).numpy()  # [N, d * bits / 32], little endian
    per = prmt.CODES[bits]
    low = words[:, : dim // per]  # 2/3 bits: the 2-bit low plane; 4 bits: all words
    ins = [low]
    if bits == 3:  # the high plane's halfword of each low-plane word (bits 16..31 garbage: the next halfword)
        half = words[:, dim // 16 :].view(np.uint16).astype(np.uint32)
        nxt = np.roll(half, -1, axis=1)
        ins.append(half | (nxt << 16))
    return ins


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_prmt_emulator_decodes_the_packed_cache(bits):
    """The numpy emulator of the prmt asm (generated from the same steps as the PTX) gives fp16(level) of every code
    of the real packed layout, in prmt.COLUMNS order; levels include -0.0, a subnormal, fp16 max and values that
    round (so the tables must hold round-to-nearest fp16)."""
    import numpy as np

    from rqcompile.kernels import prmt

    g = torch.Generator().manual_seed(bits)
    dim, n = 256, 300
    levels = (torch.randn(2**bits, generator=g) * 3).sort().values
    levels[0], levels[1], levels[-1] = -0.0, 3e-6, 65504.0
    levels[2] = 1 + 2**-11 + 2**-13  # rounds up to 1 + 2**-10
    codes = torch.randint(0, 2**bits, (n, dim), generator=g)
    codes[0] = torch.arange(dim) % 2**bits  # every code at every position
    per = prmt.CODES[bits]
    ins = _prmt_blocks(bits, codes)
    out = prmt.emulate(bits, *ins, *prmt.table_words(levels.numpy(), bits))  # [n, d / per, 2 * pairs]
    assert out.shape == (n, dim // per, per)
    want = levels.numpy().astype(np.float16).view(np.uint16)[codes.numpy()].reshape(n, dim // per, per)
    np.testing.assert_array_equal(out, want[:, :, list(prmt.COLUMNS[bits])])
    assert sorted(prmt.COLUMNS[bits]) == list(range(per))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_prmt_asm_is_the_emulated_program(bits):
    """The PTX has one instruction per step of prmt.program (what the emulator runs) and one split per output pair;
    every input and output operand appears."""
    from rqcompile.kernels import prmt

    inputs, steps, out = prmt.program(bits)
    text = prmt.asm(bits)
    assert "\n" not in text  # Inductor writes it into generated source as a one-line string literal
    statements = [part.strip() + ";" for part in text.strip("{} ").split(";") if part.strip()]
    body = [ln for ln in statements if not ln.startswith(".reg")]
    assert len(body) == len(steps) + len(out)
    for (op, dst, *args), line in zip(steps, body):
        assert line.startswith(f"{op}.b32 rq{dst}, ")
        for a in args[:3] if op == "lop3" else args:
            if isinstance(a, str):
                assert (f"${2 * len(out) + inputs.index(a)}" if a in inputs else f"rq{a}") in line
            elif op not in ("shl", "shr"):
                assert f"0x{a:X}" in line
            else:
                assert line.endswith(f", {a};")
    cons = prmt.constraints(bits).split(",")
    assert cons == ["=h"] * 2 * len(out) + ["r"] * len(inputs)
    for i in range(len(cons)):
        assert f"${i}" in text
    assert "prmt.b32" in text and len(out) * 2 == prmt.CODES[bits]


def _decode_case(
    kb,
    vb,
    dim,
    device,
    tk,
    batch,
    heads,
    rep,
    backend="planar",
    mask_kind=None,
    splits=None,
    tq=1,
    decodes=None,
    variant=None,
    v_along_keys=False,
    **launch,
):
    """The uniform kernel with each decode against the reference: (outputs by decode, reference). `launch`: more
    launch_attention keywords; `v_along_keys`: the kernel reads V re-packed along keys (packing.pack_along_keys)."""
    ks = _state(backend, kb, "k", heads, dim, device)
    vs = _state(backend, vb, "v", heads, dim, device, seed=1)
    k = torch.randn(batch, heads, tk, dim, device=device) * 2
    v = torch.randn(batch, heads, tk, dim, device=device)
    kc, kn = quantizer.quantize(k, ks.rotation, ks.mean, ks.scale, ks.levels, kb, ks.group)
    vc, vn = quantizer.quantize(v, vs.rotation, vs.mean, vs.scale, vs.levels, vb, vs.group)
    q = torch.randn(batch, heads * rep, tq, dim, device=device)
    mask, kv_len, ref_mask = None, None, None
    if mask_kind == "kv_len":
        kv_len = torch.randint(1, tk + 1, (batch,), device=device)
        kv_len[0] = tk
        ref_mask = torch.arange(tk, device=device)[None, None, None, :] < kv_len[:, None, None, None]
    elif mask_kind == "bool":
        mask = ref_mask = torch.rand(batch, 1, 1, tk, device=device) > 0.3
    sm = 1 / math.sqrt(dim)
    ref = quantizer.rotated_attention(q, kc, kn, vc, vn, ks, vs, ref_mask, sm)
    if v_along_keys:
        vc = pack_along_keys(vc, vb, dim)
        launch["v_along_keys"] = True
    args = (q, kc, kn, vc, vn, ks.rotation, ks.scale, ks.levels, vs.rotation, vs.mean, vs.scale, vs.levels, kb, vb)
    if decodes is None:
        decodes = ("tree", "prmt-emulated") if device == "cpu" else ("tree", "prmt", "prmt-emulated")
    outs = {}
    for decode in decodes:
        _poison(device)
        out = kattn.launch_attention(
            *args, mask, sm, kv_len, num_splits=splits, decode=decode, variant=variant, **launch
        )
        assert out.shape == q.shape and not torch.isnan(out).any()
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        assert err < 3e-3, (decode, err)
        outs[decode] = out
    return outs, ref


@cpu_only
@pytest.mark.parametrize(
    "kb,vb,dim,kw",
    [
        (3, 3, 64, {"splits": 3}),
        (2, 4, 64, {"mask_kind": "kv_len", "splits": 2}),
        (4, 2, 64, {"mask_kind": "bool", "tq": 2}),
        (3, 3, 128, {"batch": 1, "heads": 1}),  # 128-column tiles: columns in _spread_chunks' order
        (3, 2, 256, {"batch": 1, "heads": 1}),  # two norm groups (K norms after two dots, V norms in p twice)
        (4, 3, 256, {"batch": 1, "heads": 1, "backend": "iso"}),
        # rotor's blocks of 3 straddle the norm groups' boundary at 128: q's halves rotate across it
        (2, 4, 256, {"batch": 1, "heads": 1, "backend": "rotor", "mask_kind": "kv_len", "splits": 2}),
    ],
)
def test_attention_interpret_prmt_data_path(kb, vb, dim, kw):
    """DECODE=2 (the prmt steps as Triton integer ops, which the interpreter can run) through the whole kernel:
    tables, word loads, the join order, q's column permutation (K) and the accumulator's (V). Same values as the
    tree decode, summed in another order."""
    kw = {"batch": 2, "heads": 2, **kw}
    outs, _ = _decode_case(kb, vb, dim, "cpu", tk=70, rep=3, variant="split", **kw)
    _same_decoded_values(outs["prmt-emulated"], outs["tree"], kb, vb)


def _same_decoded_values(out, tree, kb, vb, bitwise=True):
    """Outputs of the same decoded values. 4-bit tiles keep the natural column order: bitwise equal where the dots
    are the same (`bitwise`). 2/3-bit tiles come with permuted columns, and two norm groups take one half dot each on
    the prmt path, so q.k sums the coordinates in another order (fp32 rounding, ~1e-7), which can flip the fp16
    rounding of a p now and then (~5e-4 of one key's weight): close, not equal."""
    out, tree = out.float(), tree.float()
    if bitwise and kb == 4 and vb == 4:
        assert torch.equal(out, tree), (out - tree).abs().max().item()
    rel = ((out - tree).norm() / tree.norm()).item()
    assert rel < 5e-5, rel  # a wrong level anywhere gives >= 1e-2
    assert (out - tree).abs().max().item() < 2e-3


@pytest.mark.parametrize("opaque", [False, True, "keys-m", "keys-m-vkeys"])
def test_compiled_attention_writes_only_its_partial_results(opaque):
    """torch.compile must see the split kernel write only its partial results. An impure inline asm (the eager
    launch's `_opaque`) defeats torch's analysis, which then assumes every input written, and the compiled program
    copied each layer's whole K/V cache buffers on every decode step; the compiled launch (OPAQUE=False) has none,
    nor has the keys-m kernel (its only asm is the pure prmt decode). Run in a child process: torch analyzes the
    compiled kernel's TTIR, which the interpreter here does not make."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    probe = os.path.join(os.path.dirname(__file__), "kernel_writes_probe.py")
    which = opaque if isinstance(opaque, str) else str(int(opaque))  # "keys-m...": that kernel, never opaque
    run = subprocess.run([sys.executable, probe, which], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    written = set(json.loads(run.stdout.strip().splitlines()[-1]))
    if opaque is True:
        assert {"kc_ptr", "vc_ptr"} <= written  # why the compiled launch goes without it
    else:
        assert written == {"pm_ptr", "pl_ptr", "pacc_ptr"}


def _spy_on(monkeypatch, name: str) -> list:
    """Replace kernel `name` of kernels.attention by a spy that records each launch's keywords (with its grid and the
    compiled kernel under "grid" and "compiled"); anything else (the launcher's warmup) goes to the kernel."""
    seen = []
    real = getattr(kattn, name)

    class Spy:
        def __getitem__(self, grid):
            def launch(*a, **k):
                seen.append({**k, "grid": grid})
                seen[-1]["compiled"] = real[grid](*a, **k)
                return seen[-1]["compiled"]

            return launch

        def __getattr__(self, attr):
            return getattr(real, attr)

    monkeypatch.setattr(kattn, name, Spy())
    return seen


def _tiny_attention_args() -> tuple:
    """launch_attention's 16 leading arguments for a tiny CPU call: 2 query heads over 8 planar 3-bit keys."""
    ks, vs = _state("planar", 3, "k", 1, 64, "cpu"), _state("planar", 3, "v", 1, 64, "cpu", seed=1)
    kc, kn = quantizer.quantize(torch.randn(1, 1, 8, 64), ks.rotation, ks.mean, ks.scale, ks.levels, 3, ks.group)
    args = (torch.randn(1, 2, 1, 64), kc, kn, kc, kn, ks.rotation, ks.scale, ks.levels)
    return args + (vs.rotation, vs.mean, vs.scale, vs.levels, 3, 3, None, 0.125)


def test_only_eager_launches_are_opaque(monkeypatch):
    """The launcher passes OPAQUE only where it launches the kernel itself (no wrap_triton)."""
    seen = _spy_on(monkeypatch, "_attn_split_kernel")
    args = _tiny_attention_args()
    kattn.launch_attention(*args)
    kattn.launch_attention(*args, wrap=lambda kernel: kernel)  # as torch.library.wrap_triton would
    assert [k["OPAQUE"] for k in seen] == [True, False]


def test_the_launch_plan_decides_as_the_launch_and_launches_nothing(monkeypatch):
    """`eager_launch_options` (what torch.compile asks before decomposing rq::attention) names the kernel and the
    launch options an eager launch of the same arguments takes, and launches nothing. The interpreter takes no
    register cap; outside it a decode tile (BLOCK_M 16) of the split kernel takes DEFAULTS["maxnreg"]."""
    seen = _spy_on(monkeypatch, "_attn_split_kernel")
    args = _tiny_attention_args()
    kattn.launch_attention(*args)
    (launch,) = seen
    plan = kattn.eager_launch_options(*args)
    assert plan == ("split", {"num_warps": launch["num_warps"], "num_stages": launch["num_stages"]})
    monkeypatch.setattr(kattn, "interpreting", lambda: False)
    assert kattn.eager_launch_options(*args)[1]["maxnreg"] == kattn.DEFAULTS["maxnreg"]
    assert "maxnreg" not in kattn.eager_launch_options(*args, maxnreg=0)[1]  # maxnreg=0 asks for none
    assert kattn.eager_launch_options(*args, maxnreg=96)[1]["maxnreg"] == 96
    assert len(seen) == 1
    with pytest.raises(TypeError, match="no wrap"):
        kattn.eager_launch_options(*args, wrap=lambda kernel: kernel)


def test_prmt_decode_is_the_tree_in_the_interpreter(monkeypatch):
    """The launcher forces the tree for DECODE=1 where inline asm cannot run."""
    if HAS_CUDA:
        pytest.skip("interpreter only")
    seen = _spy_on(monkeypatch, "_attn_split_kernel")
    _decode_case(3, 3, 64, "cpu", tk=20, batch=1, heads=1, rep=2, decodes=("tree", "prmt", 1, "prmt-emulated"))
    assert [k["DECODE"] for k in seen] == [0, 0, 0, 2]
    assert kattn.DEFAULTS["decode"] == kattn.DECODES["prmt"]  # the default since it was timed (benchmarks/NOTES.md v6)
    with pytest.raises(ValueError):
        kattn.launch_attention(*([None] * 16), decode=7)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("batch,mask_kind", [(1, None), (8, None), (8, "kv_len")])
def test_attention_prmt_decode_gpu(bits, batch, mask_kind):
    """The split kernel's DECODE=1 (inline PTX prmt) at Qwen3.5 shapes (24 query heads, 4 KV heads, d=256, two norm
    groups), context 5000 (partial last tiles): the same decoded values as the tree (equal up to the fp32 summation
    order: the prmt path takes one half tile and one dot per norm group, the tree two full dots with the other half of
    q zeroed; see _same_decoded_values), the same as the Triton transcription of the asm (DECODE=2), and close to
    the reference (checked in _decode_case)."""
    kw = {"batch": batch, "heads": 4, "rep": 6, "mask_kind": mask_kind, "variant": "split"}
    outs, ref = _decode_case(bits, bits, 256, "cuda", tk=5000, **kw)
    _same_decoded_values(outs["prmt"], outs["tree"], bits, bits, bitwise=False)
    # DECODE=2 has no _opaque: Triton gives its dots kWidth 4, another grouping of the products
    _same_decoded_values(outs["prmt"], outs["prmt-emulated"], bits, bits, bitwise=False)
    # mixed widths in one launch: K and V tables of different sizes, one of them with permuted columns
    other = 4 if bits != 4 else 2
    outs, _ = _decode_case(bits, other, 256, "cuda", tk=777, **kw)
    _same_decoded_values(outs["prmt"], outs["tree"], bits, other, bitwise=False)


# ---------------------------------------------------------------- keys as the mma's M operand (variant "keys-m")


@cpu_only
@pytest.mark.parametrize(
    "kernel,dim,kw",
    [
        ("_attn_keys_m_kernel", 256, {"lse": True}),
        ("_attn_keys_m_kernel", 256, {"v_along_keys": True, "backend": "iso"}),
        ("_attn_split_kernel", 64, {"lse": True, "splits": 3}),
        ("_attn_split_layout_kernel", 64, {"layout": True, "backend": "none", "bits": 2.5}),
    ],
)
def test_attention_interpret_reads_a_key_range_without_a_mask(monkeypatch, kernel, dim, kw):
    """A decode step's keys as a range, kv_start <= key < kv_len[b] with no mask (what apply's decode program passes
    since passes.decode_key_range): the kernels against the reference. kv_start 33 falls inside the first tile and
    the splits' bounds follow kv_len; batch row 0 has nothing to read yet (lse -inf, V's mean, no NaN)."""
    seen = _spy_on(monkeypatch, kernel)
    kw = {"backend": "planar", "splits": 2, "bits": 3, **kw}
    bits = kw.pop("bits")
    _attention_case(kw.pop("backend"), bits, bits, dim, "cpu", tk=160, rep=3, mask_kind="key_range", kv_start=33, **kw)
    assert len(seen) == 1 and seen[0]["KV_START"] == 33 and seen[0]["MASK_KIND"] == 0


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("backend,kw", [("planar", {"lse": True}), ("iso", {"v_along_keys": True, "lse": True})])
def test_attention_key_range_gpu(monkeypatch, backend, kw):
    """apply's decode arguments since passes.decode_key_range at Qwen3.5-27B's shapes (batch 8, 24 query heads, 4 KV
    heads, head_dim 256): keys-m with kv_start 33 and kv_len per batch row, no mask; row 0 has no keys yet."""
    seen = _spy_on(monkeypatch, "_attn_keys_m_kernel")
    kw = {"batch": 8, "heads": 4, "rep": 6, "tk": 9008, "mask_kind": "key_range", "kv_start": 33, **kw}
    _attention_case(backend, 3, 3, 256, "cuda", rotation_stages="full", **kw)
    assert len(seen) == 1 and seen[0]["KV_START"] == 33 and seen[0]["MASK_KIND"] == 0


def test_kv_start_must_be_a_non_negative_int():
    with pytest.raises(ValueError, match="kv_start"):
        kattn.launch_attention(*([None] * 16), kv_start=-1)
    with pytest.raises(ValueError, match="kv_start"):
        rqcompile.ops.mask_with_key_range(None, None, 8, kv_start=1.5)


@cpu_only
@pytest.mark.parametrize(
    "kb,vb,dim,kw",
    [
        (3, 3, 256, {"splits": 3}),
        (3, 2, 128, {}),  # one norm group of 128
        (2, 4, 256, {"mask_kind": "kv_len", "splits": 2}),
        (4, 3, 256, {"mask_kind": "bool", "tq": 2, "backend": "iso"}),  # 6 query rows x 2 positions: N = 12
        (4, 4, 128, {"backend": "rotor"}),
        (3, 3, 256, {"backend": "hadamard", "mask_kind": "kv_len"}),  # q rotated by its own kernel (dense rotation)
    ],
)
def test_attention_interpret_keys_m(monkeypatch, kb, vb, dim, kw):
    """The keys-m kernel (the prmt steps in Triton ops under the interpreter) against the reference: the word tile
    in fragment order, the key load order and its inverse, q's and the accumulator's column maps, the transposed
    masks, the per-key softmax sums. 70 keys: a partial last tile, and splits that end inside a tile."""
    seen = _spy_on(monkeypatch, "_attn_keys_m_kernel")
    kw = {"batch": 2, "heads": 2, **kw}
    _decode_case(kb, vb, dim, "cpu", tk=70, rep=3, decodes=("prmt",), variant="keys-m", **kw)
    assert len(seen) == 1 and seen[0]["DECODE"] == 2  # it ran (the interpreter's prmt steps), no fallback


@cpu_only
@pytest.mark.parametrize(
    "mask_kind,tq,row",
    [
        ("bool", 1, True),  # a decode step: [B, 1, 1, T], whose query dim expand leaves at stride T
        ("causal", 4, False),  # each query position sees its own prefix
        ("float", 3, False),  # an additive mask per head and position
    ],
)
def test_a_mask_one_row_per_batch_takes_the_one_row_path(monkeypatch, mask_kind, tq, row):
    """keys-m reads a mask that is the same for every query row of a program as one [BLOCK_N] row per tile
    (MASK_ROW): a decode step's mask is such a row, whatever stride its size-1 dims have (session 21: apply's decode
    steps ran the per-row build, 255 registers against 174 on sm_90). Masks that vary by row keep the per-row path;
    all of them give the reference's result."""
    seen = _spy_on(monkeypatch, "_attn_keys_m_kernel")
    _attention_case("planar", 3, 3, 128, "cpu", tk=90, rep=3, tq=tq, mask_kind=mask_kind, variant="keys-m", splits=2)
    assert len(seen) == 1 and seen[0]["MASK_ROW"] == row


@cpu_only
@pytest.mark.parametrize(
    "dim,rep,tq,kb,why",
    [
        (64, 3, 1, 3, "64 coordinates per norm group"),
        (256, 6, 3, 3, "18 query rows per KV head"),
        (128, 17, 1, 2, "17 query rows per KV head"),
    ],
)
def test_keys_m_hands_other_shapes_to_the_split_kernel(monkeypatch, dim, rep, tq, kb, why):
    """Where the fragment layout does not fit, variant="keys-m" runs the split kernel (and still computes the
    right thing)."""
    keys_m = _spy_on(monkeypatch, "_attn_keys_m_kernel")
    split = _spy_on(monkeypatch, "_attn_split_kernel")
    _decode_case(kb, 3, dim, "cpu", tk=40, batch=1, heads=1, rep=rep, tq=tq, decodes=("prmt",), variant="keys-m")
    assert (len(keys_m), len(split)) == (0, 1), why


@cpu_only
@pytest.mark.parametrize("k_prefetch,v_prefetch", [(True, False), (False, False), (True, True)])
def test_keys_m_reads_the_code_words_ahead_or_through_shared_memory_alike(monkeypatch, k_prefetch, v_prefetch):
    """Both ways keys-m reads the code words (DEFAULTS["k_prefetch"] / ["v_prefetch"]: one tile ahead into
    registers, or the pipeliner's copies through shared memory) give the reference's result. 300 keys in 2 splits of
    3 and 2 tiles, with valid lengths: every tile but a split's first comes from the look-ahead, and the last one's
    reads past the keys, masked."""
    monkeypatch.setitem(kattn.DEFAULTS, "k_prefetch", k_prefetch)
    monkeypatch.setitem(kattn.DEFAULTS, "v_prefetch", v_prefetch)
    seen = _spy_on(monkeypatch, "_attn_keys_m_kernel")
    kw = {"batch": 2, "heads": 2, "rep": 3, "splits": 2, "mask_kind": "kv_len"}
    _decode_case(3, 3, 256, "cpu", tk=300, decodes=("prmt",), variant="keys-m", **kw)
    assert len(seen) == 1 and seen[0]["ABLATE"] == 0
    assert (seen[0]["KPREFETCH"], seen[0]["VPREFETCH"]) == (k_prefetch, v_prefetch)


@cpu_only
def test_timing_ablations_never_run_where_they_cannot_be_timed():
    """`ablate` replaces parts of the keys-m kernel by no-ops (wrong outputs by design, for device timing only): the
    interpreter and the split kernel refuse it rather than return garbage."""
    kw = {"batch": 1, "heads": 1, "rep": 3, "decodes": ("prmt",), "ablate": kattn.ABLATIONS["v-decode"]}
    with pytest.raises(ValueError, match="ablate"):
        _decode_case(3, 3, 256, "cpu", tk=70, variant="keys-m", **kw)
    with pytest.raises(ValueError, match="ablate"):
        _decode_case(3, 3, 256, "cpu", tk=70, variant="split", **kw)
    with pytest.raises(ValueError, match="not a sum of ABLATIONS"):
        _decode_case(3, 3, 256, "cpu", tk=70, variant="keys-m", **{**kw, "ablate": 32})


@pytest.mark.parametrize(
    "vb,dim,kw",
    [
        (3, 256, {"batch": 2, "heads": 2, "rep": 3, "splits": 2, "mask_kind": "kv_len"}),  # 2.5 tiles per split
        (2, 128, {"batch": 1, "heads": 2, "rep": 6, "mask_kind": "bool"}),
    ],
)
def test_keys_m_reads_v_packed_along_keys_as_the_same_values(monkeypatch, vb, dim, kw):
    """The VKEYS prototype (V's codes re-packed along keys, decoded straight into V^T's mma operand, the tile's keys
    in _vkeys_key's order on the scores' rows): the reference's result, and the standard layout's up to the order
    of the sums. 320 keys: tiles that end inside a split, blocks of 16 past the valid lengths."""
    seen = _spy_on(monkeypatch, "_attn_keys_m_kernel")
    device = "cuda" if HAS_CUDA else "cpu"
    torch.manual_seed(0)
    keys, _ = _decode_case(3, vb, dim, device, tk=320, decodes=("prmt",), variant="keys-m", v_along_keys=True, **kw)
    assert seen[-1]["VKEYS"] and not seen[-1]["VPREFETCH"]
    torch.manual_seed(0)
    kw.setdefault("splits", seen[-1]["grid"][0])
    plain, _ = _decode_case(3, vb, dim, device, tk=320, decodes=("prmt",), variant="keys-m", **kw)
    assert not seen[-1]["VKEYS"]
    _same_decoded_values(keys["prmt"], plain["prmt"], 3, vb, bitwise=False)


def test_keys_m_build_query_runs_once_per_specialization_on_dtypes_only(monkeypatch):
    """The launcher's question "how many keys-m programs fit per SM" asks Triton for the build (~180 us of host time
    on the H200) once per specialization: tensors' dtypes and ints' classes (1, multiples of 16), not their values.
    Triton is handed dtype stand-ins, never the tensors (fake ones while torch.compile traces)."""
    from triton.runtime.jit import MockTensor

    asked = []

    class Kernel:
        def warmup(self, *args, grid, **meta):
            asked.append(args)
            return "build"

    monkeypatch.setattr(kattn, "_attn_keys_m_kernel", Kernel())
    monkeypatch.setattr(kattn, "programs_per_sm", lambda compiled, warps, device: 3 if compiled == "build" else 0)
    monkeypatch.setattr(kattn, "_KEYS_M_FITS", {})
    meta = {"num_warps": 4, "VKEYS": False}
    x16, x32 = torch.empty(2, dtype=torch.float16), torch.empty(3, dtype=torch.float32)
    assert kattn._keys_m_fits((x16, 5, 32, 0.1), meta, 0) == 3
    assert kattn._keys_m_fits((torch.empty(7, dtype=torch.float16), 9, 48, 0.2), meta, 0) == 3  # same classes
    assert len(asked) == 1 and isinstance(asked[0][0], MockTensor) and asked[0][1:] == (5, 32, 0.1)
    kattn._keys_m_fits((x32, 5, 32, 0.1), meta, 0)  # another dtype
    kattn._keys_m_fits((x16, 1, 32, 0.1), meta, 0)  # an int of 1
    kattn._keys_m_fits((x16, 5, 32, 0.1), {**meta, "VKEYS": True}, 0)  # another constexpr
    assert len(asked) == 4


@pytest.mark.parametrize(
    "kv_len",
    [torch.tensor([37.5, 20.0, 10.0]), torch.tensor([[37, 20, 10]]), torch.tensor([37, 20]), torch.tensor([True] * 3)],
    ids=["float", "2-D", "wrong batch", "bool"],
)
def test_a_valid_length_that_is_not_integers_per_batch_row_is_refused(kv_len):
    """A float length would be truncated by the kernels where the reference compares with it (37.5 lets key 37
    through); a 2-D one or one of the wrong batch size would be read past its end. Both paths refuse them."""
    args = _tiny_attention_args()
    q = torch.randn(3, *args[0].shape[1:])
    with pytest.raises(ValueError, match="kv_len must be an integer tensor"):
        kattn.launch_attention(q, *args[1:14], None, 0.125, kv_len)
    with pytest.raises(ValueError, match="kv_len must be an integer tensor"):
        rqcompile.ops.reference_attention(q, *args[1:14], None, 0.125, kv_len)


@cpu_only
def _valid_length_case(variant: str, kv_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel output, reference) of one planar 3-bit decode over 64 keys, 3 rows, 2 query heads per KV head, with
    valid lengths `kv_len` [3] (as given to the kernel; the reference gets a contiguous copy)."""
    dim = 128 if variant == "keys-m" else 64  # keys-m wants 128 coordinates per norm group
    ks, vs = _state("planar", 3, "k", 1, dim, "cpu"), _state("planar", 3, "v", 1, dim, "cpu", seed=1)
    k, v = torch.randn(3, 1, 64, dim), torch.randn(3, 1, 64, dim)
    kc, kn = quantizer.quantize(k, ks.rotation, ks.mean, ks.scale, ks.levels, 3, ks.group)
    vc, vn = quantizer.quantize(v, vs.rotation, vs.mean, vs.scale, vs.levels, 3, vs.group)
    q = torch.randn(3, 2, 1, dim)
    args = (q, kc, kn, vc, vn, ks.rotation, ks.scale, ks.levels, vs.rotation, vs.mean, vs.scale, vs.levels, 3, 3)
    out = kattn.launch_attention(*args, None, dim**-0.5, kv_len, num_splits=2, variant=variant)
    return out, rqcompile.ops.reference_attention(*args, None, dim**-0.5, kv_len.contiguous())


@pytest.mark.parametrize("variant", ["split", "keys-m"])
def test_a_valid_length_expanded_over_the_batch_is_read_per_row(variant):
    """fuse_attention's kv_len for a mask with batch dim 1 is a [1] expanded to [B] (stride 0): every row must see
    that length (the kernels index kv_len by row; before session 20 rows b >= 1 read past the one element: on the
    H200 the whole static cache was read at batch 8, and a small stray value would have dropped valid keys)."""
    out, ref = _valid_length_case(variant, torch.tensor([37], dtype=torch.int32).expand(3))
    assert ((out - ref).norm() / ref.norm()).item() < 3e-3


@pytest.mark.parametrize("variant", ["split", "keys-m"])
def test_a_single_valid_length_holds_for_every_batch_row(variant):
    """kv_len [1] with 3 batch rows: the reference broadcasts it, and the kernels read it for every row (they index
    kv_len by row, so it is expanded to the batch first, not read past its one element)."""
    torch.manual_seed(0)
    out, ref = _valid_length_case(variant, torch.tensor([37]))
    assert ((out - ref).norm() / ref.norm()).item() < 3e-3
    torch.manual_seed(0)  # the same inputs, a length per row
    rows, _ = _valid_length_case(variant, torch.tensor([37, 37, 37]))
    assert torch.equal(out, rows)


@pytest.mark.parametrize("variant", ["split", "keys-m"])
@pytest.mark.parametrize("dtype,past", [(torch.int32, 100), (torch.int64, 2**32 + 10)])
def test_valid_lengths_out_of_range_read_no_key_or_every_key(variant, dtype, past):
    """A valid length below 0 means no key and one past the cache every key, as in the reference (the kernels clamp
    it before telling the compiler the bounds are non-negative). int64 lengths are read as they are, clamped before
    narrowing: 2**32 + 10 is every key, not 10."""
    out, ref = _valid_length_case(variant, torch.tensor([-5, past, 40], dtype=dtype))
    assert torch.isfinite(out).all()
    assert ((out - ref).norm() / ref.norm()).item() < 3e-3


@cpu_only
def test_v_along_keys_where_keys_m_cannot_read_it_the_split_kernel_reads_a_per_token_copy(monkeypatch):
    """head_dim 64 (keys-m wants 128 per norm group): the split kernel runs on V re-packed per token, with the
    result of the per-token codes, bit for bit."""
    seen = _spy_on(monkeypatch, "_attn_split_kernel")
    ks, vs = _state("planar", 3, "k", 1, 64, "cpu"), _state("planar", 3, "v", 1, 64, "cpu", seed=1)
    kc, kn = quantizer.quantize(torch.randn(1, 1, 32, 64), ks.rotation, ks.mean, ks.scale, ks.levels, 3, ks.group)
    vc, vn = quantizer.quantize(torch.randn(1, 1, 32, 64), vs.rotation, vs.mean, vs.scale, vs.levels, 3, vs.group)
    args = (torch.randn(1, 2, 1, 64), kc, kn, vc, vn, ks.rotation, ks.scale, ks.levels)
    tail = (vs.rotation, vs.mean, vs.scale, vs.levels, 3, 3, None, 0.125)
    along = list(args)
    along[3] = pack_along_keys(vc, 3, 64)
    assert not torch.equal(along[3], vc)
    expected = kattn.launch_attention(*args, *tail)
    seen.clear()
    out = kattn.launch_attention(*along, *tail, v_along_keys=True)
    assert len(seen) == 1 and torch.equal(out, expected)


def test_keys_m_variant_is_validated():
    with pytest.raises(ValueError, match="variant"):
        kattn.launch_attention(*([None] * 16), variant="fast")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize(
    "kb,vb,dim,kw",
    [
        (3, 3, 256, {"batch": 1}),
        (3, 3, 256, {"batch": 8, "mask_kind": "kv_len"}),
        (2, 2, 256, {"batch": 8}),
        (4, 4, 256, {"batch": 8, "mask_kind": "bool"}),
        (4, 2, 256, {"batch": 2, "backend": "iso"}),
        (3, 4, 128, {"batch": 4, "backend": "rotor", "mask_kind": "kv_len"}),
        (3, 3, 256, {"batch": 2, "backend": "hadamard", "tq": 2}),
    ],
)
def test_attention_keys_m_gpu(monkeypatch, kb, vb, dim, kw):
    """The keys-m kernel (inline PTX prmt, wgmma with K in registers) at real sizes, context 5000 (partial last tiles):
    close to the reference (checked in _decode_case) and the same decoded values as the split kernel (up to the fp32
    summation order of the dots)."""
    seen = _spy_on(monkeypatch, "_attn_keys_m_kernel")
    kw = {"heads": 4, "rep": 6, **kw}
    torch.manual_seed(0)
    keys_m, _ = _decode_case(kb, vb, dim, "cuda", tk=5000, decodes=("prmt",), variant="keys-m", **kw)
    assert len(seen) == 1 and seen[0]["DECODE"] == 1
    torch.manual_seed(0)  # _decode_case draws its inputs from the global generator: the same inputs again
    # as many splits as keys-m took (its own count, splits.wave_splits): each split's running max sets p's fp16
    # rounding, so other splits would differ by more than the summation order
    kw.setdefault("splits", seen[0]["grid"][0])
    split, _ = _decode_case(kb, vb, dim, "cuda", tk=5000, decodes=("prmt",), variant="split", **kw)
    _same_decoded_values(keys_m["prmt"], split["prmt"], kb, vb, bitwise=False)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("case", ["plain", "kv_len", "row_mask", "query_mask", "rope", "rope_table"])
@pytest.mark.parametrize("backend", ["iso", "planar"])
def test_keys_m_splits_fill_whole_waves_of_the_programs_that_fit(monkeypatch, case, backend):
    """A decode launch on CUDA takes splits.wave_splits' count for as many programs per SM as the build that runs
    allows (registers and shared memory of the compiled kernel). keys_m_programs_per_sm, the launcher's first guess,
    is right for the default's cases (no mask or a row-constant one, without the rope term), so those compile once."""
    from rqcompile.kernels.common import sm_count
    from rqcompile.kernels.splits import programs_per_sm, wave_splits

    seen = _spy_on(monkeypatch, "_attn_keys_m_kernel")
    batch, heads, rep, tk, dim = 8, 4, 6, 8192, 256
    ks, vs = _state(backend, 3, "k", heads, dim, "cuda"), _state(backend, 3, "v", heads, dim, "cuda", seed=1)
    k = torch.randn(batch, heads, tk, dim, device="cuda")
    kc, kn = quantizer.quantize(k, ks.rotation, ks.mean, ks.scale, ks.levels, 3, ks.group)
    q = torch.randn(batch, heads * rep, 1, dim, device="cuda")
    mask = kv_len = rope_ab = rope_freq = table = None
    if case == "kv_len":
        kv_len = torch.full((batch,), tk, device="cuda")
    elif case == "row_mask":
        mask = torch.rand(batch, 1, 1, tk, device="cuda") > 0.1
    elif case == "query_mask":
        mask = torch.randn(batch, heads * rep, 1, tk, device="cuda")
    elif case.startswith("rope"):
        rope_ab, rope_freq = torch.randn(batch, heads * rep, 1, 64, device="cuda"), torch.rand(32, device="cuda")
        table = rope_term.rope_table(rope_freq, tk) if case == "rope_table" else None
    args = (q, kc, kn, kc, kn, ks.rotation, ks.scale, ks.levels, vs.rotation, vs.mean, vs.scale, vs.levels, 3, 3)
    kattn.launch_attention(*args, mask, 1 / 16, kv_len, rope_ab=rope_ab, rope_inv_freq=rope_freq, rope_table=table)
    (launch,) = seen
    fits = programs_per_sm(launch["compiled"], 4, 0)
    assert launch["grid"] == (wave_splits(tk // 64, batch * heads, sm_count(0), fits), batch * heads, 1)
    if case in ("plain", "row_mask"):
        assert kattn.keys_m_programs_per_sm(launch["MASK_KIND"] != 0 and not launch["MASK_ROW"], False) == fits


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_keys_m_takes_a_register_cap_when_asked(monkeypatch):
    """launch_attention(maxnreg=...) reaches the keys-m build (eager launches; it used to be dropped), and the split
    count is chosen for the capped build's programs per SM."""
    from rqcompile.kernels.common import sm_count
    from rqcompile.kernels.splits import programs_per_sm, wave_splits

    seen = _spy_on(monkeypatch, "_attn_keys_m_kernel")
    torch.manual_seed(0)
    _decode_case(3, 3, 256, "cuda", tk=5000, batch=8, heads=4, rep=6, decodes=("prmt",), maxnreg=128)
    assert len(seen) == 1 and seen[0]["maxnreg"] == 128
    compiled = seen[0]["compiled"]
    compiled._init_handles()
    assert compiled.n_regs <= 128 and programs_per_sm(compiled, 4, 0) == 4
    assert seen[0]["grid"][0] == wave_splits(-(-5000 // 64), 8 * 4, sm_count(0), 4)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("batch,mask_kind,kv_start", [(8, "key_range", 1), (1, "kv_len", 0)])
def test_an_eager_keys_m_decode_takes_the_register_cap_where_it_buys_splits(monkeypatch, batch, mask_kind, kv_start):
    """`DEFAULTS["keys_m_maxnreg"]`: apply's default decode (dense K rotation, V along keys, kv_len, kv_start) builds
    keys-m with more than 168 registers, two programs per SM. An eager launch takes the cap where three programs give
    wave_splits a larger split count (batch 8 at 32K keys), and launches uncapped where the count stays (batch 1:
    the cap would only add its spills); the output is the reference's either way. A wrapped launch (what
    torch.compile's wrap_triton gives, which would drop the option) never names it."""
    from rqcompile.kernels.common import sm_count
    from rqcompile.kernels.splits import programs_per_sm, wave_splits

    monkeypatch.setitem(kattn.DEFAULTS, "keys_m_maxnreg", 168)
    seen = _spy_on(monkeypatch, "_attn_keys_m_kernel")
    tk, heads = 32768, 4
    gains = wave_splits(tk // 64, batch * heads, sm_count(0), 3) > wave_splits(tk // 64, batch * heads, sm_count(0), 2)
    assert gains == (batch == 8)  # the premise of each case, on this GPU's SM count
    torch.manual_seed(0)
    _attention_case(
        "iso", 3, 3, 256, "cuda", tk=tk, batch=batch, heads=heads, rep=6, mask_kind=mask_kind, kv_start=kv_start,
        v_along_keys=True, rotation_stages="full",
    )  # fmt: skip
    (launch,) = seen
    compiled = launch["compiled"]
    compiled._init_handles()
    fits = programs_per_sm(compiled, 4, 0)
    assert launch["grid"][0] == wave_splits(tk // 64, batch * heads, sm_count(0), fits)
    if batch == 1:
        assert "maxnreg" not in launch and compiled.n_regs > 168 and fits == 2
    else:
        assert launch.get("maxnreg") == 168 and compiled.n_regs <= 168 and fits == 3
        # the same call through a wrapper (as torch.compile's wrap_triton is) does not name the cap
        q = torch.randn(batch, heads * 6, 1, 256, device="cuda")
        ks = _state("iso", 3, "k", heads, 256, "cuda", rotation_stages="full")
        x = torch.randn(batch, heads, tk, 256, device="cuda")
        kc, kn = quantizer.quantize(x, *ks.tensors().values(), 3, ks.group)
        st = (ks.rotation, ks.scale, ks.levels, ks.rotation, ks.mean, ks.scale, ks.levels, 3, 3)
        args = (q, kc, kn, pack_along_keys(kc, 3, 256), kn, *st, None, 1 / 16, torch.full((batch,), tk, device="cuda"))
        for wrap, capped in ((None, True), (lambda kernel: kernel, False)):
            kattn.launch_attention(*args, wrap=wrap, v_along_keys=True, kv_start=1)
            assert ("maxnreg" in seen[-1]) == capped


def _capped_decode_call(batch: int, tk: int = 32768) -> tuple:
    """rq::attention's arguments for apply's default decode at Qwen3.5-27B's shape (iso full mixing, 3 bits, V along
    keys, kv_len, kv_start 1): the call whose eager launch takes keys-m's register cap at batch 8, not at batch 1.
    The codes are random bytes (the tests compare launches of one kernel with each other, not with the reference):
    a quantized 32K-key cache at batch 8 held ~40 GB of the GPU in the reference's float64 rotation."""
    heads, dim = 4, 256
    q = torch.randn(batch, heads * 6, 1, dim, device="cuda", dtype=torch.bfloat16)
    ks = _state("iso", 3, "k", heads, dim, "cuda", rotation_stages="full")

    def codes_and_norms():
        codes = torch.randint(0, 256, (batch, heads, tk, dim * 3 // 8), dtype=torch.uint8, device="cuda")
        return codes, torch.rand(batch, heads, tk, dim // 128, device="cuda", dtype=torch.float16) + 0.5

    (kc, kn), (vc, vn) = codes_and_norms(), codes_and_norms()
    st = (ks.rotation, ks.scale, ks.levels, ks.rotation, ks.mean, ks.scale, ks.levels, 3, 3)
    args = (q, kc, kn, pack_along_keys(vc, 3, dim), vn, *st, None, 1 / 16)
    kv_len = torch.randint(tk // 2, tk + 1, (batch,), device="cuda", dtype=torch.int32)
    return args, {"kv_len": kv_len, "v_along_keys": True, "kv_start": 1}


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("batch", [8, 1])
def test_a_compiled_call_the_eager_launch_caps_stays_the_op_and_gives_the_eager_output(monkeypatch, batch):
    """torch 2.11's Inductor drops a user kernel's `maxnreg`, so a decomposed call would run keys-m's uncapped build
    (two programs per SM where the capped one fits three). Under torch.compile a call whose eager launch takes the
    cap stays rq::attention: Inductor calls the op, i.e. the eager launcher, which runs the capped build with the
    same splits, and the output is the eager one bit for bit. A call the launcher would not cap (batch 1) is
    decomposed into the kernels as before."""
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setitem(kattn.DEFAULTS, "keys_m_maxnreg", 168)
    torch.manual_seed(0)
    args, kw = _capped_decode_call(batch)
    kernel, options = kattn.eager_launch_options(*args, **kw)
    assert kernel == "keys-m" and options.get("maxnreg") == (168 if batch == 8 else None)

    def attend(*a):
        return torch.ops.rq.attention(*a, **kw)

    torch._dynamo.reset()
    seen = _spy_on(monkeypatch, "_attn_keys_m_kernel") if batch == 8 else []  # wrap_triton takes no spy
    out, code = run_and_get_code(torch.compile(attend, fullgraph=True), *args)
    src = "\n".join(code)
    if batch == 8:
        assert "torch.ops.rq.attention.default(" in src and "_attn_keys_m_kernel" not in src, src[-3000:]
        assert [launch.get("maxnreg") for launch in seen] == [168]
    else:
        assert "_attn_keys_m_kernel" in src and "torch.ops.rq.attention.default(" not in src, src[-3000:]
    eager = torch.ops.rq.attention(*args, **kw)
    assert not out.isnan().any()
    if batch == 8:
        assert torch.equal(out, eager)
    else:  # the same kernels and splits through Inductor's launch
        assert ((out - eager).float().norm() / eager.float().norm()).item() < 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_aotinductor_compiles_a_call_the_eager_launch_caps_into_the_package(tmp_path, monkeypatch):
    """AOTInductor's package must hold every kernel (no call back into the Python launcher), so there the capped
    call is decomposed as before, at the uncapped build's register count."""
    import zipfile

    from torch._inductor import aoti_compile_and_package

    monkeypatch.setitem(kattn.DEFAULTS, "keys_m_maxnreg", 168)
    torch.manual_seed(0)
    args, kw = _capped_decode_call(8, tk=16384)
    assert kattn.eager_launch_options(*args, **kw)[1].get("maxnreg") == 168

    class Attend(torch.nn.Module):
        def forward(self, *a):
            return torch.ops.rq.attention(*a, **kw)

    ep = torch.export.export(Attend(), args)
    path = aoti_compile_and_package(ep, package_path=str(tmp_path / "attend.pt2"))
    with zipfile.ZipFile(path) as package:
        names = package.namelist()
        text = "\n".join(package.read(n).decode(errors="ignore") for n in names if n.endswith((".cpp", ".py", ".json")))
    assert "attn_keys_m_kernel" in text or any("attn_keys_m_kernel" in n for n in names), names
    assert "proxy_executor_call_function" not in text  # how an AOTI package calls an op it does not compile


# ---------------------------------------------------------------- the rope_ab score term (rq::attention's rope_ab)

# (backend, K bits, V bits, head_dim, h pairs, the kernel that must run, _attention_case keywords); 300 key slots: the
# fastest pair's angle passes 299 radians, the splits start at slots 64 * k (the angle is the slot's, not the split's)
ROPE_CASES = [
    # decode, GQA 3, h = d/2, kv_len shorter than the cache, lse
    ("planar", 3, 3, 64, 32, "split", {"mask_kind": "kv_len", "splits": 3, "lse": True}),
    # prefill-like: 4 positions under a causal mask, partial rotary (h = 8 of 32 pairs), lse
    ("iso", 4, 2, 64, 8, "split", {"mask_kind": "causal", "tq": 4, "splits": 2, "lse": True, "rep": 2}),
    ("rotor", 2, 4, 64, 8, "split", {"mask_kind": "float", "tq": 3}),  # additive float mask per row
    # h not a power of two (ROPE_K 16, 4 padded pairs); a fully masked batch row (lse -inf, V's mean)
    ("planar", 3, 3, 64, 12, "split", {"mask_kind": "bool", "splits": 2, "lse": True}),
    ("hadamard", 3, 3, 64, 1, "split", {}),  # one pair; q rotated by its own kernel
    # Qwen3.5-27B's shape: head_dim 256 (two norm groups), 6 query heads per KV head, partial rotary h = 32, decode
    ("planar", 3, 3, 256, 32, "keys-m", {"batch": 1, "rep": 6, "mask_kind": "kv_len", "splits": 2, "lse": True}),
    # ... with V packed along keys (apply's GPU layout) and a bool row per batch
    ("iso", 3, 3, 256, 32, "keys-m", {"rep": 6, "mask_kind": "bool", "v_along_keys": True, "tk": 304}),
    # ... and apply's decode arguments since passes.decode_key_range: no mask, keys [kv_start, kv_len[b])
    (
        "planar",
        3,
        3,
        256,
        32,
        "keys-m",
        {"rep": 6, "mask_kind": "key_range", "kv_start": 33, "v_along_keys": True, "tk": 304},
    ),
    # full rotary at head_dim 128 (ROPE_K 64), 2 positions x 3 query heads, a bool mask (batch row 0 fully masked)
    ("iso", 4, 3, 128, 64, "keys-m", {"heads": 1, "tq": 2, "mask_kind": "bool"}),
    # 18 query rows per KV head: past keys-m's 16, the split kernel (BLOCK_M 32) takes the rope call
    ("planar", 2, 3, 128, 16, "split", {"batch": 1, "heads": 1, "rep": 6, "tq": 3, "mask_kind": "causal"}),
    # a calibrated bit allocation: the layout kernel
    ("iso", 3.5, 3, 64, 8, "layout", {"mask_kind": "causal", "tq": 3, "splits": 2, "layout": True, "lse": True}),
]
ROPE_KERNELS = {"split": "_attn_split_kernel", "keys-m": "_attn_keys_m_kernel", "layout": "_attn_split_layout_kernel"}


@cpu_only
@pytest.mark.parametrize("backend,kb,vb,dim,h,kernel,kw", ROPE_CASES)
def test_attention_interpret_rope(monkeypatch, backend, kb, vb, dim, h, kernel, kw):
    """Each kernel with a rope_ab term against the op's reference (output, and lse where asked): the term's slot
    angles, weights per query row (GQA rows x positions), its scaling, and masks on top of it. The default variant
    (keys-m) runs: it takes the decode shapes and leaves the rest to the split kernel, rope or not."""
    seen = {name: _spy_on(monkeypatch, fn) for name, fn in ROPE_KERNELS.items()}
    kw = {"batch": 2, "heads": 2, "rep": 3, **kw}
    _attention_case(backend, kb, vb, dim, "cpu", rope_h=h, **{"tk": 300, **kw})
    assert {name: len(calls) for name, calls in seen.items() if calls} == {kernel: 1}
    assert seen[kernel][0]["ROPE_K"] == max(16, triton.next_power_of_2(h))
    assert seen[kernel][0].get("VKEYS", False) == kw.get("v_along_keys", False)


@cpu_only
@pytest.mark.parametrize("backend,kb,vb,dim,h,kernel,kw", [c for c in ROPE_CASES if c[5] == "keys-m"])
def test_attention_interpret_rope_table(monkeypatch, backend, kb, vb, dim, h, kernel, kw):
    """keys-m reading the rope term's cos / sin from rope_term.rope_table instead of computing them: the same
    reference, the same tolerance, the build with ROPE_TABLE."""
    seen = _spy_on(monkeypatch, "_attn_keys_m_kernel")
    kw = {"batch": 2, "heads": 2, "rep": 3, "tk": 300, **kw}
    _attention_case(backend, kb, vb, dim, "cpu", rope_h=h, rope_table=True, **kw)
    assert len(seen) == 1 and seen[0]["ROPE_TABLE"] and seen[0]["ROPE_K"] == max(16, triton.next_power_of_2(h))


def test_rope_table_holds_the_fp16_cos_and_sin_of_the_fp32_slot_angles():
    """Row j: cos(float32(j) * theta_i) in column i, sin in column ROPE_K + i, zeros in the padding, each rounded
    once from the exact value; the angle is the fp32 product the reference takes (at slot 70,000 the product's
    rounding moves the fastest pair's angle by up to ~4e-3 rad, so a float64 product would differ)."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 24, 2, dtype=torch.float32) / 24)  # h = 12: ROPE_K 16
    table = rope_term.rope_table(inv_freq, 70_001)
    assert table.dtype == torch.float16 and table.shape == (70_001, 32)
    angles = (torch.arange(70_001, dtype=torch.float32)[:, None] * inv_freq).double()
    assert torch.equal(table[:, :12], angles.cos().half()) and torch.equal(table[:, 16:28], angles.sin().half())
    assert not table[:, 12:16].any() and not table[:, 28:].any()
    exact64 = (torch.arange(70_001, dtype=torch.float64)[:, None] * inv_freq.double()).cos().half()
    assert not torch.equal(table[:, :12], exact64)


@cpu_only
def test_a_rope_table_that_does_not_fit_the_call_is_refused():
    """Wrong dtype, too few slots, the wrong width, not contiguous, or a table without the term: a ValueError naming
    rope_table."""
    args = _tiny_attention_args()
    ab, freq = torch.randn(1, 2, 1, 6), torch.rand(3)
    good = rope_term.rope_table(freq, 16)
    kattn.launch_attention(*args, rope_ab=ab, rope_inv_freq=freq, rope_table=good)
    for bad in (good.float(), good[:7], good[:, :16], torch.cat([good, good], 1), good.t().contiguous().t()):
        with pytest.raises(ValueError, match="rope_table"):
            kattn.launch_attention(*args, rope_ab=ab, rope_inv_freq=freq, rope_table=bad)
    with pytest.raises(ValueError, match="rope_table"):
        kattn.launch_attention(*args, rope_table=good)


@cpu_only
def test_attention_interpret_rope_split_variant_at_keys_m_shapes(monkeypatch):
    """variant="split" forced on a decode shape keys-m would take: the split kernel's rope term at head_dim 256 with
    the prmt data path (DECODE 2: two norm groups, one half dot each, q's columns permuted)."""
    seen = _spy_on(monkeypatch, "_attn_split_kernel")
    kw = {"batch": 1, "rep": 6, "rope_h": 32, "variant": "split", "decode": "prmt-emulated", "lse": True}
    _attention_case("planar", 3, 3, 256, "cpu", tk=300, **kw)
    assert len(seen) == 1 and seen[0]["ROPE_K"] == 32 and seen[0]["DECODE"] == 2


@cpu_only
def test_rope_free_launches_build_without_the_term(monkeypatch):
    """Without rope_ab the kernels get ROPE_K 0 (the build they had before the term); with it, h padded to >= 16."""
    seen = _spy_on(monkeypatch, "_attn_split_kernel")
    args = _tiny_attention_args()
    kattn.launch_attention(*args)
    kattn.launch_attention(*args, rope_ab=torch.randn(1, 2, 1, 6), rope_inv_freq=torch.rand(3))
    assert [k["ROPE_K"] for k in seen] == [0, 16]
    with pytest.raises(ValueError, match="rope_inv_freq"):
        kattn.launch_attention(*args, rope_ab=torch.randn(1, 2, 1, 6), rope_inv_freq=torch.rand(4))


def test_attention_supported_takes_rope_calls():
    """rope calls the kernels read (any h up to d/2, rows broadcast from 1) are theirs; odd widths, h past d/2 or rows
    that do not broadcast go to the reference, and so do calls unsupported for other reasons."""
    q = torch.empty(2, 24, 1, 256)
    kc, vc = torch.empty(2, 4, 10, 96, dtype=torch.uint8), torch.empty(2, 4, 10, 96, dtype=torch.uint8)
    kn = torch.empty(2, 4, 10, 2, dtype=torch.float16)

    def ok(rope_ab, query=q):
        return kattn.attention_supported(query, kc, vc, 3, 3, kn, kn, rope_ab=rope_ab)

    assert ok(None) and ok(torch.empty(2, 24, 1, 64)) and ok(torch.empty(1, 24, 1, 64))
    assert ok(torch.empty(2, 24, 1, 24)) and ok(torch.empty(2, 24, 1, 2)) and ok(torch.empty(2, 24, 1, 256))
    assert not ok(torch.empty(2, 24, 1, 63)) and not ok(torch.empty(2, 24, 1, 258))
    assert not ok(torch.empty(2, 12, 1, 64)) and not ok(torch.empty(24, 1, 64))
    assert not ok(torch.empty(2, 24, 1, 64), torch.empty(2, 24, 1, 48))  # head_dim 48: no kernel at all


@cpu_only
def test_cuda_dispatch_sends_rope_calls_to_the_kernels():
    """The rq ops' CUDA implementations pass rope_ab / rope_inv_freq on, positionally or by name, and the kernels
    take them (here in the interpreter); rope_ab broadcast over the query positions included."""
    from rqcompile import kernels

    ks, vs = _state("planar", 3, "k", 2, 64), _state("iso", 3, "v", 2, 64, seed=1)
    k, v = torch.randn(2, 2, 90, 64) * 2, torch.randn(2, 2, 90, 64)
    kc, kn = quantizer.quantize(k, ks.rotation, ks.mean, ks.scale, ks.levels, 3, ks.group)
    vc, vn = quantizer.quantize(v, vs.rotation, vs.mean, vs.scale, vs.levels, 3, vs.group)
    q = torch.randn(2, 4, 2, 64)
    ab, inv_freq = _rope_inputs(2, 4, 1, 16, "cpu")  # one set of weights for both positions
    mask = torch.ones(2, 90, dtype=torch.bool).tril(88)
    args = (q, kc, kn, vc, vn, ks.rotation, ks.scale, ks.levels, vs.rotation, vs.mean, vs.scale, vs.levels, 3, 3)
    args = (*args, mask, 0.125)
    kv_len = torch.tensor([90, 57])
    assert kernels._attention_ok(*args, kv_len, None, None, None, None, ab, inv_freq)
    assert kernels._attention_ok(*args, kv_len=kv_len, rope_ab=ab, rope_inv_freq=inv_freq)
    ref, ref_lse = rqcompile.ops.reference_attention_lse(*args, kv_len, None, None, None, None, ab, inv_freq)
    out = kernels._attention_launch(*args, kv_len=kv_len, rope_ab=ab, rope_inv_freq=inv_freq)
    assert not torch.isnan(out).any() and ((out - ref).norm() / ref.norm()).item() < 3e-3
    out, lse = kernels._attention_lse_launch(*args, kv_len, None, None, None, None, ab, inv_freq)
    assert ((out - ref).norm() / ref.norm()).item() < 3e-3
    _check_lse(lse, ref_lse)


@pytest.mark.parametrize(
    "kernel,table", [("_attn_split_kernel", False), ("_attn_keys_m_kernel", False), ("_attn_keys_m_kernel", True)]
)
def test_compiled_rope_attention_writes_only_its_partial_results(kernel, table):
    """With the rope term, torch's analysis of the compiled kernel (as tests/kernel_writes_probe.py runs it, the rope
    arguments added) still finds only the partial results written: rope_ab, the frequencies and keys-m's rope_table
    are read only."""
    import json
    import subprocess
    import sys

    extra = '"ROPE_TABLE": True, "rtab_ptr": torch.empty(64, 64, dtype=torch.float16)' if table else ""
    code = f"""
import json, sys, torch
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
import kernel_writes_probe as probe
from torch._higher_order_ops import triton_kernel_wrap as wrap
name = "identify_accessed_tensors" if hasattr(wrap, "identify_accessed_tensors") else "identify_mutated_tensors"
real = getattr(wrap, name)
def with_rope(kernel, kwargs, *rest):
    rope = {{"ROPE_K": 32, "rope_ptr": torch.empty(1, 24, 1, 64), "rfreq_ptr": torch.empty(32), "rope_h": 32, {extra}}}
    return real(kernel, {{**kwargs, **rope}}, *rest)
setattr(wrap, name, with_rope)
print(json.dumps(probe.written(False, probe.kattn.{kernel})))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert set(json.loads(run.stdout.strip().splitlines()[-1])) == {"pm_ptr", "pl_ptr", "pacc_ptr"}


# (backend, K bits, V bits, head_dim, h pairs, the kernel that must run, _attention_case keywords) at real sizes
ROPE_GPU_CASES = [
    # Qwen3.5-27B decode through rq::attention(_lse): keys-m, partial rotary h = 32 of 128 pairs
    ("planar", 3, 3, 256, 32, "keys-m", {"batch": 8}),
    ("iso", 3, 3, 256, 32, "keys-m", {"batch": 4, "lse": True, "rotation_stages": "full"}),
    ("planar", 3, 3, 256, 32, "keys-m", {"batch": 8, "mask_kind": "kv_len"}),  # launched directly
    # a bool row per batch ([B, 1, 1, T], as apply's decode steps pass it): keys-m's one-row mask with the term
    ("iso", 3, 3, 256, 32, "keys-m", {"batch": 4, "mask_kind": "bool", "rotation_stages": "full"}),
    # ... and V packed along keys, as apply's GPU programs read it (what a calibrated Qwen3.5-27B decode runs)
    (
        "iso",
        3,
        3,
        256,
        32,
        "keys-m",
        {"batch": 4, "mask_kind": "bool", "rotation_stages": "full", "v_along_keys": True, "tk": 9008},
    ),
    # ... and as apply's decode step passes it since passes.decode_key_range: no mask, keys [33, kv_len[b])
    ("iso", 3, 3, 256, 32, "keys-m", {"batch": 8, "mask_kind": "key_range", "kv_start": 33, "v_along_keys": True}),
    ("planar", 4, 4, 256, 32, "split", {"batch": 2, "variant": "split", "lse": True}),  # the split kernel forced
    # prefill: 64 positions under a causal mask (split kernel, BLOCK_M 64)
    ("iso", 3, 3, 256, 32, "split", {"batch": 1, "mask_kind": "causal", "tq": 64, "lse": True}),
    ("planar", 3.5, 3, 256, 32, "layout", {"batch": 2, "layout": True, "mask_kind": "float", "tq": 5}),
    # SmolLM2-like: head_dim 64, full rotary h = 32
    ("planar", 3, 3, 64, 32, "split", {"batch": 8, "heads": 3, "rep": 3, "tk": 4000}),
    ("hadamard", 3, 3, 128, 64, "keys-m", {"batch": 4, "heads": 2, "rep": 4, "lse": True}),  # full rotary
]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("backend,kb,vb,dim,h,kernel,kw", ROPE_GPU_CASES)
def test_attention_rope_gpu(monkeypatch, backend, kb, vb, dim, h, kernel, kw):
    """The rope_ab term at real sizes (9000 key slots: angles up to 9e3 radians), each kernel against the op's
    reference; the expected kernel ran with the term."""
    seen = {name: _spy_on(monkeypatch, fn) for name, fn in ROPE_KERNELS.items()}
    kw = {"heads": 4, "rep": 6, "tk": 9008 if kw.get("v_along_keys") else 9000, **kw}
    _attention_case(backend, kb, vb, dim, "cuda", rope_h=h, **kw)
    assert {name: len(calls) for name, calls in seen.items() if calls} == {kernel: 1}
    assert seen[kernel][0]["ROPE_K"] == max(16, triton.next_power_of_2(h))
    assert seen[kernel][0].get("VKEYS", False) == kw.get("v_along_keys", False)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("backend,kb,vb,dim,h,kernel,kw", [c for c in ROPE_GPU_CASES if c[5] == "keys-m"])
def test_attention_rope_table_gpu(monkeypatch, backend, kb, vb, dim, h, kernel, kw):
    """keys-m reading the rope term's cos / sin from rope_term.rope_table at real sizes, against the op's reference."""
    seen = _spy_on(monkeypatch, "_attn_keys_m_kernel")
    kw = {"heads": 4, "rep": 6, "tk": 9008 if kw.get("v_along_keys") else 9000, **kw}
    _attention_case(backend, kb, vb, dim, "cuda", rope_h=h, rope_table=True, **kw)
    assert len(seen) == 1 and seen[0]["ROPE_TABLE"] and seen[0]["ROPE_K"] == max(16, triton.next_power_of_2(h))
