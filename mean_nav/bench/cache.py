"""`mean-nav bench cache`: tile-cache search and build benchmark.

On a generated cache (default 1,000,000 tiles x 768-d float16, 200 m tiles every 100 m,
i.e. 100 km x 100 km) it measures, in one run:

- read-once: the time to stream every stored embedding once through the memory map
  (page cache warm; the floor for any exact scan);
- exact global top-10 latency (faiss fp16 scan, and numpy) as a ratio to read-once;
- search_near latency at a radius (default 2 km) and the tiles inside it;
- approximate search (faiss IVF-PQ + exact re-rank): latency and recall@10 against exact
  search, over a sweep of nprobe (PNG plot);
- bytes per tile on disk and in memory;
- build throughput in tiles/s with a given deploy model (onnxruntime) on real or
  generated maps.

The generated embeddings are not random noise: neighbouring tiles overlap, so their
descriptors share a spatially smooth latent, and queries are a tile's descriptor plus
noise, like a camera frame of that tile.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from ..errors import MeanNavError
from . import print_and_save_json

log = logging.getLogger(__name__)

GENERATOR_VERSION = 2  # bump when the generated descriptors change, so old caches regenerate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tiles", type=int, default=1_000_000, help="tiles in the generated cache")
    parser.add_argument("--dim", type=int, default=768, help="descriptor dimension")
    parser.add_argument("--tile-size", type=float, default=200.0, help="tile side, metres")
    parser.add_argument("--stride", type=float, default=100.0, help="tile stride, metres")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/mean-nav-bench-cache"),
                        help="where the generated cache lives (reused when it matches)")
    parser.add_argument("--queries", type=int, default=200, help="queries for search_near and approx search")
    parser.add_argument("--exact-queries", type=int, default=5, help="queries for the global exact scan")
    parser.add_argument("--radius", type=float, default=2000.0, help="search_near radius, metres")
    parser.add_argument("--factory", default=None, help="faiss factory (default IVF<sqrt N>,PQ<dim/8>)")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64], help="nprobe values to sweep")
    parser.add_argument("--rerank", type=int, default=100, help="approx candidates re-ranked exactly")
    parser.add_argument("--model", type=Path, default=None, help="deploy .onnx for the build throughput")
    parser.add_argument("--build-maps", type=Path, nargs="*", default=None,
                        help="GeoTIFFs for the build throughput (default: a generated 1 km map)")
    parser.add_argument("--build-gsd", type=float, default=0.5)
    parser.add_argument("--build-tile-size", type=float, default=100.0)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads for the build")
    parser.add_argument("--plot", type=Path, default=Path("runs/bench/cache.png"), help="PNG of the sweeps")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--no-numpy", action="store_true", help="skip the (slower) numpy exact scan")
    parser.add_argument("--faiss-threads", type=int, default=1,
                        help="OpenMP threads for faiss (1 suits a shared machine; busy-waiting threads "
                             "slow everything when cores are oversubscribed)")
    parser.add_argument("--train-size", type=int, default=65536, help="vectors used to train the faiss index")
    parser.add_argument("--seed", type=int, default=0)


# ----------------------------------------------------------------------------- generated cache

def generate_cache(folder: Path, n: int, dim: int, tile_size_m: float, stride_m: float, seed: int = 0,
                   crs: str = "EPSG:32633", progress: bool = True) -> Path:
    """Write a cache of n tiles on a square grid with spatially correlated descriptors (no maps)."""
    import cv2
    from tqdm import tqdm

    from ..geo.cache import EMBEDDINGS, FORMAT, FORMAT_VERSION, META, TILES, _file_entries, _save_npy_atomic, \
        _write_json_atomic, tile_geometry
    from ..geo.tiles import TileGrid

    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    gsd = stride_m / 200.0  # pixel size only matters for the grid description here
    grid = TileGrid.from_metres(crs, gsd, tile_size_m, stride_m)
    nx = int(np.ceil(np.sqrt(n)))
    ny = int(np.ceil(n / nx))
    # place the area around 500 km E, 5000 km N (mid-latitude UTM)
    i0 = int(450_000 / stride_m)
    j0 = int(-5_050_000 / stride_m)
    k = np.arange(n)
    ti, tj = i0 + k % nx, j0 + k // nx
    rng = np.random.default_rng(seed)
    # Descriptor geometry like a trained model's: tiles that overlap the same ground are
    # similar (a spatially smooth latent, correlation ~0.94 one stride apart), tiles far
    # apart are nearly orthogonal (128 independent latent directions), plus per-tile noise.
    latent_dim = 128
    field = rng.standard_normal((ny, nx, latent_dim), dtype=np.float32)
    for c in range(latent_dim):
        blurred = cv2.GaussianBlur(field[..., c], (0, 0), 2.0)
        field[..., c] = blurred / blurred.std()
    field = field.reshape(-1, latent_dim)[:n]
    field += 0.2 * rng.standard_normal(field.shape, dtype=np.float32)
    basis = rng.standard_normal((latent_dim, dim), dtype=np.float32) / np.sqrt(latent_dim)
    tmp = folder / (EMBEDDINGS + ".tmp.npy")
    emb = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, dim))
    chunk = 65536
    for s in tqdm(range(0, n, chunk), desc="generate embeddings", unit="chunk", disable=not progress):
        x = field[s:s + chunk] @ basis
        x += 0.3 * rng.standard_normal(x.shape, dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        emb[s:s + chunk] = x
    emb.flush()
    del emb
    os.replace(tmp, folder / EMBEDDINGS)
    _save_npy_atomic(folder / TILES, tile_geometry(grid, ti, tj, np.ones(n, np.float32)))
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "num_tiles": n, "dim": dim, "embedding_dtype": "float16",
        "model_hash": "synthetic-benchmark",
        "model": {"backend": "synthetic", "dim": dim, "model_hash": "synthetic-benchmark", "precision": "fp16",
                  "preprocessing": {"img_size": 384, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}},
        "grid": grid.describe(), "tile_range": [int(ti.min()), int(ti.max()) + 1, int(tj.min()), int(tj.max()) + 1],
        "min_valid_fraction": 0.5, "shard": None, "sources": [], "maps": [], "approx_index": None,
        "generated": {"tiles": n, "dim": dim, "tile_size_m": tile_size_m, "stride_m": stride_m, "seed": seed,
                      "generator": GENERATOR_VERSION},
    }
    meta["files"] = _file_entries(folder, [EMBEDDINGS, TILES])
    _write_json_atomic(folder / META, meta)
    return folder


def _matching_generated(folder: Path, n, dim, tile_size_m, stride_m, seed) -> bool:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("generated") == {"tiles": n, "dim": dim, "tile_size_m": tile_size_m, "stride_m": stride_m,
                                     "seed": seed, "generator": GENERATOR_VERSION}


# ----------------------------------------------------------------------------- measurements

def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def read_once_s(embeddings: np.ndarray, chunk: int = 8192, repeats: int = 3) -> float:
    """Best time to stream all stored embeddings once through the memory map into a buffer."""
    buf = np.empty((min(chunk, len(embeddings)), embeddings.shape[1]), embeddings.dtype)
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for s in range(0, len(embeddings), chunk):
            rows = embeddings[s:s + chunk]
            np.copyto(buf[:len(rows)], rows)
        best = min(best, time.perf_counter() - t0)
    return best


def _queries(cache, count: int, rng: np.random.Generator, noise: float = 0.03) -> tuple[np.ndarray, np.ndarray]:
    ids = rng.choice(len(cache), size=count, replace=False)
    q = np.asarray(cache.embeddings[np.sort(ids)], np.float32)
    q += noise * rng.standard_normal(q.shape, dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return np.sort(ids), q


def _percentiles_ms(times: list[float], cpu: list[float] | None = None) -> dict:
    """Wall-clock p50/p95/mean, and the CPU time of the calling thread (p50) when given.

    On a shared, oversubscribed machine wall time includes waiting for a core; CPU time is
    what the work costs, i.e. about the latency on an idle core.
    """
    t = np.asarray(times) * 1e3
    out = {"p50_ms": round(float(np.percentile(t, 50)), 3), "p95_ms": round(float(np.percentile(t, 95)), 3),
           "mean_ms": round(float(t.mean()), 3)}
    if cpu is not None:
        out["cpu_p50_ms"] = round(float(np.percentile(np.asarray(cpu) * 1e3, 50)), 3)
    return out


class _Timer:
    """Collects wall and thread-CPU durations of repeated calls."""

    def __init__(self):
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def __call__(self, fn, *args, **kwargs):
        w0, c0 = time.perf_counter(), time.thread_time()
        out = fn(*args, **kwargs)
        self.cpu.append(time.thread_time() - c0)
        self.wall.append(time.perf_counter() - w0)
        return out

    def summary(self) -> dict:
        return _percentiles_ms(self.wall, self.cpu)


def bench_search(args, cache, rng) -> dict:
    from ..geo.cache import exact_topk

    res: dict = {"tiles": len(cache), "dim": cache.dim}
    rss0 = _rss_bytes()
    ids, queries = _queries(cache, max(args.queries, args.exact_queries), rng)
    # Read-once and the exact scan alternate, so both see the same page-cache state (this
    # machine reclaims cold page cache proactively); the first pass only warms the cache.
    read_once_s(cache.embeddings, repeats=1)
    reads, timer = [], _Timer()
    for q in queries[:args.exact_queries]:
        reads.append(read_once_s(cache.embeddings, repeats=1))
        timer(cache.search, q, 10)
    read_s = float(np.median(reads))
    res["read_once_s"] = round(read_s, 6)
    res["read_once_all_s"] = [round(r, 4) for r in reads]
    res["embeddings_bytes"] = int(cache.embeddings.nbytes)
    res["read_once_gb_per_s"] = round(cache.embeddings.nbytes / read_s / 1e9, 2)
    res["exact_faiss"] = timer.summary()
    res["exact_faiss"]["ratio_to_read_once"] = round(float(np.median(timer.wall)) / read_s, 2)
    if not args.no_numpy:
        timer = _Timer()
        for q in queries[:max(1, min(3, args.exact_queries))]:
            timer(exact_topk, cache.embeddings, q[None], 10, use_faiss=False)
        res["exact_numpy"] = timer.summary()
        res["exact_numpy"]["ratio_to_read_once"] = round(float(np.median(timer.wall)) / read_s, 2)
    truth_ids = _ground_truth(cache, queries, args.seed)
    res["exact_top1_is_query_tile"] = round(float(np.mean(truth_ids[:, 0] == ids)), 3)
    res["rss_after_exact_mb"] = round((_rss_bytes() - rss0) / 1e6, 1)

    # search near the query tile's true position: first touch of those pages, then warm
    first, warm, inside = _Timer(), _Timer(), []
    for t, q in zip(ids, queries):
        lat, lon = float(cache.lat[t]), float(cache.lon[t])
        first(cache.search_near, q, lat, lon, args.radius, 10)
        hits = warm(cache.search_near, q, lat, lon, args.radius, 10)
        inside.append(len(cache.spatial.query_radius(float(cache.x[t]), float(cache.y[t]), args.radius)))
        assert hits and hits[0].score >= hits[-1].score
    res["near"] = {"radius_m": args.radius, "tiles_in_radius_median": int(np.median(inside)),
                   "warm": warm.summary(), "first_touch": first.summary()}
    radius_sweep = []
    for radius in (500.0, 1000.0, 2000.0, 4000.0):
        timer = _Timer()
        for t, q in zip(ids[:50], queries[:50]):
            cache.search_near(q, float(cache.lat[t]), float(cache.lon[t]), radius, 10)
            timer(cache.search_near, q, float(cache.lat[t]), float(cache.lon[t]), radius, 10)
        radius_sweep.append({"radius_m": radius, **timer.summary()})
    res["near_sweep"] = radius_sweep

    # approximate search
    from ..geo.cache import _faiss

    if _faiss() is None:
        res["approx"] = "faiss not installed"
        return res
    if not cache.meta.get("approx_index") or (args.factory and cache.meta["approx_index"]["factory"] != args.factory):
        factory = args.factory or f"IVF{int(np.sqrt(len(cache)))},PQ{cache.dim // 8}"
        cache.build_approx_index(factory=factory, nprobe=args.nprobe[0], rerank=args.rerank,
                                 train_size=args.train_size)
    entry = cache.meta["approx_index"]
    res["approx_index"] = {"factory": entry["factory"], "build_s": entry.get("build_s"),
                           "bytes_per_tile": round((cache.folder / entry["file"]).stat().st_size / len(cache), 1)}
    sweep = []
    for nprobe in args.nprobe:
        cache.meta["approx_index"]["nprobe"] = nprobe
        cache._approx = None
        cache._approx_index()
        timer, recalls = _Timer(), []
        for q, truth_row in zip(queries, truth_ids):
            hits = timer(cache.search_approx, q, 10)
            recalls.append(len({h.tile_id for h in hits} & set(truth_row.tolist())) / 10.0)
        sweep.append({"nprobe": nprobe, "recall_at_10": round(float(np.mean(recalls)), 4), **timer.summary()})
        log.info("approx nprobe %d: recall@10 %.4f, p50 %.2f ms", nprobe, sweep[-1]["recall_at_10"],
                 sweep[-1]["p50_ms"])
    res["approx"] = sweep
    return res


def _ground_truth(cache, queries: np.ndarray, seed: int) -> np.ndarray:
    """Exact top-10 ids of the queries, kept next to the generated cache for reruns."""
    from ..geo.cache import exact_topk

    path = cache.folder / f"bench_truth_{seed}_{len(queries)}.npz"
    if path.is_file():
        with np.load(path) as z:
            if np.array_equal(z["queries"], queries):
                return z["ids"]
    log.info("ground truth for %d queries (batched exact scan)", len(queries))
    _, ids = exact_topk(cache.embeddings, queries, 10)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, queries=queries, ids=ids)
    os.replace(tmp, path)
    return ids


def bytes_per_tile(cache) -> dict:
    disk = sum((cache.folder / name).stat().st_size for name in cache.meta["files"])
    disk += (cache.folder / "meta.json").stat().st_size
    n = len(cache)
    resident = (cache.x.nbytes + cache.y.nbytes + cache.lat.nbytes + cache.lon.nbytes
                + cache.spatial.order.nbytes + cache.spatial.starts.nbytes)
    return {"disk_total": round(disk / n, 1),
            "disk_embeddings": round(cache.embeddings.nbytes / n, 1),
            "memory_mapped_embeddings": round(cache.embeddings.nbytes / n, 1),
            "memory_heap_geometry_and_index": round(resident / n, 1),
            "memory_total_when_all_pages_resident": round((cache.embeddings.nbytes + resident) / n, 1)}


def bench_build(args, workdir: Path) -> dict:
    """Tiles/s of a full cache build (tiling + reprojection + embedding + writing)."""
    from ..deploy.backends import load_embedder
    from ..geo.cache import TileCache, build_cache

    embedder = load_embedder(args.model, backend="onnxruntime", threads=args.threads)
    workdir.mkdir(parents=True, exist_ok=True)
    maps = args.build_maps
    if not maps:
        maps = [_generated_map(workdir / "bench_map.tif")]
    out = workdir / "build"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    build_cache(maps, out, embedder, gsd_m=args.build_gsd, tile_size_m=args.build_tile_size,
                stride_m=args.build_tile_size / 2, batch_size=8)
    elapsed = time.perf_counter() - t0
    n = len(TileCache.load(out, verify=False))
    # embedding alone, to show where the time goes
    imgs = [np.zeros((embedder.preprocessing.img_size,) * 2 + (3,), np.uint8)] * 16
    embedder.embed(imgs[:2])
    t1 = time.perf_counter()
    embedder.embed(imgs, batch_size=8)
    embed_only = 16 / (time.perf_counter() - t1)
    return {"model": str(args.model), "precision": embedder.precision, "img_size": embedder.preprocessing.img_size,
            "tiles": n, "seconds": round(elapsed, 2), "tiles_per_s": round(n / elapsed, 2),
            "embed_only_images_per_s": round(embed_only, 2), "threads": args.threads,
            "maps": [str(m) for m in maps], "gsd_m": args.build_gsd, "tile_size_m": args.build_tile_size}


def _generated_map(path: Path) -> Path:
    """A 1 km x 1 km textured GeoTIFF (UTM 33N, 0.5 m) for the build benchmark."""
    import cv2
    import rasterio
    from affine import Affine

    rng = np.random.default_rng(0)
    size = 2000
    coarse = cv2.resize(rng.uniform(30, 220, (size // 50, size // 50, 3)).astype(np.float32), (size, size),
                        interpolation=cv2.INTER_CUBIC)
    image = np.clip(coarse + rng.normal(0, 15, (size, size, 3)), 1, 255).astype(np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=Affine(0.5, 0, 450000, 0, -0.5, 5050000)) as dst:
        dst.write(image.transpose(2, 0, 1))
    return path


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    if isinstance(results.get("approx"), list):
        sweep = results["approx"]
        a.plot([s["p50_ms"] for s in sweep], [s["recall_at_10"] for s in sweep], "o-")
        for s in sweep:
            a.annotate(f"nprobe {s['nprobe']}", (s["p50_ms"], s["recall_at_10"]), textcoords="offset points",
                       xytext=(4, -10), fontsize=8)
        a.axhline(0.95, color="grey", ls="--", lw=0.8)
        ex = results["exact_faiss"]["p50_ms"]
        a.set_title(f"approx {results['approx_index']['factory']} vs exact ({ex:.0f} ms)")
        a.set_xlabel("wall latency p50 (ms)")
        a.set_ylabel("recall@10")
    ns = results["near_sweep"]
    b.plot([s["radius_m"] / 1000 for s in ns], [s["cpu_p50_ms"] for s in ns], "o-", label="CPU time p50")
    b.plot([s["radius_m"] / 1000 for s in ns], [s["p50_ms"] for s in ns], "s--", label="wall p50 (shared CPU)")
    b.axhline(2.0, color="grey", ls="--", lw=0.8)
    b.set_xlabel("search_near radius (km)")
    b.set_ylabel("latency, warm (ms)")
    b.set_title(f"search_near, {results['tiles']:,} tiles, stride {results['stride_m']:g} m")
    b.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    plt.close(fig)


def run(args) -> int:
    from ..geo.cache import TileCache

    if args.tiles < 100 or args.dim < 8:
        raise MeanNavError("--tiles must be at least 100 and --dim at least 8")
    rng = np.random.default_rng(args.seed)
    folder = args.folder
    from ..geo.cache import _faiss

    if _faiss() is not None:
        _faiss().omp_set_num_threads(max(1, args.faiss_threads))
    if not _matching_generated(folder, args.tiles, args.dim, args.tile_size, args.stride, args.seed):
        t0 = time.perf_counter()
        generate_cache(folder, args.tiles, args.dim, args.tile_size, args.stride, seed=args.seed)
        log.info("generated %d-tile cache in %.1f s", args.tiles, time.perf_counter() - t0)
    t0 = time.perf_counter()
    cache = TileCache.load(folder, verify=False)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    TileCache.load(folder, verify=True)
    verify_s = time.perf_counter() - t0
    results = {"tiles": len(cache), "dim": cache.dim, "tile_size_m": args.tile_size, "stride_m": args.stride,
               "cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg()[0],
               "load_s": round(load_s, 3), "load_verify_checksums_s": round(verify_s, 2)}
    results.update(bench_search(args, cache, rng))
    results["bytes_per_tile"] = bytes_per_tile(cache)
    log.info("search results: %s", json.dumps(results))
    if args.model is not None:
        results["build"] = bench_build(args, folder.parent / (folder.name + "-build"))
    results["loadavg_at_end"] = os.getloadavg()[0]
    plot(results, args.plot)
    print_and_save_json(results, args.json)
    print(f"plot: {args.plot}")
    return 0
