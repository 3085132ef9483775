"""Pinhole camera, mounting and attitude -> ground-plane homographies.

One module serves both directions so the simulator and the rectifier cannot disagree:
  - `render_view` draws what the camera sees of a north-up metric map (simulator),
  - `rectify_to_nadir` warps a camera frame into a north-up, fixed-GSD view centred on
    the vehicle's nadir point (localizer).

Frames: NED world (x north, y east, z down); aerospace body frame (x forward, y right,
z down) rotated by yaw-pitch-roll (ZYX); OpenCV camera frame (x right, y down, z along
the optical axis). Ground coordinates are (east, north) metres relative to the nadir.

The camera's attitude comes from the vehicle attitude and the fixed mount of camera.yaml,
or, on a stabilising gimbal, from the gimbal's own attitude (`gimbal=(roll, pitch, yaw)`,
ZYX Euler in NED of a frame whose x axis is the optical axis, y the image right: the DJI
and MAVLink convention, pitch -pi/2 = straight down, yaw = where the image top points).
A gimbal attitude replaces vehicle attitude and mount.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import yaml

from ..config import bounded, from_dict, load_yaml
from ..errors import MeanNavError

# Camera looking straight down, image top towards the vehicle's nose.
# Columns are the camera x, y, z axes expressed in the body frame.
R_BODY_FROM_CAMERA_NADIR = np.array([[0.0, -1.0, 0.0],
                                     [1.0, 0.0, 0.0],
                                     [0.0, 0.0, 1.0]])


# The OpenCV camera axes in the gimbal frame (x optical axis, y right, z down of the image).
R_GIMBAL_FROM_CAMERA = np.array([[0.0, 0.0, 1.0],
                                 [1.0, 0.0, 0.0],
                                 [0.0, 1.0, 0.0]])

Gimbal = tuple[float, float, float]  # (roll, pitch, yaw) radians of the camera


def gimbal_attitude(telemetry) -> tuple[float, float, float] | None:
    """The camera's own attitude from a Telemetry when all three gimbal angles are known."""
    if telemetry is None or not telemetry.has_gimbal_attitude:
        return None
    return (telemetry.gimbal_roll, telemetry.gimbal_pitch, telemetry.gimbal_yaw)


def rotation_ned_from_body(roll: float, pitch: float, yaw: float) -> np.ndarray:
    """ZYX (yaw, pitch, roll) rotation, radians, body -> NED."""
    cr, sr = np.cos(roll), np.sin(roll)
    cp, sp = np.cos(pitch), np.sin(pitch)
    cy, sy = np.cos(yaw), np.sin(yaw)
    rz = np.array([[cy, -sy, 0], [sy, cy, 0], [0, 0, 1]])
    ry = np.array([[cp, 0, sp], [0, 1, 0], [-sp, 0, cp]])
    rx = np.array([[1, 0, 0], [0, cr, -sr], [0, sr, cr]])
    return rz @ ry @ rx


