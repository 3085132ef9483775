"""Telemetry readers on the real logs in ../shared/data/logs."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from mean_nav.errors import MeanNavError
from mean_nav.replay.logs import (Series, TelemetryTrack, quaternion_to_euler, read_dataflash,
                                  read_telemetry_csv, read_telemetry_log, read_tlog, read_ulog,
                                  write_telemetry_csv)
from mean_nav.nav.telemetry import Telemetry

LOGS = Path(__file__).resolve().parents[2] / "shared" / "data" / "logs"


def need(name: str) -> Path:
    path = LOGS / name
    if not path.is_file():
        print(f"skipping: {path} is absent (CI keeps shared/data beside the clone)")
        pytest.skip(f"{path} absent")
    return path


def assert_sane(track: TelemetryTrack, lat_range, lon_range):
    for name, series in track.channels.items():
        assert np.all(np.diff(series.time_s) > 0), f"{name} times must increase"
    for name in ("roll", "pitch", "yaw"):
        v = track.channels[name].values
        assert np.all(np.abs(v) <= math.pi + 1e-9), f"{name} must be radians in [-pi, pi]"
    lat, lon = track.channels["lat"].values, track.channels["lon"].values
    assert lat_range[0] < lat.min() and lat.max() < lat_range[1]
    assert lon_range[0] < lon.min() and lon.max() < lon_range[1]


def test_tlog_reads_boot_clock_seconds_radians_and_relative_altitude_in_metres():
    track = read_tlog(need("uavlogviewer_vtol.tlog"))
    # ArduPlane SITL at Canberra (CMAC): -35.36, 149.16
    assert_sane(track, (-35.40, -35.33), (149.13, 149.20))
    first, last = track.time_range()
    assert 150 < last - first < 260  # the log is a 208 s flight, in seconds not ms
    rel = track.channels["rel_alt_m"].values
    amsl = track.channels["alt_amsl_m"].values
    assert rel.max() > 30  # QuadPlane climbs tens of metres: metres, not mm
    # relative altitude = AMSL minus home elevation: constant between home resets (arming)
    offset = amsl - rel
    assert np.count_nonzero(np.abs(np.diff(offset)) > 0.05) <= 3
    assert 500 < offset.min() and offset.max() < 700
    # attitude really changes in a flight (turns), yet stays radians
    assert np.ptp(track.channels["roll"].values) > 0.5
    # this log repeats a few stamps (link retransmissions): dropped and said so, not sorted in
    assert any("did not increase" in note for note in track.notes)


def test_tlog_gap_longer_than_limit_is_reported_not_interpolated():
    track = read_tlog(need("uavlogviewer_vtol.tlog"), max_gap_s=1.0)
    t = track.channels["roll"].time_s
    k = int(np.argmax(np.diff(t)))
    assert t[k + 1] - t[k] > 1.0  # this log has a multi-second hole
    mid = (t[k] + t[k + 1]) / 2
    result = track.at([mid, t[0] + 0.1])
    assert result.telemetry[0] is None and "gap" in result.problem[0]


def test_dataflash_converts_degrees_to_radians_and_keeps_gnss_and_home_altitude():
    track = read_dataflash(need("pymavlink_test.BIN"))
    assert_sane(track, (-35.40, -35.33), (149.13, 149.20))
    # ATT logs yaw 337 degrees: wrapped to about -0.40 rad
    assert np.allclose(track.channels["yaw"].values, math.radians(337.1 - 360), atol=0.02)
    assert np.all(np.abs(track.channels["roll"].values) < 0.2)
    rel = track.channels["rel_alt_m"].values
    amsl = track.channels["alt_amsl_m"].values
    assert np.all(np.abs(rel) < 2) and np.ptp(amsl - rel) < 0.1  # on the ground at home
    assert track.channels["vn"].values.size > 0  # EKF velocity


def test_ulog_quaternions_become_euler_and_times_are_seconds():
    track = read_ulog(need("pyulog_sample_px4_events.ulg"))
    # PX4 SITL default home: Zurich 47.397, 8.546
    assert_sane(track, (47.3, 47.5), (8.4, 8.7))
    first, last = track.time_range()
    assert 20 < last - first < 35  # a 31 s log
    rel = track.channels["rel_alt_m"].values
    assert rel.max() > 1.0 and rel.min() > -1.0  # take-off, metres above the origin
    amsl = track.channels["alt_amsl_m"].values
    assert abs((amsl.max() - amsl.min()) - (rel.max() - rel.min())) < 1.0


def test_old_ulog_uses_gps_topic_in_dege7_and_millimetres():
    track = read_ulog(need("pyulog_sample_log_small.ulg"))
    assert_sane(track, (63.3, 63.5), (10.3, 10.5))  # Trondheim
    assert 50 < np.median(track.channels["alt_amsl_m"].values) < 80


def test_quaternion_to_euler_matches_known_rotations():
    yaw = math.radians(120)
    q_yaw = np.array([[math.cos(yaw / 2), 0, 0, math.sin(yaw / 2)]])
    roll = math.radians(-20)
    q_roll = np.array([[math.cos(roll / 2), math.sin(roll / 2), 0, 0]])
    r, p, y = quaternion_to_euler(np.concatenate([q_yaw, q_roll]))
    assert np.allclose(y, [yaw, 0], atol=1e-9) and np.allclose(r, [0, roll], atol=1e-9)
    assert np.allclose(p, 0, atol=1e-9)


def test_yaw_interpolates_across_the_pi_wrap_the_short_way():
    t = np.array([0.0, 1.0])
    ch = {n: Series(t, np.zeros(2)) for n in ("roll", "pitch", "rel_alt_m")}
    ch["yaw"] = Series(t, np.array([math.pi - 0.1, -math.pi + 0.1]))
    track = TelemetryTrack(ch, "test")
    yaw = track.at([0.5]).telemetry[0].yaw
    assert abs(abs(yaw) - math.pi) < 1e-6  # through pi, not through 0


def test_telemetry_csv_round_trip_and_non_monotonic_time_names_the_line(tmp_path):
    rows = [Telemetry(time_s=t, roll=0.1, pitch=-0.05, yaw=3.0, rel_alt_m=60 + t, alt_amsl_m=70 + t,
                      vn=1.0, ve=2.0, vd=0.0, lat=51.8 + t * 1e-5, lon=4.97) for t in (0.0, 0.5, 1.0)]
    path = tmp_path / "telemetry.csv"
    write_telemetry_csv(path, rows)
    track = read_telemetry_csv(path)
    tel = track.at([0.25]).telemetry[0]
    assert tel.rel_alt_m == pytest.approx(60.25) and tel.lat == pytest.approx(51.8 + 0.25e-5)
    lines = path.read_text().splitlines()
    lines[3], lines[2] = lines[2], lines[3]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(MeanNavError, match=r"line 4: time_s .* does not increase"):
        read_telemetry_csv(path)


def test_telemetry_csv_in_degrees_is_refused(tmp_path):
    path = tmp_path / "telemetry.csv"
    path.write_text("time_s,lat,lon,alt_m,rel_alt_m,roll,pitch,yaw\n0,1,2,3,4,5,2,270\n1,1,2,3,4,5,2,271\n")
    with pytest.raises(MeanNavError, match="radians"):
        read_telemetry_csv(path)


def test_unknown_log_type_and_missing_file_are_clear_errors(tmp_path):
    with pytest.raises(MeanNavError, match="unknown telemetry log type"):
        read_telemetry_log(tmp_path / "flight.log")
    with pytest.raises(MeanNavError, match="not found"):
        read_telemetry_log(tmp_path / "missing.tlog")


def test_attitude_interpolated_across_a_step_carries_its_rms_error_and_none_at_a_sample():
    # roll jumps 10 deg between two 20 Hz samples at an unknown moment: at fraction w of the
    # interval the interpolated roll is off by w*10 or (1-w)*10 deg, RMS 10*sqrt(w(1-w)) deg
    t = np.array([0.0, 0.05, 0.10])
    ch = {n: Series(t, np.zeros(3)) for n in ("pitch", "yaw", "rel_alt_m")}
    ch["roll"] = Series(t, np.radians([0.0, 10.0, 10.0]))
    track = TelemetryTrack(ch, "test")
    at = track.at([0.0, 0.025, 0.0125, 0.05, 0.075]).telemetry
    sigma_deg = [math.degrees(tel.attitude_interp_sigma_rad) for tel in at]
    assert sigma_deg == pytest.approx([0.0, 5.0, 10 * math.sqrt(0.25 * 0.75), 0.0, 0.0], abs=1e-9)
