"""The grey image OpenCV's detectors see: equalised, with the no-data border masked out."""
from __future__ import annotations

import cv2
import numpy as np


class GreyPreparer:
    """RGB/grey uint8 -> (grey, detection mask): CLAHE (camera and map exposures differ) and a
    mask kept away from the no-data border (its edge is a strong, false feature)."""

    def __init__(self, equalize: bool = True, clahe_tile_px: int | None = None, border_px: int = 7):
        self.equalize, self.clahe_tile_px = equalize, clahe_tile_px
        self._clahe = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(4, 4))
        self._kernel = np.ones((border_px, border_px), np.uint8)

    def _equalizer(self, shape):
        if self.clahe_tile_px is None:
            return self._clahe
        # map windows of any size are equalised at one ground scale
        grid = (max(1, round(shape[1] / self.clahe_tile_px)), max(1, round(shape[0] / self.clahe_tile_px)))
        return cv2.createCLAHE(clipLimit=2.0, tileGridSize=grid)

    def __call__(self, image: np.ndarray, valid: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        grey = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        if self.equalize:
            grey = self._equalizer(grey.shape).apply(grey)
        mask = None
        if valid is not None:
            mask = cv2.erode(valid.astype(np.uint8) * 255, self._kernel)
            grey = np.where(valid, grey, 0).astype(np.uint8)
        return grey, mask


def keypoints_to_features(keypoints, descriptors, dim: int, dtype, image_shape) -> "Features":
    from . import Features

    points = np.array([k.pt for k in keypoints], np.float32).reshape(-1, 2)
    scores = np.array([k.response for k in keypoints], np.float32)
    if descriptors is None:
        descriptors = np.zeros((0, dim), dtype)
    return Features(points, descriptors, scores, (int(image_shape[1]), int(image_shape[0])))
