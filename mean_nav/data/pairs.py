"""Training pairs as a map-style dataset for torch's DataLoader (no torch import).

A pair source knows its pairs' location labels and can produce the two RGB images of
pair i; `PairDataset` resizes, augments and normalises them exactly as the deployment
`Embedder` preprocesses (ImageNet mean/std, RGB, square resize), so a trained model sees
the same input distribution in flight.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

from ..deploy.embedder import Preprocessing, normalize, to_batch_uint8
from .augment import AugmentConfig, augment_pair
from .datasets import PairIndex, load_rgb
from .synthetic import SyntheticPairSource


class PairSource(Protocol):
    labels: list[int]
    num_classes: int

    def load_pair(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(satellite, drone) RGB uint8 images of pair `index`."""


class FolderPairs:
    """Pairs of a University-1652 / SUES-200 training folder: one per drone image."""

    def __init__(self, index: PairIndex):
        self.index = index
        self.labels = index.labels
        self.num_classes = index.num_classes

    def __len__(self) -> int:
        return len(self.index.pairs)

    def load_pair(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        cls, k = self.index.pairs[index]
        sats = self.index.satellite[cls]
        sat = sats[int(rng.integers(len(sats)))] if len(sats) > 1 else sats[0]
        return load_rgb(sat), load_rgb(self.index.drone[cls][k])


class SyntheticPairs:
    """`views_per_location` freshly rendered drone views per location and epoch."""

    def __init__(self, source: SyntheticPairSource):
        self.source = source
        self.views = source.cfg.views_per_location
        self.labels = [i for i in range(len(source)) for _ in range(self.views)]
        self.num_classes = source.num_classes

    def __len__(self) -> int:
        return len(self.labels)

    def load_pair(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        loc = self.labels[index]
        return self.source.satellite(loc), self.source.drone(loc, rng)


class PairDataset:
    """Map-style dataset: index -> (satellite [3,S,S] float32, drone [3,S,S] float32, label).

    Randomness is a function of (seed, epoch, index) only, so a run is reproducible
    whatever the number of DataLoader workers; call `set_epoch` before each epoch.
    """

    def __init__(self, pairs: PairSource, img_size: int, augment: AugmentConfig | None,
                 seed: int = 0, preprocessing: Preprocessing | None = None):
        self.pairs = pairs
        self.img_size = img_size
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.preprocessing = preprocessing or Preprocessing(img_size=img_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.pairs.labels)

    def __getitem__(self, index: int):
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        sat, drone = self.pairs.load_pair(int(index), rng)
        sat, drone = to_batch_uint8([sat, drone], self.img_size)
        if self.augment is not None:
            sat, drone = augment_pair(sat, drone, rng, self.augment)
        batch = normalize(np.stack([sat, drone]), self.preprocessing)
        return batch[0], batch[1], int(self.pairs.labels[index])
