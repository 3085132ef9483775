"""Kalman filter: convergence, honest sigma, gating, start-up whatever the frame spacing,
loss only on prediction, and the online attitude-error estimate. Pure numpy."""
import math

import numpy as np
import pytest

from mean_nav.nav.filter import RADIUS68_PER_SIGMA, FilterConfig, PositionFilter

H = 60.0   # height above ground of the measurements, m


def feed_track(f, rng, n=200, dt=0.5, v=(3.0, -2.0), meas_sigma=2.0, start=(1000.0, 2000.0), t0=0.0):
    truth, outs = [], []
    R = np.eye(2) * meas_sigma ** 2
    for k in range(n):
        t = t0 + k * dt
        p = np.array(start) + np.array(v) * (t - t0)
        out = f.update(t, p + rng.normal(0, meas_sigma, 2), R, H)
        truth.append(p)
        outs.append(out)
    return truth, outs


def test_filter_converges_and_its_68_percent_radius_is_honest():
    rng = np.random.default_rng(0)
    f = PositionFilter(attitude_prior_deg=0.3)
    truth, outs = feed_track(f, rng, n=400)
    settled = list(zip(truth, outs))[20:]
    # a 99.9 % gate rejects about one honest measurement in a thousand
    assert sum(o.accepted for _, o in settled) >= 0.99 * len(settled)
    errors = np.array([math.hypot(o.x - p[0], o.y - p[1]) for p, o in settled])
    sigmas = np.array([o.sigma_h_m for _, o in settled])
    inside = np.mean(errors < sigmas)
    assert 0.55 < inside < 0.85, inside
    assert np.median(errors) < 2.0                 # better than a single 2 m measurement
    assert abs(outs[-1].vx - 3.0) < 0.5 and abs(outs[-1].vy + 2.0) < 0.5


def test_first_fix_is_not_trusted_until_a_second_agrees():
    f = PositionFilter()
    R = np.eye(2)
    first = f.update(0.0, [0.0, 0.0], R, H)
    assert not first.accepted and not first.tracking and "waiting" in first.reason
    far = f.update(0.5, [500.0, 0.0], R, H)        # 1000 m/s from the first: disagrees
    assert not far.accepted and not far.tracking and "disagree" in far.reason
    agree = f.update(1.0, [502.0, 1.0], R, H)      # agrees with the second
    assert agree.accepted and agree.tracking
    assert abs(agree.x - 502.0) < 3.0


def test_photos_ten_seconds_apart_confirm_a_track_and_keep_it():
    """0.1 Hz survey: the 10 s prediction is far wider than max_sigma_m, yet the second fix
    confirms the track and is reported as a fix, and so is every later one."""
    f = PositionFilter(FilterConfig(max_sigma_m=20.0))
    R = np.eye(2) * 0.5 ** 2
    outs = [f.update(10.0 * k, [50.0 * k, 0.0], R, 40.0) for k in range(6)]   # 5 m/s east
    assert not outs[0].accepted
    assert all(o.accepted and o.tracking for o in outs[1:])
    assert abs(outs[-1].vx - 5.0) < 0.5
    # the 10 s prediction grew past max_sigma_m: only coasting reports it as vague
    coast = f.predict(60.0)
    assert coast.tracking and coast.vague and coast.sigma_h_m > 20.0


def test_a_fix_at_3_sigma_is_gated_in_and_one_at_5_sigma_out():
    """Offsets of 3 and 5 times the widest mode's innovation sigma give Mahalanobis^2 9
    (< the 13.8 gate) and 25 (> 13.8)."""
    for k_sigma, accepted in ((3.0, True), (5.0, False)):
        f = PositionFilter(attitude_prior_deg=0.3)
        feed_track(f, np.random.default_rng(5), n=40, v=(0.0, 0.0), start=(0.0, 0.0), meas_sigma=1.0)
        t, R = 20.0, np.eye(2)
        # the manoeuvre mode's prediction is the wider one: the gate is decided there
        mean, cov = max((_nadir_prediction(f, t, mode) for mode in (0, 1)), key=lambda mc: mc[1][0, 0])
        S = cov + R
        out = f.update(t, mean + [k_sigma * math.sqrt(S[0, 0]), 0.0], R, H)
        assert out.accepted == accepted, (k_sigma, out.mahalanobis2)
        assert math.isclose(out.mahalanobis2, k_sigma ** 2, rel_tol=0.05), out.mahalanobis2


