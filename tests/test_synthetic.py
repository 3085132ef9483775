"""Synthetic cross-view pairs: held-out split by ground, drone views that match their tile."""
from dataclasses import replace

import cv2
import numpy as np
import pytest

from mean_nav.data.synthetic import SyntheticConfig, SyntheticPairSource
from mean_nav.data.world import generate_world
from mean_nav.errors import MeanNavError


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    # 448 px at 0.5 m: a 224 m square of procedural ground
    return generate_world(tmp_path_factory.mktemp("w") / "w.tif", seed=3, size_px=448, gsd_m=0.5)


def base_cfg(world, **kw):
    cfg = SyntheticConfig(maps=[str(world)], gsd_m=0.5, tile_m=60.0, stride_m=20.0, view_px=64,
                          camera_px=160, min_valid_fraction=0.9)
    return replace(cfg, **kw)


def ncc(a, b):
    a = a.astype(np.float32).mean(axis=2).ravel()
    b = b.astype(np.float32).mean(axis=2).ravel()
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-6))


def test_held_out_strip_shares_no_ground_with_training(world):
    cfg = base_cfg(world, holdout_fraction=0.4)
    train, held = SyntheticPairSource.both_splits(cfg)
    assert len(train) > 0 and len(held) > 0
    half = cfg.tile_m / 2
    train_east = max(l.x for l in train.locations) + half + cfg.nadir_jitter_m
    held_west = min(l.x for l in held.locations) - half
    assert train_east <= held_west


def test_holdout_maps_are_left_out_of_training_entirely(world, tmp_path):
    other = generate_world(tmp_path / "other.tif", seed=4, size_px=448, gsd_m=0.5)
    cfg = replace(base_cfg(world), maps=[str(world), str(other)], holdout_maps=["other.tif"])
    train, held = SyntheticPairSource.both_splits(cfg)
    assert {l.map_index for l in train.locations} == {0}
    assert {l.map_index for l in held.locations} == {1}


def test_clean_rectified_view_reproduces_the_satellite_tile(world):
    # no attitude, no telemetry error, no photometric change: rectify(render(map)) == map crop
    cfg = base_cfg(world, max_tilt_deg=0, nadir_jitter_m=0, yaw_error_deg=0, attitude_error_deg=0,
                   height_error_fraction=0, degrade_strength=(0.0, 0.0), occlusion_strength=0,
                   height_m=(60.0, 60.0))
    src = SyntheticPairSource(cfg, "train")
    for i in range(0, len(src), 3):
        drone = src.drone(i, np.random.default_rng(i))  # random yaw, undone by rectification
        sat = src.satellite(i)
        (dx, dy), _ = cv2.phaseCorrelate(sat.mean(axis=2), drone.astype(np.float64).mean(axis=2))
        assert abs(dx) < 0.6 and abs(dy) < 0.6  # pixels: the same ground, same place, north-up
        assert ncc(drone, sat) > 0.75  # resampling twice blurs fine crop rows a little


def test_noisy_drone_views_still_match_their_own_tile_best(world):
    src = SyntheticPairSource(base_cfg(world), "train")
    sats = [src.satellite(i) for i in range(len(src))]
    hits = 0
    for i in range(len(src)):
        view = src.drone(i, np.random.default_rng(100 + i))
        scores = [ncc(view, s) for s in sats]
        hits += int(np.argmax(scores) == i)
    assert hits >= 0.7 * len(src)


def test_views_are_reproducible_from_the_rng_and_vary_without_it(world):
    src = SyntheticPairSource(base_cfg(world), "train")
    a = src.drone(0, np.random.default_rng(5))
    assert np.array_equal(a, src.drone(0, np.random.default_rng(5)))
    assert not np.array_equal(a, src.drone(0, np.random.default_rng(6)))
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8


def test_camera_views_are_the_oblique_rotated_frame(world):
    cfg = base_cfg(world, drone_view="camera")
    src = SyntheticPairSource(cfg, "train")
    img = src.drone(0, np.random.default_rng(0))
    assert img.shape == (64, 64, 3)
    rect = SyntheticPairSource(base_cfg(world), "train", rasters=src.rasters).drone(0, np.random.default_rng(0))
    assert not np.array_equal(img, rect)


def test_evaluation_set_is_fixed(world):
    src = SyntheticPairSource(base_cfg(world, eval_views_per_location=2), "train")
    d1, l1, s1, sl = src.evaluation_set()
    d2, _, _, _ = src.evaluation_set()
    assert len(d1) == 2 * len(src) and list(sl) == list(range(len(src)))
    assert all(np.array_equal(a, b) for a, b in zip(d1, d2))
    assert list(l1[:4]) == [0, 0, 1, 1]


def test_bad_synthetic_configs_name_the_field(world, tmp_path):
    with pytest.raises(MeanNavError, match="maps.*missing.tif"):
        SyntheticPairSource(replace(base_cfg(world), maps=[str(tmp_path / "missing.tif")]), "train")
    with pytest.raises(MeanNavError, match="holdout_maps"):
        SyntheticPairSource(base_cfg(world, holdout_maps=["nope.tif"]), "train")
    with pytest.raises(MeanNavError, match="no train locations"):
        SyntheticPairSource(base_cfg(world, tile_m=400.0), "train")
    with pytest.raises(MeanNavError, match="no held-out locations"):
        SyntheticPairSource.both_splits(base_cfg(world, holdout_fraction=0.1))  # strip narrower than a tile
