"""The fixed-rate output loop: steady rate, propagation to the send time, honest accuracy,
fix age, and where the altitude comes from."""
import math
import time

import numpy as np
import pytest

from mean_nav.errors import MeanNavError
from mean_nav.nav.estimate import FixQuality
from mean_nav.nav.filter import PositionFilter
from mean_nav.nav.mavlink_io import TelemetryHistory
from mean_nav.nav.output import AltitudeSource, OutputConfig, OutputLoop, check_output_config
from mean_nav.nav.telemetry import Telemetry


class RecordingLink:
    def __init__(self):
        self.telemetry = TelemetryHistory()
        self.sent = []

    def send_estimate(self, est, capture_unix_s, processing_s=0.0, now=None):
        self.sent.append((now, capture_unix_s, est))
        return est.fix == FixQuality.FIX


def moving_track(t0=100.0, speed_e=8.0, n=6, dt=0.5):
    """A filter that has tracked a vehicle flying east at speed_e m/s, last fix at t0 + (n-1) dt."""
    flt = PositionFilter()
    R = np.eye(2) * 0.5 ** 2
    for i in range(n):
        t = t0 + i * dt
        flt.update(t, np.array([speed_e * (t - t0), 0.0]), R, 60.0)
    assert flt.tracking
    return flt, t0 + (n - 1) * dt


def identity_lonlat(x, y):
    return 10.0 + x * 1e-5, 50.0 + y * 1e-5


def make_loop(cfg=None, link=None):
    return OutputLoop(cfg or OutputConfig(), link or RecordingLink(), AltitudeSource(OutputConfig(altitude="none")),
                      3.0, epoch_minus_monotonic=1000.0)


def test_the_fix_is_propagated_to_the_send_time_and_its_accuracy_grows():
    flt, last = moving_track()
    loop = make_loop(OutputConfig(fix_max_age_s=3.0))
    loop.update(flt, last, identity_lonlat)
    at_fix, later = loop.estimate_at(last), loop.estimate_at(last + 1.5)
    assert at_fix.fix == later.fix == FixQuality.FIX
    # 1.5 s at 8 m/s east: 12 m further east, same north
    assert (later.lon - at_fix.lon) / 1e-5 == pytest.approx(12.0, abs=1.0)
    assert abs(later.lat - at_fix.lat) / 1e-5 < 1.0
    assert later.ve == pytest.approx(8.0, abs=1.0) and later.vd == 0.0
    # 1.5 s of velocity uncertainty (a few m/s after 6 fixes) adds metres, in quadrature to
    # the attitude-error part that propagation does not change
    assert math.sqrt(later.sigma_h_m ** 2 - at_fix.sigma_h_m ** 2) > 2.0, (at_fix.sigma_h_m, later.sigma_h_m)
    # the snapshot is a copy: propagating it never moves the localizer's own filter
    assert flt.t == last


def test_fix_type_3_only_while_the_last_gated_fix_is_young_enough():
    flt, last = moving_track()
    loop = make_loop(OutputConfig(fix_max_age_s=2.0))
    assert loop.estimate_at(last).fix == FixQuality.NONE      # nothing yet: no track
    loop.update(flt, last, identity_lonlat)
    assert loop.estimate_at(last + 1.9).fix == FixQuality.FIX
    stale = loop.estimate_at(last + 2.1)
    assert stale.fix == FixQuality.NONE and "old" in stale.reason and math.isnan(stale.lat)
    flt.reset()
    loop.update(flt, last, identity_lonlat)                     # the localizer dropped its track
    assert loop.estimate_at(last + 0.1).fix == FixQuality.NONE


