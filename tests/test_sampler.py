"""Unique-location batches: no location twice in a batch, reshuffled per epoch, sharded for DDP."""
import numpy as np
import pytest

from mean_nav.data.sampler import UniqueLocationBatchSampler


def skewed_labels():
    # 40 locations with 1..12 pairs each: duplicates are common in a plain shuffle
    rng = np.random.default_rng(3)
    return np.repeat(np.arange(40), rng.integers(1, 13, size=40))


def test_every_batch_is_full_and_has_distinct_locations():
    labels = skewed_labels()
    sampler = UniqueLocationBatchSampler(labels, batch_size=16, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) > 0
    for batch in batches:
        assert len(batch) == 16
        assert len(set(labels[batch])) == 16


def test_no_pair_is_used_twice_in_an_epoch_and_few_are_dropped():
    labels = np.repeat(np.arange(50), 6)  # balanced: almost everything fits
    sampler = UniqueLocationBatchSampler(labels, batch_size=10, seed=1)
    used = [i for b in sampler for i in b]
    assert len(used) == len(set(used))
    assert len(used) >= len(labels) - 10  # at most the last incomplete batch is dropped


def test_order_changes_between_epochs_and_is_reproducible():
    labels = skewed_labels()
    a = UniqueLocationBatchSampler(labels, 8, seed=5)
    b = UniqueLocationBatchSampler(labels, 8, seed=5)
    first = list(a)
    a.set_epoch(1)
    second = list(a)
    assert first != second
    b.set_epoch(1)
    assert list(b) == second


def test_ranks_get_disjoint_equal_shares_of_the_same_global_batches():
    labels = skewed_labels()
    world = 3
    shards = [UniqueLocationBatchSampler(labels, 8, seed=2, rank=r, world_size=world) for r in range(world)]
    for s in shards:
        s.set_epoch(4)
    lengths = {len(s) for s in shards}
    assert len(lengths) == 1  # same step count on every rank, or DDP would hang
    per_rank = [list(s) for s in shards]
    flat = [tuple(b) for batches in per_rank for b in batches]
    assert len(flat) == len(set(flat))
    indices = [i for b in flat for i in b]
    assert len(indices) == len(set(indices))
    assert sorted(flat) == sorted(tuple(b) for b in shards[0].global_batches())


def test_batch_larger_than_the_number_of_locations_is_refused():
    with pytest.raises(ValueError, match="distinct locations"):
        UniqueLocationBatchSampler([0, 0, 1, 1], batch_size=3)
