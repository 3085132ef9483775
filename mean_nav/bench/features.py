"""`mean-nav bench features`: local features for refinement, quality and speed in one run.

    mean-nav bench features --models models/ --images ../shared/data/orthophotos

Quality: map regions cut from real orthophotos, and queries cut from inside them at a known
offset, then changed as a camera frame differs from a map of another source and season
(colour and season-like shifts, blur, another ground resolution, JPEG, shadows, all of them
together, a 30 deg heading error, after the localizer's heading recovery) plus a query of another place (a verified fix there is a
false fix). Per method (SIFT, ORB with the ratio test; XFeat with mutual nearest neighbours
and with LighterGlue): RANSAC inliers, verified rate and position error of the verified
fixes, through the localizer's own FeatureMatcher (same geometry and thresholds).

Speed, side by side (methods timed in turn within each repeat): per query size, query
extraction and per-candidate matching times
(matching includes RANSAC and the fit) with map features already stored, a frame's time
with `--candidates` candidates (p50 and p95), map-region extraction (what the cache build
or the in-flight fallback pays), and XFeat / LighterGlue in torch for reference. Absolute
times depend on the machine's load; compare methods within one run.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from ..errors import MeanNavError
from ..nav.localizer import LocalizerConfig
from ..nav.refine import FeatureMatcher, RefineConfig

METHODS = {   # name -> (detector, matcher)
    "sift": ("sift", "ratio"),
    "orb": ("orb", "ratio"),
    "xfeat+mnn": ("xfeat", "mnn"),
    "xfeat+lighterglue": ("xfeat", "lighterglue"),
}
CONDITIONS = ("same", "colour", "season", "blur", "gsd", "jpeg", "shadows", "all", "heading30", "other place")
WRONG_FIX_M = 5.0   # a verified fix further than this from the truth counts as wrong
HEADING_MIN_INLIERS = LocalizerConfig().heading_min_inliers   # a turned fit the heading recovery takes up


# ----------------------------------------------------------------------------- test pairs


@dataclass
class Pair:
    map_name: str
    region: np.ndarray          # the map around a candidate, north-up
    region_valid: np.ndarray
    query: np.ndarray           # the rectified camera view
    query_valid: np.ndarray
    truth_px: tuple[float, float]   # the query centre in region pixels
    gsd_m: float
    condition: str


def _read_map(path: Path) -> tuple[np.ndarray, np.ndarray, float]:
    import rasterio

    from ..deploy.images import _read_geotiff_rgb

    rgb, valid = _read_geotiff_rgb(path)
    with rasterio.open(path) as src:
        gsd = float(abs(src.res[0]))
    return rgb, valid, gsd


def _season(img: np.ndarray, rng) -> np.ndarray:
    """Green vegetation towards dry brown, brighter and less saturated: a spring map vs a summer frame."""
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV).astype(np.float32)
    green = (hsv[..., 0] > 25) & (hsv[..., 0] < 95)
    hsv[..., 0] = np.where(green, hsv[..., 0] - rng.uniform(20, 30), hsv[..., 0])
    hsv[..., 1] *= rng.uniform(0.4, 0.6)
    # leaf-off canopy: vegetation loses its fine texture and brightens
    value = hsv[..., 2]
    smooth = cv2.GaussianBlur(value, (0, 0), 3)
    hsv[..., 2] = np.clip(np.where(green, 0.4 * value + 0.6 * smooth, value) * rng.uniform(1.1, 1.3) + 15, 0, 255)
    hsv[..., 0] %= 180
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)


def _colour(img: np.ndarray, rng) -> np.ndarray:
    """Another camera's white balance, gamma and contrast."""
    x = img.astype(np.float32) / 255
    x = x * rng.uniform(0.7, 1.3, 3)[None, None]
    x = np.clip(x, 0, 1) ** rng.choice([rng.uniform(0.5, 0.7), rng.uniform(1.5, 2.0)])
    x = (x - 0.5) * rng.uniform(0.5, 0.8) + 0.5 + rng.uniform(-0.1, 0.1)
    return (np.clip(x, 0, 1) * 255).astype(np.uint8)


