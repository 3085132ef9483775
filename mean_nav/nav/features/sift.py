"""SIFT (OpenCV): scale- and rotation-invariant, the robust default."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

from . import Features
from .opencv_image import GreyPreparer, keypoints_to_features


@dataclass(frozen=True)
class SiftConfig:
    max_features: int = 1500      # strongest responses kept; 0 keeps all
    equalize: bool = True         # CLAHE before detection
    clahe_tile_px: int | None = None  # CLAHE tile side; None: a 4 x 4 grid over the image
    contrast_threshold: float = 0.04
    # where the view holds fewer than retry_below keypoints at contrast_threshold, detect it
    # again down to retry_contrast_threshold (the camera view over grass or water)
    retry_contrast_threshold: float | None = None
    retry_below: int = 0


class SiftExtractor:
    name = "sift"
    descriptor_norm = "l2"
    rotation_invariant = True     # keypoints carry an orientation: no heading search needed
    # OpenCV places SIFT keypoints 0.25 px right of and below the feature (its first octave is
    # the image upsampled x2 and the coordinates are halved without the half-pixel shift):
    # shared by query and map, so it cancels in a translation, but a view turned by 180 deg
    # against the map would put the fit's nadir 0.5 px off
    keypoint_offset_px = 0.25

    def __init__(self, cfg: SiftConfig = SiftConfig()):
        self.cfg = cfg
        self._prepare = GreyPreparer(cfg.equalize, cfg.clahe_tile_px)
        self._sift = cv2.SIFT_create(nfeatures=cfg.max_features, contrastThreshold=cfg.contrast_threshold)
        self._retry = None if cfg.retry_contrast_threshold is None else \
            cv2.SIFT_create(nfeatures=cfg.max_features, contrastThreshold=cfg.retry_contrast_threshold)

    @classmethod
    def from_refine(cls, refine, max_features: int, clahe_tile_px: int | None = None,
                    contrast_threshold: float = SiftConfig.contrast_threshold,
                    retry_contrast_threshold: float | None = None, retry_below: int = 0) -> "SiftExtractor":
        return cls(SiftConfig(max_features=max_features, equalize=refine.equalize, clahe_tile_px=clahe_tile_px,
                              contrast_threshold=contrast_threshold, retry_contrast_threshold=retry_contrast_threshold,
                              retry_below=retry_below))

    def extract(self, image: np.ndarray, valid: np.ndarray | None = None) -> Features:
        grey, mask = self._prepare(image, valid)
        keypoints, descriptors = self._sift.detectAndCompute(grey, mask)
        if self._retry is not None and len(keypoints) < self.cfg.retry_below:
            keypoints, descriptors = self._retry.detectAndCompute(grey, mask)
        return keypoints_to_features(keypoints, descriptors, 128, np.float32, grey.shape)

    def settings(self) -> dict:
        # the retry is the camera view's alone: stored map features never retry
        skip = ("max_features", "clahe_tile_px", "retry_contrast_threshold", "retry_below")
        return {"detector": self.name, **{k: v for k, v in asdict(self.cfg).items() if k not in skip}}
