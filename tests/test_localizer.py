"""The localizer on flights simulated over a real orthophoto, and on bad input."""
import math
import subprocess
import sys

import numpy as np
import pytest

from mean_nav.errors import MeanNavError
from mean_nav.nav.estimate import FixQuality
from mean_nav.nav.filter import RADIUS68_PER_SIGMA
from mean_nav.nav.localizer import Localizer, LocalizerConfig
from mean_nav.nav.telemetry import Telemetry
from nav_testing import SHARED_DATA, ThumbnailEmbedder, build_test_cache, require_shared_data, simulate

MANILA = SHARED_DATA / "orthophotos" / "5b90f92da0d7280005fab355_4310.tif"


@pytest.fixture(scope="module")
def cache(tmp_path_factory, nav_map):
    from mean_nav.geo.cache import TileCache

    return TileCache.load(build_test_cache(tmp_path_factory.mktemp("cache") / "nav_map", map_path=nav_map))


@pytest.fixture(scope="module")
def flight(tmp_path_factory, nav_map):
    from mean_nav.replay.flight import Flight

    return Flight(simulate(tmp_path_factory.mktemp("flight") / "f", map_path=nav_map, duration_s=10.0, seed=3))


def frames_of(flight, n=None):
    return [f for f in flight.frames(0, n)]


def run(localizer, frames):
    return [localizer.process(f.image, f.telemetry, f.time_s) for f in frames]


def errors_m(cache, estimates, frames):
    out = []
    for est, f in zip(estimates, frames):
        tx, ty = cache.lonlat_to_xy(f.telemetry.lon, f.telemetry.lat)
        ex, ey = cache.lonlat_to_xy(est.lon, est.lat)
        out.append(math.hypot(ex - tx, ey - ty))
    return np.array(out)


def test_simulated_flight_gives_metre_level_fixes_within_their_sigma(cache, flight):
    frames = frames_of(flight)
    loc = Localizer(ThumbnailEmbedder(), cache, flight.camera, LocalizerConfig())
    estimates = run(loc, frames)
    fixes = [(e, f) for e, f in zip(estimates, frames) if e.fix == FixQuality.FIX]
    assert len(fixes) >= 0.8 * len(frames)
    err = errors_m(cache, *zip(*fixes))
    sigma = np.array([e.sigma_h_m for e, _ in fixes])
    assert np.median(err) < 3.0
    assert np.all(err < 3 * sigma), (err, sigma)
    assert np.all(sigma < 10.0)
    first_verified = next(e for e in estimates if e.inliers > 0)
    assert first_verified.fix == FixQuality.NONE and "confirm" in first_verified.reason  # one match is not trusted
    last = fixes[-1][0]
    truth_speed = math.hypot(fixes[-1][1].telemetry.vn, fixes[-1][1].telemetry.ve)
    assert abs(math.hypot(last.vn, last.ve) - truth_speed) < 2.0
    assert all(math.isfinite(e.alt_m) and e.inliers >= 15 for e, _ in fixes)


def test_flight_over_an_unmapped_place_never_gives_a_fix(cache, tmp_path):
    require_shared_data()
    from mean_nav.replay.flight import Flight

    elsewhere = Flight(simulate(tmp_path / "manila", map_path=MANILA, duration_s=4.0, seed=1))
    loc = Localizer(ThumbnailEmbedder(), cache, elsewhere.camera, LocalizerConfig())
    estimates = run(loc, frames_of(elsewhere))
    assert estimates and all(e.fix == FixQuality.NONE for e in estimates)
    assert all(e.reason for e in estimates)


def test_bad_frames_and_telemetry_give_no_fix_with_a_reason_and_keep_the_track(cache, flight):
    frames = frames_of(flight, 8)
    loc = Localizer(ThumbnailEmbedder(), cache, flight.camera, LocalizerConfig(max_telemetry_age_s=0.2))
    run(loc, frames[:5])
    assert loc.filter.tracking
    f = frames[5]
    tel = f.telemetry
    black = np.zeros_like(f.image)
    stale = Telemetry(**{**tel.__dict__, "time_s": f.time_s - 1.0})
    no_attitude = Telemetry(**{**tel.__dict__, "roll": math.nan})
    too_low = Telemetry(**{**tel.__dict__, "rel_alt_m": 1.0, "range_m": math.nan})
    cases = [
        (black, tel, "black"), (None, tel, "no camera frame"), (f.image[:, :, 0], tel, "corrupt"),
        (f.image[::2, ::2], tel, "camera model"), (f.image, None, "no telemetry"),
        (f.image, stale, "stale telemetry"), (f.image, no_attitude, "attitude"), (f.image, too_low, "height"),
    ]
    for image, telemetry, words in cases:
        est = loc.process(image, telemetry, f.time_s)
        assert est.fix == FixQuality.COASTING, words     # the track survives, nothing is a fix
        assert words in est.reason
    assert loc.process(frames[6].image, frames[6].telemetry, frames[6].time_s).fix == FixQuality.FIX


