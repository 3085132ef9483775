"""`mean-nav bench field --short`: the reduced stress suite runs, scores and reuses its builds."""
from __future__ import annotations

import json

import numpy as np
import pytest

from mean_nav.bench.field import COLUMNS, FOOTPRINT_ON_MAP, coverage_sd, score, suite
from mean_nav.cli import main
from mean_nav.errors import MeanNavError
from mean_nav.nav.estimate import FixQuality


def test_short_suite_fixes_the_easy_flight_and_reports_every_column(tmp_path, capsys):
    work, results = tmp_path / "work", tmp_path / "out"
    args = ["bench", "field", "--short", "--work", str(work), "-o", str(results), "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    report = json.loads((results / "field_short.json").read_text())
    assert (results / "field_short.png").stat().st_size > 0
    names = [f["name"] for f in report["flights"]]
    assert names == [f.name for f in suite(short=True, only=None)]
    for flight in report["flights"]:
        assert set(COLUMNS) <= set(flight)
        assert flight["frames"] >= 10
        missed = flight["frames_over_map"] - (flight["fixes"] - flight["fixes_off_map"])
        assert sum(n for _, n in flight["no_fix_reasons"]) <= missed
        assert (missed > 0) == bool(flight["no_fix_reasons"])
    easy = report["flights"][0]
    assert easy["name"] == "easy"
    assert easy["fix_rate"] > 0.6 and easy["false_fixes"] == 0
    assert easy["median_m"] < 5.0 and easy["first_fix_s"] < 10
    # one table: a header with every column and a line per flight
    table = out[out.index("flight "):]
    for header in ("fix rate", "median m", "p95 m", "err/floor", "cov68", "false", "1st fix s", "frames/s"):
        assert header in table
    assert all(name in table for name in names)

    # a second run rebuilds nothing: same world, cache and flight folders, same estimates
    built = sorted(p.relative_to(work) for p in (work / "caches").iterdir())
    first = (results / "easy" / "estimates.csv").read_text()
    assert main(args + ["--only", "easy"]) == 0
    assert "cache:" not in capsys.readouterr().out
    assert sorted(p.relative_to(work) for p in (work / "caches").iterdir()) == built
    header = first.splitlines()[0].split(",")
    lat = header.index("latency_s")
    strip = lambda text: [[c for i, c in enumerate(l.split(",")) if i != lat] for l in text.splitlines()]
    assert strip((results / "easy" / "estimates.csv").read_text()) == strip(first)


def test_only_names_an_unknown_flight_and_lists_the_choices():
    with pytest.raises(MeanNavError, match="no such flight.*easy"):
        suite(short=False, only="easy,nope")
    assert [f.name for f in suite(short=False, only="heading_90deg,easy")] == ["easy", "heading_90deg"]


def test_score_counts_fixes_over_the_map_coverage_and_false_fixes():
    fix, none = int(FixQuality.FIX), int(FixQuality.NONE)
    cols = {
        "fix": np.array([none, fix, fix, fix, fix, none], float),
        "time_s": np.arange(6.0) * 2 + 100,
        "error_m": np.array([np.nan, 1.0, 3.0, 10.0, 50.0, np.nan]),
        "sigma_h_m": np.array([np.nan, 2.0, 2.0, 2.0, 2.0, np.nan]),
        "processed": np.ones(6),
        "latency_s": np.full(6, 0.5),
    }
    on_map = np.array([1.0, 1.0, FOOTPRINT_ON_MAP, 0.9, 0.0, 0.8])  # the 50 m fix is off the map
    s = score(cols, on_map, attitude_error_deg=1.0, heights=np.full(6, 100.0))
    assert s["frames_over_map"] == 5 and s["fix_rate"] == pytest.approx(3 / 5)
    assert s["fixes_off_map"] == 1
    assert s["false_fixes"] == 2                      # 10 m and 50 m are beyond 3 x 2 m
    assert s["coverage_68"] == pytest.approx(1 / 4)   # only the 1 m error is inside its 2 m radius
    assert s["coverage_68_sd"] == pytest.approx(np.sqrt(0.25 * 0.75 / 4))   # of 4 fixes
    assert s["median_m"] == pytest.approx(6.5)
    assert s["error_per_floor"] == pytest.approx(6.5 / (100 * np.tan(np.radians(1.0))))
    assert s["first_fix_s"] == pytest.approx(2.0) and s["frames_per_s"] == pytest.approx(2.0)
    assert s["frame_rate_hz"] == pytest.approx(0.5)                  # frames 2 s apart


def test_a_flight_faster_than_the_localizer_is_marked_in_the_table():
    """The replay processes every frame whatever it costs; the daemon would skip frames, so
    the table says where this machine did not keep up with the flight's frame rate."""
    from mean_nav.bench.field import format_table

    row = {"frames": 900, "fix_rate": 1.0, "median_m": 1.0, "p95_m": 2.0, "error_per_floor": 1.0,
           "coverage_68": 0.7, "false_fixes": 0, "first_fix_s": 0.1}
    slow = dict(row, name="video", frame_rate_hz=30.0, frames_per_s=20.0)
    fast = dict(row, name="photos", frame_rate_hz=1.0, frames_per_s=20.0)
    lines = format_table([fast, slow]).splitlines()
    video, photos = next(l for l in lines if l.startswith("video")), next(l for l in lines if l.startswith("photos"))
    assert video.rstrip().endswith("20.0*") and photos.rstrip().endswith("20.0")
    assert any(l.startswith("* slower than the flight's frame rate") for l in lines)
    assert not any(l.startswith("*") for l in format_table([fast]).splitlines())
    assert " 70% " in photos                                          # no sampling noise given
    assert " 70% ±9 " in format_table([dict(fast, coverage_68_sd=0.092)])


def test_footprint_on_map_sees_how_much_of_the_camera_view_is_map(tmp_path):
    """The fix-rate denominator: a level camera whose nadir sits on the map's east edge sees
    half map; 20 m farther east at 60 m, about a quarter; a nodata hole under it counts out."""
    from types import SimpleNamespace

    from affine import Affine
    from pyproj import CRS

    from mean_nav.bench.field import footprint_on_map
    from mean_nav.geo.crs import to_lonlat
    from mean_nav.geo.raster import MetricRaster
    from mean_nav.nav.camera_model import CameraModel
    from mean_nav.nav.telemetry import Telemetry
    from mean_nav.replay.logs import write_telemetry_csv

    crs = CRS.from_epsg(32632)
    x0, y0 = 650_000.0, 5_300_000.0
    valid = np.zeros((400, 400), bool)
    valid[:, :200] = True                                   # the map: the western half
    raster = MetricRaster(np.zeros((400, 400, 3), np.uint8), valid, crs, Affine(1.0, 0, x0, 0, -1.0, y0), 1.0)
    edge_x, mid_y = x0 + 200, y0 - 200
    nadirs = [(edge_x, mid_y), (edge_x + 20, mid_y), (edge_x - 150, mid_y)]
    rows = []
    for k, (x, y) in enumerate(nadirs):
        lon, lat = to_lonlat(crs, x, y)
        for dt in (0.0, 0.5):
            rows.append(Telemetry(time_s=10.0 * k + dt, roll=0.0, pitch=0.0, yaw=0.0, rel_alt_m=60.0,
                                  lat=float(lat), lon=float(lon)))
    write_telemetry_csv(tmp_path / "truth.csv", rows)
    flight = SimpleNamespace(root=tmp_path, frame_times=np.array([0.25, 10.25, 20.25]),
                             camera=CameraModel.from_fov(640, 480, 70))
    on_map = footprint_on_map(flight, raster)
    assert on_map[0] == pytest.approx(0.5, abs=0.07)
    half_width = 60 * np.tan(np.radians(35))               # 42 m: the footprint's east-west half width
    assert on_map[1] == pytest.approx((half_width - 20) / (2 * half_width), abs=0.07)
    assert on_map[2] == 1.0
    valid[:, :100] = False                                  # a hole under the third nadir
    assert footprint_on_map(flight, raster)[2] < 0.05


def test_the_coverage_noise_counts_fixes_that_share_their_errors():
    # 1 Hz fixes whose errors come in 20 s runs inside / outside the radius: the same 50 %
    # as alternating ones, but only 6 independent runs, not 120 independent fixes
    t = np.arange(120.0)
    runs = (t // 20) % 2 == 0
    alternating = t % 2 == 0
    binomial = np.sqrt(0.25 / 120)
    assert coverage_sd(alternating, t) == pytest.approx(binomial)      # blocks as even as the fixes
    assert coverage_sd(runs, t) > 3 * binomial
    # photos farther apart than a block: each its own batch, the binomial error
    photos = np.array([1, 0, 1, 1, 0, 1, 0, 1], bool)
    assert coverage_sd(photos, np.arange(8) * 20.0) == pytest.approx(np.sqrt(5 / 8 * 3 / 8 / 8) * np.sqrt(8 / 7))
