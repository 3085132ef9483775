"""Verification: geometric check of candidate map places by local-feature matching.

For each candidate the query's features are matched against the map features of the
region around it (stored in the cache, or computed in flight: geo/map_features.py), a
similarity is fitted (refine.py), and the fit is accepted when enough of the rectified
footprint lies on the map: the nadir itself may be off the map or over a nodata hole.

Heading: the rectified view is turned by whatever error the telemetry yaw has (a bad
compass, photos rotated by a viewer, unknown yaw). The fit measures that turn. Small
turns from the heading error known so far are accepted as they are; a large one is a
claim that needs strong evidence: a fit with many inliers, confirmed by a second frame
that turns the same way at a consistent place, before it becomes the known heading error.
Retrieval embeds the view turned by the known heading error. While lost, at most every
`heading_search_s`, a heading search embeds the view turned in 45 degree steps and verifies
the best places any turn retrieved (the network is not rotation invariant; SIFT is, and
XFeat features are taken from the view turned like the one that retrieved the place).

The best verified candidate becomes the metric measurement of the camera nadir, with a
covariance from the fit plus the white error beyond it. With `pose_fit` the camera pose is
solved from the fit's inliers (pose.py): the measurement then also holds the telemetry's
tilt error (`Measurement.tilt`, joint covariance `pose_cov`), which the filter's tilt state
needs to tell the camera centre from the nadir. Matches are fitted without the detector's
own keypoint offset (SIFT's 0.25 px: it does not turn with a turned view).
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

import cv2
import numpy as np

from ..geo.map_features import low_contrast_source, map_feature_source
from .acquisition import Candidate
from .features import Features
from .pose import MAX_TILT_ERROR_DEG, PoseFit, fit_pose
from .refine import FeatureMatcher, MatchResult, angle_difference_deg
from .stages import StageTimes

if TYPE_CHECKING:
    from .localizer import LocalizerConfig

FOOTPRINT_STEP_PX = 12      # query pixels sampled to measure how much of the footprint is on the map
HEADING_STEP_DEG = 45.0     # turns of the query tried by the heading search (retrieval tolerates less)
# the centre tile is verified first (localizer.centre_first) where the camera saw this much of it
CENTRE_FIRST_MIN_VALID = 0.75
# ... and its fit stands where this much of the centre tile lies on the map, or 3/4 with
# stop_at_inliers (else the footprint's: a fit on part of the tile is worse)
CENTRE_FIRST_MIN_OVERLAP = 0.95
# ... and only where the camera saw at most this many tile areas: higher up the footprint is
# much wider than the tile, and the pose fit on the centre tile alone pins tilt, and with it
# the position, 3-6x worse (attitude_2deg_150m: 1.02 m against 0.16 m on the footprint)
CENTRE_FIRST_MAX_SEEN_TILES = 2.25


@dataclass
class Measurement:
    x: float
    y: float
    cov: np.ndarray
    tile_id: int
    score: float
    inliers: int
    heading_error_deg: float = math.nan   # telemetry yaw minus the yaw the map shows (the view's turn, negated)
    map_overlap: float = math.nan          # fraction of the rectified footprint on valid map
    # the two halves of the view verified apart at this place: evidence as independent as a
    # second frame's, so it may start a track alone (checked only without a confident track)
    two_views: bool = False
    # (time s, height m, fit) of an earlier frame this one confirms (a new heading error's first
    # frame): the pair may start a track as two agreeing start-up fixes would
    earlier: "tuple[float, float, Measurement] | None" = None
    # the telemetry's tilt error the pose fit measured (east, north, ~radians; pose.py) and the
    # 4x4 covariance of [x, y, tilt]; None where only the similarity located the nadir
    tilt: np.ndarray | None = None
    pose_cov: np.ndarray | None = None

    def for_filter(self, height_m: float, attitude_jitter_rad: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """(z, R) for PositionFilter.update: the nadir, and the tilt error where it was measured.

        `attitude_jitter_rad`: an error of this frame's attitude alone (interpolated across a
        step): white, not the slow error the filter tracks; it moves the nadir by height x
        tan(angle) and the measured tilt by the angle, so the camera centre stays measured."""
        j = math.tan(min(max(attitude_jitter_rad, 0.0), math.radians(80))) ** 2
        if self.tilt is None:
            return np.array([self.x, self.y]), self.cov + height_m ** 2 * j * np.eye(2)
        link = np.array([[height_m, 0.0], [0.0, height_m], [1.0, 0.0], [0.0, 1.0]])
        return np.array([self.x, self.y, *self.tilt]), self.pose_cov + j * link @ link.T


@dataclass
class _Proposal:
    rotation_deg: float
    time_s: float
    x: float
    y: float
    measurement: Measurement | None = None
    height_m: float = math.nan


@dataclass
class _View:
    """One view verification matches (the centre tile or the whole footprint) and its features per turn."""
    query: np.ndarray
    valid: np.ndarray
    centre: float                 # the nadir's query pixel (col = row)
    footprint: np.ndarray         # query pixels sampled where the camera saw ground
    size_m: float                 # side of the map region matched around a candidate
    extracted: dict = dataclasses.field(default_factory=dict)


class HeadingTracker:
    """The heading error known so far, and the evidence for a new one."""

    def __init__(self, cfg: "LocalizerConfig"):
        self.cfg = cfg
        self.offset_deg = 0.0
        self._proposal: _Proposal | None = None
        self.view_turn_deg = 0.0    # inside in_turned_view: how far the view is already turned

    @contextlib.contextmanager
    def in_turned_view(self, turn_deg: float):
        """Work on a view already turned by `turn_deg` (rectified with the corrected yaw):
        inside, the known offset and any proposal are relative to that view."""
        self._shift(-turn_deg)
        self.view_turn_deg = turn_deg
        try:
            yield
        finally:
            self.view_turn_deg = 0.0
            self._shift(turn_deg)

    def telemetry_error_deg(self, view_error_deg: float) -> float:
        """A heading error measured on the current view as the telemetry's own (the view's turn added)."""
        return _wrap(view_error_deg - self.view_turn_deg)

    def _shift(self, deg: float) -> None:
        self.offset_deg = _wrap(self.offset_deg + deg)
        if self._proposal is not None:
            self._proposal = dataclasses.replace(self._proposal, rotation_deg=_wrap(self._proposal.rotation_deg + deg))

    def pending_deg(self, t: float) -> float | None:
        """The turn a proposal not yet confirmed measured, while a frame at `t` may still confirm it."""
        p = self._proposal
        if p is None or not (math.isfinite(t) and 0.0 < t - p.time_s <= self.cfg.heading_confirm_s):
            return None
        return p.rotation_deg

    def follow(self, rotation_deg: float) -> None:
        """A verified fit near the known heading error: track slow changes of it."""
        self.offset_deg = _wrap(self.offset_deg + 0.3 * angle_difference_deg(rotation_deg, self.offset_deg))

    def propose(self, rotation_deg: float, t: float, x: float, y: float,
                measurement: Measurement | None = None, height_m: float = math.nan) -> _Proposal | None:
        """A strong fit turned far from the known heading error; once a second frame confirms
        it, the first frame's proposal (else None)."""
        cfg, prev = self.cfg, self._proposal
        agrees = prev is not None and \
            abs(angle_difference_deg(rotation_deg, prev.rotation_deg)) <= cfg.refine.max_rotation_deg
        if agrees and 0.0 <= t - prev.time_s < cfg.filter.measurement_correlation_s:
            return None   # the next video frame shares the fit's error: wait on the earlier one
        self._proposal = _Proposal(rotation_deg, t, x, y, measurement, height_m)
        if prev is None or not 0.0 < t - prev.time_s <= cfg.heading_confirm_s:
            return None
        reachable = math.hypot(x - prev.x, y - prev.y) <= cfg.filter.max_speed_ms * (t - prev.time_s) + cfg.search_radius_m
        if agrees and reachable:
            self.offset_deg = _wrap(rotation_deg)
            self._proposal = None
            return prev
        return None


