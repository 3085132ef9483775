"""Batches in which no location appears twice, reshuffled each epoch, sharded for DDP.

InfoNCE treats every other pair in a batch as a negative; two pairs of one location in
a batch would be a false negative. The sampler shuffles all pairs each epoch and fills
batches greedily, holding back a pair whose location the current batch already has and
placing it in a later batch. Pairs that cannot fill a last complete batch are dropped.

Under DistributedDataParallel every rank builds the same batch list (same seed and
epoch) and takes every `world_size`-th batch; the list is cut to a multiple of
`world_size` so all ranks run the same number of steps.
"""
from __future__ import annotations

from collections import deque
from typing import Iterator, Sequence

import numpy as np


class UniqueLocationBatchSampler:
    """A `batch_sampler` for torch's DataLoader (no torch needed to build or test it)."""

    def __init__(self, labels: Sequence[int], batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of {world_size}")
        self.labels = np.asarray(labels, np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self._cache: tuple[int, list[list[int]]] | None = None
        distinct = len(np.unique(self.labels))
        if distinct < batch_size:
            raise ValueError(f"batch_size {batch_size} exceeds the {distinct} distinct locations; "
                             "lower the batch size or add locations")

    def set_epoch(self, epoch: int) -> None:
        """Call at the start of each epoch (like DistributedSampler) to reshuffle."""
        self.epoch = int(epoch)

    def global_batches(self) -> list[list[int]]:
        """All complete batches of this epoch, before sharding (same on every rank)."""
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, self.epoch])
        remaining = iter(rng.permutation(len(self.labels)).tolist())
        held_back: deque[int] = deque()
        batches: list[list[int]] = []
        while True:
            batch: list[int] = []
            in_batch: set[int] = set()
            # pairs held back earlier go first, in their order, so none waits forever
            for _ in range(len(held_back)):
                index = held_back.popleft()
                label = int(self.labels[index])
                if len(batch) < self.batch_size and label not in in_batch:
                    batch.append(index)
                    in_batch.add(label)
                else:
                    held_back.append(index)
            while len(batch) < self.batch_size:
                index = next(remaining, None)
                if index is None:
                    break
                label = int(self.labels[index])
                if label in in_batch:
                    held_back.append(index)
                else:
                    batch.append(index)
                    in_batch.add(label)
            if len(batch) < self.batch_size:
                break  # drop the last incomplete batch
            batches.append(batch)
        usable = len(batches) - len(batches) % self.world_size
        batches = batches[:usable]
        self._cache = (self.epoch, batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.global_batches()[self.rank::self.world_size]

    def __len__(self) -> int:
        return len(self.global_batches()) // self.world_size
