"""Verification alone: partial overlap with the map, views wider than a tile, weak fits the
track vouches for, and heading errors up to 180 deg."""
import math

import numpy as np
import pytest

from mean_nav.nav.acquisition import Candidate
from mean_nav.nav.estimate import FixQuality
from mean_nav.nav.localizer import Localizer, LocalizerConfig
from mean_nav.nav.refine import MatchResult
from mean_nav.nav.verify import Verifier
from nav_testing import ThumbnailEmbedder, build_test_cache, require_shared_data, simulate


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    require_shared_data()
    from mean_nav.geo.cache import TileCache

    return TileCache.load(build_test_cache(tmp_path_factory.mktemp("cache") / "gorinchem"))


@pytest.fixture(scope="module")
def nav_cache(tmp_path_factory, nav_map):
    """The tile cache over the navigation map (the orthophoto, or a generated world)."""
    from mean_nav.geo.cache import TileCache

    return TileCache.load(build_test_cache(tmp_path_factory.mktemp("nav_cache") / "nav_map", map_path=nav_map))


def west_edge_view(cache, outside_m, size_m=None):
    """A north-up view `size_m` wide (default a tile) centred `outside_m` west of the map's
    west edge (its left part is no map)."""
    cx, cy = float(np.mean(cache.x)), float(np.mean(cache.y))
    wide = cache.region(cx, cy, 400.0)
    row = wide.valid[wide.valid.shape[0] // 2]
    edge_col = int(np.argmax(row))                      # first map pixel from the west
    edge_x, _ = wide.transform @ (edge_col, 0)
    qx = edge_x - outside_m
    view = cache.region(qx, cy, size_m or cache.tile_size_m)
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
    # the frame that confirms the heading error is a fix: the two turned frames are the two
    # agreeing start-up fixes of the track
    assert fixes[0] == waiting[-1] + 1
    assert len(fixes) >= 0.9 * (len(estimates) - fixes[0])     # then the track holds
    for i in fixes:
        e = estimates[i]
        assert errors[i] < 3 * e.sigma_h_m and errors[i] < 3.0, (i, errors[i], e.sigma_h_m)
        # reported as the telemetry's yaw error (telemetry minus truth), within a few degrees
        assert abs((e.heading_error_deg - heading_error_deg + 180) % 360 - 180) < 5.0, e.heading_error_deg


def test_a_view_wider_than_a_tile_is_matched_against_a_region_that_holds_it(nav_cache):
    """Nadir 30 m west of the map: a tile-wide (60 m) view sees next to no map, a 120 m view
    sees 30 m of it, and the region it is matched against grows with it."""
    tile_img, tile_valid, qx, qy = west_edge_view(nav_cache, 30.0)
    assert tile_valid.mean() < 0.02
    image, valid, _, _ = west_edge_view(nav_cache, 30.0, 2 * nav_cache.tile_size_m)
    assert image.shape[0] == 2 * nav_cache.tile_px and 0.2 < valid.mean() < 0.3
    verifier = Verifier(LocalizerConfig(), nav_cache)
    m, why = verifier.verify(tile_img, tile_valid, [nearest_tile(nav_cache, qx, qy)], height_m=60.0, t=0.0)
    assert m is None
    m, why = verifier.verify(image, valid, [nearest_tile(nav_cache, qx, qy)], height_m=60.0, t=0.0)
    assert m is not None, why
    assert math.hypot(m.x - qx, m.y - qy) < 0.5


class CannedMatcher:
    """The real extractor with fits the test makes up: what verification decides from a fit."""

    def __init__(self, real, result: MatchResult):
        self.real, self.result, self.asked = real, result, []

    def features(self, *args):
        return self.real.features(*args)

    def match(self, query, region, centre, prior_deg=0.0, min_inliers=None):
        self.asked.append(min_inliers)
        if min_inliers is not None and self.result.inliers < min_inliers:
            return MatchResult(False, f"too few inliers ({self.result.inliers} of {self.result.matches})",
                               inliers=self.result.inliers, matches=self.result.matches)
        return self.result


def canned_fit(inliers, rotation_deg=0.0, region_px=480, view_px=240):
    """A fit taking the view's centre to the region's centre, turned by rotation_deg."""
    r = math.radians(rotation_deg)
    a, b = math.cos(r), math.sin(r)
    c_view, c_region = view_px / 2 - 0.5, region_px / 2 - 0.5
    tx, ty = c_region - (a * c_view - b * c_view), c_region - (b * c_view + a * c_view)
    ok = abs(rotation_deg) <= 12.0
    return MatchResult(ok, "" if ok else f"implausible fit (scale 1.00, rotation {rotation_deg:.0f} deg)",
                       inliers, 3 * inliers, (c_region, c_region), np.eye(2) * 0.25, rotation_deg, 1.0, 0.5,
                       np.array([a, b, tx, ty]), rotation_only=not ok)


def centre_view(cache):
    cx, cy = float(np.median(cache.x)), float(np.median(cache.y))
    view = cache.region(cx, cy, cache.tile_size_m)
    return view.image, view.valid, nearest_tile(cache, cx, cy)


def test_a_weak_fit_counts_only_where_the_track_predicts_it(nav_cache):
    image, valid, cand = centre_view(nav_cache)
    cfg = LocalizerConfig()
    assert cfg.track_min_inliers < 12 < cfg.min_inliers
    verifier = Verifier(cfg, nav_cache)
    verifier.matcher = CannedMatcher(verifier.matcher, canned_fit(12))
    m, why = verifier.verify(image, valid, [cand], height_m=60.0, t=0.0)
    assert m is None and "too few inliers (12" in why                      # no track: 15 needed
    m, why = verifier.verify(image, valid, [cand], 60.0, 1.0, agrees=lambda m: False)
    assert m is None and "the track does not predict" in why
    m, why = verifier.verify(image, valid, [cand], 60.0, 2.0, agrees=lambda m: True)
    assert m is not None and m.inliers == 12, why
    assert math.hypot(m.x - cand.x, m.y - cand.y) < nav_cache.gsd_m
    assert verifier.matcher.asked == [cfg.min_inliers, cfg.track_min_inliers, cfg.track_min_inliers]


def test_a_confident_track_holds_the_heading_against_a_turned_copy(nav_cache):
    """Two frames of a strong fit turned 180 deg: without a track the second confirms the new
    heading error; a confident track keeps its own and proposes nothing."""
    image, valid, cand = centre_view(nav_cache)
    for track in (False, True):
        verifier = Verifier(LocalizerConfig(), nav_cache)
        verifier.matcher = CannedMatcher(verifier.matcher, canned_fit(60, rotation_deg=180.0))
        agrees = (lambda m: True) if track else None
        first, why0 = verifier.verify(image, valid, [cand], 55.0, 0.0, agrees=agrees)
        second, why1 = verifier.verify(image, valid, [cand], 60.0, 1.0, agrees=agrees)
        assert first is None
        if track:
            assert second is None and "the track holds the heading error of 0 deg" in why1
            assert verifier.heading.offset_deg == 0.0
        else:
            assert "not yet confirmed" in why0
            assert second is not None, why1
            assert abs(abs(second.heading_error_deg) - 180.0) < 1.0
            assert math.hypot(second.x - cand.x, second.y - cand.y) < nav_cache.gsd_m
            # it carries the first frame's fit: the pair can start a track
            t0, h0, m0 = second.earlier
            assert (t0, h0) == (0.0, 55.0) and m0.inliers == 60


def test_a_first_fix_whose_two_halves_verify_apart_at_the_same_place_stands_alone(nav_cache):
    """An exact map view: its two halves verify on their own and agree. With a confident track
    nothing is checked (the track needs no confirmation)."""
    image, valid, cand = centre_view(nav_cache)
    verifier = Verifier(LocalizerConfig(), nav_cache)
    m, why = verifier.verify(image, valid, [cand], 60.0, 0.0)
    assert m is not None and m.two_views, why
    m, _ = verifier.verify(image, valid, [cand], 60.0, 1.0, agrees=lambda m: True)
    assert m is not None and not m.two_views
    m, _ = Verifier(LocalizerConfig(confirm_in_one_frame=False), nav_cache).verify(image, valid, [cand], 60.0, 0.0)
    assert m is not None and not m.two_views


class SequenceMatcher(CannedMatcher):
    """Gives its fits in order: the whole view's, then each half's."""

    def __init__(self, real, results):
        super().__init__(real, results[0])
        self.results = list(results)

    def match(self, query, region, centre, prior_deg=0.0, min_inliers=None):
        self.asked.append(len(query))
        return self.results.pop(0)


@pytest.mark.parametrize("shift_px, second_ok, two_views", [(1.0, True, True), (12.0, True, False),
                                                             (0.0, False, False)])
def test_two_halves_confirm_only_when_both_verify_and_agree(nav_cache, shift_px, second_ok, two_views):
    image, valid, cand = centre_view(nav_cache)
    whole, half = canned_fit(80), canned_fit(40)
    other = canned_fit(40)
    other.nadir_px = (half.nadir_px[0] + shift_px, half.nadir_px[1])
    other.ok = second_ok
    verifier = Verifier(LocalizerConfig(), nav_cache)
    verifier.matcher = SequenceMatcher(verifier.matcher, [whole, half, other])
    m, why = verifier.verify(image, valid, [cand], 60.0, 0.0)
    assert m is not None, why
    assert m.two_views is two_views
    n_whole, n_a, n_b = verifier.matcher.asked
    assert n_a + n_b == n_whole and abs(n_a - n_b) <= 1       # split at the median


def spy_on_views(verifier):
    """Record the side (px) of every view the verifier extracts query features from."""
    sides, real = [], verifier.query_features

    def query_features(query, valid, turn_deg):
        sides.append(valid.shape[0])
        return real(query, valid, turn_deg)

    verifier.query_features = query_features
    return sides


def seen_square(n: int, tile: int, side_tiles: float = 1.4) -> np.ndarray:
    """What a camera ~60 m up sees of an n-px view: a centred square 1.4 tiles wide."""
    half = int(round(side_tiles * tile / 2))
    seen = np.zeros((n, n), bool)
    seen[n // 2 - half:n // 2 + half, n // 2 - half:n // 2 + half] = True
    return seen


def test_the_centre_tile_is_verified_first_and_the_footprint_only_where_it_verified_nothing(nav_cache):
    """A 2-tile view on the map verifies on its centre tile alone (the footprint's features are
    never computed); against a candidate 80 m off, whose region (the tile plus half a tile each
    side) holds 10 m of the centre tile, the same candidate is retried with the whole footprint,
    whose wider region holds 70 m of it."""
    qx, qy = float(np.mean(nav_cache.x)), float(np.mean(nav_cache.y))
    view = nav_cache.region(qx, qy, 2 * nav_cache.tile_size_m)
    assert view.valid.all() and view.image.shape[0] == 2 * nav_cache.tile_px
    tile = nav_cache.tile_px
    seen = seen_square(view.image.shape[0], tile)
    verifier = Verifier(LocalizerConfig(), nav_cache)
    sides = spy_on_views(verifier)
    m, why = verifier.verify(view.image, seen, [nearest_tile(nav_cache, qx, qy)], height_m=60.0, t=0.0)
    assert m is not None, why
    assert math.hypot(m.x - qx, m.y - qy) < 0.5
    assert sides == [tile]

    off = Candidate(qx + 80.0, qy, -1, 1.0, None)
    sides.clear()
    m, why = verifier.verify(view.image, seen, [off], height_m=60.0, t=1.0)
    assert m is not None, why
    assert math.hypot(m.x - qx, m.y - qy) < 0.5
    assert sides == [tile, 2 * tile]

    # higher up the camera sees the whole 2-tile view (4 tile areas): the footprint at once,
    # as the pose fit on the centre tile alone would pin the tilt several times worse
    sides.clear()
    m, why = verifier.verify(view.image, view.valid, [nearest_tile(nav_cache, qx, qy)], height_m=150.0, t=2.0)
    assert m is not None and sides == [2 * tile], why

    wide_only = Verifier(LocalizerConfig(centre_first=False), nav_cache)
    sides = spy_on_views(wide_only)
    m, why = wide_only.verify(view.image, view.valid, [nearest_tile(nav_cache, qx, qy)], height_m=60.0, t=0.0)
    assert m is not None and sides == [2 * tile]


def test_a_footprint_whose_centre_tile_the_camera_barely_saw_goes_straight_to_the_footprint(nav_cache):
    image, valid, qx, qy = west_edge_view(nav_cache, 30.0, 2 * nav_cache.tile_size_m)
    verifier = Verifier(LocalizerConfig(), nav_cache)
    sides = spy_on_views(verifier)
    m, why = verifier.verify(image, valid, [nearest_tile(nav_cache, qx, qy)], height_m=60.0, t=0.0)
    assert m is not None, why
    assert sides == [2 * nav_cache.tile_px]


@pytest.mark.parametrize("stop_at_inliers, sides", [(40, 1), (10 ** 6, 2)])
def test_a_strong_centre_fit_over_a_map_edge_stands_and_a_weaker_one_gets_the_footprint(nav_cache, stop_at_inliers,
                                                                                         sides):
    """Nadir 20 m inside the map's west edge, the camera seeing ground beyond it: 10 m of the
    60 m centre tile (1/6) lies off the map. A fit with stop_at_inliers stands on the tile; one
    short of it is retried on the whole footprint."""
    image, valid, qx, qy = west_edge_view(nav_cache, -20.0, 2 * nav_cache.tile_size_m)
    seen = seen_square(valid.shape[0], nav_cache.tile_px)
    verifier = Verifier(LocalizerConfig(stop_at_inliers=stop_at_inliers), nav_cache)
    extracted = spy_on_views(verifier)
    m, why = verifier.verify(image, seen, [nearest_tile(nav_cache, qx, qy)], height_m=60.0, t=0.0)
    assert m is not None, why
    assert math.hypot(m.x - qx, m.y - qy) < 0.5
    assert extracted == [nav_cache.tile_px, 2 * nav_cache.tile_px][:sides]
    if sides == 1:
        assert 0.75 <= m.map_overlap < 0.95 and m.inliers >= stop_at_inliers


class _StarvedMap:
    """A map-feature source that keeps only a few keypoints per region: grass or water, where
    the stored 0.04 features leave too few to match."""

    def __init__(self, source, keep=6):
        self.source, self.keep = source, keep

    def region(self, c0, r0, width, height):
        feats, on_map = self.source.region(c0, r0, width, height)
        few = np.zeros(len(feats), bool)
        few[:self.keep] = True
        return feats.subset(few), on_map


def test_near_a_confident_track_a_region_with_too_few_map_keypoints_is_detected_again_at_low_contrast(nav_cache):
    image, valid, cand = centre_view(nav_cache)
    verifier = Verifier(LocalizerConfig(), nav_cache)
    verifier.map_features = _StarvedMap(verifier.map_features)
    m, why = verifier.verify(image, valid, [cand], height_m=60.0, t=0.0)
    assert m is None and "too few" in why                # no track: no second detection
    m, why = verifier.verify(image, valid, [cand], 60.0, 1.0, agrees=lambda m: True)
    assert m is not None, why                              # the region again at 0.02
    assert math.hypot(m.x - cand.x, m.y - cand.y) < nav_cache.gsd_m
    assert m.inliers >= LocalizerConfig().min_inliers
    from mean_nav.nav.refine import RefineConfig
    off = Verifier(LocalizerConfig(refine=RefineConfig(map_low_contrast_retry=False)), nav_cache)
    off.map_features = _StarvedMap(off.map_features)
    m, why = off.verify(image, valid, [cand], 60.0, 2.0, agrees=lambda m: True)
    assert m is None and "too few" in why and off.low_contrast_map is None


def test_the_low_contrast_map_source_is_sift_at_the_query_threshold():
    from mean_nav.geo.map_features import low_contrast_source, window_extractor
    from mean_nav.nav.refine import RefineConfig

    class _Cache:
        from mean_nav.geo.tiles import TileGrid
        grid = TileGrid.from_metres("EPSG:32631", 0.25, 60.0, 20.0)
        mosaic = None

    assert low_contrast_source(_Cache, RefineConfig(detector="orb")) is None
    low = low_contrast_source(_Cache, RefineConfig(query_contrast_threshold=0.015))
    assert low.settings["contrast_threshold"] == 0.015 and low.extractor.cfg.contrast_threshold == 0.015
    # the stored features' extractor keeps OpenCV's 0.04
    from mean_nav.geo.map_features import store_settings
    stored = store_settings(RefineConfig(), _Cache.grid)
    assert window_extractor(RefineConfig(), stored).cfg.contrast_threshold == 0.04


def test_once_the_heading_error_is_known_frames_are_rectified_with_the_corrected_yaw(cache, tmp_path, monkeypatch):
    """Matching a view turned 30 deg against the map's pixel grid cost accuracy (field suite:
    median 0.17 against 0.12-0.14 m at 0 / 90 / 180 deg): after the heading error is confirmed
    the frame is rectified with the yaw corrected by it, and the error is still reported as the
    telemetry's own."""
    import mean_nav.nav.localizer as localizer_module
    from mean_nav.nav.verify import HeadingTracker

    used = []
    real = localizer_module.rectify_to_nadir

    def spy(frame, camera, roll, pitch, yaw, *args, **kwargs):
        used.append(yaw)
        return real(frame, camera, roll, pitch, yaw, *args, **kwargs)

    monkeypatch.setattr(localizer_module, "rectify_to_nadir", spy)
    estimates, errors = run_flight(cache, tmp_path / "f", heading_error_deg=30.0)
    fixes = [i for i, e in enumerate(estimates) if e.fix == FixQuality.FIX]
    assert len(used) == len(estimates) and len(fixes) >= 0.4 * len(estimates)
    from mean_nav.replay.flight import Flight
    telemetry_yaw = [f.telemetry.yaw for f in Flight(tmp_path / "f").frames()]
    turn = [math.degrees((u - y + math.pi) % (2 * math.pi) - math.pi) for u, y in zip(used, telemetry_yaw)]
    assert abs(turn[0]) < 1e-9                       # nothing known yet: the telemetry's yaw
    after = turn[fixes[0] + 1:]
    assert after and all(abs(a + 30.0) < 5.0 for a in after), after
    assert all(abs(estimates[i].heading_error_deg - 30.0) < 5.0 for i in fixes)

    # inside a turned view the tracker's offset and proposals are relative to it, and restored after
    tracker = HeadingTracker(LocalizerConfig())
    tracker.offset_deg = -30.0
    tracker.propose(-100.0, 0.0, 0.0, 0.0)
    with tracker.in_turned_view(-30.0):
        assert tracker.offset_deg == 0.0 and tracker.pending_deg(1.0) == pytest.approx(-70.0)
        tracker.follow(2.0)                           # a fit turned 2 deg in the corrected view
    assert tracker.offset_deg == pytest.approx(-29.4) and tracker.pending_deg(1.0) == pytest.approx(-100.0)