def _wrap(deg: float) -> float:
    return (deg + 180.0) % 360.0 - 180.0


class Verifier:
    """Matches a rectified query against the map around each candidate."""

    def __init__(self, cfg: "LocalizerConfig", cache, stages: StageTimes | None = None):
        self.cfg, self.cache = cfg, cache
        self.stages = stages or StageTimes()
        self.tile_px = int(cache.tile_px)
        self.tile_size_m = float(cache.tile_size_m)
        self.margin_m = cfg.region_margin_m if cfg.region_margin_m is not None else self.tile_size_m / 2
        self.matcher = FeatureMatcher(dataclasses.replace(cfg.refine, min_inliers=cfg.min_inliers))
        self.map_features = map_feature_source(cache, cfg.refine, max_chunks=cfg.feature_cache_tiles)
        self.low_contrast_map = low_contrast_source(cache, cfg.refine, max_chunks=cfg.feature_cache_tiles) \
            if cfg.refine.map_low_contrast_retry else None
        self.heading = HeadingTracker(cfg)
        self._last_heading_search_s = -math.inf
        self._heading_searches_since_fit = 0
        self.rotation_invariant = bool(getattr(self.matcher.extractor, "rotation_invariant", False))

    def region(self, cand: Candidate, size_m: float, source=None):
        """Map features around a candidate (region pixels), where the region has map, and its
        pixel-corner -> metric transform; from `source` (default the cache's map features)."""
        c0, r0, size_px = self.cache.region_window(cand.x, cand.y, size_m)
        with self.stages("map features"):
            features, on_map = (source or self.map_features).region(c0, r0, size_px, size_px)
        return features, on_map, self.cache.grid.transform(c0, r0)

    def query_features(self, query: np.ndarray, valid: np.ndarray, turn_deg: float) -> Features:
        """Query features in query pixels; non-invariant features are taken from the view turned
        by `turn_deg` (so it lies about north-up) and mapped back (`match_points` keeps them turned)."""
        if self.rotation_invariant or abs(turn_deg) < 1.0:
            return self.matcher.features(query, valid)
        h, w = valid.shape
        M = _turn_matrix(turn_deg, (w / 2.0 - 0.5, h / 2.0 - 0.5))
        turned = cv2.warpAffine(query, M, (w, h), flags=cv2.INTER_LINEAR)
        turned_valid = cv2.warpAffine(valid.astype(np.uint8), M, (w, h), flags=cv2.INTER_NEAREST) > 0
        feats = self.matcher.features(turned, turned_valid)
        back = cv2.invertAffineTransform(M)
        feats.match_points = feats.points   # LighterGlue matches them where they lie north-up
        feats.points = (feats.points @ back[:, :2].T + back[:, 2]).astype(np.float32)
        return feats

    def north_up(self, query: np.ndarray) -> np.ndarray:
        """The query turned by the known heading error: what retrieval should embed."""
        if abs(self.heading.offset_deg) < 1.0:
            return query
        h, w = query.shape[:2]
        return cv2.warpAffine(query, _turn_matrix(self.heading.offset_deg, (w / 2.0 - 0.5, h / 2.0 - 0.5)), (w, h),
                              flags=cv2.INTER_LINEAR)

    def verify(self, query, valid, candidates: Iterable[Candidate], height_m: float, t: float = math.nan,
               retrieve: Callable[[np.ndarray], Iterable[Candidate]] | None = None,
               agrees: Callable[[Measurement], bool] | None = None):
        """(best Measurement or None, reason when None) for one rectified query.

        `retrieve(view)` gives candidates for another view of the query (the localizer's
        acquisition); when nothing verifies, it drives the search over heading: the query
        turned in HEADING_STEP_DEG steps, at most every `heading_search_s` while lost.
        `agrees(measurement)` (the gate of a confident track, while there is one) lets a fit
        with `track_min_inliers` to `min_inliers` inliers count when the track agrees with it;
        such a track also holds the heading error: a turned fit then proposes nothing (a turned
        copy of the ground, e.g. the point-mirrored surroundings of a map corner, looks like a
        heading change for several frames; a real one shows once the track grows vague).
        """
        reasons: list[str] = []
        strong_turns: list[tuple[MatchResult, Measurement]] = []
        tried: list[tuple[float, float]] = []
        seen: list[Candidate] = []
        views = self._views(query, valid)

        def on(view: _View, turn: float, cands: Iterable[Candidate]):
            key = 0.0 if self.rotation_invariant else turn     # invariant features: detect once
            if key not in view.extracted:
                with self.stages("query features"):
                    view.extracted[key] = self.query_features(view.query, view.valid, turn)
            query_features = view.extracted[key]
            m, region = self._best(query_features, view.footprint, cands, view.centre, view.size_m, height_m,
                                   reasons, strong_turns, tried if self.rotation_invariant else [], agrees)
            return m, (query_features, region, view.centre)

        def attempt(turn: float, cands: Iterable[Candidate]):
            """The best fit of `cands` at `turn`: on the centre tile first where that is tried;
            on the whole footprint where the centre verified nothing or lies partly off the map
            (its fit then rests on a part of the tile: the footprint's is better)."""
            if len(views) == 1:
                found = on(views[0], turn, cands)
            else:
                again: list[Candidate] = []
                marks = len(reasons), len(strong_turns), len(tried)
                rest = _remember(cands, again)
                found = on(views[0], turn, rest)
                if not self._centre_fit_stands(found[0]):
                    del reasons[marks[0]:], strong_turns[marks[1]:], tried[marks[2]:]
                    wide = on(views[1], turn, itertools.chain(again, rest))
                    found = wide if wide[0] is not None or found[0] is None else found
            if found[0] is not None:
                self.heading.follow(-found[0].heading_error_deg)
            return found

        best, fitted = attempt(self.heading.offset_deg, _remember(candidates, seen))
        pending = self.heading.pending_deg(t)
        if best is None and retrieve is not None and not self.rotation_invariant and pending is not None \
                and abs(angle_difference_deg(pending, self.heading.offset_deg)) > self.cfg.refine.max_rotation_deg:
            # features that are not rotation invariant show a proposed turn only from a view
            # turned by it: try it on the next frames, not at the next (backed-off) heading search
            best, fitted = attempt(pending, _remember(self._turned_view_candidates(query, retrieve, pending), seen))
        if best is None and retrieve is not None and self._heading_search_due(t):
            self._last_heading_search_s = t
            self._heading_searches_since_fit += 1
            for turn, cands in self._turned_candidates(query, retrieve):
                best, fitted = attempt(turn, cands)
                if best is not None:
                    break
        if best is not None:
            self._heading_searches_since_fit = 0
            if agrees is None and self.cfg.confirm_in_one_frame:
                with self.stages("match"):
                    best.two_views = self._halves_agree(*fitted)
            return best, ""
        if strong_turns and agrees is not None:
            result, _ = max(strong_turns, key=lambda rm: rm[0].inliers)
            reasons.insert(0, f"view turned {_wrap(result.rotation_deg + self.heading.view_turn_deg):.0f} deg against the map with {result.inliers} "
                              f"inliers: the track holds the heading error of "
                              f"{int(round(self.heading.telemetry_error_deg(-self.heading.offset_deg)))} deg")
        elif strong_turns:
            result, m = max(strong_turns, key=lambda rm: rm[0].inliers)
            first = self.heading.propose(result.rotation_deg, t, m.x, m.y, m, height_m)
            if first is not None:
                self._heading_searches_since_fit = 0
                if first.measurement is not None:
                    m.earlier = (first.time_s, first.height_m, first.measurement)
                return m, ""
            reasons.insert(0, f"view turned {_wrap(result.rotation_deg + self.heading.view_turn_deg):.0f} deg against the map with "
                              f"{result.inliers} inliers: heading error not yet confirmed by a second frame")
        if not seen and not reasons:
            return None, "no map tile near the expected position"
        # every candidate's reason: the first alone hides what the others met
        why = "; ".join(dict.fromkeys(reasons)) if reasons else "no candidate verified"
        return None, f"geometric verification failed for {len(reasons)} candidates ({why})"

    def _views(self, query: np.ndarray, valid: np.ndarray) -> list["_View"]:
        """The views verification matches, cheapest first: the centre tile (what retrieval
        embedded) where the footprint is wider and the camera saw most of that tile, then the
        whole footprint. Most frames verify on the centre tile; the footprint's texture is
        paid for only where it failed (half off the map, over nodata holes, low contrast)."""
        views = []
        seen_tiles = float(np.count_nonzero(valid)) / self.tile_px ** 2
        if self.cfg.centre_first and valid.shape[0] > self.tile_px and seen_tiles <= CENTRE_FIRST_MAX_SEEN_TILES:
            tile_valid = centre_crop(valid, self.tile_px)
            if tile_valid.mean() >= CENTRE_FIRST_MIN_VALID:
                views.append(self._view(centre_crop(query, self.tile_px), tile_valid))
        views.append(self._view(query, valid))
        return views

    def _centre_fit_stands(self, m: Measurement | None) -> bool:
        """A centre-tile fit needs no footprint: the tile lies on the map, or most of it does
        and the fit is as strong as one that ends verification early (stop_at_inliers)."""
        if m is None:
            return False
        return m.map_overlap >= CENTRE_FIRST_MIN_OVERLAP or \
            (m.map_overlap >= CENTRE_FIRST_MIN_VALID and m.inliers >= self.cfg.stop_at_inliers)

    def _view(self, query: np.ndarray, valid: np.ndarray) -> "_View":
        # the map around a candidate: the view plus margin_m on each side for the candidate's own error
        size_m = valid.shape[1] * self.cache.gsd_m + 2.0 * self.margin_m
        return _View(query, valid, valid.shape[1] / 2.0 - 0.5, _footprint_samples(valid), size_m)

    def _heading_search_due(self, t: float) -> bool:
        """Lost (no verified fit this frame), and the last heading search long enough ago: the
        interval doubles with every search since the last verified fit (a long leg off the
        map costs a few searches, not one every few seconds)."""
        if not math.isfinite(t):
            return True
        failed = self._heading_searches_since_fit
        return t - self._last_heading_search_s >= self.cfg.heading_search_s * 2.0 ** min(failed, 10)

    def _turned_view_candidates(self, query: np.ndarray, retrieve, turn: float) -> list[Candidate]:
        h, w = query.shape[:2]
        with self.stages("heading search"):
            view = cv2.warpAffine(query, _turn_matrix(turn, (w / 2.0 - 0.5, h / 2.0 - 0.5)), (w, h),
                                  flags=cv2.INTER_LINEAR)
            return list(itertools.islice(retrieve(view), self.cfg.top_k))

    def _turned_candidates(self, query: np.ndarray, retrieve) -> list[tuple[float, list[Candidate]]]:
        """The best top_k places over all turned views, grouped by the turn that found them."""
        h, w = query.shape[:2]
        centre = (w / 2.0 - 0.5, h / 2.0 - 0.5)
        found: list[tuple[float, float, Candidate]] = []
        with self.stages("heading search"):
            for k in range(1, int(round(360.0 / HEADING_STEP_DEG))):
                turn = _wrap(self.heading.offset_deg + k * HEADING_STEP_DEG)
                view = cv2.warpAffine(query, _turn_matrix(turn, centre), (w, h), flags=cv2.INTER_LINEAR)
                for cand in itertools.islice(retrieve(view), self.cfg.top_k):
                    score = cand.score if math.isfinite(cand.score) else -math.inf
                    found.append((score, turn, cand))
        found.sort(key=lambda f: -f[0])
        groups: dict[float, list[Candidate]] = {}
        for _, turn, cand in found[:self.cfg.top_k]:
            groups.setdefault(turn, []).append(cand)
        return list(groups.items())

    def _halves_agree(self, query_features: Features, region: Features | None, centre: float) -> bool:
        """Do the two halves of the view (its features split at their median across the longer
        side of their spread) each verify on their own, at the known heading, and put the nadir
        at the same place? Two sub-views that agree are independent evidence for the place, as a
        second frame would be."""
        pts = query_features.points
        if region is None or len(pts) < 2 * self.cfg.min_inliers:
            return False
        axis = int(np.argmax(np.ptp(pts, axis=0)))
        left = np.zeros(len(pts), bool)
        left[np.argsort(pts[:, axis], kind="stable")[:len(pts) // 2]] = True
        fits = []
        for half in (left, ~left):
            r = self.matcher.match(query_features.subset(half), region, (centre, centre), self.heading.offset_deg)
            if not r.ok:
                return False
            fits.append(r)
        a, b = fits
        d = np.subtract(a.nadir_px, b.nadir_px)
        # each half extrapolates to the nadir on its edge: its covariance says how well; the
        # RANSAC threshold allows for what the fit's model leaves out (relief, lens, attitude)
        tolerance = 3.0 * math.sqrt(float(np.trace(a.cov_px + b.cov_px))) + self.cfg.refine.ransac_threshold_px
        return float(np.hypot(*d)) <= tolerance and \
            abs(angle_difference_deg(a.rotation_deg, b.rotation_deg)) <= self.cfg.refine.max_rotation_deg

    def _best(self, query_features, footprint, candidates, centre, size_m, height_m, reasons,
              strong_turns, tried: list[tuple[float, float]], agrees=None):
        """The best verified candidate's Measurement and its region's map features (None, None)."""
        cfg = self.cfg
        best: Measurement | None = None
        best_region = None
        # with a track to check them against, weaker fits are worth fitting
        need = min(cfg.min_inliers, cfg.track_min_inliers) if agrees is not None else cfg.min_inliers
        for cand in candidates:
            # a region reaches margin_m beyond a tile on each side, so it already holds the view
            # of any candidate within margin_m of its centre: verifying that one again adds nothing
            if any(max(abs(cand.x - x), abs(cand.y - y)) <= self.margin_m for x, y in tried):
                continue
            tried.append((cand.x, cand.y))
            features, on_map, transform = self.region(cand, size_m)
            with self.stages("match"):
                result = self.matcher.match(query_features, features, (centre, centre), self.heading.offset_deg, need)
            if self.low_contrast_map is not None and agrees is not None and result.matches < need:
                # too few matches, not a poor fit: low-texture ground the stored features barely
                # cover. Only near a confident track's prediction (the detections there are reused
                # frame after frame; a search over many places would detect each of them again)
                low, low_on_map, _ = self.region(cand, size_m, self.low_contrast_map)
                with self.stages("match"):
                    retried = self.matcher.match(query_features, low, (centre, centre), self.heading.offset_deg, need)
                if retried.ok or retried.rotation_only:
                    result, features, on_map = retried, low, low_on_map
            with self.stages("match"):
                overlap = on_map.fraction_on_map(result.to_region(footprint)) if result.params is not None else 0.0
            if not (result.ok or result.rotation_only):
                reasons.append(f"tile {cand.tile_id}: {result.reason}")
                continue
            if overlap < cfg.min_map_overlap:
                reasons.append(f"tile {cand.tile_id}: only {overlap:.0%} of the view lies on the map")
                continue
            m = self._measurement(result, cand, transform, height_m, overlap, centre)
            if result.rotation_only:
                if result.inliers >= cfg.heading_min_inliers:
                    strong_turns.append((result, m))
                reasons.append(f"tile {cand.tile_id}: {result.reason}")
                continue
            if result.inliers < cfg.min_inliers and not agrees(m):
                reasons.append(f"tile {cand.tile_id}: {result.inliers} inliers, too few for a place "
                               f"the track does not predict")
                continue
            if best is None or m.inliers > best.inliers:
                best, best_region = m, features
                if best.inliers >= cfg.stop_at_inliers:
                    break
        return best, best_region

    def _measurement(self, result: MatchResult, cand: Candidate, transform, height_m: float,
                     overlap: float, centre_px: float) -> Measurement:
        col, row = result.nadir_px
        x, y = transform @ (col + 0.5, row + 0.5)   # pixel centres sit at +0.5 of the corner
        # pixel covariance -> metric through the crop's linear part (row axis points south)
        linear = np.array([[transform.a, transform.b], [transform.d, transform.e]])
        cov = linear @ result.cov_px @ linear.T
        floor = self._model_variance(height_m) * np.eye(2)
        # a telemetry yaw too large by e turns the rectified view by -e against the map
        m = Measurement(x, y, cov + floor, cand.tile_id, cand.score, result.inliers, _wrap(-result.rotation_deg),
                        overlap)
        if self.cfg.uses_pose_fit() and result.inlier_region_px is not None:
            with self.stages("pose"):
                fit = self._pose(result, transform, height_m, (x, y), centre_px)
            if fit is not None:
                m.x, m.y = float(fit.nadir[0]), float(fit.nadir[1])
                m.cov = fit.cov[:2, :2] + floor
                m.tilt, m.pose_cov = fit.tilt, fit.cov.copy()
                m.pose_cov[:2, :2] += floor
        return m

    def _pose(self, result: MatchResult, transform, height_m: float, nadir_xy, centre_px: float) -> PoseFit | None:
        """The pose fit of a verified match, or None where it says nothing trustworthy."""
        region = np.asarray(result.inlier_region_px, np.float64) + 0.5
        map_xy = np.stack([transform.a * region[:, 0] + transform.b * region[:, 1] + transform.c,
                           transform.d * region[:, 0] + transform.e * region[:, 1] + transform.f], axis=1)
        fit, _ = fit_pose(result.inlier_query_px, map_xy, float(self.cache.gsd_m), centre_px, height_m, nadir_xy,
                          result.rotation_deg, result.scale, self.cfg.camera_model_error_mrad * 1e-3)
        if fit is None or not np.isfinite(fit.cov).all() or fit.tilt_deg > MAX_TILT_ERROR_DEG:
            return None
        return fit

    def _model_variance(self, height_m: float) -> float:
        """White measurement noise beyond the fit (the attitude part goes to the filter's bias)."""
        return self.cfg.fix_floor_m() ** 2


def _remember(candidates: Iterable[Candidate], seen: list[Candidate]) -> Iterable[Candidate]:
    for cand in candidates:
        seen.append(cand)
        yield cand


def _turn_matrix(deg: float, centre: tuple[float, float]) -> np.ndarray:
    """2x3 affine turning pixel (col, row) positions by `deg` about `centre` like the fit's rotation."""
    r = math.radians(deg)
    c, s = math.cos(r), math.sin(r)
    cx, cy = centre
    return np.array([[c, -s, cx - c * cx + s * cy], [s, c, cy - s * cx - c * cy]], np.float64)


def centre_crop(image: np.ndarray, size_px: int) -> np.ndarray:
    """The centred size_px square of a square view (same parity: the centres coincide)."""
    off = (image.shape[0] - size_px) // 2
    return image[off:off + size_px, off:off + size_px]


def _footprint_samples(valid: np.ndarray) -> np.ndarray:
    """Query pixel positions (col, row) on a grid over where the camera saw ground."""
    rows, cols = np.mgrid[FOOTPRINT_STEP_PX // 2:valid.shape[0]:FOOTPRINT_STEP_PX,
                          FOOTPRINT_STEP_PX // 2:valid.shape[1]:FOOTPRINT_STEP_PX]
    keep = valid[rows, cols]
    return np.stack([cols[keep], rows[keep]], axis=1).astype(np.float64)
