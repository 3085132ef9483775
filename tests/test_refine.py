"""Geometric verification: feature matching + similarity RANSAC on real orthophoto crops."""
import math

import cv2
import numpy as np
import pytest

from mean_nav.nav.refine import FeatureMatcher, RefineConfig
from nav_testing import ORTHO, OTHER_ORTHO, require_shared_data


@pytest.fixture(scope="module")
def raster():
    require_shared_data()
    from mean_nav.geo.raster import read_metric_raster

    return read_metric_raster(ORTHO, 0.25)


def crop_rotated(image, centre, size, angle_deg=0.0, scale=1.0):
    """A size x size view centred at `centre` (col, row), rotated/scaled about its centre."""
    M = cv2.getRotationMatrix2D((float(centre[0]), float(centre[1])), angle_deg, scale)
    M[:, 2] += np.array([size / 2 - 0.5, size / 2 - 0.5]) - np.array(centre)
    return cv2.warpAffine(image, M, (size, size), flags=cv2.INTER_LINEAR)


@pytest.mark.parametrize("detector", ["sift", "orb"])
def test_query_centre_is_found_in_the_map_region_to_a_pixel(raster, detector):
    img = raster.image
    region_centre = (520, 480)
    region = crop_rotated(img, region_centre, 480)
    true_centre = (region_centre[0] + 37.0, region_centre[1] - 52.0)   # query offset inside the region
    query = crop_rotated(img, true_centre, 240, angle_deg=4.0)
    matcher = FeatureMatcher(RefineConfig(detector=detector))
    res = matcher.match(matcher.features(query), matcher.features(region), (119.5, 119.5))
    assert res.ok, res.reason
    expected = (239.5 + 37.0, 239.5 - 52.0)
    assert math.hypot(res.nadir_px[0] - expected[0], res.nadir_px[1] - expected[1]) < 1.5
    assert abs(res.rotation_deg - 4.0) < 1.0      # the fit recovers the residual rotation
    assert res.inliers >= 30
    # the reported covariance is small but not zero
    assert 0 < math.sqrt(np.trace(res.cov_px)) < 1.5


def test_an_unrelated_place_is_rejected(raster):
    from mean_nav.geo.raster import read_metric_raster

    other = read_metric_raster(OTHER_ORTHO, 0.25).image
    matcher = FeatureMatcher()
    query = crop_rotated(other, (other.shape[1] / 2, other.shape[0] / 2), 120)
    region = crop_rotated(raster.image, (500, 500), 480)
    res = matcher.match(matcher.features(query), matcher.features(region), (59.5, 59.5))
    assert not res.ok


def test_a_fit_with_implausible_scale_is_rejected(raster):
    region = crop_rotated(raster.image, (500, 500), 480)
    query = crop_rotated(raster.image, (500, 500), 240, scale=1.5)   # wrong height by 50 %
    matcher = FeatureMatcher()
    res = matcher.match(matcher.features(query), matcher.features(region), (119.5, 119.5))
    assert not res.ok
    assert "scale" in res.reason or "inliers" in res.reason


def test_no_data_border_produces_no_features():
    matcher = FeatureMatcher()
    image = np.zeros((200, 200, 3), np.uint8)
    image[:, :100] = 200     # a strong edge at the valid/no-data border
    valid = np.zeros((200, 200), bool)
    valid[:, :100] = True
    feats = matcher.features(image, valid)
    assert len(feats) == 0
