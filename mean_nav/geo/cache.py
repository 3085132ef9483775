"""Satellite-tile embedding cache: build from georeferenced maps, load memory-mapped, search.

Cache folder (format_version 1):

    meta.json        written last and atomically; a folder without it is not a cache
    embeddings.npy   [N, dim] float16, L2-normalised, memory-mapped on load
    tiles.npy        [N] structured: tile grid (i, j), metric centre (x, y), centre
                     (lat, lon), valid_fraction, footprint_lonlat [4, 2] (NW, NE, SE, SW)
    maps/part-*.tif  the reprojected metric map at the cache GSD (RGB + alpha = valid),
                     non-overlapping windows of the global grid; serves tile_image and
                     region_image for refinement
    features/<detector>/*.npy
                     local features of the whole map per detector (geo/map_features.py),
                     memory-mapped: refinement reads them instead of map pixels
    approx.faiss     optional approximate index (faiss, `[faiss]` extra)
    work/            only while building: per-block results, so an interrupted build resumes

meta.json records the format version, model (hash, dim, precision, preprocessing), grid
(CRS, GSD, tile size, stride), sources, map parts, the settings of the stored map
features (`map_features`) and the size + sha256 of every file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from affine import Affine
from pyproj import CRS
from pyproj.exceptions import CRSError

from ..deploy.embedder import Embedder
from ..config import show
from ..errors import MeanNavError
from . import map_features as mf
from .cache_meta import check_manifest, read_meta
from .crs import from_lonlat, to_lonlat
from .raster import area_crs, check_georeferenced, union_bounds
from .spatial_index import GridIndex
from .tiles import (Block, MapMosaic, TileGrid, area_tile_range, cut_tiles, maps_overlapping, plan_blocks,
                    read_window, shard_rows, write_map_part)

log = logging.getLogger(__name__)

FORMAT = "mean-nav-tile-cache"
FORMAT_VERSION = 1
META = "meta.json"
EMBEDDINGS = "embeddings.npy"
TILES = "tiles.npy"
MAPS_DIR = "maps"
APPROX = "approx.faiss"
WORK = "work"

TILE_DTYPE = np.dtype([
    ("i", "<i8"), ("j", "<i8"),
    ("x", "<f8"), ("y", "<f8"),
    ("lat", "<f8"), ("lon", "<f8"),
    ("valid_fraction", "<f4"),
    ("footprint_lonlat", "<f8", (4, 2)),
])


@dataclass
class TileHit:
    """One search result: tile id, cosine score, centre lat/lon and metric centre (x, y)."""

    tile_id: int
    score: float
    lat: float
    lon: float
    x: float
    y: float


@dataclass
class RegionCrop:
    """A north-up crop of the cache map: pixel (col, row) centre -> transform @ (col+.5, row+.5)."""

    image: np.ndarray   # [h, w, 3] RGB uint8
    valid: np.ndarray   # [h, w] bool
    transform: Affine   # pixel corner -> metric (x, y) in the cache CRS


# ---------------------------------------------------------------------------- files

def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            buf = f.read(chunk)
            if not buf:
                break
            h.update(buf)
    return h.hexdigest()


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def _file_entries(folder: Path, names: Sequence[str]) -> dict:
    return {n: {"bytes": (folder / n).stat().st_size, "sha256": sha256_file(folder / n)} for n in names}


def tile_geometry(grid: TileGrid, i: np.ndarray, j: np.ndarray, valid_fraction: np.ndarray) -> np.ndarray:
    """Per-tile geometry record (TILE_DTYPE) from tile grid indices."""
    tiles = np.zeros(len(i), TILE_DTYPE)
    tiles["i"], tiles["j"] = i, j
    x, y = grid.tile_centre_xy(i, j)
    tiles["x"], tiles["y"] = x, y
    lon, lat = to_lonlat(grid.crs, x, y)
    tiles["lon"], tiles["lat"] = lon, lat
    tiles["valid_fraction"] = valid_fraction
    half = grid.tile_size_m / 2.0
    for c, (dx, dy) in enumerate([(-half, half), (half, half), (half, -half), (-half, -half)]):
        clon, clat = to_lonlat(grid.crs, x + dx, y + dy)
        tiles["footprint_lonlat"][:, c, 0] = clon
        tiles["footprint_lonlat"][:, c, 1] = clat
    return tiles


# ---------------------------------------------------------------------------- build

def _source_entries(maps: Sequence[Path]) -> list[dict]:
    import rasterio

    out = []
    for p in maps:
        with rasterio.open(p) as src:
            crs = src.crs.to_string() if src.crs else None
        st = p.stat()
        out.append({"path": str(p.resolve()), "crs": crs, "bytes": st.st_size, "mtime": int(st.st_mtime)})
    return out


@dataclass(frozen=True)
class BlockJob:
    """Everything building one block needs besides the embedder (picklable: a Ray task's input)."""

    grid: TileGrid
    maps: tuple[Path, ...]
    map_bounds: tuple          # per map, in the grid CRS
    out: Path
    batch_size: int
    min_valid_fraction: float
    features: tuple = ()       # (RefineConfig, stored settings) of each map-feature set to make

    def block_file(self, block: Block) -> Path:
        return self.out / WORK / f"block-{block.index:06d}.npz"

    def output_files(self, block: Block) -> list[Path]:
        """Every file building the block writes (those that exist), its block file (the 'done' mark) last."""
        paths = [self.out / MAPS_DIR / f"part-{block.index:06d}.tif"]
        paths += [mf.block_file(self.out / WORK, refine.detector, block.index) for refine, _ in self.features]
        return [p for p in paths if p.is_file()] + [self.block_file(block)]

    def build(self, block: Block, embedder: Embedder) -> int:
        """Embed the block's tiles and write its map part and block file; tiles embedded."""
        return _build_block(block, self.grid, list(self.maps), list(self.map_bounds), self.out, embedder,
                            self.batch_size, self.min_valid_fraction, self.block_file(block), self.features)


class LocalBlockRunner:
    """Runs blocks one after the other in this process (the default; see geo/ray_build.py for Ray)."""

    def __init__(self, embedder: Embedder):
        self.embedder = embedder

    def run(self, job: BlockJob, blocks: Sequence[Block]):
        """Yield (block, tiles embedded) as each block's files are written."""
        for block in blocks:
            yield block, job.build(block, self.embedder)

    def summary(self) -> str:
        return ""


def build_cache(maps: list[Path], out: Path, embedder: Embedder, gsd_m: float, tile_size_m: float,
                stride_m: float, crs=None, batch_size: int = 32, shard: tuple[int, int] | None = None,
                min_valid_fraction: float = 0.5, progress: bool = True, block_px: int = 4096,
                runner=None, features: Sequence | None = None) -> Path:
    """Tile the maps at `gsd_m` on a north-up metric grid, embed every tile, write a cache.

    `features`: RefineConfigs whose map features to store (default: SIFT with the default
    settings; `()` stores none, and the localizer then computes them in flight).
    Resumable: finished blocks are kept in `out/work/` and skipped when the same command
    runs again. `shard=(i, n)` builds the i-th of n contiguous parts of the area (merge the
    parts with `merge_caches`). meta.json is written last, so a failed build never loads.
    `runner` decides where the blocks run (default: `LocalBlockRunner(embedder)`, here;
    `geo.ray_build.RayBlockRunner`: a Ray cluster); everything else is the same either way.
    """
    maps = [Path(m) for m in maps]
    if not maps:
        raise MeanNavError("maps: no map files given; pass one or more GeoTIFF orthophotos")
    for m in maps:
        check_georeferenced(m)
    if not 0.0 <= min_valid_fraction <= 1.0:
        raise MeanNavError(f"min_valid_fraction: {min_valid_fraction} must be within [0, 1]")
    if batch_size < 1:
        raise MeanNavError(f"batch_size: {batch_size} must be at least 1")
    out = Path(out)
    if (out / META).exists():
        raise MeanNavError(f"{out}: already holds a complete cache; choose a new output folder or delete it")
    try:
        crs = area_crs(maps) if crs is None else CRS.from_user_input(crs)
    except CRSError as exc:
        raise MeanNavError(f"crs: {crs!r} is not a CRS pyproj knows ({exc}); use e.g. EPSG:32633") from None
    grid = TileGrid.from_metres(crs, gsd_m, tile_size_m, stride_m)
    feature_sets = _feature_sets(features, grid)
    tile_range = area_tile_range(maps, grid)
    blocks = plan_blocks(grid, tile_range, block_px, rows=shard_rows(tile_range, shard))

    work = out / WORK
    (out / MAPS_DIR).mkdir(parents=True, exist_ok=True)
    work.mkdir(exist_ok=True)
    model = embedder.describe()
    settings = {
        "grid": grid.describe(), "model_hash": embedder.model_hash, "dim": int(embedder.dim),
        "preprocessing": model["preprocessing"], "sources": _source_entries(maps),
        "shard": list(shard) if shard else None, "min_valid_fraction": float(min_valid_fraction),
        "block_px": int(block_px), "format_version": FORMAT_VERSION,
        "map_features": {refine.detector: fsettings for refine, fsettings, _ in feature_sets},
    }
    settings = json.loads(json.dumps(settings))  # normalise tuples -> lists for comparison
    state_file = work / "build.json"
    if state_file.exists():
        previous = json.loads(state_file.read_text(encoding="utf-8"))
        changed = [k for k in settings if previous.get(k) != settings[k]]
        if changed:
            raise MeanNavError(
                f"{out}: an interrupted build with different settings ({changed[0]}) is here; "
                "rerun with the same maps, model and options to resume, or delete the folder")
    else:
        _write_json_atomic(state_file, settings)

    from tqdm import tqdm

    bar = tqdm(total=sum(b.num_tiles for b in blocks), unit="tile", desc=f"embedding tiles into {out.name}",
               disable=not progress, smoothing=0.1)
    started = time.perf_counter()
    embedded = 0
    # each block reads only the maps that touch it (large areas come as many map sheets)
    # absolute paths: a Ray worker's working folder is not the driver's
    job = BlockJob(grid, tuple(m.resolve() for m in maps), tuple(union_bounds([m], grid.crs) for m in maps),
                   out.resolve(), batch_size, min_valid_fraction,
                   tuple((refine, fsettings) for refine, fsettings, _ in feature_sets))
    todo = []
    for block in blocks:
        if job.block_file(block).exists():
            bar.update(block.num_tiles)
        else:
            todo.append(block)
    runner = runner or LocalBlockRunner(embedder)
    for block, tiles in runner.run(job, todo):
        embedded += tiles
        bar.update(block.num_tiles)
    bar.close()
    elapsed = time.perf_counter() - started
    if embedded:
        log.info("embedded %d tiles in %.1f s (%.1f tiles/s)%s", embedded, elapsed, embedded / max(elapsed, 1e-9),
                 runner.summary())
    _assemble(out, grid, blocks, model, settings, tile_range, shard, feature_sets)
    shutil.rmtree(work, ignore_errors=True)
    return out


def _feature_sets(features: Sequence | None, grid: TileGrid) -> list[tuple[object, dict, str]]:
    """(RefineConfig, stored settings, descriptor dtype) of each map-feature set to store."""
    if features is None:
        from ..nav.refine import RefineConfig

        features = [RefineConfig()]
    names = [f.detector for f in features]
    if len(set(names)) != len(names):
        raise MeanNavError(f"features: {names} names a detector twice; store each detector once")
    out = []
    for refine in features:
        settings = mf.store_settings(refine, grid)   # also refuses an unknown detector before any work
        out.append((refine, settings, mf.descriptor_dtype(mf.window_extractor(refine, settings))))
    return out


def _build_block(block: Block, grid: TileGrid, maps: list[Path], map_bounds: list, out: Path,
                 embedder: Embedder, batch_size: int, min_valid_fraction: float, done: Path,
                 features: Sequence = ()) -> int:
    col0, row0, width, height = block.read_window(grid)
    touching = maps_overlapping(maps, map_bounds, grid, col0, row0, width, height)
    image, valid = read_window(touching, grid, col0, row0, width, height)
    ii, jj, fracs, images = cut_tiles(grid, block, image, valid, min_valid_fraction)
    if images:
        emb = embedder.embed(images, batch_size=batch_size)
        if emb.shape != (len(images), embedder.dim):
            raise MeanNavError(f"embedder {embedder.name}: returned shape {emb.shape}, "
                               f"expected ({len(images)}, {embedder.dim}); check the model file")
    else:
        emb = np.zeros((0, embedder.dim), np.float32)
    _, _, own_w, own_h = block.own_window(grid)
    own_img, own_valid = image[:own_h, :own_w], valid[:own_h, :own_w]
    has_part = bool(own_valid.any())
    if has_part:
        write_map_part(out / MAPS_DIR / f"part-{block.index:06d}.tif", grid, col0, row0, own_img, own_valid)
    # the block's map features, over the pixels it owns (written before `done`: a resumed
    # build redoes a block whose features are missing)
    own = (col0, row0, col0 + own_w, row0 + own_h)

    def read(c0, r0, w, h):
        return read_window(maps_overlapping(maps, map_bounds, grid, c0, r0, w, h), grid, c0, r0, w, h)

    for refine, settings in features:
        t0 = time.perf_counter()
        extractor = mf.window_extractor(refine, settings)
        cells = mf.window_features(extractor, settings, read, own) if has_part else mf.CellFeatures.concatenate(
            [], 0, np.float32)
        mf.save_cells(mf.block_file(done.parent, refine.detector, block.index), cells, time.perf_counter() - t0)
    tmp = done.with_name(f"{done.stem}.tmp-{os.getpid()}.npz")   # a retried block never shares a temp file
    np.savez(tmp, i=ii, j=jj, valid_fraction=fracs, embeddings=emb.astype(np.float16),
             part=np.array([col0, row0, own_w, own_h, int(has_part)], np.int64))
    os.replace(tmp, done)
    return len(images)


def _assemble(out: Path, grid: TileGrid, blocks: list[Block], model: dict, settings: dict,
              tile_range, shard, feature_sets: Sequence = ()) -> None:
    """Concatenate the per-block results into the final files; meta.json last."""
    work = out / WORK
    results = []  # small per-block arrays; embeddings are streamed block by block below
    for block in blocks:
        with np.load(work / f"block-{block.index:06d}.npz") as z:
            results.append({k: z[k] for k in ("i", "j", "valid_fraction", "part")})
    n = sum(len(r["i"]) for r in results)
    if n == 0 and shard is None:  # an empty shard (all nodata) is fine: it merges as nothing
        raise MeanNavError(f"{out}: no tile has at least the minimum valid fraction of map data; "
                           "check the maps cover ground, or lower min_valid_fraction")
    dim = int(model["dim"])
    tmp = out / (EMBEDDINGS + ".tmp.npy")
    emb = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, dim))
    pos = 0
    for block, r in zip(blocks, results):
        with np.load(work / f"block-{block.index:06d}.npz") as z:
            emb[pos:pos + len(r["i"])] = z["embeddings"]
        pos += len(r["i"])
    emb.flush()
    del emb
    os.replace(tmp, out / EMBEDDINGS)
    i = np.concatenate([r["i"] for r in results])
    j = np.concatenate([r["j"] for r in results])
    frac = np.concatenate([r["valid_fraction"] for r in results])
    _save_npy_atomic(out / TILES, tile_geometry(grid, i, j, frac))
    parts = []
    for block, r in zip(blocks, results):
        col0, row0, w, h, has = (int(v) for v in r["part"])
        if has:
            parts.append({"file": f"{MAPS_DIR}/part-{block.index:06d}.tif", "col0": col0, "row0": row0,
                          "width": w, "height": h})
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "num_tiles": int(n),
        "dim": dim,
        "embedding_dtype": "float16",
        "model_hash": model["model_hash"],
        "model": model,
        "grid": grid.describe(),
        "tile_range": [int(v) for v in tile_range],
        "min_valid_fraction": settings["min_valid_fraction"],
        "shard": list(shard) if shard else None,
        "sources": settings["sources"],
        "maps": parts,
        "map_features": {},
        "approx_index": None,
    }
    feature_files = []
    for refine, fsettings, dtype in feature_sets:
        name = refine.detector
        cells = [mf.load_cells(mf.block_file(work, name, b.index)) for b in blocks]
        entry, files = mf.write_store(out, name, cells, fsettings, dtype)
        seconds = sum(mf.block_seconds(mf.block_file(work, name, b.index)) for b in blocks)
        log.info("%s map features: %d keypoints, %.0f bytes per tile, made in %.1f s", name,
                 entry["num_keypoints"], sum((out / f).stat().st_size for f in files) / max(n, 1), seconds)
        meta["map_features"][name] = entry
        feature_files += files
    meta["files"] = _file_entries(out, [EMBEDDINGS, TILES] + [p["file"] for p in parts] + feature_files)
    _write_json_atomic(out / META, meta)


