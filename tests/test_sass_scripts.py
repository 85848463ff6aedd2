"""The SASS readers behind benchmarks/sass_counts.py and benchmarks/quantize_sass.py, on hand-made cuobjdump text:
the static counts in BENCHMARKS.md are only as right as these."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the scripts import each other as `benchmarks.*`

from benchmarks import quantize_sass, sass_counts  # noqa: E402


def _sass(*rows: tuple[int, str]) -> str:
    """cuobjdump -sass lines for (address, instruction text)."""
    return "\n".join(f"        /*{addr:04x}*/    {text} ;   /* 0x0000000000007918 */" for addr, text in rows)


def test_every_instruction_is_read_whatever_the_width_of_its_address():
    """Kernels longer than 0x10000 bytes have 5-digit addresses (session 27: a 4-digit pattern dropped them all)."""
    sass = _sass((0x0, "LDC R1, c[0x0][0x28]"), (0xFFF0, "@!P0 FFMA R2, R3, R4, R5"), (0x10000, "EXIT"))
    assert sass_counts.sass_rows(sass) == [
        (0x0, "LDC", " R1, c[0x0][0x28] ;   /* 0x0000000000007918 */"),
        (0xFFF0, "FFMA", " R2, R3, R4, R5 ;   /* 0x0000000000007918 */"),
        (0x10000, "EXIT", " ;   /* 0x0000000000007918 */"),
    ]


def test_a_loop_body_runs_once_per_trip_and_forward_branches_are_no_loops():
    body = [(0x20 + 0x10 * i, "FADD R1, R1, R2") for i in range(4)]
    sass = _sass(
        (0x0, "MOV R1, RZ"),
        (0x10, "BRA 0x80"),  # forward: no loop
        *body,
        (0x60, "BRA 0x20"),  # back to the body's start: a loop of 5 instructions with its branch
        (0x70, "STG.E [R2], R1"),
        (0x80, "EXIT"),
    )
    assert sass_counts.backward_branches(sass_counts.sass_rows(sass)) == [(0x20, 0x60)]
    assert quantize_sass.dynamic_count(sass, trips=5) == (9 + 4 * 5, 9, 1)
    assert quantize_sass.dynamic_count(sass, trips=1) == (9, 9, 1)


def test_a_loop_inside_a_loop_runs_the_product_of_their_trips():
    """The norm groups' runtime loop (2 trips) around the scale search's (5 candidates)."""
    sass = _sass(
        (0x0, "MOV R1, RZ"),
        (0x10, "FADD R1, R1, R2"),  # group loop only
        (0x20, "FMUL R1, R1, R2"),  # search loop: 0x20-0x30
        (0x30, "BRA 0x20"),
        (0x40, "BRA 0x10"),  # group loop: 0x10-0x40
        (0x50, "EXIT"),
    )
    assert quantize_sass.dynamic_count(sass, trips=5, outer_trips=2) == (1 + 2 * (2 + 2 * 5) + 1, 6, 2)
    assert quantize_sass.dynamic_count(sass, trips=5) == (1 + 2 + 2 * 5 + 1, 6, 2)


def test_tensor_core_work_is_the_multiply_adds_each_hgmma_names():
    sass = _sass((0x0, "HGMMA.64x128x8.F32.TF32 R24, gdesc[UR4], R24"), (0x10, "HGMMA.64x64x16.F32.BF16 R0, R2, R0"))
    assert quantize_sass.tensor_flops(sass) == {"TF32": 2 * 64 * 128 * 8, "BF16": 2 * 64 * 64 * 16}


def test_an_hgmma_inside_a_loop_counts_once_per_trip():
    """A dense rotation in the norm groups' runtime loop (2 trips) multiplies once per group, not once in all."""
    sass = _sass(
        (0x0, "MOV R1, RZ"),
        (0x10, "HGMMA.64x128x8.F32.TF32 R24, gdesc[UR4], R24"),  # group loop: 0x10-0x30
        (0x20, "FADD R1, R1, R2"),
        (0x30, "BRA 0x10"),
        (0x40, "HGMMA.64x64x16.F32.BF16 R0, R2, R0"),  # after the loop: once
        (0x50, "EXIT"),
    )
    assert quantize_sass.tensor_flops(sass, trips=2) == {"TF32": 2 * 2 * 64 * 128 * 8, "BF16": 2 * 64 * 64 * 16}
    assert quantize_sass.tensor_flops(sass) == {"TF32": 2 * 64 * 128 * 8, "BF16": 2 * 64 * 64 * 16}


def test_the_decode_issue_floor_runs_the_loop_per_tile_and_the_rest_once_per_program():
    """3 instructions before the loop, a loop of 5 (its branch included), 2 after: per program 5 once and 5 per
    64-key tile. Batch 1 x 4 KV heads x 128 keys = 2 tiles per pair; 128 registers leave 4 programs per SM, and the
    wave model then splits each pair's 2 tiles over 2 programs: 4 warps x (8 programs x 5 + 8 tiles x 5) = 320
    warp-instructions at 132 x 4 per 1.98 GHz cycle."""
    sass = _sass(
        *[(0x10 * i, "MOV R1, RZ") for i in range(3)],
        *[(0x30 + 0x10 * i, "FADD R1, R1, R2") for i in range(4)],
        (0x70, "BRA 0x30"),
        (0x80, "STG.E [R2], R1"),
        (0x90, "EXIT"),
    )
    issue_us, byte_us, splits = sass_counts.decode_floors(sass, regs=128, batch=1, ctx=128, kb=3, vb=3)
    assert splits == 2
    assert issue_us == pytest.approx(320 / (132 * 4 * 1.98e9) * 1e6)
    assert byte_us == pytest.approx(4 * 128 * (256 * 6 // 8 + 8) / 4275e9 * 1e6)  # codes + 4 fp16 norms per key
