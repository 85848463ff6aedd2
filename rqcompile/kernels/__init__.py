"""Triton kernels behind the rq ops on CUDA."""
