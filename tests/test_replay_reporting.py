"""Replay reporting (issue 11 part 7): a replay with no fix or without GNSS truth says so,
--require-fixes turns that into exit status 1, every candidate's rejection reaches the CSV,
and a frame spacing the settings cannot serve is reported before the first frame."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from mean_nav.cli import main
from mean_nav.nav.estimate import Estimate, FixQuality
from mean_nav.replay import runner
from mean_nav.replay.flight import Flight
from mean_nav.replay.report import read_estimates_csv
from mean_nav.replay.runner import print_summary, replay, scoring_gaps
from mean_nav.replay.simulate import SimulationConfig, simulate_flight

REJECTIONS = "geometric verification failed for 2 candidates (tile 3: too few inliers (9 of 40); tile 8: " \
             "implausible fit (scale 1.40, rotation 2 deg))"


@pytest.fixture(scope="module")
def flight_dir(tmp_path_factory, nav_map) -> Path:
    cfg = SimulationConfig(width=96, height=72, fps=0.5, seed=5, map_gsd_m=1.0, duration_s=12)
    return simulate_flight([nav_map], tmp_path_factory.mktemp("reporting") / "flight", cfg, progress=False)


class NeverFixes:
    """Test double: every frame is rejected by verification, for two named reasons."""

    def __init__(self, spacing_limit_s: float = 1e9):
        self.spacing_limit_s = spacing_limit_s

    def process(self, frame_rgb, telemetry, frame_time_s):
        return Estimate(time_s=frame_time_s, fix=FixQuality.NONE, reason=REJECTIONS)

    def frame_spacing_problems(self, spacing_s):
        return [f"frames {spacing_s:.1f} s apart: too far"] if spacing_s > self.spacing_limit_s else []


class AlwaysFixes(NeverFixes):
    def process(self, frame_rgb, telemetry, frame_time_s):
        return Estimate(time_s=frame_time_s, fix=FixQuality.FIX, lat=50.0, lon=8.0, sigma_h_m=3.0)


def test_a_replay_without_a_fix_says_so_and_keeps_every_rejection(flight_dir, tmp_path, capsys):
    summary = replay(Flight(flight_dir), NeverFixes(), tmp_path, progress=False)
    assert summary["fixes"] == 0 and summary["truth_frames"] == summary["frames"]
    print_summary(summary, tmp_path)
    printed = capsys.readouterr().out
    assert "NO FIX" in printed and "geometric verification failed" in printed and "n/a m" not in printed
    assert scoring_gaps(summary) == [f"no fix in {summary['frames']} frames"]
    with (tmp_path / "estimates.csv").open(newline="") as f:
        reasons = [row["reason"] for row in csv.DictReader(f)]
    assert reasons and all("tile 3: too few inliers" in r and "tile 8: implausible fit" in r for r in reasons)


def test_a_flight_without_gnss_is_not_scored_as_zero(flight_dir, tmp_path, capsys):
    blind = tmp_path / "blind"
    shutil.copytree(flight_dir, blind)
    tel = blind / "telemetry.csv"
    with tel.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["lat"] = row["lon"] = ""
    with tel.open("w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = replay(Flight(blind), AlwaysFixes(), tmp_path / "out", progress=False)
    assert summary["fixes"] == summary["frames"] and summary["truth_frames"] == 0
    print_summary(summary, tmp_path / "out")
    printed = capsys.readouterr().out
    assert "NO GNSS truth" in printed and "fix rate 0.0%" not in printed
    assert scoring_gaps(summary) == ["the flight has no GNSS truth to score against"]


def test_frame_spacing_the_settings_cannot_serve_is_reported_before_the_replay(flight_dir, tmp_path, capsys):
    summary = replay(Flight(flight_dir), NeverFixes(spacing_limit_s=1.0), tmp_path, progress=False)
    assert summary["settings_warnings"] == ["frames 2.0 s apart: too far"]       # 0.5 fps
    print_summary(summary, tmp_path)
    assert "settings: frames 2.0 s apart" in capsys.readouterr().out
    assert replay(Flight(flight_dir), NeverFixes(), tmp_path / "b", progress=False)["settings_warnings"] == []


def test_require_fixes_exits_1_when_there_is_nothing_to_score(flight_dir, tmp_path, capsys, monkeypatch):
    for localizer, code_expected in ((NeverFixes(), 1), (AlwaysFixes(), 0)):
        monkeypatch.setattr(runner, "build_localizer", lambda *args, **kwargs: localizer)
        out = tmp_path / type(localizer).__name__
        code = main(["replay", str(flight_dir), "--model", "m.onnx", "--cache", "c", "-o", str(out),
                     "--require-fixes"])
        err = capsys.readouterr().err
        assert code == code_expected, err
        assert json.loads((out / "summary.json").read_text())["frames"] == len(read_estimates_csv(
            out / "estimates.csv")["time_s"])                                   # outputs written either way
        if code_expected:
            assert "--require-fixes" in err and "no fix" in err