def test_attitude_interpolation_error_widens_the_measurement_by_height_times_its_tangent(cache, flight):
    from dataclasses import replace

    frames = frames_of(flight, 4)
    first_update = []     # (R, height) the filter got for the first verified frame of each run
    for sigma in (0.0, math.radians(1.5)):     # (below max_attitude_interp_deg)
        # without the constant jitter floor, which combines with the interpolation error
        loc = Localizer(ThumbnailEmbedder(), cache, flight.camera, LocalizerConfig(attitude_jitter_deg=0.0))
        update = loc.filter.update
        seen = []
        loc.filter.update = lambda t, z, R, h, update=update, seen=seen, **kw: seen.append((R, h)) or update(t, z, R, h, **kw)
        for f in frames:
            loc.process(f.image, replace(f.telemetry, attitude_interp_sigma_rad=sigma), f.time_s)
        assert seen, "no frame reached the filter"
        first_update.append(seen[0])
    (plain, h), (widened, _) = first_update
    j = math.tan(math.radians(1.5)) ** 2
    if plain.shape == (2, 2):     # the nadir alone
        assert widened - plain == pytest.approx(h ** 2 * j * np.eye(2))
    else:
        # with the measured tilt (pose.py): a white tilt error w of this frame moves the
        # nadir by h x w and the tilt by w, perfectly correlated (the camera centre stays put)
        link = np.vstack([h * np.eye(2), np.eye(2)])
        assert widened - plain == pytest.approx(j * link @ link.T)


def test_a_frame_interpolated_across_a_large_attitude_step_gives_no_fix_and_keeps_the_track(cache, flight):
    from dataclasses import replace

    frames = frames_of(flight, 6)
    loc = Localizer(ThumbnailEmbedder(), cache, flight.camera, LocalizerConfig())
    estimates = run(loc, frames[:5])
    assert estimates[-1].fix == FixQuality.FIX
    limit = math.radians(loc.cfg.max_attitude_interp_deg)
    f = frames[5]
    est = loc.process(f.image, replace(f.telemetry, attitude_interp_sigma_rad=1.5 * limit), f.time_s)
    assert est.fix == FixQuality.COASTING and "max_attitude_interp_deg" in est.reason
    assert not est.has_fix and math.isfinite(est.lat) and loc.filter.tracking


def test_replay_is_deterministic(cache, flight):
    frames = frames_of(flight, 6)
    runs = []
    for _ in range(2):
        loc = Localizer(ThumbnailEmbedder(), cache, flight.camera, LocalizerConfig())
        runs.append([(e.fix, e.lat, e.lon, e.sigma_h_m, e.inliers) for e in run(loc, frames)])
    assert runs[0] == runs[1]


def test_a_model_that_does_not_match_the_cache_is_refused(cache, flight):
    class OtherModel(ThumbnailEmbedder):
        model_hash = "another-model"

    class OtherDim(ThumbnailEmbedder):
        dim = 128

    with pytest.raises(MeanNavError, match="hash"):
        Localizer(OtherModel(), cache, flight.camera)
    with pytest.raises(MeanNavError, match="descriptor size"):
        Localizer(OtherDim(), cache, flight.camera)
    meta = cache.meta
    cache.meta = {**meta, "maps": []}
    try:
        with pytest.raises(MeanNavError, match="no map pixels"):
            Localizer(ThumbnailEmbedder(), cache, flight.camera)
    finally:
        cache.meta = meta


def test_a_prior_far_off_widens_the_search_until_a_fix_and_says_so(cache, flight):
    frames = frames_of(flight)
    t0 = frames[0].telemetry
    far_away = (t0.lon + 0.05, t0.lat + 0.05)       # ~6 km from the map
    loc = Localizer(ThumbnailEmbedder(), cache, flight.camera, LocalizerConfig(), initial_lonlat=far_away)
    notices = []
    loc.on_notice = notices.append
    est = run(loc, frames)
    assert est[0].fix == FixQuality.NONE
    assert "no map tile" in est[0].reason and "initial position" in est[0].reason
    first = next(e for e in est if e.fix == FixQuality.FIX)   # the search widened to the whole map
    assert "prior disagrees" in first.reason
    assert len(notices) == 1 and "prior disagrees" in notices[0] and loc.notices == notices
    near = Localizer(ThumbnailEmbedder(), cache, flight.camera, LocalizerConfig(), initial_lonlat=(t0.lon, t0.lat))
    near_est = run(near, frames[:8])
    assert any(e.fix == FixQuality.FIX for e in near_est) and not near.notices
    # the correct prior gives the fix sooner than the wrong one
    assert near_est.index(next(e for e in near_est if e.fix == FixQuality.FIX)) < est.index(first)


