"""A procedural aerial world: a georeferenced RGB GeoTIFF the project makes itself.

The demo needs a map without third-party data. The world is farmland and villages seen
from above: polygonal fields with crop rows at their own angle and spacing, meadows,
bare soil, forests and orchards, a river and a pond, main roads with lane markings and
dirt tracks, buildings with pitched roofs and sun shadows, trees and hedgerows. Every
field, house and tree is placed at random, so any 60 m patch is unlike any other (what
retrieval and feature matching need). Deterministic per seed: same seed, same pixels.

  generate_world(path, seed=0, size_px=2048, gsd_m=0.25, centre_lonlat=(11.0, 48.0))
  generate_tiled_world(folder, seed, tiles, tile_px, gsd_m)   large areas as adjacent sheets

The same ground as another map source saw it (`other_season`, `nodata_holes`) lets a
stress test fly the camera over one rendering and localize against another.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import cv2
import numpy as np

from ..errors import MeanNavError

# land-use kinds of a field parcel and their share of parcels
CROP, MEADOW, SOIL, FOREST, ORCHARD, VILLAGE = range(6)
KIND_WEIGHTS = np.array([0.34, 0.2, 0.1, 0.14, 0.07, 0.15])


def generate_world(path: str | Path, seed: int = 0, size_px: int = 2048, gsd_m: float = 0.25,
                   centre_lonlat: tuple[float, float] = (11.0, 48.0)) -> Path:
    """Write a `size_px` square RGB GeoTIFF at `gsd_m` m/px in the UTM zone of `centre_lonlat`."""
    if size_px < 64:
        raise MeanNavError(f"world size_px: {size_px} is too small; use at least 64 pixels")
    if not gsd_m > 0:
        raise MeanNavError(f"world gsd_m: must be positive, got {gsd_m}")
    image = render_world(seed, size_px, gsd_m)
    return write_geotiff(path, image, gsd_m, centre_lonlat)


def write_geotiff(path: str | Path, image: np.ndarray, gsd_m: float,
                  centre_lonlat: tuple[float, float], valid: np.ndarray | None = None) -> Path:
    """Georeference an RGB image north-up around `centre_lonlat` (to within half a pixel)
    in the UTM zone there and write it atomically; `valid` False marks nodata."""
    from ..geo.crs import from_lonlat, utm_crs_for

    lon, lat = centre_lonlat
    crs = utm_crs_for(lon, lat)
    cx, cy = from_lonlat(crs, lon, lat)
    h, w = image.shape[:2]
    # corners on multiples of the GSD: rasters read back at that GSD line up pixel for pixel
    left = round((float(cx) - w / 2 * gsd_m) / gsd_m) * gsd_m
    top = round((float(cy) + h / 2 * gsd_m) / gsd_m) * gsd_m
    return write_geotiff_at(path, image, gsd_m, crs, left, top, valid)


def write_geotiff_at(path: str | Path, image: np.ndarray, gsd_m: float, crs, left: float, top: float,
                     valid: np.ndarray | None = None) -> Path:
    """Write an RGB image north-up with its top-left corner at (left, top) in `crs`, atomically.
    `valid` (False = nodata) goes into an internal mask band, which every map reader honours."""
    import rasterio
    from affine import Affine

    h, w = image.shape[:2]
    transform = Affine(gsd_m, 0, left, 0, -gsd_m, top)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".tif", dir=path.parent)
    os.close(fd)
    try:
        with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True):
            with rasterio.open(tmp, "w", driver="GTiff", width=w, height=h, count=3, dtype="uint8",
                               crs=crs, transform=transform, photometric="RGB", compress="deflate",
                               tiled=True, blockxsize=256, blockysize=256) as dst:
                dst.write(image.transpose(2, 0, 1))
                if valid is not None:
                    dst.write_mask(np.where(valid, 255, 0).astype(np.uint8))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def generate_tiled_world(folder: str | Path, seed: int, tiles: int, tile_px: int, gsd_m: float,
                         centre_lonlat: tuple[float, float] = (11.0, 48.0)) -> list[Path]:
    """A large area as `tiles` x `tiles` adjacent map sheets (like an orthophoto delivery), each
    its own world (seed * 1000 + sheet number); returns the GeoTIFF paths, row by row from the
    north-west. Sheets meet without gap or overlap: their corners lie on the GSD grid."""
    from ..geo.crs import from_lonlat, utm_crs_for

    if tiles < 1 or tile_px < 64:
        raise MeanNavError(f"tiled world: need at least 1 sheet of 64 px, got {tiles} x {tile_px} px")
    crs = utm_crs_for(*centre_lonlat)
    cx, cy = from_lonlat(crs, *centre_lonlat)
    side_m = tiles * tile_px * gsd_m
    left0 = round((float(cx) - side_m / 2) / gsd_m) * gsd_m
    top0 = round((float(cy) + side_m / 2) / gsd_m) * gsd_m
    paths = []
    for row in range(tiles):
        for col in range(tiles):
            path = Path(folder) / f"sheet_r{row}_c{col}.tif"
            if not path.is_file():
                image = render_world(seed * 1000 + row * tiles + col, tile_px, gsd_m)
                write_geotiff_at(path, image, gsd_m, crs, left0 + col * tile_px * gsd_m,
                                 top0 - row * tile_px * gsd_m)
            paths.append(path)
    return paths


# --- the map as another source saw it -------------------------------------------------------

def nodata_holes(shape: tuple[int, int], gsd_m: float, seed: int, fraction: float = 0.12,
                 radius_m: tuple[float, float] = (8.0, 25.0)) -> np.ndarray:
    """A valid mask with irregular nodata holes covering about `fraction` of the map (cloud
    masks, missing survey strips): False inside the holes."""
    rng = np.random.default_rng(seed)
    h, w = shape
    holes = np.zeros((h, w), np.uint8)
    while holes.mean() < fraction:
        centre = (int(rng.uniform(0, w)), int(rng.uniform(0, h)))
        axes = tuple(int(rng.uniform(*radius_m) / gsd_m) for _ in range(2))
        cv2.ellipse(holes, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    return holes == 0


def other_season(image: np.ndarray, gsd_m: float, seed: int, map_gsd_m: float | None = None,
                 jpeg_quality: int = 45) -> np.ndarray:
    """The same ground as another source saw it at another time: vegetation shifted towards
    late-summer yellow, other exposure and white balance, haze, the blur of a coarser sensor
    (`map_gsd_m`, resampled back to `gsd_m`) and JPEG compression."""
    rng = np.random.default_rng(seed)
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV).astype(np.float32)
    green = (hsv[..., 0] > 25) & (hsv[..., 0] < 85)       # OpenCV hue 0..180: greens ~ 35-85
    hsv[..., 0] = np.where(green, hsv[..., 0] - rng.uniform(10, 18), hsv[..., 0])
    hsv[..., 1] *= rng.uniform(0.65, 0.8)
    out = cv2.cvtColor(np.clip(hsv, 0, [180, 255, 255]).astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
    out = out * rng.uniform(0.85, 1.15) * rng.uniform(0.92, 1.08, 3) + rng.uniform(10, 25)  # exposure, tint, haze
    out = np.clip(out, 0, 255).astype(np.uint8)
    if map_gsd_m and map_gsd_m > gsd_m:
        h, w = out.shape[:2]
        k = gsd_m / map_gsd_m
        small = cv2.resize(out, (max(1, int(w * k)), max(1, int(h * k))), interpolation=cv2.INTER_AREA)
        out = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)])
    return cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)


# --- rendering ----------------------------------------------------------------------------

def _smooth_noise(rng: np.random.Generator, size: int, cell_px: float, octaves: int = 3) -> np.ndarray:
    """Fractal value noise in [-1, 1]-ish: random grids upsampled with cubic interpolation."""
    out = np.zeros((size, size), np.float32)
    amp, total = 1.0, 0.0
    for o in range(octaves):
        cells = max(2, int(np.ceil(size / (cell_px / 2 ** o))) + 1)
        grid = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
        out += amp * cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)
        total += amp
        amp *= 0.5
    return out / total


def _random_polyline(rng: np.random.Generator, size: int, step_px: float, wiggle: float) -> np.ndarray:
    """A smooth path entering on one edge and leaving on another."""
    edge = rng.integers(4)
    t = rng.uniform(0.1, 0.9) * size
    start, heading = {0: ((t, -10.0), np.pi / 2), 1: ((size + 10.0, t), np.pi),
                      2: ((t, size + 10.0), -np.pi / 2), 3: ((-10.0, t), 0.0)}[int(edge)]
    heading += rng.uniform(-0.5, 0.5)
    pts = [np.array(start)]
    turn = 0.0
    while len(pts) < 4 * size / step_px:
        turn = 0.8 * turn + rng.normal(0, wiggle)
        heading += turn
        pts.append(pts[-1] + step_px * np.array([np.cos(heading), np.sin(heading)]))
        x, y = pts[-1]
        if not (-20 <= x <= size + 20 and -20 <= y <= size + 20):
            break
    return np.array(pts, np.float32)


def _voronoi_labels(rng: np.random.Generator, size: int, cell_px: float) -> tuple[np.ndarray, int]:
    """Polygonal parcels: nearest of jittered-grid seeds, computed at 1/4 resolution."""
    n = max(2, int(round(size / cell_px)))
    gy, gx = np.mgrid[0:n, 0:n].astype(np.float32)
    seeds = (np.stack([gx.ravel(), gy.ravel()], 1) + rng.uniform(0.1, 0.9, (n * n, 2))) * (size / n)
    low = max(16, size // 4)
    ys, xs = np.mgrid[0:low, 0:low].astype(np.float32) * (size / low)
    best = np.full((low, low), np.inf, np.float32)
    labels = np.zeros((low, low), np.int32)
    for k, (sx, sy) in enumerate(seeds):
        d = (xs - sx) ** 2 + (ys - sy) ** 2
        closer = d < best
        best[closer] = d[closer]
        labels[closer] = k
    return cv2.resize(labels, (size, size), interpolation=cv2.INTER_NEAREST), len(seeds)


def render_world(seed: int, size: int, gsd_m: float) -> np.ndarray:
    """The world as an RGB uint8 array (no georeference)."""
    rng = np.random.default_rng(seed)
    m = 1.0 / gsd_m  # pixels per metre
    labels, n_parcels = _voronoi_labels(rng, size, cell_px=rng.uniform(70, 110) * m)
    kinds = rng.choice(len(KIND_WEIGHTS), size=n_parcels, p=KIND_WEIGHTS)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)

    # base colour per parcel, varied by kind
    palette = {
        CROP: [(150, 160, 80), (190, 175, 95), (110, 140, 60), (170, 150, 90), (130, 150, 70)],
        MEADOW: [(100, 135, 60), (120, 150, 70), (90, 120, 55)],
        SOIL: [(140, 115, 85), (120, 100, 75), (160, 135, 100)],
        FOREST: [(55, 80, 40)],
        ORCHARD: [(115, 140, 70)],
        VILLAGE: [(120, 125, 105)],
    }
    base = np.zeros((n_parcels, 3), np.float32)
    for k in range(n_parcels):
        choices = palette[int(kinds[k])]
        base[k] = np.array(choices[rng.integers(len(choices))], np.float32) + rng.normal(0, 10, 3)
    img = base[labels]

    # crop rows / mowing stripes: per-parcel direction and spacing
    theta = rng.uniform(0, np.pi, n_parcels).astype(np.float32)
    period = (rng.uniform(1.5, 5.0, n_parcels) * m).astype(np.float32)
    depth = np.where(np.isin(kinds, [CROP, SOIL]), rng.uniform(0.08, 0.22, n_parcels),
                     np.where(kinds == MEADOW, rng.uniform(0.0, 0.06, n_parcels), 0.0)).astype(np.float32)
    phase = (xx * np.cos(theta)[labels] + yy * np.sin(theta)[labels]) / period[labels]
    stripes = np.sin(2 * np.pi * phase)
    img *= (1 + depth[labels] * stripes)[..., None]
    # large-scale moisture/biomass variation and fine grain
    img *= (1 + 0.12 * _smooth_noise(rng, size, 60 * m))[..., None]
    img *= (1 + 0.06 * _smooth_noise(rng, size, 3 * m, octaves=2))[..., None]
    # parcel borders: thin darker lines (field margins)
    edges = cv2.morphologyEx((labels % 65536).astype(np.uint16), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
    img[edges] *= 0.85

    occupied = np.zeros((size, size), np.uint8)  # where houses and trees may not go
    img = np.clip(img, 0, 255).astype(np.uint8)

    # water: a river and a pond
    water = np.zeros((size, size), np.uint8)
    if rng.random() < 0.85:
        river = _random_polyline(rng, size, 20 * m, 0.05)
        cv2.polylines(water, [river.astype(np.int32)], False, 255, int(rng.uniform(12, 30) * m), cv2.LINE_AA)
    for _ in range(int(rng.integers(1, 3))):
        centre = rng.uniform(0.1, 0.9, 2) * size
        blob = np.zeros((size, size), np.float32)
        cv2.ellipse(blob, tuple(int(c) for c in centre), (int(rng.uniform(10, 30) * m), int(rng.uniform(8, 22) * m)),
                    float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
        wobble = _smooth_noise(rng, size, 15 * m, octaves=2)
        water = np.maximum(water, ((cv2.GaussianBlur(blob, (0, 0), 6 * m) + 0.25 * wobble) > 0.5).astype(np.uint8) * 255)
    water_mask = water > 127
    tone = 1 + 0.08 * _smooth_noise(rng, size, 10 * m, octaves=2)
    water_rgb = np.stack([45 * tone, 75 * tone, 85 * tone], -1)
    # darker banks: blend at the edge
    bank = cv2.dilate(water, np.ones((int(3 * m) | 1, int(3 * m) | 1), np.uint8)) > 127
    img[bank & ~water_mask] = (img[bank & ~water_mask] * 0.7).astype(np.uint8)
    img[water_mask] = np.clip(water_rgb[water_mask], 0, 255).astype(np.uint8)
    occupied |= bank.astype(np.uint8)

    # roads: main roads with lane markings, and dirt tracks
    for _ in range(int(rng.integers(2, 4))):
        road = _random_polyline(rng, size, 25 * m, 0.03).astype(np.int32)
        width = int(rng.uniform(6, 9) * m)
        cv2.polylines(img, [road], False, (190, 180, 160), width + int(2 * m), cv2.LINE_AA)  # verge
        grey = int(rng.integers(85, 115))
        cv2.polylines(img, [road], False, (grey, grey, grey + 5), width, cv2.LINE_AA)
        _dashed(img, road, (235, 235, 230), max(1, int(0.25 * m)), dash=int(3 * m), gap=int(6 * m))
        cv2.polylines(occupied, [road], False, 1, width + int(4 * m))
    for _ in range(int(rng.integers(3, 7))):
        track = _random_polyline(rng, size, 15 * m, 0.06).astype(np.int32)
        cv2.polylines(img, [track], False, (165, 145, 110), int(rng.uniform(2.5, 4) * m), cv2.LINE_AA)
        cv2.polylines(occupied, [track], False, 1, int(5 * m))

    sun = rng.uniform(0, 2 * np.pi)
    shadow_dir = np.array([np.cos(sun), np.sin(sun)])

    # buildings: dense in villages, scattered farmsteads elsewhere
    houses = []
    for k in range(n_parcels):
        ys_k, xs_k = _parcel_samples(labels, k, rng, 400)
        if len(xs_k) == 0:
            continue
        count = int(rng.integers(12, 30)) if kinds[k] == VILLAGE else int(rng.random() < 0.15)
        for _ in range(count):
            j = rng.integers(len(xs_k))
            houses.append((xs_k[j], ys_k[j]))
    for x, y in houses:
        _building(img, occupied, rng, float(x), float(y), m, shadow_dir)

    # trees: forests, orchards on a grid, hedgerows on some parcel edges, scattered singles
    trees = []
    for k in range(n_parcels):
        if kinds[k] == FOREST:
            ys_k, xs_k = _parcel_samples(labels, k, rng, 2500)
            keep = rng.random(len(xs_k)) < 0.8
            trees += [(x, y, rng.uniform(2.0, 4.5) * m) for x, y in zip(xs_k[keep], ys_k[keep])]
        elif kinds[k] == ORCHARD:
            spacing = rng.uniform(6, 9) * m
            a = rng.uniform(0, np.pi)
            mask_k = labels == k
            ys_k, xs_k = np.nonzero(mask_k[::int(spacing), ::int(spacing)])
            for y, x in zip(ys_k * int(spacing), xs_k * int(spacing)):
                trees.append((x + np.cos(a), y + np.sin(a), rng.uniform(1.5, 2.5) * m))
    hedge_rows = np.argwhere(edges[::int(4 * m), ::int(4 * m)]) * int(4 * m)
    if len(hedge_rows):
        hedge_parcels = rng.random(n_parcels) < 0.25
        for y, x in hedge_rows:
            if hedge_parcels[labels[y, x]]:
                trees.append((x, y, rng.uniform(1.5, 3.0) * m))
    for _ in range(int(size * size / (200 * m) ** 2 * 40)):
        trees.append((rng.uniform(0, size), rng.uniform(0, size), rng.uniform(2, 5) * m))
    _trees(img, occupied, rng, trees, shadow_dir)

    # sensor-like finish: slight blur and grain
    img = cv2.GaussianBlur(img, (0, 0), 0.6)
    grain = rng.normal(0, 3, (size, size, 1)).astype(np.float32)
    return np.clip(img.astype(np.float32) + grain, 0, 255).astype(np.uint8)


def _parcel_samples(labels: np.ndarray, k: int, rng: np.random.Generator, n: int):
    """Up to n random pixel positions inside parcel k (sampled on a coarse grid for speed)."""
    step = 8
    ys, xs = np.nonzero(labels[::step, ::step] == k)
    if len(xs) == 0:
        return ys, xs
    pick = rng.integers(0, len(xs), size=n)
    jitter = rng.uniform(0, step, size=(2, n))
    return ys[pick] * step + jitter[0], xs[pick] * step + jitter[1]


def _dashed(img: np.ndarray, line: np.ndarray, colour, thickness: int, dash: int, gap: int) -> None:
    for a, b in zip(line[:-1], line[1:]):
        seg = b - a
        length = float(np.hypot(*seg))
        if length < 1:
            continue
        d = seg / length
        t = 0.0
        while t < length:
            p0 = a + d * t
            p1 = a + d * min(t + dash, length)
            cv2.line(img, tuple(int(v) for v in p0), tuple(int(v) for v in p1), colour, thickness, cv2.LINE_AA)
            t += dash + gap


def _building(img: np.ndarray, occupied: np.ndarray, rng: np.random.Generator, x: float, y: float,
              m: float, shadow_dir: np.ndarray) -> None:
    h, w = img.shape[:2]
    length, width = rng.uniform(8, 22) * m, rng.uniform(6, 12) * m
    xi, yi = int(x), int(y)
    if not (0 <= xi < w and 0 <= yi < h) or occupied[yi, xi]:
        return
    angle = rng.uniform(0, 180)
    box = cv2.boxPoints(((x, y), (length, width), angle)).astype(np.float32)
    shadow_len = rng.uniform(3, 8) * m
    shadow = box + shadow_dir.astype(np.float32) * shadow_len
    hull = cv2.convexHull(np.concatenate([box, shadow])).astype(np.int32)
    # darken the shadow polygon inside its bounding box only (whole-image copies are slow)
    x0, y0, bw, bh = cv2.boundingRect(hull)
    x0, y0 = max(x0, 0), max(y0, 0)
    x1, y1 = min(x0 + bw + 1, w), min(y0 + bh + 1, h)
    if x1 > x0 and y1 > y0:
        mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
        cv2.fillConvexPoly(mask, hull - np.array([x0, y0], np.int32), 1)
        roi = img[y0:y1, x0:x1]
        roi[mask > 0] = (roi[mask > 0] * 0.55).astype(np.uint8)
    roofs = [(165, 75, 55), (140, 60, 50), (110, 110, 115), (70, 70, 75), (180, 160, 140), (95, 65, 50)]
    roof = np.array(roofs[rng.integers(len(roofs))], np.float32) + rng.normal(0, 8, 3)
    # pitched roof: the two halves along the ridge catch the sun differently
    a = np.radians(angle)
    along = np.array([np.cos(a), np.sin(a)]) * length / 2
    across = np.array([-np.sin(a), np.cos(a)]) * width / 2
    c = np.array([x, y])
    half1 = np.array([c - along, c + along, c + along + across, c - along + across], np.int32)
    half2 = np.array([c - along, c + along, c + along - across, c - along - across], np.int32)
    lit = 1.0 + 0.18 * float(np.sign(np.dot(across, -shadow_dir)))
    cv2.fillConvexPoly(img, half1, tuple(float(v) for v in np.clip(roof * lit, 0, 255)), cv2.LINE_AA)
    cv2.fillConvexPoly(img, half2, tuple(float(v) for v in np.clip(roof * (2 - lit), 0, 255)), cv2.LINE_AA)
    cv2.line(img, tuple(int(v) for v in c - along), tuple(int(v) for v in c + along),
             tuple(float(v) for v in np.clip(roof * 0.7, 0, 255)), max(1, int(0.3 * m)), cv2.LINE_AA)
    cv2.fillConvexPoly(occupied, box.astype(np.int32), 1)


def _trees(img: np.ndarray, occupied: np.ndarray, rng: np.random.Generator, trees, shadow_dir) -> None:
    h, w = img.shape[:2]
    kept = [(x, y, r) for x, y, r in trees if 0 <= int(x) < w and 0 <= int(y) < h and not occupied[int(y), int(x)]]
    if not kept:
        return
    # shadows first (all of them), then crowns, so crowns overlap neighbouring shadows
    shade = img.copy()
    for x, y, r in kept:
        sx, sy = x + shadow_dir[0] * r * 1.2, y + shadow_dir[1] * r * 1.2
        cv2.circle(shade, (int(sx), int(sy)), int(r), (0, 0, 0), -1, cv2.LINE_AA)
    cv2.addWeighted(shade, 0.45, img, 0.55, 0, dst=shade)
    mask = np.any(shade != img, axis=2)
    img[mask] = shade[mask]
    for x, y, r in kept:
        g = rng.uniform(0.7, 1.15)
        crown = (40 * g, 75 * g, 35 * g)
        cv2.circle(img, (int(x), int(y)), int(r), crown, -1, cv2.LINE_AA)
        hx, hy = x - shadow_dir[0] * r * 0.35, y - shadow_dir[1] * r * 0.35
        cv2.circle(img, (int(hx), int(hy)), max(1, int(r * 0.5)), (60 * g, 100 * g, 50 * g), -1, cv2.LINE_AA)