def _shadows(img: np.ndarray, rng) -> np.ndarray:
    """Soft dark blobs (clouds, buildings' shadows at another time of day)."""
    h, w = img.shape[:2]
    field = cv2.resize(rng.random((4, 4)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    shade = np.where(field > 0.5, 0.35, 1.0).astype(np.float32)
    shade = cv2.GaussianBlur(shade, (0, 0), 6)
    return (img.astype(np.float32) * shade[..., None]).astype(np.uint8)


def _blur(img, rng):
    return cv2.GaussianBlur(img, (0, 0), rng.uniform(2.0, 3.0))   # motion / focus / haze


def _gsd(img, rng):
    """A map of 3x coarser ground resolution, resampled to the cache's."""
    h, w = img.shape[:2]
    small = cv2.resize(img, (w // 3, h // 3), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def _jpeg(img, rng):
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 10])
    return cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


CHANGES = {"colour": [_colour], "season": [_season], "blur": [_blur], "gsd": [_gsd], "jpeg": [_jpeg],
           "shadows": [_shadows], "all": [_season, _colour, _shadows, _gsd, _jpeg]}


def rotate_view(img: np.ndarray, valid: np.ndarray, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    """The view rectified with a heading wrong by `degrees` (rotated about its centre)."""
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), degrees, 1.0)
    out = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR)
    mask = cv2.warpAffine(valid.astype(np.uint8), m, (w, h), flags=cv2.INTER_NEAREST) > 0
    return out, mask


