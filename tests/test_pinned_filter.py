"""Pins the filter's safety behaviour with hand-computed cases: the fusion of two fixes, the
chi-square gate in sigmas, time order, track loss and vagueness, start-up confirmation and
restart. height_m = 0 where a case must not depend on the attitude-error estimate."""
from __future__ import annotations

import math

import numpy as np
import pytest

from mean_nav.nav.filter import FilterConfig, PositionFilter

# radius of the 68.27 % circle of a circular 2-D Gaussian: P(r < k sigma) = 1 - exp(-k^2 / 2)
K68 = math.sqrt(-2.0 * math.log(1.0 - 0.6827))
NO_TILT = 0.0          # height above ground 0: the attitude error does not move the nadir
# no correlation between fixes: each one counts as independent, however close in time
INDEPENDENT = dict(measurement_correlation_s=0.0)


def stationary_track(cfg: FilterConfig | None = None, n: int = 20, sigma_m: float = 0.1) -> PositionFilter:
    """A filter tracking a vehicle hovering at (0, 0), last fix at t = n - 1."""
    f = PositionFilter(cfg)
    for k in range(n):
        out = f.update(float(k), [0.0, 0.0], np.eye(2) * sigma_m ** 2, NO_TILT)
    assert out.accepted and out.tracking
    return f


def test_two_fixes_a_millisecond_apart_fuse_to_their_inverse_variance_mean():
    f = PositionFilter(FilterConfig(**INDEPENDENT))
    f.update(5.0, [0.0, 10.0], np.eye(2) * 1.0, NO_TILT)
    out = f.update(5.001, [2.0, 12.0], np.eye(2) * 4.0, NO_TILT)   # 1 ms: no motion to speak of
    assert out.accepted and out.tracking
    # weights 1/1 and 1/4: mean = (0 * 1 + 2 * 0.25) / 1.25 = 0.4 ; variance 1 / 1.25 = 0.8
    assert (out.x, out.y) == (pytest.approx(0.4, abs=1e-3), pytest.approx(10.4, abs=1e-3))
    assert out.sigma_h_m == pytest.approx(K68 * math.sqrt(0.8), rel=1e-3)
    # nothing was learnt about the velocity in 1 ms: it keeps its 8 m/s per-axis prior
    assert out.sigma_speed_ms == pytest.approx(math.hypot(8.0, 8.0), rel=0.01)


def test_the_attitude_error_shared_by_both_fixes_is_not_averaged_away():
    f0 = PositionFilter(FilterConfig(**INDEPENDENT))
    f100 = PositionFilter(FilterConfig(**INDEPENDENT))
    for f, h in ((f0, 0.0), (f100, 100.0)):
        f.update(5.0, [0.0, 0.0], np.eye(2), h)
        out = f.update(5.001, [0.0, 0.0], np.eye(2), h)
        assert out.accepted
    without, with_tilt = f0.sigma_h_at(5.001), f100.sigma_h_at(5.001)
    assert without == pytest.approx(K68 * math.sqrt(0.5), rel=1e-3)
    # from 100 m even the smallest attitude hypothesis (0.3 deg) moves both nadirs alike
    # by 0.52 m: averaging two fixes cannot remove it
    assert with_tilt >= K68 * math.sqrt(0.5 + (100.0 * math.radians(0.3)) ** 2)


def test_68_percent_radius_holds_68_percent_of_a_2d_gaussian():
    f = PositionFilter(FilterConfig(**INDEPENDENT))
    f.update(0.0, [0.0, 0.0], np.eye(2) * 9.0, NO_TILT)
    out = f.update(0.001, [0.0, 0.0], np.eye(2) * 9.0, NO_TILT)      # per-axis variance 4.5
    rng = np.random.default_rng(0)
    errors = np.hypot(*rng.normal(0.0, math.sqrt(4.5), (2, 200_000)))
    assert np.mean(errors < out.sigma_h_m) == pytest.approx(0.6827, abs=0.005)


