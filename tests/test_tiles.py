"""Tile grid, block planning, black-as-nodata, map parts and the spatial grid index."""
from __future__ import annotations

import numpy as np
import pytest
import rasterio
from affine import Affine

from mean_nav.errors import MeanNavError
from mean_nav.geo.spatial_index import GridIndex
from mean_nav.geo.tiles import (MapMosaic, TileGrid, cut_tiles, maps_overlapping, plan_blocks, read_window,
                                shard_rows, write_map_part)

UTM32N = "EPSG:32632"


def write_geotiff(path, rgb, crs, transform, nodata=None):
    h, w, _ = rgb.shape
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=3, dtype="uint8", crs=crs,
                       transform=transform, nodata=nodata) as dst:
        dst.write(rgb.transpose(2, 0, 1))
    return path


def textured(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(1, 256, (h, w, 3), dtype=np.uint8)


def test_grid_rejects_tile_size_not_a_multiple_of_gsd():
    with pytest.raises(MeanNavError, match="tile_size_m"):
        TileGrid.from_metres(UTM32N, 0.3, 10.0, 3.0)
    with pytest.raises(MeanNavError, match="stride_m"):
        TileGrid.from_metres(UTM32N, 0.5, 10.0, 12.0)
    with pytest.raises(MeanNavError, match="not metric"):
        TileGrid.from_metres("EPSG:4326", 0.5, 10.0, 5.0)


def test_tile_range_holds_exactly_the_tiles_overlapping_the_bounds():
    grid = TileGrid.from_metres(UTM32N, 0.5, 20.0, 7.5)
    bounds = (500003.2, 5200001.1, 500101.7, 5200077.9)
    i0, i1, j0, j1 = grid.tile_range(bounds)
    half = grid.tile_size_m / 2
    for i in range(i0 - 2, i1 + 2):
        for j in range(j0 - 2, j1 + 2):
            x, y = grid.tile_centre_xy(i, j)
            overlaps = (x - half < bounds[2] and x + half > bounds[0]
                        and y - half < bounds[3] and y + half > bounds[1])
            assert overlaps == (i0 <= i < i1 and j0 <= j < j1), (i, j)


def test_tile_centre_is_the_middle_of_its_pixels():
    grid = TileGrid.from_metres(UTM32N, 0.25, 10.0, 5.0)
    i, j = 1234, -987
    x, y = grid.tile_centre_xy(i, j)
    c0, r0 = i * grid.stride_px, j * grid.stride_px
    xs, ys = grid.pixel_to_xy([c0, c0 + grid.tile_px - 1], [r0, r0 + grid.tile_px - 1])
    assert np.isclose(x, xs.mean()) and np.isclose(y, ys.mean())
    col, row = grid.xy_to_pixel(*grid.pixel_to_xy(17.0, 23.0))
    assert np.allclose([col, row], [17.0, 23.0])


@pytest.mark.parametrize("tile_px,stride_px,block_px", [(8, 4, 20), (8, 8, 16), (10, 3, 25), (6, 6, 4)])
def test_blocks_own_every_tile_pixel_exactly_once(tile_px, stride_px, block_px):
    grid = TileGrid(TileGrid.from_metres(UTM32N, 1.0, 2.0, 1.0).crs, 1.0, tile_px, stride_px)
    tr = (3, 17, -5, 6)
    blocks = plan_blocks(grid, tr, block_px=block_px)
    assert sum(b.num_tiles for b in blocks) == (tr[1] - tr[0]) * (tr[3] - tr[2])
    c_lo, r_lo = tr[0] * stride_px, tr[2] * stride_px
    width = (tr[1] - 1) * stride_px + tile_px - c_lo
    height = (tr[3] - 1) * stride_px + tile_px - r_lo
    owned = np.zeros((height, width), int)
    for b in blocks:
        c0, r0, w, h = b.own_window(grid)
        owned[r0 - r_lo:r0 - r_lo + h, c0 - c_lo:c0 - c_lo + w] += 1
        rc0, rr0, rw, rh = b.read_window(grid)
        assert (rc0, rr0) == (c0, r0) and rw >= w and rh >= h
        # the read window covers the last tile of the block
        assert rc0 + rw == (b.i1 - 1) * stride_px + tile_px and rr0 + rh == (b.j1 - 1) * stride_px + tile_px
    assert (owned == 1).all()


def test_shards_are_disjoint_row_bands_whose_map_parts_tile_the_area_once():
    grid = TileGrid(TileGrid.from_metres(UTM32N, 1.0, 2.0, 1.0).crs, 1.0, 8, 4)
    tr = (0, 9, 0, 10)
    owned = np.zeros(((tr[3] - 1) * 4 + 8, (tr[1] - 1) * 4 + 8), int)
    tiles = []
    for i in range(3):
        for b in plan_blocks(grid, tr, block_px=16, rows=shard_rows(tr, (i, 3))):
            c0, r0, w, h = b.own_window(grid)
            owned[r0:r0 + h, c0:c0 + w] += 1
            tiles += [(bi, bj) for bi in range(b.i0, b.i1) for bj in range(b.j0, b.j1)]
    assert (owned == 1).all()
    assert sorted(tiles) == [(i, j) for i in range(9) for j in range(10)]
    assert shard_rows(tr, (0, 3)) == (0, 3) and shard_rows(tr, (2, 3)) == (6, 10)
    with pytest.raises(MeanNavError, match="shard"):
        shard_rows(tr, (3, 3))
    with pytest.raises(MeanNavError, match="fewer than 11 shards"):
        shard_rows(tr, (0, 11))


def test_black_pixels_without_declared_nodata_are_not_valid_and_empty_tiles_are_skipped(tmp_path):
    rgb = textured(200, 200)
    rgb[:, :120] = 0  # survey footprint ends: black fill, no nodata value declared
    path = write_geotiff(tmp_path / "m.tif", rgb, UTM32N, Affine(1, 0, 500000, 0, -1, 5200200))
    grid = TileGrid.from_metres(UTM32N, 1.0, 40.0, 40.0)
    tr = grid.tile_range((500000, 5200000, 500200, 5200200))
    block = plan_blocks(grid, tr, block_px=4096)[0]
    image, valid = read_window([path], grid, *block.read_window(grid))
    assert not valid[:, :110].any() and valid[10:190, 130:190].all()
    ii, jj, frac, images = cut_tiles(grid, block, image, valid, min_valid_fraction=0.5)
    assert len(ii) == 10  # 2 of 5 tile columns (x 120..200 m) have map; 5 rows
    assert frac.min() >= 0.5 and all(im.shape == (40, 40, 3) for im in images)
    x, _ = grid.tile_centre_xy(ii, jj)
    assert (x > 500120).all()


def test_declared_nodata_is_respected(tmp_path):
    rgb = textured(100, 100)
    rgb[60:] = 255
    path = write_geotiff(tmp_path / "m.tif", rgb, UTM32N, Affine(1, 0, 500000, 0, -1, 5200100), nodata=255)
    grid = TileGrid.from_metres(UTM32N, 1.0, 20.0, 20.0)
    _, valid = read_window([path], grid, 500000, -5200100, 100, 100)
    assert valid[:58].all() and not valid[62:].any()


def test_map_parts_read_back_as_one_mosaic_across_part_boundaries(tmp_path):
    grid = TileGrid.from_metres(UTM32N, 1.0, 4.0, 4.0)
    full = textured(300, 280, seed=3)
    full_valid = np.ones((300, 280), bool)
    full_valid[:20, :30] = False
    parts = []
    for k, (c0, r0, w, h) in enumerate([(0, 0, 280, 100), (0, 100, 140, 200), (140, 100, 140, 200)]):
        name = f"part-{k}.tif"
        write_map_part(tmp_path / name, grid, 1000 + c0, 2000 + r0, full[r0:r0 + h, c0:c0 + w],
                       full_valid[r0:r0 + h, c0:c0 + w])
        parts.append({"file": name, "col0": 1000 + c0, "row0": 2000 + r0, "width": w, "height": h})
    mosaic = MapMosaic(tmp_path, parts)
    image, valid = mosaic.read(1000 + 120, 2000 + 80, 50, 60)  # touches all three parts
    assert np.array_equal(image, full[80:140, 120:170]) and valid.all()
    image, valid = mosaic.read(990, 1990, 40, 40)  # outside the map on two sides
    # window rows/cols 0..10 lie outside every part; rows 10..30 are the invalid corner
    assert not valid[:30].any() and not valid[:, :10].any()
    assert valid[30:, 10:].all() and np.array_equal(image[30:, 10:], full[20:30, 0:30])
    with rasterio.open(tmp_path / "part-1.tif") as src:  # a real georeferenced GeoTIFF
        assert src.crs.to_epsg() == 32632 and src.transform.c == 1000.0 and src.transform.f == -2100.0
    mosaic.close()


def test_grid_index_radius_query_matches_brute_force():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 5000, 20000)
    y = rng.uniform(-3000, 2000, 20000)
    index = GridIndex(x, y, cell_m=100.0)
    for _ in range(30):
        qx, qy, r = rng.uniform(-500, 5500), rng.uniform(-3500, 2500), rng.uniform(0, 800)
        expect = np.nonzero((x - qx) ** 2 + (y - qy) ** 2 <= r * r)[0]
        assert np.array_equal(index.query_radius(qx, qy, r), expect)
    best = index.nearest(2500.0, 0.0, 1000.0)
    assert best == int(np.argmin((x - 2500) ** 2 + y ** 2))


