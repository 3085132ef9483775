"""Report plots a reader understands: legend off the data, colour scale fitted to the errors,
clipped axes and views said to be clipped."""
from __future__ import annotations

import numpy as np
import pytest
from pyproj import CRS

from mean_nav.geo.crs import to_lonlat
from mean_nav.nav.estimate import FixQuality
from mean_nav.replay import report

UTM = CRS.from_epsg(32632)


class FakeRaster:
    """What plot_track needs of a MetricRaster: a 200 m square map at 1 m/px."""

    crs = UTM
    bounds = (500000.0, 5300000.0, 500200.0, 5300200.0)
    image = np.full((200, 200, 3), 120, np.uint8)


def flight(n: int = 120, beyond_m: float = 0.0, seed: int = 0) -> dict[str, np.ndarray]:
    """A flight across the map; with beyond_m the last quarter flies that far east of it."""
    rng = np.random.default_rng(seed)
    x = np.linspace(500020.0, 500180.0, n)
    y = np.full(n, 5300100.0)
    tail = np.arange(n) >= 3 * n // 4
    if beyond_m:
        x[tail] = np.linspace(500180.0, 500200.0 + beyond_m, tail.sum())
    lon, lat = to_lonlat(UTM, x, y)
    err = np.abs(rng.normal(0, 0.4, n))
    err[10] = 30.0                                   # one far-off fix: a false fix
    fix = np.where(tail & (beyond_m > 0), int(FixQuality.COASTING), int(FixQuality.FIX)).astype(float)
    fix[40:46] = int(FixQuality.NONE)                # a no-fix stretch over the map
    sigma = np.full(n, 0.8)
    sigma[fix != int(FixQuality.FIX)] = np.linspace(1, 90, int((fix != int(FixQuality.FIX)).sum()))
    ex, ey = x + err, y
    elon, elat = to_lonlat(UTM, ex, ey)
    return {"time_s": np.arange(n, dtype=float), "fix": fix, "lat": np.asarray(elat), "lon": np.asarray(elon),
            "truth_lat": np.asarray(lat), "truth_lon": np.asarray(lon), "error_m": err, "sigma_h_m": sigma,
            "in_map": (~(tail & (beyond_m > 0))).astype(float)}


@pytest.fixture
def figures(monkeypatch):
    """Captures each figure instead of writing it, after a draw so extents are final."""
    captured = {}

    def keep(fig, path):
        fig.canvas.draw()
        captured[path.name] = fig

    monkeypatch.setattr(report, "_savefig", keep)
    monkeypatch.setattr("matplotlib.pyplot.close", lambda fig=None: None)
    return captured


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


@pytest.mark.parametrize("errors, top", [(np.linspace(0, 1, 101), 1.0), (np.linspace(0, 3.7 / 0.95, 101), 4.0),
                                         (np.r_[np.full(99, 0.3), 40.0, 50.0], 0.3), (np.array([]), 1.0)])
def test_colour_scale_tops_at_the_95th_percentile_rounded_up(errors, top):
    assert report._error_scale_m(errors) == pytest.approx(top)


def test_track_legend_is_off_the_data_and_the_scale_is_stated(tmp_path, figures):
    report.plot_track(flight(), tmp_path / "track.png", FakeRaster())
    fig = figures["track.png"]
    ax = fig.axes[0]
    legend = ax.get_legend()
    assert legend is not None
    assert not _overlaps(legend.get_window_extent(), ax.get_window_extent())
    labels = [t.get_text() for t in legend.get_texts()]
    assert any("false fix" in s and "(1)" in s for s in labels)
    assert any("no fix" in s for s in labels)
    colourbar_label = fig.axes[1].get_ylabel()
    assert "95th percentile" in colourbar_label and "above" in colourbar_label   # the 30 m fix is clipped


def test_a_flight_far_off_the_map_keeps_the_map_readable(tmp_path, figures):
    report.plot_track(flight(beyond_m=3000.0), tmp_path / "track.png", FakeRaster())
    ax = figures["track.png"].axes[0]
    left, bottom, right, top = FakeRaster.bounds
    x0, x1 = ax.get_xlim()
    assert x1 - x0 < 2.2 * (right - left)                    # not 3 km wide: the map stays large
    assert any("clipped" in t.get_text() for t in ax.texts)


def test_a_track_just_past_the_margin_is_drawn_and_not_called_clipped(tmp_path, figures):
    """Half a map size (100 m) of margin plus the 3 % padding: a leg 102 m beyond the map
    is still inside the view, so no note may say the view clips it."""
    report.plot_track(flight(beyond_m=102.0), tmp_path / "track.png", FakeRaster())
    ax = figures["track.png"].axes[0]
    assert ax.get_xlim()[1] > FakeRaster.bounds[2] + 103.0
    assert not any("clipped" in t.get_text() for t in ax.texts)


def test_error_plot_says_where_it_clips_and_marks_false_fixes(tmp_path, figures):
    cols = flight()
    report.plot_error(cols, tmp_path / "error.png")
    ax = figures["error.png"].axes[0]
    assert ax.get_ylim()[1] < 30.0                           # fitted to the fixes, not to the worst one
    assert "clipped" in ax.get_title()
    legend = ax.get_legend()
    assert not _overlaps(legend.get_window_extent(), ax.get_window_extent())
    labels = [t.get_text() for t in legend.get_texts()]
    assert any("false fix" in s for s in labels) and any("no fix" in s for s in labels)



def test_a_flight_without_gnss_truth_still_shows_its_fixes_and_says_they_are_not_scored(tmp_path, figures):
    cols = flight()
    for key in ("truth_lat", "truth_lon", "error_m", "in_map"):
        cols[key] = np.full_like(cols[key], np.nan)
    report.plot_track(cols, tmp_path / "track.png", FakeRaster())
    ax = figures["track.png"].axes[0]
    assert "no GNSS truth" in ax.get_title()
    drawn = [l for l in ax.get_lines() if "no GNSS truth" in l.get_label()]
    assert len(drawn) == 1 and len(drawn[0].get_xdata()) == int((cols["fix"] == int(FixQuality.FIX)).sum())
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "GNSS truth" not in labels and not any("no fix sent" in s for s in labels)
    report.plot_error(cols, tmp_path / "error.png")
    assert "no GNSS truth" in figures["error.png"].axes[0].get_title()
