"""`mean-nav cache`: build, inspect, search, merge and index satellite-tile caches."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from ..errors import MeanNavError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="{build,info,search,merge,index}")

    b = sub.add_parser("build", help="GeoTIFF orthophotos -> tiles -> embeddings -> cache folder")
    b.add_argument("maps", nargs="+", type=Path, help="GeoTIFF orthophotos (any CRS); overlapping maps merge")
    b.add_argument("--out", "-o", type=Path, required=True, help="cache folder to create (or resume)")
    b.add_argument("--model", "-m", type=Path, required=True, help="deploy model: .onnx, .engine or checkpoint .pt")
    b.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt", "torch"])
    b.add_argument("--threads", type=int, default=None, help="inference threads (CPU backends)")
    b.add_argument("--gsd", type=float, required=True, help="ground resolution of the tiles, m/pixel")
    b.add_argument("--tile-size", type=float, required=True, help="tile side in metres (a multiple of --gsd)")
    b.add_argument("--stride", type=float, default=None, help="tile stride in metres (default: half the tile)")
    b.add_argument("--crs", default=None, help="metric CRS of the tiles (default: UTM zone of the area centre)")
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--min-valid", type=float, default=0.5, help="skip tiles with less valid map than this fraction")
    b.add_argument("--shard", default=None, help="build part i of n of the area (i/n, 0-based); merge the parts "
                   "with `mean-nav cache merge`. Under torchrun, RANK/WORLD_SIZE choose the shard")
    b.add_argument("--block-px", type=int, default=4096, help="pixels per processing block side (memory vs. overhead)")
    b.add_argument("--features", default="sift", metavar="DETECTORS",
                   help="map features to store, comma-separated (sift, orb, xfeat) or `none`; the localizer's "
                        "localizer.refine.detector must be among them or it computes map features in flight")
    b.add_argument("--max-features", type=int, default=1500,
                   help="features per map region, as localizer.refine.max_features (must match it)")
    b.add_argument("--xfeat-models", metavar="DIR",
                   help="for --features xfeat: the folder from `mean-nav export-features -o` (localizer.refine.xfeat_models)")
    b.add_argument("--approx", default=None, metavar="FACTORY",
                   help="also build a faiss index (`auto` or a faiss factory string such as IVF1024,PQ96)")
    b.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run the blocks as tasks on a Ray cluster (`[ray]` extra): ADDRESS of its head (e.g. "
                   "head:6379, ray://head:10001); without one $RAY_ADDRESS, else a local cluster. Maps, model "
                   "and --out must be paths every node sees, unless --ray-ship")
    b.add_argument("--ray-ship", action="store_true",
                   help="no shared storage: send model and maps to the workers through Ray's object store and "
                   "the block results back to this machine")
    b.add_argument("--ray-cpus-per-task", type=float, default=1.0,
                   help="CPUs each block task reserves (default 1; also the inference threads unless --threads)")
    b.add_argument("--ray-gpus-per-task", type=float, default=None,
                   help="GPUs each block task reserves (default: 1 when the cluster has GPUs, else 0)")
    b.add_argument("--no-progress", action="store_true")

    i = sub.add_parser("info", help="print what a cache holds (meta.json summary)")
    i.add_argument("cache", type=Path)
    i.add_argument("--json", action="store_true", help="print meta.json as it is")
    i.add_argument("--no-verify", action="store_true", help="skip checksum verification")

    s = sub.add_parser("search", help="search a cache with an image or a stored tile's descriptor")
    s.add_argument("cache", type=Path)
    q = s.add_mutually_exclusive_group(required=True)
    q.add_argument("--image", type=Path, help="query image (needs --model)")
    q.add_argument("--tile-id", type=int, help="use this tile's stored descriptor as the query")
    s.add_argument("--model", "-m", type=Path, help="deploy model for --image (must match the cache)")
    s.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt", "torch"])
    s.add_argument("-k", type=int, default=10)
    s.add_argument("--near", default=None, metavar="LAT,LON", help="search only near this position")
    s.add_argument("--radius", type=float, default=2000.0, help="radius in metres for --near")
    s.add_argument("--approx", action="store_true", help="use the approximate index")
    s.add_argument("--json", action="store_true")

    m = sub.add_parser("merge", help="merge caches built with the same model and grid (e.g. shards)")
    m.add_argument("inputs", nargs="+", type=Path)
    m.add_argument("--out", "-o", type=Path, required=True)
    m.add_argument("--no-progress", action="store_true")

    x = sub.add_parser("index", help="build the approximate (faiss) index of a cache")
    x.add_argument("cache", type=Path)
    x.add_argument("--factory", default=None, help="faiss index_factory string (default: IVF<sqrt N>,PQ<dim/8>)")
    x.add_argument("--nprobe", type=int, default=64, help="IVF lists probed per query")
    x.add_argument("--rerank", type=int, default=100, help="candidates re-ranked exactly per query")
    x.add_argument("--no-progress", action="store_true")


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise MeanNavError(f"--shard: {text!r} is not i/n (e.g. 0/4)") from None
    if not (n >= 1 and 0 <= i < n):
        raise MeanNavError(f"--shard: {text!r} needs 0 <= i < n")
    return i, n


def parse_features(text: str, max_features: int, xfeat_models: str | None = None) -> list:
    """--features sift,orb -> RefineConfigs of the map features to store ([] for `none`)."""
    from ..nav.features import DEFAULT_MATCHER
    from ..nav.refine import RefineConfig

    if text.strip().lower() == "none":
        return []
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in DEFAULT_MATCHER]
    if unknown or not names:
        raise MeanNavError(f"--features: {text!r} names no known detector; use a comma-separated list of "
                           f"{sorted(DEFAULT_MATCHER)} or `none`")
    if max_features < 1:
        raise MeanNavError(f"--max-features: {max_features} must be at least 1")
    return [RefineConfig(detector=n, max_features=max_features, xfeat_models=xfeat_models) for n in names]


def _torchrun_shard() -> tuple[int, int] | None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else None


def run(args) -> int:
    return {"build": _build, "info": _info, "search": _search, "merge": _merge, "index": _index}[args.action](args)


def _build(args) -> int:
    from ..deploy.backends import load_embedder
    from .cache import TileCache, build_cache

    shard = parse_shard(args.shard)
    out = args.out
    if shard is None and _torchrun_shard() is not None:
        shard = _torchrun_shard()
        out = out / f"shard-{shard[0]:03d}-of-{shard[1]:03d}"
    features = parse_features(args.features, args.max_features, args.xfeat_models)
    embedder = load_embedder(args.model, backend=args.backend, threads=args.threads)
    stride = args.stride if args.stride is not None else args.tile_size / 2
    runner = None
    if args.ray is not None:
        from .ray_build import ModelSpec, RayBlockRunner

        threads = args.threads or max(1, int(args.ray_cpus_per_task))
        runner = RayBlockRunner(ModelSpec(str(Path(args.model).resolve()), args.backend, threads),
                                embedder.model_hash, address=args.ray or None, ship=args.ray_ship,
                                gpus_per_task=args.ray_gpus_per_task, cpus_per_task=args.ray_cpus_per_task)
    try:
        build_cache(args.maps, out, embedder, gsd_m=args.gsd, tile_size_m=args.tile_size, stride_m=stride,
                    crs=args.crs, batch_size=args.batch_size, shard=shard, min_valid_fraction=args.min_valid,
                    progress=not args.no_progress, block_px=args.block_px, runner=runner, features=features)
    finally:
        embedder.close()
    cache = TileCache.load(out, verify=False)
    if args.approx:
        cache.build_approx_index(factory=None if args.approx == "auto" else args.approx,
                                 progress=not args.no_progress)
    print(cache.describe())
    if shard is not None:
        print(f"\nshard {shard[0]}/{shard[1]} done; when all shards are built: "
              f"mean-nav cache merge <shard folders> --out <cache>")
    return 0


def _info(args) -> int:
    from .cache import TileCache

    cache = TileCache.load(args.cache, verify=not args.no_verify)
    print(json.dumps(cache.meta, indent=2) if args.json else cache.describe())
    return 0


def _search(args) -> int:
    from .cache import TileCache

    cache = TileCache.load(args.cache, verify=False)
    if args.image is not None:
        if args.model is None:
            raise MeanNavError("--image needs --model: the deploy model the cache was built with")
        from ..deploy.backends import load_embedder
        from ..deploy.images import read_image_rgb

        embedder = load_embedder(args.model, backend=args.backend)
        cache.check_model(embedder)
        query = embedder.embed([read_image_rgb(args.image)])[0]
        embedder.close()
    else:
        if not 0 <= args.tile_id < len(cache):
            raise MeanNavError(f"--tile-id: {args.tile_id} is outside the cache (0..{len(cache) - 1})")
        query = np.asarray(cache.embeddings[args.tile_id], np.float32)
    if args.near:
        try:
            lat, lon = (float(v) for v in args.near.split(","))
        except ValueError:
            raise MeanNavError(f"--near: {args.near!r} is not LAT,LON in degrees") from None
        hits = cache.search_near(query, lat, lon, args.radius, args.k)
    elif args.approx:
        hits = cache.search_approx(query, args.k)
    else:
        hits = cache.search(query, args.k)
    if args.json:
        print(json.dumps([h.__dict__ for h in hits], indent=2))
    else:
        print(f"{'rank':>4} {'tile':>8} {'score':>7} {'lat':>12} {'lon':>12} {'x':>12} {'y':>12}")
        for r, h in enumerate(hits, 1):
            print(f"{r:>4} {h.tile_id:>8} {h.score:7.4f} {h.lat:12.7f} {h.lon:12.7f} {h.x:12.2f} {h.y:12.2f}")
    return 0


def _merge(args) -> int:
    from .cache import TileCache, merge_caches

    merge_caches(args.inputs, args.out, progress=not args.no_progress)
    print(TileCache.load(args.out, verify=False).describe())
    return 0


def _index(args) -> int:
    from .cache import TileCache

    cache = TileCache.load(args.cache, verify=True)
    entry = cache.build_approx_index(factory=args.factory, nprobe=args.nprobe, rerank=args.rerank,
                                     progress=not args.no_progress)
    print(f"approximate index {entry['factory']} written to {cache.folder / entry['file']} "
          f"(nprobe {entry['nprobe']}, rerank {entry['rerank']}, {entry['build_s']} s)")
    return 0
