"""Coordinate reference systems through pyproj only (no hand-written degree factors)."""
from __future__ import annotations

from functools import lru_cache

from pyproj import CRS, Transformer
from pyproj.aoi import AreaOfInterest
from pyproj.database import query_utm_crs_info

WGS84 = CRS.from_epsg(4326)


@lru_cache(maxsize=256)
def utm_crs_for(lon: float, lat: float) -> CRS:
    """The WGS84 UTM zone CRS containing (lon, lat); cached, the PROJ database query is slow."""
    infos = query_utm_crs_info(datum_name="WGS 84",
                               area_of_interest=AreaOfInterest(lon, lat, lon, lat))
    if not infos:
        raise ValueError(f"no UTM zone for lon={lon}, lat={lat}")
    return CRS.from_epsg(int(infos[0].code))


@lru_cache(maxsize=64)
def _transformer(src: str, dst: str) -> Transformer:
    return Transformer.from_crs(CRS.from_user_input(src), CRS.from_user_input(dst), always_xy=True)


def transformer(src: CRS | str, dst: CRS | str) -> Transformer:
    """Cached always_xy transformer (x/lon first)."""
    return _transformer(CRS.from_user_input(src).to_wkt(), CRS.from_user_input(dst).to_wkt())


def to_lonlat(crs: CRS | str, x, y):
    """Metric (x, y) in `crs` -> (lon, lat) WGS84."""
    return transformer(crs, WGS84).transform(x, y)


def from_lonlat(crs: CRS | str, lon, lat):
    """(lon, lat) WGS84 -> (x, y) in `crs`."""
    return transformer(WGS84, crs).transform(lon, lat)