@dataclass
class CameraModel:
    """OpenCV intrinsics + distortion + mounting relative to the nadir default."""

    width: int
    height: int
    fx: float
    fy: float
    cx: float
    cy: float
    distortion: list[float] = field(default_factory=lambda: [0.0] * 5)
    mount_roll_deg: float = 0.0
    mount_pitch_deg: float = 0.0
    mount_yaw_deg: float = 0.0
    rms_reprojection_px: float | None = None

    @property
    def K(self) -> np.ndarray:
        return np.array([[self.fx, 0, self.cx], [0, self.fy, self.cy], [0, 0, 1.0]])

    @property
    def has_distortion(self) -> bool:
        return any(abs(d) > 0 for d in self.distortion)

    @classmethod
    def from_fov(cls, width: int, height: int, hfov_deg: float) -> "CameraModel":
        f = (width / 2) / np.tan(np.radians(hfov_deg) / 2)
        return cls(width, height, f, f, (width - 1) / 2, (height - 1) / 2)

    def rotation_ned_from_camera(self, roll: float, pitch: float, yaw: float,
                                 gimbal: Gimbal | None = None) -> np.ndarray:
        """Camera axes in NED: from the gimbal attitude when given, else vehicle attitude + mount."""
        if gimbal is not None:
            return rotation_ned_from_body(*gimbal) @ R_GIMBAL_FROM_CAMERA
        mount = rotation_ned_from_body(*np.radians([self.mount_roll_deg, self.mount_pitch_deg,
                                                    self.mount_yaw_deg]))
        return rotation_ned_from_body(roll, pitch, yaw) @ mount @ R_BODY_FROM_CAMERA_NADIR

    # --- YAML -------------------------------------------------------------------------
    def to_yaml(self, path: str | Path) -> None:
        d = {
            "width": self.width, "height": self.height,
            "fx": float(self.fx), "fy": float(self.fy), "cx": float(self.cx), "cy": float(self.cy),
            "distortion": [float(v) for v in self.distortion],
            "mount": {"roll_deg": self.mount_roll_deg, "pitch_deg": self.mount_pitch_deg,
                      "yaw_deg": self.mount_yaw_deg},
        }
        if self.rms_reprojection_px is not None:
            d["rms_reprojection_px"] = float(self.rms_reprojection_px)
        Path(path).write_text(yaml.safe_dump(d, sort_keys=False), encoding="utf-8")

    @classmethod
    def from_yaml(cls, path: str | Path) -> "CameraModel":
        path = Path(path)
        if not path.is_file():
            raise MeanNavError(f"{path}: camera file not found; run `mean-nav calibrate-camera` or give its path")
        f = from_dict(CameraFile, load_yaml(path, "camera file"), source=str(path))
        if len(f.distortion) not in DISTORTION_COUNTS:
            raise MeanNavError(f"{path}: field 'distortion' has {len(f.distortion)} coefficients; OpenCV takes "
                               f"{', '.join(map(str, DISTORTION_COUNTS))} (k1 k2 p1 p2 [k3 ...])")
        for name, centre, size in (("cx", f.cx, f.width), ("cy", f.cy, f.height)):
            if not 0 <= centre <= size:
                raise MeanNavError(f"{path}: field {name!r} = {centre:g} lies outside the {size}-pixel image; "
                                   "check the calibration (cx, cy are pixels from the top-left corner)")
        return cls(f.width, f.height, f.fx, f.fy, f.cx, f.cy, list(f.distortion), f.mount.roll_deg,
                   f.mount.pitch_deg, f.mount.yaw_deg, f.rms_reprojection_px)


DISTORTION_COUNTS = (4, 5, 8, 12, 14)


@dataclass
class CameraMount:
    """camera.yaml `mount`: rotation from the nadir default (body frame, degrees)."""

    roll_deg: float = bounded(0.0, ge=-180, le=180, unit="deg")
    pitch_deg: float = bounded(0.0, ge=-180, le=180, unit="deg")
    yaw_deg: float = bounded(0.0, ge=-180, le=360, unit="deg")


@dataclass
class CameraFile:
    """camera.yaml as written by `mean-nav calibrate-camera` (CameraModel.to_yaml)."""

    width: int = bounded(ge=1, le=32768, unit="px")
    height: int = bounded(ge=1, le=32768, unit="px")
    fx: float = bounded(gt=0, le=1e6, unit="px")
    fy: float = bounded(gt=0, le=1e6, unit="px")
    cx: float = bounded(unit="px")
    cy: float = bounded(unit="px")
    distortion: list[float] = bounded(default_factory=lambda: [0.0] * 5, ge=-1e4, le=1e4)
    mount: CameraMount = field(default_factory=CameraMount)
    rms_reprojection_px: float | None = bounded(None, ge=0, le=1e4, unit="px")


def ground_to_pixel_homography(cam: CameraModel, roll: float, pitch: float, yaw: float,
                               height_m: float, gimbal: Gimbal | None = None) -> np.ndarray:
    """3x3 H mapping ground (east, north, 1) metres relative to the nadir -> pixel (u, v, 1).

    The ground is a plane `height_m` below the camera (flat-terrain assumption).
    """
    r_cam_from_ned = cam.rotation_ned_from_camera(roll, pitch, yaw, gimbal).T
    ground_to_ned = np.array([[0.0, 1.0, 0.0],      # north
                              [1.0, 0.0, 0.0],      # east
                              [0.0, 0.0, height_m]])  # down
    return cam.K @ r_cam_from_ned @ ground_to_ned


