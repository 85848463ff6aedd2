"""The "v2" quantize kernel (slot tiles, word packing, exact scale-search thresholds) against the v1 kernel and
the reference quantizer.

Without CUDA the kernels run under TRITON_INTERPRET=1 on small CPU tensors (codes equal exactly); the `gpu` test
compares v2 with v1 at real sizes on the device (codes equal up to float ties, judged as tests/test_kernels.py does).
"""

from __future__ import annotations

import importlib
import os

import numpy as np
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # also set by conftest.py, before any kernel module is imported

import test_kernels as tk  # noqa: E402  (tests/ is on sys.path: rootdir-style test modules)
import ties  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from rqcompile.kernels import quantize as kquant  # noqa: E402
from rqcompile.kernels import quantize_v2  # noqa: E402
from rqcompile.quant import quantizer  # noqa: E402
from rqcompile.quant.codebook import boundaries  # noqa: E402
from rqcompile.quant.rotations import rotate  # noqa: E402

if not HAS_CUDA:
    kquant = importlib.reload(kquant)


@pytest.fixture(autouse=True)
def _interpret_mode(monkeypatch):
    """Rebuild the kernels in interpreter mode right before each CPU test (as tests/test_kernels.py does)."""
    global kquant
    if not HAS_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        kquant = importlib.reload(kquant)


def _inputs(backend, bits, dim, tokens, search, device="cpu", batch=2, heads=2, seed=0, **config):
    if not search:
        config["scale_search"] = ()
    st = tk._state(backend, bits, "k", heads, dim, device, seed=seed, **config)
    g = torch.Generator().manual_seed(seed + 3)
    x = (torch.randn(batch, tokens, heads, dim, generator=g) * 2).to(device).transpose(1, 2)  # strided, as K/V
    return st, x, (st.rotation, st.mean, st.scale, st.levels)


CASES = [  # backend, bits, head_dim, scale search; tokens 19: a partial tile for every BLOCK_T
    ("planar", 3, 64, True),
    ("planar", 3, 256, True),  # two norm groups
    ("planar", 2, 128, True),
    ("planar", 4, 64, False),
    ("iso", 3, 128, False),
    ("iso", 4, 128, True),
    ("iso", 2, 64, False),
    ("rotor", 3, 64, True),  # b = 3: blocks straddle the slots
    ("rotor", 2, 128, False),
    ("none", 3, 64, True),
    ("none", 4, 256, False),
]


@pytest.mark.parametrize("backend,bits,dim,search", CASES)
def test_v2_codes_equal_v1_and_reference(backend, bits, dim, search):
    st, x, params = _inputs(backend, bits, dim, 19, search)
    assert kquant.v2_applies(dim, st.rotation.shape[-1], bits, st.group)
    assert (st.levels.numel() > 2**bits) == search
    c1, n1 = kquant.launch_quantize(x, *params, bits, st.group, variant="v1")
    c2, n2 = kquant.launch_quantize(x, *params, bits, st.group, variant="v2")
    rc, rn = quantizer.quantize(x, *params, st.widths, st.group, st.perm)
    assert torch.equal(c2, c1) and torch.equal(c2, rc)
    # norms: the same fp16 values up to the order of the row sums (one fp16 step at most)
    for other in (n1, rn):
        rel = (n2.float() - other.float()).abs() / other.float().abs().clamp_min(1e-6)
        assert rel.max().item() < 1e-3


DENSE_CASES = [  # the dense per-group rotations: full mixing (the default's) and hadamard; one dot per 1, 2, 4 slots
    ("iso", 3, 256, True, {"rotation_stages": "full"}),  # g = 128: 8 words per slot, 2 slots per dot, two groups
    ("planar", 4, 128, False, {"rotation_stages": "full"}),  # 4 bits: 16 words per slot, 1 slot per dot
    ("hadamard", 2, 64, True, {}),  # g = 64: 4 words per slot, 4 slots per dot
    ("rotor", 3, 64, False, {"rotation_stages": "full"}),
]


@pytest.mark.parametrize("backend,bits,dim,search,config", DENSE_CASES)
def test_v2_dense_rotation_codes_match_v1_and_reference(backend, bits, dim, search, config):
    """The dense rotation as tl.dot into the slot tiles: the same codes as v1 and the reference up to float ties
    (the dot sums in another order than the reference's einsum), judged as tests/test_kernels.py judges v1."""
    st, x, params = _inputs(backend, bits, dim, 19, search, **config)
    assert st.rotation.shape[-1] == st.group and kquant.v2_applies(dim, st.group, bits, st.group)
    c2, n2 = kquant.launch_quantize(x, *params, bits, st.group, variant="v2")
    c1, n1 = kquant.launch_quantize(x, *params, bits, st.group, variant="v1")
    rc, rn = quantizer.quantize(x, *params, st.widths, st.group, st.perm)
    tk._check_codes(c2, n2, rc, rn, x, st)
    tk._check_codes(c2, n2, c1, n1, x, st)


def _dense_v2_launch(monkeypatch, bits: int, dtype=torch.bfloat16):
    """One v2 launch of a dense (full mixing) write of 19 tokens of `dtype` (bf16: K/V as models write them),
    recording each launch's keyword arguments: (the recorded keywords, codes, norms, state, x, the launch's
    parameters)."""
    real, seen = kquant._quantize_v2_kernel, []

    class Spy:
        def __getitem__(self, grid):
            return lambda *a, **k: seen.append(k) or real[grid](*a, **k)

    monkeypatch.setattr(kquant, "_quantize_v2_kernel", Spy())
    st, x, params = _inputs("iso", bits, 256, 19, True, rotation_stages="full")
    x = x.to(dtype)
    codes, norms = kquant.launch_quantize(x, *params, bits, st.group, variant="v2")
    return seen, codes, norms, st, x, params


