"""Ground-metric tiling of orthophotos: a global integer pixel grid, blocks, map parts.

Everything is anchored on one integer pixel grid per (CRS, GSD) so that caches built
separately (shards, neighbouring areas) line up exactly:

    global pixel (col, row) covers x in [col*gsd, (col+1)*gsd) and
                                   y in [-(row+1)*gsd, -row*gsd)

so its centre is ((col + 0.5) * gsd, -(row + 0.5) * gsd). Tile (i, j) starts at global
pixel (i * stride_px, j * stride_px) and is tile_px square. Integer arithmetic keeps
tile geometry exact; metres appear only when a coordinate leaves this module.

Large areas are processed in blocks of tiles; each block reprojects only the window it
needs (GDAL reads only the source blocks touched) and stores the pixels it owns as one
GeoTIFF "map part" so refinement can read tile pixels and wider regions later.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import rasterio
from affine import Affine
from pyproj import CRS

from ..errors import MeanNavError
from .raster import reproject_maps, union_bounds


@dataclass(frozen=True)
class TileGrid:
    """Tile layout on the global pixel grid of a metric CRS."""

    crs: CRS
    gsd_m: float
    tile_px: int
    stride_px: int

    @classmethod
    def from_metres(cls, crs: CRS | str, gsd_m: float, tile_size_m: float, stride_m: float) -> "TileGrid":
        crs = CRS.from_user_input(crs)
        if not crs.is_projected:
            raise MeanNavError(f"tile CRS {crs.to_string()} is not metric; choose a projected CRS such as a UTM zone")
        if not gsd_m > 0:
            raise MeanNavError(f"gsd_m: ground resolution must be positive, got {gsd_m} m/px")
        tile_px = _whole_pixels("tile_size_m", tile_size_m, gsd_m)
        stride_px = _whole_pixels("stride_m", stride_m, gsd_m)
        if stride_px > tile_px:
            raise MeanNavError(f"stride_m: {stride_m} m is larger than tile_size_m {tile_size_m} m, "
                               "which leaves gaps between tiles; use a stride <= tile size")
        return cls(crs, float(gsd_m), tile_px, stride_px)

    @property
    def tile_size_m(self) -> float:
        return self.tile_px * self.gsd_m

    @property
    def stride_m(self) -> float:
        return self.stride_px * self.gsd_m

    def transform(self, col0: int, row0: int) -> Affine:
        """Affine of a raster whose top-left pixel is global pixel (col0, row0)."""
        return Affine(self.gsd_m, 0.0, col0 * self.gsd_m, 0.0, -self.gsd_m, -row0 * self.gsd_m)

    def pixel_to_xy(self, col, row):
        """Global pixel coordinates (centres at integers) -> metric (x, y)."""
        return (np.asarray(col, np.float64) + 0.5) * self.gsd_m, -(np.asarray(row, np.float64) + 0.5) * self.gsd_m

    def xy_to_pixel(self, x, y):
        """Metric (x, y) -> fractional global pixel (col, row), centres at integers."""
        return np.asarray(x, np.float64) / self.gsd_m - 0.5, -np.asarray(y, np.float64) / self.gsd_m - 0.5

    def tile_centre_xy(self, i, j):
        """Metric centre of tile (i, j) (tile column i, tile row j counting southwards)."""
        half = self.tile_px / 2.0
        return ((np.asarray(i, np.float64) * self.stride_px + half) * self.gsd_m,
                -(np.asarray(j, np.float64) * self.stride_px + half) * self.gsd_m)

    def tile_range(self, bounds: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
        """Tiles overlapping metric bounds (left, bottom, right, top): (i0, i1, j0, j1), ends exclusive."""
        left, bottom, right, top = bounds
        c_lo, c_hi = math.floor(left / self.gsd_m), math.ceil(right / self.gsd_m)
        r_lo, r_hi = math.floor(-top / self.gsd_m), math.ceil(-bottom / self.gsd_m)
        s, t = self.stride_px, self.tile_px
        # tile i covers pixel columns [i*s, i*s + t): overlap with [c_lo, c_hi)
        i0, i1 = (c_lo - t) // s + 1, -(-c_hi // s)
        j0, j1 = (r_lo - t) // s + 1, -(-r_hi // s)
        return i0, i1, j0, j1

    def describe(self) -> dict:
        return {
            "crs": self.crs.to_string(),
            "crs_wkt": self.crs.to_wkt(),
            "gsd_m": self.gsd_m,
            "tile_px": self.tile_px,
            "stride_px": self.stride_px,
            "tile_size_m": self.tile_size_m,
            "stride_m": self.stride_m,
            "pixel_grid": "global pixel (col,row) covers x in [col*gsd,(col+1)*gsd), y in [-(row+1)*gsd,-row*gsd)",
        }

    @classmethod
    def from_description(cls, d: dict) -> "TileGrid":
        return cls(CRS.from_wkt(d["crs_wkt"]), float(d["gsd_m"]), int(d["tile_px"]), int(d["stride_px"]))


def _whole_pixels(field: str, metres: float, gsd_m: float) -> int:
    if not metres > 0:
        raise MeanNavError(f"{field}: must be positive, got {metres} m")
    px = round(metres / gsd_m)
    if px < 1 or abs(px * gsd_m - metres) > 1e-6 * max(1.0, metres):
        raise MeanNavError(f"{field}: {metres} m is not a whole number of {gsd_m} m pixels; "
                           f"use a multiple of the GSD such as {max(px, 1) * gsd_m:g} m")
    return px


@dataclass(frozen=True)
class Block:
    """A rectangle of tiles processed together, and the map pixels it owns.

    Tiles (i0..i1, j0..j1) need pixels [i0*s, (i1-1)*s + t) x [j0*s, (j1-1)*s + t) (the
    read window); the block stores only the pixels up to the next block's start (the
    owned window) so map parts never overlap.
    """

    index: int
    i0: int
    i1: int
    j0: int
    j1: int
    own_col1: int   # exclusive end of the owned pixel columns
    own_row1: int

    def read_window(self, grid: TileGrid) -> tuple[int, int, int, int]:
        """(col0, row0, width, height) in global pixels covering every tile of the block."""
        s, t = grid.stride_px, grid.tile_px
        col0, row0 = self.i0 * s, self.j0 * s
        return col0, row0, (self.i1 - 1) * s + t - col0, (self.j1 - 1) * s + t - row0

    def own_window(self, grid: TileGrid) -> tuple[int, int, int, int]:
        col0, row0 = self.i0 * grid.stride_px, self.j0 * grid.stride_px
        return col0, row0, self.own_col1 - col0, self.own_row1 - row0

    @property
    def num_tiles(self) -> int:
        return (self.i1 - self.i0) * (self.j1 - self.j0)


def plan_blocks(grid: TileGrid, tile_range: tuple[int, int, int, int], block_px: int = 4096,
                rows: tuple[int, int] | None = None) -> list[Block]:
    """Split a tile range into blocks of about block_px x block_px pixels, row-major order.

    `rows` (j0, j1) restricts the plan to some tile rows (a shard); pixel ownership is still
    decided against the whole range so the map parts of all shards tile it without overlap.
    """
    i0, i1, j0, j1 = tile_range
    r0, r1 = rows if rows is not None else (j0, j1)
    r0, r1 = max(r0, j0), min(r1, j1)
    if i1 <= i0 or r1 <= r0:
        return []
    per = max(1, (block_px - grid.tile_px) // grid.stride_px + 1)
    s, t = grid.stride_px, grid.tile_px
    blocks = []
    for bj in range(r0, r1, per):
        bj1 = min(bj + per, r1)
        for bi in range(i0, i1, per):
            bi1 = min(bi + per, i1)
            own_col1 = bi1 * s if bi1 < i1 else (i1 - 1) * s + t
            own_row1 = bj1 * s if bj1 < j1 else (j1 - 1) * s + t
            blocks.append(Block(len(blocks), bi, bi1, bj, bj1, own_col1, own_row1))
    return blocks


def shard_rows(tile_range: tuple[int, int, int, int], shard: tuple[int, int] | None) -> tuple[int, int]:
    """Tile rows (j0, j1) of shard (i, n): n contiguous bands of the area, north to south."""
    _, _, j0, j1 = tile_range
    if shard is None:
        return j0, j1
    i, n = shard
    if not (n >= 1 and 0 <= i < n):
        raise MeanNavError(f"shard: {i}/{n} is not valid; use i/n with 0 <= i < n")
    rows = j1 - j0
    if n > rows:
        raise MeanNavError(f"shard: the area has only {rows} tile rows, fewer than {n} shards; use at most {rows}")
    return j0 + rows * i // n, j0 + rows * (i + 1) // n


def area_tile_range(paths: Sequence[str | Path], grid: TileGrid) -> tuple[int, int, int, int]:
    return grid.tile_range(union_bounds(paths, grid.crs))


def maps_overlapping(paths: Sequence[Path], map_bounds: Sequence[tuple[float, float, float, float]],
                     grid: TileGrid, col0: int, row0: int, width: int, height: int) -> list[Path]:
    """The maps whose bounds (in the grid CRS) touch a pixel window, in their given order."""
    left, top = col0 * grid.gsd_m, -row0 * grid.gsd_m
    right, bottom = left + width * grid.gsd_m, top - height * grid.gsd_m
    return [p for p, (l, b, r, t) in zip(paths, map_bounds) if l < right and r > left and b < top and t > bottom]


def read_window(paths: Sequence[str | Path], grid: TileGrid, col0: int, row0: int, width: int,
                height: int) -> tuple[np.ndarray, np.ndarray]:
    """Reproject the maps onto a window of the global grid: (RGB uint8, valid bool).

    Pure black pixels count as nodata too: several orthophoto producers (the Manila and
    Brazil samples here) fill outside the survey with black without declaring nodata.
    """
    if not paths:
        return np.zeros((height, width, 3), np.uint8), np.zeros((height, width), bool)
    image, valid = reproject_maps(paths, grid.crs, grid.transform(col0, row0), width, height)
    valid &= image.any(axis=2)
    image[~valid] = 0  # tiles and stored map parts agree: black wherever there is no map
    return image, valid


def cut_tiles(grid: TileGrid, block: Block, image: np.ndarray, valid: np.ndarray,
              min_valid_fraction: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
    """Tiles of a block with enough valid ground.

    `image`/`valid` cover block.read_window. Returns (i, j, valid_fraction, images) for the
    kept tiles, row-major. Invalid pixels are left black in the tile images.
    """
    s, t = grid.stride_px, grid.tile_px
    # integral image: valid pixel count of every tile in O(1)
    integral = np.zeros((valid.shape[0] + 1, valid.shape[1] + 1), np.int64)
    integral[1:, 1:] = valid.cumsum(0).cumsum(1)
    ii, jj, fracs, images = [], [], [], []
    for j in range(block.j0, block.j1):
        r = (j - block.j0) * s
        for i in range(block.i0, block.i1):
            c = (i - block.i0) * s
            count = integral[r + t, c + t] - integral[r, c + t] - integral[r + t, c] + integral[r, c]
            frac = count / float(t * t)
            if frac < min_valid_fraction or count == 0:
                continue
            ii.append(i); jj.append(j); fracs.append(frac)
            images.append(np.ascontiguousarray(image[r:r + t, c:c + t]))
    return (np.asarray(ii, np.int64), np.asarray(jj, np.int64), np.asarray(fracs, np.float32), images)


def write_map_part(path: Path, grid: TileGrid, col0: int, row0: int, image: np.ndarray,
                   valid: np.ndarray) -> None:
    """Store a window as a 4-band GeoTIFF (RGB + alpha = valid), written then renamed."""
    h, w = valid.shape
    tmp = path.with_name(path.name + ".tmp")
    profile = dict(driver="GTiff", width=w, height=h, count=4, dtype="uint8", crs=grid.crs,
                   transform=grid.transform(col0, row0), compress="deflate", predictor=2,
                   tiled=True, blockxsize=256, blockysize=256, photometric="RGB", alpha="YES")
    if w < 256 or h < 256:  # GeoTIFF tiles must fit; small parts are stored in strips
        profile.update(tiled=False, blockxsize=None, blockysize=None)
        profile = {k: v for k, v in profile.items() if v is not None}
    with rasterio.open(tmp, "w", **profile) as dst:
        dst.write(image.transpose(2, 0, 1), indexes=[1, 2, 3])
        dst.write(valid.astype(np.uint8) * 255, indexes=4)
    os.replace(tmp, path)


class MapMosaic:
    """Map parts (GeoTIFF windows of the global grid) read back as one virtual raster."""

    def __init__(self, folder: Path, parts: list[dict]):
        self.folder = Path(folder)
        self.parts = parts
        self.windows = np.array([[p["col0"], p["row0"], p["col0"] + p["width"], p["row0"] + p["height"]]
                                 for p in parts], np.int64).reshape(-1, 4)
        self._open: dict[int, rasterio.io.DatasetReader] = {}

    def _dataset(self, k: int):
        if k not in self._open:
            self._open[k] = rasterio.open(self.folder / self.parts[k]["file"])
        return self._open[k]

    def read(self, col0: int, row0: int, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        """Global pixel window -> (RGB uint8 [h,w,3], valid bool [h,w]); outside parts is invalid."""
        image = np.zeros((height, width, 3), np.uint8)
        valid = np.zeros((height, width), bool)
        col1, row1 = col0 + width, row0 + height
        w = self.windows
        hits = np.nonzero((w[:, 0] < col1) & (w[:, 2] > col0) & (w[:, 1] < row1) & (w[:, 3] > row0))[0]
        for k in hits:
            pc0, pr0, pc1, pr1 = (int(v) for v in w[k])
            c0, r0, c1, r1 = max(col0, pc0), max(row0, pr0), min(col1, pc1), min(row1, pr1)
            data = self._dataset(int(k)).read(window=((r0 - pr0, r1 - pr0), (c0 - pc0, c1 - pc0)))
            part_valid = data[3] > 0
            dst = (slice(r0 - row0, r1 - row0), slice(c0 - col0, c1 - col0))
            new = part_valid & ~valid[dst]
            image[dst][new] = data[:3].transpose(1, 2, 0)[new]
            valid[dst] |= new
        return image, valid

    def close(self) -> None:
        for ds in self._open.values():
            ds.close()
        self._open.clear()
