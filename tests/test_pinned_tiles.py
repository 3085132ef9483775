"""Pins the tile grid by brute force and by hand: which tiles overlap which ground, how large
a block may grow, the valid fraction of each tile, and the pixel <-> metre convention as
rasterio reads a GeoTIFF."""
from __future__ import annotations

import math

import numpy as np
import pytest
import rasterio
from affine import Affine

from mean_nav.geo.tiles import Block, TileGrid, cut_tiles, maps_overlapping, plan_blocks, read_window

UTM32N = "EPSG:32632"


def grid_of(gsd_m: float, tile_px: int, stride_px: int) -> TileGrid:
    return TileGrid.from_metres(UTM32N, gsd_m, tile_px * gsd_m, stride_px * gsd_m)


def overlapping_tiles_brute_force(grid: TileGrid, bounds, search: range) -> set[tuple[int, int]]:
    """Tile (i, j) covers x in [i s g, (i s + t) g), y in (-(j s + t) g, -j s g]; keep those
    sharing a positive area with the bounds."""
    left, bottom, right, top = bounds
    g, s, t = grid.gsd_m, grid.stride_px, grid.tile_px
    return {(i, j) for i in search for j in search
            if i * s * g < right and (i * s + t) * g > left and -(j * s + t) * g < top and -j * s * g > bottom}


@pytest.mark.parametrize("gsd, tile_px, stride_px", [(0.5, 40, 15), (1.0, 8, 8), (0.25, 10, 3), (2.0, 6, 5)])
def test_tile_range_is_exactly_the_overlapping_tiles_for_edges_on_and_off_the_grid(gsd, tile_px, stride_px):
    grid = grid_of(gsd, tile_px, stride_px)
    rng = np.random.default_rng(tile_px)
    s = stride_px * gsd
    search = range(-30, 30)
    for _ in range(80):
        # edges on a tile start/end, on a pixel edge, or anywhere: the rounding cases all occur
        edges = []
        for _side in range(4):
            kind = rng.integers(3)
            k = rng.integers(-10, 20)
            if kind == 0:
                edges.append(k * s + rng.choice([0.0, tile_px * gsd]))
            elif kind == 1:
                edges.append((k * stride_px + rng.integers(0, tile_px)) * gsd)
            else:
                edges.append(k * s + rng.uniform(0, s))
        left, right = sorted(edges[:2])
        bottom, top = sorted(edges[2:])
        if right - left < gsd or top - bottom < gsd:
            continue
        i0, i1, j0, j1 = grid.tile_range((left, bottom, right, top))
        got = {(i, j) for i in range(i0, i1) for j in range(j0, j1)}
        assert got == overlapping_tiles_brute_force(grid, (left, bottom, right, top), search), \
            (left, bottom, right, top)


def test_tile_range_by_hand():
    grid = grid_of(1.0, 10, 5)           # tile i spans x in [5 i, 5 i + 10), row j y in (-5 j - 10, -5 j]
    # x in (12, 18): tiles 1 [5, 15), 2 [10, 20), 3 [15, 25);
    # y in (-9, -1): rows -1 (-5, 5], 0 (-10, 0], 1 (-15, -5]
    assert grid.tile_range((12.0, -9.0, 18.0, -1.0)) == (1, 4, -1, 2)
    # edges exactly on tile boundaries share no area with the tiles beyond them:
    # x in (15, 20): tiles 2 and 3 (not 1, which ends at 15); y in (-10, -5): rows 0 and 1
    assert grid.tile_range((15.0, -10.0, 20.0, -5.0)) == (2, 4, 0, 2)


@pytest.mark.parametrize("tile_px, stride_px, block_px", [(8, 4, 20), (8, 8, 16), (10, 3, 25), (40, 15, 100),
                                                          (6, 6, 4)])
def test_blocks_are_as_large_as_fit_in_block_px(tile_px, stride_px, block_px):
    grid = grid_of(1.0, tile_px, stride_px)
    blocks = plan_blocks(grid, (0, 50, 0, 3), block_px=block_px)
    # tiles per block row: the most n with (n - 1) * stride + tile <= block_px (at least one)
    n = max(1, max(k for k in range(1, 100) if (k - 1) * stride_px + tile_px <= block_px)
            if tile_px <= block_px else 1)
    full = [b for b in blocks if b.i1 < 50]
    assert full and all(b.i1 - b.i0 == n for b in full)
    for b in blocks:
        _, _, width, _ = b.read_window(grid)
        assert width <= max(block_px, tile_px)


def test_block_read_window_by_hand():
    grid = grid_of(1.0, 10, 4)
    block = Block(0, i0=2, i1=5, j0=-1, j1=1, own_col1=20, own_row1=4)
    # tiles 2..4 start at columns 8, 12, 16 and the last ends at 26; rows -1..0 span -4 .. 10
    assert block.read_window(grid) == (8, -4, 18, 14)
    assert block.own_window(grid) == (8, -4, 12, 8)
    assert block.num_tiles == 6