@pytest.mark.parametrize("chunk", [16, 32, 128])
def test_the_dense_rotation_chunk_changes_the_dot_steps_not_the_codes(monkeypatch, chunk):
    """`DEFAULTS["v2_dense_chunk"]` input coordinates per tl.dot step (a register / stack trade, session 29): the
    launch takes it (capped at the group), and the codes stay the reference's up to float ties."""
    monkeypatch.setitem(kquant.DEFAULTS, "v2_dense_chunk", chunk)
    launches, codes, norms, st, x, params = _dense_v2_launch(monkeypatch, 3)
    assert [k["KC"] for k in launches] == [min(chunk, st.group)]
    rc, rn = quantizer.quantize(x, *params, st.widths, st.group, st.perm)
    tk._check_codes(codes, norms, rc, rn, x, st)


def test_split_tf32_halves_are_exact_in_tf32_and_sum_to_the_rotation():
    """The pre-split rotation's halves: each has 10 mantissa bits (the tensor cores read no more of a tf32 operand),
    and hi + lo is within 2^-22 of each entry of R, tf32x3's own accuracy."""
    st, _, _ = _inputs("iso", 3, 256, 4, True, rotation_stages="full")
    r = st.rotation.contiguous()
    hi, lo = kquant._split_tf32(r)
    for half in (hi, lo):
        assert not (half.view(torch.int32) & 0x1FFF).any()
    assert ((r.double() - hi.double() - lo.double()).abs() <= r.double().abs() * 2.0**-22).all()
    assert (lo.abs() <= r.abs() * 2.0**-11).all()


def test_the_folded_rotation_is_exact_in_three_bf16_parts_and_its_offset_is_the_folded_mean():
    """`_fold_rotation`: R' = R diag(1 / scale) in fp32 is exactly hi + mid + lo, three bf16 parts (a bf16 dot of bf16
    x against each part multiplies exactly), and c = R' mean, so x R'^T - c is the rotation of (x - mean) / scale."""
    st, x, _ = _inputs("iso", 3, 256, 5, True, rotation_stages="full")
    parts, c = kquant._fold_rotation(st.rotation.contiguous(), st.mean, st.scale)
    assert parts.dtype == torch.bfloat16 and parts.shape == (2, 2, 3, 128, 128)
    folded = (st.rotation.double() / st.scale.double().view(2, 2, 1, 128)).float()
    assert torch.equal(parts.double().sum(2), folded.double())  # exact: 3 x 8 significant bits = fp32's 24
    xb = x.to(torch.bfloat16).double()
    for g in range(2):
        grp = slice(g * 128, (g + 1) * 128)
        u = (xb[..., grp] - st.mean[None, :, None, grp].double()) / st.scale[None, :, None, grp].double()
        want = u @ st.rotation[:, g].double().transpose(-1, -2)
        got = xb[..., grp] @ parts[:, g].double().sum(1).transpose(-1, -2) - c[None, :, None, grp].double()
        assert (got - want).abs().max() <= 2.0**-20 * want.abs().max()


@triton.jit
def _rotate_split_kernel(x_ptr, rot_ptr, rlo_ptr, mean_ptr, scale_ptr, y_ptr, SPLIT: tl.constexpr, PREC: tl.constexpr):
    t = tl.arange(0, 16)
    x_row = x_ptr + t[:, None] * 128
    y = quantize_v2._rotate_dense(
        x_row,
        (t < 16)[:, None],
        1,
        rot_ptr,
        mean_ptr,
        scale_ptr,
        scale_ptr,
        mean_ptr,
        0,
        0,
        128,
        128,
        1,
        False,
        False,
        PREC,
        16,
        64,
        rlo_ptr,
        SPLIT,
    )
    tl.store(y_ptr + t[:, None] * 128 + tl.arange(0, 128)[None, :], y)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_the_pre_split_rotation_is_as_accurate_as_tf32x3(device):
    """The three dots over the split halves rotate to within ~2^-21 of the float64 product, as tl.dot's tf32x3 does
    (on the GPU; the interpreter's dots are fp32): dropping any of the three dots costs 2^-12 or more."""
    if (device == "cuda") != HAS_CUDA:
        pytest.skip("the other machine's path")
    global _rotate_split_kernel
    _rotate_split_kernel = triton.jit(_rotate_split_kernel.fn)  # against the reloaded module (interpreter mode)
    g = torch.Generator().manual_seed(0)
    r = torch.linalg.qr(torch.randn(128, 128, generator=g, dtype=torch.float64))[0].float().contiguous()
    x = torch.randn(16, 128, generator=g)
    mean, scale = torch.zeros(128), torch.ones(128)
    want = rotate(x.double()[None, None], r.double()[None, None])[0, 0]  # the reference's orientation
    hi, lo = kquant._split_tf32(r)
    args = [t.to(device) for t in (x, hi, lo, mean, scale)]
    y = torch.empty(16, 128, device=device)
    _rotate_split_kernel[(1,)](*args, y, SPLIT=True, PREC="ieee" if device == "cpu" else "tf32")
    err = (y.cpu().double() - want).abs().max().item() / want.abs().max().item()
    assert err < 2.0**-20, err
    if device == "cuda":  # tl.dot's own tf32x3 on the same inputs, for scale
        _rotate_split_kernel[(1,)](args[0], r.to(device), r.to(device), *args[3:], y, SPLIT=False, PREC="tf32x3")
        assert (y.cpu().double() - want).abs().max().item() / want.abs().max().item() < 2.0**-20