def _nadir_prediction(f, t, mode):
    """Predicted mean and covariance of the measured nadir (position + height x tilt) under one motion mode."""
    X, P, c = f._predicted(t)
    Hm = np.zeros((2, 6))
    Hm[0, 0] = Hm[1, 1] = 1.0
    Hm[0, 4] = Hm[1, 5] = H
    w = f.weights * c[:, mode]
    w = w / w.sum()
    Z = X[:, mode] @ Hm.T
    mean = w @ Z
    return mean, sum(wi * (Hm @ Pi @ Hm.T + np.outer(zi - mean, zi - mean)) for wi, zi, Pi in zip(w, Z, P[:, mode]))


def test_gate_rejects_an_outlier_and_keeps_the_track():
    rng = np.random.default_rng(1)
    f = PositionFilter()
    feed_track(f, rng, n=20, v=(0.0, 0.0), start=(0.0, 0.0), meas_sigma=1.0)
    out = f.update(10.0, [80.0, 0.0], np.eye(2), H)
    assert not out.accepted and out.tracking
    assert "gated out" in out.reason
    assert abs(out.x) < 3.0
    assert f.update(10.5, [0.3, -0.2], np.eye(2), H).accepted


def test_disagreement_for_reject_after_s_drops_the_track_and_restarts_at_the_new_place():
    rng = np.random.default_rng(2)
    f = PositionFilter(FilterConfig(reject_after_s=1.5))
    feed_track(f, rng, n=20, v=(0.0, 0.0), start=(0.0, 0.0), meas_sigma=1.0)
    results = [f.update(10.0 + 0.5 * k, [300.0, 300.0], np.eye(2), H) for k in range(1, 7)]
    # rejections at 10.5, 11.0, 11.5: the track survives until they span 1.5 s (at 12.0)
    assert [r.tracking for r in results[:3]] == [True, True, True]
    assert not any(r.accepted for r in results[:3])
    # the rejected fixes agree with each other: the one that drops the track starts the new one
    assert results[3].accepted and "dropped" in results[3].reason and "restarted" in results[3].reason
    assert math.hypot(results[3].x - 300.0, results[3].y - 300.0) < 3.0
    assert all(r.accepted for r in results[4:])
    assert math.hypot(results[-1].x - 300.0, results[-1].y - 300.0) < 2.0


def test_fixes_that_drop_a_track_but_disagree_among_themselves_start_nothing():
    rng = np.random.default_rng(2)
    f = PositionFilter(FilterConfig(reject_after_s=1.5))
    feed_track(f, rng, n=20, v=(0.0, 0.0), start=(0.0, 0.0), meas_sigma=1.0)
    # each 0.5 s apart and 1000 m from the last: faster than max_speed_ms, and far from the track
    results = [f.update(10.0 + 0.5 * k, [1000.0 * k, 500.0], np.eye(2), H) for k in range(1, 5)]
    assert not results[3].tracking and not results[3].accepted and "dropped" in results[3].reason


def test_a_fix_confirmed_on_its_own_starts_a_track_at_once():
    f = PositionFilter()
    R = np.eye(2) * 0.25
    out = f.update(0.0, [100.0, 200.0], R, H, confirmed=True)
    assert out.accepted and out.tracking and out.reason == ""
    assert (out.x, out.y) == (pytest.approx(100.0), pytest.approx(200.0))
    # its radius is the fix's own noise plus the attitude error's share at height H
    assert out.sigma_h_m > RADIUS68_PER_SIGMA * 0.5
    assert f.update(1.0, [105.0, 200.0], R, H).accepted          # 5 m/s: the track goes on
    plain = PositionFilter().update(0.0, [100.0, 200.0], R, H)
    assert not plain.accepted and "waiting" in plain.reason