def test_velocity_has_the_sign_and_size_of_the_motion():
    f = PositionFilter()
    for k in range(30):
        t = 0.5 * k
        out = f.update(t, [100.0 + 10.0 * t, 50.0 - 5.0 * t], np.eye(2) * 0.01, NO_TILT)
    assert out.vx == pytest.approx(10.0, abs=0.1) and out.vy == pytest.approx(-5.0, abs=0.1)
    ahead = f.predict(t + 2.0)
    assert (ahead.x, ahead.y) == (pytest.approx(100.0 + 10.0 * (t + 2.0), abs=0.3),
                                  pytest.approx(50.0 - 5.0 * (t + 2.0), abs=0.3))


def test_an_empty_filter_reports_no_track():
    f = PositionFilter()
    out = f.predict(3.0)
    assert not out.tracking and not out.accepted
    assert f.position_at(3.0) is None and f.sigma_h_at(3.0) == math.inf


@pytest.mark.parametrize("sigmas, accepted", [(2.0, True), (3.0, True), (5.0, False), (8.0, False)])
def test_the_gate_is_on_the_squared_mahalanobis_distance(sigmas, accepted):
    # the track is known to ~0.1 m; a fix with a 20 m sigma is offered `sigmas` sigma away, so
    # its Mahalanobis distance is ~`sigmas` and the chi2(2) 99.9 % gate (13.8 = 3.7^2) decides
    f = stationary_track()
    sigma = 20.0
    out = f.update(20.0, [sigmas * sigma, 0.0], np.eye(2) * sigma ** 2, NO_TILT)
    assert out.mahalanobis2 == pytest.approx(sigmas ** 2, rel=0.02)
    assert out.accepted is accepted
    assert out.tracking


def test_a_frame_older_than_the_filter_state_is_refused():
    f = stationary_track()                                 # last fix at t = 19
    before = f.sigma_h_at(19.0)
    old = f.update(18.0, [0.5, 0.5], np.eye(2) * 0.01, NO_TILT)     # agrees, but is from the past
    assert not old.accepted and old.tracking
    assert f.sigma_h_at(19.0) == pytest.approx(before)    # nothing fused
    assert f.update(19.5, [0.0, 0.0], np.eye(2) * 0.01, NO_TILT).accepted


def test_a_prediction_changes_nothing_and_never_goes_before_the_last_fix():
    f = stationary_track()                                 # last fix at t = 19
    at_fix = f.sigma_h_at(19.0)
    later = f.predict(21.0)
    back = f.predict(20.0)
    assert back.tracking and not back.accepted
    # coasting frames are queries: the 20 s prediction is as if 21 s had never been asked
    assert back.sigma_h_m == pytest.approx(f.sigma_h_at(20.0)) and back.sigma_h_m < later.sigma_h_m
    before_fix = f.predict(18.0)                           # older than the track: its state at 19 s
    assert before_fix.sigma_h_m == pytest.approx(at_fix)


def test_coasting_frames_do_not_change_where_the_next_fix_is_expected():
    """Time, not frames: photos missed between two fixes leave the prediction at the next one
    as one step from the last fix would (each committed coasting step mixed the wide manoeuvre
    mode into the cruise mode again: after one missed photo 8 s apart the cruise mode's 68 %
    radius went from ~11 m to ~100 m and the next photo's weak fit no longer counted)."""
    moving = []
    for coast in (False, True):
        f = PositionFilter(FilterConfig(**INDEPENDENT))
        for k in range(6):
            f.update(8.0 * k, [3.0 * 8.0 * k, 0.0], np.eye(2) * 0.04, NO_TILT)
        if coast:
            for t in np.arange(40.5, 56.0, 0.5):           # a missed photo, then 30 frames without a fix
                f.predict(float(t))
        moving.append((f.mode_radii_at(56.0), f.position_at(56.0)))
    (radii_one, (x_one, P_one)), (radii_many, (x_many, P_many)) = moving
    assert radii_many == pytest.approx(radii_one)
    assert x_many == pytest.approx(x_one) and P_many == pytest.approx(P_one)
    assert min(radii_one) < 30.0       # the cruise mode still knows the place within metres


