"""Pins the refinement gates with correspondences built by hand: descriptors that decide the
ratio test, point sets with a known similarity, inlier share, rotation and scale, and the
no-data border measured with OpenCV's distance transform."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from mean_nav.nav.features import Features
from mean_nav.nav.features.opencv_image import GreyPreparer
from mean_nav.nav.features.ratio_test import RatioTestMatcher
from mean_nav.nav.refine import FeatureMatcher, RefineConfig


def one_hot_features(points: np.ndarray, size=(480, 480)) -> Features:
    """Descriptor k is the k-th unit vector: query k matches map k exactly, second best is sqrt(2) away."""
    n = len(points)
    return Features(np.asarray(points, np.float32), np.eye(n, dtype=np.float32), None, size)


def similarity(points: np.ndarray, angle_deg: float = 0.0, scale: float = 1.0, shift=(0.0, 0.0)) -> np.ndarray:
    a = math.radians(angle_deg)
    m = scale * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return points @ m.T + np.asarray(shift)


def pair(n_inliers: int, n_outliers: int, seed: int = 0, **transform):
    rng = np.random.default_rng(seed)
    query = rng.uniform(0, 240, (n_inliers + n_outliers, 2))
    region = similarity(query, **transform) + rng.normal(0, 0.2, query.shape)
    region[n_inliers:] = rng.uniform(0, 480, (n_outliers, 2))      # matched, but to the wrong place
    return one_hot_features(query), one_hot_features(region)


def test_the_query_centre_lands_where_the_similarity_takes_it():
    q, r = pair(60, 10, angle_deg=6.0, shift=(150.0, 90.0))
    res = FeatureMatcher().match(q, r, (119.5, 119.5))
    assert res.ok, res.reason
    expected = similarity(np.array([[119.5, 119.5]]), angle_deg=6.0, shift=(150.0, 90.0))[0]
    assert res.nadir_px == (pytest.approx(expected[0], abs=0.2), pytest.approx(expected[1], abs=0.2))
    assert res.rotation_deg == pytest.approx(6.0, abs=0.2)
    assert res.scale == pytest.approx(1.0, abs=0.005)
    assert res.inliers == 60 and res.matches == 70


def test_a_small_share_of_inliers_is_not_a_place():
    # 30 consistent matches clear min_inliers (15) but are only 30 / 230 = 13 % < 15 % of the matches
    q, r = pair(30, 200, shift=(100.0, 100.0))
    res = FeatureMatcher().match(q, r, (119.5, 119.5))
    assert not res.ok and "inliers" in res.reason
    q, r = pair(40, 200, shift=(100.0, 100.0))           # 17 %: accepted
    assert FeatureMatcher().match(q, r, (119.5, 119.5)).ok


def test_too_few_inliers_is_not_a_place():
    q, r = pair(12, 0, shift=(100.0, 100.0))
    assert not FeatureMatcher().match(q, r, (119.5, 119.5)).ok
    q, r = pair(16, 0, shift=(100.0, 100.0))
    assert FeatureMatcher().match(q, r, (119.5, 119.5)).ok


@pytest.mark.parametrize("angle_deg, ok", [(-10.0, True), (10.0, True), (-15.0, False), (20.0, False)])
def test_the_rotation_left_after_rectification_is_bounded(angle_deg, ok):
    q, r = pair(60, 0, angle_deg=angle_deg, shift=(200.0, 120.0))
    res = FeatureMatcher(RefineConfig(max_rotation_deg=12.0)).match(q, r, (119.5, 119.5))
    assert res.ok is ok, res.reason
    assert res.rotation_deg == pytest.approx(angle_deg, abs=0.3)


@pytest.mark.parametrize("scale, ok", [(0.9, True), (1.1, True), (0.8, False), (1.25, False)])
def test_the_scale_left_after_rectification_is_bounded(scale, ok):
    q, r = pair(60, 0, scale=scale, shift=(150.0, 150.0))
    res = FeatureMatcher(RefineConfig(max_scale_error=0.15)).match(q, r, (119.5, 119.5))
    assert res.ok is ok, res.reason
    assert res.scale == pytest.approx(scale, abs=0.005)


def test_the_nadir_covariance_grows_with_the_residual_noise():
    rng = np.random.default_rng(1)
    query = rng.uniform(0, 240, (80, 2))
    sigmas = []
    for noise in (0.5, 2.0):
        region = query + (120.0, 60.0) + rng.normal(0, noise, query.shape)
        res = FeatureMatcher(RefineConfig(ransac_threshold_px=10.0)).match(
            one_hot_features(query), one_hot_features(region), (119.5, 119.5))
        assert res.ok
        sigmas.append(math.sqrt(np.trace(res.cov_px) / 2))
    # the centre of 80 points with per-axis noise s is known to about s / sqrt(80) per axis
    assert sigmas[0] == pytest.approx(0.5 / math.sqrt(80), rel=0.5)
    assert sigmas[1] == pytest.approx(2.0 / math.sqrt(80), rel=0.5)


def test_lowe_ratio_test_keeps_only_distinctive_matches():
    # query 0: nearest 1.0, second 2.0 (ratio 0.5, kept); query 1: 1.0 and 1.1 (ratio 0.91, dropped)
    query = Features(np.zeros((2, 2), np.float32), np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0]], np.float32))
    ref = Features(np.zeros((4, 2), np.float32),
                   np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [11.0, 0.0, 0.0], [10.0, 1.1, 0.0]], np.float32))
    m = RatioTestMatcher("l2", ratio=0.8).match(query, ref)
    assert list(zip(m.query_idx, m.ref_idx)) == [(0, 0)]
    m = RatioTestMatcher("l2", ratio=0.95).match(query, ref)
    assert sorted(zip(m.query_idx.tolist(), m.ref_idx.tolist())) == [(0, 0), (1, 2)]


@pytest.mark.parametrize("detector", ["sift", "orb"])
def test_no_keypoint_sits_on_the_no_data_border(detector):
    rng = np.random.default_rng(2)
    tex = cv2.GaussianBlur(rng.normal(0, 1, (320, 320)).astype(np.float32), (0, 0), 2.0)
    image = np.dstack([cv2.normalize(tex, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)] * 3)
    valid = np.zeros((320, 320), np.uint8)
    cv2.circle(valid, (160, 160), 120, 1, -1)
    image[valid == 0] = 0
    feats = FeatureMatcher(RefineConfig(detector=detector)).features(image, valid.astype(bool))
    assert len(feats) > 50
    # distance of each pixel to the nearest no-data pixel
    dist = cv2.distanceTransform(valid, cv2.DIST_L2, 5)
    at = np.round(feats.points).astype(int)
    assert dist[at[:, 1], at[:, 0]].min() >= 3.0


# --- edges the gates must survive -------------------------------------------------------

def test_the_ratio_test_copes_with_nothing_to_match():
    m = RatioTestMatcher("l2", ratio=0.8)
    one = Features(np.zeros((1, 2), np.float32), np.ones((1, 3), np.float32))
    empty = Features(np.zeros((0, 2), np.float32), np.zeros((0, 3), np.float32))
    assert len(m.match(empty, one)) == 0
    assert len(m.match(one, one)) == 0                      # a second neighbour is needed
    # every query equally close to two map descriptors: nothing distinctive, nothing kept
    twins = Features(np.zeros((2, 2), np.float32), np.array([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]], np.float32))
    query = Features(np.zeros((1, 2), np.float32), np.zeros((1, 3), np.float32))
    assert len(m.match(query, twins)) == 0


def test_exactly_min_inliers_perfect_matches_are_a_place():
    q, r = pair(15, 0, shift=(100.0, 100.0))
    assert FeatureMatcher(RefineConfig(min_inliers=15)).match(q, r, (119.5, 119.5)).ok


def test_noise_free_matches_still_report_the_keypoint_floor_and_the_rms_residual():
    rng = np.random.default_rng(4)
    query = rng.uniform(0, 240, (80, 2))
    perfect = FeatureMatcher().match(one_hot_features(query), one_hot_features(query + (50.0, 20.0)), (119.5, 119.5))
    # keypoints are not located better than ~0.3 px: the centre of 80 of them to ~0.3 / sqrt(80)
    assert math.sqrt(np.trace(perfect.cov_px) / 2) == pytest.approx(0.3 / math.sqrt(80), rel=0.15)
    noisy_region = query + (50.0, 20.0) + rng.normal(0, 1.5, query.shape)
    noisy = FeatureMatcher(RefineConfig(ransac_threshold_px=10.0)).match(
        one_hot_features(query), one_hot_features(noisy_region), (119.5, 119.5))
    assert noisy.residual_px == pytest.approx(1.5, rel=0.15)       # RMS per coordinate


def test_the_grey_image_is_black_outside_the_valid_area():
    image = np.full((64, 64, 3), 180, np.uint8)
    valid = np.zeros((64, 64), bool)
    valid[:, :40] = True
    grey, mask = GreyPreparer(equalize=False)(image, valid)
    assert (grey[:, 40:] == 0).all() and (grey[:, :40] == 180).all()
    # a 7 px square erosion takes 3 px off the valid side of the edge: columns 37..39 masked
    assert mask[:, 37:].max() == 0 and mask[:, :37].min() == 255


def test_equalisation_finds_features_in_a_low_contrast_image():
    rng = np.random.default_rng(5)
    tex = cv2.GaussianBlur(rng.normal(0, 1, (240, 240)).astype(np.float32), (0, 0), 2.0)
    flat = cv2.normalize(tex, None, 100, 150, cv2.NORM_MINMAX).astype(np.uint8)   # a dull, hazy image
    image = np.dstack([flat] * 3)
    with_clahe = FeatureMatcher(RefineConfig(equalize=True)).features(image)
    without = FeatureMatcher(RefineConfig(equalize=False)).features(image)
    assert len(with_clahe) > 2 * max(len(without), 1)


def test_a_blank_image_gives_no_features_and_a_well_formed_empty_set():
    feats = FeatureMatcher().features(np.full((64, 64, 3), 90, np.uint8))
    assert len(feats) == 0 and feats.descriptors.shape[0] == 0 and feats.descriptors.ndim == 2


def test_ground_scale_equalisation_uses_one_clahe_tile_per_clahe_tile_px():
    rng = np.random.default_rng(6)
    grey = cv2.GaussianBlur(rng.integers(0, 255, (128, 256), dtype=np.uint8), (0, 0), 3.0)
    got, _ = GreyPreparer(equalize=True, clahe_tile_px=64)(grey, None)
    # 256 x 128 px in 64 px windows: a 4 x 2 grid, OpenCV's CLAHE at clip limit 2
    expected = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(4, 2)).apply(grey)
    assert np.array_equal(got, expected)


def test_a_turned_copy_that_outvotes_the_true_place_leaves_the_fit_at_the_known_heading():
    """A view holding a 180 deg turned copy of the ground (a map corner's point-mirrored
    surroundings): 40 matches fit the turn, 25 the known heading. RANSAC's best is the turn;
    the matches it leaves out still hold the true fit, which wins."""
    rng = np.random.default_rng(3)
    query = rng.uniform(0, 240, (65, 2))
    region = np.empty_like(query)
    region[:40] = similarity(query[:40], angle_deg=180.0, shift=(360.0, 360.0))
    region[40:] = similarity(query[40:], shift=(120.0, 100.0))
    region += rng.normal(0, 0.2, region.shape)
    res = FeatureMatcher().match(one_hot_features(query), one_hot_features(region), (119.5, 119.5), 0.0)
    assert res.ok and not res.rotation_only, res.reason
    assert res.inliers == 25 and res.matches == 65
    assert res.rotation_deg == pytest.approx(0.0, abs=0.5)
    assert res.nadir_px == (pytest.approx(239.5, abs=0.3), pytest.approx(219.5, abs=0.3))
    # without the true matches the turn is all there is: a good fit, turned too far
    turned = FeatureMatcher().match(one_hot_features(query[:40]), one_hot_features(region[:40]), (119.5, 119.5), 0.0)
    assert turned.rotation_only and not turned.ok and turned.inliers == 40
    assert abs(turned.rotation_deg) == pytest.approx(180.0, abs=0.5)


def test_the_inlier_bar_can_be_lowered_per_call():
    q, r = pair(12, 0, shift=(100.0, 100.0))
    assert not FeatureMatcher().match(q, r, (119.5, 119.5)).ok                 # 12 < min_inliers 15
    res = FeatureMatcher().match(q, r, (119.5, 119.5), min_inliers=10)
    assert res.ok and res.inliers == 12
    assert not FeatureMatcher().match(q, r, (119.5, 119.5), min_inliers=13).ok


def test_one_query_against_two_map_descriptors_is_matched_when_distinctive():
    # nearest 1.0, second 5.0: ratio 0.2 — the smallest case the ratio test can decide
    query = Features(np.zeros((1, 2), np.float32), np.array([[0.0, 0.0, 0.0]], np.float32))
    ref = Features(np.zeros((2, 2), np.float32), np.array([[0.0, 5.0, 0.0], [1.0, 0.0, 0.0]], np.float32))
    m = RatioTestMatcher("l2", ratio=0.8).match(query, ref)
    assert list(zip(m.query_idx.tolist(), m.ref_idx.tolist())) == [(0, 1)]
    assert m.confidence.tolist() == pytest.approx([1.0 - 0.2])  # 1 - ratio: higher is more distinctive


def test_a_query_equal_to_two_identical_map_descriptors_is_not_distinctive():
    # both neighbours at distance 0: 0 < 0.8 * 0 is false, a repeated texture is no match
    query = Features(np.zeros((1, 2), np.float32), np.array([[1.0, 2.0, 3.0]], np.float32))
    twins = Features(np.zeros((2, 2), np.float32), np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], np.float32))
    assert len(RatioTestMatcher("l2", ratio=0.8).match(query, twins)) == 0


def test_the_ratio_test_defaults_to_lowes_0_8():
    # second neighbour at 1.0 / 0.75 and at 1.0 / 0.85 of the nearest: Lowe keeps the first only
    query = Features(np.zeros((2, 2), np.float32), np.array([[0.0, 0.0], [100.0, 0.0]], np.float32))
    ref = Features(np.zeros((4, 2), np.float32), np.array([[1.0, 0.0], [0.0, -1 / 0.75],
                                                          [101.0, 0.0], [100.0, -1 / 0.85]], np.float32))
    m = RatioTestMatcher().match(query, ref)
    assert list(zip(m.query_idx.tolist(), m.ref_idx.tolist())) == [(0, 0)]


def test_the_no_data_border_is_eroded_on_either_side():
    # the valid area on the right this time: a 7 px square erosion masks columns 24..26
    valid = np.zeros((64, 64), bool)
    valid[:, 24:] = True
    _, mask = GreyPreparer(equalize=False)(np.full((64, 64), 180, np.uint8), valid)
    assert mask[:, :27].max() == 0 and mask[:, 27:].min() == 255


def test_a_frame_is_equalised_by_default_on_a_4_by_4_clahe_grid():
    rng = np.random.default_rng(7)
    grey = cv2.GaussianBlur(rng.integers(0, 255, (96, 160), dtype=np.uint8), (0, 0), 3.0)
    got, mask = GreyPreparer()(grey, None)
    assert mask is None
    # sift.py: "None: a 4 x 4 grid over the image"; clip limit 2 as the ground-scale grid
    assert np.array_equal(got, cv2.createCLAHE(clipLimit=2.0, tileGridSize=(4, 4)).apply(grey))


def test_an_image_smaller_than_half_a_clahe_tile_is_one_tile():
    rng = np.random.default_rng(8)
    grey = cv2.GaussianBlur(rng.integers(0, 255, (40, 40), dtype=np.uint8), (0, 0), 2.0)
    got, _ = GreyPreparer(equalize=True, clahe_tile_px=128)(grey, None)
    assert np.array_equal(got, cv2.createCLAHE(clipLimit=2.0, tileGridSize=(1, 1)).apply(grey))


# --- the shipped gates, the reasons, the refit, the covariance's degrees of freedom ----------

@pytest.mark.parametrize("angle_deg, ok", [(11.5, True), (-11.5, True), (12.5, False), (-12.5, False)])
def test_the_default_rotation_bound_is_12_deg_around_no_known_heading_error(angle_deg, ok):
    q, r = pair(60, 0, angle_deg=angle_deg, shift=(200.0, 120.0))
    res = FeatureMatcher().match(q, r, (119.5, 119.5))
    assert res.ok is ok, res.reason
    if not ok:
        assert res.rotation_only and "rotation" in res.reason


@pytest.mark.parametrize("scale, ok", [(0.86, True), (1.14, True), (0.84, False), (1.16, False)])
def test_the_default_scale_bound_is_15_percent(scale, ok):
    q, r = pair(60, 0, scale=scale, shift=(150.0, 150.0))
    assert FeatureMatcher().match(q, r, (119.5, 119.5)).ok is ok


def test_the_default_inlier_bar_is_15():
    assert FeatureMatcher().match(*pair(15, 0, shift=(100.0, 100.0)), (119.5, 119.5)).ok
    assert not FeatureMatcher().match(*pair(14, 0, shift=(100.0, 100.0)), (119.5, 119.5)).ok


def test_the_default_ratio_test_is_lowes_0_8():
    m = FeatureMatcher().matcher
    query = Features(np.zeros((2, 2), np.float32), np.array([[0.0, 0.0], [100.0, 0.0]], np.float32))
    ref = Features(np.zeros((4, 2), np.float32), np.array([[1.0, 0.0], [0.0, -1 / 0.75],
                                                          [101.0, 0.0], [100.0, -1 / 0.85]], np.float32))
    assert m.match(query, ref).query_idx.tolist() == [0]


def test_the_default_ransac_threshold_is_3_px():
    # 40 exact matches and 12 displaced by 4.5 px: beyond 3 px they are not inliers
    rng = np.random.default_rng(11)
    query = rng.uniform(0, 240, (52, 2))
    region = query + (100.0, 80.0)
    angles = rng.uniform(0, 2 * math.pi, 12)
    region[40:] += 4.5 * np.c_[np.cos(angles), np.sin(angles)]
    res = FeatureMatcher().match(one_hot_features(query), one_hot_features(region), (119.5, 119.5))
    assert res.ok and res.inliers == 40 and res.matches == 52


def test_a_failed_match_reports_no_inliers_and_no_matches():
    res = FeatureMatcher().match(*pair(5, 0, shift=(10.0, 10.0)), (119.5, 119.5))
    assert not res.ok and (res.inliers, res.matches) == (0, 0)


def test_too_few_features_on_either_side_is_said_so():
    few, many = pair(5, 0)[0], pair(60, 0)[1]
    for q, r in ((few, many), (many, few)):
        res = FeatureMatcher().match(q, r, (119.5, 119.5))
        assert not res.ok and res.reason.startswith("too few features"), res.reason


def test_too_few_distinctive_matches_is_said_so():
    # 30 features each side, but only 10 queries have a distinctive partner: the other 20 have twins
    query = np.random.default_rng(12).uniform(0, 240, (30, 2))
    desc_q = np.eye(30, dtype=np.float32)
    desc_r = np.eye(30, dtype=np.float32)
    desc_r[10:20] = desc_r[20:30] = np.eye(30, dtype=np.float32)[10:20]    # map 10..19 and 20..29 alike
    desc_q[20:30] = desc_q[10:20]
    res = FeatureMatcher().match(Features(query.astype(np.float32), desc_q),
                                 Features((query + 50.0).astype(np.float32), desc_r), (119.5, 119.5))
    assert not res.ok and res.reason == "too few feature matches (10)"


def test_fewer_inliers_than_the_bar_fail_even_when_their_share_is_high():
    # 14 consistent matches and 10 stray ones: a 58 % share, but under the 15 inliers
    res = FeatureMatcher().match(*pair(14, 10, shift=(100.0, 100.0)), (119.5, 119.5))
    assert not res.ok and res.reason.startswith("too few inliers") and res.inliers == 14


def test_coincident_keypoints_give_no_model_and_no_crash():
    points = np.full((20, 2), 50.0)
    res = FeatureMatcher().match(one_hot_features(points), one_hot_features(points + 30.0), (119.5, 119.5))
    assert not res.ok and res.reason == "no geometric model"


def test_a_good_fit_is_kept_even_when_its_outliers_hold_another():
    # 40 matches fit the true place; 25 others fit a second place at the same heading: the
    # first fit is the answer, the others are not refitted over it
    rng = np.random.default_rng(13)
    query = rng.uniform(0, 240, (65, 2))
    region = np.empty_like(query)
    region[:40] = query[:40] + (120.0, 100.0)
    region[40:] = query[40:] + (300.0, 20.0)
    res = FeatureMatcher().match(one_hot_features(query), one_hot_features(region), (119.5, 119.5))
    assert res.ok and res.inliers == 40
    assert res.nadir_px == (pytest.approx(239.5, abs=0.01), pytest.approx(219.5, abs=0.01))


def test_a_true_fit_of_exactly_the_bar_behind_a_turned_copy_wins():
    rng = np.random.default_rng(14)
    query = rng.uniform(0, 240, (55, 2))
    region = np.empty_like(query)
    region[:40] = similarity(query[:40], angle_deg=180.0, shift=(360.0, 360.0))
    region[40:] = query[40:] + (120.0, 100.0)                            # 15 = min_inliers
    res = FeatureMatcher().match(one_hot_features(query), one_hot_features(region), (119.5, 119.5))
    assert res.ok and res.inliers == 15 and res.rotation_deg == pytest.approx(0.0, abs=0.1)


def test_the_fit_maps_any_query_point_through_the_similarity():
    q, r = pair(60, 0, angle_deg=6.0, scale=1.05, shift=(150.0, 90.0))
    res = FeatureMatcher().match(q, r, (119.5, 119.5))
    points = np.array([[0.0, 0.0], [240.0, 0.0], [33.0, 180.0]])
    expected = similarity(points, angle_deg=6.0, scale=1.05, shift=(150.0, 90.0))
    assert res.to_region(points) == pytest.approx(expected, abs=0.3)


@pytest.mark.parametrize("a, b, diff", [(10.0, 350.0, 20.0), (350.0, 10.0, -20.0), (-170.0, 170.0, 20.0),
                                        (90.0, 30.0, 60.0), (180.0, 0.0, -180.0), (5.0, 5.0, 0.0),
                                        (725.0, 0.0, 5.0)])
def test_angle_difference_is_the_short_way_round(a, b, diff):
    from mean_nav.nav.refine import angle_difference_deg
    assert angle_difference_deg(a, b) == pytest.approx(diff)


def test_a_rotation_prior_moves_the_allowed_window():
    q, r = pair(60, 0, angle_deg=170.0, shift=(300.0, 300.0))
    assert FeatureMatcher().match(q, r, (119.5, 119.5), rotation_prior_deg=175.0).ok
    assert FeatureMatcher().match(q, r, (119.5, 119.5), rotation_prior_deg=-178.0).ok     # across +-180
    assert not FeatureMatcher().match(q, r, (119.5, 119.5), rotation_prior_deg=150.0).ok


def test_the_reported_covariance_is_the_scatter_of_the_estimate():
    """Least squares with 2n equations and 4 unknowns: the residuals have 2n - 4 degrees of
    freedom. With 5 points (6 dof) and 2 px noise the mean reported variance of the centre
    must match the centre's actual scatter over many draws (n - 5 or n - 3 would be 20 % off)."""
    from mean_nav.nav.refine import _fit_similarity
    rng = np.random.default_rng(15)
    src = np.array([[0.0, 0.0], [200.0, 10.0], [30.0, 190.0], [170.0, 160.0], [90.0, 70.0]])
    G = np.array([[119.5, -119.5, 1.0, 0.0], [119.5, 119.5, 0.0, 1.0]])     # the query centre
    truth = G @ np.array([1.0, 0.0, 40.0, 25.0])
    centres, reported = [], []
    for _ in range(3000):
        dst = src + (40.0, 25.0) + rng.normal(0, 2.0, src.shape)
        params, cov, _ = _fit_similarity(src, dst)
        centres.append(G @ params - truth)
        reported.append(np.trace(G @ cov @ G.T))
    actual = np.mean(np.sum(np.square(centres), axis=1))
    assert np.mean(reported) == pytest.approx(actual, rel=0.07)