def test_below_the_visual_floor_the_last_fix_is_held_for_low_hold_s_with_growing_accuracy():
    flt, last = moving_track(speed_e=2.0)          # still drifting east at the last fix
    loop = make_loop(OutputConfig(fix_max_age_s=1.5, low_hold_s=8.0))
    loop.update(flt, last, identity_lonlat, too_low=True)
    at_fix = loop.estimate_at(last)
    held = [loop.estimate_at(last + dt) for dt in (2.0, 4.0, 7.9)]
    assert all(e.fix == FixQuality.FIX and "held" in e.reason for e in held)
    # the position of the last fix, not its extrapolation (2 m/s x 7.9 s = 16 m further east), no motion
    assert all(abs(e.lon - at_fix.lon) / 1e-5 < 0.01 and abs(e.lat - at_fix.lat) / 1e-5 < 0.01 for e in held)
    assert all(e.ve == 0.0 and e.vn == 0.0 for e in held)
    # the accuracy covers where the filter would have put it: 68 % radius >= 0.8 x the 16 m step
    assert held[0].sigma_h_m < held[1].sigma_h_m < held[2].sigma_h_m
    assert held[2].sigma_h_m > 0.8 * 2.0 * 7.9 and held[2].sigma_speed_ms > 2.0
    # a later coasting frame (no new fix) keeps holding the same fix
    flt.predict(last + 3.0)
    loop.update(flt, last, identity_lonlat, too_low=True)
    assert abs(loop.estimate_at(last + 5.0).lon - at_fix.lon) / 1e-5 < 0.01
    over = loop.estimate_at(last + 8.1)
    assert over.fix == FixQuality.NONE and "old" in over.reason
    # above the floor (a frame that simply failed) the ordinary age limit and propagation apply
    loop.update(flt, last, identity_lonlat, too_low=False)
    assert loop.estimate_at(last + 1.4).fix == FixQuality.FIX
    assert loop.estimate_at(last + 1.6).fix == FixQuality.NONE
    off = make_loop(OutputConfig(fix_max_age_s=1.5, low_hold_s=0.0))
    off.update(flt, last, identity_lonlat, too_low=True)
    assert off.estimate_at(last + 1.6).fix == FixQuality.NONE
    # a hold ends where the filter would call its own spread no position
    flt.cfg.max_sigma_m = held[1].sigma_h_m
    loop.update(flt, last, identity_lonlat, too_low=True)
    assert loop.estimate_at(last + 2.0).fix == FixQuality.FIX
    assert "max_sigma_m" in loop.estimate_at(last + 7.9).reason


def test_descending_onto_the_visual_floor_holds_the_fix_before_a_frame_is_below_it():
    """SITL LAND at 1 m/s: the last fix came at 6.3 m, the frames between it and the 5 m floor
    correlated ambiguously, and the fix aged out 0.4 s before a frame below the floor arrived
    (GPS2 'no fix' twice). Reaching the floor within fix_max_age_s at the descent rate holds."""
    flt, last = moving_track(speed_e=0.2)
    loop = make_loop(OutputConfig(fix_max_age_s=1.5, low_hold_s=20.0))
    loop.update(flt, last, identity_lonlat, too_low=False, visual_floor_m=5.0)
    landing = loop.estimate_at(last + 1.7, telemetry(rel_alt_m=5.3, vd=1.0))
    assert landing.fix == FixQuality.FIX and "descending onto the visual floor" in landing.reason
    assert landing.ve == 0.0 and landing.vn == 0.0
    # hovering just above the floor, descending slowly, or high up: the ordinary age limit
    for tel in (telemetry(rel_alt_m=5.3, vd=0.0), telemetry(rel_alt_m=5.3, vd=0.2),
                telemetry(rel_alt_m=30.0, vd=1.0), None):
        assert loop.estimate_at(last + 1.7, tel).fix == FixQuality.NONE, tel
    # a caller that does not say where the floor is gets no such hold
    loop.update(flt, last, identity_lonlat, too_low=False)
    assert loop.estimate_at(last + 1.7, telemetry(rel_alt_m=5.3, vd=1.0)).fix == FixQuality.NONE


def test_a_landed_hold_says_velocity_zero_and_its_accuracy_stops_growing():
    flt, last = moving_track(speed_e=1.0)
    loop = make_loop(OutputConfig(fix_max_age_s=1.5, low_hold_s=15.0, ground_height_m=0.5))
    loop.update(flt, last, identity_lonlat, too_low=True)
    descending = telemetry(rel_alt_m=2.0, vd=0.8)
    on_ground = telemetry(rel_alt_m=0.1, vd=0.02)
    air = loop.estimate_at(last + 3.0, descending)
    assert "below the visual floor" in air.reason
    touchdown = loop.estimate_at(last + 4.0, on_ground)
    later = loop.estimate_at(last + 9.0, on_ground)
    assert "landed" in touchdown.reason and "landed" in later.reason
    assert later.sigma_h_m == pytest.approx(touchdown.sigma_h_m) and touchdown.sigma_h_m > air.sigma_h_m
    # 0.1 m/s per axis: the 2-D RMS the encoder turns into speed_accuracy per axis
    assert later.sigma_speed_ms == pytest.approx(0.1 * math.sqrt(2)) and later.vn == later.ve == 0.0
    assert (later.lat, later.lon) == (touchdown.lat, touchdown.lon)
    # still sinking at 1 m from the ground is not landed; a lift-off ends the freeze
    assert "landed" not in loop.estimate_at(last + 9.5, telemetry(rel_alt_m=0.3, vd=0.6)).reason
    assert loop.estimate_at(last + 10.0, telemetry(rel_alt_m=0.1, vd=0.0)).sigma_h_m > touchdown.sigma_h_m