def test_coasting_beyond_max_sigma_is_flagged_vague():
    f = stationary_track(FilterConfig(max_sigma_m=20.0, lost_after_s=1e6))
    seen_vague = False
    for k in range(1, 120):
        out = f.predict(19.0 + k)
        assert out.tracking and not out.accepted
        assert out.vague is (out.sigma_h_m > 20.0)
        seen_vague |= out.vague
    assert seen_vague, "two minutes of coasting never grew past 20 m"
    assert not stationary_track(FilterConfig(max_sigma_m=20.0)).predict(20.0).vague


def test_coasting_without_a_fix_for_lost_after_s_drops_the_track():
    f = stationary_track(FilterConfig(lost_after_s=3.0))
    assert f.predict(21.5).tracking                          # 2.5 s after the last fix
    lost = f.predict(22.5)                                   # 3.5 s
    assert not lost.tracking and not lost.accepted and not f.tracking


def test_a_lost_track_never_restarts_from_a_single_fix():
    f = stationary_track(FilterConfig(lost_after_s=3.0))
    assert not f.predict(23.0).tracking
    assert not f.update(23.5, [0.0, 0.0], np.eye(2) * 0.01, NO_TILT).tracking   # one fix: a candidate
    assert f.update(24.0, [0.0, 0.0], np.eye(2) * 0.01, NO_TILT).tracking       # a second one confirms


@pytest.mark.parametrize("gap_s, confirms", [(4.0, True), (50.0, True), (70.0, False), (-1.0, False), (0.0, False)])
def test_start_up_fixes_confirm_each_other_within_lost_after_s_and_in_time_order(gap_s, confirms):
    f = PositionFilter(FilterConfig(lost_after_s=60.0))
    f.update(100.0, [0.0, 0.0], np.eye(2), NO_TILT)
    out = f.update(100.0 + gap_s, [0.5, 0.0], np.eye(2), NO_TILT)
    assert out.tracking is confirms and out.accepted is confirms


@pytest.mark.parametrize("distance_m, agrees", [(20.0, True), (35.0, False)])
def test_start_up_fixes_must_agree_within_3_sigma_plus_max_speed(distance_m, agrees):
    # R = I for both: 3 * sqrt(2 + 2) = 6 m, plus 25 m/s over 1 s: 31 m allowed
    f = PositionFilter(FilterConfig(max_speed_ms=25.0))
    f.update(0.0, [0.0, 0.0], np.eye(2), NO_TILT)
    assert f.update(1.0, [distance_m, 0.0], np.eye(2), NO_TILT).tracking is agrees


def test_a_single_outlier_can_never_start_a_track():
    f = PositionFilter()
    for k, z in enumerate([[0.0, 0.0], [900.0, 0.0], [0.0, 900.0], [-900.0, 0.0]]):
        assert not f.update(float(k), z, np.eye(2), NO_TILT).tracking


def test_an_accepted_fix_resets_the_disagreement():
    # the track is dropped after gated-out fixes spanning reject_after_s (2 s): two outliers
    # 1.5 s apart, a good fix, two more outliers 1.5 s apart never add up to 2 s
    f = stationary_track(FilterConfig(reject_after_s=2.0))
    outlier, good = [500.0, 0.0], [0.0, 0.0]
    for t, z in ((20.0, outlier), (21.5, outlier), (22.0, good), (22.5, outlier), (24.0, outlier)):
        out = f.update(t, z, np.eye(2) * 0.01, NO_TILT)
        assert out.tracking, f"track dropped at t={t} although no disagreement lasted 2 s"
        assert out.accepted is (z is good)
    out = f.update(24.5, outlier, np.eye(2) * 0.01, NO_TILT)   # 22.5 .. 24.5: 2 s of disagreement
    # the fixes that broke the track agree with each other: the one that drops it restarts there
    assert out.tracking and out.accepted and "dropped" in out.reason
    assert out.x == pytest.approx(500.0, abs=0.5)
    again = f.update(25.0, outlier, np.eye(2) * 0.01, NO_TILT)
    assert again.tracking and again.accepted and again.x == pytest.approx(500.0, abs=0.5)


