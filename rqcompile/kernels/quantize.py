"""rq::quantize and rq::dequantize on CUDA (docs/FORMAT.md): the launchers, which pick a kernel per call.

Quantize kernels, one pass over the K/V rows: v1 (`quantize_v1`, every layout), v2 (`quantize_v2`, slot tiles:
uniform widths, the default for dense bulk writes) and the decode step's rows kernel (`quantize_rows`). Dequantize
(`dequantize`): the inverse, used by the prefill path (dequantize + SDPA) and rq::dequantize on CUDA.

Calibrated bit allocation (a `perm` and per-coordinate widths): the same kernels, specialized on the layout string
(`LAYOUT`, see `common.layout_string`; "" for one width) and on `PERM`. The rotation reads its input channels in
`perm` order (gathered loads of x, mean and scale), each run of equal widths is coded against its own codebook and
packed as its own bit planes; norm groups and the scale search are over stored coordinates, as for one width.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import triton

from rqcompile.kernels.common import (
    codebook_levels,
    dot_precision,
    interpreting,
    layout_string,
    row_bytes,
    supported_dim,
)
from rqcompile.kernels.dequantize import _dequantize_kernel
from rqcompile.kernels.quantize_v1 import _quantize_kernel
from rqcompile.kernels.quantize_v2 import _fold_prep_kernel, _quantize_v2_kernel, _v2_prep_kernel

if TYPE_CHECKING:
    import torch

# launch defaults (tuned on the device, see benchmarks/NOTES.md)
DEFAULTS = {"block_t": 8, "block_t_dense": 64, "lut": 0, "num_warps": 4, "reshape": True}
# `launch_quantize(variant=...)` default for block rotations, and the "v2" kernel's launch: `v2_tile` elements per
# slot tile ([BLOCK_T, G/P], BLOCK_T = v2_tile // (G/P)), `v2_num_warps` warps. v2 since session 28: a
# [1, 4, 65536, 256] bf16 write at 3 bits with the scale search in 0.516 ms against v1's 1.305 (planar) and 0.528
# against 1.456 (iso), H200, one process; codes off the fp32 reference's in 2-4e-6 of codes (v1: 0, the row sums
# in another order), as the dense default has had since session 17. Session 30's search on level magnitudes:
# 0.437 / 0.463 ms; 0.448 / 0.464 after its binary code search (session 31). Session 31's re-sweep
# (benchmarks/quantize_dense_sweep.py --backends) keeps 128 elements on 4 warps: 256 / 512 are 23-50% slower at 2-3
# bits for every backend (at 4 bits 256 is level for planar, -3% for iso; 512 +23-30%) although they count 14-21%
# fewer instructions per element (85 -> 157 / 255 registers: fewer programs per SM); 64 on 2 warps is -7% / -5% at
# 3 bits and planar 2 bits -8%, but iso 4 bits +11%.
DEFAULTS.update({"quantize_variant": "v2", "v2_tile": 128, "v2_num_warps": 4})
# A dense per-group rotation (full mixing, the default config's; hadamard) takes v2 where it applies: on the H200
# (session 17, benchmarks/quantize_dense_sweep.py) a [1, 4, 65536, 256] bf16 write in 1.55 ms against v1's 3.23 ms,
# codes off the fp32 reference's in 1.5e-5 of bytes against v1's 1.7e-5 (both sum the rotation in tf32x3 dots).
DEFAULTS["quantize_variant_dense"] = "v2"
# ... with 512-element slot tiles (64 rows at g = 128, 3 bits), at most 64 rows: 1.19 ms against 1.55 at 128
# elements on the same write (session 17); codes equal to the 128-element tile's but for float ties (session 18,
# benchmarks/quantize_tile_check.py --same-as 128). 1024 since session 30: the same 64 rows at 2-3 bits (the cap),
# and 64 rows instead of 32 at 4 bits (8 codes per word): 1.660 against 1.949 ms on that write at 4 bits, H200
# (with the 64-coordinate dot steps below; 16 rows 1.772, 64 rows on 8 warps 2.303).
DEFAULTS["v2_tile_dense"] = 1024
# ... rotating each group by tl.dot steps over this many input coordinates (v1: 32). The step trades registers
# against steps: at 64 the 3-bit build has 96 B of stack per thread against 360 B at 32 (sm_90 SASS,
# benchmarks/quantize_sass.py; session 29). H200, session 30 (benchmarks/quantize_dense_sweep.py, the write above):
# 64 against 32 / 128: 0.985 against 1.109 / 1.713 ms at 3 bits, 0.672 against 0.857 / 1.063 at 2 bits, 1.945
# against 2.031 / 3.549 at 4 bits; codes off the fp32 reference's in 0.8-1.6e-5 of bytes, as at 32 (float ties).
DEFAULTS["v2_dense_chunk"] = 64
# ... with R split into tf32 halves once per launch (`_split_tf32`) and the three tf32 dots written out, instead of
# tl.dot's tf32x3 converting R in every program and masking NaNs between its dots: sm_90 SASS 129 -> 114
# instructions per element at 3 bits (89 -> 74 at 2, 217 -> 201 at 4; session 30), for twice the rotation's reads
# (hi and lo: 1 GB instead of 512 MB of L2 reads on the [1, 4, 65536, 256] write). H200 (session 31, against tf32x3
# in the same process): 0.836 -> 0.685 ms at 3 bits, 1.234 -> 1.162 at 4, 0.494 -> 0.497 at 2 (kept on at every
# width: one kernel build to test); codes off the fp32 reference's in 0.9-2.2e-5 of bytes, as with tf32x3.
DEFAULTS["v2_dense_split"] = True
# ... or (x - mean) / scale folded into the rotation, stored as three bf16 parts, and x fed to three bf16 dots as
# loaded (`_fold_rotation`, one Triton launch of prep: _fold_prep_kernel). sm_90 SASS 114 -> 98 instructions per
# element at 3 bits, tensor-core floor 104 -> 52 us (session 31). H200, session 32 (quantize_dense_sweep.py, against
# split in one process; CUDA-graph replay in brackets): 0.687 -> 0.539 ms at 3 bits (0.671 -> 0.535), 0.498 -> 0.365
# at 2, 1.163 -> 0.955 at 4; codes off the fp32 reference in 0.8-2.8e-5 of bytes, as with split. The default since
# session 32; it takes precedence over v2_dense_split, for bf16 x only (fp16 / fp32 x is not exact as a bf16
# operand: those writes take the split).
DEFAULTS["v2_dense_fold"] = True
# A register cap per code width for v2's dense launches (Triton's `maxnreg`; a width not named: no cap), and the warps
# of a capped launch where they differ from `v2_num_warps`. The fold build holds 255 registers, so 2 programs of 4
# warps per SM; 168 lets 3 in at 72 B of stack at 3 bits, 8 B at 2 (sm_90 counts, session 32). H200, session 33
# (quantize_dense_sweep.py, one process; CUDA-graph replay in brackets): 0.540 -> 0.490 ms at 3 bits (0.534 -> 0.486),
# 0.366 -> 0.314 at 2 (0.359 -> 0.309). At 4 bits 168 spills 576 B and is slower (0.973 -> 1.116); 8 warps capped at
# 128 (2 programs of 8 warps per SM, 24 B of stack) is 0.928 unrolled and 0.861 with the pipelined dots below, against
# 0.957 uncapped on 4 warps (the sweep's codes as close to the reference as the default's: 3.4e-5 of bytes); the
# default since session 34, after its GPU tests. Eager launches only: torch.compile's
# Triton wrapper would pass `maxnreg` on to the kernel as an argument, and Inductor's code for user kernels (torch
# 2.14's `config_to_dict`) drops a config's `maxnreg`, so a compiled graph runs the uncapped build on `v2_num_warps`
# (benchmarks/NOTES.md "Session 33").
DEFAULTS["v2_dense_maxnreg"] = {2: 168, 3: 168, 4: 128}
DEFAULTS["v2_dense_capped_warps"] = {4: 8}
# The most rows a dense v2 program takes (the rotation's tl.dot needs at least 16). 128 on 8 warps stages the
# rotation's parts once per 128 rows instead of 64 for the same per-thread state (sm_90: 255 registers, 97
# instructions per element against 98), but holds 1 program per SM: slower on the H200 (session 33, against 64 rows
# on 4 warps, uncapped, one process): 0.607 against 0.540 ms at 3 bits, 0.392 / 0.366 at 2, 1.158 / 0.973 at 4.
DEFAULTS["v2_dense_max_rows"] = 64
# The code widths whose folded rotation runs its dots as one runtime loop over (chunk, part) that Triton's pipeliner
# feeds by asynchronous copies (quantize_v2._rotate_folded's PIPE), instead of unrolled: each part through registers
# and shared memory in series, half of the stall samples without the scale search (ncu, session 33). H200, session
# 33 (quantize_dense_sweep.py, one process; CUDA graph in brackets), with the register caps above: 0.491 -> 0.486 ms
# at 3 bits (0.484 -> 0.479), 0.314 -> 0.296 at 2 (0.309 -> 0.290), 0.928 -> 0.861 at 4 (8 warps, cap 128); without
# the caps (what compiled graphs run) 0.54 -> 0.510 and 0.365 -> 0.332, but 0.957 -> 0.979 at 4 bits (4 warps).
# Codes and norms bit for bit the unrolled dots' (the same dots in the same order; test_v2_dense_pipeline_gpu).
# Stages: Triton's default, 3 (2: within 1%). 32-coordinate steps: slower (0.494 / 0.314 at 3 / 2 bits).
DEFAULTS["v2_dense_pipeline"] = (2, 3, 4)
# ... of which these pipeline only in a capped launch (eager): uncapped, at 4 warps, the 4-bit pipeline was slower
# (0.957 -> 0.979 ms; with the tie rule below 0.718 -> 0.750, session 34).
DEFAULTS["v2_dense_pipeline_needs_cap"] = (4,)
# The codes under the format's tie rule (a unit whose u / c is a decision boundary exactly rounds toward zero, so
# -u codes as the mirror of u; docs/FORMAT.md "Ties"): each candidate compares |u| once per upward boundary
# (quantize_v2._magnitude_of_abs), and the kept codes come from |u| and the sign. Before session 35 the format's
# rule was `u / c > b` (ties toward zero above 0 only), which costs a second compare per boundary: sm_90 SASS per
# element (quantize_sass.py) 104 -> 88 at 3 bits, 63 -> 56 at 2, 206 -> 150 at 4; H200, session 34
# (quantize_dense_sweep.py, one process; the default launch, then uncapped as compiled graphs run): 0.483 -> 0.409
# ms at 3 bits (0.508 -> 0.442), 0.294 -> 0.272 at 2 (0.330 -> 0.309), 0.858 -> 0.656 at 4 (0.955 -> 0.717);
# planar / iso blocks at 3 bits 0.446 -> 0.388, 0.464 -> 0.414.
# ... with this many pipeline stages (Triton's num_stages; None: Triton's default, 3): each stage holds a [64, 64] x
# chunk and a [64, 128] part, 24 KB of shared memory.
DEFAULTS["v2_dense_stages"] = None
# Calls of at most this many tokens (a decode step's) take the "rows" kernel (quantize_rows.py) where it applies.
# H200 (session 13, benchmarks/quantize_decode.py): rows 5.6-6.4 us vs the tiled kernel's 16.5-86 us at 1-4 tokens
# (dense rotation), 5.9 / 14.4 us vs 50 / 51 us at 16 tokens and batch 1 / 8.
DEFAULTS["rows_max_tokens"] = 16


def _dense_launch(bits: int, eager: bool) -> tuple[int | None, int, bool]:
    """A dense v2 launch's register cap, warps and pipelined rotation at `bits`. Only an eager launch takes a cap
    (`wrap_triton` would hand `maxnreg` to the kernel as an argument), and a width in `v2_dense_pipeline_needs_cap`
    pipelines only under one: the settings were measured together."""
    cap = (DEFAULTS["v2_dense_maxnreg"].get(bits) or None) if eager else None  # 0: no cap
    warps = DEFAULTS["v2_num_warps"]
    warps = DEFAULTS["v2_dense_capped_warps"].get(bits, warps) if cap else warps
    needs_cap = bits in DEFAULTS["v2_dense_pipeline_needs_cap"]
    pipe = bits in DEFAULTS["v2_dense_pipeline"] and (cap is not None or not needs_cap)
    return cap, warps, pipe


def _block_t(dim: int, dense: bool, tokens: int | None = None) -> int:
    """Rows per program, shrunk to the rows there are: a decode step quantizes one token per head, and a program's
    time is a long per-thread chain, so the tile's empty rows cost as much as full ones. Measured on the H200 (session
    7 profile, BENCHMARKS.md): 0.3 ms per single-token call with the dense rotation's 64-row tile, 0.045 ms with the
    block rotations' 8 rows. Built for sm_90 (Triton 3.6), a 1-row tile has fewer instructions per program: block
    2,085 vs 7,380; dense (rotated without tl.dot, which needs 16 rows) 5,714 vs 16,480 at 16 rows and 49,321 at 64.
    Dense tiles of 2-15 rows gain nothing over 16 (16,239 at 4), so they take 16. Timed on the H200 (session 8): one
    token 8 us (block), 16 us (dense). A symbolic length (dynamic prefill) keeps the default: one specialization for
    all lengths."""
    default = DEFAULTS["block_t_dense"] if dense else DEFAULTS["block_t"]
    if not isinstance(tokens, int):
        return default
    if dense and tokens > 1:
        return min(default, max(16, triton.next_power_of_2(tokens)))
    return min(default, triton.next_power_of_2(tokens))


def kernel_layout(bits: int, widths, dim: int) -> str:
    """The `LAYOUT` constexpr: "" where the single-width code paths apply (one width in 2..4), else the layout's
    string (a single run for other uniform widths)."""
    if widths is None:
        widths = (bits,) * dim
    widths = tuple(int(w) for w in widths)
    if len(set(widths)) == 1 and widths[0] in (2, 3, 4):
        return ""
    return layout_string(widths)


def _layout_ok(widths, dim: int, levels=None) -> bool:
    """A layout the kernels can read: valid runs over `dim` coordinates (and enough levels for their codebooks)."""
    from rqcompile.quant.packing import runs
    from rqcompile.quant.quantizer import codebook_size

    if widths is None:
        return True
    widths = tuple(int(w) for w in widths)
    try:
        runs(widths)
    except ValueError:
        return False
    return len(widths) == dim and (levels is None or levels.numel() >= codebook_size(widths))


def quantize_supported(x, rotation, bits: int, group: int, widths=None, levels=None) -> bool:
    dim = x.shape[-1]
    rb = rotation.shape[-1]
    return (
        supported_dim(dim)
        and group >= 8
        and dim % group == 0
        and (group & (group - 1)) == 0
        and (rb <= 4 or (rb == group and rotation.shape[1] == dim // group))
        and _layout_ok(widths, dim, levels)
    )


def _round_tf32(r: torch.Tensor) -> torch.Tensor:
    """r rounded to tf32 (10 mantissa bits; halves away from zero), as fp32."""
    import torch

    return ((r.view(torch.int32) + 0x1000) & -0x2000).view(torch.float32)


def _split_tf32(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo), both exact in tf32, with r - hi - lo below 2^-22 |r|: the operand halves of the three tf32 dots that
    stand in for one fp32 dot (tf32x3), computed once per launch instead of in every program."""
    hi = _round_tf32(r)
    return hi, _round_tf32(r - hi)


