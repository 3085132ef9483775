"""Replay runner: GNSS hidden from the localizer, scoring, row-by-row outputs, tlog, determinism."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from mean_nav.geo.crs import from_lonlat, to_lonlat, utm_crs_for
from mean_nav.nav.estimate import Estimate, FixQuality
from mean_nav.replay.flight import Flight
from mean_nav.replay.report import read_estimates_csv
from mean_nav.replay.runner import MapCoverage, TlogWriter, replay
from mean_nav.replay.simulate import SimulationConfig, simulate_flight



@pytest.fixture(scope="module")
def flight_dir(tmp_path_factory, nav_map) -> Path:
    cfg = SimulationConfig(width=96, height=72, fps=0.5, seed=4, map_gsd_m=1.0, leave_map_m=100)
    return simulate_flight([nav_map], tmp_path_factory.mktemp("replay") / "flight", cfg, progress=False)


class KnownOffsetLocalizer:
    """Test double: reports the truth shifted 4 m east with sigma 2 m, except every 7th frame
    which is 30 m off with the same sigma (a false fix)."""

    def __init__(self, truth: Flight, fail_at: int | None = None):
        self.truth = truth.telemetry
        self.seen_gnss = []
        self.calls = 0
        self.fail_at = fail_at
        lat, lon = self.truth.channels["lat"].values[0], self.truth.channels["lon"].values[0]
        self.crs = utm_crs_for(lon, lat)

    def process(self, frame_rgb, telemetry, frame_time_s):
        self.calls += 1
        if self.fail_at is not None and self.calls > self.fail_at:
            raise RuntimeError("backend crashed")
        self.seen_gnss.append((telemetry.lat, telemetry.lon))
        lat = float(self.truth.column("lat", [frame_time_s])[0])
        lon = float(self.truth.column("lon", [frame_time_s])[0])
        crs = self.crs
        x, y = from_lonlat(crs, lon, lat)
        offset = 30.0 if self.calls % 7 == 0 else 4.0
        lon2, lat2 = to_lonlat(crs, x + offset, y)
        return Estimate(time_s=frame_time_s, fix=FixQuality.FIX, lat=lat2, lon=lon2, sigma_h_m=2.0)


def test_localizer_never_sees_gnss_and_scores_are_exact(flight_dir, tmp_path):
    flight = Flight(flight_dir)
    loc = KnownOffsetLocalizer(flight)
    summary = replay(flight, loc, tmp_path, MapCoverage(flight.map_paths), progress=False)
    assert loc.seen_gnss and all(math.isnan(a) and math.isnan(b) for a, b in loc.seen_gnss)
    cols = read_estimates_csv(tmp_path / "estimates.csv")
    fix = cols["fix"] == 3
    assert np.allclose(cols["error_m"][fix & (cols["error_m"] < 10)], 4.0, atol=0.01)
    assert summary["error_m"]["median"] == pytest.approx(4.0, abs=0.01)
    assert summary["error_m"]["max"] == pytest.approx(30.0, abs=0.05)
    # the double fixes every frame and every 7th is 30 m off with a 2 m sigma: a false fix
    n = len(flight)
    assert summary["fixes"] == summary["frames"] == n
    assert summary["false_fixes"] == n // 7 > 0
    assert summary["false_fix_rate"] == pytest.approx((n // 7) / n)
    # the exit leg: frames outside the map, and this localizer fixes there too: all counted
    assert summary["frames_outside_map"] > 0
    assert summary["fixes_outside_map"] == summary["frames_outside_map"]
    assert summary["fix_rate"] == pytest.approx(1.0)
    assert summary["time_to_first_fix_s"] == pytest.approx(0.0)
    for name in ("summary.json", "track.png", "error.png"):
        assert (tmp_path / name).stat().st_size > 1000
    assert json.loads((tmp_path / "summary.json").read_text())["frames"] == len(flight)


def test_replay_twice_gives_identical_estimates_apart_from_latency(flight_dir, tmp_path):
    flight = Flight(flight_dir)
    for name in ("a", "b"):
        replay(flight, KnownOffsetLocalizer(flight), tmp_path / name, progress=False)
    a, b = (read_estimates_csv(tmp_path / n / "estimates.csv") for n in ("a", "b"))
    for key in a:
        if key != "latency_s":
            assert np.array_equal(a[key], b[key]) or np.allclose(a[key], b[key], equal_nan=True), key


def test_crash_midway_keeps_every_estimate_computed_before_it(flight_dir, tmp_path):
    flight = Flight(flight_dir)
    with pytest.raises(RuntimeError, match="backend crashed"):
        replay(flight, KnownOffsetLocalizer(flight, fail_at=5), tmp_path, progress=False)
    cols = read_estimates_csv(tmp_path / "estimates.csv")
    assert len(cols["time_s"]) == 5
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "backend crashed" in summary["stopped_early"] and summary["frames"] == 5


def test_missing_frames_and_telemetry_gaps_are_reported_rows(flight_dir, tmp_path):
    root = tmp_path / "flight"
    shutil.copytree(flight_dir, root)
    (root / "frames" / "000002.jpg").unlink()
    lines = (root / "telemetry.csv").read_text().splitlines()
    t_frame = Flight(root).frame_times[6]
    kept = [lines[0]] + [l for l in lines[1:] if abs(float(l.split(",")[0]) - t_frame) > 1.5]
    (root / "telemetry.csv").write_text("\n".join(kept) + "\n")
    flight = Flight(root)
    summary = replay(flight, KnownOffsetLocalizer(flight), tmp_path / "out", progress=False)
    cols = read_estimates_csv(tmp_path / "out" / "estimates.csv")
    assert cols["processed"][2] == 0 and "000002" in cols["reason"][2]
    assert cols["processed"][6] == 0 and "gap" in cols["reason"][6]
    assert cols["processed"].sum() == len(flight) - 2
    assert summary["problems"] == {"frame image missing": 1, "telemetry gap": 1}


def test_tlog_holds_the_daemons_gps_input_for_every_frame_on_the_frame_clock(flight_dir, tmp_path):
    from pymavlink import mavutil

    from mean_nav.replay.runner import replay_unix_time

    flight = Flight(flight_dir)
    replay(flight, KnownOffsetLocalizer(flight), tmp_path, tlog=True, stop=8, progress=False)
    conn = mavutil.mavlink_connection(str(tmp_path / "gps_input.tlog"))
    msgs = []
    while (m := conn.recv_match(type="GPS_INPUT")) is not None:
        msgs.append(m)
    cols = read_estimates_csv(tmp_path / "estimates.csv")
    assert len(msgs) == 8  # frames 2 s apart: none dropped by the 50 ms limit
    assert [round(m._timestamp, 3) for m in msgs] == [round(replay_unix_time(t), 3) for t in cols["time_s"]]
    fix = cols["fix"] == 3
    assert [m.fix_type for m in msgs] == [3 if f else 1 for f in fix]     # 1: connected, no fix
    fixed = [m for m in msgs if m.fix_type == 3]
    assert fixed and all(abs(m.lat * 1e-7 - lat) < 1e-6 and abs(m.lon * 1e-7 - lon) < 1e-6
                         for m, lat, lon in zip(fixed, cols["lat"][fix], cols["lon"][fix]))
    assert all(m.horiz_accuracy == pytest.approx(2.0) for m in fixed)  # the reported sigma, not a constant


def test_replay_command_runs_the_real_localizer_and_prints_where_the_report_is(tmp_path, capsys):
    """CLI path: shipped demo model, a cache of a small procedural world, a short simulated flight."""
    from mean_nav.cli import main
    from mean_nav.data.world import generate_world
    from mean_nav.demo import ASSET
    from mean_nav.deploy.backends import load_embedder
    from mean_nav.geo.cache import build_cache

    world = generate_world(tmp_path / "world.tif", seed=11, size_px=560, gsd_m=0.25)
    build_cache([world], tmp_path / "cache", load_embedder(ASSET, threads=2), gsd_m=0.25, tile_size_m=60,
                stride_m=20, progress=False)
    cfg = SimulationConfig(width=320, height=240, fps=1.0, duration_s=8, seed=3, map_gsd_m=0.25)
    simulate_flight([world], tmp_path / "flight", cfg, progress=False)
    out = tmp_path / "out"
    code = main(["replay", str(tmp_path / "flight"), "--model", str(ASSET), "--cache", str(tmp_path / "cache"),
                 "-o", str(out), "--tlog"])
    printed = capsys.readouterr().out
    assert code == 0 and "horizontal error" in printed and str(out / "summary.json") in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames"] == 8 and summary["prior"] == "gnss"
    assert summary["fixes"] >= 4 and summary["error_m"]["median"] < 10
    assert (out / "gps_input.tlog").stat().st_size > 0


def test_replay_command_on_an_incomplete_folder_is_one_clear_error(tmp_path, capsys):
    from mean_nav.cli import main

    (tmp_path / "flight").mkdir()
    code = main(["replay", str(tmp_path / "flight"), "--model", "m.onnx", "--cache", "c"])
    err = capsys.readouterr().err
    assert code == 1 and "camera.yaml" in err and len(err.strip().splitlines()) == 1
