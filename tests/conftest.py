"""Test-session set-up that must happen before anything imports triton or rqcompile.

Without CUDA, the Triton kernels are checked by Triton's interpreter; `@triton.jit` picks interpreter mode when a
kernel module is imported, so the variable must be set before the first import of rqcompile.kernels.
"""

import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest-xdist workers share the machine's cores: one worker per core's share, not every worker on every core
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny matmuls
    and token-by-token decoding are latency-bound, and on a shared 2-core machine a second thread oversubscribes
    (measured 5x to 100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _inputs_seeded_per_test(request):
    """Each test draws its random inputs from a generator seeded by its own id: the same draw in any order, in any
    worker and on a rerun, so a failure reproduces (unseeded, a test saw whatever the tests before it had left)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _gpu_memory_returned_after_each_test(request):
    """GPU tests run as several pytest processes on one GPU (scripts/gpu_test_shards.py): memory a test's large
    inputs leave in a process's caching allocator is handed back, so that the processes beside it do not run out
    (six shards lost 22 tests to CUDA out-of-memory in session 43 with the cache kept)."""
    yield
    if request.node.get_closest_marker("gpu") is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
