"""calibrate-camera on chessboards rendered with a known camera."""
import math

import cv2
import numpy as np
import pytest
import yaml

from mean_nav.cli import main
from mean_nav.nav.camera_model import CameraModel, rotation_ned_from_body

K_TRUE = np.array([[600.0, 0, 322.0], [0, 600.0, 236.0], [0, 0, 1]])
SIZE = (640, 480)
BOARD = (9, 6)          # inner corners
SQUARE_M = 0.03
PX_PER_SQUARE = 40


def board_texture():
    cols, rows = BOARD[0] + 1, BOARD[1] + 1
    margin = PX_PER_SQUARE
    tex = np.full((rows * PX_PER_SQUARE + 2 * margin, cols * PX_PER_SQUARE + 2 * margin), 255, np.uint8)
    for r in range(rows):
        for c in range(cols):
            if (r + c) % 2 == 0:
                y, x = margin + r * PX_PER_SQUARE, margin + c * PX_PER_SQUARE
                tex[y:y + PX_PER_SQUARE, x:x + PX_PER_SQUARE] = 0
    return tex, margin


def render_board(rng, roll, pitch, yaw, distance):
    tex, margin = board_texture()
    # texture pixel -> board metres, with the first inner corner at the origin
    metres_from_tex = np.array([[SQUARE_M / PX_PER_SQUARE, 0, -(margin + PX_PER_SQUARE) * SQUARE_M / PX_PER_SQUARE],
                                [0, SQUARE_M / PX_PER_SQUARE, -(margin + PX_PER_SQUARE) * SQUARE_M / PX_PER_SQUARE],
                                [0, 0, 1]])
    R = rotation_ned_from_body(roll, pitch, yaw)
    centre = np.array([BOARD[0] - 1, BOARD[1] - 1, 0]) * SQUARE_M / 2
    t = np.array([rng.uniform(-0.04, 0.04), rng.uniform(-0.03, 0.03), distance]) - R @ centre
    H = K_TRUE @ np.column_stack([R[:, 0], R[:, 1], t]) @ metres_from_tex
    img = cv2.warpPerspective(tex, H, SIZE, flags=cv2.INTER_AREA, borderValue=180)
    img = cv2.GaussianBlur(img, (3, 3), 0.6)
    noisy = img.astype(np.float32) + rng.normal(0, 2.0, img.shape)
    return cv2.cvtColor(np.clip(noisy, 0, 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)


@pytest.fixture(scope="module")
def chessboards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chessboards")
    rng = np.random.default_rng(0)
    for i in range(12):
        roll, pitch = rng.uniform(-0.45, 0.45, 2)
        yaw = rng.uniform(-0.3, 0.3)
        cv2.imwrite(str(folder / f"board_{i:02d}.png"), render_board(rng, roll, pitch, yaw, rng.uniform(0.45, 0.7)))
    cv2.imwrite(str(folder / "empty.png"), np.full((SIZE[1], SIZE[0], 3), 128, np.uint8))
    return folder


def test_calibration_recovers_the_known_focal_length(chessboards, tmp_path, capsys):
    out = tmp_path / "calibration" / "camera.yaml"
    rc = main(["calibrate-camera", str(chessboards), "--board", "9x6", "--square-m", str(SQUARE_M),
               "--out", str(out), "--distortion-model", "k3"])
    assert rc == 0
    cam = CameraModel.from_yaml(out)
    assert (cam.width, cam.height) == SIZE
    assert cam.fx == pytest.approx(600.0, rel=0.01)
    assert cam.fy == pytest.approx(600.0, rel=0.01)
    assert cam.cx == pytest.approx(322.0, abs=6) and cam.cy == pytest.approx(236.0, abs=6)
    assert cam.rms_reprojection_px < 0.5
    assert max(abs(d) for d in cam.distortion) < 0.1       # a distortion-free lens stays near zero
    assert not list(out.parent.glob("*.tmp"))
    printed = capsys.readouterr().out
    assert "1 without a chessboard" in printed


def test_wrong_board_size_is_a_clear_error(chessboards, tmp_path, capsys):
    few = sorted(chessboards.glob("board_*.png"))[:1]     # a failed search is slow: keep it short
    rc = main(["calibrate-camera", *map(str, few), "--board", "7x7", "--square-m", "0.03",
               "--out", str(tmp_path / "c.yaml")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "INNER corners" in err and not (tmp_path / "c.yaml").exists()


@pytest.mark.parametrize("board", ["9", "axb", "1x5"])
def test_malformed_board_argument_is_rejected(chessboards, tmp_path, board, capsys):
    rc = main(["calibrate-camera", str(chessboards), "--board", board, "--square-m", "0.03",
               "--out", str(tmp_path / "c.yaml")])
    assert rc == 1
    assert "--board" in capsys.readouterr().err


def test_example_camera_file_loads():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "calibration" / "example_camera.yaml"
    cam = CameraModel.from_yaml(path)
    hfov = 2 * math.degrees(math.atan(cam.width / 2 / cam.fx))
    assert 60 < hfov < 80 and cam.has_distortion
    assert set(yaml.safe_load(path.read_text())) >= {"width", "height", "fx", "fy", "cx", "cy", "distortion"}
