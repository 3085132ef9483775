"""Camera pose from the verified correspondences: the telemetry's tilt error seen in the image.

The rectified query is the frame warped to the ground with the telemetry attitude, so a
tilt error delta of that attitude moves it (and the nadir the similarity fit locates) by
height x tan(delta): from the similarity alone the error is unobservable. The
correspondences hold more: every rectified query pixel is a ray of the camera, turned into
the world with the telemetry attitude, and its map match is where that ray really meets the
ground. A rotation of those rays (the attitude error) moves near and far points differently
(a ground point r from the nadir moves by h delta (1 + r^2/h^2) along the tilt): the
perspective the similarity cannot fit. Solving for the rotation, the camera centre and the
height (planar PnP on the ground plane, Gauss-Newton from the similarity) measures the
camera centre without the tilt term and the tilt error itself.

The result is reported as the similarity's quantity plus the tilt: `nadir` (where the
telemetry's nadir ray meets the ground: camera centre + height x tilt) and `tilt` (that
ray's ground displacement per metre of height, east and north: the filter's tilt-error
state), with their joint 4x4 covariance from the reprojection Jacobian and the residual
variance (and the camera model's own error, in proportion to the height). When the view says
little about the tilt (a small footprint seen from high up) the tilt's variance is large and
the nadir part is what the similarity gave: the measurement degrades to the old one by itself.

The rotation is the world-frame error R = R_true R_telemetry^T, so the telemetry attitude
itself (vehicle, mount or gimbal) is not needed: the ray of a rectified pixel under the
telemetry attitude is (north, east, height) of its ground offset.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MIN_POINTS = 8              # 6 unknowns: fewer points leave no redundancy to estimate the noise
MAX_ITERATIONS = 10
# keypoint localisation is not better than this (query and map pixels), whatever the fit says.
# Only a guard for fits that happen to leave almost no residual: the field suite's residuals are
# 0.15-0.7 px, and a 0.3 px floor (applied to half their frames) made the radius 1.8x too wide
# in variance on the quietest frames and left the noisier ones under it
RESIDUAL_FLOOR_PX = 0.1
# neighbouring keypoints share blur and texture, so their errors are correlated and the
# residual variance alone is optimistic: the camera-centre errors of the field suite's 2,600
# pose fits were 1.2-1.5x (variance) what the residual gives, whatever its size
CORRELATED_ERRORS = 1.2
# beyond the matches: the camera model's own error (focal length, distortion, ground that is not
# quite flat) moves the solved camera centre by about this angle x height (the default of
# localizer.camera_model_error_mrad). Without it the flights 100-150 m up held 56-67 % of their
# centre errors inside the 68 % radius (0.5 m map pixels: the residual is small); per flight, the
# pose fits of nine field-suite flights held 66-76 % at 0.5 mrad, 67-80 % at 0.6 (the 100-120 m flights
# over-wide), 63-75 % at 0.4 (but a fit of the 150 m flight beyond 3x its radius)
CAMERA_MODEL_ERROR_RAD = 0.5e-3
# a tilt error this large is not a telemetry error but a bad fit (the rectified view would
# hardly have matched): the similarity's nadir alone is used
MAX_TILT_ERROR_DEG = 15.0


@dataclass
class PoseFit:
    nadir: np.ndarray          # (east, north) where the telemetry's nadir ray meets the ground, m
    tilt: np.ndarray           # (east, north) ground displacement of that ray per metre of height (~ radians)
    cov: np.ndarray            # 4x4 covariance of [nadir, tilt]
    position: np.ndarray       # (east, north) of the camera centre, m
    height_m: float            # camera height above the ground plane
    yaw_deg: float             # turn of the rays about the vertical (the similarity's rotation)
    residual_m: float          # RMS ground residual
    points: int

    @property
    def tilt_deg(self) -> float:
        return math.degrees(math.atan(float(np.hypot(*self.tilt))))

    @property
    def tilt_sigma_deg(self) -> float:
        """1-sigma size of the tilt's uncertainty (per axis, RMS over the two)."""
        return math.degrees(math.sqrt(max(float(np.trace(self.cov[2:, 2:])) / 2.0, 0.0)))


def rotation(omega: np.ndarray) -> np.ndarray:
    """Rotation matrix of a rotation vector (Rodrigues)."""
    theta = float(np.linalg.norm(omega))
    if theta < 1e-12:
        return np.eye(3)
    k = np.asarray(omega, float) / theta
    K = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return np.eye(3) + math.sin(theta) * K + (1.0 - math.cos(theta)) * (K @ K)


def rays_from_rectified(points_px: np.ndarray, gsd_m: float, centre_px: float, height_m: float) -> np.ndarray:
    """NED rays [N, 3] (north, east, height) of rectified-view pixels (col, row) under the
    attitude that rectified them (camera_model.ground_to_image inverted; the nadir is at
    pixel (centre_px, centre_px))."""
    c = float(centre_px)
    p = np.asarray(points_px, float)
    east = (p[:, 0] - c) * gsd_m
    north = -(p[:, 1] - c) * gsd_m
    return np.stack([north, east, np.full(len(p), float(height_m))], axis=1)


