"""Triton kernels behind the rq ops on CUDA.

`register()` (called by `rqcompile.ops` on import when Triton is importable) hooks them in two ways, so every path
uses them on CUDA while the op definitions, schemas and the CPU reference stay exactly as in `rqcompile.ops`:

- eager: a CUDA kernel for each op (`torch.library.register_kernel(..., "cuda", ...)`) launching the Triton
  kernels directly;
- torch.compile / AOTInductor: a FunctionalTensorMode rule (what `torch.library.triton_op` installs) that, for CUDA
  inputs, decomposes the op into its `wrap_triton` kernel launches during AOT tracing, so Inductor compiles the
  Triton kernels into the graph (and AOTInductor into the package). torch.export keeps the rq ops as they are
  (the decomposition is disabled while exporting, exactly as for `triton_op`), so FX passes and ONNX see them.

A calibrated bit allocation's layout (`perm`, `widths`) runs in the same kernels, specialized on it. Unsupported
shapes (head_dim not a power of two for attention, norm groups not a power of two, more than
`attention.MAX_RUNS` runs of equal widths for attention, ...) fall back to the reference implementation, on the
GPU.
"""

from __future__ import annotations

import functools

import torch

from rqcompile.quant import quantizer

_REGISTERED = False


def _plain(kernel):
    return kernel


def _quantize_ok(x, rotation, mean, scale, levels, bits, group, perm=None, widths=None):
    from rqcompile.kernels.quantize import quantize_supported

    return quantize_supported(x, rotation, bits, group, widths, levels)


def _quantize_launch(x, rotation, mean, scale, levels, bits, group, perm=None, widths=None, wrap=_plain):
    from rqcompile.kernels.quantize import launch_quantize

    return launch_quantize(x, rotation, mean, scale, levels, bits, group, wrap=wrap, perm=perm, widths=widths)


def _quantize_reference(x, rotation, mean, scale, levels, bits, group, perm=None, widths=None):
    layout = bits if widths is None else tuple(widths)
    return quantizer.quantize(x, rotation, mean, scale, levels, layout, group, perm)


def _dequantize_ok(
    codes, norms, rotation, mean, scale, levels, bits, head_dim, dtype, perm=None, widths=None, along_keys=False
):
    from rqcompile.kernels.quantize import dequantize_supported

    return dequantize_supported(norms, rotation, head_dim, widths, levels)


def _dequantize_launch(
    codes,
    norms,
    rotation,
    mean,
    scale,
    levels,
    bits,
    head_dim,
    dtype,
    perm=None,
    widths=None,
    along_keys=False,
    wrap=_plain,
):
    from rqcompile.kernels.along_keys_repack import launch_along_keys_to_tokens
    from rqcompile.kernels.quantize import launch_dequantize

    if along_keys:  # the kernel reads codes packed per token: re-pack a copy (one pass over the codes)
        codes = launch_along_keys_to_tokens(codes, bits, head_dim, wrap=None if wrap is _plain else wrap)
    return launch_dequantize(
        codes, norms, rotation, mean, scale, levels, bits, head_dim, dtype, wrap=wrap, perm=perm, widths=widths
    )


def _dequantize_reference(*args, **kwargs):
    from rqcompile.ops import reference_dequantize

    return reference_dequantize(*args, **kwargs)


# rq::attention's arguments in schema order; the trailing optional ones may come positionally or by name
_ATTENTION_ARGS = (
    "q",
    "k_codes",
    "k_norms",
    "v_codes",
    "v_norms",
    "k_rotation",
    "k_scale",
    "k_levels",
    "v_rotation",
    "v_mean",
    "v_scale",
    "v_levels",
    "k_bits",
    "v_bits",
    "attn_mask",
    "sm_scale",
    "kv_len",
    "k_perm",
    "v_perm",
    "k_widths",
    "v_widths",
    "rope_ab",
    "rope_inv_freq",
    "v_along_keys",
    "kv_start",
    "rope_table",
)
_POSITIONAL = _ATTENTION_ARGS.index("v_along_keys")  # launch_attention's positional arguments; the rest by name


def _attention_args(args, kwargs) -> dict:
    """All of rq::attention's arguments by name (the optional ones default to None)."""
    named = dict(zip(_ATTENTION_ARGS, args))
    named.update(kwargs)
    for name in _ATTENTION_ARGS[16:]:
        named.setdefault(name, None)
    named["v_along_keys"] = bool(named["v_along_keys"])
    named["kv_start"] = int(named["kv_start"] or 0)
    return named


def _attention_ok(*args, **kwargs):
    from rqcompile.kernels.attention import attention_supported

    a = _attention_args(args, kwargs)
    return attention_supported(
        a["q"],
        a["k_codes"],
        a["v_codes"],
        a["k_bits"],
        a["v_bits"],
        a["k_norms"],
        a["v_norms"],
        k_widths=a["k_widths"],
        v_widths=a["v_widths"],
        k_levels=a["k_levels"],
        v_levels=a["v_levels"],
        k_perm=a["k_perm"],
        v_perm=a["v_perm"],
        rope_ab=a["rope_ab"],
    )


def _launcher_args(args, kwargs) -> tuple[list, dict]:
    """launch_attention's positional arguments and keywords from rq::attention's arguments."""
    a = _attention_args(args, kwargs)
    options = {"v_along_keys": a["v_along_keys"], "kv_start": a["kv_start"], "rope_table": a["rope_table"]}
    return [a[name] for name in _ATTENTION_ARGS[:_POSITIONAL]], options


