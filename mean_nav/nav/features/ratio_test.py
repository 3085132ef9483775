"""Lowe's ratio test: keep a nearest neighbour clearly closer than the second one."""
from __future__ import annotations

import cv2
import numpy as np

from . import Features, Matches

NORMS = {"l2": cv2.NORM_L2, "hamming": cv2.NORM_HAMMING}


class RatioTestMatcher:
    name = "ratio"

    def __init__(self, descriptor_norm: str = "l2", ratio: float = 0.8):
        self.ratio = ratio
        self._bf = cv2.BFMatcher(NORMS[descriptor_norm])

    @classmethod
    def from_refine(cls, refine, descriptor_norm: str) -> "RatioTestMatcher":
        return cls(descriptor_norm, refine.ratio_test)

    def match(self, query: Features, ref: Features) -> Matches:
        if len(query) == 0 or len(ref) < 2:
            return Matches.empty()
        pairs = self._bf.knnMatch(query.descriptors, ref.descriptors, k=2)
        good = [(p[0].queryIdx, p[0].trainIdx, p[0].distance / max(p[1].distance, 1e-9))
                for p in pairs if len(p) == 2 and p[0].distance < self.ratio * p[1].distance]
        if not good:
            return Matches.empty()
        q, r, ratio = (np.array(v) for v in zip(*good))
        return Matches(q.astype(np.int64), r.astype(np.int64), (1.0 - ratio).astype(np.float32))
