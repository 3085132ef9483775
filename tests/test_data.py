"""Dataset folder readers and numpy/OpenCV augmentations."""
from pathlib import Path

import cv2
import numpy as np
import pytest

from mean_nav.data import augment as A
from mean_nav.data.datasets import (load_rgb, read_sues200_test, read_sues200_train,
                                    read_university1652_test, read_university1652_train)
from mean_nav.errors import MeanNavError


def textured(seed=0, size=64):
    rng = np.random.default_rng(seed)
    img = cv2.resize(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), (size, size), interpolation=cv2.INTER_CUBIC)
    img[:, : size // 4] = (250, 20, 20)  # a red band on the left: flips and rotations move it
    return img


def write_images(folder: Path, n: int, seed: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        cv2.imwrite(str(folder / f"{k:02d}.jpg"), textured(seed + k, 32))


# --- readers ----------------------------------------------------------------------------

def test_university1652_train_pairs_every_drone_image_with_its_satellite(tmp_path):
    for i, n in (("0001", 3), ("0007", 2)):
        write_images(tmp_path / "train" / "drone" / i, n)
        write_images(tmp_path / "train" / "satellite" / i, 1)
    idx = read_university1652_train(tmp_path)
    assert idx.locations == ["0001", "0007"]
    assert idx.labels == [0, 0, 0, 1, 1]
    assert all(len(s) == 1 for s in idx.satellite)


def test_university1652_test_labels_are_integer_ids(tmp_path):
    write_images(tmp_path / "test" / "query_drone" / "0042", 2)
    write_images(tmp_path / "test" / "gallery_satellite" / "0042", 1)
    write_images(tmp_path / "test" / "gallery_satellite" / "0099", 1)
    q, g = read_university1652_test(tmp_path, "drone->satellite")
    assert list(q.labels) == [42, 42] and sorted(g.labels) == [42, 99]


def test_sues200_reads_one_altitude(tmp_path):
    write_images(tmp_path / "Training" / "150" / "drone" / "0003", 2)
    write_images(tmp_path / "Training" / "150" / "satellite" / "0003", 1)
    write_images(tmp_path / "Testing" / "150" / "query_satellite" / "0003", 1)
    write_images(tmp_path / "Testing" / "150" / "gallery_drone" / "0003", 2)
    assert read_sues200_train(tmp_path, 150).num_classes == 1
    q, g = read_sues200_test(tmp_path, 150, "satellite->drone")
    assert len(q) == 1 and len(g) == 2
    with pytest.raises(MeanNavError, match="200"):
        read_sues200_train(tmp_path, 200)
    with pytest.raises(MeanNavError, match="altitude 175"):
        read_sues200_train(tmp_path, 175)


def test_malformed_folders_name_the_path(tmp_path):
    with pytest.raises(MeanNavError, match="train/drone"):
        read_university1652_train(tmp_path)
    write_images(tmp_path / "train" / "drone" / "0001", 1)
    (tmp_path / "train" / "satellite").mkdir(parents=True)
    (tmp_path / "train" / "satellite" / "0002").mkdir()
    with pytest.raises(MeanNavError, match="0001"):
        read_university1652_train(tmp_path)  # drone id without a satellite folder
    (tmp_path / "train" / "satellite" / "0001").mkdir()
    with pytest.raises(MeanNavError, match="no satellite image"):
        read_university1652_train(tmp_path)


def test_undecodable_image_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.jpg"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(MeanNavError, match="x.jpg.*cannot be decoded"):
        load_rgb(bad)
    with pytest.raises(MeanNavError, match="not found"):
        load_rgb(tmp_path / "missing.jpg")


# --- augmentations ----------------------------------------------------------------------

def always(**kw):
    cfg = A.AugmentConfig(hflip_p=0, jpeg_p=0, jitter_p=0, blur_sharpen_p=0, dropout_p=0, satellite_rot90=False)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_horizontal_flip_is_joint_so_the_pair_still_matches():
    sat, drone = textured(1), textured(1)
    s, d = A.augment_pair(sat, drone, np.random.default_rng(0), always(hflip_p=1.0))
    assert np.array_equal(s, sat[:, ::-1]) and np.array_equal(d, drone[:, ::-1])


def test_rot90_turns_only_the_satellite_view():
    sat, drone = textured(1), textured(2)
    seen = set()
    for seed in range(12):
        s, d = A.augment_pair(sat, drone, np.random.default_rng(seed), always(satellite_rot90=True))
        assert np.array_equal(d, drone)
        k = [k for k in range(4) if np.array_equal(s, np.rot90(sat, k))]
        assert len(k) == 1
        seen.add(k[0])
    assert len(seen) > 1


def test_colour_jitter_strengths_are_per_view():
    sat = textured(3)
    strong = A.JitterConfig(brightness=0, contrast=0.7, saturation=0, hue=0)
    none = A.JitterConfig(brightness=0, contrast=0, saturation=0, hue=0)
    rng = np.random.default_rng(0)
    assert np.array_equal(A.color_jitter(sat, rng, none), sat)
    changed = [np.abs(A.color_jitter(sat, np.random.default_rng(s), strong).astype(int) - sat).mean()
               for s in range(5)]
    assert max(changed) > 3


def test_augmented_pair_keeps_shape_and_dtype_and_is_reproducible():
    cfg = A.AugmentConfig(jpeg_p=1, jitter_p=1, blur_sharpen_p=1, dropout_p=1)
    sat, drone = textured(4), textured(5)
    a = A.augment_pair(sat, drone, np.random.default_rng(9), cfg)
    b = A.augment_pair(sat, drone, np.random.default_rng(9), cfg)
    for x, y in zip(a, b):
        assert x.shape == sat.shape and x.dtype == np.uint8
        assert np.array_equal(x, y)


def test_dropouts_black_out_part_of_the_image():
    img = np.full((64, 64, 3), 200, np.uint8)
    g = A.grid_dropout(img, np.random.default_rng(0))
    c = A.coarse_dropout(img, np.random.default_rng(0))
    for out in (g, c):
        black = (out == 0).all(axis=2).mean()
        assert 0.02 < black < 0.9


def test_jpeg_recompression_at_lower_quality_loses_more_detail():
    img = textured(6, 96)
    err = lambda q: np.abs(A.jpeg_recompress(img, q).astype(int) - img).mean()
    assert err(100) < err(30)


def test_degrade_photometric_is_identity_at_zero_and_grows_with_strength():
    img = textured(7, 96)
    assert A.degrade_photometric(img, np.random.default_rng(0), 0.0) is img
    diff = lambda s: np.mean([np.abs(A.degrade_photometric(img, np.random.default_rng(k), s).astype(int) - img).mean()
                              for k in range(6)])
    assert 0 < diff(0.2) < diff(1.0)
    with pytest.raises(ValueError):
        A.degrade_photometric(img, np.random.default_rng(0), 1.5)
