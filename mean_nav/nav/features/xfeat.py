"""XFeat keypoints and descriptors in onnxruntime (the ONNX from `mean-nav export-features`).

No torch here: this is the flight computer's path. The graph takes a grey image whose
sides are multiples of 32 and a count K and returns the K best keypoints; images of other sizes are
padded (not resized, so the ground resolution stays the cache's) and keypoints in the
padding or near the no-data border of a rectified view are dropped. `refine.feature_backend`
runs it on a TensorRT engine built from the ONNX instead (deploy/feature_backends.py).
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from ...deploy.feature_backends import FeatureGraph
from ...errors import MeanNavError
from . import Features

SIZE_MULTIPLE = 32
BORDER_PX = 4   # keypoints this close to no-data or padding describe the edge, not the ground
XFEAT_ONNX = "xfeat.onnx"
LIGHTERGLUE_ONNX = "lighterglue.onnx"


def grey_input(image: np.ndarray) -> np.ndarray:
    """HxWx3 RGB (or HxW grey) uint8 -> [1,1,H,W] float32 in [0,1]: the channel mean, as XFeat takes it."""
    grey = image.astype(np.float32) if image.ndim == 2 else image.astype(np.float32).mean(axis=2)
    return (grey / 255.0)[None, None]


def model_path(refine, name: str) -> Path:
    """An ONNX file of `refine.xfeat_models` (the folder `mean-nav export-features -o` wrote)."""
    if not refine.xfeat_models:
        raise MeanNavError("refine.xfeat_models: not set; the xfeat detector and lighterglue matcher need the "
                           "folder written by `mean-nav export-features -o DIR`")
    path = Path(refine.xfeat_models).expanduser() / name
    if not path.is_file():
        raise MeanNavError(f"refine.xfeat_models: {path} not found; run `mean-nav export-features -o "
                           f"{refine.xfeat_models}` on a machine with torch and copy the folder over")
    return path


def models_relative_to(localizer_cfg, base_dir: str | Path):
    """The LocalizerConfig with a relative `refine.xfeat_models` taken relative to `base_dir`
    (the YAML it came from), as every other path in the config is."""
    import dataclasses

    refine = localizer_cfg.refine
    if not refine.xfeat_models or Path(refine.xfeat_models).expanduser().is_absolute():
        return localizer_cfg
    folder = str(Path(base_dir) / Path(refine.xfeat_models).expanduser())
    return dataclasses.replace(localizer_cfg, refine=dataclasses.replace(refine, xfeat_models=folder))


class XFeatExtractor:
    """Image -> Features (64-d float descriptors), on onnxruntime (CPU, or CUDA/TensorRT providers
    where installed) or a TensorRT engine (`backend`). No CLAHE: XFeat instance-normalises its
    input itself."""

    name = "xfeat"
    descriptor_norm = "l2"
    rotation_invariant = False   # verification turns the query by the known heading error first

    def __init__(self, path: str | Path, max_features: int = 1024, threads: int | None = None,
                 cpu_only: bool = False, backend: str = "onnxruntime"):
        self.path = Path(path)
        self.max_features = int(max_features)   # 0: every keypoint the detector finds (map blocks)
        # an engine has a fixed K: it can serve only an extractor with a keypoint budget
        self.graph = FeatureGraph(self.path, "xfeat", backend, keypoints=self.max_features or None, threads=threads,
                                  cpu_only=cpu_only)
        self.weights_sha256 = self.graph.metadata["weights_sha256"]

    @classmethod
    def from_refine(cls, refine, max_features: int) -> "XFeatExtractor":
        return cls(model_path(refine, XFEAT_ONNX), max_features, threads=refine.feature_threads,
                   backend=refine.feature_backend)

    def settings(self) -> dict:
        return {"detector": self.name, "weights_sha256": self.weights_sha256, "border_px": BORDER_PX}

    def extract(self, image: np.ndarray, valid: np.ndarray | None = None) -> Features:
        h, w = image.shape[:2]
        grey = grey_input(image)[0, 0]
        keep = np.ones((h, w), bool) if valid is None else valid.astype(bool)
        if valid is not None and keep.any():
            grey = np.where(keep, grey, grey[keep].mean())   # no-data as flat mean grey: no edge to detect
        ph, pw = -h % SIZE_MULTIPLE, -w % SIZE_MULTIPLE
        if ph or pw:
            grey = np.pad(grey, ((0, ph), (0, pw)), mode="edge")
        # non-maximum suppression over 5x5 leaves at most one keypoint per 3x3 pixels
        k = grey.size // 9 + 1 if self.max_features <= 0 else min(self.max_features, grey.size)
        points, scores, descriptors = self.graph.run({"image": grey[None, None].astype(np.float32),
                                                      "max_keypoints": np.array([k], np.int64)})
        # drop empty slots (score <= 0, as the reference does), padding and the no-data border
        inside = np.pad(keep, ((0, ph), (0, pw)))
        inside = cv2.erode(inside.astype(np.uint8), np.ones((2 * BORDER_PX + 1,) * 2, np.uint8)).astype(bool)
        col, row = points[:, 0].astype(int), points[:, 1].astype(int)
        ok = (scores > 0) & inside[row, col]
        index = np.flatnonzero(ok)
        return Features(points[index].astype(np.float32), descriptors[index].astype(np.float32),
                        scores[index].astype(np.float32), (w, h))