def _attention_launch(*args, wrap=_plain, **kwargs):
    from rqcompile.kernels.attention import launch_attention

    ordered, options = _launcher_args(args, kwargs)
    wrap = None if wrap is _plain else wrap  # None: eager (may use maxnreg)
    return launch_attention(*ordered, wrap=wrap, **options)


def _attention_keys_m_capped(*args, **kwargs) -> bool:
    """Whether the eager launch of these rq::attention(_lse) arguments runs keys-m under its register cap (kept
    opaque when compiled: see `_OPAQUE_WHEN`)."""
    from rqcompile.kernels.attention import eager_launch_options

    ordered, options = _launcher_args(args, kwargs)
    kernel, launch_options = eager_launch_options(*ordered, **options)
    return kernel == "keys-m" and "maxnreg" in launch_options


def _attention_reference(*args, **kwargs):
    from rqcompile.ops import reference_attention

    return reference_attention(*args, **kwargs)


def _attention_lse_launch(*args, wrap=_plain, **kwargs):
    from rqcompile.kernels.attention import launch_attention

    ordered, options = _launcher_args(args, kwargs)
    wrap = None if wrap is _plain else wrap
    return launch_attention(*ordered, wrap=wrap, with_lse=True, **options)


def _attention_lse_reference(*args, **kwargs):
    from rqcompile.ops import reference_attention_lse

    return reference_attention_lse(*args, **kwargs)


def _write_ok(buffer, codes, cache_position, bits):
    return True  # the launcher checks what the reference checks


def _write_launch(buffer, codes, cache_position, bits, wrap=_plain):
    from rqcompile.kernels.write_along_keys import launch_write_along_keys

    launch_write_along_keys(buffer, codes, cache_position, bits, buffer.shape[-1] * 8 // bits, wrap=wrap)


def _write_reference(buffer, codes, cache_position, bits):
    from rqcompile.quant.packing import write_along_keys_

    write_along_keys_(buffer, codes, cache_position, bits, buffer.shape[-1] * 8 // bits)


# name -> (supported?, Triton launch, reference fallback)
_IMPLS = {
    "rq::write_along_keys": (_write_ok, _write_launch, _write_reference),
    "rq::quantize": (_quantize_ok, _quantize_launch, _quantize_reference),
    "rq::dequantize": (_dequantize_ok, _dequantize_launch, _dequantize_reference),
    "rq::attention": (_attention_ok, _attention_launch, _attention_reference),
    "rq::attention_lse": (_attention_ok, _attention_lse_launch, _attention_lse_reference),  # same args
}


# name -> whether a call stays opaque under torch.compile (Inductor calls the op, i.e. the eager launcher): keys-m's
# eager register cap, which torch 2.11's Inductor would drop from a decomposed launch. The launcher takes it only
# where it buys splits (batch 8 at 32K keys: 600 -> 549 us per call at 128K, session 42), calls long enough to hide
# the eager launcher's host time; the split kernel's decode cap (every small call) stays decomposed.
_OPAQUE_WHEN = {"rq::attention": _attention_keys_m_capped, "rq::attention_lse": _attention_keys_m_capped}


def _first_tensor(args):
    return next(a for a in args if isinstance(a, torch.Tensor))


def _aot_compiling() -> bool:
    """Inside AOTInductor's compile: every kernel must be in the package (no call back into this launcher)."""
    from torch._inductor.virtualized import V

    return bool(V.aot_compilation)


def _functional_rule(ok, launch, opaque=None):
    """Like `torch.library.triton_op`'s rule: decompose into wrap_triton launches under AOT tracing (CUDA only).
    `opaque(*args, **kwargs)`: keep such a call the op (Inductor calls it, i.e. the eager launcher) under
    torch.compile, not AOTInductor."""

    def rule(mode, op, types, args, kwargs):
        from torch.export._trace import custom_triton_ops_decomposition_disabled

        kwargs = kwargs or {}
        if custom_triton_ops_decomposition_disabled() or not _first_tensor(args).is_cuda or not ok(*args, **kwargs):
            return mode.__torch_dispatch__(op, types, args, kwargs)
        import torch._subclasses
        from torch._subclasses.functional_tensor import FunctionalTensor

        known = (torch.Tensor, FunctionalTensor)
        if any(not issubclass(t, torch._subclasses.FakeTensor) and t not in known for t in types):
            return NotImplemented
        if opaque is not None and not _aot_compiling():
            with mode:  # the plan's allocations are traced as dead code
                keep = opaque(*args, **kwargs)
            if keep:
                return mode.__torch_dispatch__(op, types, args, kwargs)
        with mode:
            return launch(*args, **kwargs, wrap=torch.library.wrap_triton)

    return rule


def _eager(ok, launch, reference):
    @functools.wraps(launch)
    def run(*args, **kwargs):
        if not ok(*args, **kwargs):
            return reference(*args, **kwargs)
        return launch(*args, **kwargs)

    return run


def register() -> bool:
    """Register the Triton implementations for CUDA (idempotent). Returns False when Triton is unavailable."""
    global _REGISTERED
    if _REGISTERED:
        return True
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    for name, (ok, launch, reference) in _IMPLS.items():
        torch.library.register_kernel(name, "cuda", _eager(ok, launch, reference))
        rule = _functional_rule(ok, launch, _OPAQUE_WHEN.get(name))
        torch.library.register_torch_dispatch(name, FunctionalTensorMode, rule)
    _REGISTERED = True
    return True


__all__ = ["register"]