# ---------------------------------------------------------------------------- merge

def merge_caches(inputs: Sequence[Path], out: Path, progress: bool = True) -> Path:
    """Merge caches of the same grid and model (e.g. shards) into one; duplicate tiles keep the first."""
    inputs = [Path(p) for p in inputs]
    if len(inputs) < 1:
        raise MeanNavError("merge: give at least one input cache")
    out = Path(out)
    if (out / META).exists():
        raise MeanNavError(f"{out}: already holds a cache; choose a new output folder or delete it")
    caches = [TileCache.load(p, verify=True) for p in inputs]
    first = caches[0]
    for c in caches[1:]:
        for field, a, b in [("model_hash", first.model_hash, c.model_hash), ("dim", first.dim, c.dim),
                            ("preprocessing", first.meta["model"]["preprocessing"], c.meta["model"]["preprocessing"]),
                            ("grid", {k: v for k, v in first.meta["grid"].items() if k != "crs_wkt"},
                             {k: v for k, v in c.meta["grid"].items() if k != "crs_wkt"}),
                            ("crs", first.crs, c.crs)]:
            if a != b:
                raise MeanNavError(f"{c.folder}: {field} differs from {first.folder}; "
                                   "only caches built with the same model, CRS, GSD, tile size and stride merge")
    # keep the first occurrence of every tile (i, j): shards never overlap, areas may
    keep = []
    seen: set[tuple[int, int]] = set()
    for c in caches:
        ij = list(zip(c.tiles["i"].tolist(), c.tiles["j"].tolist()))
        mask = np.fromiter(((t not in seen) for t in ij), bool, len(ij))
        seen.update(ij)
        keep.append(mask)
    n = int(sum(m.sum() for m in keep))
    (out / MAPS_DIR).mkdir(parents=True, exist_ok=True)
    tmp = out / (EMBEDDINGS + ".tmp.npy")
    emb = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, first.dim))
    pos = 0
    tiles = []
    from tqdm import tqdm

    for c, mask in tqdm(list(zip(caches, keep)), desc="merge", unit="cache", disable=not progress):
        idx = np.nonzero(mask)[0]
        for s in range(0, len(idx), 65536):
            chunk = idx[s:s + 65536]
            emb[pos:pos + len(chunk)] = c.embeddings[chunk]
            pos += len(chunk)
        tiles.append(np.asarray(c.tiles[idx]))
    emb.flush()
    del emb
    os.replace(tmp, out / EMBEDDINGS)
    _save_npy_atomic(out / TILES, np.concatenate(tiles))
    parts, sources = [], []
    for c in caches:
        for p in c.meta["maps"]:
            name = f"{MAPS_DIR}/part-{len(parts):06d}.tif"
            shutil.copyfile(c.folder / p["file"], out / (name + ".tmp"))
            os.replace(out / (name + ".tmp"), out / name)
            parts.append({**p, "file": name})
        sources += [s for s in c.meta["sources"] if s not in sources]
    map_features, feature_files = _merge_map_features(caches, out)
    tile_ranges = np.array([c.meta["tile_range"] for c in caches])
    meta = dict(first.meta)
    meta.update({
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "num_tiles": n,
        "tile_range": [int(tile_ranges[:, 0].min()), int(tile_ranges[:, 1].max()),
                       int(tile_ranges[:, 2].min()), int(tile_ranges[:, 3].max())],
        "shard": None,
        "merged_from": [str(c.folder.resolve()) for c in caches],
        "sources": sources,
        "maps": parts,
        "map_features": map_features,
        "approx_index": None,
    })
    meta["files"] = _file_entries(out, [EMBEDDINGS, TILES] + [p["file"] for p in parts] + feature_files)
    _write_json_atomic(out / META, meta)
    for c in caches:
        c.close()
    return out