# --- the motion model against a textbook Kalman filter; time order; start-up edges ------------

def textbook_position_variance(fixes, t_end, q, r, v0):
    """A 1-D constant-velocity Kalman filter written from the textbook (continuous white
    acceleration of spectral density q): position variance at t_end. fixes: [(t, R)]."""
    t0, r0 = fixes[0]
    P = np.diag([r0, v0 ** 2])
    t = t0
    for t_next, r_fix in list(fixes[1:]) + [(t_end, None)]:
        dt = t_next - t
        F = np.array([[1.0, dt], [0.0, 1.0]])
        Q = q * np.array([[dt ** 3 / 3, dt ** 2 / 2], [dt ** 2 / 2, dt]])
        P = F @ P @ F.T + Q
        if r_fix is not None:
            H = np.array([[1.0, 0.0]])
            K = P @ H.T / (H @ P @ H.T + r_fix)
            P = (np.eye(2) - K @ H) @ P
        t = t_next
    return float(P[0, 0])


@pytest.mark.parametrize("correlation_s", [0.0, 0.3])
def test_position_variance_follows_the_textbook_constant_velocity_filter(correlation_s):
    # both motion modes alike and no tilt: the bank is one constant-velocity filter per axis
    cfg = FilterConfig(accel_sigma_ms2=1.5, cruise_accel_sigma_ms2=1.5, measurement_correlation_s=correlation_s)
    f = PositionFilter(cfg)
    times = [0.0, 1.0, 1.1, 4.0]
    for t in times:
        assert f.update(t, [0.0, 0.0], np.eye(2) * 2.0, NO_TILT).accepted or t == 0.0
    # a fix 0.1 s after the last shares its error: its R counts correlation / spacing = 3 times
    inflate = [1.0, 1.0, max(1.0, correlation_s / 0.1), 1.0]
    expected = textbook_position_variance([(t, 2.0 * k) for t, k in zip(times, inflate)], 14.0,
                                          q=1.5 ** 2, r=2.0, v0=cfg.init_velocity_sigma_ms)
    _, cov = f.position_at(14.0)
    assert cov[0, 0] == pytest.approx(expected, rel=1e-6) and cov[1, 1] == pytest.approx(expected, rel=1e-6)


def test_a_fix_at_the_time_the_filter_was_predicted_to_is_used():
    f = stationary_track(FilterConfig(**INDEPENDENT))
    f.predict(25.0)
    assert f.update(25.0, [0.1, 0.0], np.eye(2) * 0.01, NO_TILT).accepted


def test_after_a_gated_out_fix_an_older_frame_is_still_out_of_order():
    f = stationary_track(FilterConfig(**INDEPENDENT))        # last fix at t = 19
    assert not f.update(21.0, [500.0, 0.0], np.eye(2) * 0.01, NO_TILT).accepted
    out = f.update(20.0, [0.0, 0.0], np.eye(2) * 0.01, NO_TILT)
    assert not out.accepted and "out-of-order" in out.reason


def test_one_gated_out_fix_never_drops_the_track_even_without_a_reject_time():
    f = stationary_track(FilterConfig(reject_after_s=0.0, **INDEPENDENT))
    out = f.update(20.0, [500.0, 0.0], np.eye(2) * 0.01, NO_TILT)
    assert not out.accepted and out.tracking                        # "at least two"
    out = f.update(21.0, [500.0, 0.0], np.eye(2) * 0.01, NO_TILT)
    assert "track dropped" in out.reason


def test_covariance_may_be_given_as_nested_lists():
    f = PositionFilter(FilterConfig(**INDEPENDENT))
    f.update(0.0, [0.0, 0.0], [[1.0, 0.0], [0.0, 1.0]], NO_TILT)
    assert f.update(1.0, [0.5, 0.0], [[1.0, 0.0], [0.0, 1.0]], NO_TILT).accepted


