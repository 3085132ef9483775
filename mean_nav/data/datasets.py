"""Readers for the University-1652 and SUES-200 folder layouts (no torch).

Both datasets store one folder per location id:
  University-1652  train/{drone,satellite}/<id>/
                   test/{query_drone,gallery_satellite,query_satellite,gallery_drone}/<id>/
  SUES-200         Training/<h>/{drone,satellite}/<id>/
                   Testing/<h>/{query_drone,gallery_satellite,query_satellite,gallery_drone}/<id>/
                   with h (altitude, metres) in 150, 200, 250, 300.

Training gives a `PairIndex`: every drone image paired with its location's satellite
image, the location as a class index. Testing gives `ImageList`s of (path, label) where
the label is the location id as an integer, as the University-1652 evaluation uses it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from ..errors import MeanNavError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
SUES200_ALTITUDES = (150, 200, 250, 300)
# query folder, gallery folder for each retrieval direction
DIRECTIONS = {
    "drone->satellite": ("query_drone", "gallery_satellite"),
    "satellite->drone": ("query_satellite", "gallery_drone"),
}


def load_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as RGB uint8; a file that does not decode is a MeanNavError."""
    path = Path(path)
    data = np.fromfile(str(path), np.uint8) if path.is_file() else None
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data is not None and data.size else None
    if img is None:
        what = "file not found" if data is None else "cannot be decoded as an image"
        raise MeanNavError(f"{path}: {what}; replace or remove the file")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _location_folders(folder: Path, what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise MeanNavError(f"{folder}: {what} folder not found; point --root at the dataset's top folder "
                           "(see the README for the expected layout)")
    found = {p.name: p for p in sorted(folder.iterdir()) if p.is_dir()}
    if not found:
        raise MeanNavError(f"{folder}: no location folders inside; expected one sub-folder per location id")
    return found


@dataclass
class PairIndex:
    """Training pairs: each drone image with its location's satellite image(s)."""

    locations: list[str]                       # location id per class index
    satellite: list[list[Path]]                # satellite images per class index
    drone: list[list[Path]]                    # drone images per class index
    pairs: list[tuple[int, int]] = field(default_factory=list)  # (class, drone image number)

    def __post_init__(self):
        if not self.pairs:
            self.pairs = [(c, i) for c, imgs in enumerate(self.drone) for i in range(len(imgs))]

    @property
    def num_classes(self) -> int:
        return len(self.locations)

    @property
    def labels(self) -> list[int]:
        """Class index of every pair (what the unique-location sampler needs)."""
        return [c for c, _ in self.pairs]


@dataclass
class ImageList:
    """Evaluation images with integer location labels (-1 marks junk)."""

    paths: list[Path]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)


def _label_of(location_id: str, folder: Path) -> int:
    try:
        return int(location_id)
    except ValueError:
        raise MeanNavError(f"{folder / location_id}: location folder names must be integer ids "
                           "(as in University-1652 and SUES-200)") from None


def read_pair_folders(drone_root: Path, satellite_root: Path) -> PairIndex:
    """Pair `drone_root/<id>/*` with `satellite_root/<id>/*` (every id needs both)."""
    drone_dirs = _location_folders(drone_root, "drone")
    sat_dirs = _location_folders(satellite_root, "satellite")
    missing = sorted(set(drone_dirs) - set(sat_dirs))
    if missing:
        raise MeanNavError(f"{satellite_root / missing[0]}: location has drone images but no satellite folder; "
                           "add it or remove the drone folder")
    locations, sats, drones = [], [], []
    for loc, ddir in drone_dirs.items():
        d_imgs = list_images(ddir)
        s_imgs = list_images(sat_dirs[loc])
        if not s_imgs:
            raise MeanNavError(f"{sat_dirs[loc]}: no satellite image in this location folder")
        if not d_imgs:
            raise MeanNavError(f"{ddir}: no drone images in this location folder")
        locations.append(loc)
        sats.append(s_imgs)
        drones.append(d_imgs)
    return PairIndex(locations, sats, drones)


def read_image_list(folder: Path, what: str) -> ImageList:
    paths, labels = [], []
    for loc, sub in _location_folders(folder, what).items():
        label = _label_of(loc, folder)
        for p in list_images(sub):
            paths.append(p)
            labels.append(label)
    if not paths:
        raise MeanNavError(f"{folder}: no images in any location folder")
    return ImageList(paths, np.asarray(labels, np.int64))


def read_university1652_train(root: str | Path) -> PairIndex:
    root = Path(root)
    return read_pair_folders(root / "train" / "drone", root / "train" / "satellite")


def read_university1652_test(root: str | Path, direction: str) -> tuple[ImageList, ImageList]:
    """(query, gallery) for 'drone->satellite' or 'satellite->drone'."""
    q, g = _direction_folders(direction)
    test = Path(root) / "test"
    return read_image_list(test / q, q), read_image_list(test / g, g)


def _sues_altitude_dir(top: Path, altitude: int) -> Path:
    if altitude not in SUES200_ALTITUDES:
        raise MeanNavError(f"altitude {altitude}: SUES-200 altitudes are {', '.join(map(str, SUES200_ALTITUDES))}")
    return top / str(altitude)


def read_sues200_train(root: str | Path, altitude: int) -> PairIndex:
    base = _sues_altitude_dir(Path(root) / "Training", altitude)
    return read_pair_folders(base / "drone", base / "satellite")


def read_sues200_test(root: str | Path, altitude: int, direction: str) -> tuple[ImageList, ImageList]:
    q, g = _direction_folders(direction)
    base = _sues_altitude_dir(Path(root) / "Testing", altitude)
    return read_image_list(base / q, q), read_image_list(base / g, g)


def sues200_altitudes_present(root: str | Path) -> list[int]:
    testing = Path(root) / "Testing"
    return [h for h in SUES200_ALTITUDES if (testing / str(h)).is_dir()]


def _direction_folders(direction: str) -> tuple[str, str]:
    if direction not in DIRECTIONS:
        raise MeanNavError(f"direction {direction!r}: choose one of {', '.join(DIRECTIONS)}")
    return DIRECTIONS[direction]
