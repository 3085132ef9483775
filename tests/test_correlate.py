"""Low-altitude area correlation (nav/correlate.py) on synthetic maps whose truth is known by
construction: the query is a crop of the map, so the nadir's map position is exact."""
import math

import cv2
import numpy as np
import pytest
from affine import Affine

from mean_nav.geo.cache import RegionCrop
from mean_nav.nav.correlate import CorrelateConfig, correlate

GSD = 0.25
Q = 240            # the localizer's rectified query: a tile, nadir at pixel (119.5, 119.5)


class MapCache:
    """The two things correlate() asks of a tile cache, over one north-up image."""

    def __init__(self, image: np.ndarray, valid: np.ndarray | None = None):
        self.image, self.gsd_m = image, GSD
        self.valid = np.ones(image.shape[:2], bool) if valid is None else valid
        self.top = image.shape[0] * GSD       # metric y of the image's top edge; x = 0 at its left

    def xy(self, col: float, row: float) -> tuple[float, float]:
        """Metric position of image pixel (col, row), centres at integers."""
        return (col + 0.5) * GSD, self.top - (row + 0.5) * GSD

    def region(self, x: float, y: float, size_m: float) -> RegionCrop:
        size = int(round(size_m / GSD))
        col, row = x / GSD - 0.5, (self.top - y) / GSD - 0.5
        c0, r0 = int(math.floor(col - (size - 1) / 2 + 0.5)), int(math.floor(row - (size - 1) / 2 + 0.5))
        img = np.zeros((size, size, 3), np.uint8)
        val = np.zeros((size, size), bool)
        h, w = self.valid.shape
        a0, b0, a1, b1 = max(c0, 0), max(r0, 0), min(c0 + size, w), min(r0 + size, h)
        if a1 > a0 and b1 > b0:
            img[b0 - r0:b1 - r0, a0 - c0:a1 - c0] = self.image[b0:b1, a0:a1]
            val[b0 - r0:b1 - r0, a0 - c0:a1 - c0] = self.valid[b0:b1, a0:a1]
        return RegionCrop(img, val, Affine(GSD, 0, c0 * GSD, 0, -GSD, self.top - r0 * GSD))


def texture(size=800, seed=0, blur=1.5):
    rng = np.random.default_rng(seed)
    g = cv2.GaussianBlur(rng.normal(128, 40, (size, size)).astype(np.float32), (0, 0), blur)
    g = np.clip((g - g.mean()) * 40 / g.std() + 128, 0, 255).astype(np.uint8)
    return np.repeat(g[:, :, None], 3, axis=2)


