"""Acquisition: which map places to verify for one frame, best first.

While the filter is confident: the map at its prediction first, then the network's best
tiles near it. Before the first fix: near the configured prior. When lost: the whole cache.
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
        self.had_fix = False

    def candidates(self, query: np.ndarray, t: float, filter: PositionFilter) -> Iterator[Candidate]:
        """Places to verify, best first. A generator: while tracking, the map around the
        prediction comes first, and the network runs only if that does not verify strongly
        (on a flight computer this halves the time per frame)."""
        cfg = self.cfg
        pred = filter.position_at(t)
        sigma68 = math.inf if pred is None else RADIUS68_PER_SIGMA * math.sqrt(np.trace(pred[1]) / 2)
        if pred is not None and sigma68 <= cfg.confident_sigma_m:
            px, py = float(pred[0][0]), float(pred[0][1])
            if cfg.verify_prediction:
                # verify around the nearest tile centre: its map features are cached, and a
                # region half a tile wider than the tile still contains the predicted view
                nearest = self.cache.tile_at(px, py) if hasattr(self.cache, "tile_at") else None
                if nearest is not None:
                    yield Candidate(float(self.cache.x[nearest]), float(self.cache.y[nearest]),
                                     int(nearest), math.nan, ("tile", int(nearest)))
                else:
                    yield Candidate(px, py, -1, math.nan, None)
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
            yield Candidate(float(hit.x), float(hit.y), int(hit.tile_id), float(hit.score),
                             ("tile", int(hit.tile_id)))