def test_the_loop_sends_at_a_steady_rate_whatever_the_frame_rate():
    link = RecordingLink()
    loop = make_loop(OutputConfig(rate_hz=5.0), link).start()
    try:
        time.sleep(1.25)
    finally:
        loop.stop()
    times = np.array([now for now, _, _ in link.sent])
    assert 6 <= len(times) <= 7
    assert np.all(np.abs(np.diff(times) - 0.2) < 0.04), np.diff(times)
    # stamped with the send time (unix = monotonic + offset): the estimate is valid then
    assert all(unix == pytest.approx(now + 1000.0) for now, unix, _ in link.sent)
    assert 4.5 < loop.achieved_rate_hz() < 5.5


def test_a_failing_send_is_counted_and_the_loop_carries_on():
    class Flaky(RecordingLink):
        def send_estimate(self, est, capture_unix_s, processing_s=0.0, now=None):
            super().send_estimate(est, capture_unix_s, processing_s, now)
            if len(self.sent) == 2:
                raise OSError("link hiccup")
            return False

    link = Flaky()
    loop = make_loop(OutputConfig(rate_hz=10.0), link).start()
    try:
        time.sleep(0.55)
    finally:
        loop.stop()
    assert loop.stats["errors"] == 1 and "hiccup" in loop.last_error and len(link.sent) >= 5


def telemetry(**kw):
    base = dict(time_s=0.0, roll=0.0, pitch=0.0, yaw=0.0, rel_alt_m=60.0, alt_amsl_m=0.0)
    base.update(kw)
    return Telemetry(**base)


def test_altitude_is_never_the_autopilots_own_echoed_back_before_it_has_an_origin():
    baro = AltitudeSource(OutputConfig(altitude="baro"))
    assert math.isnan(baro.altitude(telemetry(alt_amsl_m=0.0), math.nan, 50.0, 10.0))   # no origin yet
    assert baro.altitude(telemetry(alt_amsl_m=70.2), 10.0, 50.0, 10.0) == pytest.approx(70.2)
    field = AltitudeSource(OutputConfig(altitude="field_elevation", field_elevation_m=12.5))
    assert field.altitude(telemetry(alt_amsl_m=0.0), math.nan, 50.0, 10.0) == pytest.approx(72.5)
    assert math.isnan(AltitudeSource(OutputConfig(altitude="none")).altitude(telemetry(), 10.0, 50.0, 10.0))


def test_dem_altitude_is_terrain_at_the_fix_plus_the_rangefinder(tmp_path):
    import rasterio
    from affine import Affine

    from mean_nav.geo.crs import from_lonlat, utm_crs_for

    crs = utm_crs_for(10.0, 50.0)
    x0, y0 = from_lonlat(crs, 10.0, 50.0)
    heights = np.add.outer(np.zeros(50), np.arange(50.0)).astype(np.float32)   # rises 1 m per 10 m east
    path = tmp_path / "dem.tif"
    with rasterio.open(path, "w", driver="GTiff", width=50, height=50, count=1, dtype="float32", crs=crs,
                       transform=Affine(10.0, 0, float(x0) - 250, 0, -10.0, float(y0) + 250)) as ds:
        ds.write(heights, 1)
    dem = AltitudeSource(OutputConfig(altitude="dem", dem="dem.tif"), config_dir=tmp_path)
    assert dem.altitude(telemetry(range_m=40.0), math.nan, 50.0, 10.0) == pytest.approx(24.5 + 40.0, abs=0.2)
    assert math.isnan(dem.altitude(telemetry(), math.nan, 50.0, 10.0))      # no rangefinder: no honest altitude


@pytest.mark.parametrize("cfg, field", [(OutputConfig(rate_hz=4.0), "rate_hz"),
                                        (OutputConfig(rate_hz=math.nan), "rate_hz"),
                                        (OutputConfig(fix_max_age_s=-1), "fix_max_age_s"),
                                        (OutputConfig(altitude="field_elevation"), "field_elevation_m"),
                                        (OutputConfig(altitude="dem"), "dem"),
                                        (OutputConfig(altitude="gps"), "altitude")])
def test_bad_output_settings_are_refused(cfg, field):
    with pytest.raises(MeanNavError, match=field):
        check_output_config(cfg)


def test_the_output_log_says_how_far_each_fix_was_propagated(tmp_path):
    import json
    flt, last = moving_track()
    log = tmp_path / "out.jsonl"
    loop = make_loop(OutputConfig(fix_max_age_s=2.0, output_log=str(log)))
    loop._log = open(log, "a", encoding="utf-8")     # start() without the thread
    loop.update(flt, last, identity_lonlat)
    loop.tick(last + 0.7)
    loop.tick(last + 2.5)                              # too old: no fix, no age
    loop._log.close()
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert rows[0]["fix"] == 3 and rows[0]["fix_age_s"] == pytest.approx(0.7, abs=1e-3)
    assert rows[1]["fix"] == 1 and rows[1]["fix_age_s"] is None
