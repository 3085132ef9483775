"""Acquisition: which map places to verify for one frame, best first.

While the filter tracks: the map at its prediction first (the tightest motion mode's where
one predicts within `confident_sigma_m`, else the whole track's mean), then the network's
best tiles within its 3-sigma area. Photos seconds apart leave the track tens of metres wide
while the cruise mode still knows the place, and over a small footprint retrieval seldom
ranks the true tile among the few it returns (survey_40m of the field suite: 11 of 96 photos
missed that way). Without a track: first near the newest unconfirmed fix
(where a confirming second fix should be), then a search around an anchor (the configured
prior, or where the last track was) whose radius grows with the time the vehicle may have
flown since and doubles with every frame that verified nothing (at most once per
`filter.measurement_correlation_s`: video frames fail together), until it covers the whole
cache (the cache's approximate index when it has one). A prior wrong by any distance, or
none, therefore still reaches a first fix, and a first fix far from the prior is reported
(`Acquisition.record` returns the notice).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from .filter import RADIUS68_PER_SIGMA, PositionFilter

if TYPE_CHECKING:
    from ..deploy.embedder import Embedder
    from .localizer import LocalizerConfig


@dataclass
class Candidate:
    x: float
    y: float
    tile_id: int
    score: float
    key: Any        # feature-cache key, None for positions that are not tile centres


class Acquisition:
    """Candidate places for a rectified query, from the filter state and the tile cache."""

    def __init__(self, cfg: "LocalizerConfig", embedder: "Embedder", cache,
                 initial_lonlat: tuple[float, float] | None = None):
        self.cfg, self.embedder, self.cache = cfg, embedder, cache
        self.initial_lonlat = initial_lonlat
        self.prior_xy: tuple[float, float] | None = None
        if initial_lonlat is not None:
            x, y = cache.lonlat_to_xy(*initial_lonlat)
            self.prior_xy = (float(x), float(y))
        xs, ys = np.asarray(cache.x, float), np.asarray(cache.y, float)
        half = float(cache.tile_size_m) / 2
        # corners of the area the tiles cover: a search this wide around a point is global
        self._corners = (np.array([[xs.min() - half, ys.min() - half], [xs.min() - half, ys.max() + half],
                                   [xs.max() + half, ys.min() - half], [xs.max() + half, ys.max() + half]])
                         if len(xs) else np.zeros((0, 2)))
        self.anchor = self.prior_xy               # centre of the widening search (None: global)
        self.anchor_t: float | None = None        # when the vehicle was at the anchor (None: first frame)
        self.anchor_is_prior = self.prior_xy is not None
        self.widenings = 0                        # frames since the anchor that verified nothing
        self._widened_t: float | None = None      # when the search last widened
        self.had_track = False
        self.search = ""                          # what the last frame searched, for the frame reason

    # --- per frame ----------------------------------------------------------------------
    def candidates(self, query: np.ndarray, t: float, filter: PositionFilter) -> Iterator[Candidate]:
        """Places to verify, best first. A generator: while tracking, the map around the
        prediction comes first, and the network runs only if that does not verify strongly
        (on a flight computer this halves the time per frame)."""
        cfg = self.cfg
        if self.anchor_t is None:
            self.anchor_t = t
        pred = filter.position_at(t)
        if pred is not None:
            sigma68 = RADIUS68_PER_SIGMA * math.sqrt(max(float(np.trace(pred[1])) / 2, 0.0))
            px, py = float(pred[0][0]), float(pred[0][1])
            place = self._predicted_place(t, filter, (px, py), sigma68) if cfg.verify_prediction else None
            if place is not None:
                # verify around the nearest tile centre: its map features are cached, and a
                # region half a tile wider than the tile still contains the predicted view
                nearest = self.cache.tile_at(*place) if hasattr(self.cache, "tile_at") else None
                if nearest is not None:
                    yield Candidate(float(self.cache.x[nearest]), float(self.cache.y[nearest]),
                                    int(nearest), math.nan, ("tile", int(nearest)))
                else:
                    yield Candidate(*place, -1, math.nan, None)
            descriptor = self.embedder.embed([query])[0]
            radius = cfg.search_radius_m + 3.0 * sigma68
            self.search = f"searched within {radius:.0f} m of the track"
            yield from self._near(descriptor, px, py, radius)
            return
        descriptor = self.embedder.embed([query])[0]
        # without a track, retrieval over an unfamiliar or damaged map ranks the true tile lower
        # (5th to 20th over nodata holes), and a lost frame can afford more verifications
        k = max(cfg.top_k, cfg.lost_top_k)
        if filter.candidates:
            # where a second, confirming fix should be
            ct, cx, cy = filter.candidates[-1]
            yield from self._near(descriptor, cx, cy, cfg.search_radius_m + filter.cfg.max_speed_ms * (t - ct), k)
        radius = self.search_radius_m(t, filter)
        if self.anchor is None or self._covers_cache(*self.anchor, radius):
            self.search = "searched the whole map"
            yield from self._global(descriptor, k)
        else:
            where = "the initial position" if self.anchor_is_prior else "the last track"
            self.search = f"searched within {radius:.0f} m of {where}"
            yield from self._near(descriptor, *self.anchor, radius, k)

    def _predicted_place(self, t: float, filter: PositionFilter, mean: tuple[float, float],
                         sigma68: float) -> tuple[float, float]:
        """Where to verify the map first: the track's mean where it predicts within
        confident_sigma_m, else the tightest motion mode's prediction if that one does
        (photos seconds apart leave the manoeuvre mode tens of metres wide while the cruise
        mode still knows the place), else the mean anyway (retrieval over a small footprint
        rarely ranks the true tile first, so the prediction is still the likeliest place)."""
        if sigma68 <= self.cfg.confident_sigma_m:
            return mean
        modes = zip(filter.mode_radii_at(t), (pos for pos, _ in filter.mode_positions_at(t)))
        radius, pos = min(modes, key=lambda m: m[0], default=(math.inf, None))
        return (float(pos[0]), float(pos[1])) if radius <= self.cfg.confident_sigma_m else mean

    def search_radius_m(self, t: float, filter: PositionFilter) -> float:
        """Radius of the anchor search at time t: initial radius + how far the vehicle may
        have flown since, doubled per frame that verified nothing (once per correlation time)."""
        flown = filter.cfg.max_speed_ms * max(0.0, t - (self.anchor_t if self.anchor_t is not None else t))
        return (self.cfg.initial_radius_m + flown) * 2.0 ** self.widenings

    def record(self, t: float, verified_xy: tuple[float, float] | None, filter: PositionFilter) -> str:
        """After the frame: move the anchor with the track, widen the search when nothing
        verified. Returns a notice worth telling the operator (prior far off), else ""."""
        notice = ""
        if filter.tracking:
            pred = filter.position_at(t)
            if not self.had_track and self.anchor_is_prior and self.prior_xy is not None:
                d = math.hypot(pred[0][0] - self.prior_xy[0], pred[0][1] - self.prior_xy[1])
                expected = self.cfg.initial_radius_m + filter.cfg.max_speed_ms * (t - self.anchor_t)
                if d > expected:
                    notice = (f"prior disagrees with the map: first fix {d:.0f} m from the initial position "
                              f"(the vehicle could be at most {expected:.0f} m from it)")
            self.had_track = True
            self.anchor, self.anchor_t, self.anchor_is_prior = (float(pred[0][0]), float(pred[0][1])), t, False
            self.widenings, self._widened_t = 0, None
        elif verified_xy is None and self.anchor is not None:
            # frames closer than the filter's measurement_correlation_s see the same ground and
            # fail together: one widening for them (30 Hz video went global within 0.1 s)
            if self._widened_t is None or t - self._widened_t >= filter.cfg.measurement_correlation_s:
                self.widenings += 1
                self._widened_t = t
        return notice

    # --- searches -----------------------------------------------------------------------
    def _covers_cache(self, x: float, y: float, radius_m: float) -> bool:
        return not len(self._corners) or radius_m >= float(np.hypot(*(self._corners - (x, y)).T).max())

    def _near(self, descriptor, x: float, y: float, radius_m: float, k: int | None = None) -> Iterator[Candidate]:
        k = k or self.cfg.top_k
        if self._covers_cache(x, y, radius_m):
            hits = self.cache.search_approx(descriptor, k)
        else:
            lon, lat = self.cache.xy_to_lonlat(x, y)
            hits = self.cache.search_near(descriptor, lat, lon, radius_m, k)
        yield from self._from_hits(hits)

    def _global(self, descriptor, k: int | None = None) -> Iterator[Candidate]:
        yield from self._from_hits(self.cache.search_approx(descriptor, k or self.cfg.top_k))

    @staticmethod
    def _from_hits(hits) -> Iterator[Candidate]:
        for hit in hits:
            yield Candidate(float(hit.x), float(hit.y), int(hit.tile_id), float(hit.score),
                            ("tile", int(hit.tile_id)))