@triton.jit
def _rotate_fold_kernel(x_ptr, parts_ptr, c_ptr, y_ptr, PREC: tl.constexpr):
    t = tl.arange(0, 16)
    y = quantize_v2._rotate_folded(
        x_ptr + t[:, None] * 128, (t < 16)[:, None], 1, parts_ptr, c_ptr, 0, 0, 128, 128, 1, 16, 64, PREC
    )
    tl.store(y_ptr + t[:, None] * 128 + tl.arange(0, 128)[None, :], y)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_the_folded_rotation_is_as_accurate_as_tf32x3(device):
    """bf16 x through three bf16 dots against the folded parts, minus c, rotates (x - mean) / scale to within 2^-20
    of the float64 result with fp32 dots (the interpreter; tf32x3's bound above), with a mean of 8 standard deviations
    in some channels (c cancels against x R'^T there); on the H200's tensor cores within 2^-19 (measured 1.1e-6 =
    2^-19.8, session 32: their fp32 sums of the bf16 products are not IEEE sums in program order). Dropping the
    smallest part costs ~2^-17, dropping c far more: either fails both bounds."""
    if (device == "cuda") != HAS_CUDA:
        pytest.skip("the other machine's path")
    global _rotate_fold_kernel
    _rotate_fold_kernel = triton.jit(_rotate_fold_kernel.fn)  # against the reloaded module (interpreter mode)
    g = torch.Generator().manual_seed(0)
    r = torch.linalg.qr(torch.randn(128, 128, generator=g, dtype=torch.float64))[0].float()
    mean = torch.randn(128, generator=g) * 0.3
    mean[::16] = 8.0
    scale = torch.rand(128, generator=g) + 0.5
    x = (mean + torch.randn(16, 128, generator=g) * scale).to(torch.bfloat16)
    u = (x.double() - mean.double()) / scale.double()
    want = rotate(u[None, None], r.double()[None, None])[0, 0]  # the reference's orientation
    parts, c = kquant._fold_rotation(*(t.to(device) for t in (r.view(1, 1, 128, 128), mean[None], scale[None])))
    y = torch.empty(16, 128, device=device)
    _rotate_fold_kernel[(1,)](
        x.to(device), parts.to(device), c.to(device), y, PREC="ieee" if device == "cpu" else "tf32x3"
    )
    err = (y.cpu().double() - want).abs().max().item() / want.abs().max().item()
    assert err < (2.0**-20 if device == "cpu" else 2.0**-19), err


