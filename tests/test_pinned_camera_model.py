"""Pins the camera geometry with derivations that share no code with camera_model: camera
axes written out by hand for simple poses, OpenCV's projectPoints/Rodrigues/undistortPoints,
and an independent ray-casting renderer."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from mean_nav.errors import MeanNavError
from mean_nav.nav.camera_model import (CameraModel, ground_to_image, ground_to_pixel_homography,
                                       rectify_to_nadir, render_view, rotation_ned_from_body)

S10, C10 = math.sin(math.radians(10)), math.cos(math.radians(10))
NORTH, EAST, DOWN = np.eye(3)
SOUTH, WEST = -NORTH, -EAST


def cam_640(**mount) -> CameraModel:
    return CameraModel(640, 480, 500.0, 505.0, 322.0, 236.0, **mount)


def project(cam: CameraModel, axes_ned: np.ndarray, ground_en: np.ndarray, height_m: float,
            distortion=None) -> np.ndarray:
    """OpenCV projection of ground points (east, north) `height_m` below a camera whose
    x, y, z axes (rows of axes_ned) are given in NED."""
    pts = np.array([[n, e, height_m] for e, n in ground_en], np.float64)
    rvec, _ = cv2.Rodrigues(np.asarray(axes_ned, np.float64))
    dist = np.zeros(5) if distortion is None else np.asarray(distortion, np.float64)
    uv, _ = cv2.projectPoints(pts, rvec, np.zeros(3), cam.K, dist)
    return uv.reshape(-1, 2)


def homography_pixels(cam, roll, pitch, yaw, height_m, ground_en) -> np.ndarray:
    h = ground_to_pixel_homography(cam, roll, pitch, yaw, height_m)
    p = np.c_[ground_en, np.ones(len(ground_en))] @ h.T
    return p[:, :2] / p[:, 2:]


GROUND = np.array([[0.0, 0.0], [12.0, 0.0], [0.0, 9.0], [-7.0, -5.0], [20.0, 15.0]])


# Each case: mount, attitude, and the camera axes (x right, y down, z optical) written by hand.
HAND_POSES = {
    # level, nose north: image right = east, image down = south, looking down
    "level north": (dict(), (0.0, 0.0, 0.0), [EAST, SOUTH, DOWN]),
    # nose east: image up (-y) = nose = east, image right = body right = south
    "nose east": (dict(), (0.0, 0.0, math.pi / 2), [SOUTH, WEST, DOWN]),
    # nose east, camera pitched 10 deg on its mount: the optical axis leans forward (east)
    "nose east, mount pitch 10": (dict(mount_pitch_deg=10.0), (0.0, 0.0, math.pi / 2),
                                  [SOUTH, -C10 * EAST + S10 * DOWN, S10 * EAST + C10 * DOWN]),
    # nose north, camera rolled 10 deg on its mount (right side down): the axis leans left (west)
    "mount roll 10": (dict(mount_roll_deg=10.0), (0.0, 0.0, 0.0),
                      [C10 * EAST + S10 * DOWN, SOUTH, -S10 * EAST + C10 * DOWN]),
    # nose north, camera turned 90 deg on its mount: image up = body right = east, right = south
    "mount yaw 90": (dict(mount_yaw_deg=90.0), (0.0, 0.0, 0.0), [SOUTH, WEST, DOWN]),
    # vehicle pitched 10 deg nose up, heading north: like the mount pitch case
    "vehicle pitch 10": (dict(), (0.0, math.radians(10), 0.0),
                         [EAST, -C10 * NORTH + S10 * DOWN, S10 * NORTH + C10 * DOWN]),
}


@pytest.mark.parametrize("name", list(HAND_POSES))
def test_ground_to_pixel_matches_opencv_for_hand_derived_poses(name):
    mount, (roll, pitch, yaw), axes = HAND_POSES[name]
    cam = cam_640(**mount)
    expected = project(cam, np.array(axes), GROUND, 60.0)
    assert homography_pixels(cam, roll, pitch, yaw, 60.0, GROUND) == pytest.approx(expected, abs=1e-6)


def test_mount_pitch_puts_the_optical_axis_forward_of_the_nadir():
    cam = cam_640(mount_pitch_deg=10.0)
    h = 60.0
    # facing east, the principal point sees the ground h*tan(10 deg) east of the nadir,
    # and the nadir appears fy*tan(10 deg) below the principal point
    on_axis, nadir = homography_pixels(cam, 0.0, 0.0, math.pi / 2, h, [[h * math.tan(math.radians(10)), 0.0],
                                                                        [0.0, 0.0]])
    assert on_axis == pytest.approx([cam.cx, cam.cy], abs=1e-6)
    assert nadir == pytest.approx([cam.cx, cam.cy + cam.fy * math.tan(math.radians(10))], abs=1e-6)


def test_body_rotation_is_zyx_as_rodrigues_composes_it():
    roll, pitch, yaw = 0.3, -0.2, 2.0
    about = lambda axis, angle: cv2.Rodrigues(np.asarray(axis, float) * angle)[0]  # noqa: E731
    expected = about(DOWN, yaw) @ about(EAST, pitch) @ about(NORTH, roll)
    assert rotation_ned_from_body(roll, pitch, yaw) == pytest.approx(expected, abs=1e-12)
    # the other orders give a different matrix for these angles: the order is really pinned
    assert not np.allclose(rotation_ned_from_body(roll, pitch, yaw),
                           about(NORTH, roll) @ about(EAST, pitch) @ about(DOWN, yaw), atol=1e-3)
    # physical meaning: nose up 30 deg puts the nose above the horizon (negative down)
    nose = rotation_ned_from_body(0.0, math.radians(30), 0.0) @ NORTH
    assert nose == pytest.approx([math.cos(math.radians(30)), 0.0, -0.5])


def test_field_of_view_intrinsics_put_the_principal_point_at_the_pixel_grid_centre():
    cam = CameraModel.from_fov(640, 480, 90.0)
    assert (cam.fx, cam.fy) == pytest.approx((320.0, 320.0))
    # pixel centres at integers: columns 0..639 are centred on 319.5
    assert (cam.cx, cam.cy) == (319.5, 239.5)


def test_ground_to_image_is_north_up_with_pixel_centres_at_integers():
    a = ground_to_image(gsd_m=0.5, size_px=4, centre_en=(10.0, 20.0))
    px = lambda e, n: (a @ [e, n, 1.0])[:2]  # noqa: E731
    assert px(10.0, 20.0) == pytest.approx([1.5, 1.5])        # the centre of a 4 px image
    assert px(10.5, 20.0) == pytest.approx([2.5, 1.5])        # east: one pixel right
    assert px(10.0, 20.5) == pytest.approx([1.5, 0.5])        # north: one pixel up
    assert px(9.25, 20.75) == pytest.approx([0.0, 0.0])       # top-left pixel centre


# --- images -----------------------------------------------------------------------------

MAP_GSD = 0.1


def smooth_texture(size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 1, (size, size)).astype(np.float32)
    tex = cv2.GaussianBlur(noise, (0, 0), 6.0)
    tex = (tex - tex.min()) / (tex.max() - tex.min()) * 255
    return np.dstack([tex, 255 - tex, tex]).astype(np.uint8)


def ray_cast(map_img: np.ndarray, cam: CameraModel, axes_ned: np.ndarray, height_m: float) -> np.ndarray:
    """Render the camera frame pixel by pixel: ray -> ground -> map (nadir at the map centre)."""
    u, v = np.meshgrid(np.arange(cam.width, dtype=np.float64), np.arange(cam.height, dtype=np.float64))
    rays_cam = np.stack([(u - cam.cx) / cam.fx, (v - cam.cy) / cam.fy, np.ones_like(u)], -1)
    rays = rays_cam @ np.asarray(axes_ned)          # camera -> NED (rows of axes_ned are the axes)
    scale = height_m / rays[..., 2]
    north, east = rays[..., 0] * scale, rays[..., 1] * scale
    c = map_img.shape[0] / 2 - 0.5
    map_x = (c + east / MAP_GSD).astype(np.float32)
    map_y = (c - north / MAP_GSD).astype(np.float32)
    return cv2.remap(map_img, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)


def map_crop(map_img: np.ndarray, gsd_m: float, size_px: int) -> np.ndarray:
    """The north-up crop around the map centre at gsd_m, resampled by hand."""
    offsets = (np.arange(size_px) - (size_px - 1) / 2) * gsd_m / MAP_GSD
    c = map_img.shape[0] / 2 - 0.5
    map_x, map_y = np.meshgrid(c + offsets, c + offsets)
    blurred = cv2.GaussianBlur(map_img, (0, 0), 0.5 * gsd_m / MAP_GSD)
    return cv2.remap(blurred, map_x.astype(np.float32), map_y.astype(np.float32), cv2.INTER_LINEAR)


def shift_px(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """Sub-pixel translation between two images (phase correlation) and its peak response."""
    ga, gb = (cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).astype(np.float32) for x in (a, b))
    window = cv2.createHanningWindow(ga.shape[::-1], cv2.CV_32F)
    (dx, dy), response = cv2.phaseCorrelate(ga, gb, window)
    return dx, dy, response


@pytest.fixture(scope="module")
def world() -> np.ndarray:
    return smooth_texture(900)


def test_a_camera_with_10_deg_mount_pitch_rectifies_back_to_the_map_crop(world):
    mount, (roll, pitch, yaw), axes = HAND_POSES["nose east, mount pitch 10"]
    cam = cam_640(**mount)
    frame = ray_cast(world, cam, np.array(axes), 40.0)
    rect, valid = rectify_to_nadir(frame, cam, roll, pitch, yaw, 40.0, 0.25, 80)
    assert valid.all()
    dx, dy, response = shift_px(map_crop(world, 0.25, 80), rect)
    assert math.hypot(dx, dy) < 0.1 and response > 0.5, (dx, dy, response)   # 0.5 deg off: 1 px


def test_a_distorted_frame_is_recovered_only_with_undistortion(world):
    distortion = [-0.25, 0.08, 0.0, 0.0, 0.0]
    cam = CameraModel(640, 480, 450.0, 450.0, 319.5, 239.5, distortion)
    axes = np.array([EAST, SOUTH, DOWN])
    ideal = ray_cast(world, CameraModel(640, 480, 450.0, 450.0, 319.5, 239.5), axes, 50.0)
    # distort: each distorted pixel shows what the ideal camera sees at its undistorted point
    u, v = np.meshgrid(np.arange(640, dtype=np.float32), np.arange(480, dtype=np.float32))
    und = cv2.undistortPoints(np.stack([u.ravel(), v.ravel()], -1)[:, None], cam.K, np.array(distortion),
                              P=cam.K).reshape(480, 640, 2)
    frame = cv2.remap(ideal, und[..., 0], und[..., 1], cv2.INTER_LINEAR)
    size = 200                           # 50 m at 0.25 m/px: reaches where the distortion is strong
    expected = map_crop(world, 0.25, size)
    with_model, valid = rectify_to_nadir(frame, cam, 0.0, 0.0, 0.0, 50.0, 0.25, size)
    assert valid.all()
    corner = (slice(0, 60), slice(0, 60))      # ~30 m from the nadir: distorted by about 12 px here
    dx, dy, _ = shift_px(expected[corner], with_model[corner])
    assert math.hypot(dx, dy) < 0.5, (dx, dy)
    ignoring = CameraModel(640, 480, 450.0, 450.0, 319.5, 239.5)     # same camera, distortion unknown
    without, _ = rectify_to_nadir(frame, ignoring, 0.0, 0.0, 0.0, 50.0, 0.25, size)
    err_with = np.abs(with_model[corner].astype(float) - expected[corner]).mean()
    err_without = np.abs(without[corner].astype(float) - expected[corner]).mean()
    assert err_with < err_without / 3, (err_with, err_without)


def test_render_view_matches_the_independent_renderer(world):
    mount, (roll, pitch, yaw), axes = HAND_POSES["mount roll 10"]
    cam = cam_640(**mount)
    ours = render_view(world, ground_to_image(MAP_GSD, world.shape[0]), cam, roll, pitch, yaw, 40.0)
    theirs = ray_cast(world, cam, np.array(axes), 40.0)
    inner = (slice(40, -40), slice(40, -40))
    assert np.abs(ours[inner].astype(float) - theirs[inner]).mean() < 1.0


def test_a_camera_file_without_mount_or_distortion_is_an_ideal_nadir_camera(tmp_path):
    (tmp_path / "cam.yaml").write_text("width: 640\nheight: 480\nfx: 500\nfy: 500\ncx: 319.5\ncy: 239.5\n")
    cam = CameraModel.from_yaml(tmp_path / "cam.yaml")
    assert (cam.mount_roll_deg, cam.mount_pitch_deg, cam.mount_yaw_deg) == (0.0, 0.0, 0.0)
    assert not cam.has_distortion
    assert homography_pixels(cam, 0.0, 0.0, 0.0, 50.0, [[0.0, 0.0]])[0] == pytest.approx([319.5, 239.5])


def test_ground_outside_the_map_renders_black_which_means_no_data(world):
    cam = cam_640()
    far = ground_to_image(MAP_GSD, world.shape[0], centre_en=(200.0, 0.0))   # nadir 200 m off the 90 m map
    view = render_view(world, far, cam, 0.0, 0.0, 0.0, 40.0)
    assert not view.any()


# --- gimbal telemetry, camera files, sky, aliasing, valid mask ----------------------------

def test_gimbal_attitude_needs_all_three_angles_and_keeps_their_order():
    from mean_nav.nav.camera_model import gimbal_attitude
    from mean_nav.nav.telemetry import Telemetry

    assert gimbal_attitude(None) is None
    t = Telemetry(0.0, 0.1, 0.2, 0.3, 50.0)
    assert gimbal_attitude(t) is None                                   # no gimbal at all
    t.gimbal_roll, t.gimbal_pitch = 0.01, -1.5
    assert gimbal_attitude(t) is None                                   # yaw unknown
    t.gimbal_yaw = 2.0
    assert gimbal_attitude(t) == (0.01, -1.5, 2.0)                      # (roll, pitch, yaw)


def test_a_default_camera_round_trips_through_its_file_with_opencvs_five_coefficients(tmp_path):
    cam = CameraModel(640, 480, 500.0, 500.0, 319.5, 239.5)
    assert cam.distortion == [0.0] * 5                                  # k1 k2 p1 p2 k3
    cam.to_yaml(tmp_path / "cam.yaml")
    assert CameraModel.from_yaml(str(tmp_path / "cam.yaml")) == cam     # a str path works too


def test_the_calibration_rms_survives_the_camera_file(tmp_path):
    cam = CameraModel(640, 480, 500.0, 500.0, 319.5, 239.5, rms_reprojection_px=0.42)
    cam.to_yaml(tmp_path / "cam.yaml")
    assert CameraModel.from_yaml(tmp_path / "cam.yaml").rms_reprojection_px == 0.42


def test_negative_distortion_alone_is_distortion():
    assert CameraModel(64, 48, 50.0, 50.0, 31.5, 23.5, [-0.2, 0.0, 0.0, 0.0, 0.0]).has_distortion
    assert CameraModel(64, 48, 50.0, 50.0, 31.5, 23.5, [0.0, 0.0, 0.0, -0.001]).has_distortion
    assert not CameraModel(64, 48, 50.0, 50.0, 31.5, 23.5).has_distortion


def _camera_file(tmp_path, **fields):
    values = dict(width=640, height=480, fx=500, fy=500, cx=319.5, cy=239.5)
    values.update(fields)
    path = tmp_path / "cam.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in values.items()))
    return path


def test_a_missing_camera_file_says_how_to_make_one(tmp_path):
    with pytest.raises(MeanNavError, match="calibrate-camera"):
        CameraModel.from_yaml(tmp_path / "nope.yaml")


@pytest.mark.parametrize("count", [4, 5, 8, 12, 14])    # what cv2.undistort accepts
def test_every_opencv_distortion_length_loads(tmp_path, count):
    coefficients = [0.01] + [0.0] * (count - 1)
    cam = CameraModel.from_yaml(_camera_file(tmp_path, distortion=coefficients))
    assert cam.distortion == coefficients
    cv2.undistort(np.zeros((8, 8), np.uint8), cam.K, np.asarray(cam.distortion))   # OpenCV agrees


@pytest.mark.parametrize("count", [3, 6, 7])
def test_other_distortion_lengths_are_refused_naming_the_field(tmp_path, count):
    with pytest.raises(MeanNavError, match="'distortion' has"):
        CameraModel.from_yaml(_camera_file(tmp_path, distortion=[0.0] * count))


@pytest.mark.parametrize("cx,cy", [(0, 0), (640, 480), (0.5, 479.5)])
def test_a_principal_point_anywhere_on_the_image_loads(tmp_path, cx, cy):
    cam = CameraModel.from_yaml(_camera_file(tmp_path, cx=cx, cy=cy))
    assert (cam.cx, cam.cy) == (cx, cy)


@pytest.mark.parametrize("cx,cy,name", [(-1, 240, "'cx'"), (641, 240, "'cx'"), (320, -0.5, "'cy'"),
                                        (320, 481, "'cy'")])
def test_a_principal_point_off_the_image_is_refused(tmp_path, cx, cy, name):
    with pytest.raises(MeanNavError, match=name):
        CameraModel.from_yaml(_camera_file(tmp_path, cx=cx, cy=cy))


def test_sky_above_the_horizon_renders_as_no_data():
    # nose up 60 deg, nadir camera: the axes are the "vehicle pitch" pose of HAND_POSES at 60 deg,
    # so a ray (a, b, 1) points down by b sin60 + cos60, at or above the horizon for b <= -cot 60
    cam = CameraModel.from_fov(64, 48, 90.0)            # fy 32, cy 23.5
    ground = np.full((400, 400), 200, np.uint8)          # 1 m/px, +-200 m around the nadir
    view = render_view(ground, ground_to_image(1.0, 400), cam, 0.0, math.radians(60), 0.0, 2.0)
    b = (np.arange(48) - cam.cy) / cam.fy
    down = b * math.sin(math.radians(60)) + math.cos(math.radians(60))
    sky, near_ground = down <= 0, b >= 0                 # rows b >= 0 see the ground < 3.5 m ahead
    assert sky.sum() == 6                                # rows 0..5
    assert not view[sky].any()
    assert (view[near_ground] == 200).all()


def test_a_much_finer_frame_is_averaged_not_aliased():
    # 1 px stripes at 2 cm/px rectified to 20 cm/px: each output pixel covers 10 stripes, so
    # it must be their mean (127.5); point sampling (on whole pixels here: cx = 199) gives 0 or 255
    cam = CameraModel(400, 400, 500.0, 500.0, 199.0, 199.0)      # 10 m up: 2 cm per pixel
    frame = np.zeros((400, 400), np.uint8)
    frame[:, ::2] = 255
    rect, valid = rectify_to_nadir(frame, cam, 0.0, 0.0, 0.0, 10.0, 0.2, 30)
    inner = rect[5:-5, 5:-5].astype(float)
    assert valid[5:-5, 5:-5].all()
    assert np.abs(inner - 127.5).max() < 20


def test_the_valid_mask_is_the_part_of_the_ground_the_frame_sees():
    # nadir camera, 90 deg by ~74 deg at 10 m: it sees east +-10 m and north +-7.5 m
    cam = CameraModel.from_fov(64, 48, 90.0)
    frame = np.full((48, 64), 100, np.uint8)
    rect, valid = rectify_to_nadir(frame, cam, 0.0, 0.0, 0.0, 10.0, 0.5, 60)    # +-15 m
    px = lambda e, n: (round(29.5 + e / 0.5), round(29.5 - n / 0.5))  # noqa: E731 (col, row)
    for e, n in [(0, 0), (9, 0), (-9, 0), (0, 7), (0, -7), (9, 7)]:
        col, row = px(e, n)
        assert valid[row, col] and rect[row, col] == 100, (e, n)
    for e, n in [(12, 0), (-12, 0), (0, 9), (0, -9), (14, 14)]:
        col, row = px(e, n)
        assert not valid[row, col] and rect[row, col] == 0, (e, n)
