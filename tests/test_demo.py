"""A reduced demo: tiny world, few frames, the shipped demo model; the full demo is timed in the README."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mean_nav.demo import ASSET, MAX_ASSET_BYTES, DemoConfig, run_demo
from mean_nav.errors import MeanNavError


def test_demo_asset_is_shipped_and_small():
    assert ASSET.is_file(), "mean_nav/assets/demo_lite0.onnx missing: run `mean-nav demo --rebuild-model`"
    assert ASSET.stat().st_size < MAX_ASSET_BYTES


def test_reduced_demo_localizes_over_an_unseen_world(tmp_path, capsys):
    cfg = DemoConfig(world_px=640, camera_px=(320, 240), fps=1.0, duration_s=16, leave_map_m=0.0)
    summary = run_demo(tmp_path, cfg, progress=False)
    report = tmp_path / "report"
    assert json.loads((report / "summary.json").read_text())["frames"] == summary["frames"] > 10
    for name in ("estimates.csv", "track.png", "error.png", "gps_input.tlog"):
        assert (report / name).stat().st_size > 0
    # the shipped model must actually localize: most frames fixed, metre-level error
    assert summary["fix_rate"] > 0.5
    assert summary["error_m"]["median"] < 10.0
    # a second run reuses the world and the cache (same model hash) and gives the same estimates
    first = (report / "estimates.csv").read_text().splitlines()
    capsys.readouterr()
    run_demo(tmp_path, cfg, progress=False)
    assert "cache: reusing" in capsys.readouterr().out
    second = (report / "estimates.csv").read_text().splitlines()
    strip = lambda lines: [",".join(c for i, c in enumerate(l.split(",")) if i != lat_idx) for l in lines]
    lat_idx = first[0].split(",").index("latency_s")
    assert strip(first) == strip(second)


def test_missing_model_says_how_to_build_it(tmp_path):
    with pytest.raises(MeanNavError, match="--rebuild-model"):
        run_demo(tmp_path, DemoConfig(), model=tmp_path / "none.onnx", progress=False)
