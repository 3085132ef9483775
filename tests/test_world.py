"""The procedural world: a georeferenced, deterministic, structured aerial map."""
import numpy as np
import pytest
import rasterio

from mean_nav.data.world import generate_world, render_world
from mean_nav.errors import MeanNavError
from mean_nav.geo.crs import to_lonlat
from mean_nav.geo.raster import read_metric_raster


def test_world_is_a_utm_geotiff_at_the_requested_gsd_and_centre(tmp_path):
    path = generate_world(tmp_path / "w.tif", seed=1, size_px=256, gsd_m=0.5, centre_lonlat=(5.0, 52.0))
    with rasterio.open(path) as src:
        assert src.count == 3 and src.dtypes[0] == "uint8"
        assert src.crs.to_epsg() == 32631  # UTM 31N for 5 E, 52 N
        assert src.res == (0.5, 0.5)
        left, bottom, right, top = src.bounds
        lon, lat = to_lonlat(src.crs, (left + right) / 2, (bottom + top) / 2)
    assert lon == pytest.approx(5.0, abs=1e-5) and lat == pytest.approx(52.0, abs=1e-5)  # < 1 m
    raster = read_metric_raster(path, 0.5)  # what the tile cache and simulator read
    assert raster.valid.all()
    assert not list(tmp_path.glob("*.tmp*"))


def test_same_seed_same_pixels_other_seed_other_world():
    a = render_world(7, 256, 0.25)
    assert np.array_equal(a, render_world(7, 256, 0.25))
    assert np.abs(a.astype(int) - render_world(8, 256, 0.25)).mean() > 10


def test_world_has_distinct_structure_everywhere():
    img = render_world(0, 512, 0.25).astype(np.float32).mean(axis=2)
    # 60 m patches (240 px) on a 32 px step: texture everywhere, and no two patches alike
    patches = [img[y:y + 240, x:x + 240] for y in range(0, 272, 32) for x in range(0, 272, 32)]
    assert min(p.std() for p in patches) > 8
    flat = np.stack([(p - p.mean()).ravel() / (p.std() * p.size ** 0.5) for p in patches])
    corr = flat @ flat.T
    np.fill_diagonal(corr, 0)
    assert corr.max() < 0.9


def test_world_shows_water_roads_and_vegetation_colours():
    img = render_world(2, 1024, 0.25).reshape(-1, 3).astype(int)
    r, g, b = img.T
    greenish = ((g > r) & (g > b)).mean()
    bluish = ((b >= g) & (b > r + 15)).mean()
    greyish = ((abs(r - g) < 8) & (abs(g - b) < 10) & (r > 70) & (r < 130)).mean()
    assert greenish > 0.2 and bluish > 0.005 and greyish > 0.005


def test_bad_world_arguments_are_rejected(tmp_path):
    with pytest.raises(MeanNavError, match="size_px"):
        generate_world(tmp_path / "x.tif", size_px=10)
    with pytest.raises(MeanNavError, match="gsd_m"):
        generate_world(tmp_path / "x.tif", gsd_m=0)


def test_tiled_world_sheets_meet_exactly_and_holes_are_nodata(tmp_path):
    from mean_nav.data.world import generate_tiled_world, nodata_holes, other_season, write_geotiff_at

    sheets = generate_tiled_world(tmp_path / "big", seed=3, tiles=2, tile_px=128, gsd_m=0.5)
    assert len(sheets) == 4
    raster = read_metric_raster(sheets, 0.5)
    assert raster.shape == (256, 256) and raster.valid.all()  # no gap, no overlap between sheets
    with rasterio.open(sheets[0]) as nw, rasterio.open(sheets[3]) as se:
        assert nw.bounds.right == se.bounds.left and nw.bounds.bottom == se.bounds.top
        image, crs, left, top = nw.read().transpose(1, 2, 0), nw.crs, nw.transform.c, nw.transform.f
    valid = nodata_holes(image.shape[:2], 0.5, seed=1, fraction=0.2)
    assert 0.6 < valid.mean() <= 0.8
    holed = write_geotiff_at(tmp_path / "holes.tif", image, 0.5, crs, left, top, valid)
    assert np.array_equal(read_metric_raster(holed, 0.5).valid, valid)
    other = other_season(image, 0.5, seed=1, map_gsd_m=1.0)
    assert other.shape == image.shape and np.abs(other.astype(int) - image).mean() > 10
