"""Pins the camera geometry with derivations that share no code with camera_model: camera
axes written out by hand for simple poses, OpenCV's projectPoints/Rodrigues/undistortPoints,
and an independent ray-casting renderer."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

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
