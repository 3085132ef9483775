"""`mean-nav calibrate-camera`: chessboard images -> camera YAML (OpenCV intrinsics).

Photograph a printed chessboard 15-40 times from different angles and distances, covering
the whole image; pass the number of INNER corners (columns x rows) and the square size.
The result is the CameraModel YAML the daemon and the replay read (mount angles default
to a nadir camera, image top towards the nose; edit them if yours is mounted otherwise).
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from ..errors import MeanNavError
from .camera_model import CameraModel

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


@dataclass
class CalibrationResult:
    camera: CameraModel
    rms_px: float
    used_images: list[Path]
    rejected_images: list[Path]


def parse_board(text: str) -> tuple[int, int]:
    try:
        cols, rows = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise MeanNavError(f"--board {text!r}: give the inner-corner count as COLSxROWS, e.g. 9x6") from None
    if cols < 2 or rows < 2:
        raise MeanNavError(f"--board {text!r}: a chessboard needs at least 2x2 inner corners")
    return cols, rows


def find_images(inputs: list[str]) -> list[Path]:
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            paths.append(p)
        else:
            raise MeanNavError(f"{p}: image or folder not found")
    if not paths:
        raise MeanNavError(f"{', '.join(inputs)}: no chessboard images (.jpg/.png) found")
    return paths


def calibrate(images: list[Path], board: tuple[int, int], square_m: float,
              fix_aspect: bool = False, model: str = "k5") -> CalibrationResult:
    """Detect the chessboard in every image and solve for intrinsics and distortion."""
    cols, rows = board
    object_corners = np.zeros((cols * rows, 3), np.float32)
    object_corners[:, :2] = np.mgrid[0:cols, 0:rows].T.reshape(-1, 2) * square_m
    object_points, image_points, used, rejected = [], [], [], []
    size = None
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 40, 1e-4)
    for path in tqdm(images, desc="chessboards", unit="image"):
        grey = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if grey is None:
            log.warning("%s: unreadable, skipped", path)
            rejected.append(path)
            continue
        if size is None:
            size = grey.shape[::-1]
        elif grey.shape[::-1] != size:
            raise MeanNavError(f"{path}: image size {grey.shape[1]}x{grey.shape[0]} differs from the first "
                               f"image ({size[0]}x{size[1]}); calibrate one camera mode at a time")
        found, corners = cv2.findChessboardCorners(
            grey, (cols, rows),
            cv2.CALIB_CB_ADAPTIVE_THRESH | cv2.CALIB_CB_NORMALIZE_IMAGE | cv2.CALIB_CB_FAST_CHECK)
        if not found:
            log.info("%s: chessboard not found, skipped", path)
            rejected.append(path)
            continue
        corners = cv2.cornerSubPix(grey, corners, (5, 5), (-1, -1), criteria)
        object_points.append(object_corners)
        image_points.append(corners)
        used.append(path)
    if len(used) < 3:
        raise MeanNavError(f"chessboard {cols}x{rows} found in only {len(used)} of {len(images)} image(s); "
                           "need at least 3 (10+ recommended): check --board counts INNER corners")
    flags = cv2.CALIB_FIX_ASPECT_RATIO if fix_aspect else 0
    if model == "k3":
        flags |= cv2.CALIB_FIX_K3
    rms, K, dist, _, _ = cv2.calibrateCamera(object_points, image_points, size, None, None, flags=flags)
    camera = CameraModel(int(size[0]), int(size[1]), float(K[0, 0]), float(K[1, 1]), float(K[0, 2]),
                         float(K[1, 2]), [float(v) for v in np.ravel(dist)[:5]],
                         rms_reprojection_px=float(rms))
    return CalibrationResult(camera, float(rms), used, rejected)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", help="chessboard images or folders of them")
    parser.add_argument("--board", required=True, help="inner corners COLSxROWS, e.g. 9x6")
    parser.add_argument("--square-m", type=float, required=True, help="chessboard square size in metres")
    parser.add_argument("--out", default="calibration/camera.yaml", help="camera YAML to write")
    parser.add_argument("--fix-aspect", action="store_true", help="force fx == fy (square pixels)")
    parser.add_argument("--distortion-model", choices=["k5", "k3"], default="k5",
                        help="k5: k1,k2,p1,p2,k3; k3: k3 fixed at 0 (narrow lenses)")
    parser.add_argument("--mount-roll-deg", type=float, default=0.0)
    parser.add_argument("--mount-pitch-deg", type=float, default=0.0)
    parser.add_argument("--mount-yaw-deg", type=float, default=0.0)


def run(args: argparse.Namespace) -> int:
    if args.square_m <= 0:
        raise MeanNavError(f"--square-m {args.square_m}: must be a positive size in metres")
    result = calibrate(find_images(args.images), parse_board(args.board), args.square_m,
                       args.fix_aspect, args.distortion_model)
    cam = result.camera
    cam.mount_roll_deg, cam.mount_pitch_deg, cam.mount_yaw_deg = (
        args.mount_roll_deg, args.mount_pitch_deg, args.mount_yaw_deg)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    cam.to_yaml(tmp)
    tmp.replace(out)
    print(f"{out}: {cam.width}x{cam.height} fx={cam.fx:.1f} fy={cam.fy:.1f} cx={cam.cx:.1f} cy={cam.cy:.1f} "
          f"RMS reprojection {result.rms_px:.3f} px from {len(result.used_images)} image(s)"
          + (f", {len(result.rejected_images)} without a chessboard" if result.rejected_images else ""))
    if result.rms_px > 1.0:
        print("warning: RMS above 1 px: blurred images or a wrong --board; recheck before flying")
    return 0
