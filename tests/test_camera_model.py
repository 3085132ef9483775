import numpy as np
import pytest

from mean_nav.errors import MeanNavError
from mean_nav.nav.camera_model import (CameraModel, ground_to_image, ground_to_pixel_homography,
                                       rectify_to_nadir, render_view, rotation_ned_from_body)


def textured_map(size=600, seed=0):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
    import cv2
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)


def test_level_nadir_camera_sees_north_up_and_east_right():
    cam = CameraModel.from_fov(640, 480, 60)
    h = ground_to_pixel_homography(cam, 0.0, 0.0, 0.0, 100.0)
    centre = h @ [0, 0, 1]
    north = h @ [0, 10, 1]
    east = h @ [10, 0, 1]
    centre, north, east = (p[:2] / p[2] for p in (centre, north, east))
    assert np.allclose(centre, [cam.cx, cam.cy])
    assert north[1] < centre[1] and np.isclose(north[0], centre[0])   # north is up
    assert east[0] > centre[0] and np.isclose(east[1], centre[1])     # east is right
    # 10 m at 100 m height with focal f px -> f/10 px
    assert np.isclose(east[0] - centre[0], cam.fx * 10 / 100)


def test_yaw_east_puts_north_on_the_left():
    cam = CameraModel.from_fov(640, 480, 60)
    h = ground_to_pixel_homography(cam, 0.0, 0.0, np.pi / 2, 50.0)
    north = h @ [0, 10, 1]
    assert north[0] / north[2] < cam.cx


def test_pitch_moves_nadir_point_in_image():
    cam = CameraModel.from_fov(640, 480, 60)
    h = ground_to_pixel_homography(cam, 0.0, np.radians(10), 0.0, 50.0)  # nose up
    nadir = h @ [0, 0, 1]
    # camera tilts forward-up, so the point below the vehicle appears lower in the image
    assert nadir[1] / nadir[2] > cam.cy + 10


def test_rotation_is_orthonormal_and_yaw_pitch_roll_in_that_order():
    r = rotation_ned_from_body(0.3, -0.2, 2.0)
    assert np.allclose(r @ r.T, np.eye(3))
    assert np.isclose(np.linalg.det(r), 1.0)
    # nose (body x) after yaw 90 deg then pitch 30 deg up: east and up (negative down).
    # The other order (pitch about north first) would leave it on the horizon pointing east.
    nose = rotation_ned_from_body(0.0, np.radians(30), np.radians(90)) @ [1.0, 0.0, 0.0]
    assert np.allclose(nose, [0.0, np.cos(np.radians(30)), -0.5])
    # right wing (body y) after yaw 90 then roll 30 deg right-wing-down: south and down
    wing = rotation_ned_from_body(np.radians(30), 0.0, np.radians(90)) @ [0.0, 1.0, 0.0]
    assert np.allclose(wing, [-np.cos(np.radians(30)), 0.0, 0.5])


def test_render_then_rectify_recovers_the_map_crop():
    gsd = 0.5
    world = textured_map(800)
    cam = CameraModel.from_fov(480, 360, 70)
    # map pixel of the nadir: centre of the map
    map_from_ground = ground_to_image(gsd, 800)
    roll, pitch, yaw, height = 0.12, -0.1, 0.8, 80.0
    frame = render_view(world, map_from_ground, cam, roll, pitch, yaw, height)
    rect, valid = rectify_to_nadir(frame, cam, roll, pitch, yaw, height, gsd, 100)
    crop = world[350:450, 350:450]
    assert valid.mean() > 0.9
    err = np.abs(rect.astype(float) - crop)[valid].mean()
    shifted = np.abs(rect.astype(float) - world[350:450, 354:454])[valid].mean()
    assert err < 12 and err < shifted / 2


def test_camera_yaml_round_trip_and_errors(tmp_path):
    cam = CameraModel(640, 480, 500.0, 501.0, 320.0, 240.0, [0.1, -0.01, 0, 0, 0], mount_pitch_deg=5.0)
    cam.to_yaml(tmp_path / "cam.yaml")
    back = CameraModel.from_yaml(tmp_path / "cam.yaml")
    assert back == cam
    (tmp_path / "bad.yaml").write_text("width: 640\nheight: 480\nfx: 500\n")
    with pytest.raises(MeanNavError, match="'fy' is missing"):
        CameraModel.from_yaml(tmp_path / "bad.yaml")


def test_gimbal_pointing_down_is_the_level_nadir_camera_with_its_yaw():
    """Gimbal convention: pitch -90 deg looks straight down, image top along the gimbal yaw."""
    cam = CameraModel.from_fov(320, 240, 60)
    cam.mount_pitch_deg = 7.0  # a gimbal attitude replaces the fixed mount
    level = CameraModel.from_fov(320, 240, 60)
    for yaw in (0.0, 0.7, -2.5):
        via_gimbal = ground_to_pixel_homography(cam, 0.3, -0.2, 1.0, 50.0, gimbal=(0.0, -np.pi / 2, yaw))
        via_vehicle = ground_to_pixel_homography(level, 0.0, 0.0, yaw, 50.0)
        assert np.allclose(via_gimbal / via_gimbal[2, 2], via_vehicle / via_vehicle[2, 2])
    # a ground point north of the nadir appears above the image centre when the gimbal yaw is 0
    h = ground_to_pixel_homography(cam, 0.0, 0.0, 0.0, 50.0, gimbal=(0.0, -np.pi / 2, 0.0))
    p = h @ [0.0, 10.0, 1.0]
    assert p[1] / p[2] < cam.cy - 20 and abs(p[0] / p[2] - cam.cx) < 1e-6
    # pitched up from straight down (towards the horizon ahead): the nadir moves down in the image
    h = ground_to_pixel_homography(cam, 0.0, 0.0, 0.0, 50.0, gimbal=(0.0, np.radians(-80), 0.0))
    nadir = h @ [0, 0, 1]
    assert nadir[1] / nadir[2] > cam.cy + 10


def test_rectify_with_the_gimbal_attitude_recovers_the_map_while_the_vehicle_pitches():
    gsd = 0.5
    world = textured_map(800)
    cam = CameraModel.from_fov(480, 360, 70)
    map_from_ground = ground_to_image(gsd, 800)
    roll, pitch, yaw, height = 0.05, np.radians(-10), 0.8, 80.0  # the vehicle noses down 10 deg
    gimbal = (0.01, np.radians(-89), 0.8)                       # the stabilised camera still looks down
    frame = render_view(world, map_from_ground, cam, roll, pitch, yaw, height, gimbal=gimbal)
    crop = world[350:450, 350:450].astype(float)
    rect, valid = rectify_to_nadir(frame, cam, roll, pitch, yaw, height, gsd, 100, gimbal=gimbal)
    err = np.abs(rect.astype(float) - crop)[valid].mean()
    wrong, wrong_valid = rectify_to_nadir(frame, cam, roll, pitch, yaw, height, gsd, 100)  # vehicle attitude
    err_vehicle = np.abs(wrong.astype(float) - crop)[wrong_valid].mean()
    assert valid.mean() > 0.9 and err < 12 and err < err_vehicle / 2