def _ground_slopes(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For NED rays d [N, 3]: (east, north) / down [N, 2], and its derivative [N, 2, 3] with
    respect to a small world-side rotation delta (d -> d + delta x d)."""
    down = d[:, 2]
    slopes = np.stack([d[:, 1], d[:, 0]], axis=1) / down[:, None]
    zero = np.zeros(len(d))
    # d(d)/d(delta) = -[d]x
    dd = np.stack([np.stack([zero, d[:, 2], -d[:, 1]], 1),
                   np.stack([-d[:, 2], zero, d[:, 0]], 1),
                   np.stack([d[:, 1], -d[:, 0], zero], 1)], axis=1)          # [N, 3 (d), 3 (delta)]
    d_east = (dd[:, 1] - slopes[:, 0:1] * dd[:, 2]) / down[:, None]
    d_north = (dd[:, 0] - slopes[:, 1:2] * dd[:, 2]) / down[:, None]
    return slopes, np.stack([d_east, d_north], axis=1)


def _project(rays: np.ndarray, R: np.ndarray, centre: np.ndarray, height: float):
    """Ground (east, north) [N, 2] where the rays (NED, turned by R) from a camera at `centre`,
    `height` above the plane, meet it, and the Jacobian [2N, 6] with respect to (centre east,
    north, height, world-side rotation vector); None when a ray misses the ground."""
    d = rays @ R.T
    if not (d[:, 2] > 1e-6 * np.linalg.norm(d, axis=1)).all():
        return None, None
    slopes, d_slopes = _ground_slopes(d)
    J = np.zeros((len(d), 2, 6))
    J[:, 0, 0] = J[:, 1, 1] = 1.0
    J[:, :, 2] = slopes
    J[:, :, 3:] = height * d_slopes
    return centre + height * slopes, J.reshape(-1, 6)


def _outputs(R: np.ndarray, centre: np.ndarray, height: float) -> tuple[np.ndarray, np.ndarray]:
    """[nadir_e, nadir_n, tilt_e, tilt_n] of a pose and its Jacobian [4, 6]: the tilt is where
    the telemetry's straight-down ray points, per metre of height."""
    slopes, d_slopes = _ground_slopes(R[:, 2][None])
    tilt, d_tilt = slopes[0], d_slopes[0]
    G = np.zeros((4, 6))
    G[0, 0] = G[1, 1] = 1.0
    G[:2, 2] = tilt
    G[:2, 3:] = height * d_tilt
    G[2:, 3:] = d_tilt
    return np.concatenate([centre + height * tilt, tilt]), G


def _solve(rays: np.ndarray, map_xy: np.ndarray, R: np.ndarray, centre: np.ndarray, height: float):
    """Gauss-Newton from a pose: (R, centre, height, residuals [2N], Jacobian [2N, 6]) or why not."""
    observed = map_xy.reshape(-1)
    predicted, J = _project(rays, R, centre, height)
    if predicted is None:
        return "a matched ray misses the ground"
    r = observed - predicted.reshape(-1)
    for _ in range(MAX_ITERATIONS):
        delta, *_ = np.linalg.lstsq(J, r, rcond=None)
        # local parameters: centre (2), height, a rotation vector applied on the world side
        R, centre, height = rotation(delta[3:]) @ R, centre + delta[:2], height + delta[2]
        predicted, J = _project(rays, R, centre, height)
        if predicted is None or not height > 0:
            return "did not converge"
        r = observed - predicted.reshape(-1)
        if np.abs(delta[:3]).max() < 1e-4 and np.abs(delta[3:]).max() < 1e-7:
            return R, centre, height, r, J
    return "did not converge"


def fit_pose(query_px: np.ndarray, map_xy: np.ndarray, gsd_m: float, centre_px: float, height_m: float,
             nadir_xy: tuple[float, float], rotation_deg: float, scale: float,
             model_error_rad: float = CAMERA_MODEL_ERROR_RAD) -> tuple[PoseFit | None, str]:
    """(PoseFit, "") or (None, why): the camera pose that maps the rectified query pixels
    [N, 2] (col, row) onto their map positions [N, 2] (east, north, metres); the view's nadir
    is at pixel (centre_px, centre_px) (size / 2 - 0.5).

    Starts from the similarity (its nadir, rotation and scale); `height_m` is the telemetry
    height the query was rectified with; `model_error_rad`: the camera model's own error."""
    query_px = np.asarray(query_px, float)
    map_xy = np.asarray(map_xy, float)
    n = len(query_px)
    if n < MIN_POINTS:
        return None, f"{n} points, fewer than {MIN_POINTS}"
    if not (height_m > 0 and math.isfinite(scale) and scale > 0 and math.isfinite(rotation_deg)):
        return None, "no usable start"
    rays = rays_from_rectified(query_px, gsd_m, centre_px, height_m)
    # the similarity turns query pixels (row down) by +rotation: the rays turn clockwise seen
    # from above, a positive turn about the down axis
    R = rotation(np.array([0.0, 0.0, math.radians(rotation_deg)]))
    height = float(height_m * scale)
    centre = np.asarray(nadir_xy, float).copy()   # no tilt yet: the nadir is the centre
    solved = _solve(rays, map_xy, R, centre, height)
    if isinstance(solved, str):
        return None, solved
    R, centre, height, r, J = solved
    JtJ = J.T @ J
    if np.linalg.cond(JtJ) > 1e14:
        return None, "ill-conditioned (points nearly collinear)"
    dof = max(2 * n - 6, 1)
    variance = max(float(r @ r) / dof, (RESIDUAL_FLOOR_PX * gsd_m) ** 2)
    cov_params = variance * np.linalg.inv(JtJ)
    out0, G = _outputs(R, centre, height)
    cov = CORRELATED_ERRORS * (G @ cov_params @ G.T)
    cov[:2, :2] += (model_error_rad * height) ** 2 * np.eye(2)   # the nadir, hence the centre
    cov = 0.5 * (cov + cov.T)
    yaw = math.degrees(math.atan2(R[1, 0] - R[0, 1], R[0, 0] + R[1, 1]))
    return PoseFit(out0[:2], out0[2:], cov, centre.copy(), float(height), yaw,
                   math.sqrt(float(r @ r) / n), n), ""
