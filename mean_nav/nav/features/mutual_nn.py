"""Mutual nearest neighbours: a pair is kept when each point is the other's nearest neighbour."""
from __future__ import annotations

import cv2
import numpy as np

from . import Features, Matches
from .ratio_test import NORMS


class MutualNNMatcher:
    name = "mnn"

    def __init__(self, descriptor_norm: str = "l2"):
        self._bf = cv2.BFMatcher(NORMS[descriptor_norm], crossCheck=True)

    @classmethod
    def from_refine(cls, refine, descriptor_norm: str) -> "MutualNNMatcher":
        return cls(descriptor_norm)

    def match(self, query: Features, ref: Features) -> Matches:
        if len(query) == 0 or len(ref) == 0:
            return Matches.empty()
        pairs = self._bf.match(query.descriptors, ref.descriptors)
        if not pairs:
            return Matches.empty()
        return Matches(np.array([m.queryIdx for m in pairs], np.int64), np.array([m.trainIdx for m in pairs], np.int64))
