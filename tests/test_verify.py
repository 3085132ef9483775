"""Verification alone: partial overlap with the map, and heading errors up to 180 deg."""
import math

import numpy as np
import pytest

from mean_nav.nav.acquisition import Candidate
from mean_nav.nav.estimate import FixQuality
from mean_nav.nav.localizer import Localizer, LocalizerConfig
from mean_nav.nav.verify import Verifier
from nav_testing import ThumbnailEmbedder, build_test_cache, require_shared_data, simulate


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    require_shared_data()
    from mean_nav.geo.cache import TileCache

    return TileCache.load(build_test_cache(tmp_path_factory.mktemp("cache") / "gorinchem"))


def west_edge_view(cache, outside_m):
    """A north-up view centred `outside_m` west of the map's west edge (its left part is no map)."""
    cx, cy = float(np.mean(cache.x)), float(np.mean(cache.y))
    wide = cache.region(cx, cy, 400.0)
    row = wide.valid[wide.valid.shape[0] // 2]
    edge_col = int(np.argmax(row))                      # first map pixel from the west
    edge_x, _ = wide.transform @ (edge_col, 0)
    qx = edge_x - outside_m
    view = cache.region(qx, cy, cache.tile_size_m)
    return view.image, view.valid, qx, cy


def nearest_tile(cache, x, y):
    t = int(np.argmin(np.hypot(cache.x - x, cache.y - y)))
    return Candidate(float(cache.x[t]), float(cache.y[t]), t, 1.0, ("tile", t))


@pytest.mark.parametrize("outside_m", [8.0, 0.0])
def test_a_view_whose_nadir_is_off_the_map_is_located_from_the_part_on_it(cache, outside_m):
    image, valid, qx, qy = west_edge_view(cache, outside_m)
    assert not valid[valid.shape[0] // 2, valid.shape[1] // 2 - 2]   # nothing under the nadir
    assert 0.3 < valid.mean() < 0.6
    verifier = Verifier(LocalizerConfig(), cache)
    m, why = verifier.verify(image, valid, [nearest_tile(cache, qx, qy)], height_m=60.0, t=0.0)
    assert m is not None, why
    assert math.hypot(m.x - qx, m.y - qy) < 0.5
    assert 0.9 < m.map_overlap <= 1.0        # the part the camera saw is all on the map


def test_a_view_mostly_off_the_map_is_refused_by_the_overlap_check(cache):
    image, valid, qx, qy = west_edge_view(cache, 8.0)
    strict = Verifier(LocalizerConfig(min_map_overlap=0.9), cache)
    # pretend the camera also saw the unmapped part: the fit now covers mostly no map
    m, why = strict.verify(image, np.ones_like(valid), [nearest_tile(cache, qx, qy)], height_m=60.0, t=0.0)
    assert m is None and "of the view lies on the map" in why


def run_flight(cache, folder, **sim):
    from mean_nav.replay.flight import Flight

    flight = Flight(simulate(folder, duration_s=12.0, seed=5, **sim))
    loc = Localizer(ThumbnailEmbedder(), cache, flight.camera, LocalizerConfig())
    frames = list(flight.frames())
    estimates = [loc.process(f.image, f.telemetry, f.time_s) for f in frames]
    errors = []
    for e, f in zip(estimates, frames):
        tx, ty = cache.lonlat_to_xy(f.telemetry.lon, f.telemetry.lat)
        ex, ey = cache.lonlat_to_xy(e.lon, e.lat)
        errors.append(math.hypot(ex - tx, ey - ty))
    return estimates, np.array(errors)


@pytest.mark.parametrize("heading_error_deg", [30.0, 180.0])
def test_a_heading_error_is_recovered_reported_and_confirmed_before_fixes(cache, tmp_path, heading_error_deg):
    estimates, errors = run_flight(cache, tmp_path / "f", heading_error_deg=heading_error_deg)
    fixes = [i for i, e in enumerate(estimates) if e.fix == FixQuality.FIX]
    assert len(fixes) >= 0.4 * len(estimates)
    # one frame is no evidence for a large turn: a fix comes only after a second frame confirmed it
    waiting = [i for i, e in enumerate(estimates) if "heading error not yet confirmed" in e.reason]
    assert waiting and waiting[0] < fixes[0]
    assert len(fixes) >= 0.9 * (len(estimates) - fixes[0])     # then the track holds
    for i in fixes:
        e = estimates[i]
        assert errors[i] < 3 * e.sigma_h_m and errors[i] < 3.0, (i, errors[i], e.sigma_h_m)
        # reported as the telemetry's yaw error (telemetry minus truth), within a few degrees
        assert abs((e.heading_error_deg - heading_error_deg + 180) % 360 - 180) < 5.0, e.heading_error_deg
