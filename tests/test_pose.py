"""The camera pose from the verified matches (nav/pose.py): a telemetry tilt error is measured,
not carried into the position.

Correspondences are made with camera_model's own homographies (the simulator's and the
rectifier's), not with pose.py's ray model: a ground point is seen by the camera with the
true attitude and drawn into the rectified view with the telemetry's."""
import math

import numpy as np
import pytest

from mean_nav.nav.camera_model import CameraModel, ground_to_image, ground_to_pixel_homography
from mean_nav.nav.pose import CAMERA_MODEL_ERROR_RAD, CORRELATED_ERRORS, fit_pose

GSD, SIZE = 0.25, 480          # a 120 m rectified view


def correspondences(roll, pitch, yaw, tel_roll, tel_pitch, tel_yaw, height, centre=(500.0, 800.0), gimbal=None,
                    tel_gimbal=None, noise_px=0.0, seed=0):
    """(rectified query px [N, 2], map east/north [N, 2]) of ground points the camera sees."""
    cam = CameraModel.from_fov(640, 480, 70.0)
    rng = np.random.default_rng(seed)
    true_h = ground_to_pixel_homography(cam, roll, pitch, yaw, height, gimbal)
    tel_h = ground_to_pixel_homography(cam, tel_roll, tel_pitch, tel_yaw, height, tel_gimbal)
    rect_from_pixel = ground_to_image(GSD, SIZE) @ np.linalg.inv(tel_h)
    ground = rng.uniform(-50, 50, (400, 2))                     # east, north from the camera centre
    pix = true_h @ np.c_[ground, np.ones(len(ground))].T
    pix = pix[:2] / pix[2]
    rect = rect_from_pixel @ np.r_[pix, np.ones((1, pix.shape[1]))]
    rect = (rect[:2] / rect[2]).T
    inside = (pix[0] >= 0) & (pix[0] < cam.width) & (pix[1] >= 0) & (pix[1] < cam.height) \
        & (rect[:, 0] >= 0) & (rect[:, 0] < SIZE) & (rect[:, 1] >= 0) & (rect[:, 1] < SIZE)
    rect = rect[inside] + rng.normal(0, noise_px, (int(inside.sum()), 2))
    return rect, ground[inside] + np.asarray(centre)


def true_tilt(roll, pitch, yaw, tel_roll, tel_pitch, tel_yaw, gimbal=None, tel_gimbal=None):
    """(east, north) / down of where the ray the telemetry takes for straight down really points."""
    cam = CameraModel.from_fov(640, 480, 70.0)
    error = cam.rotation_ned_from_camera(roll, pitch, yaw, gimbal) @ \
        cam.rotation_ned_from_camera(tel_roll, tel_pitch, tel_yaw, tel_gimbal).T
    ray = error[:, 2]                                           # north, east, down
    return np.array([ray[1], ray[0]]) / ray[2]


def similarity_nadir(query_px, map_xy):
    """Where a least-squares similarity (refine.py's model) puts the view's centre."""
    c = SIZE / 2 - 0.5
    z = (query_px[:, 0] - c) + 1j * -(query_px[:, 1] - c)       # east + i north in the view, px
    w = map_xy[:, 0] + 1j * map_xy[:, 1]
    A = np.c_[z, np.ones(len(z))]
    (a, t), *_ = np.linalg.lstsq(A, w, rcond=None)
    return np.array([t.real, t.imag]), math.degrees(np.angle(a)), abs(a) / GSD


def test_a_2_degree_roll_error_is_measured_and_the_camera_centre_found():
    height, err = 60.0, math.radians(2.0)
    q, m = correspondences(0.02, -0.01, 0.4, 0.02 + err, -0.01, 0.4, height, noise_px=0.3)
    nadir, rotation, scale = similarity_nadir(q, m)
    # the similarity's nadir carries the whole tilt, height x tan(2 deg) = 2.10 m (and a little
    # more: the least-squares fit over the 100 m view also absorbs part of the perspective)
    assert 0.9 * height * math.tan(err) < np.hypot(*(nadir - (500.0, 800.0))) < 1.3 * height * math.tan(err)
    fit, why = fit_pose(q, m, GSD, SIZE / 2 - 0.5, height, tuple(nadir), rotation, scale)
    assert fit is not None, why
    # 0.3 px (7.5 cm) noise on ~300 points over a 100 m footprint: the tilt to ~0.05 deg, so
    # the centre to 60 m x tan(0.05 deg) = 5 cm; 0.15 m leaves 3x room
    assert np.hypot(*(fit.position - (500.0, 800.0))) < 0.15
    assert abs(fit.tilt_deg - 2.0) < 0.15
    # the telemetry rolls the camera 2 deg further right than it is: the ray it takes for
    # straight down points 2 deg to the body's right (heading 0.4 rad: right is east cos, north -sin)
    right = np.array([math.cos(0.4), -math.sin(0.4)])
    assert float(fit.tilt @ right) == pytest.approx(math.tan(err), abs=math.radians(0.15))
    assert fit.tilt == pytest.approx(true_tilt(0.02, -0.01, 0.4, 0.02 + err, -0.01, 0.4), abs=math.radians(0.15))
    assert fit.nadir == pytest.approx(fit.position + fit.height_m * fit.tilt, abs=1e-9)
    assert abs(fit.height_m - height) < 0.2


