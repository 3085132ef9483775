"""Pins the filter's safety behaviour with hand-computed cases: the fusion of two fixes, the
chi-square gate in sigmas, time order, track loss, start-up confirmation and restart."""
from __future__ import annotations

import math

import numpy as np
import pytest

from mean_nav.nav.filter import FilterConfig, PositionFilter

# radius of the 68.27 % circle of a circular 2-D Gaussian: P(r < k sigma) = 1 - exp(-k^2 / 2)
K68 = math.sqrt(-2.0 * math.log(1.0 - 0.6827))


def stationary_track(cfg: FilterConfig | None = None, n: int = 20, sigma_m: float = 0.1) -> PositionFilter:
    """A filter tracking a vehicle hovering at (0, 0), last fix at t = n - 1."""
    f = PositionFilter(cfg)
    for k in range(n):
        out = f.update(float(k), [0.0, 0.0], np.eye(2) * sigma_m ** 2)
    assert out.accepted and out.tracking
    return f


def test_two_simultaneous_fixes_fuse_to_their_inverse_variance_mean():
    f = PositionFilter()
    f.update(5.0, [0.0, 10.0], np.eye(2) * 1.0)
    out = f.update(5.0, [2.0, 12.0], np.eye(2) * 4.0)     # same instant: no motion, no process noise
    assert out.accepted and out.tracking
    # weights 1/1 and 1/4: mean = (0 * 1 + 2 * 0.25) / 1.25 = 0.4 ; variance 1 / 1.25 = 0.8
    assert (out.x, out.y) == (pytest.approx(0.4), pytest.approx(10.4))
    assert out.sigma_h_m == pytest.approx(K68 * math.sqrt(0.8))


def test_a_shared_bias_is_not_averaged_away_by_simultaneous_fixes():
    # z = p + b + w with one bias b (sigma 2 m) shared by both fixes and white w (sigma 1 m):
    # p = (mean of z) - b, so its per-axis variance is 1 / 2 + 2^2 = 4.5, whatever the averaging
    f = PositionFilter()
    f.update(5.0, [0.0, 0.0], np.eye(2), bias_sigma_m=2.0)
    out = f.update(5.0, [2.0, 0.0], np.eye(2), bias_sigma_m=2.0)
    assert out.accepted
    assert (out.x, out.y) == (pytest.approx(1.0), pytest.approx(0.0))
    assert out.sigma_h_m == pytest.approx(K68 * math.sqrt(4.5))


def test_speed_sigma_starts_at_the_initial_velocity_sigma():
    f = PositionFilter(FilterConfig(init_velocity_sigma_ms=8.0))
    f.update(5.0, [0.0, 0.0], np.eye(2))
    out = f.update(5.0, [0.0, 0.0], np.eye(2))       # no time has passed: nothing learnt about velocity
    assert out.sigma_speed_ms == pytest.approx(math.hypot(8.0, 8.0))


def test_an_empty_filter_reports_no_track():
    f = PositionFilter()
    out = f.predict(3.0)
    assert not out.tracking and not out.accepted
    assert f.position_at(3.0) is None and f.sigma_h_at(3.0) == math.inf


def test_68_percent_radius_holds_68_percent_of_a_2d_gaussian():
    f = PositionFilter()
    f.update(0.0, [0.0, 0.0], np.eye(2) * 9.0)
    out = f.update(0.0, [0.0, 0.0], np.eye(2) * 9.0)       # per-axis variance 4.5
    rng = np.random.default_rng(0)
    errors = np.hypot(*rng.normal(0.0, math.sqrt(4.5), (2, 200_000)))
    assert np.mean(errors < out.sigma_h_m) == pytest.approx(0.6827, abs=0.005)


def test_velocity_has_the_sign_and_size_of_the_motion():
    f = PositionFilter()
    for k in range(30):
        t = 0.5 * k
        out = f.update(t, [100.0 + 10.0 * t, 50.0 - 5.0 * t], np.eye(2) * 0.01)
    assert out.vx == pytest.approx(10.0, abs=0.1) and out.vy == pytest.approx(-5.0, abs=0.1)
    ahead = f.predict(t + 2.0)
    assert (ahead.x, ahead.y) == (pytest.approx(100.0 + 10.0 * (t + 2.0), abs=0.3),
                                  pytest.approx(50.0 - 5.0 * (t + 2.0), abs=0.3))


@pytest.mark.parametrize("sigmas, accepted", [(2.0, True), (3.0, True), (5.0, False), (8.0, False)])
def test_the_gate_is_on_the_squared_mahalanobis_distance(sigmas, accepted):
    # the track is known to ~0.1 m; a fix with a 20 m sigma is offered `sigmas` sigma away, so
    # its Mahalanobis distance is ~`sigmas` and the chi2(2) 99.9 % gate (13.8 = 3.7^2) decides
    f = stationary_track()
    sigma = 20.0
    out = f.update(20.0, [sigmas * sigma, 0.0], np.eye(2) * sigma ** 2)
    assert out.mahalanobis2 == pytest.approx(sigmas ** 2, rel=0.02)
    assert out.accepted is accepted
    assert out.tracking


