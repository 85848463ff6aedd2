"""The cache write into V codes packed along keys: `packing.write_along_keys_` (torch ops) and its Triton kernel.

A decode step or a prefill chunk stores t tokens' codes (standard layout, as the quantize kernels write them) at t
consecutive slots of a static buffer packed along keys (`packing.pack_along_keys`: blocks of 16 keys share words).
The specification is the sequential oracle below: unpack the whole buffer along keys, set the rows, pack it again.
Every case starts from random buffer bytes, so a bit lost or smeared into a neighbouring key shows (torch.equal).
Without CUDA the kernel runs in Triton's interpreter on CPU tensors; the `gpu` test runs it at a real size.
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

from rqcompile.kernels import write_along_keys as kwrite  # noqa: E402
from rqcompile.quant.packing import (  # noqa: E402
    pack,
    pack_along_keys,
    packed_size,
    unpack,
    unpack_along_keys,
    write_along_keys_,
)

if not HAS_CUDA:  # make sure the @triton.jit function was built in interpreter mode
    kwrite = importlib.reload(kwrite)

cpu_only = pytest.mark.skipif(HAS_CUDA, reason="interpreter tests run where there is no GPU")


@pytest.fixture(autouse=True)
def _interpret_mode(monkeypatch):
    """Rebuild the kernel in interpreter mode right before each CPU test (as tests/test_kernels.py does)."""
    global kwrite
    if not HAS_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        kwrite = importlib.reload(kwrite)


def _case(bits, dim, start, tokens, keys, batch=2, heads=3, device="cpu"):
    """A buffer of random bytes (any bytes are valid codes), random new codes, and their slots start..start+t-1."""
    nbytes = packed_size(dim, bits)
    buffer = torch.randint(0, 256, (batch, heads, keys, nbytes), dtype=torch.uint8, device=device)
    codes = torch.randint(0, 256, (batch, heads, tokens, nbytes), dtype=torch.uint8, device=device)
    return buffer, codes, torch.arange(start, start + tokens, device=device)


def _oracle(buffer, codes, cache_position, bits, dim):
    """The buffer after the write, sequentially: every key's codes, the new rows set, packed along keys again."""
    full = unpack_along_keys(buffer, bits, dim)
    full[:, :, cache_position] = unpack(codes, bits, dim)
    return pack_along_keys(pack(full, bits), bits, dim)


# (start, t, T): where a write can fall relative to the blocks of 16 keys
CASES = {
    "decode at 0": (0, 1, 64),
    "decode at 15 (last key of a block)": (15, 1, 64),
    "decode at 16 (first key of a block)": (16, 1, 64),
    "decode at 37 (inside a block)": (37, 1, 64),
    "decode at the last slot": (63, 1, 64),
    "prefill of 40 from 0": (0, 40, 64),
    "chunk from mid-block over 3 blocks": (21, 30, 64),
    "chunk ending exactly at the buffer end": (50, 14, 64),
    "whole blocks ending at the buffer end": (48, 16, 64),
    "the whole buffer": (0, 64, 64),
    "a buffer of one block": (0, 16, 16),
}
LAYOUTS = [(2, 64), (2, 128), (3, 64), (3, 128)]


@pytest.mark.parametrize("bits,dim", LAYOUTS)
@pytest.mark.parametrize("case", list(CASES))
def test_write_matches_the_sequential_oracle(case, bits, dim):
    buffer, codes, pos = _case(bits, dim, *CASES[case])
    expected = _oracle(buffer, codes, pos, bits, dim)
    write_along_keys_(buffer, codes, pos, bits, dim)
    assert torch.equal(buffer, expected)


@pytest.mark.parametrize("bits", [2, 3])
def test_written_rows_hold_the_new_codes_and_every_other_key_keeps_its_bits(bits):
    dim, (start, tokens, keys) = 64, CASES["chunk from mid-block over 3 blocks"]
    buffer, codes, pos = _case(bits, dim, start, tokens, keys)
    before = unpack_along_keys(buffer, bits, dim)
    write_along_keys_(buffer, codes, pos, bits, dim)
    after = unpack_along_keys(buffer, bits, dim)
    others = torch.ones(keys, dtype=torch.bool)
    others[pos] = False
    assert torch.equal(after[:, :, pos], unpack(codes, bits, dim))
    assert torch.equal(after[:, :, others], before[:, :, others])


