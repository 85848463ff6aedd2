"""V codes packed along keys re-packed per token in one Triton launch (`kernels.along_keys_repack`).

The specification is the torch conversion `pack(unpack_along_keys(codes, bits, dim), bits)` (what
`ops.coordinates_layout` does): the kernel returns the same bytes (torch.equal), for any leading dims, from any bytes
(every byte pattern is a valid block packed along keys, so random bytes exercise every bit of every word). Without
CUDA the kernel runs in Triton's interpreter on CPU tensors; the `gpu` test runs it at a real size, eager and under
torch.compile.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # also set by conftest.py, before any kernel module is imported

import triton  # noqa: E402,F401  (a dev dependency: a missing triton must fail, not skip)

from rqcompile.kernels import along_keys_repack as krepack  # noqa: E402
from rqcompile.quant.packing import pack, pack_along_keys, packed_size, unpack_along_keys  # noqa: E402

if not HAS_CUDA:  # make sure the @triton.jit function was built in interpreter mode
    krepack = importlib.reload(krepack)

cpu_only = pytest.mark.skipif(HAS_CUDA, reason="interpreter tests run where there is no GPU")


@pytest.fixture(autouse=True)
def _interpret_mode(monkeypatch):
    """Rebuild the kernel in interpreter mode right before each CPU test (as tests/test_kernels.py does)."""
    global krepack
    if not HAS_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        krepack = importlib.reload(krepack)


def _along(lead, keys, bits, dim, device="cpu"):
    """Random bytes as codes packed along keys [*lead, keys, bytes]."""
    return torch.randint(0, 256, (*lead, keys, packed_size(dim, bits)), dtype=torch.uint8, device=device)


def _torch_conversion(along, bits, dim):
    return pack(unpack_along_keys(along, bits, dim), bits)


@cpu_only
@pytest.mark.parametrize("lead", [[2, 3], [1, 1]], ids=["B2-H3", "B1-H1"])
@pytest.mark.parametrize("keys", [16, 48])
@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("bits", [2, 3])
def test_kernel_interpret_equals_the_torch_conversion(bits, dim, keys, lead):
    along = _along(lead, keys, bits, dim)
    got = krepack.launch_along_keys_to_tokens(along, bits, dim)
    assert got.dtype == torch.uint8 and got.shape == along.shape and got.is_contiguous()
    assert torch.equal(got, _torch_conversion(along, bits, dim))


@cpu_only
@pytest.mark.parametrize("bits", [2, 3])
def test_kernel_interpret_inverts_pack_along_keys(bits):
    """The round trip: rows packed per token, packed along keys, back to the same rows."""
    dim = 128
    rows = _along([2, 2], 32, bits, dim)
    along = pack_along_keys(rows, bits, dim)
    assert torch.equal(krepack.launch_along_keys_to_tokens(along, bits, dim), rows)


@cpu_only
@pytest.mark.parametrize("bits,dim", [(2, 40), (2, 72), (2, 96), (3, 48), (3, 80), (3, 96)])
def test_kernel_interpret_rows_of_a_partial_word(bits, dim):
    """Dims whose rows are not whole 32-bit words (or whose groups of 16 words are padded): stored byte by byte."""
    along = _along([2, 1], 32, bits, dim)
    assert torch.equal(krepack.launch_along_keys_to_tokens(along, bits, dim), _torch_conversion(along, bits, dim))


@cpu_only
@pytest.mark.parametrize("lead", [[], [3], [2, 2, 3]], ids=["no-lead", "one-lead", "three-lead"])
def test_kernel_interpret_any_number_of_leading_dims(lead):
    bits, dim = 3, 64
    along = _along(lead, 32, bits, dim)
    assert torch.equal(krepack.launch_along_keys_to_tokens(along, bits, dim), _torch_conversion(along, bits, dim))


@cpu_only
def test_kernel_interpret_reads_a_non_contiguous_input_and_leaves_it_untouched():
    """A slice along the batch and head dims of a bigger cache: the kernel reads the slice, not its neighbours."""
    bits, dim = 3, 128
    big = _along([4, 5], 32, bits, dim)
    before = big.clone()
    along = big[1:3, ::2]
    assert not along.is_contiguous()
    got = krepack.launch_along_keys_to_tokens(along, bits, dim)
    assert got.is_contiguous() and torch.equal(got, _torch_conversion(along, bits, dim))
    assert torch.equal(big, before)


@cpu_only
def test_kernel_interpret_input_at_an_odd_byte_offset():
    """A contiguous view that starts at an odd byte: the kernel loads 32-bit words, so it reads a copy."""
    bits, dim = 2, 64
    flat = torch.randint(0, 256, (1 + 2 * 16 * packed_size(dim, bits),), dtype=torch.uint8)
    along = flat[1:].view(2, 16, packed_size(dim, bits))
    assert along.data_ptr() % 4
    expected = _torch_conversion(along.clone(), bits, dim)  # the torch ops' int32 view needs an aligned start too
    assert torch.equal(krepack.launch_along_keys_to_tokens(along, bits, dim), expected)


@cpu_only
def test_kernel_interpret_no_tokens():
    along = _along([2, 3], 0, 3, 64)
    got = krepack.launch_along_keys_to_tokens(along, 3, 64)
    assert got.shape == along.shape and got.dtype == torch.uint8


@pytest.mark.parametrize(
    "bits,dim,shape,dtype,match",
    [
        (4, 64, (1, 2, 16, 32), torch.uint8, "2 and 3 bits, not 4"),
        (1, 64, (1, 2, 16, 8), torch.uint8, "2 and 3 bits, not 1"),
        (3, 64, (1, 2, 40, 24), torch.uint8, "40 tokens: .* multiple of 16"),
        (3, 64, (1, 2, 16, 16), torch.uint8, "16 bytes per token; 64 codes of 3 bits take 24"),
        (2, 64, (1, 2, 16, 24), torch.uint8, "24 bytes per token; 64 codes of 2 bits take 16"),
        (3, 64, (1, 2, 16, 24), torch.int32, "must be uint8, got torch.int32"),
        (3, 64, (24,), torch.uint8, r"\[\.\.\., T, bytes\]"),
        (3, 60, (1, 2, 16, 24), torch.uint8, "multiple of 8"),
    ],
)
def test_clear_errors(bits, dim, shape, dtype, match):
    along = torch.zeros(shape, dtype=dtype)
    with pytest.raises(ValueError, match=match):
        krepack.launch_along_keys_to_tokens(along, bits, dim)


# ---------------------------------------------------------------- GPU, real size


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_kernel_gpu_equals_the_torch_conversion_eager_and_compiled():
    """Batch 8, 4 KV heads, 32768 tokens, head_dim 256 at 3 bits (100 MB of V codes packed along keys):
    bit-exact eager and through torch.compile(fullgraph=True) with wrap_triton."""
    bits, dim = 3, 256
    along = _along([8, 4], 32768, bits, dim, device="cuda")
    expected = _torch_conversion(along, bits, dim)
    eager = krepack.launch_along_keys_to_tokens(along, bits, dim)
    torch.cuda.synchronize()
    assert torch.equal(eager, expected)
    compiled = torch.compile(
        lambda a: krepack.launch_along_keys_to_tokens(a, bits, dim, wrap=torch.library.wrap_triton), fullgraph=True
    )
    assert torch.equal(compiled(along), expected)


_WRITES_PROBE = """
import json, torch, triton
from torch._higher_order_ops import triton_kernel_wrap as wrap
from triton.backends.compiler import GPUTarget
from rqcompile.kernels import along_keys_repack as krepack

class Sm90Driver:  # just enough of a Triton driver for torch's TTIR generation: the target
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

analyze = getattr(wrap, "identify_accessed_tensors", None) or getattr(wrap, "identify_mutated_tensors")
kwargs = {
    "in_ptr": torch.empty(64, 96, dtype=torch.uint8), "out_ptr": torch.empty(64, 96, dtype=torch.uint8),
    "BLOCKS": 4, "D": 256, "NBYTES": 96, "HIGH": True, "WORDS": True, "NB": 8, "GL": 16, "GH": 8,
}
triton.runtime.driver.set_active(Sm90Driver())
found = analyze(krepack._along_keys_to_tokens_kernel, kwargs, {})
writes = found.read_writes.writes if hasattr(found, "read_writes") else found
print(json.dumps(sorted(getattr(w, "name", w) for w in writes)))
"""


def test_compiled_launch_writes_only_its_output():
    """torch's wrap_triton analysis of the kernel's TTIR (an sm_90 target, generated without a GPU through a stand-in
    driver, as tests/kernel_writes_probe.py does) finds only the output written: torch.compile does not copy the
    cache it reads."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _WRITES_PROBE], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == ["out_ptr"]
