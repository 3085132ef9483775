"""30 Hz video against photo rates (issue 11 part 1): fixes closer than the filter's
measurement_correlation_s share their error, so a faster camera must not make the filter
more sure of itself than one independent fix per that time allows."""
from __future__ import annotations

import math

import numpy as np
import pytest

from mean_nav.nav.filter import FilterConfig, PositionFilter
from nav_testing import ThumbnailEmbedder, simulate

CORRELATION_S = FilterConfig().measurement_correlation_s


def shared_error_run(fps: float, seconds: float, seed: int, height: float = 60.0, white: float = 0.6):
    """A straight flight with a 1 deg, 10 s Gauss-Markov tilt error (on a 300 Hz clock, so every
    rate samples the same realisation) and a matching error that is one value per
    measurement_correlation_s block: the fixes inside a block share it. Returns the filter and
    the last accepted output."""
    rng = np.random.default_rng(seed)
    fine, tau, sigma = 300, 10.0, math.radians(1.0)
    a = math.exp(-1.0 / (fine * tau))
    tilt = np.empty((int(seconds * fine), 2))
    state = rng.normal(0, sigma, 2)
    for i in range(len(tilt)):
        state = a * state + math.sqrt(1 - a * a) * rng.normal(0, sigma, 2)
        tilt[i] = state
    blocks = rng.normal(0, white, (int(seconds / CORRELATION_S) + 2, 2))
    f, last = PositionFilter(), None
    for i in range(0, len(tilt), int(round(fine / fps))):
        t = i / fine
        truth = np.array([8.0 * t, 0.0])
        z = truth + height * np.tan(tilt[i]) + blocks[int(t / CORRELATION_S + 1e-9)]
        out = f.update(t, z, np.eye(2) * white ** 2, height)
        if out.accepted:
            last = out
    return f, last


@pytest.mark.parametrize("seed", [0, 1])
def test_fixes_that_share_their_error_teach_the_filter_no_more_at_30_hz(seed):
    """The same shared errors seen once per correlation time (3.3 Hz) or nine times (30 Hz) hold
    the same information, so the attitude-error estimate and the radius agree. (Counting every
    30 Hz fix's likelihood whole moved the estimate 20 % lower and the radius with it.)"""
    slow_filter, slow = shared_error_run(1.0 / CORRELATION_S, 60.0, seed)
    fast_filter, fast = shared_error_run(30.0, 60.0, seed)
    assert abs(math.log(fast_filter.attitude_sigma_deg / slow_filter.attitude_sigma_deg)) < math.log(1.15), \
        (fast_filter.attitude_sigma_deg, slow_filter.attitude_sigma_deg)
    assert fast.sigma_h_m > 0.9 * slow.sigma_h_m, (fast.sigma_h_m, slow.sigma_h_m)


def test_a_wrong_match_repeated_by_the_next_video_frames_never_becomes_the_track():
    """Six frames (0.2 s at 30 Hz) match the same wrong place 500 m away, then the right place
    is seen: consecutive frames share their error, so the wrong pair confirms nothing and the
    track starts at the right place, from two fixes at least measurement_correlation_s apart."""
    f, R, dt = PositionFilter(), np.eye(2), 1.0 / 30
    outs = [f.update(k * dt, [500.0 + 0.2 * k, 0.0], R, 60.0) for k in range(6)]
    assert not any(o.tracking for o in outs)
    assert "shares its error" in outs[1].reason
    outs = [f.update(k * dt, [0.25 * (k - 6), 0.0], R, 60.0) for k in range(6, 20)]
    first = next(k for k, o in enumerate(outs) if o.tracking)
    assert first * dt >= CORRELATION_S - 1e-9                # (frame 6 is the first right one)
    assert all(o.accepted and abs(o.x - 0.25 * k) < 5.0 for k, o in enumerate(outs) if o.tracking)
    # told the fixes are independent, the second frame confirms at once (as at photo rates)
    g = PositionFilter(FilterConfig(measurement_correlation_s=0.0))
    assert not g.update(0.0, [0.0, 0.0], R, 60.0).tracking and g.update(dt, [0.25, 0.0], R, 60.0).tracking