@pytest.mark.parametrize("precision", ["split", "tf32x3", "fold"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_the_pre_split_rotation_gives_the_reference_codes(monkeypatch, bits, precision):
    """`DEFAULTS["v2_dense_split"]`: R split into tf32 halves once per launch and the three dots of tf32x3 written
    out (session 31's default), tl.dot's own tf32x3, or `DEFAULTS["v2_dense_fold"]` ((x - mean) / scale folded into
    the rotation, three bf16 dots; the default for bf16 writes since session 32): each way the codes are the
    reference's up to float ties (the calibrated state's mean and scale are not trivial), and the launch passes the
    setting through."""
    monkeypatch.setitem(kquant.DEFAULTS, "v2_dense_split", precision == "split")
    monkeypatch.setitem(kquant.DEFAULTS, "v2_dense_fold", precision == "fold")
    launches, codes, norms, st, x, params = _dense_v2_launch(monkeypatch, bits)
    assert [(k["SPLIT"], k["FOLD"]) for k in launches] == [(precision == "split", precision == "fold")]
    rc, rn = quantizer.quantize(x, *params, st.widths, st.group, st.perm)
    tk._check_codes(codes, norms, rc, rn, x, st)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("caps", [{}, {2: 168, 3: 168}, {4: 200}])
def test_a_register_cap_reaches_an_eager_dense_launch_at_its_width(monkeypatch, bits, caps):
    """`DEFAULTS["v2_dense_maxnreg"]` (per code width; today 168 at 2 and 3 bits, 128 at 4) becomes an eager dense
    launch's `maxnreg` at the widths it names, and no other width's; a capped launch runs on the warps
    `DEFAULTS["v2_dense_capped_warps"]` names for its width (8 at 4 bits, for a cap of 128 there), others on
    `v2_num_warps`; the codes stay the reference's."""
    monkeypatch.setitem(kquant.DEFAULTS, "v2_dense_maxnreg", caps)
    monkeypatch.setitem(kquant.DEFAULTS, "v2_dense_capped_warps", {4: 8})
    launches, codes, norms, st, x, params = _dense_v2_launch(monkeypatch, bits)
    warps = 8 if bits in caps and bits == 4 else kquant.DEFAULTS["v2_num_warps"]
    assert [(k.get("maxnreg"), k["num_warps"]) for k in launches] == [(caps.get(bits), warps)]
    rc, rn = quantizer.quantize(x, *params, st.widths, st.group, st.perm)
    tk._check_codes(codes, norms, rc, rn, x, st)


def test_a_wrapped_launch_names_no_register_cap(monkeypatch):
    """Under torch.compile the launch goes through a wrapper (`wrap_triton`) that would pass `maxnreg` to the kernel
    as an argument: a launch whose `wrap` returns anything but the kernel itself names no cap, keeps the uncapped
    warps, and runs the rotation unrolled at a width whose pipeline needs the cap."""
    monkeypatch.setitem(kquant.DEFAULTS, "v2_dense_maxnreg", {4: 128})
    monkeypatch.setitem(kquant.DEFAULTS, "v2_dense_capped_warps", {4: 8})
    monkeypatch.setitem(kquant.DEFAULTS, "v2_dense_pipeline", (4,))
    monkeypatch.setitem(kquant.DEFAULTS, "v2_dense_pipeline_needs_cap", (4,))
    seen = []

    class Wrapped:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *a, **k: seen.append(k) or self.kernel[grid](*a, **k)

    st, x, params = _inputs("iso", 4, 256, 19, True, rotation_stages="full")
    codes, norms = kquant.launch_quantize(x.bfloat16(), *params, 4, st.group, wrap=Wrapped, variant="v2")
    dense = [k for k in seen if "FOLD" in k]
    assert len(dense) == 1 and "maxnreg" not in dense[0]
    assert dense[0]["num_warps"] == kquant.DEFAULTS["v2_num_warps"]  # the capped launch's 8 warps need the cap
    assert dense[0]["PIPE"] is False


@pytest.mark.parametrize("needs_cap", [(), (4,)])
@pytest.mark.parametrize("caps", [{}, {4: 0}, {4: 128}])
def test_a_width_whose_pipeline_needs_the_cap_pipelines_only_under_it(monkeypatch, caps, needs_cap):
    """`DEFAULTS["v2_dense_pipeline_needs_cap"]` (today 4 bits, where the pipeline was slower uncapped): such a width
    pipelines only in a capped launch (a cap of 0 is none); others pipeline with or without a cap."""
    monkeypatch.setitem(kquant.DEFAULTS, "v2_dense_maxnreg", caps)
    monkeypatch.setitem(kquant.DEFAULTS, "v2_dense_pipeline", (4,))
    monkeypatch.setitem(kquant.DEFAULTS, "v2_dense_pipeline_needs_cap", needs_cap)
    launches, codes, norms, st, x, params = _dense_v2_launch(monkeypatch, 4)
    cap = caps.get(4) or None
    assert [(k.get("maxnreg"), k["PIPE"]) for k in launches] == [(cap, bool(cap) or not needs_cap)]
    rc, rn = quantizer.quantize(x, *params, st.widths, st.group, st.perm)
    tk._check_codes(codes, norms, rc, rn, x, st)


@pytest.mark.parametrize("max_rows", [16, 64, 128])
def test_a_dense_program_takes_at_most_the_row_cap(monkeypatch, max_rows):
    """`DEFAULTS["v2_dense_max_rows"]` (64 by default) caps the rows of a dense program, whose 1024-element slot
    tile holds 128 rows at 3 bits; the codes stay the reference's at any cap."""
    monkeypatch.setitem(kquant.DEFAULTS, "v2_dense_max_rows", max_rows)
    launches, codes, norms, st, x, params = _dense_v2_launch(monkeypatch, 3)
    assert [k["BLOCK_T"] for k in launches] == [min(max_rows, kquant.DEFAULTS["v2_tile_dense"] // (st.group // 16))]
    rc, rn = quantizer.quantize(x, *params, st.widths, st.group, st.perm)
    tk._check_codes(codes, norms, rc, rn, x, st)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("widths", [(), (2, 3), (2, 3, 4)])
def test_the_pipelined_rotation_runs_at_its_widths_with_the_reference_codes(monkeypatch, bits, widths):
    """`DEFAULTS["v2_dense_pipeline"]` (today 2, 3 and 4 bits): the folded rotation's dots as one runtime loop
    (Triton pipelines its loads) at the widths it names, unrolled at the others; the codes are the reference's up to
    float ties either way."""
    monkeypatch.setitem(kquant.DEFAULTS, "v2_dense_pipeline", widths)
    monkeypatch.setitem(kquant.DEFAULTS, "v2_dense_pipeline_needs_cap", ())
    launches, codes, norms, st, x, params = _dense_v2_launch(monkeypatch, bits)
    assert [(k["FOLD"], k["PIPE"]) for k in launches] == [(True, bits in widths)]
    rc, rn = quantizer.quantize(x, *params, st.widths, st.group, st.perm)
    tk._check_codes(codes, norms, rc, rn, x, st)


@pytest.mark.parametrize("variant", ["v2", "v1", "rows"])
@pytest.mark.parametrize("search", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_every_kernel_codes_exact_ties_as_the_reference_and_negated_input_as_the_mirror(variant, search, bits, device):
    """The format's tie rule (docs/FORMAT.md "Ties": a unit exactly on a boundary rounds toward zero): on input
    whose units sit on every boundary, each quantize kernel (the v2 bulk write, v1, the decode-step "rows" kernel;
    with and without the scale search) writes the reference's codes bit for bit and its norms, and codes -x as the
    mirror of x (code -> 2**bits - 1 - code; zeros take the code just below 0 either way) with equal norms. The
    input holds ties the format's rule before session 35 (`u > b` on both sides) split, so a kernel that kept that
    rule fails here."""
    if (device == "cuda") != HAS_CUDA:
        pytest.skip("the other machine's path")
    x = ties.tie_input(bits, tokens=8).to(torch.bfloat16)
    params = ties.tie_params(bits, search=search)
    x, params = x.to(device), tuple(p.to(device) for p in params)
    nl, dim, group = 1 << bits, x.shape[-1], 128
    levels = params[3][:nl]
    unit = x.float() / x.float().unflatten(-1, (-1, group)).norm(dim=-1).repeat_interleave(group, -1)
    assert not torch.equal(ties.strict_codes(-unit, levels), nl - 1 - ties.strict_codes(unit, levels))
    (codes_x, norms_x), (codes_neg, norms_neg) = (
        kquant.launch_quantize(v, *params, bits, group, variant=variant) for v in (x, -x)
    )
    for v, codes, norms in ((x, codes_x, norms_x), (-x, codes_neg, norms_neg)):
        rc, rn = quantizer.quantize(v, *params, bits, group)
        assert torch.equal(codes, rc)
        torch.testing.assert_close(norms, rn, rtol=1e-3, atol=0)  # the squared levels summed in another order
    up, un = tk.unpack(codes_x, bits, dim), tk.unpack(codes_neg, bits, dim)
    nonzero = x.float() != 0
    assert torch.equal(un[nonzero], nl - 1 - up[nonzero])
    assert (up[~nonzero] == nl // 2 - 1).all() and (un[~nonzero] == nl // 2 - 1).all()
    torch.testing.assert_close(norms_neg, norms_x, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_folded_rotation_is_for_bf16_writes_only(monkeypatch, dtype):
    """The folded rotation feeds x to bf16 dots as loaded, exact only for bf16 x: an fp32 or fp16 write takes the
    pre-split rotation instead (fold on, the default), with the reference's codes."""
    monkeypatch.setitem(kquant.DEFAULTS, "v2_dense_fold", True)
    launches, codes, norms, st, x, params = _dense_v2_launch(monkeypatch, 3, dtype)
    assert [(k["SPLIT"], k["FOLD"]) for k in launches] == [(True, False)]
    rc, rn = quantizer.quantize(x, *params, st.widths, st.group, st.perm)
    tk._check_codes(codes, norms, rc, rn, x, st)


def test_a_bulk_write_takes_v2_where_it_applies_and_v1_elsewhere(monkeypatch):
    """Past a decode step's rows kernel, the default is v2 for a dense per-group rotation (full mixing, the default
    config's) and for block rotations (2.5-2.8x faster than v1 on the H200, session 28); v1 covers what v2 does not,
    e.g. a norm group narrower than one stored word (8 coordinates at 3 bits, whose words hold 16 codes)."""
    launched = []

    def spy(name):
        real = getattr(kquant, name)

        class Spy:
            def __getitem__(self, grid):
                return lambda *a, **k: launched.append(name) or real[grid](*a, **k)

        monkeypatch.setattr(kquant, name, Spy())

    spy("_quantize_v2_kernel")
    spy("_quantize_kernel")
    tokens = kquant.DEFAULTS["rows_max_tokens"] + 3
    for backend, config in (("iso", dict(rotation_stages="full")), ("planar", {}), ("planar", dict(norm_group=8))):
        st, x, params = _inputs(backend, 3, 64, tokens, True, **config)
        kquant.launch_quantize(x, *params, 3, st.group)
    assert launched == ["_quantize_v2_kernel", "_quantize_v2_kernel", "_quantize_kernel"]


def test_v2_zero_and_nan_rows():
    st, x, params = _inputs("planar", 3, 64, 5, True)
    x = x.clone()
    x[0, 1, 1] = st.mean[1]  # u = 0: a zero group (norm 0)
    x[1, 0, 3, 7] = float("nan")
    c1, n1 = kquant.launch_quantize(x, *params, 3, st.group, variant="v1")
    c2, n2 = kquant.launch_quantize(x, *params, 3, st.group, variant="v2")
    assert torch.equal(c1, c2)
    assert torch.isnan(n2[1, 0, 3]).all() and not torch.isnan(n2[0]).any()
    assert torch.equal(n1.nan_to_num(7.0), n2.nan_to_num(7.0))


def test_v2_falls_back_to_v1_where_it_does_not_apply():
    """Dense rotations over fewer than 64 coordinates and calibrated layouts/perms take the v1 kernel under
    variant="v2"."""
    st, x, params = _inputs("hadamard", 3, 64, 7, True, norm_group=32)
    assert not kquant.v2_applies(64, st.rotation.shape[-1], 3, st.group)
    c1, n1 = kquant.launch_quantize(x, *params, 3, st.group, variant="v1")
    c2, n2 = kquant.launch_quantize(x, *params, 3, st.group, variant="v2")
    assert torch.equal(c1, c2) and torch.equal(n1, n2)
    assert not kquant.v2_applies(64, 2, 3, 64, layout="4x8,2x56")
    assert not kquant.v2_applies(64, 2, 3, 64, perm=torch.arange(64))
    assert not kquant.v2_applies(64, 2, 3, 8)  # fewer coordinates in a group than one stored word
    with pytest.raises(ValueError):
        kquant.launch_quantize(x, *params, 3, st.group, variant="v3")


@triton.jit
def _threshold_kernel(b_ptr, c_ptr, t_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(t_ptr + i, quantize_v2._threshold(tl.load(b_ptr + i), tl.load(c_ptr + i)))


def test_threshold_is_the_exact_division_boundary():
    """t = _threshold(b, c) is the smallest float with fl(t / c) > b: every u >= t codes above b, every u < t not."""
    global _threshold_kernel
    _threshold_kernel = triton.jit(_threshold_kernel.fn)  # rebuilt against the reloaded module (interpreter mode)
    n = 4096
    g = torch.Generator().manual_seed(0)
    b = torch.cat([torch.randn(n - 6, generator=g) * 2, torch.tensor([0.0, -0.0, 1e-38, -1e-38, 1e-45, -1e-45])])
    c = torch.tensor([0.85, 1.0, 1.15, 1.3, 1.5])[torch.arange(n) % 5]
    c[: n // 2] = torch.rand(n // 2, generator=g) * 1.5 + 0.5
    device = "cuda" if HAS_CUDA else "cpu"
    b, c = b.to(device), c.to(device)
    t = torch.empty_like(b)
    _threshold_kernel[(1,)](b, c, t, N=n)
    below = torch.nextafter(t, torch.full_like(t, -float("inf")))
    assert ((t / c) > b).all()
    assert not ((below / c) > b).any()


def _exact_thresholds(bnd, cand):
    """[A, K]: the smallest float32 t with t / c > b (numpy float32 division is IEEE, correctly rounded), by walking
    from b * c one float at a time until it stops -- the specification of the v2 kernel's threshold scratch."""
    b = np.asarray(bnd, np.float32)[None, :]
    c = np.asarray(cand, np.float32)[:, None]
    with np.errstate(over="ignore", under="ignore"):
        t = np.broadcast_to(b * c, (c.shape[0], b.shape[1])).copy()
        for _ in range(100000):
            d = np.nextafter(t, np.float32(-np.inf))
            down = d / c > b  # the float below still codes above b
            up = ~(t / c > b)  # t itself does not
            if not (down.any() or up.any()):
                return t
            t = np.where(down, d, np.where(up, np.nextafter(t, np.float32(np.inf)), t))
    raise AssertionError("the walk did not stop")


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("cands", ["default", "wide"])
def test_threshold_scratch_is_the_exact_division_boundary(bits, cands):
    """_v2_prep_kernel's scratch (what launch_quantize passes to the v2 kernel): thr[a * NL + k] is the smallest float
    t with fl(t / c_a) > boundary k, exactly the reference's `unit / c > b` as `unit >= t`; rs = fl(1 / scale)."""
    st = tk._state("planar", bits, "k", 2, 64, "cpu", seed=1)
    nl = 2**bits
    levels = st.levels.clone()
    if cands == "wide":  # any positive finite scale is a valid config: far from 1, and ties near the boundaries
        levels = torch.cat([levels[:nl], torch.tensor([1e-3, 0.5, 0.75000006, 1.0, 2.0, 3.0, 117.0, 1e3])])
    na = levels.numel() - nl
    assert na > 0
    g = torch.Generator().manual_seed(bits)
    scale = torch.exp(torch.randn(3, 700, generator=g) * 3)  # 2100 channels: three programs
    device = "cuda" if HAS_CUDA else "cpu"
    thr = torch.full((na * nl,), float("nan"), device=device)
    rs = torch.full((scale.numel(),), float("nan"), device=device)
    quantize_v2._v2_prep_kernel[(3,)](
        levels.to(device),
        scale.to(device),
        thr,
        rs,
        scale.numel(),
        NL=nl,
        NA=na,
        BLOCK=triton.next_power_of_2(na * nl),
        BLOCK_R=1024,
    )
    lv = levels[:nl].numpy()
    bnd = (lv[1:] + lv[:-1]) * np.float32(0.5)  # codebook.boundaries
    want = _exact_thresholds(bnd, levels[nl:].numpy())
    got = thr.cpu().view(na, nl)[:, : nl - 1].numpy()
    assert np.array_equal(got.view(np.int32), want.view(np.int32))
    assert np.array_equal(rs.cpu().numpy(), np.float32(1) / scale.flatten().numpy())


@triton.jit
def _magnitude_kernel(u_ptr, lev_ptr, thr_ptr, mag_ptr, a, N: tl.constexpr, NL: tl.constexpr):
    H: tl.constexpr = NL // 2
    i = tl.arange(0, N)
    u = tl.load(u_ptr + i)
    lev = ()
    for k in tl.static_range(NL):
        lev = lev + (tl.load(lev_ptr + k),)
    above = ()
    for j in tl.static_range(H - 1):
        above = above + (tl.load(thr_ptr + a * NL + H + j),)
    tl.store(mag_ptr + i, quantize_v2._magnitude_of_abs(tl.abs(u), lev, above, H))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_the_search_reads_the_magnitude_of_the_reference_code_from_abs_u(bits, device):
    """The scale search scores each candidate by sum(|u| * |levels[code]|) and sum(levels[code]^2), reading
    |levels[code]| from |u| against the upward thresholds alone (_magnitude_of_abs: one compare per boundary above
    0). Spec: for every candidate and every u -- each threshold and its float neighbours, where a tie decides
    (c = 1 divides exactly), +-0, subnormals, random units -- the magnitude equals |levels[code]| of the
    reference's code of u / c (quantizer.boundary_codes: ties toward zero) bit for bit, so u * level ==
    |u| * magnitude wherever u / c is not 0."""
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("needs CUDA")
    if device == "cpu" and HAS_CUDA:
        pytest.skip("the interpreter's path runs on CPU machines")
    global _magnitude_kernel
    _magnitude_kernel = triton.jit(_magnitude_kernel.fn)  # against the reloaded module (interpreter mode)
    st = tk._state("planar", bits, "k", 2, 64, "cpu", seed=1)
    nl = 2**bits
    levels = torch.cat([st.levels[:nl], torch.tensor([0.85, 1.0, 1.15, 1.3, 0.75000006])])
    na = levels.numel() - nl
    thr = torch.empty(na * nl, device=device)
    rs = torch.empty(1, device=device)
    quantize_v2._v2_prep_kernel[(1,)](
        levels.to(device),
        torch.ones(1, device=device),
        thr,
        rs,
        1,
        NL=nl,
        NA=na,
        BLOCK=triton.next_power_of_2(na * nl),
        BLOCK_R=16,
    )
    t = thr.cpu().view(na, nl)[:, : nl - 1].flatten()
    inf = torch.full_like(t, float("inf"))
    special = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-38, -1e-38, 10.0, -10.0])
    g = torch.Generator().manual_seed(bits)
    u = torch.cat([t, torch.nextafter(t, inf), torch.nextafter(t, -inf), special, torch.randn(4000, generator=g) / 8])
    n = triton.next_power_of_2(u.numel())
    u = torch.cat([u, torch.randn(n - u.numel(), generator=g) / 8])
    bounds = boundaries(levels[:nl])
    for a in range(na):
        mag = torch.empty(n, device=device)
        _magnitude_kernel[(1,)](u.to(device), levels.to(device), thr, mag, a, N=n, NL=nl)
        level = levels[:nl][quantizer.boundary_codes(u / levels[nl + a], bounds)]
        assert torch.equal(mag.cpu(), level.abs()), a
        nonzero = (u / levels[nl + a]) != 0
        assert torch.equal((u * level)[nonzero], (u.abs() * mag.cpu())[nonzero]), a
    assert torch.equal(levels[nl + 1], torch.tensor(1.0))  # the candidate whose thresholds are ties


def test_a_negative_tie_in_the_search_is_coded_as_the_reference_codes_it():
    """A real tie from session 32's GPU tests (test_v2_gpu[True-planar-3]'s input: batch 1, head 3, token 1342,
    coordinate 61 sits exactly on a negative boundary at candidate 1.5), in a 16-token slice. The v2 write codes it
    as the reference does (toward zero: one code above the pre-session-35 strict rule's), and the group's corrected
    norm is the one those codes need (reading |u| against the upper thresholds for the search but coding the tie
    away from zero put it ~1% off: session 32)."""
    st, x, params = _inputs("planar", 3, 256, 3000, True, "cpu", 2, 4, seed=259)
    x = x.to(torch.bfloat16)[:, :, 1336:1352]
    y = rotate((x.float() - st.mean[:, None]) / st.scale[:, None], st.rotation)[1, 3, 6, :128]
    u = y[61] / y.norm()  # the reference's unit coordinate
    boundary = (st.levels[1:8] + st.levels[:7]) / 2
    assert u < 0 and torch.isin(u / st.levels[8 + 4], boundary)  # the tie is in the slice
    codes, norms = kquant.launch_quantize(x, *params, 3, st.group, variant="v2")
    rc, rn = quantizer.quantize(x, *params, st.widths, st.group, st.perm)
    got, want = tk.unpack(codes, st.widths, 256), tk.unpack(rc, st.widths, 256)
    strict = ties.strict_codes(u / st.levels[8 + 4], st.levels[:8])
    assert got[1, 3, 6, 61] == want[1, 3, 6, 61] == strict + 1
    level = st.levels[:8][got[1, 3, 6, :128].long()]
    torch.testing.assert_close(norms[1, 3, 6, 0].float(), y.norm() / level.norm(), rtol=1e-3, atol=0)
    tk._check_codes(codes, norms, rc, rn, x, st)


@triton.jit
def _div_rcp_kernel(a_ptr, b_ptr, q_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    a = tl.load(a_ptr + i)
    b = tl.load(b_ptr + i)
    tl.store(q_ptr + i, quantize_v2._div_rcp(a, b, tl.math.div_rn(1.0, b), True))


@pytest.mark.parametrize(
    "device",
    [
        pytest.param(
            "cpu",
            marks=pytest.mark.skipif(
                HAS_CUDA or not kquant._fma_exact(), reason="needs an interpreter whose tl.fma rounds once"
            ),
        ),
        pytest.param("cuda", marks=pytest.mark.gpu),
    ],
)
def test_div_rcp_is_the_correctly_rounded_quotient(device):
    """v2's divisions (x - mean) / scale and y / norm: a * rcp plus one FMA correction equals IEEE division, also for
    numerators and divisors of extreme mantissas (all ones, just above a power of two) over a wide exponent range.
    The claim is the device's (`pytest -m gpu` runs it there); an interpreter that emulates fma checks it too. A zero
    quotient's sign is not part of it: the GPU build turns -0 / b into +0 (it folds the residual's negation into the
    FMA), which no code can tell from -0."""
    global _div_rcp_kernel
    _div_rcp_kernel = triton.jit(_div_rcp_kernel.fn)  # against the reloaded module (interpreter mode)
    n = 1 << 16
    rng = np.random.default_rng(0)
    ma = np.where(
        rng.random(n) < 0.5, 2 - rng.integers(1, 2**12, n) * 2.0**-23, 1 + rng.integers(0, 2**12, n) * 2.0**-23
    )
    mb = np.where(
        rng.random(n) < 0.5, 2 - rng.integers(1, 2**12, n) * 2.0**-23, 1 + rng.integers(1, 2**12, n) * 2.0**-23
    )
    ma[: n // 2] = rng.uniform(1, 2, n // 2)
    a = (ma * np.where(rng.random(n) < 0.5, -1, 1) * 2.0 ** rng.integers(-90, 90, n)).astype(np.float32)
    b = (mb * 2.0 ** rng.integers(-30, 30, n)).astype(np.float32)
    a[:4] = [0.0, -0.0, 1.0, -3.0]
    q = torch.empty(n, device=device)
    _div_rcp_kernel[(1,)](torch.from_numpy(a).to(device), torch.from_numpy(b).to(device), q, N=n)
    got, want = q.cpu().numpy(), a / b
    zero = want == 0
    assert np.array_equal(got[~zero].view(np.int32), want[~zero].view(np.int32))  # bit for bit
    assert np.all(got[zero] == 0)  # +0 or -0


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("backend", ["planar", "iso", "rotor", "none"])
@pytest.mark.parametrize("search", [True, False])
def test_v2_gpu(backend, bits, search):
    """Real sizes, fresh random inputs, outputs poisoned first: v2 against v1 and the reference."""
    _v2_against_v1_and_reference_gpu(backend, bits, search, ((256, 3000, 2, 4), (128, 1001, 3, 2)))


def _v2_against_v1_and_reference_gpu(backend, bits, search, shapes, **config):
    """For each (head_dim, tokens, batch, heads): v2's codes and norms against v1's and the reference's, each kernel
    writing into freshly poisoned memory."""
    for dim, tokens, batch, heads in shapes:
        st, x, params = _inputs(backend, bits, dim, tokens, search, "cuda", batch, heads, seed=dim + bits, **config)
        x = x.to(torch.bfloat16)
        assert kquant.v2_applies(dim, st.rotation.shape[-1], bits, st.group)
        tk._poison("cuda")
        c2, n2 = kquant.launch_quantize(x, *params, bits, st.group, variant="v2")
        torch.cuda.synchronize()
        tk._poison("cuda")
        c1, n1 = kquant.launch_quantize(x, *params, bits, st.group, variant="v1")
        rc, rn = quantizer.quantize(x, *params, st.widths, st.group, st.perm)
        tk._check_codes(c2, n2, c1, n1, x, st)
        tk._check_codes(c2, n2, rc, rn, x, st)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize(
    "backend,bits,search,config",
    [
        ("iso", 3, True, {"rotation_stages": "full"}),  # the default config's quantizer
        ("planar", 2, True, {"rotation_stages": "full"}),
        ("hadamard", 4, False, {}),
    ],
)
def test_v2_dense_gpu(backend, bits, search, config):
    """Real sizes, fresh random inputs, outputs poisoned first: v2 with a dense rotation, launched as by default (bf16
    x: the folded rotation; each width's register cap, warps and pipeline) against v1 (tl.dot's tf32x3) and the
    reference."""
    _v2_against_v1_and_reference_gpu(backend, bits, search, ((256, 3000, 2, 4), (64, 1001, 3, 2)), **config)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("precision", ["split", "tf32x3", "fold"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_v2_dense_split_gpu(monkeypatch, bits, precision):
    """Each rotation precision at real sizes: the pre-split halves' three tf32 dots (session 31's default, and
    fp16 / fp32 writes'), tl.dot's tf32x3 (the default before), and the folded rotation's bf16 dots (the default
    for bf16 writes since session 32)."""
    monkeypatch.setitem(kquant.DEFAULTS, "v2_dense_split", precision == "split")
    monkeypatch.setitem(kquant.DEFAULTS, "v2_dense_fold", precision == "fold")
    _v2_against_v1_and_reference_gpu("iso", bits, True, ((256, 3000, 2, 4), (64, 1001, 3, 2)), rotation_stages="full")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_v2_dense_maxnreg_gpu(monkeypatch, bits):
    """The default config's quantizer (the folded rotation) under a register cap of 168 on 4 warps at every width
    (`DEFAULTS["v2_dense_maxnreg"]`: the default has capped 2 and 3 bits so since session 33; at 4 bits it spills
    576 B, and the default there is 128 on 8 warps: test_v2_dense_gpu), at real sizes."""
    monkeypatch.setitem(kquant.DEFAULTS, "v2_dense_maxnreg", {2: 168, 3: 168, 4: 168})
    monkeypatch.setitem(kquant.DEFAULTS, "v2_dense_capped_warps", {})
    _v2_against_v1_and_reference_gpu("iso", bits, True, ((256, 3000, 2, 4), (64, 1001, 3, 2)), rotation_stages="full")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("bits", [2, 3])
def test_v2_dense_128_rows_on_8_warps_gpu(monkeypatch, bits):
    """The default config's quantizer with 128-row dense programs on 8 warps (`DEFAULTS["v2_dense_max_rows"]`,
    session 32's fourth lead), at real sizes."""
    monkeypatch.setitem(kquant.DEFAULTS, "v2_dense_max_rows", 128)
    monkeypatch.setitem(kquant.DEFAULTS, "v2_num_warps", 8)
    _v2_against_v1_and_reference_gpu("iso", bits, True, ((256, 3000, 2, 4), (64, 1001, 3, 2)), rotation_stages="full")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("stages", [None, 2])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_v2_dense_pipeline_gpu(monkeypatch, bits, stages):
    """The pipelined folded rotation (`DEFAULTS["v2_dense_pipeline"]`, with Triton's default stages or 2) at real
    sizes: against v1 and the reference, and bit for bit the unrolled dots' codes and norms (the same dots in the
    same order)."""
    monkeypatch.setitem(kquant.DEFAULTS, "v2_dense_stages", stages)
    for pipe in ((bits,), ()):
        monkeypatch.setitem(kquant.DEFAULTS, "v2_dense_pipeline", pipe)
        _v2_against_v1_and_reference_gpu("iso", bits, True, ((256, 3000, 2, 4),), rotation_stages="full")
    st, x, params = _inputs("iso", bits, 256, 3000, True, "cuda", 2, 4, seed=7, rotation_stages="full")
    x = x.to(torch.bfloat16)
    out = []
    for pipe in ((bits,), ()):
        monkeypatch.setitem(kquant.DEFAULTS, "v2_dense_pipeline", pipe)
        tk._poison("cuda")
        out.append(kquant.launch_quantize(x, *params, bits, st.group, variant="v2"))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=0, atol=0)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=0, atol=0, equal_nan=False)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("chunk", [32, 128])
def test_v2_dense_chunk_gpu(monkeypatch, chunk):
    """The default config's quantizer with other tl.dot steps than the default's 64 (session 30), at real sizes."""
    monkeypatch.setitem(kquant.DEFAULTS, "v2_dense_chunk", chunk)
    _v2_against_v1_and_reference_gpu("iso", 3, True, ((256, 3000, 2, 4), (64, 1001, 3, 2)), rotation_stages="full")
