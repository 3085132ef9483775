"""Pins GPS time and the GPS_INPUT encoding from independent sources: published GPS calendar
facts, Python's datetime, and the message as pymavlink decodes it on the autopilot's side."""
from __future__ import annotations

import calendar
import datetime as dt
import itertools
import math
import time
from pathlib import Path

import pytest

from mean_nav.nav.estimate import Estimate, FixQuality
from mean_nav.nav.gps_time import gps_minus_utc_s, gps_week_and_ms
from mean_nav.nav.mavlink_io import (MAV, MavlinkConfig, MavlinkLink, TelemetryHistory, dop_for_accuracy, implausible,
                                     mavutil)
from nav_testing import free_udp_port

WEEK_MS = 7 * 24 * 3600 * 1000
GPS_EPOCH = dt.datetime(1980, 1, 6, tzinfo=dt.timezone.utc)


def unix(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    return float(calendar.timegm((year, month, day, hour, minute, second)))


def gps_by_datetime(utc: dt.datetime, leap_s: int) -> tuple[int, int]:
    """A second derivation: GPS time = UTC + leap seconds, counted from the GPS epoch by datetime."""
    elapsed = utc + dt.timedelta(seconds=leap_s) - GPS_EPOCH
    ms = round(elapsed / dt.timedelta(milliseconds=1))
    return ms // WEEK_MS, ms % WEEK_MS


# --- GPS time -------------------------------------------------------------------------------

def test_the_2019_week_rollover_instant_is_week_2048_at_zero_ms():
    # GPS week 2048 (the second 10-bit rollover) began at 2019-04-07 00:00:00 GPS time,
    # i.e. 2019-04-06 23:59:42 UTC with GPS - UTC = 18 s.
    rollover = unix(2019, 4, 6, 23, 59, 42)
    assert gps_minus_utc_s(rollover) == 18
    assert gps_week_and_ms(rollover) == (2048, 0)
    assert gps_week_and_ms(rollover - 0.001) == (2047, WEEK_MS - 1)
    assert gps_week_and_ms(rollover + 0.001) == (2048, 1)


def test_rounding_up_to_the_end_of_a_week_carries_into_the_next_week():
    rollover = unix(2019, 4, 6, 23, 59, 42)
    week, ms = gps_week_and_ms(rollover - 0.0004)     # 0.4 ms before: rounds to the boundary
    assert (week, ms) == (2048, 0)
    for offset in (-0.0006, -0.0004, -0.0001, 0.0, 0.0004):
        assert 0 <= gps_week_and_ms(rollover + offset)[1] < WEEK_MS


# IERS Bulletin C: GPS - UTC steps since the GPS epoch (the seconds inserted at the end of the
# day before), typed from the bulletin's TAI - UTC history less 19
PUBLISHED_STEPS = [((1981, 7, 1), 1), ((1982, 7, 1), 2), ((1983, 7, 1), 3), ((1985, 7, 1), 4),
                   ((1988, 1, 1), 5), ((1990, 1, 1), 6), ((1991, 1, 1), 7), ((1992, 7, 1), 8),
                   ((1993, 7, 1), 9), ((1994, 7, 1), 10), ((1996, 1, 1), 11), ((1997, 7, 1), 12),
                   ((1999, 1, 1), 13), ((2006, 1, 1), 14), ((2009, 1, 1), 15), ((2012, 7, 1), 16),
                   ((2015, 7, 1), 17), ((2017, 1, 1), 18)]


@pytest.mark.parametrize("day, after", PUBLISHED_STEPS)
def test_leap_seconds_step_at_the_published_instants(day, after):
    step = unix(*day)
    assert gps_minus_utc_s(step - 1.0) == after - 1
    assert gps_minus_utc_s(step) == after
    assert gps_minus_utc_s(step + 86400.0 * 40) == after      # a month later still the same


def test_leap_seconds_before_2006_and_today():
    assert gps_minus_utc_s(unix(1980, 1, 6)) == 0             # the GPS epoch: GPS = UTC
    assert gps_minus_utc_s(unix(1981, 6, 30, 23, 59, 59)) == 0
    assert gps_minus_utc_s(unix(1998, 12, 31, 23, 59, 59)) == 12
    assert gps_minus_utc_s(unix(1999, 6, 1)) == 13
    assert gps_minus_utc_s(unix(2005, 12, 31, 23, 59, 59)) == 13
    assert gps_minus_utc_s(unix(2026, 3, 1)) == 18


def test_leap_seconds_agree_with_the_systems_iers_list():
    """tzdata ships IERS's leap-seconds.list (NTP seconds since 1900, TAI - UTC): a third source."""
    path = Path("/usr/share/zoneinfo/leap-seconds.list")
    try:
        lines = path.read_text(encoding="ascii").splitlines()
    except OSError:
        pytest.skip(f"{path} absent (no tzdata); the typed Bulletin C steps above still pin the table")
    ntp_to_unix = 2208988800
    steps = [(int(a) - ntp_to_unix, int(b) - 19) for a, b, *_ in (ln.split() for ln in lines if ln and ln[0] != "#")]
    for start, gps_minus_utc in steps:
        if start > unix(1980, 1, 6):
            assert gps_minus_utc_s(start) == gps_minus_utc, start
            assert gps_minus_utc_s(start - 1.0) == gps_minus_utc - 1, start


def test_the_gps_epoch_is_week_0_at_0_ms():
    assert gps_week_and_ms(unix(1980, 1, 6)) == (0, 0)
    assert gps_week_and_ms(unix(1980, 1, 13, 0, 0, 1)) == (1, 1000)


@pytest.mark.parametrize("utc", [dt.datetime(2026, 3, 1, 10, 0, 0, 500000, tzinfo=dt.timezone.utc),
                                 dt.datetime(2021, 8, 14, 3, 7, 11, 250000, tzinfo=dt.timezone.utc),
                                 dt.datetime(2000, 2, 29, 23, 59, 59, tzinfo=dt.timezone.utc),
                                 dt.datetime(1996, 6, 30, 12, 0, 0, tzinfo=dt.timezone.utc)])
def test_week_and_ms_agree_with_a_datetime_derivation(utc):
    leap = 18 if utc.year >= 2017 else (13 if utc.year >= 1999 else 11)
    assert gps_week_and_ms(utc.timestamp()) == gps_by_datetime(utc, leap)


def test_an_explicit_leap_second_count_overrides_the_table():
    t = unix(2026, 3, 1, 10, 0, 0)
    utc = dt.datetime.fromtimestamp(t, dt.timezone.utc)
    assert gps_week_and_ms(t, leap_seconds=19) == gps_by_datetime(utc, 19)
    assert gps_week_and_ms(t, leap_seconds=0) == gps_by_datetime(utc, 0)
    assert gps_week_and_ms(t, leap_seconds=19)[1] - gps_week_and_ms(t)[1] == 1000


# --- GPS_INPUT as the autopilot decodes it -----------------------------------------------

@pytest.fixture
def autopilot():
    """A pymavlink peer standing in for the autopilot; returns a factory of links to it."""
    port = free_udp_port()
    peer = mavutil.mavlink_connection(f"udpin:127.0.0.1:{port}", source_system=1, source_component=1,
                                      dialect="common")
    links = []

    def connect(**cfg) -> MavlinkLink:
        link = MavlinkLink(MavlinkConfig(connection=f"udpout:127.0.0.1:{port}", **cfg))
        links.append(link)
        return link

    yield connect, peer
    for link in links:
        link.close()
    peer.close()


def received_gps_input(peer, timeout_s: float = 2.0):
    msg = peer.recv_match(type="GPS_INPUT", blocking=True, timeout=timeout_s)
    assert msg is not None, "no GPS_INPUT arrived"
    return msg


def estimate(**kw) -> Estimate:
    base = dict(time_s=1.0, fix=FixQuality.FIX, lat=51.8401685, lon=4.9866870, alt_m=70.5, vn=4.0, ve=-1.0,
                vd=0.0, sigma_h_m=2.5, sigma_v_m=10.0, sigma_speed_ms=0.4)
    base.update(kw)
    return Estimate(**base)


_SEND_CLOCK = itertools.count(1000)


def send(link: MavlinkLink, est: Estimate, unix_s: float = 1.77e9) -> None:
    now = float(next(_SEND_CLOCK))   # a second after the previous send: never inside the 50 ms minimum
    assert link.send_estimate(est, unix_s, now=now) == (est.fix == FixQuality.FIX)


FLAG = mavutil.mavlink      # GPS_INPUT_IGNORE_FLAG_* as pymavlink's dialect defines them


def test_velocity_keeps_its_ned_signs_and_the_unmeasured_vertical_is_flagged(autopilot):
    connect, peer = autopilot
    link = connect()
    send(link, estimate(vn=3.0, ve=-2.0, vd=1.5))       # north-east-down: flying north-west, sinking
    msg = received_gps_input(peer)
    assert (msg.vn, msg.ve) == (pytest.approx(3.0), pytest.approx(-2.0))
    # vision measures no vertical velocity: the autopilot is told to ignore vd (EK3_SRC1_VELZ)
    assert msg.ignore_flags & FLAG.GPS_INPUT_IGNORE_FLAG_VEL_VERT
    assert not msg.ignore_flags & FLAG.GPS_INPUT_IGNORE_FLAG_VEL_HORIZ


def test_the_configured_gps_id_is_sent(autopilot):
    connect, peer = autopilot
    link = connect(gps_id=1)                           # GPS2 on the autopilot
    send(link, estimate())
    assert received_gps_input(peer).gps_id == 1
    send(link, estimate(fix=FixQuality.COASTING))       # the no-fix message too
    msg = received_gps_input(peer)
    assert (msg.gps_id, msg.fix_type) == (1, 1)


def test_dops_and_accuracies_follow_their_own_sigma(autopilot):
    connect, peer = autopilot
    link = connect()
    # hdop = 3.5 m / 3.5 m = 1.0 and vdop = 14 m / 3.5 m = 4.0 (the documented nominal range error)
    send(link, estimate(sigma_h_m=3.5, sigma_v_m=14.0))
    msg = received_gps_input(peer)
    assert msg.hdop == pytest.approx(1.0) and msg.vdop == pytest.approx(4.0)
    assert msg.horiz_accuracy == pytest.approx(3.5) and msg.vert_accuracy == pytest.approx(14.0)
    # the documented arming link: 4.9 m is exactly Copter's GPS_HDOP_GOOD of 1.4
    send(link, estimate(sigma_h_m=4.9, sigma_v_m=14.0))
    assert received_gps_input(peer).hdop == pytest.approx(1.4)


def test_dops_are_clamped_to_the_documented_range(autopilot):
    connect, peer = autopilot
    link = connect()
    send(link, estimate(sigma_h_m=0.35, sigma_v_m=700.0))     # 0.1 -> 0.5 and 200 -> 50
    msg = received_gps_input(peer)
    assert msg.hdop == pytest.approx(0.5) and msg.vdop == pytest.approx(50.0)


@pytest.mark.parametrize("sigma_h, sats", [(1.5, 12), (2.0, 12), (4.0, 10), (9.0, 8), (15.0, 6), (40.0, 5)])
def test_satellites_follow_the_horizontal_accuracy_only(autopilot, sigma_h, sats):
    connect, peer = autopilot
    link = connect()
    send(link, estimate(sigma_h_m=sigma_h, sigma_v_m=30.0))   # a poor vertical sigma must not matter
    assert received_gps_input(peer).satellites_visible == sats


def test_unknown_altitude_is_flagged_with_the_vertical_fields(autopilot):
    connect, peer = autopilot
    link = connect()
    send(link, estimate(alt_m=math.nan))
    msg = received_gps_input(peer)
    vertical = (FLAG.GPS_INPUT_IGNORE_FLAG_ALT | FLAG.GPS_INPUT_IGNORE_FLAG_VDOP
                | FLAG.GPS_INPUT_IGNORE_FLAG_VERTICAL_ACCURACY)
    assert vertical == 1 | 4 | 128
    assert msg.ignore_flags == vertical | FLAG.GPS_INPUT_IGNORE_FLAG_VEL_VERT
    assert math.isfinite(msg.alt)
    send(link, estimate(alt_m=12.0))
    assert received_gps_input(peer).ignore_flags == FLAG.GPS_INPUT_IGNORE_FLAG_VEL_VERT


def test_position_time_and_fix_type_of_a_fix(autopilot):
    connect, peer = autopilot
    link = connect()
    t = unix(2019, 4, 6, 23, 59, 42) + 0.25               # 250 ms into GPS week 2048
    send(link, estimate(lat=-33.8567844, lon=151.2152967, alt_m=123.25), t)
    msg = received_gps_input(peer)
    assert (msg.time_week, msg.time_week_ms) == (2048, 250)
    assert msg.time_usec == int(t * 1e6)
    assert msg.fix_type == 3
    assert (msg.lat, msg.lon) == (-338567844, 1512152967)
    assert msg.alt == pytest.approx(123.25)


def test_no_fix_sends_no_position_and_no_usable_accuracy(autopilot):
    connect, peer = autopilot
    link = connect()
    send(link, estimate(fix=FixQuality.COASTING, lat=10.0, lon=20.0))
    msg = received_gps_input(peer)
    assert msg.fix_type == 1 and (msg.lat, msg.lon) == (0, 0)     # 1: "no fix" (0 would be "no GPS")
    for flag in ("ALT", "VEL_HORIZ", "VEL_VERT", "SPEED_ACCURACY", "VERTICAL_ACCURACY"):
        assert msg.ignore_flags & getattr(FLAG, f"GPS_INPUT_IGNORE_FLAG_{flag}"), flag
    assert msg.horiz_accuracy > 1000.0                              # no old accuracy lingers
    assert link.positions_sent == 0


@pytest.mark.parametrize("bad", [dict(lat=95.0), dict(lon=-181.0), dict(lat=math.nan), dict(sigma_h_m=0.0),
                                 dict(vn=math.inf)])
def test_an_implausible_fix_goes_out_as_no_fix(autopilot, bad):
    connect, peer = autopilot
    link = connect()
    now = float(next(_SEND_CLOCK))
    assert not link.send_estimate(estimate(**bad), 1.77e9, now=now)
    msg = received_gps_input(peer)
    assert msg.fix_type == 1 and (msg.lat, msg.lon) == (0, 0)
    assert link.positions_sent == 0


def test_latitude_and_longitude_round_to_the_nearest_1e7_degree(autopilot):
    connect, peer = autopilot
    link = connect()
    # x 1e7 = 518401685.6 and -49866870.6: rounding gives ...686 and -...871, truncation would not
    send(link, estimate(lat=51.84016856, lon=-4.98668706))
    msg = received_gps_input(peer)
    assert (msg.lat, msg.lon) == (518401686, -49866871)
    assert msg.yaw == 0                      # 0: no yaw from vision (1 would be 0.01 deg)


def test_no_fix_reports_no_satellites_and_no_yaw(autopilot):
    connect, peer = autopilot
    link = connect()
    send(link, estimate(fix=FixQuality.NONE))
    msg = received_gps_input(peer)
    assert (msg.satellites_visible, msg.yaw) == (0, 0)


def test_px4_position_is_encoded_in_1e7_degrees_both_ways(autopilot):
    connect, peer = autopilot
    link = connect(output="global_position_sensor")
    assert link.send_estimate(estimate(lat=-33.8567844, lon=151.2152967), 1.77e9, now=float(next(_SEND_CLOCK)))
    msg = peer.recv_match(type="GLOBAL_POSITION_SENSOR", blocking=True, timeout=2.0)
    assert msg is not None and (msg.lat, msg.lon) == (-338567844, 1512152967)
    assert msg.target_system == 0            # no vehicle heard yet: broadcast


# --- plausibility, rate limit, output none, PX4 fields, telemetry constants ----------------

@pytest.mark.parametrize("fields", [dict(lat=90.0), dict(lat=-90.0), dict(lon=180.0), dict(lon=-180.0),
                                    dict(alt_m=-1000.0), dict(alt_m=20000.0), dict(alt_m=math.nan)])
def test_positions_on_the_edge_of_the_earth_and_the_altitude_limits_are_plausible(fields):
    assert implausible(estimate(**fields)) == ""


@pytest.mark.parametrize("fields, words", [(dict(lat=90.001), "latitude"), (dict(lat=-90.001), "latitude"),
                                           (dict(lon=180.001), "longitude"), (dict(lon=-180.001), "longitude"),
                                           (dict(alt_m=-1000.5), "altitude"), (dict(alt_m=20000.5), "altitude"),
                                           (dict(alt_m=-1500.0), "altitude"), (dict(lat=None), "not finite"),
                                           (dict(sigma_h_m=-1.0), "accuracy")])
def test_positions_beyond_them_are_implausible(fields, words):
    assert words in implausible(estimate(**fields))


def test_an_unknown_accuracy_is_the_worst_dop():
    assert dop_for_accuracy(math.nan) == 50.0 and dop_for_accuracy(math.inf) == 50.0


def test_output_none_sends_nothing(autopilot):
    connect, peer = autopilot
    link = connect(output="none")
    assert not link.send_estimate(estimate(), 1.77e9, now=float(next(_SEND_CLOCK)))
    assert not link.send_estimate(estimate(fix=FixQuality.NONE), 1.77e9, now=float(next(_SEND_CLOCK)))
    assert peer.recv_match(blocking=True, timeout=0.3) is None
    assert link.messages_sent == 0


def test_fixes_exactly_50_ms_apart_both_go_out(autopilot):
    connect, peer = autopilot
    link = connect()
    assert link.send_estimate(estimate(), 1.77e9, now=0.0)
    assert link.send_estimate(estimate(lat=51.9), 1.77e9, now=0.05)          # ArduPilot keeps >= 50 ms
    assert not link.send_estimate(estimate(lat=52.0), 1.77e9, now=0.0999)    # 49.9 ms: dropped
    assert [received_gps_input(peer).lat for _ in range(2)] == [518401685, 519000000]


@pytest.mark.parametrize("output, cfg", [("gps_input", dict(send_no_fix=False)), ("global_position_sensor", {})])
def test_a_no_fix_that_sends_nothing_does_not_delay_the_next_fix(autopilot, output, cfg):
    connect, peer = autopilot
    link = connect(output=output, **cfg)
    assert not link.send_estimate(estimate(fix=FixQuality.NONE), 1.77e9, now=100.0)
    assert link.send_estimate(estimate(), 1.77e9, now=100.01)                 # 10 ms later
    kind = "GPS_INPUT" if output == "gps_input" else "GLOBAL_POSITION_SENSOR"
    msg = peer.recv_match(blocking=True, timeout=2.0, type=kind)
    assert msg is not None and msg.lat == 518401685


def test_a_link_whose_port_is_not_open_reports_the_fix_unsent():
    port = free_udp_port()    # nothing listens on this TCP port either
    link = MavlinkLink(MavlinkConfig(connection=f"tcp:127.0.0.1:{port}", request_rates=False))
    try:
        assert not link.connected
        assert not link.send_estimate(estimate(), 1.77e9, now=1.0)
        assert link.positions_sent == 0
    finally:
        link.close()


def test_px4_global_position_sensor_fields_as_pymavlink_decodes_them(autopilot):
    connect, peer = autopilot
    link = connect(output="global_position_sensor")
    link.start()
    link.send_heartbeat(MAV.MAV_STATE_ACTIVE)
    assert peer.recv_match(type="HEARTBEAT", blocking=True, timeout=2.0) is not None
    peer.mav.heartbeat_send(MAV.MAV_TYPE_QUADROTOR, MAV.MAV_AUTOPILOT_PX4, 0, 0, MAV.MAV_STATE_ACTIVE)
    deadline = time.monotonic() + 3.0
    while link.vehicle_system is None and time.monotonic() < deadline:
        peer.recv_match(blocking=True, timeout=0.05)
    assert link.vehicle_system == 1
    t = 1.77e9 + 0.123456
    # x 1e7 = 518401685.6 and -49866870.6: rounded, not truncated
    est = estimate(lat=51.84016856, lon=-4.98668706, alt_m=70.5, sigma_h_m=2.5, sigma_v_m=6.0)
    assert link.send_estimate(est, t, processing_s=0.25, now=float(next(_SEND_CLOCK)))
    msg = peer.recv_match(type="GLOBAL_POSITION_SENSOR", blocking=True, timeout=2.0)
    assert msg is not None
    assert (msg.target_system, msg.target_component, msg.id) == (1, 0, 0)
    assert msg.time_usec == int(t * 1e6) and msg.processing_time == 250_000
    assert (msg.source, msg.flags) == (MAV.GLOBAL_POSITION_SRC_VISION, MAV.GLOBAL_POSITION_PRIMARY)
    assert (msg.lat, msg.lon) == (518401686, -49866871)
    assert msg.alt == pytest.approx(70.5) and math.isnan(msg.alt_ellipsoid)
    assert (msg.eph, msg.epv) == (pytest.approx(2.5), pytest.approx(6.0))
    assert link.positions_sent == 1


def test_attitude_samples_further_apart_than_0_3_s_are_never_bridged():
    h = TelemetryHistory()
    h.add_attitude(10.0, 0.0, 0.0, 0.0)
    h.add_attitude(10.25, 0.1, 0.0, 0.0)        # 0.25 s apart: interpolated
    h.add_attitude(10.65, 0.3, 0.0, 0.0)        # 0.4 s apart: a telemetry hole
    close = h.at(10.125)
    assert close.time_s == 10.125 and close.roll == pytest.approx(0.05)
    hole = h.at(10.35)                          # nearer the sample at 10.25
    assert hole.time_s == 10.25 and hole.roll == pytest.approx(0.1)


@pytest.mark.parametrize("flags, yaw", [(0, 1.5), (MAV.GIMBAL_DEVICE_FLAGS_YAW_IN_VEHICLE_FRAME, 1.5),
                                        (MAV.GIMBAL_DEVICE_FLAGS_RETRACT, 1.5),
                                        (MAV.GIMBAL_DEVICE_FLAGS_YAW_IN_EARTH_FRAME, 0.5)])
def test_gimbal_yaw_is_in_the_vehicle_frame_unless_flagged_earth_frame(autopilot, flags, yaw):
    connect, _ = autopilot
    link = connect()
    now = time.monotonic()
    link.telemetry.add_attitude(now - 0.01, 0.0, 0.0, 1.0)          # the vehicle heads 1 rad
    q = [math.cos(0.25), 0.0, 0.0, math.sin(0.25)]                   # a 0.5 rad yaw, level
    link._handle(MAV.MAVLink_gimbal_device_attitude_status_message(0, 0, 0, flags, q, 0, 0, 0, 0))
    assert link.telemetry.gimbal[2] == pytest.approx(yaw, abs=1e-6)
