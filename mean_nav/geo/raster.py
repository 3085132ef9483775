"""GeoTIFF orthophotos -> one north-up RGB raster in a metric CRS at a chosen GSD.

Used by the tile-cache builder, the flight simulator and the synthetic pair source, so
all three see the same pixels for the same ground.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import rasterio
from affine import Affine
from pyproj import CRS
from rasterio.warp import Resampling, calculate_default_transform, reproject, transform_bounds

from ..errors import MeanNavError
from .crs import WGS84, to_lonlat, utm_crs_for


@dataclass
class MetricRaster:
    """RGB uint8 image on a north-up grid: pixel (col, row) centre -> transform @ (col+.5, row+.5)."""

    image: np.ndarray      # [H, W, 3] uint8
    valid: np.ndarray      # [H, W] bool, False where no map covers the ground (nodata)
    crs: CRS               # metric CRS (UTM of the area unless chosen)
    transform: Affine      # pixel corner -> (x, y) in crs
    gsd_m: float
    sources: tuple[str, ...] = ()

    @property
    def shape(self) -> tuple[int, int]:
        return self.image.shape[:2]

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in crs metres."""
        h, w = self.shape
        left, top = self.transform @ (0, 0)
        right, bottom = self.transform @ (w, h)
        return left, bottom, right, top

    def xy_to_pixel(self, x, y):
        """Metric (x, y) -> fractional (col, row) with pixel centres at integers."""
        col, row = ~self.transform @ (x, y)
        return np.asarray(col) - 0.5, np.asarray(row) - 0.5

    def pixel_to_xy(self, col, row):
        x, y = self.transform @ (np.asarray(col) + 0.5, np.asarray(row) + 0.5)
        return x, y

    def centre_lonlat(self) -> tuple[float, float]:
        left, bottom, right, top = self.bounds
        lon, lat = to_lonlat(self.crs, (left + right) / 2, (bottom + top) / 2)
        return float(lon), float(lat)

    def map_from_ground(self, x0: float, y0: float) -> np.ndarray:
        """3x3: ground (east, north, 1) metres relative to (x0, y0) -> raster pixel (col, row).

        Valid where the CRS axes are east/north (UTM and other projected CRSs here).
        """
        col0, row0 = self.xy_to_pixel(x0, y0)
        return np.array([[1 / self.gsd_m, 0, float(col0)],
                         [0, -1 / self.gsd_m, float(row0)],
                         [0, 0, 1.0]])


def check_georeferenced(path: str | Path) -> None:
    """Raise a MeanNavError unless `path` is a readable GeoTIFF with a CRS and a geotransform."""
    path = Path(path)
    if not path.is_file():
        raise MeanNavError(f"{path}: map file not found")
    try:
        with rasterio.open(path) as src:
            if src.crs is None:
                raise MeanNavError(f"{path}: map has no CRS; georeference it (e.g. gdal_edit.py -a_srs EPSG:xxxx) and retry")
            if src.transform == Affine.identity() and not src.gcps[0]:
                raise MeanNavError(f"{path}: map has no geotransform; georeference it (gdal_translate -a_ullr ...) and retry")
            if src.count < 3:
                raise MeanNavError(f"{path}: map has {src.count} band(s); an RGB orthophoto (3 bands) is needed")
            _check_8bit(path, src)
    except rasterio.errors.RasterioError as exc:
        raise MeanNavError(f"{path}: cannot read as a GeoTIFF ({exc}); check the file is complete") from None