def view(image, c0, r0, w_px, h_px):
    """The rectified query of a camera whose nadir is at image pixel (c0 + 119.5, r0 + 119.5):
    the map's own pixels, seen only inside a w_px x h_px footprint around the nadir."""
    q = image[r0:r0 + Q, c0:c0 + Q].copy()
    valid = np.zeros((Q, Q), bool)
    valid[120 - h_px // 2:120 + h_px // 2, 120 - w_px // 2:120 + w_px // 2] = True
    q[~valid] = 0
    return q, valid


def test_the_nadir_of_a_small_view_is_found_to_a_fraction_of_a_pixel():
    img = texture()
    cache = MapCache(img)
    c0, r0 = 300, 250
    truth = cache.xy(c0 + 119.5, r0 + 119.5)
    q, valid = view(img, c0, r0, 48, 36)          # 12 x 9 m: about 8.5 m above ground (70 deg lens)
    pred = (truth[0] + 1.3, truth[1] - 0.9)
    found, why = correlate(q, valid, cache, pred, 1.0, CorrelateConfig())
    assert found is not None, why
    assert math.hypot(found.x - truth[0], found.y - truth[1]) < 0.1
    assert found.score > 0.95 and found.distinct >= 1.3
    assert found.footprint_px < 48 * 36        # the border rows are left out


def test_a_sub_pixel_offset_is_measured():
    img = texture(seed=1)
    cache = MapCache(img)
    # the camera half a pixel east and a quarter south of a pixel-aligned nadir
    shifted = cv2.warpAffine(img, np.float32([[1, 0, -0.5], [0, 1, -0.25]]), img.shape[1::-1],
                             flags=cv2.INTER_LINEAR)
    c0, r0 = 260, 320
    truth = cache.xy(c0 + 119.5 + 0.5, r0 + 119.5 + 0.25)
    q, valid = view(shifted, c0, r0, 60, 44)
    found, why = correlate(q, valid, cache, (truth[0] - 0.8, truth[1] + 0.6), 0.8, CorrelateConfig())
    assert found is not None, why
    assert abs(found.x - truth[0]) < 0.06 and abs(found.y - truth[1]) < 0.06     # a quarter pixel


def test_a_footprint_with_too_few_map_pixels_gives_no_fix():
    img = texture()
    cache = MapCache(img)
    q, valid = view(img, 300, 250, 20, 18)          # 360 px, eroded fewer: below the default 400
    found, why = correlate(q, valid, cache, cache.xy(419.5, 369.5), 1.0, CorrelateConfig())
    assert found is None and "footprint" in why


def test_a_repeated_pattern_is_ambiguous():
    rows, cols = np.mgrid[0:800, 0:800]
    g = (128 + 60 * np.sin(2 * np.pi * cols / 8.0) * np.sin(2 * np.pi * rows / 8.0)).astype(np.uint8)
    img = np.repeat(g[:, :, None], 3, axis=2)
    cache = MapCache(img)
    q, valid = view(img, 300, 250, 48, 36)
    truth = cache.xy(419.5, 369.5)
    found, why = correlate(q, valid, cache, (truth[0] + 1.0, truth[1]), 1.0, CorrelateConfig())
    assert found is None and "ambiguous" in why     # a peak every 2 m inside the search


def test_featureless_ground_gives_no_fix():
    img = np.full((800, 800, 3), 90, np.uint8)
    cache = MapCache(img)
    q, valid = view(img, 300, 250, 48, 36)
    found, why = correlate(q, valid, cache, cache.xy(419.5, 369.5), 1.0, CorrelateConfig())
    assert found is None and "featureless" in why


def test_a_place_outside_the_search_is_not_claimed():
    """The prediction 30 m off with a 1 m sigma: the true place is beyond the search, and the
    best placement inside it explains the view badly."""
    img = texture(seed=2)
    cache = MapCache(img)
    q, valid = view(img, 300, 250, 60, 44)
    truth = cache.xy(419.5, 369.5)
    found, why = correlate(q, valid, cache, (truth[0] + 30.0, truth[1]), 1.0, CorrelateConfig())
    assert found is None and "no correlation peak" in why


def test_the_search_reaches_three_sigma_plus_the_margin_and_no_farther():
    img = texture(seed=3)
    cache = MapCache(img)
    q, valid = view(img, 300, 250, 48, 36)
    truth = cache.xy(419.5, 369.5)
    cfg = CorrelateConfig()               # 3 x 1 m + 2 m = 5 m
    assert correlate(q, valid, cache, (truth[0] + 4.5, truth[1]), 1.0, cfg)[0] is not None
    assert correlate(q, valid, cache, (truth[0] + 5.5, truth[1]), 1.0, cfg)[0] is None


def test_placements_over_missing_map_are_not_used():
    img = texture(seed=4)
    hole = np.ones(img.shape[:2], bool)
    hole[:, 430:] = False                   # the map ends 10 px east of the nadir
    cache = MapCache(img, hole)
    q, valid = view(img, 300, 250, 48, 36)  # the footprint reaches 24 px east: partly off the map
    found, why = correlate(q, valid, cache, cache.xy(419.5, 369.5), 1.0, CorrelateConfig())
    assert found is None


@pytest.mark.parametrize("bad", [{"min_score": 0.0}, {"min_distinct": 0.5}, {"max_search_m": 0.0}])
def test_bad_settings_are_refused(bad):
    from mean_nav.config import validate
    from mean_nav.errors import MeanNavError

    with pytest.raises(MeanNavError):
        validate(CorrelateConfig(**bad), "test")
