"""The localizer: one camera frame + telemetry -> one Estimate.

Shared by the onboard daemon and the offline replay (which calls `process` frame by
frame), so both run exactly the same code. Steps:

  1. check the frame (corrupt, black) and the telemetry (missing, stale, implausible);
  2. rectify: undistort, warp to a nadir north-up view at the cache's ground resolution,
     centred on the nadir point (camera_model.rectify_to_nadir);
  3. retrieve: embed the view and search the tile cache near the filter's position when
     it is confident, around the configured initial position before the first fix, and
     the whole cache when lost (while tracking, the map at the prediction is verified
     first and the network runs only if that is not conclusive);
  4. refine: geometric verification of the best tiles (and of the map around the
     filter's prediction) by feature matching; the query centre mapped into the map is
     the metric position of the nadir, with a covariance from the fit plus the error the
     attitude and flat-ground assumptions bring;
  5. filter: constant-velocity Kalman filter with Mahalanobis gating; only a gated-in
     measurement gives FixQuality.FIX.

Time comes only from the arguments (frame_time_s, telemetry.time_s): replay is deterministic.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import cv2
import numpy as np

from ..deploy.embedder import Embedder
from ..errors import MeanNavError
from .camera_model import CameraModel, rectify_to_nadir
from .estimate import Estimate, FixQuality
from .filter import RADIUS68_PER_SIGMA, FilterConfig, PositionFilter
from .refine import Features, FeatureMatcher, RefineConfig
from .telemetry import Telemetry

log = logging.getLogger(__name__)


@dataclass
class LocalizerConfig:
    top_k: int = 4                      # retrieved tiles verified per frame
    search_radius_m: float = 60.0       # added to the filter's 3-sigma radius when searching near it
    confident_sigma_m: float = 30.0     # filter 68 % radius below which the search stays near it
    initial_radius_m: float = 500.0     # search radius around initial_lonlat before the first fix
    min_inliers: int = 15               # feature inliers for a verified match
    stop_at_inliers: int = 80           # a candidate this strong ends the verification early
    region_margin_m: float | None = None  # map margin around a candidate; default half a tile
    verify_prediction: bool = True      # also verify the map around the filter's prediction
    always_retrieve: bool = False       # run the network even when the prediction verifies strongly
    max_telemetry_age_s: float = 0.25   # |frame time - telemetry time| allowed
    min_height_m: float = 5.0
    max_tilt_deg: float = 35.0
    min_valid_fraction: float = 0.5     # rectified view pixels the camera actually saw
    min_frame_contrast: float = 4.0     # grey-level std below this: black, blank or covered lens
    # measurement noise beyond the fit itself (per axis, 1 sigma)
    attitude_sigma_deg: float = 0.3     # roll/pitch error moves the nadir by height * angle (slow: a filter bias)
    position_floor_m: float = 0.4       # terrain relief, map registration, camera/telemetry sync
    vertical_sigma_m: float = 3.0       # altitude comes from the autopilot, not from vision
    feature_cache_tiles: int = 128      # map-region features kept in memory (per tile id)
    refine: RefineConfig = field(default_factory=RefineConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)


@dataclass
class _Candidate:
    x: float
    y: float
    tile_id: int
    score: float
    key: Any        # feature-cache key, None for positions that are not tile centres


@dataclass
class _Measurement:
    x: float
    y: float
    cov: np.ndarray
    tile_id: int
    score: float
    inliers: int


class Localizer:
    """Frame + telemetry -> Estimate, with its own filter state (one instance per flight)."""

    def __init__(self, embedder: Embedder, cache, camera: CameraModel, cfg: LocalizerConfig | None = None,
                 initial_lonlat: tuple[float, float] | None = None):
        self.cfg = cfg = cfg or LocalizerConfig()
        check_model_matches_cache(embedder, cache)
        if cfg.top_k < 1:
            raise MeanNavError(f"localizer.top_k: must be at least 1, got {cfg.top_k}")
        self.embedder, self.cache, self.camera = embedder, cache, camera
        self.gsd_m = float(cache.gsd_m)
        self.tile_px = int(cache.tile_px)
        self.tile_size_m = float(cache.tile_size_m)
        self.margin_m = cfg.region_margin_m if cfg.region_margin_m is not None else self.tile_size_m / 2
        self.matcher = FeatureMatcher(dataclasses.replace(cfg.refine, min_inliers=cfg.min_inliers))
        self.filter = PositionFilter(cfg.filter)
        self.initial_lonlat = initial_lonlat
        self.had_fix = False
        self._region_features: OrderedDict[Any, tuple[Features, np.ndarray, float, float, int]] = OrderedDict()

    # --- public -----------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the track (e.g. after a long camera outage)."""
        self.filter.reset()

    def process(self, frame_rgb: np.ndarray | None, telemetry: Telemetry | None, frame_time_s: float) -> Estimate:
        started = time.perf_counter()
        est = self._process(frame_rgb, telemetry, float(frame_time_s))
        est.latency_s = time.perf_counter() - started
        return est

    # --- steps ------------------------------------------------------------------------
    def _process(self, frame, telemetry, t) -> Estimate:
        problem = self._check_frame(frame) or self._check_telemetry(telemetry, t)
        if problem:
            return self._no_fix(t, telemetry, problem)
        h = telemetry.height_above_ground_m
        query, valid = rectify_to_nadir(frame, self.camera, telemetry.roll, telemetry.pitch, telemetry.yaw,
                                        h, self.gsd_m, self.tile_px)
        if valid.mean() < self.cfg.min_valid_fraction:
            return self._no_fix(t, telemetry, f"camera sees only {valid.mean():.0%} of the tile area "
                                "(tilt or low altitude)")
        candidates = self._candidates(query, t)
        if self.cfg.always_retrieve:
            candidates = list(candidates)
        measurement, why = self._verify(query, valid, candidates, h)
        if measurement is None:
            return self._no_fix(t, telemetry, why)
        # attitude error moves the measured nadir by height x angle and drifts slowly: the
        # filter carries it as a shared bias instead of averaging it like white noise
        attitude_bias = h * math.tan(math.radians(self.cfg.attitude_sigma_deg))
        out = self.filter.update(t, np.array([measurement.x, measurement.y]), measurement.cov, attitude_bias)
        if not out.accepted:
            return self._no_fix(t, telemetry, out.reason, measurement)
        self.had_fix = True
        return self._estimate(t, telemetry, FixQuality.FIX, out.x, out.y, out.vx, out.vy, out.sigma_h_m,
                              out.sigma_speed_ms, measurement, "")

    def _check_frame(self, frame) -> str:
        if frame is None:
            return "no camera frame"
        if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            return "corrupt frame (expected HxWx3 uint8 RGB)"
        if frame.shape[:2] != (self.camera.height, self.camera.width):
            return (f"frame is {frame.shape[1]}x{frame.shape[0]} but the camera model is "
                    f"{self.camera.width}x{self.camera.height}")
        small = cv2.resize(frame, (64, 64), interpolation=cv2.INTER_AREA)
        grey = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
        if float(grey.std()) < self.cfg.min_frame_contrast:
            return "black or blank frame"
        return ""

    def _check_telemetry(self, tel: Telemetry | None, t: float) -> str:
        if tel is None:
            return "no telemetry"
        age = t - tel.time_s
        if not math.isfinite(age) or abs(age) > self.cfg.max_telemetry_age_s:
            return f"stale telemetry ({age:+.2f} s from the frame)"
        if not all(math.isfinite(v) for v in (tel.roll, tel.pitch, tel.yaw)):
            return "telemetry without attitude"
        h = tel.height_above_ground_m
        if not math.isfinite(h) or h < self.cfg.min_height_m:
            return f"height above ground {h:.1f} m below {self.cfg.min_height_m:g} m"
        # tilt of the body z axis from vertical
        tilt = math.degrees(math.acos(max(-1.0, min(1.0, math.cos(tel.roll) * math.cos(tel.pitch)))))
        if tilt > self.cfg.max_tilt_deg:
            return f"tilt {tilt:.0f} deg above {self.cfg.max_tilt_deg:g} deg"
        return ""

    def _candidates(self, query: np.ndarray, t: float) -> Iterator[_Candidate]:
        """Places to verify, best first. A generator: while tracking, the map around the
        prediction comes first, and the network runs only if that does not verify strongly
        (on a flight computer this halves the time per frame)."""
        cfg = self.cfg
        pred = self.filter.position_at(t)
        sigma68 = math.inf if pred is None else RADIUS68_PER_SIGMA * math.sqrt(np.trace(pred[1]) / 2)
        if pred is not None and sigma68 <= cfg.confident_sigma_m:
            px, py = float(pred[0][0]), float(pred[0][1])
            if cfg.verify_prediction:
                # verify around the nearest tile centre: its map features are cached, and a
                # region half a tile wider than the tile still contains the predicted view
                nearest = self.cache.tile_at(px, py) if hasattr(self.cache, "tile_at") else None
                if nearest is not None:
                    yield _Candidate(float(self.cache.x[nearest]), float(self.cache.y[nearest]),
                                     int(nearest), math.nan, ("tile", int(nearest)))
                else:
                    yield _Candidate(px, py, -1, math.nan, None)
            descriptor = self.embedder.embed([query])[0]
            lon, lat = self.cache.xy_to_lonlat(px, py)
            radius = cfg.search_radius_m + 3.0 * sigma68
            hits = self.cache.search_near(descriptor, lat, lon, radius, cfg.top_k)
        elif self.initial_lonlat is not None and not self.had_fix:
            descriptor = self.embedder.embed([query])[0]
            lon, lat = self.initial_lonlat
            hits = self.cache.search_near(descriptor, lat, lon, cfg.initial_radius_m, cfg.top_k)
        else:
            descriptor = self.embedder.embed([query])[0]
            hits = self.cache.search(descriptor, cfg.top_k)
        for hit in hits:
            yield _Candidate(float(hit.x), float(hit.y), int(hit.tile_id), float(hit.score),
                             ("tile", int(hit.tile_id)))

    def _region(self, cand: _Candidate, size_m: float) -> tuple[Features, Any, Any]:
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

    def _verify(self, query, valid, candidates: Iterable[_Candidate], height_m: float):
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
                reasons.append(result.reason)
                continue
            col, row = result.nadir_px
            ci, ri = int(round(col)), int(round(row))
            if not (0 <= ri < region_valid.shape[0] and 0 <= ci < region_valid.shape[1]) or not region_valid[ri, ci]:
                reasons.append("match places the nadir outside the map")
                continue
            if result.inliers > best_inliers:
                x, y = transform * (col + 0.5, row + 0.5)   # pixel centres sit at +0.5 of the corner
                # pixel covariance -> metric through the crop's linear part (row axis points south)
                linear = np.array([[transform.a, transform.b], [transform.d, transform.e]])
                cov = linear @ result.cov_px @ linear.T
                best = _Measurement(x, y, cov + self._model_variance(height_m) * np.eye(2),
                                    cand.tile_id, cand.score, result.inliers)
                best_inliers = result.inliers
                if best_inliers >= self.cfg.stop_at_inliers:
                    break
        if best is None:
            if not tried:
                return None, "no map tile near the expected position"
            why = reasons[0] if reasons else "no candidate verified"
            return None, f"geometric verification failed ({why})"
        return best, ""

    def _model_variance(self, height_m: float) -> float:
        """White measurement noise beyond the fit (the attitude part goes to the filter's bias)."""
        return self.cfg.position_floor_m ** 2

    # --- outputs ----------------------------------------------------------------------
    def _no_fix(self, t: float, telemetry: Telemetry | None, reason: str,
                measurement: _Measurement | None = None) -> Estimate:
        out = self.filter.predict(t)
        fix = FixQuality.COASTING if out.tracking else FixQuality.NONE
        if out.tracking:
            est = self._estimate(t, telemetry, fix, out.x, out.y, out.vx, out.vy, out.sigma_h_m,
                                 out.sigma_speed_ms, measurement, reason)
        else:
            est = Estimate(time_s=t, fix=fix, reason=reason)
            if measurement is not None:
                est.tile_id, est.score, est.inliers = measurement.tile_id, measurement.score, measurement.inliers
        return est

    def _estimate(self, t, telemetry, fix, x, y, vx, vy, sigma_h, sigma_speed, measurement, reason) -> Estimate:
        lon, lat = self.cache.xy_to_lonlat(x, y)
        alt = telemetry.alt_amsl_m if telemetry is not None else math.nan
        vd = telemetry.vd if telemetry is not None and math.isfinite(telemetry.vd) else 0.0
        est = Estimate(time_s=t, fix=fix, lat=float(lat), lon=float(lon), alt_m=float(alt),
                       vn=float(vy), ve=float(vx), vd=float(vd), sigma_h_m=float(sigma_h),
                       sigma_v_m=self.cfg.vertical_sigma_m, sigma_speed_ms=float(sigma_speed), reason=reason)
        if measurement is not None:
            est.tile_id, est.score, est.inliers = measurement.tile_id, measurement.score, measurement.inliers
        return est


def check_model_matches_cache(embedder: Embedder, cache) -> None:
    """Refuse a model whose descriptors the cache was not built with, or a cache without map pixels."""
    if int(embedder.dim) != int(cache.dim):
        raise MeanNavError(f"model descriptor size {embedder.dim} does not match the tile cache ({cache.dim}); "
                           "rebuild the cache with this model (`mean-nav cache build`) or use the cache's model")
    meta = getattr(cache, "meta", None)
    if isinstance(meta, dict) and not meta.get("maps"):
        raise MeanNavError(f"{getattr(cache, 'folder', 'tile cache')}: the cache holds no map pixels, which the "
                           "feature-matching refinement needs; rebuild it from the orthophotos with `mean-nav cache build`")
    cache_hash = getattr(cache, "model_hash", None)
    if cache_hash and embedder.model_hash != cache_hash:
        raise MeanNavError(f"model hash {embedder.model_hash} does not match the tile cache's {cache_hash}; "
                           "rebuild the cache with this model or use the model it was built with")