def build_pairs(maps: list[Path], per_map: int, query_px: int, region_px: int, seed: int = 0) -> list[Pair]:
    rng = np.random.default_rng(seed)
    pairs = []
    loaded = [(p.name, *_read_map(p)) for p in maps]
    for index, (name, rgb, valid, gsd) in enumerate(loaded):
        h, w = rgb.shape[:2]
        if min(h, w) < region_px:
            continue
        found = 0
        for _ in range(per_map * 50):
            if found == per_map:
                break
            r0, c0 = (int(rng.integers(0, h - region_px + 1)), int(rng.integers(0, w - region_px + 1)))
            if not valid[r0:r0 + region_px, c0:c0 + region_px].all():
                continue
            found += 1
            region = rgb[r0:r0 + region_px, c0:c0 + region_px]
            span = (region_px - query_px) // 2
            dr, dc = (int(v) for v in rng.integers(-span // 2, span // 2 + 1, 2))
            qr, qc = (region_px - query_px) // 2 + dr, (region_px - query_px) // 2 + dc
            clean = region[qr:qr + query_px, qc:qc + query_px]
            truth = (qc + query_px / 2 - 0.5, qr + query_px / 2 - 0.5)
            full = np.ones((query_px, query_px), bool)
            region_ok = np.ones((region_px, region_px), bool)
            for condition in CONDITIONS:
                query, qvalid = clean, full
                if condition in CHANGES:
                    for change in CHANGES[condition]:
                        query = change(query, rng)
                elif condition == "heading30":
                    query, qvalid = rotate_view(_season(clean, rng), full, 30.0)
                elif condition == "other place":
                    other = loaded[(index + 1) % len(loaded)]
                    query = _other_place(other[1], other[2], query_px, rng)
                    if query is None:
                        continue
                pairs.append(Pair(name, region, region_ok, np.ascontiguousarray(query), qvalid, truth, gsd, condition))
    if not pairs:
        raise MeanNavError(f"no orthophoto of at least {region_px} px fully surveyed among {len(maps)}; "
                           "pass --images with larger maps or a smaller --region-px")
    return pairs


def _other_place(rgb, valid, size, rng):
    h, w = rgb.shape[:2]
    for _ in range(50):
        r, c = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        if valid[r:r + size, c:c + size].all():
            return rgb[r:r + size, c:c + size]
    return None


# ----------------------------------------------------------------------------- methods


def make_matchers(methods: list[str], models: str | None, max_features: int,
                  xfeat_features: list[int], threads: int | None = None) -> dict[str, FeatureMatcher]:
    """label -> FeatureMatcher; XFeat methods once per keypoint budget (`xfeat+mnn/512`) and per
    models folder when `models` names several (comma-separated: `xfeat+lighterglue/512@new`)."""
    out = {}
    folders = [m.strip() for m in (models or "").split(",") if m.strip()]
    for name in methods:
        if name not in METHODS:
            raise MeanNavError(f"--methods: unknown method {name!r}; use some of {', '.join(METHODS)}")
        detector, matcher = METHODS[name]
        if detector == "xfeat" and not folders:
            raise MeanNavError("--models: the folder from `mean-nav export-features -o` is needed for xfeat")
        for folder in folders if detector == "xfeat" else [None]:
            suffix = f"@{Path(folder).name}" if folder and len(folders) > 1 else ""
            for n in xfeat_features if detector == "xfeat" else [max_features]:
                cfg = RefineConfig(detector=detector, matcher=matcher, xfeat_models=folder, max_features=n,
                                   feature_threads=threads)
                out[f"{name}/{n}{suffix}"] = FeatureMatcher(cfg)
    return out


def quality(matchers: dict[str, FeatureMatcher], pairs: list[Pair]) -> list[dict]:
    rows = {}
    for name, fm in tqdm(matchers.items(), desc="quality: methods", unit="method"):
        regions: dict[int, object] = {}
        for pair in tqdm(pairs, desc=f"  {name}: pairs", unit="pair", leave=False):
            key = id(pair.region)
            if key not in regions:
                regions[key] = fm.features(pair.region, pair.region_valid)
            q = fm.features(pair.query, pair.query_valid)
            centre = (pair.query.shape[1] / 2 - 0.5, pair.query.shape[0] / 2 - 0.5)
            result = fm.match(q, regions[key], centre)
            if pair.condition == "heading30" and result.rotation_only and result.inliers >= HEADING_MIN_INLIERS:
                # the heading recovery (nav/verify.py) confirms such a turn on the next frame and from
                # then on turns the query back by it before extracting; the nadir (centre) stays put
                turned, turned_valid = rotate_view(pair.query, pair.query_valid, -result.rotation_deg)
                result = fm.match(fm.features(turned, turned_valid), regions[key], centre)
            err = math.nan
            if result.ok and pair.condition != "other place":
                err = math.hypot(result.nadir_px[0] - pair.truth_px[0], result.nadir_px[1] - pair.truth_px[1]) * pair.gsd_m
            row = rows.setdefault((name, pair.condition), {"method": name, "condition": pair.condition, "pairs": 0,
                                                           "verified": 0, "wrong": 0, "inliers": [], "errors": []})
            row["pairs"] += 1
            row["inliers"].append(result.inliers)
            if result.ok:
                row["verified"] += 1
                if pair.condition == "other place" or err > WRONG_FIX_M:
                    row["wrong"] += 1
                else:
                    row["errors"].append(err)
    out = []
    for row in rows.values():
        inl, errs = row.pop("inliers"), row.pop("errors")
        row["median_inliers"] = float(np.median(inl))
        row["verified_rate"] = row["verified"] / row["pairs"]
        row["median_error_m"] = float(np.median(errs)) if errs else math.nan
        out.append(row)
    return out


def _median_ms(fn, repeats: int) -> tuple[float, float, object]:
    result = fn()   # warm-up (sessions allocate on the first run)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(1000 * (time.perf_counter() - t0))
    return float(np.percentile(times, 50)), float(np.percentile(times, 95)), result


def _ms(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = fn()
    return 1000 * (time.perf_counter() - t0), result


def speed(matchers: dict[str, FeatureMatcher], image: np.ndarray, sizes: list[int], candidates: int,
          repeats: int) -> list[dict]:
    """Per size, every method timed in turn within each repeat (round robin), so a change in
    the machine's load reaches all methods alike and their ratios hold."""
    rows = []
    for size in tqdm(sizes, desc="speed: query sizes", unit="size"):
        query = np.ascontiguousarray(image[:size, :size])
        region = np.ascontiguousarray(image[: 2 * size, : 2 * size])   # tile + half a tile each side
        centre = (size / 2 - 0.5, size / 2 - 0.5)
        feats, times = {}, {}
        for name, fm in matchers.items():   # warm-up: sessions allocate on their first runs
            feats[name] = (fm.features(query), fm.features(region))
            fm.match(*feats[name], centre)
            times[name] = {"extract": [], "map": [], "match": [], "frame": []}
        for _ in range(repeats):
            for name, fm in matchers.items():
                qf, rf = feats[name]
                t = times[name]
                t["extract"].append(_ms(lambda: fm.features(query))[0])
                t["match"].append(_ms(lambda: fm.match(qf, rf, centre))[0])
                t0 = time.perf_counter()
                f = fm.features(query)
                for _ in range(candidates):
                    fm.match(f, rf, centre)
                t["frame"].append(1000 * (time.perf_counter() - t0))
                if len(t["map"]) < max(1, repeats // 3):
                    t["map"].append(_ms(lambda: fm.features(region))[0])
        for name, fm in matchers.items():
            qf, rf = feats[name]
            t = {k: np.asarray(v) for k, v in times[name].items()}
            backend = getattr(getattr(fm.matcher, "graph", None), "backend", None) or \
                getattr(getattr(fm.extractor, "graph", None), "backend", None) or "opencv"
            rows.append({"size": size, "method": name, "backend": backend,
                         "query_kp": len(qf), "map_kp": len(rf), "extract_ms": float(np.median(t["extract"])),
                         "match_ms": float(np.median(t["match"])), "match_p95_ms": float(np.percentile(t["match"], 95)),
                         "frame_p50_ms": float(np.median(t["frame"])), "frame_p95_ms": float(np.percentile(t["frame"], 95)),
                         "map_extract_ms": float(np.median(t["map"]))})
    return rows


def torch_speed(image: np.ndarray, sizes: list[int], keypoints: int, repeats: int) -> list[dict]:
    """XFeat and LighterGlue in torch (the export's source graphs) at the same sizes: the reference."""
    import torch

    from ..deploy.xfeat_torch import XFeatGraph, load_lighterglue, load_xfeat
    from ..nav.features.xfeat import grey_input

    graph = XFeatGraph(load_xfeat()[0], keypoints).eval()
    glue = load_lighterglue()[0]
    rows = []
    with torch.inference_mode():
        for size in tqdm(sizes, desc="speed: torch reference", unit="size"):
            x = torch.from_numpy(grey_input(np.ascontiguousarray(image[:size, :size])))
            e50, _, (k, s, d) = _median_ms(lambda: graph(x), repeats)
            keep = s > 0
            k, d = k[keep][None], d[keep][None]
            wh = torch.tensor([[size, size]], dtype=torch.float32)
            m50, _, _ = _median_ms(lambda: glue(k, k + 3.0, d, d, wh, wh), max(1, repeats // 2))
            rows.append({"size": size, "method": f"xfeat+lighterglue/{keypoints}", "backend": "torch", "query_kp": int(keep.sum()),
                         "map_kp": int(keep.sum()), "extract_ms": e50, "match_ms": m50, "match_p95_ms": math.nan,
                         "frame_p50_ms": math.nan, "frame_p95_ms": math.nan, "map_extract_ms": math.nan})
    return rows


# ----------------------------------------------------------------------------- report


def print_tables(quality_rows: list[dict], speed_rows: list[dict], candidates: int) -> None:
    if quality_rows:
        print("\nquality (verified: fixes the geometric check accepted; wrong: verified but > "
              f"{WRONG_FIX_M:g} m off, or of another place)")
        print(f"{'condition':<12} {'method':<22} {'pairs':>5} {'verified':>8} {'wrong':>5} {'inliers p50':>11} "
              f"{'error p50 m':>11}")
        order = {c: i for i, c in enumerate(CONDITIONS)}
        methods = list(dict.fromkeys(r["method"] for r in quality_rows))
        for r in sorted(quality_rows, key=lambda r: (order[r["condition"]], methods.index(r["method"]))):
            print(f"{r['condition']:<12} {r['method']:<22} {r['pairs']:>5} {r['verified_rate']:>8.0%} {r['wrong']:>5} "
                  f"{r['median_inliers']:>11.0f} {r['median_error_m']:>11.2f}")
    if speed_rows:
        print(f"\nspeed (ms; map features stored: a frame = query extraction + {candidates} candidate matches, "
              "each with RANSAC; map extract = one region of 2x the query side)")
        print(f"{'size':>4} {'method':<22} {'backend':<11} {'kp q/map':>9} {'extract':>8} {'match':>7} "
              f"{'frame p50':>9} {'frame p95':>9} {'map extract':>11}")
        for r in speed_rows:
            print(f"{r['size']:>4} {r['method']:<22} {r['backend']:<11} {r['query_kp']:>4}/{r['map_kp']:<4} "
                  f"{r['extract_ms']:>8.1f} {r['match_ms']:>7.1f} {r['frame_p50_ms']:>9.1f} {r['frame_p95_ms']:>9.1f} "
                  f"{r['map_extract_ms']:>11.1f}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", help="folder from `mean-nav export-features -o` (needed for the xfeat methods); "
                   "several, comma-separated, compare exports side by side")
    p.add_argument("--threads", type=int, default=None,
                   help="onnxruntime threads of XFeat / LighterGlue (refine.feature_threads; default one per core)")
    p.add_argument("--images", default="../shared/data/orthophotos",
                   help="GeoTIFF orthophotos: a folder or files (default ../shared/data/orthophotos)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--max-features", type=int, default=RefineConfig().max_features, help="SIFT / ORB keypoints")
    p.add_argument("--xfeat-features", default="256,512",
                   help="XFeat keypoints per query and map region; several (comma-separated) compare budgets")
    p.add_argument("--pairs-per-map", type=int, default=3)
    p.add_argument("--query-px", type=int, default=256)
    p.add_argument("--region-px", type=int, default=384)
    p.add_argument("--sizes", default="256,384,512", help="query sizes (px) for the speed table")
    p.add_argument("--candidates", type=int, default=4, help="candidates matched per frame in the speed table")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--no-quality", action="store_true")
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--no-torch", action="store_true", help="skip the torch reference timings")
    p.add_argument("--json", help="also write the rows here")


def _maps(source: str) -> list[Path]:
    path = Path(source).expanduser()
    maps = sorted(path.glob("*.tif")) + sorted(path.glob("*.tiff")) if path.is_dir() else [path]
    if not maps or not all(m.is_file() for m in maps):
        raise MeanNavError(f"--images {source}: no GeoTIFF orthophotos there")
    return maps


def run(args: argparse.Namespace) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    xfeat_features = [int(v) for v in args.xfeat_features.split(",")]
    matchers = make_matchers(methods, args.models, args.max_features, xfeat_features, args.threads)
    maps = _maps(args.images)
    quality_rows, speed_rows = [], []
    if not args.no_quality:
        pairs = build_pairs(maps, args.pairs_per_map, args.query_px, args.region_px)
        quality_rows = quality(matchers, pairs)
    if not args.no_speed:
        sizes = [int(s) for s in args.sizes.split(",")]
        image = _speed_image(maps, 2 * max(sizes))
        speed_rows = speed(matchers, image, sizes, args.candidates, args.repeats)
        if args.models and not args.no_torch and any("xfeat" in m for m in methods):
            speed_rows += torch_speed(image, sizes, max(xfeat_features), max(2, args.repeats // 3))
    print_tables(quality_rows, speed_rows, args.candidates)
    if args.json:
        Path(args.json).write_text(json.dumps({"quality": quality_rows, "speed": speed_rows}, indent=1))
    return 0


def _speed_image(maps: list[Path], size: int) -> np.ndarray:
    """The largest surveyed square of the largest map (speed barely depends on content)."""
    rgb, valid, _ = max((_read_map(m) for m in maps), key=lambda t: t[0].size)
    if min(rgb.shape[:2]) < size:
        raise MeanNavError(f"--sizes: the largest map is {rgb.shape[1]}x{rgb.shape[0]} px, smaller than a "
                           f"{size} px region; use smaller sizes")
    h, w = rgb.shape[:2]
    for r in range(0, h - size + 1, 64):
        for c in range(0, w - size + 1, 64):
            if valid[r:r + size, c:c + size].all():
                return rgb[r:r + size, c:c + size]
    return rgb[:size, :size]
