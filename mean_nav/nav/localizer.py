"""The localizer: one camera frame + telemetry -> one Estimate.

Shared by the onboard daemon and the offline replay (which calls `process` frame by
frame), so both run exactly the same code. Steps:

  1. check the frame (corrupt, black) and the telemetry (missing, stale, implausible);
  2. rectify: undistort, warp to a nadir north-up view at the cache's ground resolution,
     centred on the nadir point (camera_model.rectify_to_nadir), as wide as the camera's
     footprint up to `view_tiles` tile sides: verification matches all of it, retrieval
     embeds its centre tile (what the network was trained on);
  3. acquire (acquisition.py): embed the view and search the tile cache near the filter's
     position when it tracks; without a track, around the prior (or the last track) with a
     radius that widens frame by frame up to the whole cache (while tracking, the map at the
     prediction is verified first and the network runs only if that is not conclusive);
  4. refine: geometric verification of the best tiles (and of the map around the
     filter's prediction) by feature matching; the query centre mapped into the map is
     the metric position of the nadir, and the camera pose solved from the matches
     (pose.py) measures the telemetry's tilt error beside it, with their covariance;
  5. filter (filter.py): constant-velocity Kalman filter bank with Mahalanobis gating and an
     online estimate of the attitude error (the tilt state, which the measured tilt makes
     observable); only a gated-in measurement gives FixQuality.FIX.

Low down (the camera sees less than `correlate.below_valid_fraction` of a tile) and while
the filter tracks confidently, steps 3-4 are replaced by area correlation with the map
around the prediction (correlate.py): too few keypoints fit in a small footprint. Where
even that has too few map pixels (or below `min_height_m`) the frame is `too_low`: the
daemon's output then holds the filter's propagated fix for `output.low_hold_s`.

Notices for the operator (a prior that disagrees with the map, a frame spacing the settings
cannot serve) go to `Localizer.on_notice(text)` when set (the daemon sends them as
STATUSTEXT), are kept in `Localizer.notices`, and are added to that frame's reason.

Time comes only from the arguments (frame_time_s, telemetry.time_s): replay is deterministic.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import cv2
import numpy as np

from ..deploy.embedder import Embedder
from ..config import bounded, validate
from ..errors import MeanNavError
from .camera_model import CameraModel, gimbal_attitude, rectify_to_nadir
from .correlate import CorrelateConfig, correlate
from .estimate import Estimate, FixQuality
from .acquisition import Acquisition
from .filter import RADIUS68_PER_SIGMA, FilterConfig, PositionFilter, radius68_of
from .pose import CAMERA_MODEL_ERROR_RAD
from .refine import RefineConfig
from .stages import StageTimes, TimedEmbedder
from .telemetry import Telemetry
from .verify import Measurement, Verifier, centre_crop

log = logging.getLogger(__name__)


# default white error of a fix beyond the fit, with and without the pose fit (position_floor_m)
POSE_POSITION_FLOOR_M = 0.03
NADIR_POSITION_FLOOR_M = 0.4


@dataclass
class LocalizerConfig:
    top_k: int = bounded(4, ge=1, le=1000)  # retrieved tiles verified per frame
    # ... and per frame without a track (the true tile ranks lower over an unfamiliar map)
    lost_top_k: int = bounded(8, ge=1, le=1000)
    # added to the filter's 3-sigma radius when searching near it
    search_radius_m: float = bounded(60.0, ge=0, le=1e5, unit="m")
    # a motion mode's 68 % radius below which its prediction is the place verified first (else
    # the track's mean) and weak fits near it count (track_min_inliers)
    confident_sigma_m: float = bounded(30.0, gt=0, le=1e4, unit="m")
    # search radius around initial_lonlat before the first fix
    initial_radius_m: float = bounded(500.0, gt=0, le=1e6, unit="m")
    min_inliers: int = bounded(15, ge=3, le=100_000)  # feature inliers for a verified match
    # while a motion mode of the track predicts within confident_sigma_m, a fit that passes that
    # mode's gate needs only this many: the track says where the place must be, and a wrong place
    # seldom gives 5 consistent inliers; a weaker fit off the track is no place (it never starts
    # or breaks a track)
    track_min_inliers: int = bounded(10, ge=3, le=100_000)
    # a candidate this strong ends the verification early: while tracking, the prediction's
    # map verified this well skips the network (40: half the per-frame time of 80, same fixes)
    stop_at_inliers: int = bounded(40, ge=1, le=1_000_000)
    # map margin around a candidate; default half a tile
    region_margin_m: float | None = bounded(None, ge=0, le=1e4, unit="m")
    verify_prediction: bool = True      # also verify the map around the filter's prediction
    always_retrieve: bool = False       # run the network even when the prediction verifies strongly
    max_telemetry_age_s: float = bounded(0.25, gt=0, le=60, unit="s")  # |frame time - telemetry time| allowed
    min_height_m: float = bounded(5.0, ge=0, le=10_000, unit="m")
    max_tilt_deg: float = bounded(35.0, gt=0, lt=90, unit="deg")
    min_valid_fraction: float = bounded(0.3, ge=0, le=1)  # rectified view pixels the camera actually saw
    # grey-level std below this: black, blank or covered lens
    min_frame_contrast: float = bounded(4.0, ge=0, le=255, unit="grey levels")
    # measurement noise beyond the fit itself (per axis, 1 sigma)
    # roll/pitch accuracy of the autopilot if known: only a prior, the filter estimates it online
    attitude_sigma_deg: float | None = bounded(None, gt=0, le=45, unit="deg")
    # white error of a fix beyond the fit (and the pose): terrain relief, map registration.
    # None: 0.03 m with the pose fit (the nadir is located to ~5 cm on the field flights; the
    # attitude part is the pose's), 0.4 m without it (the nadir-only fixes of the same flights)
    position_floor_m: float | None = bounded(None, gt=0, le=1000, unit="m")
    # the camera model's own error (focal length, distortion, ground not quite flat) as an angle:
    # it moves the pose fit's camera centre by this x height (1 sigma per axis; pose.py). 0.5:
    # calibrated on the field suite; raise it for a roughly calibrated camera or hilly ground
    camera_model_error_mrad: float = bounded(CAMERA_MODEL_ERROR_RAD * 1e3, ge=0, le=100, unit="mrad")
    # solve the camera pose from the verified matches (pose.py): measures the camera centre and
    # the telemetry's tilt error instead of the nadir alone. None: on for SIFT, whose keypoint
    # errors the pose covariance is calibrated on; off for ORB and XFeat (with XFeat it reported
    # radii 2-3x too small: 34 false fixes in 899 frames of the field suite's 30 Hz video)
    pose_fit: bool | None = None
    # white attitude error of each frame beyond the slow one the filter tracks (camera/IMU
    # timing, vibration), on top of the interpolation error telemetry reports: the measured
    # tilt of one frame is not the next frame's
    attitude_jitter_deg: float = bounded(0.2, ge=0, le=10, unit="deg")
    # a frame whose attitude is interpolated across a step this uncertain (RMS; a step of twice
    # this between two telemetry samples, met mid-way) gives no fix: rectified that far off, its
    # pose fit claimed a camera centre 2.9-8 m wrong within 0.4 m (the field suite's false fixes
    # at a roll into a 25 deg bank, 20 Hz telemetry). 20-50 Hz attitude keeps it rare
    max_attitude_interp_deg: float = bounded(2.0, gt=0, le=90, unit="deg")
    # altitude comes from the autopilot, not from vision
    vertical_sigma_m: float = bounded(3.0, gt=0, le=1000, unit="m")
    # map-feature chunks (about a region each) kept in memory when the cache stores no map
    # features and they are computed in flight
    feature_cache_tiles: int = bounded(64, ge=1, le=1_000_000)
    # fraction of the rectified view that must lie on valid map (the nadir itself may not)
    min_map_overlap: float = bounded(0.25, gt=0, le=1)
    # a fit turned far from the known heading error needs this many inliers, and a second such
    # fit within heading_confirm_s at a place reachable at filter.max_speed_ms, before it is believed
    heading_min_inliers: int = bounded(40, ge=3, le=100_000)
    heading_confirm_s: float = bounded(30.0, gt=0, le=3600, unit="s")
    # while lost, search over heading (the view turned in 45 deg steps) at most this often;
    # the interval doubles with each search that finds nothing
    heading_search_s: float = bounded(3.0, ge=0, le=3600, unit="s")
    # without a track, a fit whose two halves (split at the nadir) verify apart at the same place
    # starts a track in this one frame: two independent sub-views, like two agreeing frames
    confirm_in_one_frame: bool = True
    # side of the rectified view verification matches, at most, in tile sides: the whole camera
    # footprint up to this (a 60 m tile crops 2/3 of what a camera 100 m up sees, and with it the
    # texture a low-contrast or half-off-map frame needs); retrieval embeds the centre tile
    view_tiles: float = bounded(2.0, ge=1, le=8)
    # verify the centre tile first and the whole footprint only where that verified nothing
    # (half off the map, nodata holes, low contrast): the footprint costs ~2x CPU per frame
    centre_first: bool = True
    refine: RefineConfig = field(default_factory=RefineConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    correlate: CorrelateConfig = field(default_factory=CorrelateConfig)

    def uses_pose_fit(self) -> bool:
        """pose_fit as set, or its default for the detector (see pose_fit)."""
        return self.pose_fit if self.pose_fit is not None else self.refine.detector == "sift"

    def fix_floor_m(self) -> float:
        """position_floor_m as set, or its default with / without the pose fit."""
        if self.position_floor_m is not None:
            return self.position_floor_m
        return POSE_POSITION_FLOOR_M if self.uses_pose_fit() else NADIR_POSITION_FLOOR_M


class Localizer:
    """Frame + telemetry -> Estimate, with its own filter state (one instance per flight)."""

    def __init__(self, embedder: Embedder, cache, camera: CameraModel, cfg: LocalizerConfig | None = None,
                 initial_lonlat: tuple[float, float] | None = None):
        self.cfg = cfg = cfg or LocalizerConfig()
        check_model_matches_cache(embedder, cache)
        validate(cfg, "localizer")  # configs built in code skip the YAML checks
        self.embedder, self.cache, self.camera = embedder, cache, camera
        self.gsd_m = float(cache.gsd_m)
        self.tile_px = int(cache.tile_px)
        # the widest view: view_tiles tile sides, with the tile's parity so the tile is its exact centre
        self.view_px = max(self.tile_px, int(round(cfg.view_tiles * self.tile_px)))
        self.view_px += (self.view_px - self.tile_px) % 2
        self.stages = StageTimes()
        self.acquisition = Acquisition(cfg, TimedEmbedder(embedder, self.stages), cache, initial_lonlat)
        self.verifier = Verifier(cfg, cache, self.stages)
        self.filter = PositionFilter(cfg.filter, attitude_prior_deg=cfg.attitude_sigma_deg)
        self.on_notice: Callable[[str], None] | None = None   # e.g. the daemon's STATUSTEXT
        self.notices: list[str] = []
        self._last_frame_t: float | None = None
        self._spacing_warned = False
        # the last frame was below the visual floor: under min_height_m, or so low that the
        # footprint holds fewer than correlate.min_footprint_px map pixels (nadir view)
        self.too_low = False
        area_px = camera.width * camera.height / (camera.fx * camera.fy) / self.gsd_m ** 2   # per m^2 of height
        self.visual_floor_m = max(cfg.min_height_m, math.sqrt(cfg.correlate.min_footprint_px / area_px)
                                  if cfg.correlate.enabled else 0.0)

    def frame_spacing_problems(self, spacing_s: float) -> list[str]:
        """Why frames `spacing_s` seconds apart cannot be served by these settings (empty:
        they can). Replay asks before the first frame; the daemon gets a notice instead."""
        return self.filter.spacing_problems(spacing_s)

    # --- public -----------------------------------------------------------------------
    def warm_up(self) -> float:
        """Pay the frame path's first-use set-up now (the inference session's first run, the
        cache's search index, the feature detector, the 68 % radius table) rather than inside
        the first frame in flight; changes no state. Returns the seconds it took."""
        started = time.perf_counter()
        view = np.random.default_rng(0).integers(0, 256, (self.view_px, self.view_px, 3), dtype=np.uint8)
        descriptor = self.embedder.embed([centre_crop(view, self.tile_px)])[0]
        if len(self.cache):
            self.cache.search_approx(descriptor, 1)
        self.verifier.matcher.features(view)
        radius68_of(np.eye(2))
        return time.perf_counter() - started

    def reset(self) -> None:
        """Forget the track (e.g. after a long camera outage)."""
        self.filter.reset()

    def _notice(self, text: str) -> None:
        log.warning("%s", text)
        self.notices.append(text)
        if self.on_notice is not None:
            self.on_notice(text)

    def process(self, frame_rgb: np.ndarray | None, telemetry: Telemetry | None, frame_time_s: float) -> Estimate:
        started = time.perf_counter()
        self.stages.reset()
        est = self._process(frame_rgb, telemetry, float(frame_time_s))
        est.latency_s = time.perf_counter() - started
        return est

    # --- steps ------------------------------------------------------------------------
    def _process(self, frame, telemetry, t) -> Estimate:
        notice = self._check_spacing(t)
        est = self._localize(frame, telemetry, t)
        notice = "; ".join(n for n in (notice, self.acquisition.record(t, self._verified_xy, self.filter)) if n)
        if notice:
            self._notice(notice)
            est.reason = f"{est.reason}; {notice}" if est.reason else notice
        return est

    def _check_spacing(self, t: float) -> str:
        """Warn once when the frames arrive further apart than the settings can serve."""
        last, self._last_frame_t = self._last_frame_t, t
        if last is None or self._spacing_warned:
            return ""
        problems = self.frame_spacing_problems(t - last)
        self._spacing_warned = bool(problems)
        return "; ".join(problems)

    def _localize(self, frame, telemetry, t) -> Estimate:
        self._verified_xy = None
        h = telemetry.height_above_ground_m if telemetry is not None else math.nan
        self.too_low = math.isfinite(h) and h < self.visual_floor_m
        problem = self._check_frame(frame) or self._check_telemetry(telemetry, t)
        if problem:
            return self._no_fix(t, telemetry, problem)
        # a known heading error: rectify with the corrected yaw (one resampling, the view comes
        # out north-up on the map's pixel grid) rather than match a view turned against it
        heading = self.verifier.heading
        turn = heading.offset_deg if abs(heading.offset_deg) >= 1.0 else 0.0
        with heading.in_turned_view(turn):
            return self._localize_view(frame, telemetry, t, turn)

    def _localize_view(self, frame, telemetry, t, turn_deg: float) -> Estimate:
        h = telemetry.height_above_ground_m
        gimbal = gimbal_attitude(telemetry)
        yaw = telemetry.yaw + math.radians(turn_deg)
        if gimbal is not None:
            gimbal = (gimbal[0], gimbal[1], gimbal[2] + math.radians(turn_deg))
        with self.stages("rectify"):
            query, valid = rectify_to_nadir(frame, self.camera, telemetry.roll, telemetry.pitch, yaw,
                                            h, self.gsd_m, self.view_px, gimbal=gimbal)
            query, valid = footprint_view(query, valid, self.tile_px)
        tile_valid = centre_crop(valid, self.tile_px)
        why_not_correlated = ""
        if self.cfg.correlate.enabled and tile_valid.mean() < self.cfg.correlate.below_valid_fraction:
            measurement, why_not_correlated = self._correlate(query, valid, t)
            if measurement is not None:
                return self._fuse(t, telemetry, measurement, h)
        if tile_valid.mean() < self.cfg.min_valid_fraction:
            why = f"camera sees only {tile_valid.mean():.0%} of the tile area (tilt or low altitude)"
            return self._no_fix(t, telemetry, f"{why}; {why_not_correlated}" if why_not_correlated else why)

        def retrieve(view):
            return self.acquisition.candidates(centre_crop(view, self.tile_px), t, self.filter)

        candidates = retrieve(self.verifier.north_up(query))
        if self.cfg.always_retrieve:
            candidates = list(candidates)
        tracking = self.filter.tracking
        agrees = None
        # a weak fit counts where a motion mode predicts it tightly (photos seconds apart leave
        # only the manoeuvre mode wide): checked against those modes alone
        confident = self.cfg.confident_sigma_m
        if tracking and min(self.filter.mode_radii_at(t), default=math.inf) <= confident:
            def agrees(m: Measurement) -> bool:
                return self.filter.mahalanobis2(t, (m.x, m.y), m.cov, h, within_m=confident) <= self.cfg.filter.gate_chi2
        measurement, why = self.verifier.verify(query, valid, candidates, h, t, retrieve, agrees)
        if measurement is None:
            if not tracking and self.acquisition.search:
                why = f"{why}; {self.acquisition.search}"
            return self._no_fix(t, telemetry, why)
        return self._fuse(t, telemetry, measurement, h)

    def _correlate(self, query, valid, t) -> tuple[Measurement | None, str]:
        """Area correlation around a confident prediction (low down)."""
        pred = self.filter.position_at(t)
        if pred is None:
            return None, ""
        sigma = math.sqrt(max(float(np.trace(pred[1])) / 2.0, 0.0))
        if RADIUS68_PER_SIGMA * sigma > self.cfg.confident_sigma_m:
            return None, ""
        if abs(self.verifier.heading.offset_deg) >= 1.0:   # the view as the map shows it
            query = self.verifier.north_up(query)
            valid = self.verifier.north_up(valid.astype(np.uint8) * 255) > 127
        with self.stages("correlate"):
            found, why = correlate(query, valid, self.cache, (float(pred[0][0]), float(pred[0][1])), sigma,
                                   self.cfg.correlate)
        if found is None:
            return None, f"low-altitude correlation: {why}"
        cov = found.cov + self.cfg.fix_floor_m() ** 2 * np.eye(2)
        return Measurement(found.x, found.y, cov, -1, found.score, 0, map_overlap=1.0), ""

    def _fuse(self, t, telemetry, measurement: Measurement, h: float) -> Estimate:
        self._verified_xy = (measurement.x, measurement.y)
        # measured on a view rectified with the corrected yaw: the telemetry's own error is that plus the turn
        if math.isfinite(measurement.heading_error_deg):
            measurement.heading_error_deg = self.verifier.heading.telemetry_error_deg(measurement.heading_error_deg)
        # the attitude interpolated between telemetry samples across a change it cannot time
        # is off for this one frame: white error, not the slow attitude bias the filter tracks.
        # That slow error moves the measured nadir by height x angle: the filter carries it as
        # a shared error (and estimates its size, helped by the tilt the pose fit measures)
        jitter = math.hypot(telemetry.attitude_interp_sigma_rad, math.radians(self.cfg.attitude_jitter_deg))
        z, R = measurement.for_filter(h, jitter)
        with self.stages("filter"):
            if measurement.earlier is not None and not self.filter.tracking:
                # the first frame of a heading error this frame confirmed: a start-up fix
                t0, h0, m0 = measurement.earlier
                self.filter.update(t0, *m0.for_filter(h0, math.radians(self.cfg.attitude_jitter_deg)), h0)
            out = self.filter.update(t, z, R, h, confirmed=measurement.two_views)
        if not out.accepted:
            return self._no_fix(t, telemetry, out.reason, measurement)
        return self._estimate(t, telemetry, FixQuality.FIX, out.x, out.y, out.vx, out.vy, out.sigma_h_m,
                              out.sigma_speed_ms, measurement, out.reason)

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
        step = math.degrees(tel.attitude_interp_sigma_rad)
        if step > self.cfg.max_attitude_interp_deg:
            return (f"attitude uncertain by {step:.1f} deg (interpolated across a step between telemetry samples; "
                    f"localizer.max_attitude_interp_deg {self.cfg.max_attitude_interp_deg:g}): no fix from this frame")
        return ""

    # --- outputs ----------------------------------------------------------------------
    def _no_fix(self, t: float, telemetry: Telemetry | None, reason: str,
                measurement: Measurement | None = None) -> Estimate:
        out = self.filter.predict(t)
        if out.reason and not out.tracking and out.reason != "no track":
            reason = f"{reason}; {out.reason}"
        if out.vague:
            reason = (f"{reason}; coasting 68% radius {out.sigma_h_m:.0f} m above filter.max_sigma_m "
                      f"{self.cfg.filter.max_sigma_m:g} m")
        fix = FixQuality.COASTING if out.tracking and not out.vague else FixQuality.NONE
        if fix == FixQuality.COASTING:
            est = self._estimate(t, telemetry, fix, out.x, out.y, out.vx, out.vy, out.sigma_h_m,
                                 out.sigma_speed_ms, measurement, reason)
        else:
            est = Estimate(time_s=t, fix=fix, reason=reason, attitude_sigma_deg=self.filter.attitude_sigma_deg)
            if measurement is not None:
                est.tile_id, est.score, est.inliers = measurement.tile_id, measurement.score, measurement.inliers
        return est

    def _estimate(self, t, telemetry, fix, x, y, vx, vy, sigma_h, sigma_speed, measurement, reason) -> Estimate:
        lon, lat = self.cache.xy_to_lonlat(x, y)
        alt = telemetry.alt_amsl_m if telemetry is not None else math.nan
        vd = telemetry.vd if telemetry is not None and math.isfinite(telemetry.vd) else 0.0
        est = Estimate(time_s=t, fix=fix, lat=float(lat), lon=float(lon), alt_m=float(alt),
                       vn=float(vy), ve=float(vx), vd=float(vd), sigma_h_m=float(sigma_h),
                       sigma_v_m=self.cfg.vertical_sigma_m, sigma_speed_ms=float(sigma_speed), reason=reason,
                       attitude_sigma_deg=self.filter.attitude_sigma_deg)
        if measurement is not None:
            est.tile_id, est.score, est.inliers = measurement.tile_id, measurement.score, measurement.inliers
            est.heading_error_deg = measurement.heading_error_deg
        return est


def footprint_view(view: np.ndarray, valid: np.ndarray, min_px: int) -> tuple[np.ndarray, np.ndarray]:
    """The smallest centred square of a rectified view that holds every pixel the camera saw,
    at least min_px (same parity as the view, so the nadir stays its centre): a view wider
    than the footprint only adds map features the query cannot match."""
    n = valid.shape[0]
    rows, cols = np.nonzero(valid.any(axis=1))[0], np.nonzero(valid.any(axis=0))[0]
    if len(rows) == 0:
        return centre_crop(view, min_px), centre_crop(valid, min_px)
    c = (n - 1) / 2.0
    half = max(c - rows[0], rows[-1] - c, c - cols[0], cols[-1] - c)
    side = min(n, max(min_px, int(math.ceil(2 * half + 1))))
    side += (n - side) % 2
    return centre_crop(view, side), centre_crop(valid, side)


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
