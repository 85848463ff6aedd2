"""rq::attention on CUDA: decode attention over the packed cache, computed in the rotated space (docs/FORMAT.md),
flash-decoding style. This module is the launcher; each kernel has its own module:
- `attention_split`: the split kernel (any uniform width; K tile as the mma's B operand);
- `attention_keys_m`: the default for decode shapes, keys as the M side of a Hopper wgmma;
- `attention_layout`: calibrated bit allocations (runs of widths, channel permutations);
- `attention_combine`: merges the splits and un-rotates V once per query row.
They share `tile_decode` (codes -> fp16 codebook values), `decode_grid` (a program's query rows and keys) and
`rope_term` (rq::attention's pre-RoPE key offset). A dense K rotation (kernels/dense_query.py) rotates q once before
the split kernels.

Masks: none; an optional per-batch valid length `kv_len` (keys >= kv_len[b] are never read, and the splits divide
the valid keys among themselves, so the work follows the context, not max_cache_len) and `kv_start` (keys before it
are never read); or any SDPA-style mask (bool or additive float, broadcastable to [B, Hq, Tq, Tk]) read tile by tile
with its strides.
"""

from __future__ import annotations

import math

import triton
from triton.runtime.jit import MockTensor

from rqcompile.kernels.along_keys_repack import launch_along_keys_to_tokens
from rqcompile.kernels.attention_combine import _attn_combine_kernel
from rqcompile.kernels.attention_keys_m import ABLATIONS, _attn_keys_m_kernel
from rqcompile.kernels.attention_layout import MAX_RUNS, _attn_split_layout_kernel
from rqcompile.kernels.attention_split import _attn_split_kernel
from rqcompile.kernels.common import (
    interpreting,
    is_pow2,
    layout_string,
    sm_count,
)
from rqcompile.kernels.dense_query import dense_query_applies, rotate_query
from rqcompile.kernels.splits import MAX_SPLITS, programs_per_sm, wave_splits

LOG2E = 1.4426950408889634
# launch defaults (the sweep winner on the H200 with the prmt decode, benchmarks/NOTES.md v6); num_stages: software
# pipelining of the loop
# maxnreg: register cap per thread (more programs per SM; eager launches only, see launch_attention; a compiled
# call the eager launch would cap keys-m for stays an opaque op, kernels.__init__._OPAQUE_WHEN, session 43)
# decode: how a tile of codes becomes fp16 codebook values: 0 = binary select tree ("tree"), 1 = prmt byte-table
# lookup in inline PTX ("prmt", compiled code only; the interpreter runs the tree), 2 = the prmt steps transcribed
# into Triton integer ops (any backend; to test the prmt data path in the interpreter)
# variant: the uniform-width kernel for decode shapes. "split" = _attn_split_kernel (K tile as the mma's B operand);
# "keys-m" = _attn_keys_m_kernel (keys as the M side, K decoded straight into the mma's registers), taken where it
# applies (keys_m_applies) and the split kernel elsewhere. keys-m is the default since it was timed on the H200
# (benchmarks/NOTES.md v10: at batch 8 4-9% less time, 13-15% with kv_len as apply passes it; batch 1 within 3%)
# k_prefetch: keys-m reads the K code words one tile ahead into registers (v12, session 18: -9 to -12% on the H200);
# v_prefetch: the V code words too (session 19 on the H200: +6% at batch 8 32K, +1% at 128K, -1% at batch 1: off)
# split_waves: the split kernel's key splits, about this many programs per SM; keys-m decode launches on CUDA take
# the count of splits.wave_splits instead (whole waves of resident programs; session 19: -1 to -36% at batch 8,
# -10 to -17% at batch 1), unless a caller passes split_waves or num_splits
# keys_m_maxnreg: the register cap of an eager keys-m decode launch without the rope term or a per-row mask, taken
# where its extra resident programs give wave_splits a larger split count (the cap then pays for its spills): the
# default's build goes from 203 registers (two programs per SM) to 168 and 24 B of stack (three), its loop from 968
# to 892 instructions (the uncapped allocation's register moves). H200, session 35 (attn_profile.py, V along keys,
# kv_len): iso full mixing B8 128K 566 -> 528 us, B8 32K 155 -> 147; with apply's decode mask -8% / -6%; 4 bits
# -8% / -6%; planar -7% / -4%; B1 128K 84.5 -> 81.4 us, B1 512K 287 -> 268, B2 32K 49.7 -> 49.1. At B1 32K the
# split count is the same either way and the cap cost 1.5-9% (spills only), hence the rule. With the rope term's
# cos / sin computed in the kernel (255 registers, 352 B of stack under the cap) it was 16-42% slower; read from a
# rope_table (211 registers, 8 B of stack under the cap) the cap applies as without the term (session 42: B8 128K
# 653.5 -> 549.4 us with the table and the cap). A per-row mask's build (238-255) was not tried.
DEFAULTS = {
    "block_n": 64,
    "num_warps": 4,
    "split_waves": 8,
    "num_stages": 3,
    "maxnreg": 128,
    "decode": 1,
    "variant": "keys-m",
    "k_prefetch": True,
    "v_prefetch": False,
    "keys_m_maxnreg": 168,
}
DECODES = {"tree": 0, "prmt": 1, "prmt-emulated": 2}
VARIANTS = ("split", "keys-m")
# The combine kernel reads all splits of a row (the launcher makes at most MAX_SPLITS = COMBINE_BLOCK_S) x BLOCK_D
# columns in one load, BLOCK_D = COMBINE_TILE / splits (>= 16), or COMBINE_DENSE_COLS output columns of a dense block
# (whose programs each read all the block's inputs): independent loads, not a chain of dependent round trips. 128
# columns (a whole default block per program) against 32: combine 8.8 -> 5.0 us at batch 8, 4.2 -> 3.5 at batch 1
# (Qwen3.5-27B shapes, H200, session 28)
COMBINE_BLOCK_S, COMBINE_TILE, COMBINE_DENSE_COLS = MAX_SPLITS, 4096, 128


