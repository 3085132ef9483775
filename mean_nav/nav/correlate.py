"""Low-altitude fixes: the rectified view correlated with the map around the prediction.

Feature matching needs keypoints, and the camera footprint shrinks with the square of the
height: with 0.25 m map pixels and a 70 deg lens, SIFT finds fewer than ~50 keypoints in
the view below about 30 m, and fixes stop (measured on the demo world: 16 inliers at 36 m,
none verified below 35 m). The map itself is the limit, not the camera: the rectified view
can hold no more detail than the map's pixels. Area correlation uses every pixel of the
view instead of a few keypoints, so while the filter tracks confidently the localizer
correlates the view with the map inside the prediction's 3-sigma area, at the map's GSD,
without retrieval (the network has nothing to embed in a view this small):

  - both images are band-passed (difference of Gaussians, normalised inside the valid
    masks so the footprint's border is no edge) and compared by zero-mean normalised
    cross-correlation, masked to the footprint;
  - a peak is a fix only when the footprint holds `min_footprint_px` map pixels with
    texture, lies wholly on valid map, scores at least `min_score`, and every other local
    maximum farther than `exclusion_px` leaves `min_distinct` times more of the view
    unexplained (1 - score) than the best (a repeated pattern has no single answer);
  - the sub-pixel peak (a parabola through its neighbours) is the nadir; the filter's
    Mahalanobis gate then judges it like any other measurement.

Correlation assumes what the rectification gives: north-up at the map's scale with the
telemetry's heading, and a map that looks like the camera's view (same season and source);
it is not rotation or appearance invariant like the feature path, which stays the method
above `below_valid_fraction`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from ..config import bounded


@dataclass
class CorrelateConfig:
    enabled: bool = True
    # correlate while the camera sees less than this fraction of a tile (lower down the feature
    # path finds too few keypoints); above it only feature matching runs
    below_valid_fraction: float = bounded(0.5, ge=0, le=1)
    # map pixels the footprint must hold: at 0.25 m/px and a 70 deg lens, about 4 m above ground
    # (below localizer.min_height_m 5 m). Views of 400-650 px found distinct peaks at wrong places
    # when the truth lay outside the search (demo world), none inside it: the filter's gate and a
    # search of the prediction's 3 sigma keep the truth inside
    min_footprint_px: int = bounded(400, ge=16, le=1_000_000, unit="px")
    min_texture: float = bounded(1.0, ge=0, le=255, unit="grey levels")   # band-passed std inside the footprint
    min_score: float = bounded(0.5, gt=0, le=1)
    # 1 - score is the share of the view the map does not explain: another local maximum farther
    # than exclusion_px must leave at least this many times more unexplained
    min_distinct: float = bounded(1.3, ge=1, le=100)
    exclusion_px: int = bounded(4, ge=1, le=100, unit="px")
    # searched beyond the prediction's 3-sigma radius, and the search radius at most
    search_margin_m: float = bounded(2.0, ge=0, le=1000, unit="m")
    max_search_m: float = bounded(15.0, gt=0, le=1000, unit="m")
    # 1-sigma of the peak per axis in map pixels (band-passed peaks of the demo world: RMS 0.3 px)
    sigma_px: float = bounded(0.7, gt=0, le=100, unit="px")


@dataclass
class Correlation:
    x: float                # metric nadir position (cache CRS)
    y: float
    cov: np.ndarray         # 2x2, the peak's own uncertainty
    score: float
    distinct: float         # (1 - best other local maximum) / (1 - best)
    footprint_px: int


DOG_SIGMAS_PX = (0.8, 2.5)     # band: pixel noise and interpolation out, slow shading out
ERODE_PX = 2                   # footprint pixels next to the border carry the rectification's seam


def band_pass(grey: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Difference of Gaussians normalised inside `valid` (the invalid area does not leak in)."""
    g = grey.astype(np.float32) * valid
    v = valid.astype(np.float32)
    out = []
    for s in DOG_SIGMAS_PX:
        num = cv2.GaussianBlur(g, (0, 0), s)
        den = cv2.GaussianBlur(v, (0, 0), s)
        out.append(num / np.maximum(den, 1e-3))
    return (out[0] - out[1]) * valid