def test_a_frame_older_than_the_filter_state_is_refused():
    f = stationary_track()                                 # last fix at t = 19
    before = f.sigma_h_at(19.0)
    old = f.update(18.0, [0.5, 0.5], np.eye(2) * 0.01)     # agrees, but is from the past
    assert not old.accepted and old.tracking
    assert f.sigma_h_at(19.0) == pytest.approx(before)    # nothing fused
    assert f.update(19.5, [0.0, 0.0], np.eye(2) * 0.01).accepted


def test_prediction_never_goes_back_in_time():
    f = stationary_track()
    f.predict(21.0)
    back = f.predict(20.0)
    assert back.tracking and not back.accepted
    assert back.sigma_h_m == pytest.approx(f.sigma_h_at(21.0))   # still the state at 21 s


def test_a_track_whose_68_percent_radius_exceeds_max_sigma_is_dropped():
    cfg = FilterConfig(lost_after_s=1e6, max_sigma_m=20.0)    # only the sigma check can drop it
    f = stationary_track(cfg)
    lost_at = None
    for k in range(1, 120):
        out = f.predict(19.0 + k)
        if not out.tracking:
            lost_at = k
            break
        assert out.sigma_h_m <= 20.0
    assert lost_at is not None, "coasted for 2 minutes without dropping the track"
    assert not f.tracking and not out.accepted


def test_a_track_without_fixes_for_lost_after_s_is_dropped():
    f = stationary_track(FilterConfig(lost_after_s=3.0, max_sigma_m=1e9))
    assert f.predict(21.5).tracking                          # 2.5 s after the last fix
    assert not f.predict(22.5).tracking                      # 3.5 s


def test_a_fix_after_the_track_was_lost_only_starts_a_new_candidate():
    f = stationary_track(FilterConfig(lost_after_s=3.0, max_sigma_m=1e9))
    late = f.update(25.0, [0.0, 0.0], np.eye(2) * 0.01)     # 6 s after the last fix: the track is gone
    assert not late.tracking and not late.accepted
    assert f.update(25.5, [0.0, 0.0], np.eye(2) * 0.01).tracking   # a second agreeing fix restarts it


def test_a_lost_track_never_restarts_from_a_single_fix():
    # fast loss through max_sigma_m: the fixes that started the old track must not confirm a new one
    f = PositionFilter(FilterConfig(max_sigma_m=5.0))
    f.update(0.0, [0.0, 0.0], np.eye(2))
    assert f.update(0.0, [0.0, 0.0], np.eye(2)).tracking
    assert not f.predict(3.0).tracking
    assert not f.update(3.5, [0.0, 0.0], np.eye(2)).tracking


@pytest.mark.parametrize("gap_s, confirms", [(4.0, True), (5.0, True), (6.0, False), (-1.0, False)])
def test_start_up_fixes_confirm_each_other_only_inside_the_window(gap_s, confirms):
    # max_sigma_m out of the way: 5 s of the initial 8 m/s velocity sigma would exceed 60 m
    f = PositionFilter(FilterConfig(confirm_window_s=5.0, max_sigma_m=1e9))
    f.update(10.0, [0.0, 0.0], np.eye(2))
    out = f.update(10.0 + gap_s, [0.5, 0.0], np.eye(2))
    assert out.tracking is confirms and out.accepted is confirms


@pytest.mark.parametrize("distance_m, agrees", [(28.0, True), (35.0, False)])
def test_start_up_fixes_must_agree_within_3_sigma_plus_max_speed(distance_m, agrees):
    # R = I for both: 3 * sqrt(2 + 2) = 6 m, plus 25 m/s over 1 s: 31 m allowed
    f = PositionFilter(FilterConfig(max_speed_ms=25.0))
    f.update(0.0, [0.0, 0.0], np.eye(2))
    assert f.update(1.0, [distance_m, 0.0], np.eye(2)).tracking is agrees


def test_a_single_outlier_can_never_start_a_track():
    f = PositionFilter()
    for k, z in enumerate([[0.0, 0.0], [900.0, 0.0], [0.0, 900.0], [-900.0, 0.0]]):
        assert not f.update(float(k), z, np.eye(2)).tracking


def test_an_accepted_fix_resets_the_rejection_count():
    f = stationary_track(FilterConfig(max_consecutive_rejections=3))
    outlier, good = [500.0, 0.0], [0.0, 0.0]
    t = 19.0
    for z in (outlier, outlier, good, outlier, outlier, good, outlier, outlier):
        t += 0.5
        out = f.update(t, z, np.eye(2) * 0.01)
        assert out.tracking, f"track dropped at t={t} although no 3 rejections were consecutive"
        assert out.accepted is (z is good)
    out = f.update(t + 0.5, outlier, np.eye(2) * 0.01)     # the third in a row: now it is dropped
    assert not out.tracking and not out.accepted
    # the fix that broke the track is the candidate: the next one agreeing with it restarts there
    again = f.update(t + 1.0, outlier, np.eye(2) * 0.01)
    assert again.tracking and again.accepted and again.x == pytest.approx(500.0, abs=0.5)
