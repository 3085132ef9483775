"""Geographic correctness of the tile cache on real orthophotos in three kinds of CRS.

The cache says tile t is centred at (lat, lon). Independently of the cache code, pyproj
maps every tile pixel's ground position from that lat/lon into the source map's own CRS
and rasterio's geotransform gives the source pixel; sampling the source there must give
the tile's pixels. Phase correlation measures any offset between the two to a fraction of
a pixel, so a tile centre wrong by more than 5 cm fails.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import rasterio
from pyproj import CRS, Geod, Transformer
from rasterio.warp import transform_bounds

from mean_nav.deploy.embedder import Embedder, Preprocessing
from mean_nav.geo.cache import TileCache, build_cache

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "orthophotos"

MAPS = {
    # file: (expected source CRS, cache GSD ~ source ground resolution, tile size m)
    "test_tiled.tif": ("EPSG:28992", 0.25, 32.0),                      # Dutch national grid
    "5b90f92da0d7280005fab355_4310.tif": ("EPSG:3395", 0.1, 25.6),     # World Mercator, black nodata
    "OSBS_029.tif": ("EPSG:32617", 0.1, 12.8),                         # UTM 17N, white nodata specks
    "2018_SJER_3_252000_4107000_image_477.tif": ("EPSG:32611", 0.1, 6.4),  # UTM 11N
}


class MeanColourEmbedder(Embedder):
    """Tiny deterministic descriptor; geometry tests do not need a network."""

    name = "numpy-test"
    dim = 6
    model_hash = "mean-colour-v1"
    preprocessing = Preprocessing(img_size=16)

    def _embed_batch(self, batch):
        x = batch.astype(np.float32)
        return np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2))], axis=1) + 1.0


@pytest.fixture(scope="module", params=list(MAPS))
def real_cache(request, tmp_path_factory):
    if not DATA.is_dir():
        print(f"skipping: real orthophotos not found at {DATA} (CI has ../shared/data)")
        pytest.skip(f"real orthophotos not found at {DATA}")
    name = request.param
    src_crs, gsd, tile = MAPS[name]
    path = DATA / name
    with rasterio.open(path) as src:
        assert src.crs == CRS.from_user_input(src_crs)
    out = tmp_path_factory.mktemp("geo") / name.replace(".tif", "")
    build_cache([path], out, MeanColourEmbedder(), gsd_m=gsd, tile_size_m=tile, stride_m=tile,
                min_valid_fraction=0.9, progress=False)
    return path, TileCache.load(out)


def source_patch_at(path: Path, xc: float, yc: float, metric_crs: CRS, gsd: float, size: int) -> np.ndarray:
    """Sample the source map on a north-up size x size grid centred at metric (xc, yc).

    Independent of the cache code: pyproj for the projection change, the GeoTIFF's own
    geotransform for pixels, OpenCV bilinear sampling. Returns float32 grey.
    """
    offsets = (np.arange(size) - (size - 1) / 2.0) * gsd
    east, north = np.meshgrid(offsets, -offsets)
    with rasterio.open(path) as src:
        sx, sy = Transformer.from_crs(metric_crs, src.crs, always_xy=True).transform(xc + east, yc + north)
        inv = ~src.transform
        col = inv.a * sx + inv.b * sy + inv.c - 0.5  # pixel centres at integers for OpenCV
        row = inv.d * sx + inv.e * sy + inv.f - 0.5
        image = src.read([1, 2, 3]).transpose(1, 2, 0)
        if src.nodata is not None:  # declared nodata shows as black, as in the cache
            image[(image == src.nodata).all(axis=2)] = 0
    rgb = cv2.remap(image, col.astype(np.float32), row.astype(np.float32), cv2.INTER_LINEAR,
                    borderMode=cv2.BORDER_CONSTANT)
    return grey(rgb)


def grey(rgb: np.ndarray) -> np.ndarray:
    return cv2.GaussianBlur(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32), (0, 0), 1.0)


def measured_offset_m(path: Path, cache: TileCache, t: int, lat: float, lon: float) -> tuple[float, float]:
    """Ground offset (east, north) in metres between the tile's pixels and the source map
    around (lat, lon): Lucas-Kanade on the independently resampled source, to sub-centimetre."""
    xc, yc = Transformer.from_crs("EPSG:4326", cache.crs, always_xy=True).transform(lon, lat)
    tile = grey(cache.tile_image(t))
    inner = (slice(8, -8), slice(8, -8))  # away from borders and blur edges
    offset = np.zeros(2)
    for _ in range(5):
        ref = source_patch_at(path, xc + offset[0], yc + offset[1], cache.crs, cache.gsd_m, cache.tile_px)
        gy, gx = np.gradient(ref)
        # moving the sample centre east by e metres moves content by -e/gsd columns
        j = np.stack([-gx[inner].ravel(), gy[inner].ravel()], axis=1) / cache.gsd_m
        r = (ref - tile)[inner].ravel()
        step = np.linalg.lstsq(j, r, rcond=None)[0]
        offset += step
        if np.hypot(*step) < 1e-4:
            break
    return float(offset[0]), float(offset[1])


def interior_tiles(cache: TileCache, count: int = 5) -> list[int]:
    full = np.nonzero(cache.tiles["valid_fraction"] >= 0.98)[0]
    assert len(full) >= min(count, 3)
    return sorted({int(t) for t in full[np.linspace(0, len(full) - 1, count).astype(int)]})


def test_tile_centres_agree_with_pyproj_and_rasterio_within_5_cm(real_cache):
    path, cache = real_cache
    worst = 0.0
    for t in interior_tiles(cache):
        xc, yc = Transformer.from_crs("EPSG:4326", cache.crs, always_xy=True).transform(cache.lon[t], cache.lat[t])
        ref = source_patch_at(path, xc, yc, cache.crs, cache.gsd_m, cache.tile_px)
        assert np.abs(grey(cache.tile_image(t)) - ref).mean() < 8.0, f"tile {t} does not show the same ground"
        east, north = measured_offset_m(path, cache, t, cache.lat[t], cache.lon[t])
        worst = max(worst, float(np.hypot(east, north)))
    print(f"{path.name}: worst tile-centre offset {worst * 100:.2f} cm")
    assert worst < 0.05


def test_offset_measurement_detects_a_5_cm_error(real_cache):
    """The check above can fail: a tile centre off by 5 cm is measured as 5 cm."""
    path, cache = real_cache
    t = interior_tiles(cache, 1)[0]
    wrong_lon, wrong_lat = Transformer.from_crs(cache.crs, "EPSG:4326", always_xy=True).transform(
        cache.x[t] + 0.05, cache.y[t])
    east, north = measured_offset_m(path, cache, t, wrong_lat, wrong_lon)
    print(f"{path.name}: 5 cm east error measured as east {east * 100:.2f} cm, north {north * 100:.2f} cm")
    assert abs(east + 0.05) < 0.01 and abs(north) < 0.01


def test_stored_geometry_matches_an_independent_projection(real_cache):
    _, cache = real_cache
    to_metric = Transformer.from_crs("EPSG:4326", cache.crs, always_xy=True)
    x, y = to_metric.transform(cache.lon, cache.lat)
    assert np.abs(x - cache.x).max() < 1e-3 and np.abs(y - cache.y).max() < 1e-3
    # footprint corners are tile_size apart on the ground in the metric CRS
    fp = cache.tiles["footprint_lonlat"]
    cx, cy = to_metric.transform(fp[..., 0], fp[..., 1])
    assert np.allclose(cx[:, 1] - cx[:, 0], cache.tile_size_m, atol=1e-3)
    assert np.allclose(cy[:, 0] - cy[:, 3], cache.tile_size_m, atol=1e-3)


def test_latlon_to_tile_pixel_and_back_is_exact_to_the_centimetre(real_cache):
    _, cache = real_cache
    rng = np.random.default_rng(0)
    geod = Geod(ellps="WGS84")
    lat0, lat1 = cache.lat.min(), cache.lat.max()
    lon0, lon1 = cache.lon.min(), cache.lon.max()
    checked = 0
    for lat, lon in zip(rng.uniform(lat0, lat1, 200), rng.uniform(lon0, lon1, 200)):
        x, y = cache.lonlat_to_xy(lon, lat)
        t = cache.tile_at(x, y)
        if t is None:
            continue
        col, row = cache.xy_to_tile_pixel(t, x, y)
        assert -0.5 <= col <= cache.tile_px - 0.5 and -0.5 <= row <= cache.tile_px - 0.5
        x2, y2 = cache.tile_pixel_to_xy(t, col, row)
        lon2, lat2 = cache.xy_to_lonlat(x2, y2)
        _, _, dist = geod.inv(lon, lat, float(lon2), float(lat2))
        assert dist < 0.01
        checked += 1
    assert checked > 50


def test_black_fill_outside_the_survey_is_never_tiled(tmp_path):
    path = DATA / "5b90f92da0d7280005fab355_4310.tif"
    if not path.is_file():
        print(f"skipping: {path} not found (CI has ../shared/data)")
        pytest.skip(f"{path} not found")
    with rasterio.open(path) as src:
        black = float((src.read([1, 2, 3]) == 0).all(axis=0).mean())
        bounds = src.bounds
        src_crs = src.crs
    assert black > 0.15  # Manila: black fill without a declared nodata value
    cache = TileCache.load(build_cache([path], tmp_path / "c", MeanColourEmbedder(), gsd_m=0.5, tile_size_m=10.0,
                                       stride_m=5.0, min_valid_fraction=0.8, progress=False))
    for t in range(len(cache)):
        assert (cache.tile_image(t) == 0).all(axis=2).mean() <= 0.2 + 1e-6
    left, bottom, right, top = transform_bounds(src_crs, cache.crs, *bounds)
    covered = len(cache) * cache.stride_m ** 2  # each tile stands for one stride cell
    assert covered < (right - left) * (top - bottom) * (1.0 - black) * 1.05