def ground_to_image(gsd_m: float, size_px: int, centre_en: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """3x3 affine: ground (east, north, 1) -> pixel of a north-up image of `size_px` at `gsd_m`,
    whose centre is `centre_en`."""
    e0, n0 = centre_en
    c = size_px / 2.0 - 0.5
    return np.array([[1 / gsd_m, 0, c - e0 / gsd_m],
                     [0, -1 / gsd_m, c + n0 / gsd_m],
                     [0, 0, 1.0]])


def visible_mask(cam: CameraModel, roll: float, pitch: float, yaw: float,
                 gimbal: Gimbal | None = None) -> np.ndarray | None:
    """Pixels whose ray points below the horizon (None when all do)."""
    r = cam.rotation_ned_from_camera(roll, pitch, yaw, gimbal)
    u, v = np.meshgrid(np.arange(cam.width), np.arange(cam.height))
    rays = np.stack([(u - cam.cx) / cam.fx, (v - cam.cy) / cam.fy, np.ones_like(u, float)], -1)
    down = rays @ r[2]
    mask = down > 1e-3
    return None if mask.all() else mask


def render_view(map_image: np.ndarray, map_from_ground: np.ndarray, cam: CameraModel,
                roll: float, pitch: float, yaw: float, height_m: float,
                border_value: int = 0, gimbal: Gimbal | None = None) -> np.ndarray:
    """What a distortion-free camera sees of a north-up map.

    map_from_ground: 3x3 taking ground (east, north, 1) relative to the nadir to map pixels.
    """
    h_pix = ground_to_pixel_homography(cam, roll, pitch, yaw, height_m, gimbal)
    map_from_pixel = map_from_ground @ np.linalg.inv(h_pix)
    view = cv2.warpPerspective(map_image, map_from_pixel, (cam.width, cam.height),
                               flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=border_value)
    mask = visible_mask(cam, roll, pitch, yaw, gimbal)
    if mask is not None:
        view[~mask] = border_value
    return view


def rectify_to_nadir(frame: np.ndarray, cam: CameraModel, roll: float, pitch: float, yaw: float,
                     height_m: float, gsd_m: float, size_px: int,
                     gimbal: Gimbal | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Warp a frame to a north-up view at `gsd_m` m/px, `size_px` square, centred on the nadir.

    roll/pitch/yaw are the vehicle's (camera.yaml mount applies); `gimbal` (see the module
    docstring) is the camera's own attitude and replaces them when given.
    Returns (image, valid_mask). Undistorts first when the camera has distortion.
    """
    if cam.has_distortion:
        frame = cv2.undistort(frame, cam.K, np.asarray(cam.distortion, float))
    h_pix = ground_to_pixel_homography(cam, roll, pitch, yaw, height_m, gimbal)
    # warpPerspective has no area filter: shrink a much finer frame first to avoid aliasing.
    scale = (height_m / cam.fx) / gsd_m
    if scale < 0.66:
        frame = cv2.resize(frame, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        # cv2.resize keeps pixel centres aligned: u' = (u + 0.5) * scale - 0.5
        offset = 0.5 * (scale - 1.0)
        h_pix = np.array([[scale, 0.0, offset], [0.0, scale, offset], [0.0, 0.0, 1.0]]) @ h_pix
    pixel_from_out = h_pix @ np.linalg.inv(ground_to_image(gsd_m, size_px))
    out = cv2.warpPerspective(frame, pixel_from_out, (size_px, size_px),
                              flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT)
    valid = cv2.warpPerspective(np.full(frame.shape[:2], 255, np.uint8), pixel_from_out,
                                (size_px, size_px), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
                                borderMode=cv2.BORDER_CONSTANT) > 0
    return out, valid