def test_cut_tiles_counts_the_valid_pixels_of_each_tile():
    grid = grid_of(1.0, 6, 4)
    block = plan_blocks(grid, (0, 5, 0, 4), block_px=1000)[0]
    _, _, w, h = block.read_window(grid)
    rng = np.random.default_rng(3)
    valid = rng.random((h, w)) < 0.6
    valid[:, :9] = False                          # tile column 0 and most of column 1 empty
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    ii, jj, fracs, images = cut_tiles(grid, block, image, valid, min_valid_fraction=0.3)
    expected = {}
    for j in range(4):
        for i in range(5):
            window = (slice(j * 4, j * 4 + 6), slice(i * 4, i * 4 + 6))
            frac = valid[window].mean()
            if frac >= 0.3 and valid[window].any():
                expected[(i, j)] = (frac, image[window])
    assert [(int(i), int(j)) for i, j in zip(ii, jj)] == sorted(expected, key=lambda ij: (ij[1], ij[0]))
    for i, j, frac, img in zip(ii, jj, fracs, images):
        want_frac, want_img = expected[(int(i), int(j))]
        assert frac == pytest.approx(want_frac)
        assert np.array_equal(img, want_img)


def test_pixel_and_metre_conventions_by_hand():
    grid = grid_of(0.5, 20, 10)
    # global pixel (0, 0) covers x in [0, 0.5), y in [-0.5, 0): its centre is (0.25, -0.25)
    assert grid.pixel_to_xy(0, 0) == (pytest.approx(0.25), pytest.approx(-0.25))
    assert grid.xy_to_pixel(10.25, -20.25) == (pytest.approx(20.0), pytest.approx(40.0))
    # tile (3, 2) starts at pixel (30, 20) and is 20 px = 10 m wide: centre (20, -15) m
    assert grid.tile_centre_xy(3, 2) == (pytest.approx(20.0), pytest.approx(-15.0))
    assert grid.transform(30, 20) @ (0, 0) == (pytest.approx(15.0), pytest.approx(-10.0))
    assert grid.transform(30, 20) @ (1, 1) == (pytest.approx(15.5), pytest.approx(-10.5))


def test_read_window_returns_the_source_pixels_rasterio_places_there(tmp_path):
    grid = grid_of(1.0, 8, 4)
    rng = np.random.default_rng(5)
    rgb = rng.integers(1, 256, (40, 60, 3), dtype=np.uint8)
    # the map's top-left corner is at x = 500000 + 7 m, y = 5200000 - 3 m: global pixel (500007, -5199997)
    x0, y0 = 500007.0, 5199997.0
    path = tmp_path / "m.tif"
    with rasterio.open(path, "w", driver="GTiff", width=60, height=40, count=3, dtype="uint8", crs=UTM32N,
                       transform=Affine(1, 0, x0, 0, -1, y0)) as dst:
        dst.write(rgb.transpose(2, 0, 1))
    col0, row0 = int(x0) + 5, -int(y0) + 2          # a window 5 columns and 2 rows into the map
    image, valid = read_window([path], grid, col0, row0, 10, 6)
    assert valid.all()
    assert np.array_equal(image, rgb[2:8, 5:15])
    # one map left of the window, one inside it: only the one touching it is read
    far = (x0 - 100.0, y0 - 40.0, x0 - 50.0, y0)
    near = (x0, y0 - 40.0, x0 + 60.0, y0)
    assert maps_overlapping([tmp_path / "far.tif", path], [far, near], grid, col0, row0, 10, 6) == [path]
    touching = (x0 + 15.0, y0 - 40.0, x0 + 30.0, y0)     # starts exactly at the window's right edge
    assert maps_overlapping([path], [touching], grid, col0, row0, 10, 6) == []
    assert math.isclose(grid.pixel_to_xy(col0, row0)[0], x0 + 5.5)


def test_map_overlap_is_judged_in_metres_at_any_gsd(tmp_path):
    grid = grid_of(0.5, 8, 4)                        # 0.5 m pixels: pixel 200 starts at 100 m
    window = (200, -400, 20, 20)                      # x in [100, 110), y in (190, 200]
    inside = (105.0, 150.0, 130.0, 195.0)
    left_of_it = (0.0, 150.0, 99.0, 195.0)
    paths = [tmp_path / "in.tif", tmp_path / "left.tif"]
    assert maps_overlapping(paths, [inside, left_of_it], grid, *window) == [paths[0]]


def test_a_window_without_maps_is_empty_and_invalid():
    image, valid = read_window([], grid_of(1.0, 8, 4), 0, 0, 12, 7)
    assert image.shape == (7, 12, 3) and not image.any() and not valid.any()