def _merge_map_features(caches: Sequence["TileCache"], out: Path) -> tuple[dict, list[str]]:
    """Stored map features every input has with the same settings; the first cache wins a cell."""
    entries, files = {}, []
    for name, entry in (caches[0].meta.get("map_features") or {}).items():
        others = [(c.meta.get("map_features") or {}).get(name) for c in caches[1:]]
        if any(o is None or o["settings"] != entry["settings"] for o in others):
            log.warning("merge: %s map features are missing or made differently in some inputs; the merged "
                        "cache has none (the localizer computes them in flight)", name)
            continue
        parts = mf.dedupe_cells([mf.read_store(c.folder, (c.meta["map_features"])[name]) for c in caches])
        merged, names = mf.write_store(out, name, parts, entry["settings"], entry["descriptor_dtype"])
        entries[name] = merged
        files += names
    return entries, files


# ---------------------------------------------------------------------------- search helpers

def _faiss():
    """faiss if installed (the optional `[faiss]` extra), else None."""
    if os.environ.get("MEAN_NAV_NO_FAISS"):
        return None
    # faiss's loader logs at INFO every CPU-variant it fails to find: noise in every replay
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        import faiss  # noqa: F401
    except ImportError:
        return None
    return faiss


_FP16_SCAN_OK: bool | None = None