def _check_8bit(path: Path, src) -> None:
    """Maps are read as 8-bit RGB: other sample types must hold 0..255 values, or GDAL's
    conversion would clip them (a float map with values up to 255000 becomes white)."""
    if all(dtype == "uint8" for dtype in src.dtypes[:3]):
        return
    scale = max(1, max(src.width, src.height) // 512)  # a decimated read finds the value range
    sample = src.read([1, 2, 3], out_shape=(3, max(1, src.height // scale), max(1, src.width // scale)),
                      masked=True)
    lo, hi = sample.min(), sample.max()
    if sample.count() and not (np.isfinite([lo, hi]).all() and 0 <= lo and hi <= 255):
        raise MeanNavError(f"{path}: map bands are {src.dtypes[0]} with values {lo:g}..{hi:g}, which do not fit "
                           "8-bit imagery; convert it to 8-bit RGB with an explicit scale, e.g. gdal_translate "
                           f"-ot Byte -scale {lo:g} {hi:g} 0 255 {path.name} {path.stem}_8bit.tif")


def union_bounds(paths: Sequence[str | Path], crs: CRS) -> tuple[float, float, float, float]:
    lefts, bottoms, rights, tops = [], [], [], []
    for p in paths:
        check_georeferenced(p)
        with rasterio.open(p) as src:
            l, b, r, t = transform_bounds(src.crs, crs, *src.bounds, densify_pts=21)
        lefts.append(l); bottoms.append(b); rights.append(r); tops.append(t)
    return min(lefts), min(bottoms), max(rights), max(tops)


def area_crs(paths: Sequence[str | Path]) -> CRS:
    """The UTM zone of the centre of all maps."""
    l, b, r, t = union_bounds(paths, WGS84)
    return utm_crs_for((l + r) / 2, (b + t) / 2)


def read_metric_raster(paths: Sequence[str | Path] | str | Path, gsd_m: float,
                       crs: CRS | str | None = None,
                       bounds: tuple[float, float, float, float] | None = None) -> MetricRaster:
    """Reproject one or more orthophotos onto one north-up grid at `gsd_m` metres/pixel.

    Overlapping maps merge: the first map that has data at a pixel wins. Nodata (the
    file's nodata value, alpha band or mask) stays invalid.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise MeanNavError("no map files given; pass one or more GeoTIFF orthophotos")
    if gsd_m <= 0:
        raise MeanNavError(f"ground resolution must be positive, got {gsd_m} m/px")
    for p in paths:
        check_georeferenced(p)
    crs = area_crs(paths) if crs is None else CRS.from_user_input(crs)
    if not crs.is_projected:
        raise MeanNavError(f"tile CRS {crs.to_string()} is not metric; choose a projected CRS such as a UTM zone")
    left, bottom, right, top = bounds or union_bounds(paths, crs)
    # snap the grid to multiples of the GSD so rasters built separately line up
    left = np.floor(left / gsd_m) * gsd_m
    top = np.ceil(top / gsd_m) * gsd_m
    width = int(np.ceil((right - left) / gsd_m))
    height = int(np.ceil((top - bottom) / gsd_m))
    transform = Affine(gsd_m, 0, left, 0, -gsd_m, top)
    image, valid = reproject_maps(paths, crs, transform, width, height)
    return MetricRaster(image, valid, crs, transform, gsd_m, tuple(str(p) for p in paths))


def reproject_maps(paths: Sequence[str | Path], crs: CRS, transform: Affine, width: int,
                   height: int) -> tuple[np.ndarray, np.ndarray]:
    """Reproject maps onto an explicit north-up grid (windowed reading for large areas).

    Returns ([height, width, 3] uint8 RGB, [height, width] bool valid); the first map with
    data at a pixel wins. GDAL reads only the source blocks the window needs.
    """
    image = np.zeros((height, width, 3), np.uint8)
    valid = np.zeros((height, width), bool)
    for p in paths:
        with rasterio.open(p) as src:
            # Fix GDAL's resampling scale to the whole map's: otherwise it estimates the scale
            # per window, and windows at the map edge resample differently from their neighbours.
            src_res, _, _ = calculate_default_transform(src.crs, crs, src.width, src.height, *src.bounds)
            scales = dict(XSCALE=abs(src_res.a) / abs(transform.a), YSCALE=abs(src_res.e) / abs(transform.e))
            rgb = np.zeros((3, height, width), np.uint8)
            reproject(source=rasterio.band(src, [1, 2, 3]), destination=rgb, dst_transform=transform,
                      dst_crs=crs, resampling=Resampling.bilinear, **scales)
            mask = np.zeros((height, width), np.uint8)
            reproject(source=src.dataset_mask(), destination=mask, src_transform=src.transform,
                      src_crs=src.crs, dst_transform=transform, dst_crs=crs,
                      resampling=Resampling.nearest)
        new = (mask > 0) & ~valid
        image[new] = rgb.transpose(1, 2, 0)[new]
        valid |= new
    return image, valid
