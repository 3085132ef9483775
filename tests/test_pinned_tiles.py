"""Pins the tile grid by brute force and by hand: which tiles overlap which ground, how large
a block may grow, the valid fraction of each tile, and the pixel <-> metre convention as
rasterio reads a GeoTIFF."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import rasterio
from affine import Affine

from mean_nav.errors import MeanNavError
from mean_nav.geo.tiles import (Block, MapMosaic, TileGrid, cut_tiles, maps_overlapping, plan_blocks,
                             read_window, shard_rows, write_map_part)

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


# --- validation, shards, overlap edges, valid fractions, map parts -------------------------

@pytest.mark.parametrize("gsd", [0.0, -0.5])
def test_a_grid_needs_a_positive_gsd(gsd):
    with pytest.raises(MeanNavError, match="gsd_m"):
        TileGrid.from_metres(UTM32N, gsd, 40.0, 20.0)


@pytest.mark.parametrize("field, tile_m, stride_m", [("tile_size_m", 0.0, 20.0), ("stride_m", 40.0, 0.0),
                                                    ("tile_size_m", -40.0, 20.0)])
def test_tile_and_stride_must_be_positive(field, tile_m, stride_m):
    with pytest.raises(MeanNavError, match=f"{field}: must be positive"):
        TileGrid.from_metres(UTM32N, 0.5, tile_m, stride_m)


def test_a_tile_smaller_than_a_pixel_is_refused():
    # 1e-7 m rounds to 0 pixels of 0.5 m: no tile at all, whatever the rounding tolerance
    with pytest.raises(MeanNavError, match="whole number"):
        TileGrid.from_metres(UTM32N, 0.5, 1e-7, 1e-7)


def test_a_float_multiple_of_the_gsd_is_whole_and_sizes_read_back_in_metres():
    grid = TileGrid.from_metres(UTM32N, 0.1, 0.1 * 30, 0.1 * 7)       # 3.0000000000000004 m
    assert (grid.tile_px, grid.stride_px) == (30, 7)
    assert grid.tile_size_m == pytest.approx(3.0) and grid.stride_m == pytest.approx(0.7)


def test_a_shard_row_range_wider_than_the_area_plans_the_whole_area():
    grid = grid_of(1.0, 8, 4)
    whole = plan_blocks(grid, (0, 6, 2, 7), block_px=16)
    assert plan_blocks(grid, (0, 6, 2, 7), block_px=16, rows=(-10, 50)) == whole
    # 3 tiles of 8 px at a 4 px stride fit in 16 px: rows 2..4 and 5..6
    assert {(b.j0, b.j1) for b in whole} == {(2, 5), (5, 7)}


def test_shard_rows_by_hand():
    rng = (0, 9, 5, 11)                                       # tile rows 5..10: six rows
    assert shard_rows(rng, None) == (5, 11)
    assert shard_rows(rng, (0, 1)) == (5, 11)                 # one shard: all of it
    assert [shard_rows(rng, (i, 3)) for i in range(3)] == [(5, 7), (7, 9), (9, 11)]
    assert [shard_rows(rng, (i, 6)) for i in range(6)] == [(5 + i, 6 + i) for i in range(6)]  # a row each
    with pytest.raises(MeanNavError, match="only 6 tile rows"):
        shard_rows(rng, (0, 7))
    for bad in [(0, 0), (3, 3), (-1, 2)]:
        with pytest.raises(MeanNavError, match="not valid"):
            shard_rows(rng, bad)


def test_maps_touching_a_window_edge_or_beside_it_do_not_overlap_it(tmp_path):
    grid = grid_of(0.5, 8, 4)
    window = (200, -400, 20, 20)                      # x in [100, 110), y in (190, 200]
    maps = {
        "inside": (102.0, 192.0, 108.0, 198.0),
        "covering": (50.0, 150.0, 150.0, 250.0),
        "right": (115.0, 150.0, 130.0, 195.0),        # a window as wide in pixels as in metres would reach it
        "below": (105.0, 150.0, 130.0, 185.0),
        "above": (105.0, 205.0, 130.0, 230.0),
        "touching left": (90.0, 150.0, 100.0, 195.0),
        "touching right": (110.0, 150.0, 130.0, 195.0),
        "touching top": (105.0, 200.0, 130.0, 230.0),
        "touching bottom": (105.0, 150.0, 130.0, 190.0),
    }
    paths = [tmp_path / f"{name}.tif" for name in maps]
    got = maps_overlapping(paths, list(maps.values()), grid, *window)
    assert [p.stem for p in got] == ["inside", "covering"]


def test_a_tile_at_exactly_the_minimum_valid_fraction_is_kept_and_an_empty_one_never():
    grid = grid_of(1.0, 4, 4)
    block = plan_blocks(grid, (0, 3, 0, 1), block_px=1000)[0]       # three 4 x 4 tiles in a row
    valid = np.zeros((4, 12), bool)
    valid[:2, 0:4] = True                 # tile 0: 8 / 16 = exactly 0.5
    valid[0, 4] = True                    # tile 1: one pixel; tile 2: nothing
    image = np.full((4, 12, 3), 77, np.uint8)
    ii, _, fracs, images = cut_tiles(grid, block, image, valid, min_valid_fraction=0.5)
    assert ii.tolist() == [0] and fracs.tolist() == [0.5] and len(images) == 1
    ii, _, fracs, images = cut_tiles(grid, block, image, valid, min_valid_fraction=0.0)
    assert ii.tolist() == [0, 1] and fracs.tolist() == [0.5, 1 / 16] and len(images) == 2


def _part(tmp_path, name, w, h, seed):
    grid = grid_of(1.0, 8, 8)
    rng = np.random.default_rng(seed)
    image = rng.integers(1, 256, (h, w, 3), dtype=np.uint8)
    valid = rng.random((h, w)) < 0.8
    write_map_part(tmp_path / name, grid, 4000, 1000, image, valid)
    return image, valid


@pytest.mark.parametrize("w, h, tiled", [(300, 260, True), (256, 256, True), (300, 100, False),
                                         (100, 300, False)])
def test_a_map_part_is_rgb_plus_alpha_in_256_px_tiles_when_that_large(tmp_path, w, h, tiled):
    image, valid = _part(tmp_path, "p.tif", w, h, seed=w + h)
    with rasterio.open(tmp_path / "p.tif") as src:
        assert src.count == 4 and [c.name for c in src.colorinterp] == ["red", "green", "blue", "alpha"]
        if tiled:
            assert set(src.block_shapes) == {(256, 256)}
        else:                                   # strips: blocks as wide as the part
            assert {shape[1] for shape in src.block_shapes} == {w}
        assert src.transform == Affine(1.0, 0.0, 4000.0, 0.0, -1.0, -1000.0)
        rgb, alpha = src.read([1, 2, 3]).transpose(1, 2, 0), src.read(4)
    assert np.array_equal(alpha > 0, valid) and np.array_equal(rgb[valid], image[valid])


def test_a_mosaic_window_inside_one_part_reads_only_that_part_and_can_be_read_after_close(tmp_path):
    grid = grid_of(1.0, 8, 8)
    parts, full = [], np.zeros((40, 40, 3), np.uint8)
    rng = np.random.default_rng(9)
    for k, (c0, r0) in enumerate([(0, 0), (20, 0), (0, 20), (20, 20)]):   # four 20 x 20 parts
        img = rng.integers(1, 256, (20, 20, 3), dtype=np.uint8)
        full[r0:r0 + 20, c0:c0 + 20] = img
        write_map_part(tmp_path / f"{k}.tif", grid, 500 + c0, 700 + r0, img, np.ones((20, 20), bool))
        parts.append({"file": f"{k}.tif", "col0": 500 + c0, "row0": 700 + r0, "width": 20, "height": 20})
    mosaic = MapMosaic(tmp_path, parts)
    image, valid = mosaic.read(525, 722, 10, 12)              # inside the bottom-right part only
    assert valid.all() and np.array_equal(image, full[22:34, 25:35])
    mosaic.close()
    open_files = {os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")}
    assert not any(f.startswith(str(tmp_path)) for f in open_files)    # close() let go of every part
    image, valid = mosaic.read(515, 715, 10, 10)              # all four parts, after close
    assert valid.all() and np.array_equal(image, full[15:25, 15:25])
    mosaic.close()
