"""The filter with measured tilt (nav/pose.py gives the nadir and the telemetry's tilt error):
the tilt state converges, the camera centre is no longer off by height x tilt."""
import math

import numpy as np

from mean_nav.nav.filter import PositionFilter

H = 150.0


def fly(f, rng, tilt_deg=(2.0, -1.0), seconds=90, tilt_sigma_deg=0.5, with_tilt=True):
    """Straight 10 m/s east at 1 Hz; the telemetry's tilt error is constant. Returns the last
    output and the true position."""
    b = np.tan(np.radians(tilt_deg))
    nadir_sigma, s = 0.05, math.radians(tilt_sigma_deg)
    out = None
    for k in range(seconds):
        p = np.array([1000.0 + 10.0 * k, 2000.0])
        nadir = p + H * b + rng.normal(0, nadir_sigma, 2)
        if with_tilt:
            z = np.r_[nadir, b + rng.normal(0, s, 2)]
            R = np.diag([nadir_sigma ** 2] * 2 + [s ** 2] * 2)
        else:
            z, R = nadir, nadir_sigma ** 2 * np.eye(2)
        out = f.update(float(k), z, R, H)
    return out, p


def test_the_tilt_state_converges_with_tilt_measurements():
    rng = np.random.default_rng(0)
    f = PositionFilter()
    out, p = fly(f, rng)
    assert out.accepted
    tilt, cov = f.tilt_error
    # 90 measurements of 0.5 deg: even averaging over ~10 of them (the fastest correlation time
    # hypothesis) gives 0.16 deg; 0.3 deg is 2 sigma of that
    err_deg = np.degrees(np.abs(np.arctan(tilt) - np.radians([2.0, -1.0])))
    assert np.all(err_deg < 0.3), err_deg
    # so the camera centre is within 150 m x tan(0.3 deg) = 0.8 m (plus the nadir's 5 cm)
    assert math.hypot(out.x - p[0], out.y - p[1]) < 0.85


def test_without_tilt_measurements_the_tilt_stays_in_the_position():
    rng = np.random.default_rng(0)
    f = PositionFilter()
    out, p = fly(f, rng, with_tilt=False)
    # the nadir alone cannot tell a slow tilt from position: off by about 150 m x tan(2.2 deg)
    assert math.hypot(out.x - p[0], out.y - p[1]) > 3.0


def test_an_uninformative_tilt_is_the_nadir_alone():
    """A tilt measured with a huge variance changes nothing: the first-fix initialisation and
    the updates reduce to the nadir-only ones."""
    outs = []
    for with_tilt in (False, True):
        rng = np.random.default_rng(3)
        f = PositionFilter()
        row = []
        for k in range(20):
            nadir = np.array([500.0 + 5.0 * k, 700.0 - 2.0 * k]) + rng.normal(0, 0.3, 2)
            if with_tilt:
                z = np.r_[nadir, 0.3, -0.2]
                R = np.diag([0.09, 0.09, 1e6, 1e6])
            else:
                z, R = nadir, 0.09 * np.eye(2)
            o = f.update(float(k), z, R, 80.0)
            row.append((o.accepted, o.x, o.y, o.sigma_h_m))
        outs.append(row)
    for a, b in zip(*outs):
        assert a[0] == b[0]
        if a[0]:
            assert np.allclose(a[1:], b[1:], rtol=0, atol=1e-4)


def test_the_first_fix_with_a_tilt_starts_the_track_at_the_camera_centre():
    """Two start-up fixes with a measured 2 deg tilt: the track starts at nadir - height x tilt,
    not at the nadir."""
    b = math.tan(math.radians(2.0))
    f = PositionFilter()
    s = math.radians(0.2)
    R = np.diag([0.01, 0.01, s ** 2, s ** 2])
    f.update(0.0, [1000.0 + H * b, 2000.0, b, 0.0], R, H)
    out = f.update(1.0, [1000.0 + H * b, 2000.0, b, 0.0], R, H)
    assert out.accepted
    # the 0.2 deg tilt measurements against a prior of at most a few degrees: the centre within
    # 150 m x tan(0.2 deg) = 0.5 m of the truth, while the nadir is 5.2 m away
    assert math.hypot(out.x - 1000.0, out.y - 2000.0) < 0.6


def test_a_tilt_that_disagrees_with_the_track_is_dropped_and_the_nadir_kept():
    rng = np.random.default_rng(1)
    f = PositionFilter()
    out, p = fly(f, rng, seconds=60)
    before, _ = f.tilt_error
    b = np.tan(np.radians([2.0, -1.0]))
    p = np.array([1000.0 + 10.0 * 60, 2000.0])
    s = math.radians(0.5)
    wild = b + np.radians([8.0, 0.0])                             # 16 sigma off
    out = f.update(60.0, np.r_[p + H * b, wild], np.diag([0.0025, 0.0025, s ** 2, s ** 2]), H)
    assert out.accepted
    after, _ = f.tilt_error
    assert np.degrees(np.abs(after - before)).max() < 0.2
    assert math.hypot(out.x - p[0], out.y - p[1]) < 1.0


def test_one_frame_whose_attitude_is_off_is_used_through_its_camera_centre():
    """The telemetry attitude of one frame off by 1.5 deg (a step it interpolated across):
    nadir and tilt move together by height x 1.5 deg and 1.5 deg, the camera centre not. The
    track takes the centre, neither the nadir (4 m off) nor the tilt."""
    rng = np.random.default_rng(2)
    f = PositionFilter()
    fly(f, rng, seconds=60)
    before, _ = f.tilt_error
    b = np.tan(np.radians([2.0, -1.0]))
    p = np.array([1000.0 + 10.0 * 60, 2000.0])
    glitch = b + np.tan(np.radians([1.5, 0.0]))
    s = math.radians(0.1)                                          # a well-determined pose
    out = f.update(60.0, np.r_[p + H * glitch, glitch], np.diag([0.0025, 0.0025, s ** 2, s ** 2]), H)
    assert out.accepted
    assert math.hypot(out.x - p[0], out.y - p[1]) < 0.5          # the nadir is 3.9 m away
    after, _ = f.tilt_error
    assert np.degrees(np.abs(after - before)).max() < 0.2