def test_the_camera_view_detects_weaker_texture_than_the_stored_map_features():
    """Grass-like faint texture: the query extractor (query_contrast_threshold 0.02) finds far
    more keypoints than the map's (OpenCV's 0.04), at 0.04 exactly the map's, and the stored
    features' settings (which a cache is checked against) do not depend on it."""
    from mean_nav.geo.map_features import store_settings
    from mean_nav.geo.tiles import TileGrid
    from mean_nav.nav.features import make_extractor

    rng = np.random.default_rng(7)
    tex = cv2.GaussianBlur(rng.normal(0, 1, (240, 240)).astype(np.float32), (0, 0), 2.0)
    image = np.dstack([cv2.normalize(tex, None, 90, 170, cv2.NORM_MINMAX).astype(np.uint8)] * 3)
    plain = RefineConfig(equalize=False)
    map_side = make_extractor(plain).extract(image)
    query_side = FeatureMatcher(plain).features(image)
    assert RefineConfig().query_contrast_threshold == 0.02
    assert len(query_side) > 2 * max(len(map_side), 1)
    same = FeatureMatcher(RefineConfig(equalize=False, query_contrast_threshold=0.04)).features(image)
    assert np.array_equal(same.points, map_side.points)
    grid = TileGrid.from_metres("EPSG:32632", 0.25, 60.0, 20.0)
    assert store_settings(RefineConfig(query_contrast_threshold=0.01), grid) == store_settings(RefineConfig(), grid)
    # the weaker threshold only where the map's finds fewer than query_min_keypoints
    few = FeatureMatcher(RefineConfig(equalize=False, query_min_keypoints=len(map_side))).features(image)
    assert np.array_equal(few.points, map_side.points)
    more = FeatureMatcher(RefineConfig(equalize=False, query_min_keypoints=len(map_side) + 1)).features(image)
    assert np.array_equal(more.points, query_side.points)



