"""Map features: the local features of the cache map, made once and served per region.

This module is the one place that knows how a map region's features are made. The cache
build runs `extract_cells` over every map block (`mean-nav cache build`), and a cache
without stored features runs the same function in flight over the map pixels it reads
(`InFlightMapFeatures`), so stored and in-flight features are the same keypoints.

Layout: the map is cut into square cells of `cell_px` global pixels (the tile stride, so
cells never straddle a block, a shard or a map part). Detection runs once per chunk of
cells (about 512 px square, on one global chunk grid, padded so a chunk's edge is no edge
for the detector) at the cache GSD, and each cell keeps its strongest `per_cell`
keypoints, so a region of the default verification size (a tile plus half a tile each
side) holds about `max_features` of them. Because chunks sit on a global grid and see the
same pixels, the build and the in-flight fallback find the same keypoints. A region is
served by selecting the keypoints of the cells it covers: no map pixel is read per frame.

    features/<detector>/cells.npy        [C] CELL_DTYPE, sorted by (cj, ci): where each cell's
                                         keypoints start, how many, and an 8x8 valid-map mask
    features/<detector>/points.npy       [K, 2] float32 (col, row) within the cell
    features/<detector>/descriptors.npy  [K, D] (uint8 when the values are whole bytes)
    features/<detector>/scores.npy       [K] float32 detector response

All four are memory-mapped and listed in meta.json `files` (sha256); meta.json
`map_features[<detector>]` records the settings they were made with.
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ..errors import MeanNavError
from ..nav.features import Extractor, Features, make_extractor

if TYPE_CHECKING:
    from ..nav.refine import RefineConfig
    from .tiles import TileGrid

log = logging.getLogger(__name__)

STORE_VERSION = 1
FEATURES_DIR = "features"
ARRAYS = ("cells", "points", "descriptors", "scores")
VALID_GRID = 8          # valid-map flags per cell side (64 bits per cell)
PAD_PX = 32             # pixels read beyond a window so its border is no border for the detector

CELL_DTYPE = np.dtype([("ci", "<i8"), ("cj", "<i8"), ("start", "<i8"), ("count", "<i8"), ("valid_bits", "<u8")])


def store_settings(refine: "RefineConfig", grid: "TileGrid") -> dict:
    """What the stored features of `refine.detector` depend on: a cache made otherwise is refused."""
    region_px = 2 * grid.tile_px        # the localizer's default region: a tile and half a tile around it
    cell_px = grid.stride_px
    extractor = make_extractor(refine)
    return {"store_version": STORE_VERSION, **extractor.settings(), "max_features_per_region": refine.max_features,
            "region_px": region_px, "cell_px": cell_px,
            "per_cell": max(1, math.ceil(refine.max_features * cell_px ** 2 / region_px ** 2)),
            "chunk_cells": max(1, round(512 / cell_px)), "clahe_tile_px": region_px // 4}


_WINDOW_EXTRACTORS: dict[str, Extractor] = {}


def window_extractor(refine: "RefineConfig", settings: dict) -> Extractor:
    """The extractor for map windows: no global budget (cells keep their best), CLAHE at the region's scale.

    One per settings and process: a build (or a Ray worker) makes it once, not per block.
    """
    key = json.dumps([refine.detector, refine.matcher, settings], sort_keys=True, default=str)
    if key not in _WINDOW_EXTRACTORS:
        _WINDOW_EXTRACTORS[key] = make_extractor(refine, max_features=0, clahe_tile_px=int(settings["clahe_tile_px"]),
                                                 contrast_threshold=settings.get("contrast_threshold"))
    return _WINDOW_EXTRACTORS[key]


@dataclass
class CellFeatures:
    """Keypoints of some map cells, in the stored layout (cells sorted by (cj, ci))."""

    cells: np.ndarray         # [C] CELL_DTYPE, start indexes into the arrays below
    points: np.ndarray        # [K, 2] float32 (col, row) relative to the cell's top-left global pixel
    descriptors: np.ndarray   # [K, D]
    scores: np.ndarray        # [K] float32

    @classmethod
    def concatenate(cls, parts: Sequence["CellFeatures"], dim: int, dtype) -> "CellFeatures":
        parts = [p for p in parts if len(p.cells)]
        filled = [p for p in parts if len(p.points)]
        if filled:   # the descriptors' own size and type win over the caller's guess
            dim, dtype = filled[0].descriptors.shape[1], filled[0].descriptors.dtype
        parts = [p if len(p.points) else cls(p.cells, p.points, np.zeros((0, dim), dtype), p.scores) for p in parts]
        if not parts:
            return cls(np.zeros(0, CELL_DTYPE), np.zeros((0, 2), np.float32), np.zeros((0, dim), dtype),
                       np.zeros(0, np.float32))
        cells, offset = [], 0
        for p in parts:
            c = p.cells.copy()
            c["start"] += offset
            offset += len(p.points)
            cells.append(c)
        return cls(np.concatenate(cells), np.concatenate([p.points for p in parts]),
                   np.concatenate([p.descriptors for p in parts]), np.concatenate([p.scores for p in parts]))


def extract_cells(extractor: Extractor, settings: dict, image: np.ndarray, valid: np.ndarray,
                  col0: int, row0: int, own: tuple[int, int, int, int]) -> CellFeatures:
    """Features of the cells inside `own` (global pixel window col0, row0, col1, row1, exclusive).

    `image`/`valid` cover global pixels from (col0, row0) and should reach PAD_PX beyond
    `own` where the map goes on; `own` must start on cell boundaries or the map's edge.
    """
    cell = int(settings["cell_px"])
    per_cell = int(settings["per_cell"])
    oc0, or0, oc1, or1 = own
    feats = extractor.extract(image, valid)
    gx = feats.points[:, 0].astype(np.float64) + col0
    gy = feats.points[:, 1].astype(np.float64) + row0
    # a keypoint belongs to the pixel its centre lies in (pixel centres at integers)
    pc, pr = np.floor(gx + 0.5), np.floor(gy + 0.5)
    inside = (pc >= oc0) & (pc < oc1) & (pr >= or0) & (pr < or1)
    ci = (pc[inside] // cell).astype(np.int64)
    cj = (pr[inside] // cell).astype(np.int64)
    idx = np.nonzero(inside)[0]
    scores = feats.scores[idx] if feats.scores is not None else np.zeros(len(idx), np.float32)
    # best first within each cell; keep the cell's per_cell strongest
    order = np.lexsort((-scores, ci, cj))
    ci, cj, idx, scores = ci[order], cj[order], idx[order], scores[order]
    keys = cj * (1 << 32) + ci
    first = np.r_[True, keys[1:] != keys[:-1]] if len(keys) else np.zeros(0, bool)
    group_start = np.maximum.accumulate(np.where(first, np.arange(len(keys)), 0)) if len(keys) else keys
    keep = (np.arange(len(keys)) - group_start) < per_cell
    ci, cj, idx, scores = ci[keep], cj[keep], idx[keep], scores[keep]

    # every cell of the window with map in it gets a record (keypoints or not): its valid mask
    # lets verification measure how much of a footprint lies on the map without map pixels
    ci_range = np.arange(oc0 // cell, -(-oc1 // cell))
    cj_range = np.arange(or0 // cell, -(-or1 // cell))
    bits = _valid_bits(valid, col0, row0, own, cell, ci_range, cj_range)     # [rows, cols] uint64
    counts = np.zeros(bits.shape, np.int64)
    np.add.at(counts, (cj - cj_range[0], ci - ci_range[0]), 1)
    jj, ii = np.nonzero((bits != 0) | (counts > 0))                        # row-major = (cj, ci) order
    cells = np.zeros(len(jj), CELL_DTYPE)
    cells["ci"], cells["cj"] = ci_range[ii], cj_range[jj]
    cells["count"] = counts[jj, ii]
    cells["start"] = np.concatenate([[0], np.cumsum(cells["count"])[:-1]]) if len(cells) else 0
    cells["valid_bits"] = bits[jj, ii]
    points = np.stack([gx[idx] - ci * cell, gy[idx] - cj * cell], axis=1).astype(np.float32)
    return CellFeatures(cells, points.reshape(-1, 2), feats.descriptors[idx], scores.astype(np.float32))


def chunk_range(settings: dict, own: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """Chunks (a0, a1, b0, b1), ends exclusive, that touch the global pixel window `own`."""
    span = int(settings["cell_px"]) * int(settings["chunk_cells"])
    oc0, or0, oc1, or1 = own
    return oc0 // span, -(-oc1 // span), or0 // span, -(-or1 // span)


def window_features(extractor: Extractor, settings: dict, read, own: tuple[int, int, int, int]) -> CellFeatures:
    """Features of the cells in global pixel window `own`, chunk by chunk.

    `read(col0, row0, width, height) -> (image, valid)` gives map pixels of the global grid;
    it is called once, for the chunks touching `own` plus the padding.
    """
    span = int(settings["cell_px"]) * int(settings["chunk_cells"])
    a0, a1, b0, b1 = chunk_range(settings, own)
    c0, r0 = a0 * span - PAD_PX, b0 * span - PAD_PX
    image, valid = read(c0, r0, (a1 - a0) * span + 2 * PAD_PX, (b1 - b0) * span + 2 * PAD_PX)
    parts = []
    for b in range(b0, b1):
        for a in range(a0, a1):
            cc0, cr0 = a * span, b * span
            clip = (max(cc0, own[0]), max(cr0, own[1]), min(cc0 + span, own[2]), min(cr0 + span, own[3]))
            if clip[2] <= clip[0] or clip[3] <= clip[1]:
                continue
            x0, y0 = cc0 - PAD_PX - c0, cr0 - PAD_PX - r0
            win = (slice(y0, y0 + span + 2 * PAD_PX), slice(x0, x0 + span + 2 * PAD_PX))
            if not valid[win].any():
                continue
            parts.append(extract_cells(extractor, settings, image[win], valid[win], cc0 - PAD_PX, cr0 - PAD_PX, clip))
    return CellFeatures.concatenate(parts, 0, np.float32) if parts else CellFeatures(
        np.zeros(0, CELL_DTYPE), np.zeros((0, 2), np.float32), np.zeros((0, 0), np.float32), np.zeros(0, np.float32))


def _valid_bits(valid: np.ndarray, col0: int, row0: int, own: tuple[int, int, int, int], cell: int,
                ci_range: np.ndarray, cj_range: np.ndarray) -> np.ndarray:
    """Per cell, 8x8 flags (row-major, bit 0 top-left) of sub-squares at least half map (inside `own`)."""
    oc0, or0, oc1, or1 = own
    v = np.zeros(valid.shape, np.int64)
    r_lo, r_hi = max(or0 - row0, 0), min(or1 - row0, valid.shape[0])
    c_lo, c_hi = max(oc0 - col0, 0), min(oc1 - col0, valid.shape[1])
    v[r_lo:r_hi, c_lo:c_hi] = valid[r_lo:r_hi, c_lo:c_hi]
    integral = np.zeros((v.shape[0] + 1, v.shape[1] + 1), np.int64)
    integral[1:, 1:] = v.cumsum(0).cumsum(1)
    sub = cell / VALID_GRID
    # sub-square edges in window pixels, clipped to the owned part of the window
    ce = np.clip(np.round(ci_range[0] * cell + np.arange(len(ci_range) * VALID_GRID + 1) * sub).astype(np.int64) - col0,
                 c_lo, c_hi)
    re = np.clip(np.round(cj_range[0] * cell + np.arange(len(cj_range) * VALID_GRID + 1) * sub).astype(np.int64) - row0,
                 r_lo, r_hi)
    total = integral[np.ix_(re, ce)]
    count = total[1:, 1:] - total[:-1, 1:] - total[1:, :-1] + total[:-1, :-1]
    area = np.diff(re)[:, None] * np.diff(ce)[None, :]
    flags = (area > 0) & (2 * count >= area)
    flags = flags.reshape(len(cj_range), VALID_GRID, len(ci_range), VALID_GRID).transpose(0, 2, 1, 3)
    weights = (np.uint64(1) << np.arange(VALID_GRID * VALID_GRID, dtype=np.uint64)).reshape(VALID_GRID, VALID_GRID)
    return (flags.astype(np.uint64) * weights).sum(axis=(2, 3), dtype=np.uint64)


def descriptor_dtype(extractor: Extractor) -> str:
    """The descriptor dtype the extractor's matchers expect (stored ones may be compacted)."""
    return "uint8" if extractor.descriptor_norm == "hamming" else "float32"