def keys_m_applies(dim: int, k_bits: int, v_bits: int, k_groups: int, v_groups: int, rows: int, decode: int) -> bool:
    """Whether _attn_keys_m_kernel covers this call: decode shapes (<= 16 query rows per KV head), 128 coordinates
    per norm group, uniform 2-4 bit codes, the prmt decode (1, or its Triton transcription 2)."""
    return (
        rows <= 16
        and decode in (1, 2)
        and k_groups * 128 == dim
        and v_groups * 128 == dim
        and k_bits in (2, 3, 4)
        and v_bits in (2, 3, 4)
    )


def kernel_layouts(dim: int, k_bits: int, v_bits: int, k_perm=None, v_perm=None, k_widths=None, v_widths=None):
    """(KL, VL) layout strings for the layout kernel, or None where the single-width kernel applies (no perm, one
    width in 2..4 for each of K and V)."""
    if k_perm is None and v_perm is None and k_widths is None and v_widths is None and {k_bits, v_bits} <= {2, 3, 4}:
        return None  # the common case, without building per-coordinate tuples (host time of every eager call)
    kw = (k_bits,) * dim if k_widths is None else tuple(int(w) for w in k_widths)
    vw = (v_bits,) * dim if v_widths is None else tuple(int(w) for w in v_widths)
    if k_perm is None and v_perm is None and all(len(set(w)) == 1 and w[0] in (2, 3, 4) for w in (kw, vw)):
        return None
    return layout_string(kw), layout_string(vw)


def _layout_readable(widths, dim: int, levels) -> bool:
    """Runs the layout kernel reads: whole units of 16 codes (every plane on an even byte), at most MAX_RUNS."""
    from rqcompile.quant.packing import runs
    from rqcompile.quant.quantizer import codebook_size

    try:
        found = runs(widths)
    except ValueError:
        return False
    return (
        len(widths) == dim
        and len(found) <= MAX_RUNS
        and all(start % 16 == 0 and count % 16 == 0 for _, start, count in found)
        and (levels is None or levels.numel() >= codebook_size(tuple(widths)))
    )


