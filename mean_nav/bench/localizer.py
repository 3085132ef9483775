"""`mean-nav bench localizer FLIGHT --model M --cache C`: where a frame's time goes.

Two localizers run the same flight frame by frame, interleaved so both see the same
machine load: one reads the map features the cache stores, the other computes them in
flight from the cache's map pixels (what a cache without stored features does). For each
it prints the per-stage times (rectify, embed, query features, map features, match,
filter; p50 / p95 over the frames that ran the stage) and capture-to-send (frame in ->
Estimate out: what the autopilot waits for) p50 / p95 / max, and the ratio between them.
Beside wall time it gives the CPU time this process spent per frame: on a machine other
jobs load, that is the closer estimate of the time an idle flight computer would take.

`--compare YAML[@CACHE]` (repeatable) adds a localizer per configuration (stored map features,
of CACHE or --cache), run in the same interleaving: methods side by side in one run, e.g.
SIFT against XFeat + LighterGlue, each with its own cache's features.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

STAGES = ("rectify", "embed", "query features", "map features", "match", "filter")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("flight", type=Path, help="flight folder (camera.yaml, frames, telemetry)")
    parser.add_argument("--model", type=Path, required=True, help="embedder: .onnx, .engine or checkpoint")
    parser.add_argument("--cache", type=Path, required=True, help="tile cache folder built with the same model")
    parser.add_argument("--config", type=Path, default=None, help="localizer YAML (LocalizerConfig)")
    parser.add_argument("--backend", default="auto", help="embedder backend: auto, onnxruntime, tensorrt, torch")
    parser.add_argument("--threads", type=int, default=2, help="inference threads")
    parser.add_argument("--frames", type=str, default=None, metavar="START:STOP", help="only these frame rows")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers as JSON here")
    parser.add_argument("--compare", action="append", default=[], metavar="YAML[@CACHE]",
                        help="another localizer config (and its cache, default --cache) run side by side with "
                             "stored map features; repeatable")


def run(args) -> int:
    from ..config import load_config
    from ..deploy.backends import load_embedder
    from ..errors import MeanNavError
    from ..geo.cache import TileCache
    from ..geo.map_features import InFlightMapFeatures, StoredMapFeatures, store_settings
    from ..nav.localizer import Localizer, LocalizerConfig
    from ..replay.flight import Flight
    from ..replay.runner import initial_prior, parse_frames, without_gnss

    from tqdm import tqdm

    flight = Flight(args.flight)
    from ..nav.features.xfeat import models_relative_to

    cfg = models_relative_to(load_config(args.config, LocalizerConfig), args.config.parent) if args.config \
        else LocalizerConfig()
    embedder = load_embedder(args.model, backend=args.backend, threads=args.threads, spin=False)
    prior = initial_prior(flight)
    stored = Localizer(embedder, TileCache.load(args.cache), flight.camera, cfg, initial_lonlat=prior)
    if not isinstance(stored.verifier.map_features, StoredMapFeatures):
        raise MeanNavError(f"{args.cache}: the cache stores no {cfg.refine.detector} map features, so there is "
                           "nothing to compare; rebuild it with `mean-nav cache build --features "
                           f"{cfg.refine.detector}`")
    in_flight = Localizer(embedder, TileCache.load(args.cache, verify=False), flight.camera, cfg,
                          initial_lonlat=prior)
    cache = in_flight.cache
    in_flight.verifier.map_features = InFlightMapFeatures(cache.mosaic, cfg.refine, store_settings(cfg.refine, cache.grid),
                                                          cfg.feature_cache_tiles)
    runs = {"stored map features": stored, "map features in flight": in_flight}
    for spec in args.compare:
        path, _, other = spec.partition("@")
        other_cfg = models_relative_to(load_config(Path(path), LocalizerConfig), Path(path).parent)
        loc = Localizer(embedder, TileCache.load(Path(other) if other else args.cache), flight.camera, other_cfg,
                        initial_lonlat=prior)
        if not isinstance(loc.verifier.map_features, StoredMapFeatures):
            raise MeanNavError(f"--compare {spec}: the cache stores no {other_cfg.refine.detector} map features; "
                               f"rebuild it with `mean-nav cache build --features {other_cfg.refine.detector}`")
        runs[f"{Path(path).stem} (stored)"] = loc
    records = {name: [] for name in runs}
    start, stop = parse_frames(args.frames, len(flight))
    n = (stop if stop is not None else len(flight)) - start
    for frame in tqdm(flight.frames(start, stop), total=n, desc="bench localizer", unit="frame"):
        telemetry = without_gnss(frame.telemetry)
        for name, loc in runs.items():
            cpu = time.process_time()
            est = loc.process(frame.image, telemetry, frame.time_s)
            records[name].append({"latency_s": est.latency_s, "cpu_s": time.process_time() - cpu,
                                  "fix": bool(est.has_fix), **loc.stages.seconds})
    embedder.close()
    results = {name: summarise(rows) for name, rows in records.items()}
    print_table(results, args.flight, cfg.refine.detector, describe(runs))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


def summarise(rows: list[dict]) -> dict:
    out = {"frames": len(rows), "fixes": int(sum(r["fix"] for r in rows)), "stages_ms": {}}
    for key, column in (("capture_to_send_ms", "latency_s"), ("cpu_per_frame_ms", "cpu_s")):
        t = np.array([r[column] for r in rows], np.float64) * 1e3
        out[key] = {"p50": _q(t, 50), "p95": _q(t, 95), "max": float(t.max()) if len(t) else math.nan}
    for stage in STAGES:
        t = np.array([r[stage] for r in rows if stage in r], np.float64) * 1e3
        out["stages_ms"][stage] = {"frames": int(len(t)), "p50": _q(t, 50), "p95": _q(t, 95),
                                   "mean_per_frame": float(t.sum() / max(len(rows), 1))}
    return out


def _q(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else math.nan


def describe(runs: dict) -> dict[str, str]:
    """Column -> the refinement it runs, with the feature graphs' backend (onnxruntime / tensorrt)."""
    out = {}
    for name, loc in runs.items():
        fm = loc.verifier.matcher
        graphs = [getattr(part, "graph", None) for part in (fm.extractor, fm.matcher)]
        backend = next((g.backend for g in graphs if g is not None), "opencv")
        out[name] = f"{fm.extractor.name}+{fm.matcher.name} ({backend}, {fm.cfg.max_features} kp)"
    return out


