"""Uniform-grid spatial index over metric tile centres (numpy only).

A radius query touches only the grid cells overlapping the query circle, so its cost
depends on the tiles near the query, not on the size of the cache.
"""
from __future__ import annotations

import math

import numpy as np


class GridIndex:
    """Bucket points (x, y) into square cells; answer radius queries in O(points nearby)."""

    MAX_CELLS_PER_POINT = 4  # caps the dense cell table for sparse layouts (far-apart areas)

    def __init__(self, x: np.ndarray, y: np.ndarray, cell_m: float):
        self.x = np.ascontiguousarray(x, np.float64)
        self.y = np.ascontiguousarray(y, np.float64)
        n = len(self.x)
        if n == 0:
            self.cell_m, self.ncx, self.ncy = float(cell_m), 0, 0
            self.order = np.zeros(0, np.int64)
            self.starts = np.zeros(1, np.int64)
            self.x0 = self.y0 = 0.0
            return
        self.x0, self.y0 = float(self.x.min()), float(self.y.min())
        span_x, span_y = float(self.x.max()) - self.x0, float(self.y.max()) - self.y0
        cell_m = float(cell_m)
        # grow cells until the dense table stays proportional to the number of points
        while (math.floor(span_x / cell_m) + 1) * (math.floor(span_y / cell_m) + 1) > self.MAX_CELLS_PER_POINT * n + 16:
            cell_m *= 2.0
        self.cell_m = cell_m
        self.ncx = int(math.floor(span_x / cell_m)) + 1
        self.ncy = int(math.floor(span_y / cell_m)) + 1
        cx = np.minimum(((self.x - self.x0) / cell_m).astype(np.int64), self.ncx - 1)
        cy = np.minimum(((self.y - self.y0) / cell_m).astype(np.int64), self.ncy - 1)
        cell = cy * self.ncx + cx
        self.order = np.argsort(cell, kind="stable")
        self.starts = np.searchsorted(cell[self.order], np.arange(self.ncx * self.ncy + 1))

    def __len__(self) -> int:
        return len(self.x)

    def candidates(self, x: float, y: float, radius_m: float) -> np.ndarray:
        """Indices of points in the cells overlapping the circle's bounding box (unfiltered)."""
        if len(self.x) == 0 or radius_m < 0:
            return np.zeros(0, np.int64)
        cx0 = max(0, int(math.floor((x - radius_m - self.x0) / self.cell_m)))
        cx1 = min(self.ncx - 1, int(math.floor((x + radius_m - self.x0) / self.cell_m)))
        cy0 = max(0, int(math.floor((y - radius_m - self.y0) / self.cell_m)))
        cy1 = min(self.ncy - 1, int(math.floor((y + radius_m - self.y0) / self.cell_m)))
        if cx0 > cx1 or cy0 > cy1:
            return np.zeros(0, np.int64)
        # cells cx0..cx1 of one cell row are consecutive in the sorted order: one slice per row
        parts = [self.order[self.starts[cy * self.ncx + cx0]:self.starts[cy * self.ncx + cx1 + 1]]
                 for cy in range(cy0, cy1 + 1)]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def query_radius(self, x: float, y: float, radius_m: float) -> np.ndarray:
        """Sorted indices of points within radius_m of (x, y)."""
        cand = self.candidates(x, y, radius_m)
        if len(cand) == 0:
            return cand
        d2 = (self.x[cand] - x) ** 2 + (self.y[cand] - y) ** 2
        return np.sort(cand[d2 <= radius_m * radius_m])

    def nearest(self, x: float, y: float, max_radius_m: float) -> int | None:
        """Index of the point nearest (x, y) within max_radius_m, or None."""
        cand = self.candidates(x, y, max_radius_m)
        if len(cand) == 0:
            return None
        d2 = (self.x[cand] - x) ** 2 + (self.y[cand] - y) ** 2
        best = int(np.argmin(d2))
        return int(cand[best]) if d2[best] <= max_radius_m * max_radius_m else None
