"""Triton kernels behind the rq ops on CUDA.

`register()` (called by `rqcompile.ops` on import when Triton is importable) hooks them in two ways, so every path
uses them on CUDA while the op definitions, schemas and the CPU reference stay exactly as in `rqcompile.ops`:

- eager: a CUDA kernel for each op (`torch.library.register_kernel(..., "cuda", ...)`) launching the Triton
  kernels directly;
- torch.compile / AOTInductor: a FunctionalTensorMode rule (what `torch.library.triton_op` installs) that, for CUDA
  inputs, decomposes the op into its `wrap_triton` kernel launches during AOT tracing, so Inductor compiles the
  Triton kernels into the graph (and AOTInductor into the package). torch.export keeps the rq ops as they are
  (the decomposition is disabled while exporting, exactly as for `triton_op`), so FX passes and ONNX see them.

Unsupported shapes (head_dim not a power of two for attention, norm groups not a power of two, ...) fall back to
the reference implementation, on the GPU.
"""

from __future__ import annotations

import functools

import torch

from rqcompile.quant import quantizer

_REGISTERED = False


def _plain(kernel):
    return kernel


def _quantize_ok(x, rotation, mean, scale, levels, bits, group):
    from rqcompile.kernels.quantize import quantize_supported

    return quantize_supported(x, rotation, bits, group)


def _quantize_launch(x, rotation, mean, scale, levels, bits, group, wrap=_plain):
    from rqcompile.kernels.quantize import launch_quantize

    return launch_quantize(x, rotation, mean, scale, levels, bits, group, wrap=wrap)


def _dequantize_ok(codes, norms, rotation, mean, scale, levels, bits, head_dim, dtype):
    from rqcompile.kernels.quantize import dequantize_supported

    return dequantize_supported(norms, rotation, head_dim)


def _dequantize_launch(codes, norms, rotation, mean, scale, levels, bits, head_dim, dtype, wrap=_plain):
    from rqcompile.kernels.quantize import launch_dequantize

    return launch_dequantize(codes, norms, rotation, mean, scale, levels, bits, head_dim, dtype, wrap=wrap)


def _attention_ok(q, k_codes, k_norms, v_codes, v_norms, *rest):
    from rqcompile.kernels.attention import attention_supported

    k_bits, v_bits = rest[7], rest[8]
    return attention_supported(q, k_codes, v_codes, k_bits, v_bits, k_norms, v_norms)


def _attention_launch(*args, wrap=_plain):
    from rqcompile.kernels.attention import launch_attention

    return launch_attention(*args, wrap=None if wrap is _plain else wrap)  # None: eager (may use maxnreg)


def _attention_reference(
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
    k_bits,
    v_bits,
    attn_mask,
    sm_scale,
    kv_len=None,
):
    from rqcompile.ops import mask_with_kv_len

    attn_mask = mask_with_kv_len(attn_mask, kv_len, k_codes.shape[2])
    group_k = q.shape[-1] // k_norms.shape[-1]
    group_v = q.shape[-1] // v_norms.shape[-1]
    k = quantizer.QuantState(k_rotation, torch.zeros_like(k_scale), k_scale, k_levels, k_bits, group_k)
    v = quantizer.QuantState(v_rotation, v_mean, v_scale, v_levels, v_bits, group_v)
    return quantizer.rotated_attention(q, k_codes, k_norms, v_codes, v_norms, k, v, attn_mask, sm_scale)


# name -> (supported?, Triton launch, reference fallback)
_IMPLS = {
    "rq::quantize": (_quantize_ok, _quantize_launch, quantizer.quantize),
    "rq::dequantize": (_dequantize_ok, _dequantize_launch, quantizer.dequantize),
    "rq::attention": (_attention_ok, _attention_launch, _attention_reference),
}


def _first_tensor(args):
    return next(a for a in args if isinstance(a, torch.Tensor))


def _functional_rule(ok, launch):
    """Like `torch.library.triton_op`'s rule: decompose into wrap_triton launches under AOT tracing (CUDA only)."""

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
        torch.library.register_torch_dispatch(name, FunctionalTensorMode, _functional_rule(ok, launch))
    _REGISTERED = True
    return True


__all__ = ["register"]