def test_grid_index_cost_depends_on_points_nearby_not_on_total():
    # a 1000 x 1000 regular layout (1M centres, 50 m apart): a 500 m query inspects only
    # the few cells around it
    ii, jj = np.meshgrid(np.arange(1000), np.arange(1000))
    index = GridIndex(ii.ravel() * 50.0, jj.ravel() * 50.0, cell_m=200.0)
    inside = index.query_radius(25000.0, 25000.0, 500.0)
    cand = index.candidates(25000.0, 25000.0, 500.0)
    assert len(inside) == 317  # lattice points in a circle of radius 10 spacings
    assert len(cand) <= 2 * (1000.0 / 200 + 1) ** 2 * 16  # bounded by the cells in the box
    assert len(cand) < 1000


def test_grid_index_stays_small_for_far_apart_areas():
    x = np.array([0.0, 1.0, 9e6])
    y = np.array([0.0, 1.0, 9e6])
    index = GridIndex(x, y, cell_m=1.0)
    assert index.ncx * index.ncy <= index.MAX_CELLS_PER_POINT * 3 + 16
    assert list(index.query_radius(0.0, 0.0, 2.0)) == [0, 1]


def test_blocks_read_only_the_maps_that_touch_them():
    grid = TileGrid.from_metres(UTM32N, 1.0, 10.0, 10.0)
    paths = ["west.tif", "east.tif", "far.tif"]
    bounds = [(500000, 5200000, 500100, 5200100), (500090, 5200000, 500200, 5200100), (600000, 0, 600010, 10)]
    # window x 500050..500095, y 5200050..5200095 (global rows counted southwards from y = 0)
    hit = maps_overlapping(paths, bounds, grid, 500050, -5200095, 45, 45)
    assert hit == ["west.tif", "east.tif"]
    assert maps_overlapping(paths, bounds, grid, 500120, -5200095, 10, 10) == ["east.tif"]
    image, valid = read_window([], grid, 0, 0, 4, 3)
    assert image.shape == (3, 4, 3) and not valid.any()
