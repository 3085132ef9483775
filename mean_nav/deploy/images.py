"""Image sets for export checks, INT8 calibration, accuracy evaluation and engine checks.

A *source* is one of:
  - a folder of images (searched recursively, sorted by path),
  - a list file (`.txt`/`.lst`: one image path a line, relative to the list file, `#` comments),
  - a GeoTIFF orthophoto (`.tif`/`.tiff`): square tiles cut at its native resolution,
  - a synthetic training config (`.yaml`): tiles and drone views of its training split,
  - nothing: procedural aerial-like images (roads, fields, buildings, texture), so
    every command also works on a fresh clone without data.

Evaluation pairs (query, gallery) come from a GeoTIFF (a perturbed "drone" view of the
same ground as each north-up tile), the held-out split of a synthetic training config
(mean_nav.data.synthetic) or a University-1652-layout folder. No torch here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
import cv2
import numpy as np

from ..config import read_text
from ..errors import MeanNavError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
GEOTIFF_SUFFIXES = {".tif", ".tiff"}
LIST_SUFFIXES = {".txt", ".lst", ".list"}


def read_image_rgb(path: str | Path, ignore_orientation: bool = False) -> np.ndarray:
    """Read one image file as HxWx3 uint8 RGB; a MeanNavError if it is incomplete or does not
    decode. ignore_orientation: the stored pixels, not rotated by the EXIF orientation."""
    path = Path(path)
    if not path.is_file():
        raise MeanNavError(f"{path}: image file not found; check the path or the list file")
    data = np.fromfile(str(path), np.uint8)
    problem = incomplete_image(data.tobytes())
    if problem:
        raise MeanNavError(f"{path}: {problem}; the file is truncated or damaged, copy it again")
    flags = cv2.IMREAD_COLOR | (cv2.IMREAD_IGNORE_ORIENTATION if ignore_orientation else 0)
    bgr = cv2.imdecode(data, flags) if data.size else None
    if bgr is None:
        raise MeanNavError(f"{path}: cannot decode as an image; remove it or replace it with a JPEG/PNG")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def incomplete_image(data: bytes) -> str | None:
    """Why a JPEG or PNG file is incomplete, or None. OpenCV decodes a truncated JPEG into
    a partly grey image with only a warning on stderr: such a frame must not be localized."""
    if data[:3] == b"\xff\xd8\xff":
        if data.rstrip(b"\x00")[-2:] != b"\xff\xd9":
            return "JPEG has no end-of-image marker"
    elif data[:8] == PNG_SIGNATURE:
        if data[-12:] != PNG_END:
            return "PNG has no IEND chunk"
    return None


def list_image_files(folder: str | Path) -> list[Path]:
    """All image files under `folder`, recursively, in a stable (sorted) order."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_list_file(path: str | Path) -> list[Path]:
    """Image paths from a list file; relative paths are relative to the list file's folder."""
    path = Path(path)
    files = []
    for lineno, line in enumerate(read_text(path, "image list").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        p = Path(line).expanduser()
        p = p if p.is_absolute() else path.parent / p
        if not p.is_file():
            raise MeanNavError(f"{path}:{lineno}: listed image {line!r} not found; fix or remove the line")
        files.append(p)
    return files


def _is_georeferenced_tiff(path: Path) -> bool:
    if path.suffix.lower() not in GEOTIFF_SUFFIXES:
        return False
    import rasterio

    try:
        with rasterio.open(path) as src:
            return src.crs is not None
    except rasterio.errors.RasterioIOError:
        return False


def geotiff_tiles(path: str | Path, tile_px: int, count: int | None = None,
                  min_valid: float = 0.95, seed: int = 0) -> list[np.ndarray]:
    """Square RGB tiles `tile_px` wide cut from a GeoTIFF at its native resolution.

    Tiles come from a regular grid (stride = tile size / 2); tiles with less than
    `min_valid` of their pixels inside the surveyed footprint are skipped. If `count`
    is given, that many tiles are picked at random (seeded) from the grid.
    """
    image, valid = _read_geotiff_rgb(path)
    h, w = valid.shape
    if min(h, w) < tile_px:
        raise MeanNavError(f"{path}: image is {w}x{h} px, smaller than one {tile_px} px tile; use a larger map or smaller tiles")
    stride = max(1, tile_px // 2)
    corners = [(r, c) for r in range(0, h - tile_px + 1, stride) for c in range(0, w - tile_px + 1, stride)
               if valid[r:r + tile_px, c:c + tile_px].mean() >= min_valid]
    if not corners:
        raise MeanNavError(f"{path}: no {tile_px} px tile is at least {min_valid:.0%} inside the map footprint")
    if count is not None and count < len(corners):
        pick = np.random.default_rng(seed).choice(len(corners), size=count, replace=False)
        corners = [corners[i] for i in sorted(pick)]
    return [np.ascontiguousarray(image[r:r + tile_px, c:c + tile_px]) for r, c in corners]


def _read_geotiff_rgb(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A GeoTIFF's first three bands as HxWx3 uint8 plus its valid-data mask (native grid)."""
    import rasterio

    from ..geo.raster import check_georeferenced

    check_georeferenced(path)
    with rasterio.open(path) as src:
        rgb = src.read([1, 2, 3])
        mask = src.dataset_mask() > 0
    # some orthophotos mark the unsurveyed area only by pure black, without a nodata value
    mask &= rgb.any(axis=0)
    if rgb.dtype != np.uint8:
        raise MeanNavError(f"{path}: bands are {rgb.dtype}, expected 8-bit RGB; convert with gdal_translate -ot Byte -scale")
    return np.ascontiguousarray(rgb.transpose(1, 2, 0)), mask


def synthetic_aerial_images(count: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """Procedural top-down scenes: fields, roads, buildings, trees and sensor-like texture.

    Not a substitute for real imagery; it gives every command deterministic, varied,
    natural-looking input (edges, corners, colour regions) when no images are given.
    """
    rng = np.random.default_rng(seed)
    return [_synthetic_scene(rng, size) for _ in range(count)]


def _synthetic_scene(rng: np.random.Generator, size: int) -> np.ndarray:
    img = np.empty((size, size, 3), np.uint8)
    # fields: a coarse random partition into coloured patches
    cells = int(rng.integers(2, 6))
    palette = rng.integers(40, 200, size=(cells * cells, 3))
    coarse = palette[rng.permutation(cells * cells)].reshape(cells, cells, 3).astype(np.uint8)
    img[:] = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_NEAREST)
    # roads: a few straight thick lines
    for _ in range(int(rng.integers(1, 4))):
        p0 = tuple(int(v) for v in rng.integers(0, size, 2))
        p1 = tuple(int(v) for v in rng.integers(0, size, 2))
        grey = int(rng.integers(90, 180))
        cv2.line(img, p0, p1, (grey, grey, grey), max(1, size // int(rng.integers(20, 50))))
    # buildings: rotated rectangles with bright roofs
    for _ in range(int(rng.integers(0, 8))):
        centre = tuple(float(v) for v in rng.uniform(0, size, 2))
        wh = tuple(float(v) for v in rng.uniform(size * 0.03, size * 0.15, 2))
        box = cv2.boxPoints((centre, wh, float(rng.uniform(0, 180)))).astype(np.int32)
        cv2.fillConvexPoly(img, box, tuple(int(v) for v in rng.integers(120, 255, 3)))
    # trees: dark green blobs
    for _ in range(int(rng.integers(0, 30))):
        c = tuple(int(v) for v in rng.integers(0, size, 2))
        cv2.circle(img, c, int(rng.integers(1, max(2, size // 25))), (int(rng.integers(20, 60)), int(rng.integers(60, 110)), 30), -1)
    noise = rng.normal(0.0, 8.0, img.shape)
    return np.clip(img.astype(np.float32) + noise, 0, 255).astype(np.uint8)


def load_images(source: str | Path | None, count: int | None, size: int, seed: int = 0) -> list[np.ndarray]:
    """RGB uint8 images from a folder, list file, GeoTIFF or (source None) procedural scenes.

    `size` is the tile size cut from a GeoTIFF and the size of procedural images; images
    from files keep their size (embedders resize). Raises MeanNavError if the set is empty.
    """
    if source is None:
        return synthetic_aerial_images(count or 16, size, seed)
    source = Path(source)
    if source.is_file() and source.suffix.lower() in (".yaml", ".yml"):
        return synthetic_training_images(source, count or 64, seed)
    if source.is_dir():
        files = list_image_files(source)
        what = f"{source}: folder has no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
    elif source.is_file() and source.suffix.lower() in LIST_SUFFIXES:
        files = read_list_file(source)
        what = f"{source}: list file names no images"
    elif source.is_file() and _is_georeferenced_tiff(source):
        return geotiff_tiles(source, size, count, seed=seed)
    elif source.is_file() and source.suffix.lower() in IMAGE_SUFFIXES:
        files = [source]
        what = ""
    else:
        raise MeanNavError(f"{source}: not found or not an image folder, list file (.txt) or GeoTIFF; check the path")
    if not files:
        raise MeanNavError(f"{what}; add calibration images or pass a GeoTIFF")
    if count is not None and count < len(files):
        pick = np.random.default_rng(seed).choice(len(files), size=count, replace=False)
        files = [files[i] for i in sorted(pick)]
    return [read_image_rgb(p) for p in files]


# ----------------------------------------------------------------------------- evaluation


@dataclass
class RetrievalSet:
    """Queries and gallery with integer labels (same label = same place)."""

    queries: list[np.ndarray]
    query_labels: np.ndarray
    gallery: list[np.ndarray]
    gallery_labels: np.ndarray
    description: str


def geotiff_pairs(path: str | Path, count: int, size: int, seed: int = 0) -> RetrievalSet:
    """Held-out pairs from a GeoTIFF: gallery = north-up tile, query = a drone-like view of it.

    The query is the same ground seen rotated (up to 20 degrees), rescaled (+-10%),
    shifted, re-lit and slightly blurred: the residual that remains after the onboard
    rectification, so retrieval on these pairs is a fair, cheap sanity check of a
    descriptor's discrimination (and of how much quantization changes it).
    """
    image, valid = _read_geotiff_rgb(path)
    rng = np.random.default_rng(seed)
    crop = int(round(size * 1.5))  # room for rotation/scale without black corners
    h, w = valid.shape
    if min(h, w) < crop:
        raise MeanNavError(f"{path}: image is {w}x{h} px, too small for {size} px evaluation pairs")
    stride = size // 2
    corners = [(r, c) for r in range(0, h - crop + 1, stride) for c in range(0, w - crop + 1, stride)
               if valid[r:r + crop, c:c + crop].all()]
    if len(corners) < 2:
        raise MeanNavError(f"{path}: fewer than 2 fully mapped {crop} px windows; use a larger map")
    if count < len(corners):
        pick = rng.choice(len(corners), size=count, replace=False)
        corners = [corners[i] for i in sorted(pick)]
    queries, gallery = [], []
    for r, c in corners:
        window = image[r:r + crop, c:c + crop]
        m = (crop - size) // 2
        gallery.append(np.ascontiguousarray(window[m:m + size, m:m + size]))
        queries.append(_drone_like_view(window, size, rng))
    labels = np.arange(len(corners))
    return RetrievalSet(queries, labels, gallery, labels.copy(),
                        f"{len(corners)} synthetic drone/tile pairs from {Path(path).name}")


def _drone_like_view(window: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    crop = window.shape[0]
    angle = float(rng.uniform(-20, 20))
    scale = float(rng.uniform(0.9, 1.1))
    shift = rng.uniform(-0.05, 0.05, 2) * size
    m = cv2.getRotationMatrix2D((crop / 2 + shift[0], crop / 2 + shift[1]), angle, scale)
    m[:, 2] -= (crop - size) / 2  # keep the centre of the window in the centre of the output
    view = cv2.warpAffine(window, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    gain = rng.uniform(0.8, 1.2, 3)
    view = np.clip(view.astype(np.float32) * gain + rng.uniform(-15, 15), 0, 255).astype(np.uint8)
    return cv2.GaussianBlur(view, (3, 3), float(rng.uniform(0.3, 1.0)))


def university1652_pairs(root: str | Path, limit: int | None = None,
                         query: str = "query_drone", gallery: str = "gallery_satellite") -> RetrievalSet:
    """Drone->satellite retrieval set from a University-1652-layout `test/` folder.

    `root` is the dataset root (holding `test/`) or the `test/` folder itself. `limit`
    keeps the first N class folders (sorted), queries limited to one image per class so
    that a quick run stays quick.
    """
    root = Path(root)
    test = root / "test" if (root / "test").is_dir() else root
    qdir, gdir = test / query, test / gallery
    for d in (qdir, gdir):
        if not d.is_dir():
            raise MeanNavError(f"{d}: folder not found; expected a University-1652 layout (test/{query}, test/{gallery})")
    classes = sorted(p.name for p in qdir.iterdir() if p.is_dir())
    if limit is not None:
        classes = classes[:limit]
    q_imgs, q_labels, g_imgs, g_labels = [], [], [], []
    for label, name in enumerate(classes):
        q_files = list_image_files(qdir / name)[:1]
        g_files = list_image_files(gdir / name) if (gdir / name).is_dir() else []
        if not q_files or not g_files:
            continue
        q_imgs += [read_image_rgb(f) for f in q_files]
        q_labels += [label] * len(q_files)
        g_imgs += [read_image_rgb(f) for f in g_files]
        g_labels += [label] * len(g_files)
    if not q_imgs:
        raise MeanNavError(f"{test}: no class has both {query} and {gallery} images")
    return RetrievalSet(q_imgs, np.asarray(q_labels), g_imgs, np.asarray(g_labels),
                        f"University-1652 {query}->{gallery}, {len(q_imgs)} queries, {len(g_imgs)} gallery")


def _synthetic_source(config_path: Path, split: str):
    from ..config import from_dict, load_yaml
    from ..data.synthetic import SyntheticConfig, SyntheticPairSource

    data = load_yaml(config_path).get("data", {})
    if data.get("kind", "synthetic") != "synthetic" or "synthetic" not in data:
        raise MeanNavError(f"{config_path}: data.kind is not 'synthetic'; give a synthetic training config, "
                           "a GeoTIFF, a folder or a list file")
    cfg = from_dict(SyntheticConfig, data["synthetic"], source=str(config_path), prefix="data.synthetic.")
    return SyntheticPairSource(cfg, split, base_dir=config_path.resolve().parent)


def synthetic_training_images(config_path: str | Path, count: int, seed: int = 0) -> list[np.ndarray]:
    """Satellite tiles and drone views of a synthetic training config's *training* split
    (alternating), e.g. to calibrate INT8 on exactly what the network was trained on."""
    source = _synthetic_source(Path(config_path), "train")
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(source), size=min(len(source), (count + 1) // 2), replace=False)
    images = []
    for i in sorted(int(p) for p in picks):
        images += [source.satellite(i), source.drone(i, rng)]
    return images[:count]


def synthetic_holdout_set(config_path: str | Path, seed: int = 12345) -> RetrievalSet:
    """The held-out synthetic drone->satellite set of a training config (mean_nav.data.synthetic).

    Exactly the set `mean-nav train`/`evaluate` score on: held-out ground only, drone views
    rendered and rectified with noisy attitude, one satellite tile per location.
    """
    config_path = Path(config_path)
    holdout = _synthetic_source(config_path, "holdout")
    drones, d_labels, sats, s_labels = holdout.evaluation_set(seed)
    return RetrievalSet(drones, d_labels, sats, s_labels,
                        f"synthetic held-out set of {config_path} ({len(drones)} drone views, {len(sats)} tiles)")


def load_retrieval_set(source: str | Path, count: int, size: int, seed: int = 0) -> RetrievalSet:
    """A GeoTIFF (synthetic pairs), a synthetic training config (.yaml: its held-out set) or a
    University-1652-layout folder."""
    source = Path(source)
    if source.is_file() and source.suffix.lower() in (".yaml", ".yml"):
        return synthetic_holdout_set(source)
    if source.is_file() and _is_georeferenced_tiff(source):
        return geotiff_pairs(source, count, size, seed)
    if source.is_dir():
        return university1652_pairs(source, limit=count)
    raise MeanNavError(f"{source}: evaluation set must be a GeoTIFF, a synthetic training config (.yaml) "
                       "or a University-1652-layout folder")


def retrieval_metrics(query_desc: np.ndarray, query_labels: np.ndarray,
                      gallery_desc: np.ndarray, gallery_labels: np.ndarray) -> dict[str, float]:
    """R@1 and mAP (in percent) of L2-normalised descriptors, University-1652 AP convention."""
    scores = query_desc @ gallery_desc.T
    r1, aps = [], []
    for i in range(len(query_desc)):
        order = np.argsort(-scores[i], kind="stable")
        good = gallery_labels[order] == query_labels[i]
        ranks = np.flatnonzero(good)
        if ranks.size == 0:
            continue
        r1.append(float(ranks[0] == 0))
        ap = 0.0
        for k, r in enumerate(ranks, 1):
            precision = k / (r + 1)
            old = (k - 1) / r if r > 0 else 1.0
            ap += (old + precision) / 2 / ranks.size
        aps.append(ap)
    return {"R@1": 100.0 * float(np.mean(r1)), "AP": 100.0 * float(np.mean(aps)), "queries": len(r1)}


def cosine_per_row(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows of two descriptor matrices."""
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return np.sum(a * b, axis=1)