def test_two_rejections_far_apart_drop_the_track_at_low_frame_rates():
    f = PositionFilter()
    R = np.eye(2)
    for k in range(4):
        f.update(20.0 * k, [0.0, 0.0], R, H)
    assert f.tracking
    assert f.update(80.0, [5000.0, 0.0], R, H).tracking          # one disagreeing photo: kept
    dropped = f.update(100.0, [5000.0, 0.0], R, H)
    # the two photos that dropped it agree with each other: they are the new track
    assert dropped.accepted and "dropped" in dropped.reason and abs(dropped.x - 5000.0) < 2.0


def test_track_is_lost_only_when_coasting_too_long():
    rng = np.random.default_rng(3)
    f = PositionFilter(FilterConfig(lost_after_s=5.0))
    feed_track(f, rng, n=10, v=(1.0, 0.0))
    coasting = f.predict(6.0)
    assert coasting.tracking and not coasting.accepted
    assert coasting.sigma_h_m > f.sigma_h_at(4.5) * 0.99
    lost = f.predict(11.0)
    assert not lost.tracking and not f.tracking and "lost" in lost.reason


def test_sigma_grows_while_coasting_independently_of_the_frame_rate():
    def sigma_after(step):
        f = PositionFilter(attitude_prior_deg=0.3)
        rng = np.random.default_rng(4)
        feed_track(f, rng, n=20)
        t = 9.5
        while t < 15.0 - 1e-9:
            t = min(15.0, t + step)
            out = f.predict(t)
        return out.sigma_h_m

    fast, slow = sigma_after(0.1), sigma_after(5.5)
    assert fast > 3 * f_sigma_at_start()
    # (a per-step white-acceleration model would differ by a factor of ~7 here; what is left
    # is the IMM's mode mixing, applied once per step)
    assert math.isclose(fast, slow, rel_tol=0.15), (fast, slow)


def f_sigma_at_start():
    f = PositionFilter(attitude_prior_deg=0.3)
    feed_track(f, np.random.default_rng(4), n=20)
    return f.sigma_h_at(9.5)


def attitude_error_run(true_deg, prior_deg=None, seconds=300.0, fps=2.0, seed=0, height=150.0, tau=5.0):
    """A straight flight whose fixes share a Gauss-Markov tilt error (correlation time tau) of
    `true_deg` x height, plus 0.5 m white noise. Returns the filter, the coverage of the 68 %
    radius and the largest error in reported radii."""
    rng = np.random.default_rng(seed)
    f = PositionFilter(attitude_prior_deg=prior_deg)
    dt, white = 1.0 / fps, 0.5
    a = math.exp(-dt / tau)
    sigma = math.radians(true_deg)
    tilt = rng.normal(0, sigma, 2)
    inside, worst = [], 0.0
    for k in range(int(seconds * fps)):
        t = k * dt
        truth = np.array([8.0 * t, 0.0])
        tilt = a * tilt + math.sqrt(1 - a * a) * rng.normal(0, sigma, 2)
        out = f.update(t, truth + height * np.tan(tilt) + rng.normal(0, white, 2), np.eye(2) * white ** 2, height)
        if out.accepted:
            error = math.hypot(out.x - truth[0], out.y - truth[1])
            worst = max(worst, error / out.sigma_h_m)
            if t > 60:
                inside.append(error < out.sigma_h_m)
    return f, float(np.mean(inside)), worst


