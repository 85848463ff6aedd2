"""How many key splits a keys-m decode launch takes: the count whose programs fill the GPU's resident slots in
whole waves, by a small model of how the H200 ran the kernel (benchmarks/NOTES.md, session 19).

A decode launch has `pairs` (batch x KV head x query tile) rows of work, each cut into `splits` programs of equal key
spans. Every program costs its span of 64-key tiles plus a fixed part (prologue, pipeline fill, partial-output
store). Programs run in waves of `sms x slots_per_sm`; a last, partial wave leaves SMs with fewer programs, and an SM
with fewer resident programs gets through fewer tiles per unit time (it hides less latency). This is FlashAttention-2's
"wave efficiency" split heuristic with the partial wave's slower rate measured rather than ignored.

Fitted to one sweep of explicit split counts on the H200 (keys-m, iso 3-bit, batch 1 and 8, 32K-512K keys); its
ranking of those counts matched the measured one at every shape but 512K's one-wave count (3% slower than the model
says).
"""

from __future__ import annotations

import functools

# tiles per unit time of one SM running n keys-m programs at once, relative to three (the kernel's usual occupancy)
SM_RATE = {1: 0.6, 2: 0.9}
PROGRAM_TILES = 2.0  # a program's fixed cost, in 64-key tiles
MAX_SPLITS = 128  # the combine kernel reads at most this many splits per row in one load


def _rate(resident: int) -> float:
    return SM_RATE.get(resident, 1.0)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def wave_time(programs: int, tiles: int, sms: int, slots_per_sm: int) -> float:
    """Modelled time of `programs` equal programs of `tiles` tiles each, in tiles of one SM at full rate."""
    full, last = divmod(programs, sms * slots_per_sm)
    work = tiles + PROGRAM_TILES
    time = full * work * slots_per_sm / _rate(slots_per_sm)
    if last:
        resident = _cdiv(last, sms)  # the block scheduler spreads a partial wave over the SMs
        time += work * resident / _rate(resident)
    return time


@functools.cache
def wave_splits(total_blocks: int, pairs: int, sms: int, slots_per_sm: int) -> int:
    """The split count of least modelled time (the fewest splits among equals: less for the combine step to read).
    Counts are the ones a launch can make: equal spans of whole tiles, `cdiv(total_blocks, span)` of them."""
    if min(total_blocks, pairs, sms, slots_per_sm) < 1:
        raise ValueError(f"wave_splits: every count must be positive, got {(total_blocks, pairs, sms, slots_per_sm)}")
    best_time, best = None, 1
    for wanted in range(1, min(MAX_SPLITS, total_blocks) + 1):
        span = _cdiv(total_blocks, wanted)
        splits = _cdiv(total_blocks, span)
        time = wave_time(pairs * splits, span, sms, slots_per_sm)
        if best_time is None or time < best_time * (1 - 1e-9):
            best_time, best = time, splits
    return best


def programs_per_sm(compiled, num_warps: int, device_index: int) -> int:
    """Programs of a compiled Triton kernel resident on one SM of this GPU at once: the tightest of its registers
    (allocated per warp in units of 256), shared memory (plus the 1 KB each program reserves) and threads."""
    compiled._init_handles()  # loads the module: n_regs is known from then on
    return _occupancy(compiled.n_regs, compiled.metadata.shared, num_warps, device_index)


@functools.cache
def _occupancy(regs: int, shared: int, num_warps: int, device_index: int) -> int:
    import torch

    props = torch.cuda.get_device_properties(device_index)
    regs_per_warp = _cdiv(regs * 32, 256) * 256
    by_regs = getattr(props, "regs_per_multiprocessor", 65536) // (regs_per_warp * num_warps)
    by_shared = props.shared_memory_per_multiprocessor // (shared + 1024)
    by_threads = props.max_threads_per_multi_processor // (32 * num_warps)
    return max(1, min(by_regs, by_shared, by_threads))