def _fold_rotation(
    rotation: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor, wrap=lambda k: k
) -> tuple[torch.Tensor, torch.Tensor]:
    """(parts bf16 [H, NB, 3, G, G], c fp32 [H, D]) for a dense rotation [H, NB, G, G] (_fold_prep_kernel): R' = R
    diag(1 / scale) per norm group, correctly rounded to fp32 and split into bf16 parts hi + mid + lo that sum to it
    exactly, and c = R' mean (summed in float64), so that y = x R'^T - c is the rotation of (x - mean) / scale with x
    itself as the dots' operand. Not the reference's rounding: u = (x - mean) / scale is not rounded first, and c
    cancels against x R'^T where the mean is large against the spread."""
    import torch

    h, nb, g, _ = rotation.shape
    parts = torch.empty((h, nb, 3, g, g), dtype=torch.bfloat16, device=rotation.device)
    c = torch.empty((h, nb * g), dtype=torch.float32, device=rotation.device)
    rows = min(16, g)
    wrap(_fold_prep_kernel)[(h * nb, g // rows)](
        rotation.contiguous(), mean.contiguous(), scale.contiguous(), parts, c, nb * g, G=g, NB=nb, ROWS=rows
    )
    return parts, c


def _fma_exact() -> bool:
    """Whether tl.fma rounds once here: on the device, and in interpreters that emulate it (Triton 3.8's computes
    x * y + z, so v2 keeps div_rn there)."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return True
    from triton._C.libtriton import interpreter

    return hasattr(interpreter, "fma_fp32")


def v2_applies(dim: int, rb: int, bits: int, group: int, layout: str = "", perm=None) -> bool:
    """Whether the "v2" quantize kernel covers this call: one width in 2..4, a block rotation (b <= 4) or a dense
    one per norm group (b = g >= 64: full mixing, hadamard), no perm, and at least one stored word per norm group
    (P = 16 codes for 2/3 bits, 8 for 4 bits); else v1 runs."""
    slots = 8 if bits == 4 else 16
    rotation_ok = rb <= 4 or (rb == group and group >= 64 and group & (group - 1) == 0)
    return layout == "" and perm is None and rotation_ok and group % slots == 0 and dim % group == 0


def launch_quantize(
    x, rotation, mean, scale, levels, bits: int, group: int, wrap=lambda k: k, perm=None, widths=None, variant=None
):
    """(codes uint8 [B, H, T, bytes], norms fp16 [B, H, T, d/group]) from x [B, H, T, d] (any strides).

    `widths` (one per stored coordinate) replaces `bits`, and `perm` [H, d] is the channel order the rotation
    reads (calibrated bit allocation). `variant`: "v1", "v2" or "rows" (None: "rows" for a call of at most
    `DEFAULTS["rows_max_tokens"]` tokens, else `DEFAULTS["quantize_variant_dense"]` for a dense rotation and
    `DEFAULTS["quantize_variant"]` for blocks); "v2" and "rows" run only where
    `v2_applies` / `rows_apply` say, other calls take v1. All write the same codes and norms (up to float ties)."""
    import torch

    batch, heads, tokens, dim = x.shape
    rb = rotation.shape[-1]
    nb = rotation.shape[1]
    dense = rb > 4
    layout = kernel_layout(bits, widths, dim)
    code_bytes = row_bytes(layout) if layout else dim * bits // 8
    codebook = codebook_levels(layout) if layout else 2**bits
    codes = torch.empty((batch, heads, tokens, code_bytes), dtype=torch.uint8, device=x.device)
    norms = torch.empty((batch, heads, tokens, dim // group), dtype=torch.float16, device=x.device)
    if batch * heads * tokens == 0:
        return codes, norms
    if variant is None:
        few = isinstance(tokens, int) and tokens <= DEFAULTS["rows_max_tokens"]
        variant = "rows" if few else DEFAULTS["quantize_variant_dense" if dense else "quantize_variant"]
    if variant not in ("v1", "v2", "rows"):
        raise ValueError(f"unknown quantize variant {variant!r}")
    if variant == "rows":
        from rqcompile.kernels.quantize_rows import launch_quantize_rows, rows_apply

        if rows_apply(dim, rb, bits, group, layout, perm):
            launch_quantize_rows(x, rotation, mean, scale, levels, bits, group, codes, norms, wrap)
            return codes, norms
    if variant == "v2" and v2_applies(dim, rb, bits, group, layout, perm):
        slots = 8 if bits == 4 else 16
        bt = max(1, DEFAULTS["v2_tile_dense" if dense else "v2_tile"] // (group // slots))
        if dense:
            bt = min(max(bt, 16), DEFAULTS["v2_dense_max_rows"])  # the rotation's tl.dot needs 16 rows
        levels = levels.contiguous()
        na = levels.numel() - codebook
        scale = scale.contiguous()
        thr = torch.empty(max(na, 1) * codebook, dtype=torch.float32, device=x.device)
        rs = torch.empty(heads * dim, dtype=torch.float32, device=x.device)
        wrap(_v2_prep_kernel)[(triton.cdiv(heads * dim, 1024),)](
            levels,
            scale,
            thr,
            rs,
            heads * dim,
            NL=codebook,
            NA=na,
            BLOCK=triton.next_power_of_2(max(na, 1) * codebook),
            BLOCK_R=1024,
        )
        rot, rlo = rotation.contiguous(), None
        fold = dense and DEFAULTS["v2_dense_fold"] and x.dtype == torch.bfloat16  # exact operands of bf16 dots
        split = dense and DEFAULTS["v2_dense_split"] and not fold
        if fold:
            rot, rlo = _fold_rotation(rot, mean.reshape(heads, dim), scale.reshape(heads, dim), wrap)
        elif split:
            rot, rlo = _split_tf32(rot)
        grid = (triton.cdiv(tokens, bt), batch * heads)
        kernel = wrap(_quantize_v2_kernel)
        cap, warps, pipe = _dense_launch(bits, eager=kernel is _quantize_v2_kernel) if dense else (None, None, False)
        warps = warps or DEFAULTS["v2_num_warps"]
        kernel[grid](
            x,
            x.stride(0),
            x.stride(1),
            x.stride(2),
            x.stride(3),
            rot,
            mean.contiguous(),
            scale,
            levels,
            thr,
            rs,
            codes,
            norms,
            heads,
            tokens,
            D=dim,
            G=group,
            NG=dim // group,
            RB=rb,
            NB=nb,
            BITS=bits,
            BLOCK_T=bt,
            NA=na,
            FMA_DIV=_fma_exact(),
            DOT_PREC="tf32" if split and not interpreting() else dot_precision(),
            KC=min(DEFAULTS["v2_dense_chunk"], group),
            rlo_ptr=rlo,
            SPLIT=split,
            FOLD=fold,
            PIPE=fold and pipe,
            num_warps=warps,
            **({"num_stages": DEFAULTS["v2_dense_stages"]} if dense and DEFAULTS["v2_dense_stages"] else {}),
            **({"maxnreg": cap} if cap else {}),  # eager: `wrap` returned the kernel itself
        )
        return codes, norms
    bt = _block_t(dim, dense, tokens)
    grid = (triton.cdiv(tokens, bt), batch * heads)
    wrap(_quantize_kernel)[grid](
        x,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        x.stride(3),
        rotation.contiguous(),
        mean.contiguous(),
        scale.contiguous(),
        levels.contiguous(),
        codes,
        norms,
        mean if perm is None else perm.contiguous(),
        heads,
        tokens,
        D=dim,
        G=group,
        NG=dim // group,
        RB=rb,
        NB=nb,
        BITS=bits,
        DENSE=dense,
        DOT_PREC=dot_precision(),
        BLOCK_T=bt,
        LUT=DEFAULTS["lut"],
        RESHAPE=DEFAULTS["reshape"] and rb in (1, 2, 4),
        NA=levels.numel() - codebook,
        PERM=perm is not None,
        LAYOUT=layout,
        num_warps=DEFAULTS["num_warps"],
    )
    return codes, norms


def launch_dequantize(
    codes,
    norms,
    rotation,
    mean,
    scale,
    levels,
    bits: int,
    head_dim: int,
    dtype,
    wrap=lambda k: k,
    perm=None,
    widths=None,
):
    """Reconstructed x [B, H, T, head_dim] in `dtype` from packed codes and norms; `perm` / `widths` as for
    `launch_quantize`."""
    import torch

    batch, heads, tokens, _ = codes.shape
    group = head_dim // norms.shape[-1]
    rb = rotation.shape[-1]
    dense = rb > 4
    out = torch.empty((batch, heads, tokens, head_dim), dtype=dtype, device=codes.device)
    if batch * heads * tokens == 0:
        return out
    bt = _block_t(head_dim, dense)
    grid = (triton.cdiv(tokens, bt), batch * heads)
    wrap(_dequantize_kernel)[grid](
        codes.contiguous(),
        norms.contiguous(),
        rotation.contiguous(),
        mean.contiguous(),
        scale.contiguous(),
        levels.contiguous(),
        out,
        mean if perm is None else perm.contiguous(),
        heads,
        tokens,
        D=head_dim,
        G=group,
        NG=head_dim // group,
        RB=rb,
        NB=rotation.shape[1],
        BITS=bits,
        DENSE=dense,
        DOT_PREC=dot_precision(),
        BLOCK_T=bt,
        PERM=perm is not None,
        LAYOUT=kernel_layout(bits, widths, head_dim),
        num_warps=4,
    )
    return out


def dequantize_supported(norms, rotation, head_dim: int, widths=None, levels=None) -> bool:
    group = head_dim // norms.shape[-1]
    rb = rotation.shape[-1]
    return (
        supported_dim(head_dim)
        and group >= 8
        and (group & (group - 1)) == 0
        and (rb <= 4 or rb == group)
        and _layout_ok(widths, head_dim, levels)
    )