def test_a_slow_attitude_error_is_not_mistaken_for_a_small_one():
    """2 deg with a 30 s correlation time at 150 m wanders between fixes like 0.8 deg with 5 s:
    without a prior the filter cannot tell them apart, so its radius must cover the large one
    (a bank assuming 5 s held 4-17 % of the errors and put several beyond 3 radii)."""
    runs = [attitude_error_run(2.0, seed=seed, tau=30.0, fps=1.0) for seed in (0, 1, 2)]
    assert np.mean([c for _, c, _ in runs]) > 0.5, [c for _, c, _ in runs]
    assert max(w for _, _, w in runs) < 3.0, [w for _, _, w in runs]


def test_no_error_beyond_3_radii_whatever_the_attitude_error_and_its_correlation_time():
    for true_deg, tau in ((0.5, 5.0), (2.0, 5.0), (2.0, 30.0)):
        runs = [attitude_error_run(true_deg, seed=seed, tau=tau) for seed in (0, 1)]
        # the size of a slowly wandering error is not observable: too wide is honest, too narrow not
        assert np.mean([c for _, c, _ in runs]) > 0.45, (true_deg, tau, [c for _, c, _ in runs])
        assert max(w for _, _, w in runs) < 3.0, (true_deg, tau, [w for _, _, w in runs])


def test_a_given_attitude_accuracy_gives_a_radius_near_68_percent():
    runs = [attitude_error_run(2.0, prior_deg=2.0, seed=seed, tau=30.0, fps=1.0) for seed in (0, 1, 2)]
    for f, _, _ in runs:
        assert 2.0 / 1.5 < f.attitude_sigma_deg < 2.0 * 1.5, f.attitude_sigma_deg
    assert 0.55 < np.mean([c for _, c, _ in runs]) < 0.8, [c for _, c, _ in runs]


def test_a_wrong_attitude_prior_is_overruled_by_the_data():
    runs = [attitude_error_run(2.0, prior_deg=0.3, seed=seed) for seed in (0, 1)]
    assert all(f.attitude_sigma_deg > 1.3 for f, _, _ in runs)
    assert np.mean([c for _, c, _ in runs]) > 0.5


def test_a_shared_slow_error_is_not_averaged_away():
    """Told the true attitude error, the 68 % radius holds about 68 % of the errors; a filter
    restricted to a far too small attitude error (white-noise treatment) is overconfident."""
    _, honest, _ = attitude_error_run(1.0, prior_deg=1.0, seed=1)
    naive = PositionFilter(attitude_prior_deg=0.3)
    naive._log_prior[1:] = -1e9                      # only the 0.3 deg, 5 s hypothesis
    rng = np.random.default_rng(1)
    inside = []
    a = math.exp(-0.5 / 5.0)
    tilt = np.zeros(2)
    for k in range(600):
        t = 0.5 * k
        tilt = a * tilt + math.sqrt(1 - a * a) * rng.normal(0, math.radians(1.0), 2)
        out = naive.update(t, np.array([8.0 * t, 0.0]) + H * np.tan(tilt) + rng.normal(0, 0.3, 2),
                           np.eye(2) * 0.09, H)
        if t > 60 and out.accepted:
            inside.append(math.hypot(out.x - 8.0 * t, out.y) < out.sigma_h_m)
    assert 0.55 < honest < 0.9, honest   # (the correlation time is still unknown: a little wide)
    assert np.mean(inside) < 0.45, np.mean(inside)


def test_frame_spacing_beyond_the_settings_is_reported():
    f = PositionFilter(FilterConfig(lost_after_s=30.0))
    assert f.spacing_problems(1.0) == [] and f.spacing_problems(10.0) == []
    assert any("lost_after_s" in p for p in f.spacing_problems(20.0))
    assert len(f.spacing_problems(40.0)) == 2


def test_radius68_is_the_68_percent_circle():
    # chi-square(2) quantile: P(r < k sigma) = 1 - exp(-k^2/2) = 0.6827
    assert math.isclose(1 - math.exp(-RADIUS68_PER_SIGMA ** 2 / 2), 0.6827, rel_tol=1e-9)


