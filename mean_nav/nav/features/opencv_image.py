"""The grey image OpenCV's detectors see: equalised, with the no-data border masked out."""
from __future__ import annotations

import cv2
import numpy as np


class GreyPreparer:
    """RGB/grey uint8 -> (grey, detection mask): CLAHE (camera and map exposures differ) and a
    mask kept away from the no-data border (its edge is a strong, false feature)."""

    def __init__(self, equalize: bool = True, clahe_grid: int = 4, border_px: int = 7):
        self.equalize = equalize
        self._clahe = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(clahe_grid, clahe_grid))
        self._kernel = np.ones((border_px, border_px), np.uint8)

    def __call__(self, image: np.ndarray, valid: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        grey = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        if self.equalize:
            grey = self._clahe.apply(grey)
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
