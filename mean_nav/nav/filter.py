"""Kalman filter for visual fixes in a local metric frame, rate-independent, with an online
estimate of the autopilot's attitude error.

State: east, north position (metres in the tile cache's CRS), velocity (m/s) and the
world-frame tilt error of the telemetry attitude (radians, a first-order Gauss-Markov
process: the ground displacement of the telemetry's nadir ray per metre of height).
Measurement: the refined camera-nadir position = position + height x tilt error + white
noise, and, where the camera pose was solved from the matches (pose.py), the tilt error
itself, with the joint 4x4 covariance. Without the tilt state the filter would average the
shared, slowly varying error as if it were white and report a sigma that is too small;
without the measured tilt that state is hardly observable (only through how the nadir
wanders), so its size decides the radius. The gate is on the nadir; a measured tilt that
then disagrees with the track beyond the gate (a poor pose fit) is dropped, the nadir kept.

Everything is in seconds and physical units, so the same settings serve 0.05 Hz photo
surveys and 30 Hz video:
  - motion: continuous white acceleration (the position covariance after dt does not depend
    on how many frames fell inside dt); frames without a fix change no state: the next fix
    is predicted in one step from the last accepted one;
  - a lost filter is (re)started when two fixes agree under that motion model, whatever
    their spacing (at least `measurement_correlation_s`: the next video frame repeats a wrong
    match); a single wrong match never becomes the track. A fix that brings its own
    independent confirmation (`update(confirmed=True)`: the frame's two halves verified apart
    at the same place) starts a track alone;
  - a measurement update never drops the track: a prediction that grew vague over a long
    frame spacing is honest, and a fix that agrees with it confirms it like a second
    start-up fix would. Only coasting (no fix) for `lost_after_s` drops it;
  - persistent disagreement (gated-out fixes for `reject_after_s`, at least two) means the
    track is what is wrong: it is dropped and the rejected fixes become start-up candidates
    (two of them that agree restart the track in that same update);
  - fixes closer in time than `measurement_correlation_s` share their matching error (the
    same features seen again), so the filter takes at most one independent fix per that time:
    in the position update (R inflated by correlation / spacing) and in the attitude-error
    weights (each fix's likelihood counted by spacing / correlation).

Attitude error magnitude (multiple-model adaptive estimation): users rarely know their
autopilot's roll/pitch accuracy, and it sets the reported sigma above ~50 m. The filter runs
one Kalman filter per hypothesis, a log grid of sizes (0.3..6.8 deg) crossed with correlation
times (`bias_tau_s` x 1, 6, 24: a slow error is hardly observable, so the slow, large
hypotheses the data cannot rule out stay in the mixture); each hypothesis is weighted
by the likelihood of its own innovations (a fading memory of `attitude_memory_s`) and of
the level of the measured tilts against its spread, and the output is the weighted mixture
(mean, covariance including the spread between hypotheses). A wrong hypothesis mis-predicts
the measured tilts and how the nadir wanders from frame to frame, so the weights move to the
right one within a few tens of seconds; `attitude_sigma_deg` is only a prior.

`horizontal_sigma_m` is the radius holding 68 % of the horizontal error (not the per-axis
sigma, which holds only 39 % in 2-D), so "1-sigma accuracy" means what autopilots and users
read into it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..config import bounded

# sqrt of the chi-square(2) 68.27 % quantile: radius/per-axis-sigma of the 68 % circle.
RADIUS68_PER_SIGMA = math.sqrt(-2.0 * math.log(1.0 - 0.6827))
# attitude-error hypotheses (1 sigma, degrees): 0.3 .. 6.8 in steps of sqrt(2). Below 0.3 deg
# the camera mount calibration and the flat-ground assumption dominate anyway, and the
# innovations can no longer tell the wander from the fit's own noise.
ATTITUDE_GRID_DEG = tuple(0.3 * math.sqrt(2.0) ** k for k in range(10))
# correlation-time hypotheses, multiples of FilterConfig.bias_tau_s (the fastest). A slow error
# barely wanders between fixes, so its size is hardly observable: with one assumed fast tau the
# small-wander data made the bank conclude "small error" and report radii 5x too small. Crossing
# the size grid with slow taus keeps every (size, tau) the data cannot rule out in the mixture.
BIAS_TAU_FACTORS = (1.0, 6.0, 24.0)
# Without a given prior: a typical small autopilot in flight (roll/pitch 1 sigma), uncertain by
# a factor of 2 (a factor of 3 made the mixture's second moment ~1.7 deg where nothing is
# learnt, at photo rates: radii 3x the errors). Low frame rates (0.1 Hz) carry no information on it; from ~0.5 Hz up the
# frame-to-frame wander of the fixes moves the estimate within tens of seconds.
DEFAULT_ATTITUDE_PRIOR_DEG = 0.5
DEFAULT_PRIOR_WIDTH = 2.0
GIVEN_PRIOR_WIDTH = 1.5
MAX_CANDIDATES = 4          # start-up fixes remembered while waiting for agreement


@dataclass
class FilterConfig:
    # manoeuvring acceleration, continuous white noise: velocity random-walks by this x sqrt(dt / 1 s) m/s
    accel_sigma_ms2: float = bounded(3.0, gt=0, le=100, unit="m/s^2")
    # the same between manoeuvres (straight legs, hover): what separates attitude wander from motion
    cruise_accel_sigma_ms2: float = bounded(0.3, gt=0, le=100, unit="m/s^2")
    manoeuvre_switch_s: float = bounded(10.0, gt=0, le=1e5, unit="s")  # mean time between cruise/manoeuvre switches
    gate_chi2: float = bounded(13.8, gt=0, le=1e6)  # Mahalanobis gate, chi2(2 dof) 99.9 %
    init_velocity_sigma_ms: float = bounded(8.0, gt=0, le=1000, unit="m/s")  # velocity prior of a new track
    # two start-up fixes implying a faster flight do not agree
    max_speed_ms: float = bounded(25.0, gt=0, le=1000, unit="m/s")
    # coasting without an accepted fix for this long drops the track
    lost_after_s: float = bounded(60.0, gt=0, le=86_400, unit="s")
    # gated-out fixes for this long (and at least two): the track is what is wrong
    reject_after_s: float = bounded(2.0, ge=0, le=86_400, unit="s")
    max_sigma_m: float = bounded(60.0, gt=0, le=1e5, unit="m")  # coasting beyond this 68 % radius is not a position
    # shortest correlation time of the attitude error considered (the bank also tries BIAS_TAU_FACTORS x it)
    bias_tau_s: float = bounded(5.0, gt=0, le=1e5, unit="s")
    attitude_memory_s: float = bounded(60.0, gt=0, le=1e6, unit="s")  # fading memory of the attitude-error estimate
    # fixes closer in time share their matching error (the same features seen again)
    measurement_correlation_s: float = bounded(0.3, ge=0, le=60, unit="s")


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
    attitude_sigma_deg: float = math.nan   # current estimate of the attitude error (1 sigma)
    vague: bool = False        # coasting with a 68 % radius above max_sigma_m: not a usable position
    reason: str = ""


@dataclass
class _Fix:
    t: float
    z: np.ndarray
    R: np.ndarray
    height_m: float


class PositionFilter:
    """Constant-velocity Kalman filter bank with gating, start-up confirmation and an
    adaptive attitude-error magnitude. `attitude_prior_deg`: the autopilot's roll/pitch
    accuracy if known (a prior, not a setting); None: every grid value equally likely."""

    def __init__(self, cfg: FilterConfig | None = None, attitude_prior_deg: float | None = None):
        self.cfg = cfg or FilterConfig()
        sizes = np.radians(np.array(ATTITUDE_GRID_DEG))
        # hypotheses: every attitude-error size crossed with every correlation time
        grid = np.tile(sizes, len(BIAS_TAU_FACTORS))
        self._tau = np.repeat(self.cfg.bias_tau_s * np.array(BIAS_TAU_FACTORS), len(sizes))
        if attitude_prior_deg is None:
            # the fixes only tell how fast the error wanders (size^2 / tau: a 2 deg error over
            # 30 s wanders like 0.8 deg over 5 s), so the typical autopilot is a prior on that
            # rate, and a slower, larger error with the same wander is as plausible a priori
            centre, width = DEFAULT_ATTITUDE_PRIOR_DEG, DEFAULT_PRIOR_WIDTH
            prior_on = grid * np.sqrt(self.cfg.bias_tau_s / self._tau)
        else:
            # a given accuracy is the size itself; the data then picks the correlation time
            centre, width = max(float(attitude_prior_deg), 1e-3), GIVEN_PRIOR_WIDTH
            prior_on = grid
        # log-normal prior over the grid: the innovations move it when they can tell
        log_prior = -0.5 * (np.log(prior_on / math.radians(centre)) / math.log(width)) ** 2
        self._grid = grid
        self._log_prior = log_prior
        self._log_likelihood = np.zeros(len(grid))   # fading memory; survives track resets
        self._likelihood_t: float | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the track (not the attitude-error estimate: it belongs to the autopilot)."""
        self._bank: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None   # states, covariances, mode probabilities
        # the newest fix judged (accepted or gated out): an older one is out of order. The
        # bank itself stays at last_accept_t: predictions are queries from there, so frames
        # without a fix change nothing (each committed step would mix the manoeuvre mode into
        # the cruise mode again: the result would depend on how many frames fell in between)
        self.t: float | None = None
        self.last_accept_t: float | None = None
        self._rejected: list[_Fix] = []
        self._candidates: list[_Fix] = []

    # --- queries ----------------------------------------------------------------------
    @property
    def tracking(self) -> bool:
        return self._bank is not None

    @property
    def weights(self) -> np.ndarray:
        """Probability of each attitude-error hypothesis (ATTITUDE_GRID_DEG, tiled once per
        BIAS_TAU_FACTORS entry)."""
        log_w = self._log_prior + self._log_likelihood
        w = np.exp(log_w - log_w.max())
        return w / w.sum()

    @property
    def attitude_sigma_deg(self) -> float:
        """The current estimate of the attitude error, 1 sigma (geometric mean over the bank)."""
        return float(math.degrees(math.exp(float(self.weights @ np.log(self._grid)))))

    def position_at(self, t: float) -> tuple[np.ndarray, np.ndarray] | None:
        """Predicted (position, 2x2 covariance) at time t without changing the filter."""
        if self._bank is None:
            return None
        x, P = self._mix(*self._predicted(t))
        return x[:2].copy(), P[:2, :2].copy()

    @property
    def tilt_error(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The estimated tilt error of the telemetry attitude now: (east, north) ground
        displacement of its nadir ray per metre of height (~radians) and its 2x2 covariance."""
        if self._bank is None:
            return None
        x, P = self._mix(*self._bank)
        return x[4:6].copy(), P[4:6, 4:6].copy()

    def sigma_h_at(self, t: float) -> float:
        pred = self.position_at(t)
        return math.inf if pred is None else _radius68(pred[1])

    @property
    def candidates(self) -> list[tuple[float, float, float]]:
        """Unconfirmed start-up fixes (t, east, north), newest last: where acquisition looks first."""
        return [(c.t, float(c.z[0]), float(c.z[1])) for c in self._candidates]

    def spacing_problems(self, spacing_s: float) -> list[str]:
        """Why frames `spacing_s` apart cannot be served well by these settings (empty: fine)."""
        cfg, problems = self.cfg, []
        if not spacing_s > 0:
            return problems
        if spacing_s >= cfg.lost_after_s / 2:
            problems.append(f"frames are {spacing_s:.1f} s apart but filter.lost_after_s is {cfg.lost_after_s:g} s: "
                            "one missed fix drops the track; raise lost_after_s above 2 x the frame spacing")
        if spacing_s > cfg.lost_after_s:
            problems.append(f"frames are {spacing_s:.1f} s apart, more than filter.lost_after_s: no two fixes "
                            "can ever confirm a track")
        return problems

    # --- steps ------------------------------------------------------------------------
    def _predicted(self, t: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """IMM step of every hypothesis to time t: mix its two modes (cruise, manoeuvre),
        predict each. Returns states [K, 2, 6], covariances [K, 2, 6, 6] and the predicted
        mode probabilities [K, 2] (K attitude-error hypotheses)."""
        cfg = self.cfg
        X, P, mu = self._bank
        dt = max(0.0, t - self.last_accept_t)
        stay = 0.5 * (1.0 + math.exp(-2.0 * dt / cfg.manoeuvre_switch_s))
        transition = np.array([[stay, 1.0 - stay], [1.0 - stay, stay]])
        c = mu @ transition                                              # [K, j]
        mix = transition[None] * mu[:, :, None] / np.maximum(c[:, None, :], 1e-300)   # [K, i, j]
        X0 = np.einsum("kij,kid->kjd", mix, X)
        d = X[:, :, None, :] - X0[:, None, :, :]                         # [K, i, j, 6]
        P0 = np.einsum("kij,kide->kjde", mix, P) + np.einsum("kij,kijd,kije->kjde", mix, d, d)
        K = len(self._grid)
        F = np.tile(np.eye(6), (K, 1, 1))
        F[:, 0, 2] = F[:, 1, 3] = dt
        decay = np.exp(-dt / self._tau)                                  # per hypothesis
        F[:, 4, 4] = F[:, 5, 5] = decay
        F = F[:, None]                                                   # [K, 1, 6, 6]
        # continuous white-noise acceleration, per axis [[dt^3/3, dt^2/2], [dt^2/2, dt]] q
        q = np.array([cfg.cruise_accel_sigma_ms2, cfg.accel_sigma_ms2]) ** 2       # m^2/s^3 per mode
        Q = np.zeros((K, 2, 6, 6))
        for i in (0, 1):
            Q[:, :, i, i] = dt ** 3 / 3 * q
            Q[:, :, i, i + 2] = Q[:, :, i + 2, i] = dt ** 2 / 2 * q
            Q[:, :, i + 2, i + 2] = dt * q
            Q[:, :, i + 4, i + 4] = (self._grid ** 2 * (1.0 - decay ** 2))[:, None]  # keeps the tilt error stationary
        Ft = np.swapaxes(F, -1, -2)
        return np.einsum("kjd,ked->kje", X0, F[:, 0]), F @ P0 @ Ft + Q, c

    def _mix(self, X: np.ndarray, P: np.ndarray, mu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and covariance of the whole bank (hypotheses x modes)."""
        w = (self.weights[:, None] * mu).reshape(-1)
        return _moments(w, X.reshape(-1, 6), P.reshape(-1, 6, 6))

    def predict(self, t: float) -> FilterOutput:
        """The track predicted to time t from the last accepted fix (a frame without a fix);
        changes nothing, except that it drops the track when no fix was accepted for lost_after_s."""
        if self._bank is None:
            return FilterOutput(False, False, reason="no track")
        t = max(t, self.t)   # out-of-order frame: never go back before the newest fix judged
        if t - self.last_accept_t > self.cfg.lost_after_s:
            age = t - self.last_accept_t
            self.reset()
            return FilterOutput(False, False, reason=f"track lost: no accepted fix for {age:.0f} s "
                                f"(filter.lost_after_s {self.cfg.lost_after_s:g} s)")
        return self._output(False, self._predicted(t))

    def update(self, t: float, z, R, height_m: float, confirmed: bool = False) -> FilterOutput:
        """Offer a measurement at time t, seen from height_m above ground: z = [e, n], the
        measured nadir (the tilt error moves it by height x angle), or z = [e, n, tilt_e,
        tilt_n], the nadir and the tilt error itself (pose.py), with its white-noise
        covariance R (2x2 or 4x4). `confirmed`: the fix carries its own independent
        confirmation (two sub-views of the frame verified apart at the same place), so
        without a track it starts one alone."""
        z = np.asarray(z, float).reshape(-1)
        if z.size not in (2, 4):
            raise ValueError(f"a measurement has 2 (nadir) or 4 (nadir, tilt) values, got {z.size}")
        R = np.asarray(R, float).reshape(z.size, z.size)
        fix = _Fix(float(t), z, R, max(float(height_m), 0.0))
        if self._bank is None:
            return self._start(fix, confirmed)
        if t < self.t:   # reported like predict(t): at the newest fix judged
            out = self._output(False, self._predicted(self.t))
            out.reason = "fix older than the track (out-of-order frame): not used"
            return out
        return self._update(fix)

    def _measurement(self, fix: _Fix, dt_since_accept: float):
        H = np.zeros((fix.z.size, 6))
        H[0, 0] = H[1, 1] = 1.0
        H[0, 4] = H[1, 5] = fix.height_m          # measured nadir = position + height x tilt error
        if fix.z.size == 4:
            H[2, 4] = H[3, 5] = 1.0               # measured tilt error
        inflate = max(1.0, self.cfg.measurement_correlation_s / max(dt_since_accept, 1e-3))
        return H, fix.R * inflate

    def _update(self, fix: _Fix) -> FilterOutput:
        cfg = self.cfg
        H, R = self._measurement(fix, fix.t - self.last_accept_t)
        X, P, c = self._predicted(fix.t)
        d2, d2_tilt, d2_centre = self._gate_d2(fix, H, R, X, P, c)
        if fix.z.size == 4 and not (d2 <= cfg.gate_chi2 and d2_tilt <= cfg.gate_chi2):
            # the measured tilt disagrees with the track's: either the telemetry attitude of
            # this frame is off (a step it interpolated across: the pose's camera centre is
            # right) or the pose fit is poor (the nadir is right). The one the track agrees
            # with is kept, the tilt not learnt from
            if d2_centre <= cfg.gate_chi2:
                T = np.hstack([np.eye(2), -fix.height_m * np.eye(2)])   # centre = nadir - h x tilt
                fix = _Fix(fix.t, T @ fix.z, T @ fix.R @ T.T, fix.height_m)
                H, R, d2 = T @ H, T @ R @ T.T, d2_centre
            else:
                fix = _Fix(fix.t, fix.z[:2], fix.R[:2, :2], fix.height_m)
                H, R = H[:2], R[:2, :2]
        if d2 > cfg.gate_chi2:
            self.t = fix.t
            self._rejected = [r for r in self._rejected if fix.t - r.t <= cfg.lost_after_s][-MAX_CANDIDATES + 1:]
            self._rejected.append(fix)
            first = self._rejected[0]
            if len(self._rejected) >= 2 and fix.t - first.t >= cfg.reject_after_s:
                # the fixes keep disagreeing with the track: trust neither; restart from them
                rejected = self._rejected
                n, span = len(rejected), fix.t - first.t
                self.reset()
                # the fixes that outvoted the track may agree among themselves: then they are
                # the new track at once, as two start-up fixes would be
                self._candidates = rejected[:-1]
                restarted = self._start(fix)
                why = (f"track dropped: {n} fixes over {span:.1f} s disagreed with it "
                       f"(filter.reject_after_s {cfg.reject_after_s:g} s)")
                if restarted.accepted:
                    restarted.reason = f"{why}; restarted from those that agree with each other"
                    return restarted
                return FilterOutput(False, False, mahalanobis2=d2, attitude_sigma_deg=self.attitude_sigma_deg,
                                    reason=why)
            out = self._output(False, (X, P, c))
            out.mahalanobis2 = d2
            out.reason = f"fix gated out (Mahalanobis^2 {d2:.1f} > {cfg.gate_chi2:g})"
            return out
        # every hypothesis and mode takes the fix; the innovation likelihoods re-weight them
        nu = fix.z - X @ H.T                                            # [K, M, 2]
        S = H @ P @ H.T + R
        S_inv = np.linalg.inv(S)
        mode_ll = -0.5 * (np.einsum("kma,kmab,kmb->km", nu, S_inv, nu) + np.log(np.linalg.det(S)))
        gain = P @ H.T @ S_inv                                         # [K, M, 6, 2]
        I_KH = np.eye(6) - gain @ H
        X = X + np.einsum("kmab,kmb->kma", gain, nu)
        P = I_KH @ P @ np.swapaxes(I_KH, -1, -2) + gain @ R @ np.swapaxes(gain, -1, -2)   # Joseph form
        top = mode_ll.max()
        joint = c * np.exp(mode_ll - top)                              # [K, M]
        log_likelihood = top + np.log(np.maximum(joint.sum(axis=1), 1e-300))
        self._bank = (X, P, joint / np.maximum(joint.sum(axis=1, keepdims=True), 1e-300))
        # a fix that shares its matching error with the last one (closer than
        # measurement_correlation_s) is dt / correlation of an independent one's evidence, as
        # its inflated R says: counted whole, 30 Hz video re-weighted the bank 9x per 0.3 s
        # towards small attitude errors and its radius held 45 % of the errors (1 Hz: 85 %)
        evidence = min(1.0, (fix.t - self.last_accept_t) / cfg.measurement_correlation_s) \
            if cfg.measurement_correlation_s > 0 else 1.0
        self._remember_likelihood(fix.t, evidence * (log_likelihood - log_likelihood.max()),
                                  self._level_likelihood(fix) if fix.z.size == 4 else None)
        self.t = self.last_accept_t = fix.t
        self._rejected = []
        out = self._output(True)
        out.mahalanobis2 = d2
        return out

    def mahalanobis2(self, t: float, z, R, height_m: float, within_m: float = math.inf) -> float:
        """The gate's Mahalanobis^2 of a measurement offered at time t (inf without a track or
        for a time before it); changes nothing. `within_m`: only against the motion modes
        whose predicted 68 % radius is at most this (inf where none is)."""
        if self._bank is None or t < self.t:
            return math.inf
        z = np.asarray(z, float).reshape(-1)
        fix = _Fix(float(t), z, np.asarray(R, float).reshape(z.size, z.size), max(float(height_m), 0.0))
        H, R = self._measurement(fix, fix.t - self.last_accept_t)
        d2, _, d2_centre = self._gate_d2(fix, H, R, *self._predicted(fix.t), within_m=within_m)
        return min(d2, d2_centre)

    def mode_radii_at(self, t: float) -> list[float]:
        """Predicted 68 % radius at time t of each motion mode (cruise, manoeuvre); [] without
        a track. Photos seconds apart leave the manoeuvre mode tens of metres wide while the
        cruise mode still knows the place within metres."""
        return [_radius68(cov) for _, cov in self.mode_positions_at(t)]

    def mode_positions_at(self, t: float) -> list[tuple[np.ndarray, np.ndarray]]:
        """Predicted (position, 2x2 covariance) at time t of each motion mode (cruise,
        manoeuvre); [] without a track."""
        if self._bank is None or t < self.t:
            return []
        return [(X_mode[:2].copy(), P_mode[:2, :2].copy()) for X_mode, P_mode in self._modes(*self._predicted(t))]

    def _modes(self, X, P, c) -> list[tuple[np.ndarray, np.ndarray]]:
        """(state, covariance) of each motion mode over all hypotheses, from a prediction."""
        joint = self.weights[:, None] * c
        return [_moments(joint[:, j], X[:, j], P[:, j]) for j in range(X.shape[1])]

    def _gate_d2(self, fix: _Fix, H, R, X, P, c, within_m: float = math.inf) -> tuple[float, float, float]:
        """Mahalanobis^2 of the nadir; with a measured tilt also what the tilt adds beyond it
        (chi-square 2 dof) and that of the camera centre (nadir - height x tilt) alone (inf
        without one). The gate is on the nadir or the centre: a tilt that disagrees alone is
        a poor pose fit or one frame's attitude error, not a wrong place."""
        # gate per motion mode (over all hypotheses): a turn after a long straight leg must
        # pass under the manoeuvre mode even while the cruise mode is far more probable
        d2 = d2_tilt = d2_centre = math.inf
        T = np.hstack([np.eye(2), -fix.height_m * np.eye(2)])
        for x_mode, P_mode in self._modes(X, P, c):
            if _radius68(P_mode[:2, :2]) > within_m:
                continue
            innovation = fix.z - H @ x_mode
            S = H @ P_mode @ H.T + R
            nadir_d2 = float(innovation[:2] @ np.linalg.solve(S[:2, :2], innovation[:2]))
            if fix.z.size == 4:
                d2_centre = min(d2_centre, float((T @ innovation) @ np.linalg.solve(T @ S @ T.T, T @ innovation)))
            if nadir_d2 < d2:
                d2 = nadir_d2
                if fix.z.size == 4:
                    d2_tilt = float(innovation @ np.linalg.solve(S, innovation)) - nadir_d2
        return d2, d2_tilt, d2_centre

    def _level_likelihood(self, fix: _Fix) -> np.ndarray:
        """Log-likelihood per hypothesis of a measured tilt against the hypothesis' own spread
        of the tilt error (its stationary distribution)."""
        S = fix.R[None, 2:, 2:] + (self._grid ** 2)[:, None, None] * np.eye(2)
        z = fix.z[2:]
        return -0.5 * (np.einsum("a,kab,b->k", z, np.linalg.inv(S), z) + np.log(np.linalg.det(S)))

    def _remember_likelihood(self, t: float, log_likelihood: np.ndarray, level: np.ndarray | None = None) -> None:
        """Add one measurement's log-likelihood per hypothesis (its maximum 0) to the fading memory. Innovations
        say how the tilt changes, not how large it is: a steady 2 deg tilt fits a small slow
        error as well. The size is in the level of measured tilts: the memory keeps one
        measurement's worth of it, renewed as it fades (the first fix adds it whole)."""
        dt = 0.0 if self._likelihood_t is None else max(0.0, t - self._likelihood_t)
        fade = math.exp(-dt / self.cfg.attitude_memory_s)
        new = log_likelihood
        if level is not None:
            new = new + (1.0 - fade) * (level - level.max())
        self._log_likelihood = fade * self._log_likelihood + new
        self._likelihood_t = t

    def _start(self, fix: _Fix, confirmed: bool = False) -> FilterOutput:
        """Confirm a track from the newest earlier fix that agrees with this one under the
        motion model (or from this fix alone when it is `confirmed`); otherwise remember this
        fix as a candidate."""
        cfg = self.cfg
        if confirmed:
            self._init_track(fix)
            return self._output(True)
        candidates = [c for c in self._candidates if 0.0 <= fix.t - c.t <= cfg.lost_after_s]
        repeat = None
        for cand in reversed(candidates):
            dt = fix.t - cand.t
            allowed = cfg.max_speed_ms * dt + 3.0 * math.sqrt(np.trace(cand.R[:2, :2]) + np.trace(fix.R[:2, :2]))
            if dt <= 0.0 or float(np.linalg.norm(fix.z[:2] - cand.z[:2])) > allowed:
                continue
            if dt < cfg.measurement_correlation_s:
                # the next video frame repeats a wrong match as readily as a right one: it
                # shares the candidate's error and confirms nothing
                repeat = repeat or cand
                continue
            self._init_track(cand)
            out = self._update(fix)
            if out.accepted:
                return out
            self.reset()   # the pair disagrees under the motion model
        if repeat is not None:
            # the same evidence again: keep waiting on the earlier fix, newest in the list so that
            # wrong matches in the frames between do not push it out
            self._candidates = [c for c in candidates if c is not repeat] + [repeat]
            return FilterOutput(False, False, attitude_sigma_deg=self.attitude_sigma_deg,
                                reason=f"fix agrees with one {fix.t - repeat.t:.2f} s earlier but shares its error "
                                       f"(filter.measurement_correlation_s {cfg.measurement_correlation_s:g} s); "
                                       "waiting for a later one to confirm")
        self._candidates = (candidates + [fix])[-MAX_CANDIDATES:]
        if candidates:
            reason = "start-up fixes disagree; waiting for two that agree to confirm a track"
        else:
            reason = "first fix, waiting for a second that agrees with it to confirm it"
        return FilterOutput(False, False, attitude_sigma_deg=self.attitude_sigma_deg, reason=reason)

    def _init_track(self, fix: _Fix) -> None:
        K = len(self._grid)
        X = np.zeros((K, 2, 6))
        P = np.zeros((K, 2, 6, 6))
        var = self._grid ** 2
        h, I2 = fix.height_m, np.eye(2)
        if fix.z.size == 2:
            # position from the first fix: its white noise and its tilt error (perfectly correlated)
            X[:, :, :2] = fix.z
            P[:, :, :2, :2] = fix.R + (h ** 2 * var)[:, None, None, None] * I2
            P[:, :, :2, 4:] = P[:, :, 4:, :2] = (-h * var)[:, None, None, None] * I2
            P[:, :, 4:, 4:] = var[:, None, None, None] * I2
        else:
            # no prior on the position: the tilt from its measurement and the hypothesis' prior,
            # then the position = nadir - h x tilt with the nadir's error given the tilt's
            z_n, z_b = fix.z[:2], fix.z[2:]
            R_nn, R_nb, R_bb = fix.R[:2, :2], fix.R[:2, 2:], fix.R[2:, 2:]
            R_bb_inv = np.linalg.inv(R_bb)
            A = R_nb @ R_bb_inv                                    # nadir error | tilt error
            P_b = np.linalg.inv(R_bb_inv[None] + I2[None] / var[:, None, None])   # [K, 2, 2]
            b = P_b @ (R_bb_inv @ z_b)                             # [K, 2]
            M = A - h * I2
            X[:, :, :2] = (z_n - A @ z_b + b @ M.T)[:, None]
            X[:, :, 4:] = b[:, None]
            P[:, :, :2, :2] = (M @ P_b @ M.T + (R_nn - A @ R_nb.T))[:, None]
            P[:, :, :2, 4:] = (M @ P_b)[:, None]
            P[:, :, 4:, :2] = np.swapaxes(P[:, :, :2, 4:], -1, -2)
            P[:, :, 4:, 4:] = P_b[:, None]
            # the measured tilt against each hypothesis' own spread: later innovations only
            # say how it changes, and a large steady tilt would look like a small slow one
            level = self._level_likelihood(fix)
            self._remember_likelihood(fix.t, level - level.max())
        P[:, :, 2, 2] = P[:, :, 3, 3] = self.cfg.init_velocity_sigma_ms ** 2
        self._bank = (X, P, np.full((K, 2), 0.5))
        self.t = self.last_accept_t = fix.t
        self._rejected = []
        self._candidates = []

    def _output(self, accepted: bool, bank=None) -> FilterOutput:
        x, P = self._mix(*(bank if bank is not None else self._bank))
        sigma_h = radius68_of(P[:2, :2])
        return FilterOutput(
            accepted, True, float(x[0]), float(x[1]), float(x[2]), float(x[3]), sigma_h,
            float(math.sqrt(max(np.trace(P[2:4, 2:4]), 0.0))), attitude_sigma_deg=self.attitude_sigma_deg,
            vague=not accepted and sigma_h > self.cfg.max_sigma_m)


def _moments(weights: np.ndarray, X: np.ndarray, P: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of a Gaussian mixture [N] x [N, 6], [N, 6, 6] (spread included)."""
    w = np.asarray(weights, float)
    w = w / w.sum()
    x = w @ X
    d = X - x
    return x, np.einsum("n,nab->ab", w, P) + np.einsum("n,na,nb->ab", w, d, d)


_ELLIPSE_RATIOS = np.concatenate([[0.0], np.geomspace(1e-4, 1.0, 61)])
_radius68_per_major: np.ndarray | None = None     # per sqrt(major eigenvalue), at _ELLIPSE_RATIOS


def _radius68_table() -> np.ndarray:
    """The 68.27 % radius of a 2-D Gaussian with eigenvalues 1 and q, for each q in
    _ELLIPSE_RATIOS. In polar form P(r) = 1 / (2 pi sqrt(q)) * integral over theta of
    (1 - exp(-r^2 k / 2)) / k, k = cos^2 + sin^2 / q; solved by bisection (q = 0: 1-D, r = 1)."""
    global _radius68_per_major
    if _radius68_per_major is None:
        q = _ELLIPSE_RATIOS[1:, None]
        theta = (np.arange(2048) + 0.5) * (math.pi / 2) / 2048          # a quarter: symmetric
        k = np.cos(theta) ** 2 + np.sin(theta) ** 2 / q

        def inside(r):
            return (np.mean((1.0 - np.exp(-0.5 * r[:, None] ** 2 * k)) / k, axis=1) / np.sqrt(q[:, 0]))

        lo, hi = np.full(len(q), 0.9), np.full(len(q), 1.6)
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            below = inside(mid) < 0.6827
            lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
        _radius68_per_major = np.concatenate([[1.0], 0.5 * (lo + hi)])
    return _radius68_per_major


def radius68_of(cov2: np.ndarray) -> float:
    """Radius holding 68.27 % of a 2-D Gaussian error with covariance cov2, exact for any
    ellipse: the circular formula gives up to 7 % more for an elongated one (1.07 sigma of its
    long axis, which holds 71.5 %). What fixes report as their 68 % radius."""
    a, b, d = float(cov2[0, 0]), float(cov2[0, 1]), float(cov2[1, 1])
    mean, half = 0.5 * (a + d), math.sqrt(max(0.25 * (a - d) ** 2 + b * b, 0.0))
    major, minor = max(mean + half, 0.0), max(mean - half, 0.0)
    if major <= 0.0:
        return 0.0
    return math.sqrt(major) * float(np.interp(minor / major, _ELLIPSE_RATIOS, _radius68_table()))


def _radius68(cov2: np.ndarray) -> float:
    """Radius holding ~68 % of a 2-D Gaussian error with covariance cov2 (exact when circular)."""
    return RADIUS68_PER_SIGMA * math.sqrt(max(float(np.trace(cov2)) / 2.0, 0.0))
