"""Shared helpers of the Triton kernels."""

from __future__ import annotations

import functools
import os

import triton
import triton.language as tl


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (kernels run on CPU tensors, numpy semantics)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_precision() -> str:
    """fp32 `tl.dot` precision for the dense (hadamard) rotation: 3xTF32 (about fp32) on GPU, exact in the
    interpreter."""
    return "ieee" if interpreting() else "tf32x3"


def supported_dim(dim: int) -> bool:
    return dim >= 8 and dim % 8 == 0


def is_pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


@functools.cache
def sm_count(index: int) -> int:
    import torch

    if interpreting() or not torch.cuda.is_available():
        return 8
    return torch.cuda.get_device_properties(index).multi_processor_count


@triton.jit
def _div_rcp(a, b, r, FMA_DIV: tl.constexpr):
    """div_rn(a, b) given r = div_rn(1, b), in 3 instructions instead of ~10: q = a r, then q + (a - b q) r with the
    residual exact by FMA. With r the correctly rounded reciprocal one correction gives the correctly rounded
    quotient (Markstein; 1.4e8 random/adversarial pairs checked) while nothing leaves the normal range: |a| >= 2^-100
    or a == 0, |a / b| < 2^126, b <= 2^125. A zero quotient may come out +0 where IEEE gives -0 (a = -0): the GPU
    build folds the residual's negation into its FMA (H200, session 25); the codes cannot tell, they come from
    comparisons. FMA_DIV=False (an interpreter whose fma rounds twice): plain div_rn."""
    if FMA_DIV:
        q = a * r
        return tl.fma(-tl.fma(b, q, -a), r, q)
    else:
        return tl.math.div_rn(a, b)


# ---------------------------------------------------------------- calibrated bit allocation layouts
#
# A layout reaches the kernels as one constexpr string per tensor, "w:n,w:n,..." (the width and length of each run
# of equal widths, in stored order), and the kernels read it through the constexpr functions below, evaluated at
# compile time. A string is an ordinary constexpr (hashable, one specialization per layout) and needs no tuple
# constexprs. The functions may only use Python builtins: Triton hashes their source and refuses references to
# other globals.


def layout_string(widths) -> str:
    """The constexpr form of per-coordinate `widths` (run-length encoded)."""
    from rqcompile.quant.packing import runs

    return ",".join(f"{w}:{n}" for w, _, n in runs(widths))


@triton.constexpr_function
def layout_runs(layout):
    """(width, start, count, byte offset in the row, offset of its codebook in `levels`) of each run."""
    found = []
    col = 0
    nbytes = 0
    nlevels = 0
    for item in str(layout).split(","):
        width, count = (int(part) for part in item.split(":"))
        found.append((width, col, count, nbytes, nlevels))
        col += count
        nbytes += count * width // 8
        nlevels += 1 << width
    return found


@triton.constexpr_function
def num_runs(layout):
    return len(layout_runs(layout))


@triton.constexpr_function
def has_run(layout, r):
    """Whether the layout has a run r (kernels with a fixed number of run slots skip the missing ones)."""
    return r < len(layout_runs(layout))


@triton.constexpr_function
def run_width(layout, r):
    return layout_runs(layout)[r][0]


@triton.constexpr_function
def run_start(layout, r):
    return layout_runs(layout)[r][1]


@triton.constexpr_function
def run_count(layout, r):
    return layout_runs(layout)[r][2]


@triton.constexpr_function
def run_byte(layout, r):
    return layout_runs(layout)[r][3]


@triton.constexpr_function
def run_level(layout, r):
    """Offset of run r's codebook in `levels` (the codebooks are concatenated in run order)."""
    return layout_runs(layout)[r][4]


@triton.constexpr_function
def run_window(layout, r):
    """Smallest power of two >= the run's length and >= 16: the tile width a run is processed at."""
    count = layout_runs(layout)[r][2]
    size = 16
    while size < count:
        size *= 2
    return size


@triton.constexpr_function
def run_overlaps(layout, r, lo, hi):
    """Whether run r has coordinates in [lo, hi)."""
    found = layout_runs(layout)[r]
    return found[1] < hi and found[1] + found[2] > lo


@triton.constexpr_function
def codebook_levels(layout):
    """Levels of all the runs' codebooks together (the scale-search candidates follow them)."""
    return sum(1 << found[0] for found in layout_runs(layout))


@triton.constexpr_function
def row_bytes(layout):
    return sum(found[2] * found[0] // 8 for found in layout_runs(layout))


@triton.constexpr_function
def num_planes(width):
    """Bit planes of a `width`-bit code (4, 2 and 1 bits, low bits first; docs/FORMAT.md)."""
    return len(plane_widths(width))


@triton.constexpr_function
def plane_widths(width):
    found = []
    left = width
    for size in (4, 2, 1):
        while left >= size:
            found.append(size)
            left -= size
    return found


@triton.constexpr_function
def plane_width(width, p):
    return plane_widths(width)[p]


@triton.constexpr_function
def plane_shift(width, p):
    """The code's lowest bit held by plane p (= bits per code in the planes before it)."""
    return sum(plane_widths(width)[:p])


@triton.constexpr_function
def run_covers(layout, r, lo, hi):
    """Whether run r holds every coordinate of [lo, hi)."""
    found = layout_runs(layout)[r]
    return found[1] <= lo and found[1] + found[2] >= hi


@triton.constexpr_function
def run_in_group(layout, r, group):
    """Whether run r lies inside one norm group of `group` coordinates."""
    found = layout_runs(layout)[r]
    return found[1] // group == (found[1] + found[2] - 1) // group


@triton.jit
def channels(perm_ptr, h, c, mask, D: tl.constexpr, PERM: tl.constexpr):
    """Input channel that stored coordinate `c` of head `h` reads: `perm[h, c]` (a calibrated bit allocation's
    block order, int64 [H, D]) or `c` itself."""
    if PERM:
        ch = tl.load(perm_ptr + h * D + c, mask=mask, other=0).to(tl.int32)
    else:
        ch = c
    return ch
