"""Coarse-to-fine: geometric verification of retrieved tiles and metre-level position.

Both images are north-up at the cache's ground resolution (the query was rectified to
a nadir view), so the true mapping between them is close to a pure translation. We match
local features (nav/features/: SIFT by default, ORB as the fast option), fit a 4-DoF similarity with
RANSAC, refuse fits whose scale or rotation are implausible (a wrong place rarely
produces a near-identity similarity with many inliers), and map the query's centre (the
camera nadir) into the map. The least-squares covariance of that point, from the inlier
residuals, is the measurement's matching uncertainty.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from ..config import bounded
from .features import Features, make_extractor, make_matcher

__all__ = ["RefineConfig", "Features", "MatchResult", "FeatureMatcher"]


@dataclass
class RefineConfig:
    detector: str = "sift"            # sift | orb | xfeat (nav/features/)
    # ratio | mnn | lighterglue (xfeat only); None: the detector's usual matcher (ratio for sift/orb,
    # lighterglue for xfeat)
    matcher: str | None = None
    xfeat_models: str | None = None   # folder with xfeat.onnx + lighterglue.onnx (`mean-nav export-features -o`)
    # xfeat / lighterglue runtime: auto (a TensorRT engine built from the ONNX where there is one,
    # else onnxruntime) | onnxruntime | tensorrt (deploy/feature_backends.py)
    feature_backend: Literal["auto", "onnxruntime", "tensorrt"] = "auto"
    feature_threads: int | None = bounded(None, ge=1, le=1024)   # onnxruntime threads (None: one per core)
    # per query image and per map region (the region's strongest)
    max_features: int = bounded(1500, ge=2, le=100_000)
    ratio_test: float = bounded(0.8, gt=0, le=1)  # Lowe's ratio for the two nearest neighbours
    ransac_threshold_px: float = bounded(3.0, gt=0, le=100, unit="px")
    min_inliers: int = bounded(15, ge=2, le=100_000)
    min_inlier_ratio: float = bounded(0.15, ge=0, le=1)  # inliers / ratio-test matches
    # residual rotation left after rectification with the yaw
    max_rotation_deg: float = bounded(12.0, ge=0, le=180, unit="deg")
    max_scale_error: float = bounded(0.15, ge=0, lt=1)  # |scale - 1| left after scaling with height and focal length
    equalize: bool = True             # CLAHE on both images: camera and map exposures differ
    # SIFT contrast threshold of a camera view that has fewer than query_min_keypoints at the
    # map's (OpenCV's 0.04, kept by the stored features): over grass and water 0.04 left 30-80
    # keypoints in a view; 0.02 finds 3x more, and the map's keypoints among them match. Only
    # there: on textured ground 0.02 doubles the cost of the query's features and matches
    query_contrast_threshold: float = bounded(0.02, gt=0, le=1)
    query_min_keypoints: int = bounded(200, ge=0, le=1_000_000)
    # while a confident track predicts the place, a candidate whose map region gave too few
    # feature matches is matched again against that region detected in flight at
    # query_contrast_threshold (SIFT): the stored 0.04 features of grass leave too few keypoints,
    # as they leave the camera view (survey_40m: 9 and 7 matches -> 15 and 26 inliers). Costs a
    # detection (the region's 512 px chunks, then kept) only where verification failed that way
    map_low_contrast_retry: bool = True


@dataclass
class MatchResult:
    ok: bool
    reason: str = ""
    inliers: int = 0
    matches: int = 0
    nadir_px: tuple[float, float] = (math.nan, math.nan)   # query centre in region pixels
    cov_px: np.ndarray | None = None                        # 2x2 covariance of nadir_px
    rotation_deg: float = math.nan
    scale: float = math.nan
    residual_px: float = math.nan
    params: np.ndarray | None = None    # similarity [a, b, tx, ty]: region = [[a,-b],[b,a]] query + t
    rotation_only: bool = False          # the fit is good but turned more than allowed from the prior
    inlier_query_px: np.ndarray | None = None    # [N, 2] the inliers in query pixels (pose.py)
    inlier_region_px: np.ndarray | None = None   # [N, 2] and their matches in region pixels

    def to_region(self, points_px: np.ndarray) -> np.ndarray:
        """Query pixel positions [N, 2] -> region pixels through the fitted similarity."""
        a, b, tx, ty = self.params
        p = np.asarray(points_px, np.float64)
        return np.stack([a * p[:, 0] - b * p[:, 1] + tx, b * p[:, 0] + a * p[:, 1] + ty], axis=1)


class FeatureMatcher:
    """Detects, matches and verifies features between a query and map regions."""

    def __init__(self, cfg: RefineConfig | None = None):
        self.cfg = cfg or RefineConfig()
        self.extractor = make_extractor(self.cfg, query=True)
        self.matcher = make_matcher(self.cfg, self.extractor)

    def features(self, image_rgb: np.ndarray, valid: np.ndarray | None = None) -> Features:
        return self.extractor.extract(image_rgb, valid)

    def match(self, query: Features, region: Features, query_centre_px: tuple[float, float],
              rotation_prior_deg: float = 0.0, min_inliers: int | None = None) -> MatchResult:
        """Verify `region` against `query`; locate the query centre in region pixels.

        The fit may turn at most max_rotation_deg from `rotation_prior_deg` (the heading error
        known so far); a good fit turned further comes back with ok False and rotation_only,
        unless the matches it leaves out hold a fit at the known heading (which then wins: a
        turned copy of the ground, such as a map corner's point-mirrored surroundings or a
        repeated block, can outvote the true place within one view). `min_inliers` overrides
        the configured bar (the verifier lowers it for fits it checks against the track).
        """
        cfg = self.cfg
        need = cfg.min_inliers if min_inliers is None else int(min_inliers)
        if len(query) < need or len(region) < need:
            return MatchResult(False, f"too few features (query {len(query)}, map {len(region)})")
        good = self.matcher.match(query, region)
        if len(good) < need:
            return MatchResult(False, f"too few feature matches ({len(good)})", matches=len(good))
        # without the detector's own offset: it does not turn with the query, so a turned fit
        # would carry it into the nadir
        offset = float(getattr(self.extractor, "keypoint_offset_px", 0.0))
        src = query.points[good.query_idx] - offset
        dst = region.points[good.ref_idx] - offset
        result, inl = self._fit(src, dst, len(good), need, query_centre_px, rotation_prior_deg)
        if result.rotation_only and inl is not None and (~inl).sum() >= need:
            rest, rest_inl = self._fit(src[~inl], dst[~inl], len(good), need, query_centre_px, rotation_prior_deg)
            if rest.ok:
                return rest
        return result

    def _fit(self, src: np.ndarray, dst: np.ndarray, n_matches: int, need: int,
             query_centre_px: tuple[float, float], rotation_prior_deg: float):
        """RANSAC similarity over matched points -> (MatchResult, inlier mask or None)."""
        cfg = self.cfg
        model, inlier_mask = cv2.estimateAffinePartial2D(
            src, dst, method=cv2.RANSAC, ransacReprojThreshold=cfg.ransac_threshold_px,
            maxIters=2000, confidence=0.999, refineIters=0)
        if model is None:
            return MatchResult(False, "no geometric model", matches=n_matches), None
        inl = inlier_mask.ravel().astype(bool)
        n = int(inl.sum())
        if n < need or n < cfg.min_inlier_ratio * n_matches:
            return MatchResult(False, f"too few inliers ({n} of {n_matches})", inliers=n, matches=n_matches), inl
        params, cov_params, residual = _fit_similarity(src[inl], dst[inl])
        a, b, tx, ty = params
        scale = math.hypot(a, b)
        rotation = math.degrees(math.atan2(b, a))
        if abs(scale - 1.0) > cfg.max_scale_error:
            return MatchResult(False, f"implausible fit (scale {scale:.2f}, rotation {rotation:.0f} deg)",
                               inliers=n, matches=n_matches, scale=scale, rotation_deg=rotation), inl
        cx, cy = query_centre_px
        G = np.array([[cx, -cy, 1.0, 0.0], [cy, cx, 0.0, 1.0]])
        nadir = G @ params
        result = MatchResult(True, "", n, n_matches, (float(nadir[0]), float(nadir[1])),
                             G @ cov_params @ G.T, rotation, scale, residual, params,
                             inlier_query_px=src[inl], inlier_region_px=dst[inl])
        if abs(angle_difference_deg(rotation, rotation_prior_deg)) > cfg.max_rotation_deg:
            result.ok, result.rotation_only = False, True
            result.reason = f"implausible fit (scale {scale:.2f}, rotation {rotation:.0f} deg)"
        return result, inl


def angle_difference_deg(a: float, b: float) -> float:
    """a - b wrapped to [-180, 180)."""
    return (a - b + 180.0) % 360.0 - 180.0


def _fit_similarity(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Least-squares similarity dst = [[a,-b],[b,a]] src + t on inliers.

    Returns params [a, b, tx, ty], their covariance from the residuals, and the RMS residual (px).
    """
    n = len(src)
    J = np.zeros((2 * n, 4))
    J[0::2, 0] = src[:, 0]
    J[0::2, 1] = -src[:, 1]
    J[0::2, 2] = 1.0
    J[1::2, 0] = src[:, 1]
    J[1::2, 1] = src[:, 0]
    J[1::2, 3] = 1.0
    rhs = dst.reshape(-1).astype(float)
    params, *_ = np.linalg.lstsq(J, rhs, rcond=None)
    residuals = rhs - J @ params
    dof = max(2 * n - 4, 1)
    variance = float(residuals @ residuals) / dof
    # floor: sub-pixel keypoint localisation is not better than ~0.3 px whatever the fit says
    variance = max(variance, 0.3 ** 2)
    cov = variance * np.linalg.inv(J.T @ J)
    return params, cov, math.sqrt(float(residuals @ residuals) / (2 * n))
