"""Shared helpers of the Triton kernels."""

from __future__ import annotations

import functools
import os


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