def test_the_gate_asked_beforehand_is_the_gate_the_update_applies():
    f = stationary_track(FilterConfig(**INDEPENDENT))
    z, R = [0.8, -0.3], np.eye(2) * 0.04
    asked = f.mahalanobis2(20.0, z, R, 80.0)                       # from 80 m: the tilt counts
    assert asked == pytest.approx(f.update(20.0, z, R, 80.0).mahalanobis2, rel=1e-9)
    assert asked < f.mahalanobis2(20.0, z, R, 0.0) or math.isinf(f.mahalanobis2(20.0, z, R, 0.0))


def test_two_fixes_of_the_same_instant_never_confirm_each_other():
    f = PositionFilter(FilterConfig(**INDEPENDENT))
    f.update(3.0, [0.0, 0.0], np.eye(2), NO_TILT)
    assert not f.update(3.0, [0.0, 0.0], np.eye(2), NO_TILT).tracking


def test_a_fix_exactly_measurement_correlation_s_later_confirms():
    f = PositionFilter(FilterConfig(measurement_correlation_s=0.5))
    f.update(1.0, [0.0, 0.0], np.eye(2), NO_TILT)
    assert f.update(1.5, [0.0, 0.0], np.eye(2), NO_TILT).tracking       # "at least" 0.5 s


def test_a_repeated_start_up_fix_waits_for_a_later_one_and_is_not_pushed_out():
    """Right, 4 wrong ones (1 km apart) and right again within the correlation time: the repeat
    confirms nothing, but keeps the first right fix among the 4 remembered until a later one confirms."""
    f = PositionFilter(FilterConfig(measurement_correlation_s=0.3))
    R = np.eye(2)
    assert not f.update(0.0, [0.0, 0.0], R, NO_TILT).tracking
    for k, t in enumerate([0.04, 0.08]):
        f.update(t, [1000.0 * (k + 1), 0.0], R, NO_TILT)
    out = f.update(0.12, [0.5, 0.0], R, NO_TILT)                     # the same place 0.12 s later
    assert not out.accepted and not out.tracking and "shares its error" in out.reason
    for k, t in enumerate([0.16, 0.2, 0.24]):
        f.update(t, [0.0, 1000.0 * (k + 1)], R, NO_TILT)
    assert len(f.candidates) == 4 and (0.0, 0.0, 0.0) in f.candidates
    assert f.update(0.35, [0.5, 0.0], R, NO_TILT).tracking


def test_start_up_memory_is_the_newest_4_fixes():
    f = PositionFilter(FilterConfig(**INDEPENDENT))
    for k in range(6):
        f.update(float(k), [1000.0 * k, 0.0], np.eye(2), NO_TILT)    # all disagree
    assert [c[0] for c in f.candidates] == [2.0, 3.0, 4.0, 5.0]
    assert not f.update(6.0, [0.0, 0.0], np.eye(2), NO_TILT).tracking   # the first is forgotten


def test_a_pair_the_motion_model_refuses_leaves_no_track():
    # 200 m in 10 s passes the 25 m/s start-up check but not the gate of a 1 m/s velocity prior
    # and a gently accelerating vehicle
    f = PositionFilter(FilterConfig(init_velocity_sigma_ms=1.0, accel_sigma_ms2=0.1, cruise_accel_sigma_ms2=0.1,
                                    **INDEPENDENT))
    f.update(0.0, [0.0, 0.0], np.eye(2), NO_TILT)
    out = f.update(10.0, [200.0, 0.0], np.eye(2), NO_TILT)
    assert not out.tracking and not f.tracking and f.position_at(10.0) is None


def test_an_accepted_poor_fix_is_a_position_not_vague():
    f = PositionFilter(FilterConfig(**INDEPENDENT))
    f.update(0.0, [0.0, 0.0], np.eye(2) * 150.0 ** 2, NO_TILT)
    out = f.update(1.0, [0.0, 0.0], np.eye(2) * 150.0 ** 2, NO_TILT)
    assert out.accepted and out.sigma_h_m > 60.0 and not out.vague


def test_start_up_outputs_are_not_flagged_vague():
    f = PositionFilter()
    assert not f.predict(0.0).vague
    assert not f.update(0.0, [0.0, 0.0], np.eye(2), NO_TILT).vague


