"""Verification: geometric check of candidate map places by local-feature matching.

The best verified candidate becomes the metric measurement of the camera nadir, with a
covariance from the fit plus the white error beyond it.
"""
from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from .acquisition import Candidate
from .refine import Features, FeatureMatcher

if TYPE_CHECKING:
    from .localizer import LocalizerConfig


@dataclass
class Measurement:
    x: float
    y: float
    cov: np.ndarray
    tile_id: int
    score: float
    inliers: int


class Verifier:
    """Matches a rectified query against the map around each candidate (map features cached per tile)."""

    def __init__(self, cfg: "LocalizerConfig", cache):
        self.cfg, self.cache = cfg, cache
        self.tile_px = int(cache.tile_px)
        self.tile_size_m = float(cache.tile_size_m)
        self.margin_m = cfg.region_margin_m if cfg.region_margin_m is not None else self.tile_size_m / 2
        self.matcher = FeatureMatcher(dataclasses.replace(cfg.refine, min_inliers=cfg.min_inliers))
        self._region_features: OrderedDict[Any, tuple[Features, np.ndarray, Any]] = OrderedDict()

    def _region(self, cand: Candidate, size_m: float) -> tuple[Features, Any, Any]:
        """Features of the map around a candidate (cached per tile), its valid mask and the
        crop's pixel-corner -> metric transform."""
        key = cand.key
        if key is not None and key in self._region_features:
            self._region_features.move_to_end(key)
            return self._region_features[key]
        crop = self.cache.region(cand.x, cand.y, size_m)
        entry = (self.matcher.features(crop.image, crop.valid), crop.valid, crop.transform)
        if key is not None:
            self._region_features[key] = entry
            while len(self._region_features) > self.cfg.feature_cache_tiles:
                self._region_features.popitem(last=False)
        return entry

    def verify(self, query, valid, candidates: Iterable[Candidate], height_m: float):
        query_features = self.matcher.features(query, valid)
        centre = self.tile_px / 2.0 - 0.5
        best, best_inliers, reasons = None, 0, []
        tried: list[tuple[float, float]] = []
        size_m = self.tile_size_m + 2.0 * self.margin_m
        for cand in candidates:
            # a candidate close to one already verified shows the same map: skip it
            if any(math.hypot(cand.x - x, cand.y - y) < self.margin_m / 2 for x, y in tried):
                continue
            tried.append((cand.x, cand.y))
            features, region_valid, transform = self._region(cand, size_m)
            result = self.matcher.match(query_features, features, (centre, centre))
            if not result.ok:
                reasons.append(f"tile {cand.tile_id}: {result.reason}")
                continue
            col, row = result.nadir_px
            ci, ri = int(round(col)), int(round(row))
            if not (0 <= ri < region_valid.shape[0] and 0 <= ci < region_valid.shape[1]) or not region_valid[ri, ci]:
                reasons.append(f"tile {cand.tile_id}: match places the nadir outside the map")
                continue
            if result.inliers > best_inliers:
                x, y = transform @ (col + 0.5, row + 0.5)   # pixel centres sit at +0.5 of the corner
                # pixel covariance -> metric through the crop's linear part (row axis points south)
                linear = np.array([[transform.a, transform.b], [transform.d, transform.e]])
                cov = linear @ result.cov_px @ linear.T
                best = Measurement(x, y, cov + self._model_variance(height_m) * np.eye(2),
                                    cand.tile_id, cand.score, result.inliers)
                best_inliers = result.inliers
                if best_inliers >= self.cfg.stop_at_inliers:
                    break
        if best is None:
            if not tried:
                return None, "no map tile near the expected position"
            # every candidate's reason: the first alone hides what the others met
            why = "; ".join(reasons) if reasons else "no candidate verified"
            return None, f"geometric verification failed for {len(reasons)} candidates ({why})"
        return best, ""

    def _model_variance(self, height_m: float) -> float:
        """White measurement noise beyond the fit (the attitude part goes to the filter's bias)."""
        return self.cfg.position_floor_m ** 2