def test_the_tilt_sign_matches_where_the_similarity_put_the_nadir():
    """nadir = centre + height x tilt: the tilt points from the camera to the similarity's nadir."""
    height = 100.0
    q, m = correspondences(0.0, 0.0, 0.0, 0.0, math.radians(1.5), 0.0, height)
    nadir, rotation, scale = similarity_nadir(q, m)
    fit, why = fit_pose(q, m, GSD, SIZE / 2 - 0.5, height, tuple(nadir), rotation, scale)
    assert fit is not None, why
    offset = nadir - (500.0, 800.0)
    assert np.hypot(*offset) > 2.0                               # 100 m x tan(1.5 deg) = 2.6 m
    assert float(fit.tilt @ offset) / (np.hypot(*fit.tilt) * np.hypot(*offset)) > 0.99


@pytest.mark.parametrize("yaw_error_deg", [0.0, 30.0, 180.0])
def test_a_gimbal_camera_and_a_turned_view_give_the_same_centre(yaw_error_deg):
    """The fit needs no attitude: the rays of the rectified view are the telemetry's, whatever
    produced them (here a gimbal's attitude, its yaw off by up to 180 deg)."""
    height = 120.0
    true = (math.radians(0.5), math.radians(-88.0), 1.0)
    tel = (math.radians(-0.5), math.radians(-89.5), 1.0 + math.radians(yaw_error_deg))
    q, m = correspondences(0.1, 0.15, 1.0, 0.1, 0.15, 1.0, height, gimbal=true, tel_gimbal=tel, noise_px=0.2)
    nadir, rotation, scale = similarity_nadir(q, m)
    fit, why = fit_pose(q, m, GSD, SIZE / 2 - 0.5, height, tuple(nadir), rotation, scale)
    assert fit is not None, why
    assert np.hypot(*(fit.position - (500.0, 800.0))) < 0.3
    assert fit.tilt == pytest.approx(true_tilt(0.1, 0.15, 1.0, 0.1, 0.15, 1.0, true, tel), abs=math.radians(0.1))
    # the turn of the rays about the vertical: about the telemetry's yaw error, negated (at a
    # pitch near -90 deg roll and yaw mix), exactly that of the true error rotation
    cam = CameraModel.from_fov(640, 480, 70.0)
    error = cam.rotation_ned_from_camera(0, 0, 0, true) @ cam.rotation_ned_from_camera(0, 0, 0, tel).T
    yaw = math.degrees(math.atan2(error[1, 0] - error[0, 1], error[0, 0] + error[1, 1]))
    assert abs(((yaw + yaw_error_deg) + 180) % 360 - 180) < 2.0
    assert abs(((fit.yaw_deg - yaw) + 180) % 360 - 180) < 0.1


def test_the_covariance_holds_the_errors():
    """Over noise draws, the tilt and centre errors against the 4x4 covariance: chi-square(4)."""
    d2, d2_all = [], []
    for seed in range(30):
        q, m = correspondences(0.0, 0.03, 2.0, 0.01, 0.0, 2.0, 80.0, noise_px=0.5, seed=seed)
        nadir, rotation, scale = similarity_nadir(q, m)
        fit, why = fit_pose(q, m, GSD, SIZE / 2 - 0.5, 80.0, tuple(nadir), rotation, scale)
        assert fit is not None, why
        tilt = true_tilt(0.0, 0.03, 2.0, 0.01, 0.0, 2.0)
        truth_nadir = np.r_[np.array([500.0, 800.0]) + 80.0 * tilt, tilt]
        e = np.r_[fit.nadir, fit.tilt] - truth_nadir
        # the camera model's own error is added on the nadir (in proportion to the height);
        # this camera model is exact, so the keypoint part alone is what the errors show
        model_error = np.zeros((4, 4))
        model_error[:2, :2] = (CAMERA_MODEL_ERROR_RAD * fit.height_m) ** 2 * np.eye(2)
        assert np.all(np.linalg.eigvalsh(fit.cov - model_error) > 0)
        exact, _ = fit_pose(q, m, GSD, SIZE / 2 - 0.5, 80.0, tuple(nadir), rotation, scale, model_error_rad=0.0)
        assert exact.cov == pytest.approx(fit.cov - model_error, rel=1e-9, abs=1e-15)
        d2.append(float(e @ np.linalg.solve(fit.cov - model_error, e)))
        d2_all.append(float(e @ np.linalg.solve(fit.cov, e)))
    # independent noise: the mean of chi-square(4) is 4; the keypoint covariance is inflated by
    # CORRELATED_ERRORS for correlated keypoint errors, so about 4 / 1.2 here; never optimistic
    # beyond sampling noise
    assert 4.0 / CORRELATED_ERRORS - 1.0 < np.mean(d2) < 4.8
    # and the model term only widens it
    assert np.mean(d2_all) < np.mean(d2)