def test_frames_half_a_second_apart_are_fine_unless_lost_after_s_is_tiny():
    assert PositionFilter().spacing_problems(0.5) == []
    assert PositionFilter(FilterConfig(lost_after_s=0.8)).spacing_problems(0.5)


# --- the measured tilt (pose fit) and the start-up check ------------------------------------

def steady_tilt_estimate(tilt_deg: float, seconds: int = 240) -> float:
    """attitude_sigma_deg after a hover at 100 m whose every frame measures the same tilt."""
    f = PositionFilter()
    tilt = math.radians(tilt_deg)
    R = np.diag([0.25, 0.25, math.radians(0.2) ** 2, math.radians(0.2) ** 2])
    for k in range(seconds):
        assert f.update(float(k), [100.0 * tilt, 0.0, tilt, 0.0], R, 100.0).accepted or k == 0
    return f.attitude_sigma_deg


def test_a_large_steady_measured_tilt_keeps_the_attitude_error_estimate_large():
    # innovations of a steady tilt say nothing about its size: only the level of the measured
    # tilts does, and it must keep counting after the first fix, for 4 memory times here.
    # 8 x the tilt, measured to 0.2 deg: the estimate must grow by well over 2 x
    assert steady_tilt_estimate(4.0) > 2.2 * steady_tilt_estimate(0.5)


def test_no_tilt_error_without_a_track():
    assert PositionFilter().tilt_error is None


@pytest.mark.parametrize("n", [1, 3, 6])
def test_a_measurement_of_other_than_2_or_4_values_is_refused(n):
    with pytest.raises(ValueError, match="2 .* or 4"):
        PositionFilter().update(0.0, np.zeros(n), np.eye(n), NO_TILT)


def test_the_drop_reason_says_how_many_fixes_over_how_long():
    f = stationary_track(FilterConfig(reject_after_s=1.0, **INDEPENDENT))   # last fix at t = 19
    f.update(20.0, [500.0, 0.0], np.eye(2) * 0.01, NO_TILT)
    out = f.update(21.5, [500.0, 3.0], np.eye(2) * 0.01, NO_TILT)
    assert "2 fixes over 1.5 s" in out.reason


def test_the_asked_gate_from_the_ground_is_the_applied_one():
    z, R = [0.8, -0.3], np.eye(2) * 0.04
    asked = stationary_track(FilterConfig(**INDEPENDENT)).mahalanobis2(20.0, z, R, 0.0)
    applied = stationary_track(FilterConfig(**INDEPENDENT)).update(20.0, z, R, 0.0).mahalanobis2
    assert asked == pytest.approx(applied, rel=1e-9)


@pytest.mark.parametrize("distance_m, agrees", [(20.0, True), (30.0, False)])
def test_start_up_agreement_is_3_sigma_of_the_combined_noise_plus_max_speed(distance_m, agrees):
    # R = 4 m^2 per axis for both: sqrt(trace + trace) = sqrt(16) = 4 m, so 25 m/s x 0.5 s
    # + 3 x 4 m = 24.5 m; a loose velocity prior leaves the decision to this check
    f = PositionFilter(FilterConfig(init_velocity_sigma_ms=50.0, **INDEPENDENT))
    f.update(0.0, [0.0, 0.0], np.eye(2) * 4.0, NO_TILT)
    assert f.update(0.5, [distance_m, 0.0], np.eye(2) * 4.0, NO_TILT).tracking is agrees


def test_a_mixture_covariance_includes_the_spread_between_its_members():
    from mean_nav.nav.filter import _moments
    # two equally weighted point estimates 2 m apart: mean between them, variance 1 m^2
    X = np.zeros((2, 6))
    X[:, 0] = [-1.0, 1.0]
    P = np.stack([np.eye(6) * 0.25, np.eye(6) * 0.25])
    mean, cov = _moments(np.array([1.0, 1.0]), X, P)
    assert mean[0] == pytest.approx(0.0) and cov[0, 0] == pytest.approx(1.25) and cov[1, 1] == pytest.approx(0.25)