def _faiss_fp16_scan_works() -> bool:
    """Whether this faiss build's fp16 scan can be fed numpy rows (checked once against numpy).

    The scan fills the index's code vector directly; a faiss release that changes that
    container falls back to numpy instead of failing.
    """
    global _FP16_SCAN_OK
    if _FP16_SCAN_OK is None:
        faiss = _faiss()
        _FP16_SCAN_OK = False
        if faiss is not None:
            try:
                rows = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float16)
                q = np.ones((1, 16), np.float32)
                scanner = faiss.IndexScalarQuantizer(16, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
                faiss.copy_array_to_vector(rows.view(np.uint8).ravel(), scanner.codes)
                scanner.ntotal = len(rows)
                s, i = scanner.search(q, 5)
                expect = rows.astype(np.float32) @ q[0]
                _FP16_SCAN_OK = bool(np.allclose(s[0], expect[i[0]], atol=1e-4))
            except Exception as exc:  # any API difference: use numpy
                log.debug("faiss fp16 scan unavailable (%s); exact search uses numpy", exc)
    return _FP16_SCAN_OK


def exact_topk(embeddings: np.ndarray, queries: np.ndarray, k: int, use_faiss: bool | None = None,
               chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of float32 queries [Q, D] against float16 rows [N, D].

    Streams the (memory-mapped) rows in chunks so memory stays flat. For a few queries each
    chunk is scanned by faiss's fp16 scalar-quantizer kernel (exact: fp16 decodes losslessly
    to fp32), which runs near memory speed; otherwise (or without faiss) numpy converts each
    chunk to fp32 and uses BLAS. use_faiss=True/False forces one path.
    Returns (scores [Q, k'], ids [Q, k']) sorted by decreasing score, k' = min(k, N).
    """
    n, dim = embeddings.shape
    queries = np.ascontiguousarray(queries, np.float32).reshape(-1, dim)
    k = min(int(k), n)
    nq = len(queries)
    if k <= 0:
        return np.zeros((nq, 0), np.float32), np.zeros((nq, 0), np.int64)
    # one or a few queries: memory-bound, faiss's fp16 kernel wins; many queries: BLAS sgemm
    # on fp32-converted chunks is compute-efficient and faster
    wanted = use_faiss if use_faiss is not None else nq <= 8
    faiss = _faiss() if wanted and _faiss_fp16_scan_works() else None
    if use_faiss and faiss is None:
        raise MeanNavError("faiss (with a working fp16 scan) is not installed; pip install faiss-cpu")
    if faiss is None:
        return _topk_chunks(embeddings, queries, k, chunk, None)
    # a few queries run on one thread anyway; waking an OpenMP team per chunk only costs
    # (badly so on a busy CPU), so the scan runs single-threaded and restores the setting
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return _topk_chunks(embeddings, queries, k, chunk, faiss)
    finally:
        faiss.omp_set_num_threads(threads)


def _topk_chunks(embeddings, queries, k, chunk, faiss):
    n, dim = embeddings.shape
    nq = len(queries)
    best_s = np.full((nq, 0), -np.inf, np.float32)
    best_i = np.zeros((nq, 0), np.int64)
    if faiss is not None:
        scanner = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    else:
        buf = np.empty((min(chunk, n), dim), np.float32)
    for start in range(0, n, chunk):
        rows = embeddings[start:start + chunk]
        kk = min(k, len(rows))
        if faiss is not None:
            faiss.copy_array_to_vector(np.ascontiguousarray(rows).view(np.uint8).ravel(), scanner.codes)
            scanner.ntotal = len(rows)
            s, i = scanner.search(queries, kk)
        else:
            b = buf[:len(rows)]
            np.copyto(b, rows)
            scores = queries @ b.T
            i = np.argpartition(-scores, kk - 1, axis=1)[:, :kk] if kk < len(rows) else \
                np.tile(np.arange(len(rows)), (nq, 1))
            s = np.take_along_axis(scores, i, axis=1)
        best_s = np.concatenate([best_s, s.astype(np.float32)], axis=1)
        best_i = np.concatenate([best_i, i.astype(np.int64) + start], axis=1)
        if best_s.shape[1] > k:
            keep = np.argpartition(-best_s, k - 1, axis=1)[:, :k]
            best_s = np.take_along_axis(best_s, keep, axis=1)
            best_i = np.take_along_axis(best_i, keep, axis=1)
    order = np.lexsort((best_i, -best_s), axis=1) if nq else np.zeros((0, 0), np.int64)
    return np.take_along_axis(best_s, order, axis=1), np.take_along_axis(best_i, order, axis=1)


def _scores_rows(rows: np.ndarray, query: np.ndarray) -> np.ndarray:
    return rows.astype(np.float32) @ query


# ---------------------------------------------------------------------------- the cache

class TileCache:
    """A built tile cache, memory-mapped, with exact, local and approximate search."""

    def __init__(self, folder: Path, meta: dict, embeddings: np.ndarray, tiles: np.ndarray):
        self.folder = Path(folder)
        self.meta = meta
        self.embeddings = embeddings
        self.tiles = tiles
        self.grid = TileGrid.from_description(meta["grid"])
        self.crs: CRS = self.grid.crs
        self.gsd_m: float = self.grid.gsd_m
        self.tile_size_m: float = self.grid.tile_size_m
        self.stride_m: float = self.grid.stride_m
        self.tile_px: int = self.grid.tile_px
        self.dim: int = int(meta["dim"])
        self.model_hash: str = meta["model_hash"]
        self.x = np.ascontiguousarray(tiles["x"])
        self.y = np.ascontiguousarray(tiles["y"])
        self.lat = np.ascontiguousarray(tiles["lat"])
        self.lon = np.ascontiguousarray(tiles["lon"])
        self.spatial = GridIndex(self.x, self.y, cell_m=max(4 * self.stride_m, self.tile_size_m))
        self.mosaic = MapMosaic(self.folder, meta.get("maps", []))
        self._approx = None

    # -- loading
    @classmethod
    def load(cls, folder, expect_model_hash: str | None = None, verify: bool = True) -> "TileCache":
        """Open a cache; check format, file sizes, checksums (verify) and the model hash."""
        folder = Path(folder)
        meta_path = folder / META
        if not folder.is_dir():
            raise MeanNavError(f"{folder}: tile cache folder not found; build one with `mean-nav cache build`")
        if not meta_path.is_file():
            if (folder / WORK).is_dir():
                raise MeanNavError(f"{folder}: cache build did not finish (no {META}); rerun the same "
                                   "`mean-nav cache build` command to resume it")
            raise MeanNavError(f"{folder}: not a tile cache (no {META}); build one with `mean-nav cache build`")
        meta, checked = read_meta(meta_path, FORMAT, FORMAT_VERSION)
        required = [EMBEDDINGS, TILES] + [p.file for p in checked.maps]
        required += [checked.approx_index.file] if checked.approx_index else []
        required += mf.manifest_names(meta_path, checked.map_features)
        check_manifest(folder, checked, required, verify, sha256_file)
        grid = checked.grid
        try:
            crs = CRS.from_wkt(grid.crs_wkt)
        except CRSError as exc:
            raise MeanNavError(f"{meta_path}: grid.crs_wkt is not a CRS pyproj reads ({show(str(exc))}); the "
                               "cache is damaged, rebuild it") from None
        if not crs.is_projected:
            raise MeanNavError(f"{meta_path}: grid.crs_wkt is not a projected (metric) CRS; the cache is "
                               "damaged, rebuild it")
        if expect_model_hash is not None and expect_model_hash != meta["model_hash"]:
            raise MeanNavError(
                f"{folder}: cache was built with model {meta['model_hash']}, but the loaded model is "
                f"{expect_model_hash}; rebuild the cache with this model or load the model it was built with")
        try:
            emb = np.load(folder / EMBEDDINGS, mmap_mode="r")
            tiles = np.load(folder / TILES, mmap_mode="r")
        except (ValueError, OSError) as exc:
            raise MeanNavError(f"{folder}: cannot read the cache arrays ({exc}); rebuild the cache") from None
        n, dim = int(meta["num_tiles"]), int(meta["dim"])
        if emb.dtype != np.float16 or emb.shape != (n, dim):
            raise MeanNavError(f"{folder / EMBEDDINGS}: holds {emb.shape} {emb.dtype}, meta.json says "
                               f"({n}, {dim}) float16; rebuild the cache")
        if tiles.dtype != TILE_DTYPE or tiles.shape != (n,):
            raise MeanNavError(f"{folder / TILES}: unexpected layout {tiles.dtype} {tiles.shape}; rebuild the cache")
        return cls(folder, meta, emb, tiles)

    def close(self) -> None:
        self.mosaic.close()

    def __len__(self) -> int:
        return len(self.tiles)

    def check_model(self, embedder: Embedder) -> None:
        """Refuse an embedder other than the one the cache was built with (weights, dim, preprocessing)."""
        if embedder.model_hash != self.model_hash:
            raise MeanNavError(
                f"{self.folder}: cache was built with model {self.model_hash}, but the loaded model is "
                f"{embedder.model_hash}; rebuild the cache with this model or load the model it was built with")
        if int(embedder.dim) != self.dim:
            raise MeanNavError(f"{self.folder}: cache holds {self.dim}-d descriptors, the model gives "
                               f"{embedder.dim}-d; rebuild the cache with this model")
        built = self.meta["model"].get("preprocessing")
        if built is not None and json.loads(json.dumps(asdict(embedder.preprocessing))) != built:
            raise MeanNavError(f"{self.folder}: cache was built with preprocessing {built}, the model uses "
                               f"{asdict(embedder.preprocessing)}; rebuild the cache with this model's settings")

    # -- queries
    def _query(self, query) -> np.ndarray:
        q = np.asarray(query, np.float32)
        if q.ndim == 2 and q.shape[0] == 1:
            q = q[0]
        if q.ndim != 1 or q.shape[0] != self.dim:
            raise MeanNavError(f"query: descriptor has shape {tuple(np.shape(query))}, the cache {self.folder} "
                               f"holds {self.dim}-d descriptors; embed with the model the cache was built with")
        if not np.all(np.isfinite(q)):
            raise MeanNavError("query: descriptor contains NaN or inf; check the embedder output")
        return q

    def _hits(self, ids, scores) -> list[TileHit]:
        return [TileHit(int(t), float(s), float(self.lat[t]), float(self.lon[t]), float(self.x[t]),
                        float(self.y[t])) for t, s in zip(ids, scores)]

    def search(self, query: np.ndarray, k: int = 10) -> list[TileHit]:
        """Exact global top-k by cosine similarity."""
        q = self._query(query)
        scores, ids = exact_topk(self.embeddings, q[None], k)
        return self._hits(ids[0], scores[0])

    def search_near(self, query, lat: float, lon: float, radius_m: float, k: int = 10) -> list[TileHit]:
        """Exact top-k among tiles whose centre is within radius_m of (lat, lon)."""
        q = self._query(query)
        if not radius_m >= 0:
            raise MeanNavError(f"radius_m: {radius_m} must be a non-negative distance in metres")
        x, y = self.lonlat_to_xy(lon, lat)
        ids = self.spatial.query_radius(x, y, radius_m)
        if len(ids) == 0:
            return []
        # gather the candidates' fp16 rows (contiguous runs: ids follow the tile grid) and
        # scan them like the global search does
        scores, top = exact_topk(self.embeddings[ids], q[None], k)
        return self._hits(ids[top[0]], scores[0])

    def search_approx(self, query, k: int = 10) -> list[TileHit]:
        """Approximate top-k through the faiss index (re-ranked exactly); exact search without one."""
        q = self._query(query)
        entry = self.meta.get("approx_index")
        if not entry:
            log.debug("%s: no approximate index, using exact search", self.folder)
            return self.search(q, k)
        index = self._approx_index()
        rerank = max(k, int(entry.get("rerank", 0)) or k)
        _, cand = index.search(q[None], min(rerank, len(self)))
        cand = np.unique(cand[0][cand[0] >= 0])
        if len(cand) == 0:
            return []
        scores = _scores_rows(self.embeddings[cand], q)
        order = np.lexsort((cand, -scores))[:k]
        return self._hits(cand[order], scores[order])

    def _approx_index(self):
        if self._approx is None:
            faiss = _faiss()
            if faiss is None:
                raise MeanNavError(f"{self.folder}: has a faiss index but faiss is not installed; "
                                   "pip install faiss-cpu (the [faiss] extra) or use exact search")
            entry = self.meta["approx_index"]
            index = faiss.read_index(str(self.folder / entry["file"]))
            if "nprobe" in entry and hasattr(faiss, "extract_index_ivf"):
                try:
                    faiss.extract_index_ivf(index).nprobe = int(entry["nprobe"])
                except RuntimeError:
                    pass  # not an IVF index (HNSW)
            if "ef_search" in entry:
                faiss.ParameterSpace().set_index_parameter(index, "efSearch", int(entry["ef_search"]))
            self._approx = index
        return self._approx

    def build_approx_index(self, factory: str | None = None, nprobe: int | None = None, rerank: int = 100,
                           train_size: int = 100_000, seed: int = 0, progress: bool = True) -> dict:
        """Train and store a faiss index (`approx.faiss`), then rewrite meta.json atomically.

        Default: IVF<sqrt N> with product-quantised codes (dim/8 bytes per tile), re-ranked
        exactly from the fp16 embeddings, so memory stays small for very large caches.
        """
        faiss = _faiss()
        if faiss is None:
            raise MeanNavError("faiss is not installed; install the [faiss] extra (pip install faiss-cpu)")
        n = len(self)
        if factory is None:
            nlist = int(np.clip(np.sqrt(n), 1, max(1, n // 39)))
            m = next((m for m in (self.dim // 8, self.dim // 4, self.dim // 2, self.dim)
                      if m >= 1 and self.dim % m == 0), self.dim)
            factory = f"IVF{nlist},PQ{m}" if n >= 10_000 else f"IVF{nlist},Flat"
        if nprobe is None:
            nprobe = 64  # recall@10 0.97 at 1M tiles with IVF1000,PQ96 (see `mean-nav bench cache`)
        try:
            index = faiss.index_factory(self.dim, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise MeanNavError(f"factory: faiss cannot build {factory!r} ({str(exc).splitlines()[0]}); "
                               "use a faiss index_factory string such as IVF1024,PQ96") from None
        rng = np.random.default_rng(seed)
        train_ids = np.sort(rng.choice(n, size=min(n, train_size), replace=False))
        from tqdm import tqdm

        t0 = time.perf_counter()
        index.train(np.asarray(self.embeddings[train_ids], np.float32))
        chunk = 65536
        for s in tqdm(range(0, n, chunk), desc="approx index", unit="chunk", disable=not progress):
            index.add(np.asarray(self.embeddings[s:s + chunk], np.float32))
        build_s = time.perf_counter() - t0
        tmp = self.folder / (APPROX + ".tmp")
        faiss.write_index(index, str(tmp))
        os.replace(tmp, self.folder / APPROX)
        entry = {"file": APPROX, "factory": factory, "nprobe": int(nprobe), "rerank": int(rerank),
                 "build_s": round(build_s, 2)}
        if "HNSW" in factory:
            entry["ef_search"] = max(64, 2 * int(rerank))
        meta = dict(self.meta)
        meta["approx_index"] = entry
        meta["files"] = {**meta["files"], **_file_entries(self.folder, [APPROX])}
        _write_json_atomic(self.folder / META, meta)
        self.meta = meta
        self._approx = None
        return entry

    # -- geometry
    def xy_to_lonlat(self, x, y) -> tuple:
        lon, lat = to_lonlat(self.crs, x, y)
        return lon, lat

    def lonlat_to_xy(self, lon, lat) -> tuple:
        x, y = from_lonlat(self.crs, lon, lat)
        return x, y

    def _tile_origin(self, tile_id: int) -> tuple[int, int]:
        if not 0 <= int(tile_id) < len(self):
            raise MeanNavError(f"tile_id: {tile_id} is outside this cache (0..{len(self) - 1})")
        rec = self.tiles[int(tile_id)]
        return int(rec["i"]) * self.grid.stride_px, int(rec["j"]) * self.grid.stride_px

    def tile_pixel_to_xy(self, tile_id: int, col, row) -> tuple:
        """Tile pixel coordinates (centres at integers, north-up) -> metric (x, y)."""
        c0, r0 = self._tile_origin(tile_id)
        return self.grid.pixel_to_xy(c0 + np.asarray(col, np.float64), r0 + np.asarray(row, np.float64))

    def xy_to_tile_pixel(self, tile_id: int, x, y) -> tuple:
        """Metric (x, y) -> fractional tile pixel (col, row) of tile_id."""
        c0, r0 = self._tile_origin(tile_id)
        col, row = self.grid.xy_to_pixel(x, y)
        return col - c0, row - r0

    def tile_at(self, x: float, y: float) -> int | None:
        """The tile whose centre is nearest metric (x, y), if (x, y) lies inside it."""
        half = self.tile_size_m / 2.0
        t = self.spatial.nearest(x, y, half * np.sqrt(2.0))
        if t is None or abs(self.x[t] - x) > half or abs(self.y[t] - y) > half:
            return None
        return t

    def tile_image(self, tile_id: int) -> np.ndarray:
        """[tile_px, tile_px, 3] RGB uint8 north-up pixels of a tile (black where no map)."""
        c0, r0 = self._tile_origin(tile_id)
        self._require_maps()
        image, _ = self.mosaic.read(c0, r0, self.tile_px, self.tile_px)
        return image

    def region_window(self, x: float, y: float, size_m: float) -> tuple[int, int, int]:
        """(col0, row0, size_px): the global pixel window of about size_m centred at metric (x, y)."""
        size_px = int(round(size_m / self.gsd_m))
        if size_px < 1:
            raise MeanNavError(f"size_m: {size_m} m is smaller than one {self.gsd_m} m pixel")
        col, row = self.grid.xy_to_pixel(x, y)
        c0 = int(np.floor(float(col) - (size_px - 1) / 2.0 + 0.5))
        r0 = int(np.floor(float(row) - (size_px - 1) / 2.0 + 0.5))
        return c0, r0, size_px

    def region(self, x: float, y: float, size_m: float) -> RegionCrop:
        """North-up crop of about size_m centred at metric (x, y) at the cache GSD, with its transform."""
        self._require_maps()
        c0, r0, size_px = self.region_window(x, y, size_m)
        image, valid = self.mosaic.read(c0, r0, size_px, size_px)
        return RegionCrop(image, valid, self.grid.transform(c0, r0))

    def region_image(self, x: float, y: float, size_m: float) -> tuple[np.ndarray, np.ndarray]:
        """North-up RGB crop centred at metric (x, y) at the cache GSD, plus its valid mask."""
        crop = self.region(x, y, size_m)
        return crop.image, crop.valid

    def _feature_bytes(self, entry: dict) -> int:
        return sum(e["bytes"] for n, e in self.meta["files"].items() if n.startswith(entry["dir"] + "/"))

    def _require_maps(self) -> None:
        if not self.meta.get("maps"):
            raise MeanNavError(f"{self.folder}: cache holds no map pixels (built without maps); "
                               "rebuild it from the orthophotos to use tile images")

    def describe(self) -> str:
        """Human-readable summary for `mean-nav cache info`."""
        m = self.meta
        g = m["grid"]
        lat0, lat1, lon0, lon1 = ((float(self.lat.min()), float(self.lat.max()), float(self.lon.min()),
                                   float(self.lon.max())) if len(self) else (np.nan,) * 4)
        total = sum(e["bytes"] for e in m["files"].values())
        lines = [
            f"cache          {self.folder}",
            f"format         {m['format']} v{m['format_version']} (created {m.get('created_utc', '?')})",
            f"tiles          {len(self)}  ({total / max(len(self), 1):.0f} bytes/tile on disk, {total / 1e6:.1f} MB)",
            f"model          {m['model_hash']}  dim {m['dim']}  {m['model'].get('precision', '?')} "
            f"({m['model'].get('backend', '?')})",
            f"preprocessing  {json.dumps(m['model'].get('preprocessing'))}",
            f"grid           {g['crs']}  gsd {g['gsd_m']} m  tile {g['tile_size_m']} m ({g['tile_px']} px)  "
            f"stride {g['stride_m']} m",
            f"extent         lat {lat0:.6f}..{lat1:.6f}  lon {lon0:.6f}..{lon1:.6f}",
            f"map parts      {len(m.get('maps', []))}",
            "map features   " + (", ".join(f"{k} ({e['num_keypoints']} keypoints, "
                                           f"{self._feature_bytes(e) / max(len(self), 1):.0f} bytes/tile)"
                                           for k, e in (m.get("map_features") or {}).items()) or "none"),
            f"approx index   {m['approx_index']['factory'] if m.get('approx_index') else 'none'}",
            f"shard          {m['shard'][0]}/{m['shard'][1]}" if m.get("shard") else "shard          none",
            "sources        " + ("\n               ".join(f"{s['path']} ({s['crs']})" for s in m.get("sources", []))
                                 or "none"),
        ]
        return "\n".join(lines)