def test_a_detector_without_a_keypoint_offset_puts_the_nadir_exactly_where_the_fit_does():
    # ORB declares no offset of its own: nothing may be taken off its keypoints. Binary
    # descriptors with bit k set for point k: the partner at Hamming 0, every other at 2
    q, r = pair(60, 0, angle_deg=90.0, shift=(300.0, 60.0))
    bits = np.packbits(np.eye(64, dtype=np.uint8)[:60], axis=1)           # [60, 8] uint8
    q, r = (Features(f.points, np.pad(bits, ((0, 0), (0, 24))), None, f.image_size) for f in (q, r))
    res = FeatureMatcher(RefineConfig(detector="orb", max_rotation_deg=180.0)).match(q, r, (119.5, 119.5))
    expected = similarity(np.array([[119.5, 119.5]]), angle_deg=90.0, shift=(300.0, 60.0))[0]
    assert res.ok and res.nadir_px == (pytest.approx(expected[0], abs=0.2), pytest.approx(expected[1], abs=0.2))


def test_exactly_the_minimum_inlier_share_is_a_place():
    # 30 consistent matches of 200: exactly min_inlier_ratio 0.15
    q, r = pair(30, 170, seed=5, shift=(100.0, 100.0))
    res = FeatureMatcher().match(q, r, (119.5, 119.5))
    assert res.ok and (res.inliers, res.matches) == (30, 200), res.reason


def test_a_textured_camera_view_keeps_the_map_contrast_threshold():
    """Strong texture holds query_min_keypoints at 0.04: the view's features are the map's own."""
    from mean_nav.nav.features import make_extractor

    rng = np.random.default_rng(3)
    tex = cv2.GaussianBlur(rng.normal(0, 1, (480, 480)).astype(np.float32), (0, 0), 1.5)
    image = np.dstack([cv2.normalize(tex, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)] * 3)
    plain = RefineConfig(equalize=False)
    map_side = make_extractor(plain).extract(image)
    assert len(map_side) >= plain.query_min_keypoints
    query_side = FeatureMatcher(plain).features(image)
    assert np.array_equal(query_side.points, map_side.points)
    always = FeatureMatcher(RefineConfig(equalize=False, query_min_keypoints=10 ** 6)).features(image)
    assert not np.array_equal(always.points, map_side.points)
