"""LighterGlue matching of XFeat features in onnxruntime (the ONNX from `mean-nav export-features`).

No torch here; `refine.feature_backend` picks onnxruntime or a TensorRT engine built from the
ONNX (deploy/feature_backends.py). The graph runs all of LighterGlue's layers on both keypoint sets and returns,
for every query keypoint, its mutual best match among the reference's and that match's
probability; matches below `min_score` (the reference's filter threshold, 0.1) are dropped.
Keypoint positions are part of LighterGlue's input (normalised by each image's size), so
Features must carry their image_size.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ...deploy.feature_backends import FeatureGraph
from ...errors import MeanNavError
from . import Features, Matches
from .xfeat import LIGHTERGLUE_ONNX, XFEAT_ONNX, model_path

DEFAULT_MIN_SCORE = 0.1


class LighterGlueMatcher:
    name = "lighterglue"

    def __init__(self, path: str | Path, min_score: float = DEFAULT_MIN_SCORE, threads: int | None = None,
                 cpu_only: bool = False, xfeat_weights_sha256: str | None = None, backend: str = "onnxruntime"):
        self.path = Path(path)
        self.graph = FeatureGraph(self.path, "lighterglue", backend, threads=threads, cpu_only=cpu_only)
        meta = self.graph.metadata
        self.weights_sha256 = meta["weights_sha256"]
        self.xfeat_weights_sha256 = meta["xfeat_weights_sha256"]
        if xfeat_weights_sha256 is not None and xfeat_weights_sha256 != self.xfeat_weights_sha256:
            raise MeanNavError(f"{self.path}: LighterGlue was exported with XFeat weights "
                               f"{self.xfeat_weights_sha256[:12]}, the detector's are {xfeat_weights_sha256[:12]}; "
                               "export both with one `mean-nav export-features` run")
        self.min_score = float(min_score)

    @classmethod
    def from_refine(cls, refine, descriptor_norm: str) -> "LighterGlueMatcher":
        if refine.detector != "xfeat":
            raise MeanNavError(f"refine.matcher: lighterglue matches XFeat features only, not {refine.detector!r}; "
                               "use refine.detector: xfeat or another matcher")
        from ...deploy.feature_backends import onnx_feature_metadata

        xfeat = onnx_feature_metadata(model_path(refine, XFEAT_ONNX))   # the pair must come from one export
        return cls(model_path(refine, LIGHTERGLUE_ONNX), xfeat_weights_sha256=xfeat.get("weights_sha256"),
                   threads=refine.feature_threads, backend=refine.feature_backend)

    def match(self, query: Features, ref: Features) -> Matches:
        if len(query) == 0 or len(ref) == 0:
            return Matches.empty()
        if query.descriptors.shape[1] != 64 or ref.descriptors.shape[1] != 64:
            raise MeanNavError(f"refine.matcher: lighterglue needs 64-d XFeat descriptors, got "
                               f"{query.descriptors.shape[1]}-d; use refine.detector: xfeat")
        # positions in the image the descriptors came from: LighterGlue's attention encodes them,
        # and a query turned 180 deg back into its own pixels matched nothing in the field suite
        index, score = self.match_indices(_positions(query), query.descriptors, _size(query), _positions(ref),
                                          ref.descriptors, _size(ref))
        keep = index >= 0
        return Matches(np.flatnonzero(keep).astype(np.int64), index[keep], score[keep].astype(np.float32))

    def match_indices(self, points0: np.ndarray, descriptors0: np.ndarray, size0, points1: np.ndarray,
                      descriptors1: np.ndarray, size1) -> tuple[np.ndarray, np.ndarray]:
        """(index in set 1 or -1, match probability) for each keypoint of set 0. Sizes are (width, height)."""
        feeds = {
            "keypoints0": np.asarray(points0, np.float32)[None], "keypoints1": np.asarray(points1, np.float32)[None],
            "descriptors0": np.asarray(descriptors0, np.float32)[None],
            "descriptors1": np.asarray(descriptors1, np.float32)[None],
            "size0": np.asarray(size0, np.float32).reshape(1, 2), "size1": np.asarray(size1, np.float32).reshape(1, 2),
        }
        matches, scores = self.graph.run(feeds)
        return np.where(scores > self.min_score, matches, -1).astype(np.int64), scores


def _positions(features: Features) -> np.ndarray:
    return features.points if features.match_points is None else features.match_points


def _size(features: Features) -> tuple[int, int]:
    if features.image_size is None:   # points from a store without sizes: the extent they cover
        return tuple(int(v) + 1 for v in features.points.max(axis=0))
    return features.image_size