def test_a_right_match_every_other_frame_confirms_among_scattered_wrong_ones():
    """30 Hz, the right place on even frames and a different wrong place on every odd one:
    more wrong fixes arrive within the correlation time than start-up candidates are kept,
    yet the right one confirms once a right fix comes 0.3 s after it, and nothing wrong does."""
    f, R, dt = PositionFilter(), np.eye(2), 1.0 / 30
    rng = np.random.default_rng(3)
    tracked = []
    for k in range(30):
        right = np.array([0.25 * k, 0.0])
        z = right if k % 2 == 0 else right + rng.uniform(300.0, 900.0) * np.array([1.0, 0.0]) * (-1) ** (k // 2)
        out = f.update(k * dt, z, R, 60.0)
        if out.tracking:
            tracked.append((k, out))
    assert tracked and tracked[0][0] * dt < CORRELATION_S + 3 * dt
    assert all(abs(o.x - 0.25 * k) < 5.0 for k, o in tracked)


def test_a_turned_fit_repeated_by_the_next_video_frames_does_not_confirm_a_heading_error():
    """A strong fit turned 180 deg is believed once a second frame agrees; at 30 Hz the frames
    inside measurement_correlation_s repeat the first one's error and do not count."""
    from mean_nav.nav.localizer import LocalizerConfig
    from mean_nav.nav.verify import HeadingTracker

    heading, dt = HeadingTracker(LocalizerConfig()), 1.0 / 30
    assert not heading.propose(180.0, 0.0, 0.0, 0.0)
    assert not any(heading.propose(179.0, k * dt, 0.25 * k, 0.0) for k in range(1, 9))
    assert heading.offset_deg == 0.0
    assert heading.propose(179.0, 10 * dt, 2.5, 0.0)                   # 0.33 s after the first
    assert abs(heading.offset_deg - 179.0) < 1e-9


def test_the_search_widens_with_time_not_with_the_frame_rate():
    """Without a track, every frame that verifies nothing doubles the search radius; video
    frames closer than measurement_correlation_s see the same ground and fail together, so one
    second of 30 Hz failures widens it 4 times (at 0, 0.3, 0.6, 0.9 s), not 30."""
    from types import SimpleNamespace

    from mean_nav.nav.acquisition import Acquisition
    from mean_nav.nav.localizer import LocalizerConfig

    cache = SimpleNamespace(x=[0.0, 1000.0], y=[0.0, 1000.0], tile_size_m=60.0, lonlat_to_xy=lambda lon, lat: (0, 0))
    cfg, f = LocalizerConfig(), PositionFilter()
    searches = {}
    for fps, seconds in ((30.0, 1.0), (1.0, 4.0)):          # at photo rates every frame counts
        acquisition = Acquisition(cfg, None, cache, initial_lonlat=(0.0, 0.0))
        acquisition.anchor_t = 0.0
        for k in range(int(fps * seconds)):
            acquisition.record(k / fps, None, f)
        searches[fps] = acquisition
    assert searches[30.0].widenings == 4 and searches[1.0].widenings == 4
    flown = f.cfg.max_speed_ms * 1.0
    assert searches[30.0].search_radius_m(1.0, f) == pytest.approx((cfg.initial_radius_m + flown) * 2.0 ** 4)


# --- the whole localizer on one simulated video, at 30 Hz and at every 30th frame -----------

@pytest.fixture(scope="module")
def video(tmp_path_factory, nav_map):
    from mean_nav.geo.cache import TileCache, build_cache
    from mean_nav.replay.flight import Flight

    # a 0.5 m/px cache: matching at a quarter of the pixels keeps 360 frames fast
    folder = build_cache([nav_map], tmp_path_factory.mktemp("cache") / "nav_map", ThumbnailEmbedder(), gsd_m=0.5,
                         tile_size_m=60.0, stride_m=20.0, progress=False)
    flight = Flight(simulate(tmp_path_factory.mktemp("video") / "f", map_path=nav_map, duration_s=12.0, seed=7,
                             width=320, height=240, fps=30.0, attitude_error_deg=1.0, attitude_error_tau_s=10.0))
    cache = TileCache.load(folder)
    return cache, list(flight.frames()), flight.camera


def localize(cache, camera, frames):
    from mean_nav.nav.localizer import Localizer, LocalizerConfig

    loc = Localizer(ThumbnailEmbedder(), cache, camera, LocalizerConfig())
    out = {}
    for f in frames:
        est = loc.process(f.image, f.telemetry, f.time_s)
        tx, ty = cache.lonlat_to_xy(f.telemetry.lon, f.telemetry.lat)
        ex, ey = cache.lonlat_to_xy(est.lon, est.lat) if est.has_fix else (math.nan, math.nan)
        out[f.frame_id] = (est, np.array([ex, ey]), math.hypot(ex - tx, ey - ty))
    return out


def test_one_video_at_30_hz_and_at_1_hz_gives_one_track_and_no_overconfident_radius(video):
    cache, frames, camera = video
    assert len(frames) >= 350
    fast = localize(cache, camera, frames)
    slow = localize(cache, camera, frames[::30])
    settled = lambda e: e.time_s - frames[0].time_s >= 3.0    # (the start corner matches poorly)
    for run in (fast, slow):
        fixed = [e.has_fix for e, _, _ in run.values() if settled(e)]
        assert np.mean(fixed) >= 0.8, (sum(fixed), len(fixed))
    # no false fix at 30 Hz: every error inside 3 reported radii
    errors = np.array([(err, e.sigma_h_m) for e, _, err in fast.values() if e.has_fix])
    assert np.all(errors[:, 0] < 3 * errors[:, 1]), errors[errors[:, 0] >= 3 * errors[:, 1]]
    # up to 1/correlation independent fixes per second against 1: the radius may shrink by the
    # square root of that ratio, no more
    allowed = math.sqrt(1.0 / CORRELATION_S)
    compared = 0
    for frame_id, (e1, p1, _) in slow.items():
        e30, p30, _ = fast[frame_id]
        if not (e1.has_fix and e30.has_fix and settled(e1)):
            continue
        compared += 1
        # two estimates of one position, each within its radius most of the time
        assert np.linalg.norm(p30 - p1) < e1.sigma_h_m + e30.sigma_h_m, (frame_id, p30 - p1)
        assert e30.sigma_h_m >= e1.sigma_h_m / allowed, (frame_id, e30.sigma_h_m, e1.sigma_h_m)
    assert compared >= 6
