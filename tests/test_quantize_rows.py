"""The decode-step quantize kernel ("rows": one program per row and norm group, the scale search's candidates side by
side) writes the codes and norms the tiled kernel and the reference quantizer write, and a decode step picks it.

Without CUDA the kernels run under TRITON_INTERPRET=1 on small CPU tensors; the `gpu` test compares it with the
tiled kernel and the reference at real sizes on the device (codes equal up to float ties, judged as
tests/test_kernels.py does).
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # also set by conftest.py, before any kernel module is imported

import test_kernels as tk  # noqa: E402  (tests/ is on sys.path: rootdir-style test modules)

from rqcompile.kernels import quantize as kquant  # noqa: E402
from rqcompile.kernels import quantize_rows as krows  # noqa: E402
from rqcompile.quant import quantizer  # noqa: E402


@pytest.fixture(autouse=True)
def _interpret_mode(monkeypatch):
    """Rebuild the kernels in interpreter mode right before each CPU test (as tests/test_kernels.py does)."""
    global kquant, krows
    if not HAS_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        kquant = importlib.reload(kquant)
        krows = importlib.reload(krows)


def _inputs(backend, bits, dim, tokens, search, stages=1, device="cpu", batch=2, heads=2, seed=0):
    config = {"rotation_stages": stages} if search else {"scale_search": (), "rotation_stages": stages}
    st = tk._state(backend, bits, "k", heads, dim, device, seed=seed, **config)
    g = torch.Generator().manual_seed(seed + 3)
    x = (torch.randn(batch, tokens, heads, dim, generator=g) * 2).to(device).transpose(1, 2)  # strided, as K/V
    return st, x, (st.rotation, st.mean, st.scale, st.levels)


CASES = [  # backend, bits, head_dim, scale search, rotation stages (> 1: full mixing, one dense block per group)
    ("iso", 3, 64, True, 3),  # the default: full mixing
    ("iso", 3, 256, True, 3),  # two norm groups of 128
    ("planar", 3, 64, True, 1),
    ("planar", 2, 128, False, 1),
    ("rotor", 3, 64, True, 1),  # b = 3: blocks straddle the norm groups' edges
    ("rotor", 4, 64, False, 4),
    ("hadamard", 3, 64, True, 1),
    ("none", 4, 64, True, 1),
]


@pytest.mark.parametrize("backend,bits,dim,search,stages", CASES)
def test_rows_equal_the_tiled_kernel_and_the_reference(backend, bits, dim, search, stages):
    st, x, params = _inputs(backend, bits, dim, 3, search, stages)
    rb = st.rotation.shape[-1]
    assert krows.rows_apply(dim, rb, bits, st.group)
    assert (rb == st.group) == (backend == "hadamard" or stages > 1)  # both rotation paths are covered
    assert (st.levels.numel() > 2**bits) == search
    c1, n1 = kquant.launch_quantize(x, *params, bits, st.group, variant="v1")
    cr, nr = kquant.launch_quantize(x, *params, bits, st.group, variant="rows")
    rc, rn = quantizer.quantize(x, *params, st.widths, st.group, st.perm)
    tk._check_codes(cr, nr, rc, rn, x, st)
    tk._check_codes(cr, nr, c1, n1, x, st)
    # on these small inputs no decision is close enough to a tie to flip: the codes are exactly the reference's
    assert torch.equal(cr, rc)


def test_a_decode_step_takes_the_rows_kernel(monkeypatch):
    """A call of at most `rows_max_tokens` tokens runs the rows kernel, a longer one the tiled kernel."""
    launched = []
    real = krows.launch_quantize_rows
    monkeypatch.setattr(krows, "launch_quantize_rows", lambda *a, **k: launched.append(1) or real(*a, **k))
    most = kquant.DEFAULTS["rows_max_tokens"]
    st, x, params = _inputs("iso", 3, 64, most + 1, True, 3)
    few, _ = kquant.launch_quantize(x[:, :, :most], *params, 3, st.group)
    assert launched == [1]
    many, _ = kquant.launch_quantize(x, *params, 3, st.group)
    assert launched == [1]
    assert torch.equal(few, many[:, :, :most])


def test_rows_zero_and_nan_rows():
    """A zero group gets norm 0, a NaN input a NaN norm (which the cache's write check refuses), as in v1."""
    st, x, params = _inputs("iso", 3, 64, 2, True, 3)
    x = x.clone()
    x[0, 1, 1] = st.mean[1]  # u = 0: a zero group
    x[1, 0, 0, 7] = float("nan")
    c1, n1 = kquant.launch_quantize(x, *params, 3, st.group, variant="v1")
    cr, nr = kquant.launch_quantize(x, *params, 3, st.group, variant="rows")
    assert nr[0, 1, 1].eq(0).all() and torch.isnan(nr[1, 0, 0]).all()
    assert torch.equal(c1, cr) and torch.equal(n1.nan_to_num(7.0), nr.nan_to_num(7.0))


def test_rows_fall_back_to_v1_where_they_do_not_apply():
    """Calibrated layouts and perms are not covered: variant="rows" runs the tiled kernel there."""
    assert not krows.rows_apply(64, 2, 3, 64, layout="4x8,2x56")
    assert not krows.rows_apply(64, 2, 3, 64, perm=torch.arange(64))
    assert not krows.rows_apply(64, 64, 5, 64)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("backend,bits,dim,search,stages", CASES)
def test_rows_gpu(backend, bits, dim, search, stages):
    """Real sizes (batch 8, 4 KV heads, a decode step's token and a few), fresh inputs, outputs poisoned first."""
    for tokens in (1, 4):
        st, x, params = _inputs(backend, bits, dim, tokens, search, stages, "cuda", 8, 4, seed=dim + bits + tokens)
        x = x.to(torch.bfloat16)
        tk._poison("cuda")
        cr, nr = kquant.launch_quantize(x, *params, bits, st.group, variant="rows")
        torch.cuda.synchronize()
        tk._poison("cuda")
        c1, n1 = kquant.launch_quantize(x, *params, bits, st.group, variant="v1")
        rc, rn = quantizer.quantize(x, *params, st.widths, st.group, st.perm)
        tk._check_codes(cr, nr, c1, n1, x, st)
        tk._check_codes(cr, nr, rc, rn, x, st)
