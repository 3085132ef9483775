"""Local features for refinement: one small module per extractor and per matcher (hloc-style).

Every extractor turns an image (RGB or grey uint8, plus an optional valid mask) into
`Features`; every matcher turns two `Features` into `Matches` (index pairs, optional
confidences). The geometry that decides whether a match is a place (refine.py) and the
map-feature store (geo/map_features.py) see only these two interfaces, so a new detector
(XFeat) or matcher (LighterGlue) is one module plus one line in EXTRACTORS / MATCHERS.

    extractor  module       default matcher
    sift       sift.py      ratio     (ratio_test.py: Lowe's two-nearest-neighbour test)
    orb        orb.py       ratio
    xfeat      xfeat.py     lighterglue (lighterglue.py; both ONNX from `mean-nav export-features`)
                            mnn       (mutual_nn.py: mutual nearest neighbours)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np

if TYPE_CHECKING:
    from ..refine import RefineConfig


@dataclass
class Features:
    """Keypoints of one image: pixel (col, row) centres, descriptors, optional detector scores."""

    points: np.ndarray                     # [N, 2] float32 pixel (col, row), pixel centres at integers
    descriptors: np.ndarray                # [N, D] uint8 or float32
    scores: np.ndarray | None = None       # [N] float32 detector response (higher is stronger)
    image_size: tuple[int, int] | None = None   # (width, height) of the image they came from
    # where a position-aware matcher (LighterGlue) should see them when `points` were mapped
    # back from another image (the query turned north-up for XFeat); None: `points`
    match_points: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.points)

    def subset(self, index) -> "Features":
        """The keypoints selected by an index array or boolean mask."""
        return Features(self.points[index], self.descriptors[index],
                        None if self.scores is None else self.scores[index], self.image_size,
                        None if self.match_points is None else self.match_points[index])


@dataclass
class Matches:
    """Index pairs into the query and reference Features, best-first not guaranteed."""

    query_idx: np.ndarray                  # [M] int64
    ref_idx: np.ndarray                    # [M] int64
    confidence: np.ndarray | None = None   # [M] float32 in [0, 1] where the matcher gives one

    def __len__(self) -> int:
        return len(self.query_idx)

    @classmethod
    def empty(cls) -> "Matches":
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64))


class Extractor(Protocol):
    name: str
    descriptor_norm: str     # "l2" or "hamming": how matchers compare the descriptors
    rotation_invariant: bool # False (XFeat): verification turns the query by the heading error first
    # optional: how far (px, right and down) the detector places its keypoints from the feature;
    # the fit removes it (refine.py; stored map features keep the detector's own coordinates)
    # keypoint_offset_px: float

    def extract(self, image: np.ndarray, valid: np.ndarray | None = None) -> Features:
        """Keypoints of an RGB [H, W, 3] or grey [H, W] uint8 image; none where `valid` is False."""

    def settings(self) -> dict:
        """Everything that changes the features: stored map features are refused when it differs."""


class Matcher(Protocol):
    name: str

    def match(self, query: Features, ref: Features) -> Matches:
        """Putative correspondences between query and reference keypoints."""


def _extractors() -> dict[str, Callable[..., Extractor]]:
    from . import orb, sift, xfeat

    return {"sift": sift.SiftExtractor.from_refine, "orb": orb.OrbExtractor.from_refine,
            "xfeat": xfeat.XFeatExtractor.from_refine}


def _matchers() -> dict[str, Callable[..., Matcher]]:
    from . import lighterglue, mutual_nn, ratio_test

    return {"ratio": ratio_test.RatioTestMatcher.from_refine, "mnn": mutual_nn.MutualNNMatcher.from_refine,
            "lighterglue": lighterglue.LighterGlueMatcher.from_refine}


# extractors that equalise their input with CLAHE (map windows set its tile size)
EQUALIZED = ("sift", "orb")

# the matcher each extractor is verified with when refine.matcher is not set
DEFAULT_MATCHER = {"sift": "ratio", "orb": "ratio", "xfeat": "lighterglue"}


def make_extractor(cfg: "RefineConfig", max_features: int | None = None,
                   clahe_tile_px: int | None = None, query: bool = False,
                   contrast_threshold: float | None = None) -> Extractor:
    """The extractor refine.detector names; `max_features` overrides the config's (0: no limit);
    `clahe_tile_px` equalises in tiles of that many pixels (map windows of any size) instead of
    a 4 x 4 grid over the image; `query`: the camera view's (SIFT then detects down to
    refine.query_contrast_threshold where the map's contrast threshold leaves fewer than
    refine.query_min_keypoints; the map's stored features keep their own settings);
    `contrast_threshold`: SIFT's, where not OpenCV's 0.04 (map windows detected again lower)."""
    from ...errors import MeanNavError

    factories = _extractors()
    if cfg.detector not in factories:
        raise MeanNavError(f"refine.detector: unknown detector {cfg.detector!r}; use one of {sorted(factories)}")
    budget = cfg.max_features if max_features is None else max_features
    if query and cfg.detector == "sift":
        return factories["sift"](cfg, budget, retry_contrast_threshold=cfg.query_contrast_threshold,
                                 retry_below=cfg.query_min_keypoints)
    if contrast_threshold is not None and cfg.detector == "sift":
        return factories["sift"](cfg, budget, clahe_tile_px=clahe_tile_px, contrast_threshold=contrast_threshold)
    if clahe_tile_px is not None and cfg.detector in EQUALIZED:
        return factories[cfg.detector](cfg, budget, clahe_tile_px=clahe_tile_px)
    return factories[cfg.detector](cfg, budget)


def make_matcher(cfg: "RefineConfig", extractor: Extractor) -> Matcher:
    """The matcher refine.matcher names (default: the extractor's usual one), for its descriptors."""
    from ...errors import MeanNavError

    factories = _matchers()
    name = cfg.matcher or DEFAULT_MATCHER.get(extractor.name, "mnn")
    if name not in factories:
        raise MeanNavError(f"refine.matcher: unknown matcher {name!r}; use one of {sorted(factories)}")
    return factories[name](cfg, extractor.descriptor_norm)
