"""`mean-nav bench ray`: the tile-cache build on Ray against the plain local build, in one run.

On one map (default: the generated 1 km x 1 km map of `bench cache`) and one deploy model:

- local: the plain build (`--threads`, default all cores) and a one-thread local build
  (the same work per block as one Ray worker does);
- Ray, on a local cluster of `--workers` CPUs: 1 worker (one block at a time) and
  `--workers` workers, one inference thread each, after a warm-up build so the workers
  have loaded the model;
- Ray's overhead per block: (Ray 1 worker - local 1 thread) / blocks;
- with `--index-tiles N`: the peak memory of `cache index` (faiss IVF-PQ, the default
  factory) on generated caches of N/4 and N tiles, as fixed + per-million-tile memory.

Every build's output is checked to be the same cache (embeddings and tiles byte for byte).
Times on a shared machine are inflated by its other load; the ratios are measured side by
side in one run. A bar chart goes to `--plot`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ..errors import MeanNavError
from . import print_and_save_json

log = logging.getLogger(__name__)

INDEX_TRAIN_SIZE = 100_000    # TileCache.build_approx_index's default training sample


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="deploy .onnx the builds embed with")
    parser.add_argument("--maps", type=Path, nargs="*", default=None,
                        help="GeoTIFFs to build from (default: a generated 1 km x 1 km map, 0.5 m)")
    parser.add_argument("--gsd", type=float, default=0.5)
    parser.add_argument("--tile-size", type=float, default=100.0)
    parser.add_argument("--block-px", type=int, default=512, help="block side in pixels (more blocks: more overhead "
                        "measured; the CLI default is 4096)")
    parser.add_argument("--workers", type=int, default=2, help="CPUs of the local Ray cluster (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="threads of the plain local build (default: all)")
    parser.add_argument("--index-tiles", type=int, default=0,
                        help="also measure `cache index` peak memory on generated caches of N/4 and N tiles "
                        "(N >= 400000)")
    parser.add_argument("--dim", type=int, default=768, help="descriptor dimension for --index-tiles")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/mean-nav-bench-ray"), help="scratch folder")
    parser.add_argument("--plot", type=Path, default=Path("runs/bench/ray.png"))
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")


def _build(maps, out: Path, model: Path, threads: int | None, args, runner=None) -> float:
    from ..deploy.backends import load_embedder
    from ..geo.cache import build_cache

    shutil.rmtree(out, ignore_errors=True)
    embedder = load_embedder(model, backend="onnxruntime", threads=threads)
    t0 = time.perf_counter()
    build_cache(maps, out, embedder, gsd_m=args.gsd, tile_size_m=args.tile_size, stride_m=args.tile_size / 2,
                batch_size=8, block_px=args.block_px, runner=runner, progress=False)
    return time.perf_counter() - t0


def _same_cache(a: Path, b: Path) -> bool:
    from ..geo.cache import EMBEDDINGS, TILES

    return all((a / n).read_bytes() == (b / n).read_bytes() for n in (EMBEDDINGS, TILES))


def bench_builds(args) -> dict:
    import ray

    from ..bench.cache import _generated_map
    from ..geo.cache import TileCache
    from ..geo.ray_build import ModelSpec, RayBlockRunner

    folder = args.folder
    folder.mkdir(parents=True, exist_ok=True)
    maps = args.maps or [_generated_map(folder / "bench_map.tif")]
    model = args.model.resolve()
    results: dict = {"cpus": os.cpu_count(), "loadavg_at_start": round(os.getloadavg()[0], 2), "runs": {}}
    runs = results["runs"]
    runs["local"] = {"seconds": _build(maps, folder / "local", model, args.threads, args)}
    runs["local, 1 thread"] = {"seconds": _build(maps, folder / "local1", model, 1, args)}
    reference = folder / "local"
    tiles = len(TileCache.load(reference, verify=False))
    ray.init(address="local", num_cpus=args.workers, include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    try:
        model_hash = TileCache.load(reference, verify=False).meta["model_hash"]
        spec = ModelSpec(str(model), "onnxruntime", 1)
        # warm-up: workers start and load the model once; later builds reuse them
        _build(maps, folder / "warmup", model, 1, args, RayBlockRunner(spec, model_hash))
        one = RayBlockRunner(spec, model_hash, cpus_per_task=float(args.workers))     # one block at a time
        runs["ray, 1 worker"] = {"seconds": _build(maps, folder / "ray1", model, 1, args, one)}
        many = RayBlockRunner(spec, model_hash)
        runs[f"ray, {args.workers} workers"] = {"seconds": _build(maps, folder / "rayN", model, 1, args, many),
                                                "per_worker": many.summary()}
        blocks = sum(b for b, _, _ in many.per_worker.values())
    finally:
        ray.shutdown()
    for name, r in runs.items():
        r["tiles_per_s"] = round(tiles / r["seconds"], 2)
        r["seconds"] = round(r["seconds"], 2)
    for name, out in (("local, 1 thread", "local1"), ("ray, 1 worker", "ray1"), (f"ray, {args.workers} workers", "rayN")):
        runs[name]["same_cache_as_local"] = _same_cache(reference, folder / out)
    overhead = (runs["ray, 1 worker"]["seconds"] - runs["local, 1 thread"]["seconds"]) / max(blocks, 1)
    results.update(tiles=tiles, blocks=blocks, block_px=args.block_px, model=str(model),
                   ray_overhead_ms_per_block=round(1000 * overhead, 1),
                   speedup_ray_n_vs_local=round(runs["local"]["seconds"] / runs[f"ray, {args.workers} workers"]["seconds"], 2),
                   speedup_ray_n_vs_ray_1=round(runs["ray, 1 worker"]["seconds"]
                                                / runs[f"ray, {args.workers} workers"]["seconds"], 2),
                   loadavg_at_end=round(os.getloadavg()[0], 2))
    return results


# ----------------------------------------------------------------------------- cache index memory

def _generate_child(folder: str, tiles: int, dim: int) -> None:
    from ..bench.cache import generate_cache

    generate_cache(Path(folder), tiles, dim, 200.0, 100.0, progress=False)


def _index_peak_child(folder: str) -> None:
    """In a fresh process (so the high-water mark is the index build's): build the approximate
    index of a cache, print the peak RSS."""
    import resource

    from ..geo.cache import TileCache

    cache = TileCache.load(Path(folder), verify=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    entry = cache.build_approx_index(progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss          # KiB on Linux
    print(json.dumps({"tiles": len(cache), "factory": entry["factory"], "seconds": round(time.perf_counter() - t0, 1),
                      "peak_rss_mb": round(peak / 1024, 1), "rss_before_index_mb": round(before / 1024, 1),
                      "index_file_mb": round((Path(folder) / entry["file"]).stat().st_size / 1e6, 1)}))


def _child(function: str, *args) -> str:
    """Run one of this module's functions in a fresh Python; its stdout."""
    code = f"from mean_nav.bench.ray import {function}; {function}(*{args!r})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise MeanNavError(f"cache index measurement failed: {out.stderr.strip().splitlines()[-1:]}")
    return out.stdout


def bench_index_memory(args) -> dict:
    """Peak memory of `cache index` at two sizes: fixed part + part per million tiles.

    Both sizes hold at least the index's training sample (100,000 vectors), so the
    training memory is the same in both and the difference is what grows with the cache.
    """
    sizes = [args.index_tiles // 4, args.index_tiles]
    if sizes[0] < INDEX_TRAIN_SIZE:
        raise MeanNavError(f"--index-tiles must be at least {4 * INDEX_TRAIN_SIZE} (a quarter of it still holds "
                           f"the {INDEX_TRAIN_SIZE}-vector training sample)")
    rows = []
    for n in sizes:
        folder = args.folder / f"index-{n}"
        _child("_generate_child", str(folder), n, args.dim)
        rows.append(json.loads(_child("_index_peak_child", str(folder)).strip().splitlines()[-1]))
        shutil.rmtree(folder, ignore_errors=True)
    (n0, m0), (n1, m1) = ((r["tiles"], r["peak_rss_mb"]) for r in rows)
    per_million = (m1 - m0) / max(n1 - n0, 1) * 1e6
    return {"dim": args.dim, "runs": rows, "peak_mb_per_million_tiles": round(per_million, 1),
            "peak_mb_fixed": round(m0 - per_million * n0 / 1e6, 1)}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(runs)
    ax.barh(names, [runs[n]["tiles_per_s"] for n in names], color=["#777", "#aaa", "#48c", "#26a"][:len(names)])
    ax.set_xlabel("tiles/s (whole build: reprojection, tiling, embedding, writing)")
    ax.set_title(f"cache build, {results['tiles']} tiles in {results['blocks']} blocks; "
                 f"Ray overhead {results['ray_overhead_ms_per_block']} ms/block", fontsize=9)
    ax.invert_yaxis()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> int:
    from ..geo.ray_build import import_ray

    import_ray()
    if args.workers < 2:
        raise MeanNavError("--workers must be at least 2 (the benchmark compares 1 and N workers)")
    results = bench_builds(args)
    log.info("builds: %s", json.dumps(results))
    if args.index_tiles:
        results["cache_index_memory"] = bench_index_memory(args)
    plot(results, args.plot)
    print_and_save_json(results, args.json)
    print(f"plot: {args.plot}")
    return 0