def test_the_gate_can_be_asked_without_changing_the_track():
    """mahalanobis2 is the gate's distance of a measurement (k innovation sigmas -> k^2, from
    the mode prediction computed here), and asking it leaves the filter as it was."""
    f = PositionFilter(attitude_prior_deg=0.3)
    feed_track(f, np.random.default_rng(5), n=40, v=(0.0, 0.0), start=(0.0, 0.0), meas_sigma=1.0)
    t, R = 20.0, np.eye(2)
    before = f.predict(19.9)
    mean, cov = max((_nadir_prediction(f, t, mode) for mode in (0, 1)), key=lambda mc: mc[1][0, 0])
    for k_sigma in (1.0, 3.0, 5.0):
        d2 = f.mahalanobis2(t, mean + [k_sigma * math.sqrt((cov + R)[0, 0]), 0.0], R, H)
        assert math.isclose(d2, k_sigma ** 2, rel_tol=0.05), (k_sigma, d2)
    after = f.predict(19.9)
    assert (after.x, after.y, after.sigma_h_m) == (before.x, before.y, before.sigma_h_m)
    assert f.t == 19.5          # a prediction changes no state: the track is at its last fix
    assert f.mahalanobis2(10.0, mean, R, H) == math.inf          # before the track's time
    assert PositionFilter().mahalanobis2(0.0, [0.0, 0.0], R, H) == math.inf   # no track


def test_photos_seconds_apart_leave_the_cruise_mode_tight_and_the_restricted_gate_uses_it_alone():
    """8.3 s between survey photos: the manoeuvre mode predicts tens of metres, the cruise
    mode metres. mahalanobis2(within_m=...) measures a fix against the tight mode only, so a
    fix 35 m off the straight-line prediction passes the full gate (a manoeuvre could explain
    it) but not the restricted one; without a track there are no radii."""
    assert PositionFilter().mode_radii_at(0.0) == []
    f = PositionFilter(attitude_prior_deg=0.3)
    R = np.eye(2) * 0.2 ** 2
    dt, v = 8.3, np.array([3.0, 0.0])
    for k in range(6):
        f.update(k * dt, v * k * dt, R, 40.0)
    t = 6 * dt
    cruise, manoeuvre = f.mode_radii_at(t)
    assert cruise < 15.0 < 30.0 < manoeuvre, (cruise, manoeuvre)
    assert f.sigma_h_at(t) > 30.0            # the mixture is as wide as its widest mode
    straight = v * t
    assert f.mahalanobis2(t, straight, R, 40.0, within_m=30.0) < 1.0
    off = straight + [0.0, 35.0]
    assert f.mahalanobis2(t, off, R, 40.0) <= f.cfg.gate_chi2
    assert f.mahalanobis2(t, off, R, 40.0, within_m=30.0) > f.cfg.gate_chi2
    assert f.mahalanobis2(t, straight, R, 40.0, within_m=cruise / 2) == math.inf   # no mode that tight


def test_the_reported_68_radius_holds_68_percent_of_any_error_ellipse():
    """The circular formula (trace) holds 70-72 % of an elongated error; the reported radius is
    exact for any ellipse (checked by sampling), and the same as before for a circular one."""
    from mean_nav.nav.filter import RADIUS68_PER_SIGMA, _radius68, radius68_of

    rng = np.random.default_rng(5)
    assert radius68_of(np.diag([4.0, 4.0])) == pytest.approx(2.0 * RADIUS68_PER_SIGMA, rel=1e-6)
    assert radius68_of(np.zeros((2, 2))) == 0.0
    for ratio in (0.0, 0.01, 0.2, 0.6):
        angle = rng.uniform(0, math.pi)
        rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        cov = rot @ np.diag([9.0, 9.0 * ratio]) @ rot.T
        errors = np.hypot(*rng.multivariate_normal([0.0, 0.0], cov, 60_000).T)
        assert np.mean(errors <= radius68_of(cov)) == pytest.approx(0.6827, abs=0.006), ratio
        if ratio < 0.3:   # where the circular formula is measurably wide
            assert np.mean(errors <= _radius68(cov)) > 0.695, ratio