def _rope_readable(rope_ab, q) -> bool:
    """A rope_ab the kernels take: [B, Hq, Tq, 2h] (each of B, Hq, Tq q's or 1, broadcast) with 1 <= h <= d/2
    (RoPE turns at most all of the head's pairs; any h, padded to ROPE_K)."""
    half = rope_ab.shape[-1] // 2
    return (
        rope_ab.dim() == 4
        and rope_ab.shape[-1] % 2 == 0
        and 1 <= half <= max(1, q.shape[-1] // 2)
        and all(r in (1, n) for r, n in zip(rope_ab.shape[:3], q.shape[:3]))
        and rope_ab.is_floating_point()
    )


def attention_supported(
    q,
    k_codes,
    v_codes,
    k_bits: int,
    v_bits: int,
    k_norms,
    v_norms,
    k_widths=None,
    v_widths=None,
    k_levels=None,
    v_levels=None,
    k_perm=None,
    v_perm=None,
    rope_ab=None,
) -> bool:
    dim = q.shape[-1]
    if rope_ab is not None and not _rope_readable(rope_ab, q):
        return False
    if not is_pow2(dim) or dim < 32 or dim > 512 or q.shape[1] % k_codes.shape[1]:
        return False
    for norms in (k_norms, v_norms):
        if dim % norms.shape[-1] or (dim // norms.shape[-1]) % 16:
            return False
    layouts = kernel_layouts(dim, k_bits, v_bits, k_perm, v_perm, k_widths, v_widths)
    if layouts is None:
        return True
    return all(
        _layout_readable((bits,) * dim if widths is None else tuple(int(w) for w in widths), dim, levels)
        for bits, widths, levels in ((k_bits, k_widths, k_levels), (v_bits, v_widths, v_levels))
    )


def _words(codes):
    """The packed codes as int32 words (4 consecutive bytes, little-endian), [..., d*bits/32]."""
    import torch

    codes = codes.contiguous()
    if codes.storage_offset() % 4:
        codes = codes.clone()
    return codes.view(torch.int32)


def _halfwords(codes):
    """The packed codes as int16 words (2 consecutive bytes, little-endian), [..., bytes/2]."""
    import torch

    codes = codes.contiguous()
    if codes.storage_offset() % 2:
        codes = codes.clone()
    return codes.view(torch.int16)


def rope_width(rope_ab) -> int:
    """The kernels' ROPE_K for a rope_ab [.., 2h]: h padded to a power of two >= 16 (tl.dot's smallest K); 0 without
    the term."""
    if rope_ab is None:
        return 0
    return max(16, triton.next_power_of_2(rope_ab.shape[-1] // 2))


def _rope_args(rope_ab, rope_inv_freq, q):
    """(ROPE_K, the kernels' rope arguments: rope_ab broadcast to q's rows and its strides, the frequencies, h).
    Without rope_ab, placeholders the rope-free build never reads."""
    import torch

    if rope_ab is None:
        return 0, (q, 0, 0, 0, 0, q, 0)
    half = rope_inv_freq.numel()
    if rope_ab.shape[-1] != 2 * half:
        raise ValueError(f"rope_ab has {rope_ab.shape[-1]} weights per query, expected 2 x {half} (rope_inv_freq)")
    ab = rope_ab.expand(*q.shape[:3], 2 * half)  # broadcast rows read through zero strides
    freq = rope_inv_freq.to(device=q.device, dtype=torch.float32).contiguous()
    return rope_width(rope_ab), (ab, *ab.stride(), freq, half)


def check_rope_table(rope_table, rope_k: int, slots: int, device) -> None:
    """A rope_table the launch can read: fp16 [>= slots, 2 ROPE_K] on q's device, only with rope_ab."""
    import torch

    if rope_table is None:
        return
    if rope_k == 0:
        raise ValueError("rope_table is the rope term's cos / sin: pass it only with rope_ab and rope_inv_freq")
    shape = tuple(rope_table.shape)
    if rope_table.dtype != torch.float16 or len(shape) != 2 or shape[1] != 2 * rope_k or shape[0] < slots:
        raise ValueError(
            f"rope_table must be float16 [>= {slots}, {2 * rope_k}] (rope_term.rope_table for these frequencies and "
            f"key slots), not {rope_table.dtype} {list(shape)}"
        )
    if rope_table.device != device or not rope_table.is_contiguous():
        raise ValueError(
            f"rope_table must be contiguous and on q's device {device}; got one on {rope_table.device}, "
            f"{'' if rope_table.is_contiguous() else 'not '}contiguous"
        )


def _identity(kernel):
    return kernel


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _plan(kernel):
    """launch_attention's wrap for `eager_launch_options`: decides as an eager launch would and launches nothing."""
    return _NoLaunch()


def keys_m_programs_per_sm(full_mask: bool, rope: bool) -> int:
    """The launcher's first guess of keys-m programs (4 warps each) resident on one H100/H200 SM, by registers
    (Triton 3.6, sm_90; benchmarks/sass_counts.py): 155-172 per thread without a mask or the rope term, or with a
    row-constant mask, where q is rotated in the kernel (block rotations), i.e. three programs in 64K registers at
    <= 168; a mask per query row (238-255) or the rope term with its cos / sin computed (178-255): two (`rope` means
    that build; read from a rope_table, 211 with the dense rotation). The default's dense rotation (q rotated
    before, KRB 0) builds with 203 (session 25): two. The launcher checks the guess against the build it runs
    (_keys_m_fits)."""
    return 2 if full_mask or rope else 3


_KEYS_M_FITS: dict[tuple, int] = {}


def _specialization(arg) -> object:
    """What Triton specializes a launch on for one argument: a tensor's dtype (alignment: torch's allocations are
    16-byte aligned), an int's being 1 or a multiple of 16."""
    if hasattr(arg, "data_ptr"):  # a tensor or a MockTensor
        return arg.dtype
    if isinstance(arg, int) and not isinstance(arg, bool):
        return (arg == 1, arg % 16 == 0)
    return type(arg)


def _keys_m_fits(args: tuple, meta: dict, device_index: int) -> int:
    """keys-m programs resident per SM for the build these arguments select. Asking Triton for that build (dtypes
    standing in for the tensors, so that it works on fake tensors while torch.compile traces) costs ~180 us of host
    time (measured on the H200's host), so the answer is kept per specialization."""
    key = (device_index, tuple(meta.items()), tuple(_specialization(a) for a in args))
    if key not in _KEYS_M_FITS:
        mocks = [MockTensor(a.dtype) if hasattr(a, "data_ptr") else a for a in args]
        compiled = _attn_keys_m_kernel.warmup(*mocks, grid=(1,), **meta)
        _KEYS_M_FITS[key] = programs_per_sm(compiled, meta["num_warps"], device_index)
    return _KEYS_M_FITS[key]


def launch_attention(
    q,
    k_codes,
    k_norms,
    v_codes,
    v_norms,
    k_rotation,
    k_scale,
    k_levels,
    v_rotation,
    v_mean,
    v_scale,
    v_levels,
    k_bits: int,
    v_bits: int,
    attn_mask,
    sm_scale: float,
    kv_len=None,
    k_perm=None,
    v_perm=None,
    k_widths=None,
    v_widths=None,
    rope_ab=None,
    rope_inv_freq=None,
    wrap=None,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_stages: int | None = None,
    maxnreg: int | None = None,
    num_warps: int | None = None,
    split_waves: int | None = None,
    with_lse: bool = False,
    decode: int | str | None = None,
    variant: str | None = None,
    ablate: int = 0,
    k_prefetch: bool | None = None,
    v_prefetch: bool | None = None,
    v_along_keys: bool = False,
    kv_start: int = 0,
    rope_table=None,
):
    """rq::attention on the packed cache with Triton (see module docstring). kv_len: optional int [B]; kv_start: keys
    before it are masked (a constant of the build: 0 compiles to the kernels without the bound).
    `with_lse`: rq::attention_lse, returning (out, lse float32 [B, Hq, Tq]) (the combine step also writes the lse).
    k_perm/v_perm ([H, d] int64) and k_widths/v_widths (per-coordinate widths, replacing the bits): a calibrated
    bit allocation's layout, run by the layout kernel. `decode`: the uniform kernel's code decode (DEFAULTS, DECODES:
    0/"tree", 1/"prmt", 2/"prmt-emulated"); the interpreter cannot run inline asm and takes the tree for "prmt".
    `variant` (DEFAULTS, VARIANTS): "keys-m" runs _attn_keys_m_kernel where keys_m_applies (the interpreter
    runs it with the prmt steps in Triton ops), the split kernel elsewhere. `rope_ab` [B or 1, Hq or 1, Tq or 1, 2h]
    with `rope_inv_freq` [h]: the rope score term, taken by every kernel (split, keys-m and layout alike), so it
    changes no kernel choice. `ablate` (ABLATIONS, keys-m only): timing experiments whose outputs are wrong by
    design; never set it to compute attention. `k_prefetch` / `v_prefetch` (DEFAULTS): keys-m reads the K / V code
    words one tile ahead into registers instead of through the pipeliner's shared-memory copies. `num_splits`: key
    splits per row (at most MAX_SPLITS); by default keys-m on CUDA takes splits.wave_splits' count, everything else
    about `split_waves` programs per SM. `v_along_keys`: v_codes are packed along keys (packing.pack_along_keys,
    `RQConfig.value_layout="keys"`), read in place by keys-m; the other kernels get a copy re-packed per token.
    `rope_table` (rope_term.rope_table(rope_inv_freq, slots >= Tk)): the rope term's cos / sin per key slot, which
    keys-m then reads instead of computing (the other kernels compute them from rope_inv_freq as before)."""
    import torch

    from rqcompile.ops import check_kv_len, check_kv_start

    check_kv_start(kv_start)
    wrap = _identity if wrap is None else wrap
    block_n = DEFAULTS["block_n"] if block_n is None else block_n
    num_stages = DEFAULTS["num_stages"] if num_stages is None else num_stages
    maxnreg_given = maxnreg is not None
    maxnreg = DEFAULTS["maxnreg"] if maxnreg is None else maxnreg
    num_warps = DEFAULTS["num_warps"] if num_warps is None else num_warps
    split_waves_given = split_waves is not None
    split_waves = DEFAULTS["split_waves"] if split_waves is None else split_waves
    decode = DEFAULTS["decode"] if decode is None else decode
    decode = DECODES[decode] if isinstance(decode, str) else int(decode)
    if decode not in DECODES.values():
        raise ValueError(f"decode must be one of {DECODES}, not {decode}")
    variant = DEFAULTS["variant"] if variant is None else variant
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, not {variant!r}")
    batch, q_heads, q_len, dim = q.shape
    check_kv_len(kv_len, batch)
    heads = k_codes.shape[1]
    tk = k_codes.shape[2]
    rep = q_heads // heads
    rows = rep * q_len
    block_m = 16 if rows <= 16 else (32 if rows <= 32 else 64)

    # The register cap is a plain Triton launch option; torch's wrap_triton (torch.compile / AOTInductor) is given
    # only the options it knows. It is tuned for decode tiles: at BLOCK_M 64 (prefill) ptxas cannot fit the kernel
    # in 168 registers and refuses it (C7600, seen on the H200), so larger tiles launch uncapped.
    # The layout kernel launches uncapped: its register needs (one accumulator per run) are not measured yet.
    layouts = kernel_layouts(dim, k_bits, v_bits, k_perm, v_perm, k_widths, v_widths)
    keys_m = (
        variant == "keys-m"
        and layouts is None
        and keys_m_applies(dim, k_bits, v_bits, k_norms.shape[-1], v_norms.shape[-1], rows, decode)
    )
    if ablate & ~sum(ABLATIONS.values()):
        raise ValueError(f"ablate: {ablate} is not a sum of ABLATIONS {ABLATIONS}")
    if ablate and (not keys_m or interpreting()):
        raise ValueError("ablate: timing ablations run only in the compiled keys-m kernel")
    if v_along_keys and not (keys_m and v_bits in (2, 3) and tk % 16 == 0 and not v_prefetch):
        # the split and layout kernels read V per token: re-pack a copy (prefill-sized calls; one pass over V's codes)
        v_codes = launch_along_keys_to_tokens(v_codes, v_bits, dim, wrap=None if wrap is _identity else wrap)
        v_along_keys = False
    if keys_m:
        block_n, num_warps = 64, 4  # the kernel's fragment layout is built for these
    if interpreting():  # no inline asm: the split kernel takes the tree, keys-m the prmt steps in Triton ops
        decode = 2 if keys_m else (0 if decode == 1 else decode)
    # keys-m: 160 registers uncapped (3 programs per SM either way down to 144); capped only when asked
    eager = (wrap is _identity or wrap is _plan) and not interpreting()  # launches that keep Triton's options
    capped = maxnreg and block_m == 16 and eager and layouts is None
    capped = capped and (maxnreg_given or not keys_m)
    launch_opts = {"maxnreg": maxnreg} if capped else {}
    m_tiles = triton.cdiv(rows, block_m)
    qk_scale = float(sm_scale) * LOG2E
    device = q.device

    krb = k_rotation.shape[-1]
    q_in = q
    for rotation in (k_rotation, v_rotation):
        if rotation.shape[-1] > 4 and not dense_query_applies(rotation, dim):
            raise ValueError(
                f"dense rotation blocks {tuple(rotation.shape)}: the kernels take powers of two >= 16 "
                f"tiling head_dim {dim} (norm groups of a supported call always are)"
            )
    if krb > 4:  # dense K rotation: q rotated once, by its own kernel, before the attention kernels
        q_in = rotate_query(q, k_rotation, k_scale, k_perm, heads, wrap)
        krb = 0

    if attn_mask is None:
        mask_kind, mask, mstrides = 0, q, (0, 0, 0, 0)
    else:
        mask = attn_mask
        if mask.dtype == torch.bool:
            # a uint8 copy of the (unexpanded) mask, not a dtype view: Inductor cannot lower view(bool -> uint8)
            mask_kind, mask = 1, mask.to(torch.uint8)
        else:
            mask_kind = 2
        mask = mask.expand(batch, q_heads, q_len, tk)
        # a dimension of size 1 is read at index 0 only: stride 0, so that a decode step's mask ([B or 1, 1, 1, T]:
        # expand keeps the query dim's stride T) takes the one-row path (session 21: apply's decode steps ran the
        # per-query-row mask build, 255 registers and 1,081 loop instructions against 174 and 894)
        mstrides = tuple(0 if size == 1 else stride for size, stride in zip(mask.shape, mask.stride()))
    # the kernels read kv_len[b] at offset b: a [1] (one length for every row) or one expanded to [B]
    # (fuse_attention's valid_kv_length of a mask with batch dim 1) must become B real values, else rows b >= 1
    # read past its one element; int32 and int64 are read as they are (a conversion was a ~1 us launch per call)
    kvl = q
    if kv_len is not None:
        kvl = kv_len if kv_len.dtype in (torch.int32, torch.int64) else kv_len.to(torch.int32)
        kvl = kvl.expand(batch).contiguous()
    lse = torch.empty((batch, q_heads, q_len), dtype=torch.float32, device=device) if with_lse else None
    if batch * q_heads * q_len == 0:
        if wrap is _plan:
            return "none", {}
        empty = torch.empty(q.shape, dtype=q.dtype, device=device)
        return (empty, lse) if with_lse else empty
    mask_row = mask_kind != 0 and mstrides[1] == 0 and mstrides[2] == 0
    q_args = (q_in, q_in.stride(0), q_in.stride(1), q_in.stride(2), q_in.stride(3))
    rope_k, rope_args = _rope_args(rope_ab, rope_inv_freq, q)
    check_rope_table(rope_table, rope_k, tk, device)
    meta = {
        "D": dim,
        "NGK": k_norms.shape[-1],
        "NGV": v_norms.shape[-1],
        "KRB": krb,
        "KNB": k_rotation.shape[1],
        "MASK_KIND": mask_kind,
        "MASK_ROW": mask_row,
        "HAS_KVLEN": kv_len is not None,
        "KV_START": kv_start,
        "ROPE_K": rope_k,
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "num_warps": num_warps,
        "num_stages": num_stages,
    }
    uniform_args = ()
    if layouts is None:  # the split and keys-m kernels read the codes as int32 words
        uniform_args = (
            *q_args,
            _words(k_codes),
            k_norms.contiguous(),
            _words(v_codes),
            v_norms.contiguous(),
            k_rotation.contiguous(),
            k_scale.contiguous(),
            k_levels.contiguous(),
            v_levels.contiguous(),
        )
    keys_m_meta = {
        "KBITS": k_bits,
        "VBITS": v_bits,
        "DECODE": decode,
        "ABLATE": int(ablate),
        "KPREFETCH": bool(DEFAULTS["k_prefetch"] if k_prefetch is None else k_prefetch),
        "VPREFETCH": bool(DEFAULTS["v_prefetch"] if v_prefetch is None else v_prefetch) and not v_along_keys,
        "VKEYS": bool(v_along_keys),
        "ROPE_TABLE": rope_table is not None,
        **meta,
        **launch_opts,  # a register cap, where asked for (before session 19 keys-m launches dropped it)
    }

    def tail(pm, pl, pacc, splits: int, span: int) -> tuple:
        return (mask, *mstrides, kvl, pm, pl, pacc, heads, rep, q_len, tk, rows, splits, span, qk_scale, *rope_args)

    rtab = q if rope_table is None else rope_table  # keys-m's last argument (a placeholder the build never reads)

    total_blocks = max(1, triton.cdiv(tk, block_n))

    def split_plan(splits: int) -> tuple[int, int]:
        """(splits, keys per split): equal spans of whole tiles."""
        span = triton.cdiv(total_blocks, max(1, min(int(splits), total_blocks, MAX_SPLITS))) * block_n
        return max(1, triton.cdiv(tk, span)), span

    work_rows = batch * heads * m_tiles
    static_shape = all(type(n) is int for n in (batch, heads, tk))  # not torch.SymInt (dynamic shapes)
    if num_splits is None and keys_m and not split_waves_given and device.type == "cuda" and static_shape:
        sms = sm_count(device.index or 0)
        guess = keys_m_programs_per_sm(mask_kind != 0 and not mask_row, rope_ab is not None and rope_table is None)
        num_splits = wave_splits(total_blocks, work_rows, sms, guess)
        # the build this launch will run (Triton's cache entry for these arguments) says how many programs really fit
        f32 = MockTensor(torch.float32)  # the partial results, not allocated yet
        args = (*uniform_args, *tail(f32, f32, f32, *split_plan(num_splits)), rtab)
        fits = _keys_m_fits(args, keys_m_meta, device.index or 0)
        if fits != guess:
            num_splits = wave_splits(total_blocks, work_rows, sms, fits)
        # the register cap where three programs would fit but the build allows two (not with the computed rope term
        # or a per-row mask, not when the caller chose a cap: maxnreg=0 asks for none)
        cap = DEFAULTS["keys_m_maxnreg"]
        if cap and eager and not maxnreg_given and guess == 3 and fits < 3:
            capped_meta = {**keys_m_meta, "maxnreg": cap}  # eager (and planned) only: wrap_triton drops the option
            capped_fits = _keys_m_fits(args, capped_meta, device.index or 0)
            capped_splits = wave_splits(total_blocks, work_rows, sms, capped_fits)
            if capped_splits > num_splits:
                keys_m_meta, num_splits = capped_meta, capped_splits
    elif num_splits is None:
        target = split_waves * sm_count(device.index or 0) if device.type == "cuda" else 4
        num_splits = triton.cdiv(target, work_rows)
    num_splits, span = split_plan(num_splits)
    if wrap is _plan:
        options = keys_m_meta if keys_m else {**meta, **launch_opts}
        kernel = "keys-m" if keys_m else ("split" if layouts is None else "layout")
        return kernel, {k: options[k] for k in ("num_warps", "num_stages", "maxnreg") if k in options}

    pm = torch.empty((batch * heads, num_splits, rows), dtype=torch.float32, device=device)
    pl = torch.empty((batch * heads, num_splits, rows), dtype=torch.float32, device=device)
    pacc = torch.empty((batch * heads, num_splits, rows, dim), dtype=torch.float32, device=device)
    grid = (num_splits, batch * heads, m_tiles)
    tail_args = tail(pm, pl, pacc, num_splits, span)
    if keys_m:
        wrap(_attn_keys_m_kernel)[grid](*uniform_args, *tail_args, rtab, **keys_m_meta)
    elif layouts is None:
        wrap(_attn_split_kernel)[grid](
            *uniform_args,
            *tail_args,
            KBITS=k_bits,
            VBITS=v_bits,
            DECODE=decode,
            OPAQUE=wrap is _identity,  # compiled launches: see _opaque
            **meta,
            **launch_opts,
        )
    else:
        wrap(_attn_split_layout_kernel)[grid](
            *q_args,
            _halfwords(k_codes),
            k_norms.contiguous(),
            _halfwords(v_codes),
            v_norms.contiguous(),
            k_rotation.contiguous(),
            k_scale.contiguous(),
            k_levels.contiguous(),
            v_levels.contiguous(),
            k_scale if k_perm is None else k_perm.contiguous(),
            *tail_args,
            KL=layouts[0],
            VL=layouts[1],
            KPERM=k_perm is not None and krb != 0,  # a host-rotated q (dense K) is already in perm order
            **meta,
        )
    vrb = v_rotation.shape[-1]
    dense_v = vrb > 4  # the combine step un-rotates whole dense blocks
    out = torch.empty((batch, q_heads, q_len, dim), dtype=q.dtype, device=device)
    block_s = max(2, triton.next_power_of_2(num_splits)) if type(num_splits) is int else COMBINE_BLOCK_S
    if block_s > COMBINE_BLOCK_S:
        raise RuntimeError(f"{num_splits} splits: the combine step reads at most {COMBINE_BLOCK_S}")
    block_d = min(COMBINE_DENSE_COLS, vrb) if dense_v else min(dim, max(16, COMBINE_TILE // block_s))
    # <= 64 floats of the partial accumulators per thread: a dense block's programs each load [block_s, vrb]
    combine_warps = min(16, max(4, block_s * (vrb if dense_v else block_d) // (64 * 32)))
    wrap(_attn_combine_kernel)[(rows, batch * heads, dim // block_d)](
        pm,
        pl,
        pacc,
        v_rotation.contiguous(),
        v_scale.contiguous(),
        v_mean.contiguous(),
        v_mean if v_perm is None else v_perm.contiguous(),
        out,
        pm if lse is None else lse,  # unused without WRITE_LSE
        heads,
        rep,
        q_len,
        rows,
        num_splits,
        D=dim,
        VRB=vrb,
        VNB=v_rotation.shape[1],
        VPERM=v_perm is not None,
        BLOCK_S=block_s,
        BLOCK_D=block_d,
        WRITE_LSE=with_lse,
        VDENSE=dense_v,
        num_warps=combine_warps,
    )
    return (out, lse) if with_lse else out


def eager_launch_options(*args, **kwargs) -> tuple[str, dict]:
    """(kernel, Triton launch options) of an eager `launch_attention(*args, **kwargs)`: "keys-m", "split" or
    "layout" ("none" for an empty call), with num_warps, num_stages and, where the launcher caps registers, maxnreg.
    torch 2.11's Inductor drops `maxnreg` from user kernels (sessions 33, 35), so the compiled path asks this to keep
    a capped keys-m call an opaque op, launched by this launcher as in eager mode. Works on fake tensors (nothing is
    launched; what it allocates is dead code in a trace)."""
    if "wrap" in kwargs:
        raise TypeError("eager_launch_options plans the eager launch: it takes no wrap")
    return launch_attention(*args, wrap=_plan, **kwargs)


def default_sm_scale(dim: int) -> float:
    return 1.0 / math.sqrt(dim)
