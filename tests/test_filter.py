"""Constant-velocity Kalman filter: convergence, honest sigma, gating, start-up and loss."""
import math

import numpy as np

from mean_nav.nav.filter import FilterConfig, PositionFilter


def feed_track(f, rng, n=200, dt=0.5, v=(3.0, -2.0), meas_sigma=2.0, start=(1000.0, 2000.0)):
    truth, outs = [], []
    R = np.eye(2) * meas_sigma ** 2
    for k in range(n):
        t = k * dt
        p = np.array(start) + np.array(v) * t
        out = f.update(t, p + rng.normal(0, meas_sigma, 2), R)
        truth.append(p)
        outs.append(out)
    return truth, outs


def test_filter_converges_and_its_68_percent_radius_is_honest():
    rng = np.random.default_rng(0)
    f = PositionFilter(FilterConfig(accel_sigma_ms2=0.5))
    truth, outs = feed_track(f, rng, n=400)
    errors, sigmas = [], []
    settled = list(zip(truth, outs))[20:]
    # a 99.9 % gate rejects about one honest measurement in a thousand
    assert sum(o.accepted for _, o in settled) >= 0.99 * len(settled)
    for p, o in settled:
        errors.append(math.hypot(o.x - p[0], o.y - p[1]))
        sigmas.append(o.sigma_h_m)
    errors, sigmas = np.array(errors), np.array(sigmas)
    inside = np.mean(errors < sigmas)
    assert 0.55 < inside < 0.85, inside
    assert np.median(errors) < 2.0                 # better than a single 2 m measurement
    assert abs(outs[-1].vx - 3.0) < 0.5 and abs(outs[-1].vy + 2.0) < 0.5


def test_first_fix_is_not_trusted_until_a_second_agrees():
    f = PositionFilter()
    R = np.eye(2)
    first = f.update(0.0, [0.0, 0.0], R)
    assert not first.accepted and not first.tracking
    far = f.update(0.5, [500.0, 0.0], R)           # disagrees: becomes the new candidate
    assert not far.accepted and not far.tracking
    agree = f.update(1.0, [502.0, 1.0], R)
    assert agree.accepted and agree.tracking
    assert abs(agree.x - 502.0) < 3.0


def test_gate_rejects_an_outlier_and_keeps_the_track():
    rng = np.random.default_rng(1)
    f = PositionFilter()
    feed_track(f, rng, n=20, v=(0.0, 0.0), start=(0.0, 0.0), meas_sigma=1.0)
    out = f.update(10.0, [80.0, 0.0], np.eye(2))
    assert not out.accepted and out.tracking
    assert "gated out" in out.reason
    assert abs(out.x) < 3.0
    assert f.update(10.5, [0.3, -0.2], np.eye(2)).accepted


def test_repeated_disagreement_drops_the_track_and_restarts_at_the_new_place():
    rng = np.random.default_rng(2)
    f = PositionFilter(FilterConfig(max_consecutive_rejections=3))
    feed_track(f, rng, n=20, v=(0.0, 0.0), start=(0.0, 0.0), meas_sigma=1.0)
    t = 10.0
    results = []
    for k in range(6):
        t += 0.5
        results.append(f.update(t, [300.0, 300.0], np.eye(2)))
    assert not results[0].accepted and not results[1].accepted
    assert results[-1].accepted
    assert math.hypot(results[-1].x - 300.0, results[-1].y - 300.0) < 2.0


def test_track_is_lost_when_no_fix_arrives_for_too_long():
    rng = np.random.default_rng(3)
    f = PositionFilter(FilterConfig(lost_after_s=5.0))
    feed_track(f, rng, n=10, v=(1.0, 0.0))
    coasting = f.predict(6.0)
    assert coasting.tracking and not coasting.accepted
    assert coasting.sigma_h_m > f.sigma_h_at(4.5) * 0.99
    lost = f.predict(11.0)
    assert not lost.tracking and not f.tracking


def test_sigma_grows_while_coasting():
    rng = np.random.default_rng(4)
    f = PositionFilter()
    feed_track(f, rng, n=20)
    s1 = f.predict(10.5).sigma_h_m
    s2 = f.predict(13.0).sigma_h_m
    assert s2 > s1 * 1.5


def coverage_with_shared_error(bias_sigma_told, seed):
    """Fraction of fixes inside the reported 68 % radius when every measurement shares a
    slowly drifting 1 m error (attitude x height) on top of 0.3 m white noise."""
    rng = np.random.default_rng(seed)
    f = PositionFilter(FilterConfig(bias_tau_s=5.0))
    dt, tau, sigma_b = 0.5, 5.0, 1.0
    a = math.exp(-dt / tau)
    bias = rng.normal(0, sigma_b, 2)
    inside = []
    for k in range(800):
        t = k * dt
        truth = np.array([2.0 * t, 1.0 * t])
        bias = a * bias + math.sqrt(1 - a * a) * rng.normal(0, sigma_b, 2)
        z = truth + bias + rng.normal(0, 0.3, 2)
        out = f.update(t, z, np.eye(2) * 0.3 ** 2, bias_sigma_told)
        if k > 20 and out.accepted:
            inside.append(math.hypot(out.x - truth[0], out.y - truth[1]) < out.sigma_h_m)
    return np.mean(inside)


def test_a_shared_slow_error_is_not_averaged_away():
    honest = np.mean([coverage_with_shared_error(1.0, seed) for seed in (0, 1)])
    naive = np.mean([coverage_with_shared_error(0.0, seed) for seed in (0, 1)])
    assert 0.58 < honest < 0.85, honest
    assert naive < 0.4, naive        # treating it as white noise gives a far too small sigma