def test_consecutive_decode_steps_build_the_prefix_packed_along_keys():
    """Token by token from an empty (zero) buffer, the buffer is pack_along_keys of the tokens written so far."""
    bits, dim, keys = 3, 64, 32
    buffer = torch.zeros(1, 2, keys, packed_size(dim, bits), dtype=torch.uint8)
    tokens = torch.randint(0, 256, (1, 2, 20, packed_size(dim, bits)), dtype=torch.uint8)
    for p in range(20):
        write_along_keys_(buffer, tokens[:, :, p : p + 1], torch.tensor([p]), bits, dim)
    expected = torch.zeros_like(buffer)
    expected[:, :, :20] = tokens
    assert torch.equal(buffer, pack_along_keys(expected, bits, dim))


@cpu_only
@pytest.mark.parametrize("bits,dim", LAYOUTS)
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_interpret_matches_the_torch_write(case, bits, dim):
    buffer, codes, pos = _case(bits, dim, *CASES[case])
    expected = buffer.clone()
    write_along_keys_(expected, codes, pos, bits, dim)
    kwrite.launch_write_along_keys(buffer, codes, pos, bits, dim)
    assert torch.equal(buffer, expected)


@cpu_only
def test_kernel_interpret_reads_strided_buffer_and_codes():
    """A buffer that is a head slice of a larger one, codes with a gap between heads (strides, not copies)."""
    bits, dim = 3, 64
    big, codes, pos = _case(bits, dim, 21, 30, 64, heads=4)
    wide = torch.randint(0, 256, (2, 3, 30, 2 * codes.shape[-1]), dtype=torch.uint8)
    wide[..., : codes.shape[-1]] = codes[:, :3]
    buffer, codes = big[:, 1:], wide[..., : codes.shape[-1]]
    expected = buffer.clone()
    write_along_keys_(expected, codes, pos, bits, dim)
    untouched = big[:, :1].clone()
    kwrite.launch_write_along_keys(buffer, codes, pos, bits, dim)
    assert torch.equal(buffer, expected) and torch.equal(big[:, :1], untouched)


WRITERS = {"torch": write_along_keys_, "kernel": lambda *a: kwrite.launch_write_along_keys(*a)}


@pytest.mark.parametrize("writer", list(WRITERS))
@pytest.mark.parametrize(
    "bits,keys,pos,match",
    [
        (3, 64, [60, 61, 62, 63, 64], "past the cache length 64"),
        (3, 64, [64], "past the cache length 64"),
        (2, 64, [3, 5], "consecutive"),
        (2, 64, [5, 4], "consecutive"),
        (3, 64, [-1], "negative"),
        (4, 64, [0], "2 and 3 bits, not 4"),
        (3, 40, [0], "multiple of 16"),
    ],
)
def test_clear_errors(writer, bits, keys, pos, match):
    dim = 64
    nbytes = packed_size(dim, bits)
    buffer = torch.randint(0, 256, (1, 2, keys, nbytes), dtype=torch.uint8)
    codes = torch.randint(0, 256, (1, 2, len(pos), nbytes), dtype=torch.uint8)
    before = buffer.clone()
    with pytest.raises(ValueError, match=match):
        WRITERS[writer](buffer, codes, torch.tensor(pos), bits, dim)
    assert torch.equal(buffer, before)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"nbytes": 20}, "bytes per key"),
        ({"codes_heads": 3}, "do not match the buffer"),
        ({"positions": 2}, "new tokens' slots"),
    ],
)
def test_clear_errors_on_shapes(change, match):
    bits, dim = 3, 64
    nbytes = change.get("nbytes", packed_size(dim, bits))
    buffer = torch.zeros(1, 2, 64, nbytes, dtype=torch.uint8)
    codes = torch.zeros(1, change.get("codes_heads", 2), 3, nbytes, dtype=torch.uint8)
    with pytest.raises(ValueError, match=match):
        write_along_keys_(buffer, codes, torch.arange(change.get("positions", 3)), bits, dim)


