"""Test-session set-up that must happen before anything imports triton or rqcompile.

Without CUDA, the Triton kernels are checked by Triton's interpreter; `@triton.jit` picks interpreter mode when a
kernel module is imported, so the variable must be set before the first import of rqcompile.kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