def print_table(results: dict, flight: Path, detector: str, methods: dict[str, str] | None = None) -> None:
    names = list(results)
    print(f"\nlocalizer on {flight} ({detector}); ms, p50 / p95 over the frames that ran the stage "
          "(machine shared: compare the columns, not absolute times)")
    width = 28
    for name, method in (methods or {}).items():
        print(f"  {name}: {method}")
    print(f"{'stage':<22}" + "".join(f"{n:>{width}}" for n in names))
    for stage in STAGES:
        cells = []
        for n in names:
            s = results[n]["stages_ms"][stage]
            cells.append(f"{s['p50']:.1f} / {s['p95']:.1f} ({s['frames']} fr)" if s["frames"] else "-")
        print(f"{stage:<22}" + "".join(f"{c:>{width}}" for c in cells))
    for label, metric in (("capture-to-send", "capture_to_send_ms"), ("cpu per frame", "cpu_per_frame_ms")):
        for key in ("p50", "p95", "max"):
            vals = [results[n][metric][key] for n in names]
            ratios = " ".join(f"x{v / vals[0]:.2f}" if vals[0] > 0 else "x-" for v in vals[1:])
            print(f"{label + ' ' + key:<22}" + "".join(f"{v:>{width}.1f}" for v in vals) + f"   {ratios}")
    print(f"{'fixes':<22}" + "".join(f"{results[n]['fixes']:>{width - 4}d}/{results[n]['frames']:<3d}" for n in names))
