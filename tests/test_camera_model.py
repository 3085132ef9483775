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


def test_rotation_is_orthonormal():
    r = rotation_ned_from_body(0.3, -0.2, 2.0)
    assert np.allclose(r @ r.T, np.eye(3))
    assert np.isclose(np.linalg.det(r), 1.0)


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