def test_too_few_points_or_a_bad_start_give_no_fit():
    q, m = correspondences(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 60.0)
    fit, why = fit_pose(q[:5], m[:5], GSD, SIZE / 2 - 0.5, 60.0, (500.0, 800.0), 0.0, 1.0)
    assert fit is None and "fewer than" in why
    fit, why = fit_pose(q, m, GSD, SIZE / 2 - 0.5, 60.0, (500.0, 800.0), math.nan, 1.0)
    assert fit is None


# --- rendered: a frame the camera saw, rectified with a telemetry roll 2 deg off -------------

@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from mean_nav.geo.cache import TileCache
    from nav_testing import build_test_cache, require_shared_data

    require_shared_data()
    return TileCache.load(build_test_cache(tmp_path_factory.mktemp("cache") / "gorinchem"))


def rendered_view(cache, x, y, height, true_att, tel_att):
    """The rectified query of a frame rendered from the map at (x, y) with the true attitude and
    rectified with the telemetry's."""
    from mean_nav.nav.camera_model import rectify_to_nadir, render_view

    region = cache.region(x, y, 300.0)
    g = float(cache.gsd_m)
    left, top = region.transform.c, region.transform.f
    map_from_ground = np.array([[1 / g, 0, (x - left) / g - 0.5], [0, -1 / g, (top - y) / g - 0.5], [0, 0, 1.0]])
    cam = CameraModel.from_fov(640, 480, 70.0)
    frame = render_view(region.image, map_from_ground, cam, *true_att, height)
    return rectify_to_nadir(frame, cam, *tel_att, height, g, int(cache.tile_px))


@pytest.mark.parametrize("pose_fit", [True, False])
def test_a_rendered_frame_with_a_2_degree_roll_error(cache, pose_fit):
    from mean_nav.nav.acquisition import Candidate
    from mean_nav.nav.localizer import LocalizerConfig
    from mean_nav.nav.verify import Verifier

    height, err = 60.0, math.radians(2.0)
    x, y = float(np.mean(cache.x)), float(np.mean(cache.y))
    true_att = (0.02, -0.01, 0.4)
    query, valid = rendered_view(cache, x, y, height, true_att, (0.02 + err, -0.01, 0.4))
    t = int(np.argmin(np.hypot(cache.x - x, cache.y - y)))
    verifier = Verifier(LocalizerConfig(pose_fit=pose_fit), cache)
    m, why = verifier.verify(query, valid, [Candidate(float(cache.x[t]), float(cache.y[t]), t, 1.0, ("tile", t))],
                             height_m=height, t=0.0)
    assert m is not None, why
    off = height * math.tan(err)                                 # 2.10 m
    # the nadir (the similarity's, or the pose's: the same point) is off by about height x tan(2 deg)
    assert 0.8 * off < math.hypot(m.x - x, m.y - y) < 1.3 * off
    if not pose_fit:
        assert m.tilt is None
        return
    # the pose measures the tilt, so the camera centre is the nadir less height x tilt: SIFT on
    # a 60 m view from 60 m locates the tilt to ~0.3 deg (the field flights), 0.3 m here
    assert m.tilt is not None
    cx, cy = np.array([m.x, m.y]) - height * m.tilt
    assert math.hypot(cx - x, cy - y) < 0.5
    assert abs(math.degrees(math.atan(np.hypot(*m.tilt))) - 2.0) < 0.5
    z, R = m.for_filter(height)
    assert z.shape == (4,) and R.shape == (4, 4) and np.all(np.linalg.eigvalsh(R) > 0)


def test_the_pose_fit_defaults_to_sift_only_with_the_floor_that_goes_with_it():
    from mean_nav.nav.localizer import LocalizerConfig
    from mean_nav.nav.refine import RefineConfig
    sift, xfeat = LocalizerConfig(), LocalizerConfig(refine=RefineConfig(detector="xfeat", matcher="mnn"))
    assert sift.uses_pose_fit() and sift.fix_floor_m() == pytest.approx(0.03)
    # XFeat's pose covariance is not calibrated: the nadir alone, with the nadir-only floor
    assert not xfeat.uses_pose_fit() and xfeat.fix_floor_m() == pytest.approx(0.4)
    assert not LocalizerConfig(pose_fit=False).uses_pose_fit()
    assert LocalizerConfig(pose_fit=False).fix_floor_m() == pytest.approx(0.4)
    forced = LocalizerConfig(pose_fit=True, position_floor_m=0.2, refine=RefineConfig(detector="orb"))
    assert forced.uses_pose_fit() and forced.fix_floor_m() == pytest.approx(0.2)