def test_a_frame_spacing_the_settings_cannot_serve_is_reported(cache, flight):
    cfg = LocalizerConfig()
    cfg.filter.lost_after_s = 10.0
    loc = Localizer(ThumbnailEmbedder(), cache, flight.camera, cfg)
    assert loc.frame_spacing_problems(0.5) == []
    assert any("lost_after_s" in p for p in loc.frame_spacing_problems(8.0))
    notices = []
    loc.on_notice = notices.append
    f = frames_of(flight, 1)[0]
    for k in range(3):   # the same frame, 8 s apart: warned once, not per frame
        tel = Telemetry(**{**f.telemetry.__dict__, "time_s": f.time_s + 8.0 * k})
        loc.process(f.image, tel, f.time_s + 8.0 * k)
    assert len(notices) == 1 and "lost_after_s" in notices[0]


def test_runtime_modules_do_not_import_torch():
    code = ("import sys; import mean_nav.nav.localizer, mean_nav.nav.daemon, mean_nav.nav.mavlink_io, "
            "mean_nav.nav.camera, mean_nav.nav.refine, mean_nav.nav.filter, mean_nav.nav.calibrate; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_network_runs_when_lost_but_not_while_the_prediction_verifies(cache, flight):
    class CountingEmbedder(ThumbnailEmbedder):
        calls = 0

        def _embed_batch(self, batch):
            CountingEmbedder.calls += 1
            return super()._embed_batch(batch)

    frames = frames_of(flight, 14)
    loc = Localizer(CountingEmbedder(), cache, flight.camera, LocalizerConfig())
    k = 0
    while loc.process(frames[k].image, frames[k].telemetry, frames[k].time_s).fix != FixQuality.FIX:
        k += 1
    k += 1
    before = CountingEmbedder.calls
    assert before >= 2                          # start-up: global retrieval on every frame
    tracked = run(loc, frames[k:])
    assert len(tracked) >= 4 and all(e.fix == FixQuality.FIX for e in tracked)
    assert CountingEmbedder.calls - before < len(tracked)   # verified at the prediction instead
    always = Localizer(CountingEmbedder(), cache, flight.camera, LocalizerConfig(always_retrieve=True))
    start = CountingEmbedder.calls
    estimates = run(always, frames)
    # every frame embeds; frames that verify nothing may add a heading search (turned views)
    lost = sum(e.fix != FixQuality.FIX for e in estimates)
    assert len(frames) <= CountingEmbedder.calls - start <= len(frames) + 7 * lost


def test_the_view_is_cut_to_the_footprint_around_the_nadir():
    from mean_nav.nav.localizer import centre_crop, footprint_view

    view = np.arange(12 * 12 * 3, dtype=np.uint8).reshape(12, 12, 3)
    valid = np.zeros((12, 12), bool)
    valid[4:9, 3:7] = True          # the camera saw rows 4..8, cols 3..6 (centre at 5.5)
    # farthest seen pixel from the centre: col 3 (2.5 px) and row 8 (2.5 px): 6 px hold them
    image, seen = footprint_view(view, valid, min_px=4)
    assert seen.shape == (6, 6) and image.shape == (6, 6, 3)
    assert seen.sum() == valid.sum()                       # nothing the camera saw is cut off
    assert np.array_equal(image, view[3:9, 3:9])
    # never below the tile; a view the camera fills stays whole; parity stays the view's
    assert footprint_view(view, valid, min_px=8)[1].shape == (8, 8)
    assert footprint_view(view, np.ones((12, 12), bool), min_px=4)[1].shape == (12, 12)
    odd = np.zeros((12, 12), bool)
    odd[5, 5] = odd[8, 5] = True    # row 8: 2.5 px from the centre -> 6 px
    assert footprint_view(view, odd, min_px=2)[1].shape == (6, 6)
    assert footprint_view(view, np.zeros((12, 12), bool), min_px=4)[1].shape == (4, 4)
    assert np.array_equal(centre_crop(view, 4), view[4:8, 4:8])


def test_retrieval_embeds_the_tile_at_the_centre_of_a_wider_view(cache, flight):
    frames = frames_of(flight, 3)
    loc = Localizer(ThumbnailEmbedder(), cache, flight.camera, LocalizerConfig())
    assert loc.view_px == 2 * cache.tile_px
    sizes = []
    embed = loc.acquisition.embedder.embed
    loc.acquisition.embedder.embed = lambda images: sizes.extend(i.shape for i in images) or embed(images)
    verified = []
    verify = loc.verifier.verify
    loc.verifier.verify = lambda query, valid, *a, **k: verified.append(valid.shape) or verify(query, valid, *a, **k)
    run(loc, frames)
    assert sizes and all(s == (cache.tile_px, cache.tile_px, 3) for s in sizes)
    # the camera (60 m up, 70 deg wide) sees about 84 m x 63 m: more than a 60 m tile
    assert verified and all(cache.tile_px < v[0] <= 2 * cache.tile_px for v in verified)


def test_a_frame_confirmed_by_its_two_halves_is_a_fix_at_once(cache, flight):
    frames = frames_of(flight, 4)
    firsts = {}
    for halves_agree in (False, True):
        loc = Localizer(ThumbnailEmbedder(), cache, flight.camera, LocalizerConfig())
        loc.verifier._halves_agree = lambda *args, agree=halves_agree: agree
        firsts[halves_agree] = next(e for e in run(loc, frames) if e.inliers > 0)
    assert firsts[False].fix == FixQuality.NONE and "confirm" in firsts[False].reason
    assert firsts[True].fix == FixQuality.FIX and firsts[True].sigma_h_m < 10.0


def test_a_landing_keeps_fixing_below_the_feature_floor_down_to_the_visual_floor(cache, flight, nav_map):
    """A vertical descent from the flight's last position: feature matching stops around half a
    tile of footprint; area correlation at the prediction goes on until the footprint holds
    correlate.min_footprint_px map pixels, and below that the frame says it is too low."""
    from dataclasses import replace

    from mean_nav.geo.raster import read_metric_raster
    from mean_nav.nav.camera_model import render_view
    from mean_nav.replay.simulate import ground_image

    raster = read_metric_raster([nav_map], cache.gsd_m)
    ground, pad = ground_image(raster, 100.0, "mirror")
    shift = np.array([[1, 0, pad], [0, 1, pad], [0, 0, 1.0]])
    frames = frames_of(flight)
    last = frames[-1].telemetry
    x0, y0 = cache.lonlat_to_xy(last.lon, last.lat)
    # stop within a few seconds (tau 1.5 s), hover, then descend 2 m/s; frames at 2 Hz
    heights = np.concatenate([np.full(16, last.rel_alt_m), np.arange(last.rel_alt_m - 1, 2.5, -1.0)])
    tau, steps = 1.5, np.arange(1, len(heights) + 1) * 0.5

    def descend(cfg):
        loc = Localizer(ThumbnailEmbedder(), cache, flight.camera, cfg)
        run(loc, frames)
        assert loc.filter.tracking
        out = []
        for dt, h in zip(steps, heights):
            t = frames[-1].time_s + dt
            x = x0 + last.ve * tau * (1 - math.exp(-dt / tau))
            y = y0 + last.vn * tau * (1 - math.exp(-dt / tau))
            tel = replace(last, time_s=t, rel_alt_m=float(h), range_m=math.nan, roll=0.01, pitch=-0.01)
            image = render_view(ground, shift @ raster.map_from_ground(float(x), float(y)), flight.camera,
                                tel.roll, tel.pitch, tel.yaw, float(h))
            est = loc.process(image, tel, t)
            err = math.nan
            if est.fix == FixQuality.FIX:
                ex, ey = cache.lonlat_to_xy(est.lon, est.lat)
                err = math.hypot(ex - x, ey - y)
            out.append((h, est, err, loc.too_low))
        return loc, [o for o in out if o[0] <= 40]

    loc, out = descend(LocalizerConfig())
    # the floor: a nadir footprint of min_footprint_px map pixels (480 x 360 px, 70 deg lens, 0.25 m/px)
    fx = 240 / math.tan(math.radians(35))
    floor = max(loc.cfg.min_height_m, math.sqrt(loc.cfg.correlate.min_footprint_px * fx * fx / (480 * 360)) * cache.gsd_m)
    assert loc.visual_floor_m == pytest.approx(floor)
    assert 4.0 < floor < 8.0
    above = [(h, e, err) for h, e, err, low in out if h >= floor + 1.0]
    fixed = [(h, err) for h, e, err in above if e.fix == FixQuality.FIX]
    assert len(fixed) >= 0.9 * len(above), [(h, e.reason) for h, e, _ in above if e.fix != FixQuality.FIX]
    assert max(err for _, err in fixed) < 1.0
    assert min(h for h, _ in fixed) <= floor + 2.0
    below = [(e, low) for h, e, _, low in out if h < floor]
    assert below and all(low and e.fix != FixQuality.FIX for e, low in below)
    assert not any(low for h, _, _, low in out if h > floor + 0.5)
    # without correlation the same descent loses its fixes far higher up
    plain = LocalizerConfig()
    plain.correlate.enabled = False
    _, out_plain = descend(plain)
    assert not any(e.fix == FixQuality.FIX for h, e, _, _ in out_plain if h <= 20)


def test_without_a_track_more_retrieved_tiles_are_verified(cache, flight):
    loc = Localizer(ThumbnailEmbedder(), cache, flight.camera, LocalizerConfig(top_k=3, lost_top_k=7))
    view = cache.tile_image(len(cache) // 2)
    lost = list(loc.acquisition.candidates(view, 0.0, loc.filter))
    assert len(lost) == 7 and all(c.key is not None for c in lost)
    x, y = float(cache.x[len(cache) // 2]), float(cache.y[len(cache) // 2])
    loc.filter.update(0.0, [x, y], np.eye(2) * 0.25, 60.0, confirmed=True)
    tracking = list(loc.acquisition.candidates(view, 0.5, loc.filter))
    # the map at the prediction, then top_k retrieved tiles near the track
    assert len(tracking) == 1 + 3 and math.isnan(tracking[0].score)


def test_a_vague_track_still_verifies_the_map_at_its_prediction_first(cache, flight):
    # photos seconds apart: after 8 s the manoeuvre mode is tens of metres wide, and over a
    # small footprint retrieval rarely ranks the true tile among the few it returns
    loc = Localizer(ThumbnailEmbedder(), cache, flight.camera, LocalizerConfig(top_k=3))
    i = len(cache) // 2
    x, y = float(cache.x[i]), float(cache.y[i])
    for t in (0.0, 1.0, 2.0):
        loc.filter.update(t, [x, y], np.eye(2) * 0.25, 60.0, confirmed=True)
    t = 10.0
    (mean, cov), modes = loc.filter.position_at(t), loc.filter.mode_positions_at(t)
    assert RADIUS68_PER_SIGMA * math.sqrt(np.trace(cov) / 2) > loc.cfg.confident_sigma_m
    tight = min(zip(loc.filter.mode_radii_at(t), modes), key=lambda m: m[0])[1][0]
    first = next(iter(loc.acquisition.candidates(cache.tile_image(i), t, loc.filter)))
    assert math.isnan(first.score) and first.tile_id == cache.tile_at(*tight) == i
    # a track the filter cannot place within the confident radius in any mode: its mean
    loc.cfg.confident_sigma_m = 0.01
    first = next(iter(loc.acquisition.candidates(cache.tile_image(i), t, loc.filter)))
    assert math.isnan(first.score) and first.tile_id == cache.tile_at(*mean)
    loc.cfg.verify_prediction = False
    assert not math.isnan(next(iter(loc.acquisition.candidates(cache.tile_image(i), t, loc.filter))).score)


def test_warm_up_runs_the_frame_path_once_and_leaves_the_localizer_as_it_was(cache, flight):
    import mean_nav.nav.filter as filter_module

    batches = []

    class Counting(ThumbnailEmbedder):
        def _embed_batch(self, batch_uint8):
            batches.append(batch_uint8.shape)
            return super()._embed_batch(batch_uint8)

    frames = frames_of(flight, 4)
    cold = run(Localizer(ThumbnailEmbedder(), cache, flight.camera, LocalizerConfig()), frames)
    loc = Localizer(Counting(), cache, flight.camera, LocalizerConfig())
    filter_module._radius68_per_major = None
    assert loc.warm_up() > 0
    assert len(batches) == 1 and filter_module._radius68_per_major is not None
    assert not loc.filter.tracking and loc.acquisition.anchor_t is None and not loc.notices
    warm = run(loc, frames)
    assert [(e.fix, e.lat, e.lon, e.sigma_h_m) for e in warm] == [(e.fix, e.lat, e.lon, e.sigma_h_m) for e in cold]
    assert any(e.fix == FixQuality.FIX for e in warm)