def compact_descriptors(descriptors: np.ndarray) -> np.ndarray:
    """uint8 when every value is a whole byte (OpenCV SIFT's are): 4x less disk, lossless."""
    if descriptors.dtype == np.float32 and len(descriptors) and np.all(descriptors == np.round(descriptors)) \
            and descriptors.min() >= 0 and descriptors.max() <= 255:
        return descriptors.astype(np.uint8)
    return descriptors


# ---------------------------------------------------------------------------- serving

class MapFeatureSource:
    """Features of any map region, from cells (stored or computed); the verifier's only view of the map."""

    def __init__(self, settings: dict, descriptor_dtype):
        self.settings = settings
        self.cell_px = int(settings["cell_px"])
        self.descriptor_dtype = np.dtype(descriptor_dtype)

    def _cells(self, ci0: int, ci1: int, cj0: int, cj1: int) -> list[tuple[CellFeatures, np.ndarray]]:
        """(cell features, row indexes into its cells) for the cells in [ci0, ci1) x [cj0, cj1)."""
        raise NotImplementedError

    def region(self, col0: int, row0: int, width: int, height: int) -> tuple[Features, "ValidCells"]:
        """Keypoints inside a global pixel window, in window pixels, and the window's map mask."""
        cell = self.cell_px
        ci0, ci1 = col0 // cell, -(-(col0 + width) // cell)
        cj0, cj1 = row0 // cell, -(-(row0 + height) // cell)
        bits = np.zeros((cj1 - cj0, ci1 - ci0), np.uint64)
        pts, desc, scores = [], [], []
        for store, rows in self._cells(ci0, ci1, cj0, cj1):
            if len(rows) == 0:
                continue
            recs = store.cells[rows]
            bits[recs["cj"] - cj0, recs["ci"] - ci0] = recs["valid_bits"]
            counts = recs["count"]
            if counts.sum() == 0:
                continue
            # keypoint indexes of all the cells at once: start of each cell + 0..count-1
            first = np.repeat(recs["start"] - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
            idx = first + np.arange(int(counts.sum()))
            origin = np.stack([recs["ci"] * cell - col0, recs["cj"] * cell - row0], axis=1).astype(np.float32)
            pts.append(np.asarray(store.points[idx], np.float32) + np.repeat(origin, counts, axis=0))
            desc.append(np.asarray(store.descriptors[idx]))
            scores.append(np.asarray(store.scores[idx]))
        if pts:
            points = np.concatenate(pts)
            inside = (points[:, 0] >= -0.5) & (points[:, 0] < width - 0.5) & \
                     (points[:, 1] >= -0.5) & (points[:, 1] < height - 0.5)
            feats = Features(points[inside], np.concatenate(desc)[inside].astype(self.descriptor_dtype),
                             np.concatenate(scores)[inside].astype(np.float32), (width, height))
        else:
            feats = Features(np.zeros((0, 2), np.float32), np.zeros((0, 0), self.descriptor_dtype),
                             np.zeros(0, np.float32), (width, height))
        return feats, ValidCells(bits, cell, col0 - ci0 * cell, row0 - cj0 * cell)


class ValidCells:
    """Where a region has map, at 1/8 of a cell: enough to tell how much of a footprint is on the map."""

    def __init__(self, bits: np.ndarray, cell_px: int, col0: int, row0: int):
        """`bits` [rows, cols] of the cells covering the region; (col0, row0): the region's first
        pixel within the first cell."""
        self.bits, self.cell_px, self.col0, self.row0 = bits, cell_px, col0, row0

    def fraction_on_map(self, points_px: np.ndarray) -> float:
        """Fraction of region pixel positions [N, 2] (col, row) that lie on valid map."""
        if len(points_px) == 0:
            return 0.0
        g = np.floor(np.asarray(points_px, np.float64) + 0.5).astype(np.int64) + np.array([self.col0, self.row0])
        ci, cj = g[:, 0] // self.cell_px, g[:, 1] // self.cell_px
        inside = (ci >= 0) & (cj >= 0) & (ci < self.bits.shape[1]) & (cj < self.bits.shape[0])
        sub = self.cell_px / VALID_GRID
        b = np.clip(((g[inside, 0] - ci[inside] * self.cell_px) // sub).astype(np.int64), 0, VALID_GRID - 1)
        a = np.clip(((g[inside, 1] - cj[inside] * self.cell_px) // sub).astype(np.int64), 0, VALID_GRID - 1)
        words = self.bits[cj[inside], ci[inside]]
        on = (words >> (a * VALID_GRID + b).astype(np.uint64)) & np.uint64(1)
        return float(on.sum()) / len(points_px)


class StoredMapFeatures(MapFeatureSource):
    """Map features read from a cache's `features/<detector>/` (memory-mapped)."""

    def __init__(self, folder: Path, entry: dict):
        super().__init__(entry["settings"], entry["descriptor_dtype"])
        d = Path(folder) / entry["dir"]
        try:
            cells = np.load(d / "cells.npy")
            self.store = CellFeatures(cells, np.load(d / "points.npy", mmap_mode="r"),
                                      np.load(d / "descriptors.npy", mmap_mode="r"),
                                      np.load(d / "scores.npy", mmap_mode="r"))
        except (ValueError, OSError) as exc:
            raise MeanNavError(f"{d}: cannot read the stored map features ({exc}); rebuild the cache") from None
        if cells.dtype != CELL_DTYPE:
            raise MeanNavError(f"{d / 'cells.npy'}: unexpected layout {cells.dtype}; rebuild the cache")
        self._index = {(int(i), int(j)): k for k, (i, j) in enumerate(zip(cells["ci"], cells["cj"]))}

    def _cells(self, ci0, ci1, cj0, cj1):
        rows = [self._index[(i, j)] for j in range(cj0, cj1) for i in range(ci0, ci1) if (i, j) in self._index]
        return [(self.store, np.asarray(rows, np.int64))]


class InFlightMapFeatures(MapFeatureSource):
    """Map features computed from the cache's map pixels when first asked for (caches without them).

    Works in the build's chunks (the same keypoints) and keeps the most recent in memory.
    """

    def __init__(self, mosaic, refine: "RefineConfig", settings: dict, max_chunks: int = 64):
        self.extractor = window_extractor(refine, settings)
        super().__init__(settings, descriptor_dtype(self.extractor))
        self.mosaic, self.max_chunks = mosaic, max_chunks
        self.chunk_cells = int(settings["chunk_cells"])
        self._chunks: OrderedDict[tuple[int, int], CellFeatures] = OrderedDict()

    def _chunk(self, a: int, b: int) -> CellFeatures:
        key = (a, b)
        if key in self._chunks:
            self._chunks.move_to_end(key)
            return self._chunks[key]
        span = self.chunk_cells * self.cell_px
        own = (a * span, b * span, (a + 1) * span, (b + 1) * span)
        feats = window_features(self.extractor, self.settings, self.mosaic.read, own)
        self._chunks[key] = feats
        while len(self._chunks) > self.max_chunks:
            self._chunks.popitem(last=False)
        return feats

    def _cells(self, ci0, ci1, cj0, cj1):
        n = self.chunk_cells
        out = []
        for b in range(cj0 // n, -(-cj1 // n)):
            for a in range(ci0 // n, -(-ci1 // n)):
                chunk = self._chunk(a, b)
                c = chunk.cells
                rows = np.nonzero((c["ci"] >= ci0) & (c["ci"] < ci1) & (c["cj"] >= cj0) & (c["cj"] < cj1))[0]
                out.append((chunk, rows))
        return out


def map_feature_source(cache, refine: "RefineConfig", max_chunks: int = 64) -> MapFeatureSource:
    """The stored map features of `refine.detector`, or in-flight ones (with a one-line notice).

    Refuses stored features made with other settings: their keypoints would not be the ones
    this configuration expects (a silent quality change the user could not see).
    """
    settings = store_settings(refine, cache.grid)
    entry = (cache.meta.get("map_features") or {}).get(refine.detector)
    if entry is None:
        log.warning("%s: no stored %s map features; computing them in flight (slower: rebuild the cache with "
                    "`mean-nav cache build --features %s` to store them)", cache.folder, refine.detector,
                    refine.detector)
        return InFlightMapFeatures(cache.mosaic, refine, settings, max_chunks)
    if entry.get("settings") != settings:
        stored = entry.get("settings") or {}
        diff = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
        raise MeanNavError(
            f"{cache.folder}: the stored {refine.detector} map features were made with other settings "
            f"({', '.join(f'{k}: cache {stored.get(k)!r}, config {settings.get(k)!r}' for k in diff)}); "
            f"use the cache's settings in localizer.refine or rebuild the cache with these")
    return StoredMapFeatures(cache.folder, entry)


def low_contrast_source(cache, refine: "RefineConfig", max_chunks: int = 64) -> MapFeatureSource | None:
    """SIFT map features detected again in flight at refine.query_contrast_threshold (None for
    other detectors): over grass and water the stored 0.04 features leave a region too few
    keypoints to match, as they leave the camera view (which retries at the same threshold)."""
    if refine.detector != "sift":
        return None
    settings = dict(store_settings(refine, cache.grid), contrast_threshold=float(refine.query_contrast_threshold))
    return InFlightMapFeatures(cache.mosaic, refine, settings, max_chunks)


def manifest_names(meta_path: Path, entries: dict) -> list[str]:
    """The files meta.json `map_features` promises, which its manifest must list (and so checksum)."""
    names = []
    for detector, entry in entries.items():
        keys = ("dir", "settings", "descriptor_dtype")
        if not isinstance(entry, dict) or any(k not in entry for k in keys) or not isinstance(entry["dir"], str) \
                or entry.get("descriptor_dtype") not in ("float32", "uint8") or not isinstance(entry["settings"], dict):
            raise MeanNavError(f"{meta_path}: map_features[{detector!r}] lacks dir, settings or descriptor_dtype; "
                               "the cache is damaged, rebuild it")
        names += [f"{entry['dir']}/{name}.npy" for name in ARRAYS]
    return names


# ---------------------------------------------------------------------------- build helpers

def block_file(work: Path, detector: str, block_index: int) -> Path:
    return work / f"features-{detector}-{block_index:06d}.npz"


def save_cells(path: Path, feats: CellFeatures, seconds: float = 0.0) -> None:
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, cells=feats.cells, points=feats.points, descriptors=compact_descriptors(feats.descriptors),
             scores=feats.scores, seconds=np.float64(seconds))
    os.replace(tmp, path)


def block_seconds(path: Path) -> float:
    """Time the block's features took to make (for the build's log line; never in meta.json,
    which stays byte-identical between builds)."""
    with np.load(path) as z:
        return float(z["seconds"])


def load_cells(path: Path) -> CellFeatures:
    with np.load(path) as z:
        return CellFeatures(z["cells"], z["points"], z["descriptors"], z["scores"])


def write_store(out: Path, detector: str, parts: Sequence[CellFeatures], settings: dict,
                descriptor_dtype: str) -> tuple[dict, list[str]]:
    """Concatenate cell features into `out/features/<detector>/`; returns (meta entry, file names)."""
    dims = {p.descriptors.shape[1] for p in parts if len(p.points)}
    dim = dims.pop() if dims else 0
    stored_dtype = next((p.descriptors.dtype for p in parts if len(p.points)), np.dtype(np.uint8))
    merged = CellFeatures.concatenate(parts, dim, stored_dtype)
    order = np.lexsort((merged.cells["ci"], merged.cells["cj"]))
    merged = CellFeatures(merged.cells[order], merged.points, merged.descriptors, merged.scores)
    rel = f"{FEATURES_DIR}/{detector}"
    folder = out / rel
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for name in ARRAYS:
        tmp = folder / f"{name}.tmp.npy"
        np.save(tmp, np.ascontiguousarray(getattr(merged, name)))
        os.replace(tmp, folder / f"{name}.npy")
        names.append(f"{rel}/{name}.npy")
    entry = {"dir": rel, "settings": settings, "descriptor_dtype": descriptor_dtype,
             "num_keypoints": int(len(merged.points)), "num_cells": int(len(merged.cells))}
    return entry, names


def read_store(folder: Path, entry: dict) -> CellFeatures:
    """A stored feature set, memory-mapped (for merging caches)."""
    return StoredMapFeatures(folder, entry).store


def dedupe_cells(parts: Sequence[CellFeatures]) -> list[CellFeatures]:
    """Keep the first occurrence of every cell (ci, cj) across parts (merging overlapping caches)."""
    seen: set[tuple[int, int]] = set()
    out = []
    for p in parts:
        keys = list(zip(p.cells["ci"].tolist(), p.cells["cj"].tolist()))
        keep = np.fromiter(((k not in seen) for k in keys), bool, len(keys))
        seen.update(keys)
        cells = p.cells[keep]
        idx = np.concatenate([np.arange(c["start"], c["start"] + c["count"]) for c in cells]) \
            if len(cells) else np.zeros(0, np.int64)
        new = cells.copy()
        new["start"] = np.concatenate([[0], np.cumsum(cells["count"])[:-1]]) if len(cells) else new["start"]
        out.append(CellFeatures(new, np.asarray(p.points[idx]), np.asarray(p.descriptors[idx]),
                                np.asarray(p.scores[idx])))
    return out
