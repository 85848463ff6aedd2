"""The keys-m decode launch's split count (rqcompile/kernels/splits.py): whole waves of resident programs.

The counts pinned here are the ones the H200 sweep of session 19 measured fastest (benchmarks/NOTES.md; 132 SMs,
three keys-m programs per SM). Where the model's pick differs from the measured best, the test says so."""

from __future__ import annotations

import pytest

from rqcompile.kernels.splits import MAX_SPLITS, wave_splits, wave_time

H200_SMS = 132


def _blocks(keys: int) -> int:
    return -(-keys // 64)


@pytest.mark.parametrize(
    "batch,keys,fastest",
    [
        (8, 32768, 12),  # one wave of 384 programs: 157 us against 170 us for split_waves 8's 32 splits
        (8, 524288, 37),  # three waves, 1,184 of 1,188 slots: 2,212 us against 2,237 us
        (1, 32768, 64),  # 256 programs, two per SM: 28 us against 33 us for 128 splits (1.3 waves)
        (1, 131072, 98),  # one wave of 392: 84 us against 97 us
    ],
)
def test_the_split_count_is_the_one_measured_fastest_on_the_h200(batch, keys, fastest):
    assert wave_splits(_blocks(keys), batch * 4, H200_SMS, 3) == fastest


def test_at_batch_8_and_128k_keys_the_model_picks_one_wave_where_three_measured_1_percent_faster():
    """Measured: 12 splits 591 us, 37 splits 583 us, split_waves 8's 33 splits 614 us. The model ranks 12 first."""
    assert wave_splits(_blocks(131072), 32, H200_SMS, 3) == 12
    assert wave_time(32 * 12, 171, H200_SMS, 3) < wave_time(32 * 33, 63, H200_SMS, 3)


def test_a_last_wave_of_one_program_per_sm_costs_more_than_one_full_wave_of_the_same_work():
    """512 programs of 32 tiles (1.3 waves) against 384 of 43: the measured 177 us against 157 us."""
    assert wave_time(512, 32, H200_SMS, 3) > wave_time(384, 43, H200_SMS, 3)


def test_fewer_programs_per_sm_mean_fewer_programs_per_wave():
    """A mask per query row or the rope term leaves two keys-m programs per SM: the launch fills 264 slots, not 396."""
    splits = wave_splits(_blocks(32768), 32, H200_SMS, 2)
    assert 32 * splits <= H200_SMS * 2 < 32 * (splits + 1)


@pytest.mark.parametrize("blocks,pairs", [(1, 1), (5, 2), (64, 1), (512, 4), (8192, 32), (100000, 1), (7, 3000)])
def test_the_count_is_one_a_launch_can_make(blocks, pairs):
    """At most MAX_SPLITS and one split per tile, and equal spans of whole tiles: recomputing the count from its span
    gives it back, as the launcher does."""
    splits = wave_splits(blocks, pairs, H200_SMS, 3)
    assert 1 <= splits <= min(MAX_SPLITS, blocks)
    span = -(-blocks // splits)
    assert -(-blocks // span) == splits


def test_a_count_that_is_not_positive_is_refused():
    with pytest.raises(ValueError, match="positive"):
        wave_splits(0, 32, H200_SMS, 3)
    with pytest.raises(ValueError, match="positive"):
        wave_splits(512, 32, 0, 3)
