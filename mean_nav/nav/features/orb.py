"""ORB (OpenCV): binary descriptors, the fast option (less robust across appearance changes)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

from . import Features
from .opencv_image import GreyPreparer, keypoints_to_features


@dataclass(frozen=True)
class OrbConfig:
    max_features: int = 1500
    equalize: bool = True
    clahe_tile_px: int | None = None
    fast_threshold: int = 10      # lower than OpenCV's 20: aerial texture is often soft


class OrbExtractor:
    name = "orb"
    descriptor_norm = "hamming"
    rotation_invariant = True

    def __init__(self, cfg: OrbConfig = OrbConfig()):
        self.cfg = cfg
        self._prepare = GreyPreparer(cfg.equalize, cfg.clahe_tile_px)
        # ORB needs a positive budget; "no limit" (map blocks) means a very large one
        self._orb = cv2.ORB_create(nfeatures=cfg.max_features or 1 << 20, fastThreshold=cfg.fast_threshold)

    @classmethod
    def from_refine(cls, refine, max_features: int, clahe_tile_px: int | None = None) -> "OrbExtractor":
        return cls(OrbConfig(max_features=max_features, equalize=refine.equalize, clahe_tile_px=clahe_tile_px))

    def extract(self, image: np.ndarray, valid: np.ndarray | None = None) -> Features:
        grey, mask = self._prepare(image, valid)
        keypoints, descriptors = self._orb.detectAndCompute(grey, mask)
        return keypoints_to_features(keypoints, descriptors, 32, np.uint8, grey.shape)

    def settings(self) -> dict:
        return {"detector": self.name, **{k: v for k, v in asdict(self.cfg).items() if k not in ("max_features", "clahe_tile_px")}}
