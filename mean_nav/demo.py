"""`mean-nav demo`: the whole system end to end on a fresh clone, in a few minutes on a CPU.

  1. map:    a procedural world GeoTIFF (mean_nav.data.world; no third-party data)
  2. model:  the small MEAN shipped in mean_nav/assets/ (EfficientNet-Lite0, trained on
             synthetic views of *other* procedural worlds by mean_nav/configs/demo_lite0.yaml,
             exported to ONNX); `--rebuild-model` retrains and re-exports it
  3. cache:  tile embeddings of the world (mean_nav.geo.cache.build_cache)
  4. flight: a simulated flight over the world (simulate-flight), one leg leaving the map
  5. replay: the onboard localizer on that flight, scored against the simulated GNSS

The numbers it prints are honest for what it is: a model trained on synthetic imagery,
flying over a synthetic world it has never seen, with simulated camera and telemetry.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import MeanNavError

log = logging.getLogger(__name__)

PACKAGE = Path(__file__).resolve().parent
ASSET = PACKAGE / "assets" / "demo_lite0.onnx"
TRAIN_CONFIG = PACKAGE / "configs" / "demo_lite0.yaml"
MAX_ASSET_BYTES = 10 * 1024 * 1024


@dataclass
class DemoConfig:
    world_seed: int = 2024          # the demo model never trained on this world
    world_px: int = 1200            # 300 m x 300 m at 0.25 m/px
    world_gsd_m: float = 0.25
    cache_gsd_m: float = 0.25       # tiles: 60 m at 0.25 m/px, 20 m stride
    tile_size_m: float = 60.0
    stride_m: float = 20.0
    altitude_m: float = 60.0
    speed_ms: float = 10.0
    fps: float = 1.0
    duration_s: float | None = None  # None: one lap of the planned route
    leave_map_m: float = 120.0
    camera_px: tuple[int, int] = (640, 480)
    hfov_deg: float = 70.0
    flight_seed: int = 7
    threads: int = 2


def ensure_model(model: Path | None) -> Path:
    path = Path(model) if model else ASSET
    if not path.is_file():
        raise MeanNavError(f"{path}: demo model not found; run `mean-nav demo --rebuild-model` to train and "
                           "export it (about 10 minutes on 2 CPU cores)")
    return path


def rebuild_model(work: Path, threads: int = 2) -> Path:
    """Train the demo MEAN with mean_nav/configs/demo_lite0.yaml and export it to the asset."""
    if not TRAIN_CONFIG.is_file():
        raise MeanNavError(f"{TRAIN_CONFIG}: demo training config not found; the package is incomplete")
    run_dir = work / "demo_lite0"
    cli = [sys.executable, "-m", "mean_nav.cli"]
    steps = [
        cli + ["train", "--config", str(TRAIN_CONFIG), "--out-dir", str(run_dir)],
        cli + ["export", str(run_dir / "model.pt"), "-o", str(run_dir / "model.onnx"), "--threads", str(threads)],
    ]
    for cmd in steps:
        print("+", " ".join(cmd), flush=True)
        if subprocess.call(cmd) != 0:
            raise MeanNavError(f"demo --rebuild-model: `{' '.join(cmd[2:4])}` failed; see its output above")
    onnx_path = shrink_for_asset(run_dir / "model.onnx")
    ASSET.parent.mkdir(parents=True, exist_ok=True)
    tmp = ASSET.with_suffix(".onnx.tmp")
    shutil.copyfile(onnx_path, tmp)
    tmp.replace(ASSET)
    print(f"demo model: {ASSET} ({ASSET.stat().st_size / 2**20:.1f} MiB)")
    return ASSET


def shrink_for_asset(onnx_path: Path) -> Path:
    """The exported model if it fits the 10 MiB asset budget, else its FP16 variant
    (`mean-nav quantize --variants fp16`: float16 weights, float32 inputs and outputs)."""
    if onnx_path.stat().st_size <= MAX_ASSET_BYTES:
        return onnx_path
    cmd = [sys.executable, "-m", "mean_nav.cli", "quantize", str(onnx_path), "--variants", "fp16",
           "-o", str(onnx_path.parent)]
    print("+", " ".join(cmd), flush=True)
    fp16_path = onnx_path.with_name(onnx_path.stem + ".fp16.onnx")
    if subprocess.call(cmd) != 0 or not fp16_path.is_file():
        raise MeanNavError(f"{onnx_path}: too big for the asset ({onnx_path.stat().st_size / 2**20:.1f} MiB) "
                           "and the FP16 conversion failed")
    if fp16_path.stat().st_size > MAX_ASSET_BYTES:
        raise MeanNavError(f"{fp16_path}: still over 10 MiB; use a smaller model config")
    return fp16_path


def world_and_cache(out: Path, cfg: DemoConfig, model: Path, progress: bool = True, timings: dict | None = None):
    """Steps 1-3: the procedural world GeoTIFF and its tile cache under `out` (reused when
    intact). Returns (world path, (embedder, cache))."""
    from .data.world import generate_world
    from .deploy.backends import load_embedder
    from .geo.cache import TileCache, build_cache

    timings = {} if timings is None else timings
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    world = out / f"world_{cfg.world_seed}.tif"
    if not world.is_file():
        print(f"[1/5] map: procedural world, seed {cfg.world_seed}, {cfg.world_px * cfg.world_gsd_m:.0f} m square",
              flush=True)
        generate_world(world, seed=cfg.world_seed, size_px=cfg.world_px, gsd_m=cfg.world_gsd_m)
    timings["world_s"] = time.perf_counter() - started

    print(f"[2/5] model: {model}", flush=True)
    embedder = load_embedder(model, threads=cfg.threads)

    t = time.perf_counter()
    cache_dir = out / "cache"
    cache = _reusable_cache(cache_dir, embedder.model_hash)
    if cache is None:
        print(f"[3/5] cache: {cfg.tile_size_m:g} m tiles every {cfg.stride_m:g} m", flush=True)
        if cache_dir.exists():
            shutil.rmtree(cache_dir)
        build_cache([world], cache_dir, embedder, gsd_m=cfg.cache_gsd_m, tile_size_m=cfg.tile_size_m,
                    stride_m=cfg.stride_m, progress=progress)
        cache = TileCache.load(cache_dir, expect_model_hash=embedder.model_hash)
    else:
        print(f"[3/5] cache: reusing {cache_dir}", flush=True)
    timings["cache_s"] = time.perf_counter() - t
    return world, (embedder, cache)


def run_demo(out: Path, cfg: DemoConfig, model: Path | None = None, progress: bool = True) -> dict:
    """Steps 1-5; returns the replay summary. Everything is written under `out`."""
    from .nav.localizer import Localizer
    from .replay.flight import Flight
    from .replay.report import write_json
    from .replay.runner import MapCoverage, initial_prior, print_summary, replay
    from .replay.simulate import SimulationConfig, simulate_flight

    model = ensure_model(model)
    timings = {}
    started = time.perf_counter()
    world, (embedder, cache) = world_and_cache(out, cfg, model, progress, timings)

    t = time.perf_counter()
    flight_dir = out / "flight"
    if flight_dir.exists():
        shutil.rmtree(flight_dir)
    print(f"[4/5] flight: simulated at {cfg.altitude_m:g} m, {cfg.speed_ms:g} m/s, {cfg.fps:g} fps, "
          f"one leg {cfg.leave_map_m:g} m beyond the map", flush=True)
    sim = SimulationConfig(altitude_m=cfg.altitude_m, speed_ms=cfg.speed_ms, fps=cfg.fps, duration_s=cfg.duration_s,
                           leave_map_m=cfg.leave_map_m, seed=cfg.flight_seed, width=cfg.camera_px[0],
                           height=cfg.camera_px[1], hfov_deg=cfg.hfov_deg, map_gsd_m=cfg.world_gsd_m)
    simulate_flight([world], flight_dir, sim, progress=progress)
    timings["simulate_s"] = time.perf_counter() - t

    t = time.perf_counter()
    flight = Flight(flight_dir)
    print(f"[5/5] replay: {len(flight)} frames through the localizer", flush=True)
    localizer = Localizer(embedder, cache, flight.camera, initial_lonlat=initial_prior(flight))
    report_dir = out / "report"
    summary = replay(flight, localizer, report_dir, MapCoverage([world]), tlog=True, progress=progress,
                     extra_summary={"demo": True, "model": str(model),
                                    "note": "demo model trained on synthetic imagery; flight simulated over an "
                                            "unseen procedural world"})
    timings["replay_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - started
    summary["timings_s"] = timings
    write_json(report_dir / "summary.json", summary)
    print()
    print_summary(summary, report_dir)
    print(f"demo finished in {timings['total_s']:.0f} s (world {timings['world_s']:.0f} s, cache "
          f"{timings['cache_s']:.0f} s, flight {timings['simulate_s']:.0f} s, replay {timings['replay_s']:.0f} s)")
    return summary


def _reusable_cache(cache_dir: Path, model_hash: str):
    """The cache from an earlier demo run if it is intact and built with this model, else None."""
    from .geo.cache import TileCache

    if not (cache_dir / "meta.json").is_file():
        return None
    try:
        return TileCache.load(cache_dir, expect_model_hash=model_hash)
    except MeanNavError as exc:
        log.info("rebuilding the demo cache: %s", exc)
        return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--out", type=Path, default=Path("runs/demo"), help="work folder (default runs/demo)")
    parser.add_argument("--model", type=Path, default=None, help=f"ONNX model (default: {ASSET.name} in the package)")
    parser.add_argument("--rebuild-model", action="store_true",
                        help="train the demo model with mean_nav/configs/demo_lite0.yaml, export it to "
                             "mean_nav/assets/, then run the demo")
    parser.add_argument("--duration", type=float, default=None, help="flight seconds (default: one lap)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sitl", action="store_true",
                        help="fly GNSS-free on ArduCopter SITL (../shared/sitl) instead of replaying: take off on "
                             "GNSS, switch the EKF to mean-nav, fly a 626 m route, land; report in OUT/sitl/")
    parser.add_argument("--faults", default="", metavar="camera,edge",
                        help="with --sitl: camera = lose the camera for 10 s mid-route; edge = fly a leg 80 m "
                             "beyond the map edge and back after the route")


def run(args) -> int:
    if args.sitl:
        from . import demo_sitl
        return demo_sitl.run(args)
    cfg = DemoConfig(duration_s=args.duration, threads=args.threads)
    model = args.model
    if args.rebuild_model:
        model = rebuild_model(args.out, args.threads)
    run_demo(args.out, cfg, model)
    return 0