class _Cache(torch.nn.Module):
    """A static V-code buffer packed along keys, written at cache_position by each call (as a model's layer does)."""

    def __init__(self, bits, dim, keys):
        super().__init__()
        self.bits, self.dim = bits, dim
        self.register_buffer("v", torch.randint(0, 256, (1, 2, keys, packed_size(dim, bits)), dtype=torch.uint8))

    def forward(self, codes, cache_position):
        write_along_keys_(self.v, codes, cache_position, self.bits, self.dim)
        return self.v.to(torch.int32).sum()


def test_torch_export_traces_the_write_of_a_registered_buffer():
    """Exported once (at slots 21..23), the program writes wherever cache_position says (here 40..42): start is data,
    not a constant of the trace; decomposed, the buffer is one of the program's mutated buffers."""
    bits, dim = 3, 64
    module = _Cache(bits, dim, 64)
    codes = torch.randint(0, 256, (1, 2, 3, packed_size(dim, bits)), dtype=torch.uint8)
    exported = torch.export.export(module, (codes, torch.arange(21, 24)))
    assert list(exported.run_decompositions({}).graph_signature.buffers_to_mutate.values()) == ["v"]
    program = exported.module()
    expected = program.v.clone()
    write_along_keys_(expected, codes, torch.arange(40, 43), bits, dim)
    program(codes, torch.arange(40, 43))
    assert torch.equal(program.v, expected)


def test_torch_compile_fullgraph_equals_eager():
    bits, dim = 2, 128
    compiled = torch.compile(write_along_keys_, fullgraph=True, backend="eager")
    for start, tokens, keys in (CASES["chunk from mid-block over 3 blocks"], CASES["decode at the last slot"]):
        buffer, codes, pos = _case(bits, dim, start, tokens, keys)
        expected = buffer.clone()
        write_along_keys_(expected, codes, pos, bits, dim)
        compiled(buffer, codes, pos, bits, dim)
        assert torch.equal(buffer, expected)


def test_under_tracing_slots_past_the_end_are_dropped_and_nothing_else_changes():
    """No values to check while tracing: a token whose slot is past the buffer is not written, and no other key is
    touched (the window of blocks stays inside the buffer)."""
    bits, dim, keys = 3, 64, 64
    buffer, codes, pos = _case(bits, dim, keys - 2, 5, keys)
    expected = _oracle(buffer, codes[:, :, :2], pos[:2], bits, dim)
    torch.compile(write_along_keys_, fullgraph=True, backend="eager")(buffer, codes, pos, bits, dim)
    assert torch.equal(buffer, expected)


# ---------------------------------------------------------------- GPU, real size


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("start,tokens", [(0, 1), (4095, 1), (2061, 1), (0, 1000), (3093, 1000)])
def test_kernel_gpu_matches_the_torch_write(start, tokens):
    """Batch 8, 4 KV heads, a 4096-slot cache, head_dim 256 at 3 bits: a decode step and a 1000-token prefill
    chunk, eager and through torch.compile (wrap_triton)."""
    bits, dim = 3, 256
    buffer, codes, pos = _case(bits, dim, start, tokens, 4096, batch=8, heads=4, device="cuda")
    expected = _oracle(buffer, codes, pos, bits, dim)
    torch_write = buffer.clone()
    write_along_keys_(torch_write, codes, pos, bits, dim)
    assert torch.equal(torch_write, expected)
    eager = buffer.clone()
    kwrite.launch_write_along_keys(eager, codes, pos, bits, dim)
    torch.cuda.synchronize()
    assert torch.equal(eager, expected)
    compiled = torch.compile(
        lambda b, c, p: kwrite.launch_write_along_keys(b, c, p, bits, dim, wrap=torch.library.wrap_triton),
        fullgraph=True,
    )
    compiled(buffer, codes, pos)
    assert torch.equal(buffer, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_kernel_gpu_drops_slots_past_the_end_and_touches_nothing_else():
    """On CUDA the positions are not read on the host: slots past the buffer are not written, nothing else moves."""
    bits, dim, keys = 3, 256, 4096
    buffer, codes, pos = _case(bits, dim, keys - 2, 5, keys, batch=8, heads=4, device="cuda")
    expected = _oracle(buffer, codes[:, :, :2], pos[:2], bits, dim)
    kwrite.launch_write_along_keys(buffer, codes, pos, bits, dim)
    assert torch.equal(buffer, expected)
