from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

from mean_nav.errors import MeanNavError
from mean_nav.geo.crs import from_lonlat, to_lonlat, utm_crs_for
from mean_nav.geo.raster import read_metric_raster

ORTHO = Path(__file__).resolve().parents[2] / "shared" / "data" / "orthophotos"
needs_data = pytest.mark.skipif(not ORTHO.is_dir(), reason=f"shared data not found at {ORTHO}")


def test_utm_zone_for_known_places():
    assert utm_crs_for(4.99, 51.84).to_epsg() == 32631      # Gorinchem
    assert utm_crs_for(-51.6, -15.6).to_epsg() == 32722     # Brazil, southern hemisphere


def test_lonlat_round_trip_is_centimetre_exact():
    crs = utm_crs_for(4.99, 51.84)
    x, y = from_lonlat(crs, 4.99, 51.84)
    lon, lat = to_lonlat(crs, x, y)
    x2, y2 = from_lonlat(crs, lon, lat)
    assert abs(x2 - x) < 0.01 and abs(y2 - y) < 0.01


@needs_data
def test_reprojected_pixel_lands_on_same_ground_as_source():
    path = ORTHO / "test_tiled.tif"   # EPSG:28992 national grid
    r = read_metric_raster(path, 0.25)
    assert r.crs.to_epsg() == 32631
    with rasterio.open(path) as src:
        # a source pixel near the middle, its ground in lon/lat via the source CRS
        col, row = 400, 600
        sx, sy = src.transform @ (col + 0.5, row + 0.5)
        lon, lat = to_lonlat(src.crs, sx, sy)
        src_px = src.read(window=((row, row + 1), (col, col + 1)))[:, 0, 0]
    x, y = from_lonlat(r.crs, lon, lat)
    c, rr = r.xy_to_pixel(x, y)
    got = r.image[int(round(float(rr))), int(round(float(c)))]
    assert np.abs(got.astype(int) - src_px.astype(int)).max() < 40
    assert 0.9 < r.valid.mean() <= 1.0


def test_map_without_crs_is_rejected(tmp_path):
    path = tmp_path / "nocrs.tif"
    with rasterio.open(path, "w", driver="GTiff", width=8, height=8, count=3, dtype="uint8",
                       transform=Affine(1, 0, 0, 0, -1, 8)) as dst:
        dst.write(np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(MeanNavError, match="no CRS"):
        read_metric_raster(path, 1.0)