def correlate(query: np.ndarray, valid: np.ndarray, cache, pred_xy: tuple[float, float], pred_sigma_m: float,
              cfg: CorrelateConfig) -> tuple[Correlation | None, str]:
    """(fix or None, why not) for a rectified north-up query centred on the nadir."""
    gsd = float(cache.gsd_m)
    fp = cv2.erode(valid.astype(np.uint8), np.ones((2 * ERODE_PX + 1,) * 2, np.uint8)) > 0
    if not fp.any():
        return None, "the camera footprint is empty"
    rows, cols = np.nonzero(fp)
    r0, r1, c0, c1 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
    mask = fp[r0:r1, c0:c1]
    n = int(mask.sum())
    if n < cfg.min_footprint_px:
        return None, (f"footprint {n} map pixels below correlate.min_footprint_px {cfg.min_footprint_px} "
                      "(too low for the map's resolution)")
    grey = cv2.cvtColor(query, cv2.COLOR_RGB2GRAY) if query.ndim == 3 else query
    tpl = band_pass(grey, valid)[r0:r1, c0:c1]
    texture = float(tpl[mask].std())
    if texture < cfg.min_texture:
        return None, f"featureless ground under the camera (texture {texture:.1f} < {cfg.min_texture:g})"
    search_m = min(3.0 * pred_sigma_m + cfg.search_margin_m, cfg.max_search_m)
    # the query centre (the nadir) sits at (centre - c0, centre - r0) inside the template
    centre = (query.shape[1] / 2.0 - 0.5, query.shape[0] / 2.0 - 0.5)
    off_c, off_r = centre[0] - c0, centre[1] - r0
    # a crop whose every template placement keeps the nadir within search_m of the prediction
    half = int(math.ceil(search_m / gsd)) + max(r1 - r0, c1 - c0) + 2
    crop = cache.region(pred_xy[0], pred_xy[1], 2 * half * gsd)
    map_grey = cv2.cvtColor(crop.image, cv2.COLOR_RGB2GRAY)
    ref = band_pass(map_grey, crop.valid)
    if ref.shape[0] < tpl.shape[0] or ref.shape[1] < tpl.shape[1]:
        return None, "map crop smaller than the view"
    m8 = mask.astype(np.uint8)
    score = cv2.matchTemplate(ref, tpl, cv2.TM_CCOEFF_NORMED, mask=m8)
    on_map = cv2.matchTemplate(crop.valid.astype(np.float32), mask.astype(np.float32), cv2.TM_CCORR)
    score = np.where(np.isfinite(score) & (on_map >= n - 0.5), score, -1.0).astype(np.float32)
    # placements whose nadir lies within search_m of the prediction
    inv = ~crop.transform
    pc, pr = inv @ (float(pred_xy[0]), float(pred_xy[1]))
    uu, vv = np.meshgrid(np.arange(score.shape[1]), np.arange(score.shape[0]))
    near = np.hypot(uu + off_c + 0.5 - pc, vv + off_r + 0.5 - pr) <= search_m / gsd
    score[~near] = -1.0
    _, best, _, (bu, bv) = cv2.minMaxLoc(score)
    if best < cfg.min_score:
        return None, f"no correlation peak (best {best:.2f} < {cfg.min_score:g})"
    peaks = (score >= cv2.dilate(score, np.ones((3, 3), np.uint8))) & (score > -1.0)
    peaks &= np.hypot(uu - bu, vv - bv) > cfg.exclusion_px
    second = float(score[peaks].max()) if peaks.any() else -1.0
    distinct = (1.0 - second) / max(1.0 - best, 1e-6)
    if distinct < cfg.min_distinct:
        return None, f"ambiguous correlation (peaks {best:.3f} and {second:.3f} apart)"
    du = _parabola(score, bu, bv, 1, 0)
    dv = _parabola(score, bu, bv, 0, 1)
    col, row = bu + du + off_c, bv + dv + off_r
    x, y = crop.transform @ (col + 0.5, row + 0.5)
    cov = (cfg.sigma_px * gsd) ** 2 * np.eye(2)
    return Correlation(float(x), float(y), cov, float(best), float(distinct), n), ""


def _parabola(score: np.ndarray, u: int, v: int, du: int, dv: int) -> float:
    """Sub-pixel offset of the peak at (u, v) along (du, dv), within +-0.5 px."""
    if not (0 < u + du < score.shape[1] and 0 <= u - du and 0 < v + dv < score.shape[0] and 0 <= v - dv):
        return 0.0
    a, b, c = score[v - dv, u - du], score[v, u], score[v + dv, u + du]
    den = a - 2 * b + c
    if a < -0.5 or c < -0.5 or den >= 0:
        return 0.0
    return float(np.clip(0.5 * (a - c) / den, -0.5, 0.5))
