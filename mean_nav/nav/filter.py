"""Constant-velocity Kalman filter for visual fixes in a local metric frame.

State: east, north position (metres in the tile cache's CRS), velocity (m/s), and the
slowly varying error the measurements share (attitude error x height moves every
measured nadir the same way for seconds): a first-order Gauss-Markov bias. Measurements:
the refined camera-nadir position = position + bias + white noise (the fit's covariance).
Without the bias state the filter would average the shared error as if it were white and
report a sigma that is too small.

Why the extra logic around a textbook filter:
  - Mahalanobis gating rejects outliers (a wrong tile that still passed verification).
  - A lost filter is only (re)started when two measurements agree with each other, so a
    single wrong match can never become the track.
  - Persistent disagreement (several gated-out measurements in a row) means the track is
    what is wrong: the filter drops it and restarts from new agreeing measurements.
  - `horizontal_sigma_m` is the radius holding 68 % of the horizontal error (not the
    per-axis sigma, which holds only 39 % in 2-D), so "1-sigma accuracy" means what
    autopilots and users read into it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..config import bounded

# sqrt of the chi-square(2) 68.27 % quantile: radius/per-axis-sigma of the 68 % circle.
RADIUS68_PER_SIGMA = math.sqrt(-2.0 * math.log(1.0 - 0.6827))


@dataclass
class FilterConfig:
    # white-acceleration process noise (m/s^2): turns at 25 deg bank are ~4.6
    accel_sigma_ms2: float = bounded(3.0, gt=0, le=100, unit="m/s^2")
    gate_chi2: float = bounded(13.8, gt=0, le=1e6)  # Mahalanobis gate, chi2(2 dof) 99.9 %
    init_velocity_sigma_ms: float = bounded(8.0, gt=0, le=1000, unit="m/s")
    max_speed_ms: float = bounded(25.0, gt=0, le=1000, unit="m/s")  # used to check that two start-up fixes agree
    # start-up fixes further apart do not confirm each other
    confirm_window_s: float = bounded(5.0, gt=0, le=3600, unit="s")
    lost_after_s: float = bounded(15.0, gt=0, le=86_400, unit="s")  # no accepted fix for this long: track dropped
    max_consecutive_rejections: int = bounded(4, ge=1, le=10_000)
    max_sigma_m: float = bounded(60.0, gt=0, le=1e5, unit="m")  # coasting beyond this 68 % radius counts as lost
    bias_tau_s: float = bounded(5.0, gt=0, le=1e5, unit="s")  # correlation time of the shared (attitude) error


@dataclass
class FilterOutput:
    accepted: bool             # this measurement was gated in and used
    tracking: bool             # the filter has a track (state below is meaningful)
    x: float = math.nan
    y: float = math.nan
    vx: float = math.nan
    vy: float = math.nan
    sigma_h_m: float = math.inf        # 68 % horizontal radius
    sigma_speed_ms: float = math.inf
    mahalanobis2: float = math.nan
    reason: str = ""


class PositionFilter:
    """Constant-velocity Kalman filter with gating and two-fix start-up confirmation."""

    def __init__(self, cfg: FilterConfig | None = None):
        self.cfg = cfg or FilterConfig()
        self.reset()

    def reset(self) -> None:
        self.x: np.ndarray | None = None   # [e, n, ve, vn, bias_e, bias_n]
        self.P: np.ndarray | None = None
        self.bias_sigma_m = 0.0
        self.t: float | None = None
        self.last_accept_t: float | None = None
        self.rejections = 0
        self._candidate: tuple[np.ndarray, np.ndarray, float] | None = None

    # --- queries ----------------------------------------------------------------------
    @property
    def tracking(self) -> bool:
        return self.x is not None

    def position_at(self, t: float) -> tuple[np.ndarray, np.ndarray] | None:
        """Predicted (position, 2x2 covariance) at time t without changing the filter."""
        if self.x is None:
            return None
        x, P = self._predicted(t)
        return x[:2].copy(), P[:2, :2].copy()

    def sigma_h_at(self, t: float) -> float:
        pred = self.position_at(t)
        return math.inf if pred is None else _radius68(pred[1])

    # --- steps ------------------------------------------------------------------------
    def _predicted(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        dt = max(0.0, t - self.t)
        F = np.eye(6)
        F[0, 2] = F[1, 3] = dt
        decay = math.exp(-dt / self.cfg.bias_tau_s)
        F[4, 4] = F[5, 5] = decay
        q = self.cfg.accel_sigma_ms2 ** 2
        # discrete white-noise acceleration model, per axis [[dt^4/4, dt^3/2], [dt^3/2, dt^2]]
        Q = np.zeros((6, 6))
        for i in (0, 1):
            Q[i, i] = dt ** 4 / 4 * q
            Q[i, i + 2] = Q[i + 2, i] = dt ** 3 / 2 * q
            Q[i + 2, i + 2] = dt ** 2 * q
            Q[i + 4, i + 4] = self.bias_sigma_m ** 2 * (1.0 - decay ** 2)   # keeps the bias stationary
        return F @ self.x, F @ self.P @ F.T + Q

    def predict(self, t: float) -> FilterOutput:
        """Advance to time t (no measurement). Drops the track when it is too old or too vague."""
        if self.x is None:
            return FilterOutput(False, False, reason="no track")
        if t < self.t:   # out-of-order frame: report the current state, never go back in time
            return self._output(False)
        self.x, self.P = self._predicted(t)
        self.t = t
        if t - self.last_accept_t > self.cfg.lost_after_s or _radius68(self.P[:2, :2]) > self.cfg.max_sigma_m:
            self.reset()
            return FilterOutput(False, False, reason="track lost (no accepted fix for too long)")
        return self._output(False)

    def update(self, t: float, z: np.ndarray, R: np.ndarray, bias_sigma_m: float = 0.0) -> FilterOutput:
        """Offer a measured position z=[e, n] with white-noise covariance R at time t;
        bias_sigma_m is the 1-sigma (per axis) of the slowly varying error it shares with
        its neighbours in time (e.g. height x attitude error)."""
        z = np.asarray(z, float).reshape(2)
        R = np.asarray(R, float).reshape(2, 2)
        self._set_bias_sigma(bias_sigma_m)
        if self.x is None:
            return self._start(t, z, R)
        out = self.predict(t)
        if not out.tracking:
            return self._start(t, z, R)
        H = np.zeros((2, 6))
        H[0, 0] = H[1, 1] = H[0, 4] = H[1, 5] = 1.0    # measured nadir = position + shared bias
        innovation = z - H @ self.x
        S = H @ self.P @ H.T + R
        d2 = float(innovation @ np.linalg.solve(S, innovation))
        if d2 > self.cfg.gate_chi2:
            self.rejections += 1
            if self.rejections >= self.cfg.max_consecutive_rejections:
                # the measurements keep disagreeing with the track: trust neither; restart
                self.reset()
                self._candidate = (z, R, t)
                return FilterOutput(False, False, mahalanobis2=d2,
                                    reason="track dropped after repeated gated-out fixes")
            out = self._output(False)
            out.mahalanobis2 = d2
            out.reason = f"fix gated out (Mahalanobis^2 {d2:.1f} > {self.cfg.gate_chi2:g})"
            return out
        K = self.P @ H.T @ np.linalg.inv(S)
        self.x = self.x + K @ innovation
        I_KH = np.eye(6) - K @ H
        self.P = I_KH @ self.P @ I_KH.T + K @ R @ K.T   # Joseph form: stays symmetric PSD
        self.last_accept_t = t
        self.rejections = 0
        out = self._output(True)
        out.mahalanobis2 = d2
        return out

    def _start(self, t: float, z: np.ndarray, R: np.ndarray) -> FilterOutput:
        cand = self._candidate
        self._candidate = (z, R, t)
        if cand is None:
            return FilterOutput(False, False, reason="first fix, waiting for a second to confirm it")
        cz, cR, ct = cand
        dt = t - ct
        if not (0.0 <= dt <= self.cfg.confirm_window_s):
            return FilterOutput(False, False, reason="previous fix too old to confirm this one")
        allowed = 3.0 * math.sqrt(np.trace(cR) + np.trace(R) + 4 * self.bias_sigma_m ** 2) + self.cfg.max_speed_ms * dt
        if float(np.linalg.norm(z - cz)) > allowed:
            return FilterOutput(False, False, reason="start-up fixes disagree; waiting for agreement")
        # start from the earlier fix, then fuse the later one through the normal update
        self.x = np.array([cz[0], cz[1], 0.0, 0.0, 0.0, 0.0])
        self.P = np.zeros((6, 6))
        b2 = self.bias_sigma_m ** 2
        # position from the first fix: its white noise and its bias (perfectly correlated)
        self.P[:2, :2] = cR + b2 * np.eye(2)
        self.P[:2, 4:] = self.P[4:, :2] = -b2 * np.eye(2)
        self.P[4:, 4:] = b2 * np.eye(2)
        self.P[2, 2] = self.P[3, 3] = self.cfg.init_velocity_sigma_ms ** 2
        self.t = ct
        self.last_accept_t = ct
        self.rejections = 0
        self._candidate = None
        return self.update(t, z, R, self.bias_sigma_m)

    def _set_bias_sigma(self, sigma_m: float) -> None:
        """Adopt the current shared-error level (it changes with height); keep the bias
        variance consistent with it."""
        sigma_m = max(0.0, float(sigma_m))
        if self.x is not None and sigma_m < self.bias_sigma_m:
            scale = sigma_m / self.bias_sigma_m
            self.x[4:] *= scale
            self.P[4:, :] *= scale
            self.P[:, 4:] *= scale
        self.bias_sigma_m = sigma_m

    def _output(self, accepted: bool) -> FilterOutput:
        return FilterOutput(
            accepted, True, float(self.x[0]), float(self.x[1]), float(self.x[2]), float(self.x[3]),
            _radius68(self.P[:2, :2]), float(math.sqrt(max(np.trace(self.P[2:4, 2:4]), 0.0))))


def _radius68(cov2: np.ndarray) -> float:
    """Radius holding ~68 % of a 2-D Gaussian error with covariance cov2 (exact when circular)."""
    return RADIUS68_PER_SIGMA * math.sqrt(max(float(np.trace(cov2)) / 2.0, 0.0))
