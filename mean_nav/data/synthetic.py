"""Synthetic cross-view pairs from GeoTIFF orthophotos (or procedural worlds), no torch.

A *location* is a point on a regular grid over a map. Its satellite view is the
north-up tile of `tile_m` metres centred on it, cut from `read_metric_raster`. Its drone
views are what a camera sees flying over it: `render_view` with a random height,
yaw, roll and pitch and a nadir a few metres off the location centre, then
`degrade_photometric` and occlusions for the camera domain gap.

`drone_view: rectified` (default) then rectifies the frame to north-up at the tile's
scale with *noisy* attitude and height, exactly as the onboard localizer does before it
embeds a frame; the network so learns the residual errors it will meet in flight
(compass yaw error, scale from a wrong height, tilt, off-centre nadir, missing corners).
`drone_view: camera` keeps the raw camera frame (rotated, oblique), as in
University-1652's drone images.

Locations are split by ground: whole maps named in `holdout_maps` and the eastern
`holdout_fraction` of every other map are held out, with training tiles kept clear of
the held-out strip so no held-out ground is ever seen in training.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from ..errors import MeanNavError
from ..geo.raster import MetricRaster, read_metric_raster
from ..nav.camera_model import CameraModel, rectify_to_nadir, render_view
from .augment import add_occlusions, degrade_photometric

log = logging.getLogger(__name__)


@dataclass
class SyntheticConfig:
    """Where synthetic locations come from and how drone views are made."""

    maps: list[str] = field(default_factory=list)          # GeoTIFF orthophotos
    procedural_seeds: list[int] = field(default_factory=list)  # procedural worlds (mean_nav.data.world)
    procedural_size_px: int = 2048
    world_dir: str = ""               # where procedural worlds are written ("" = <out_dir>/worlds)
    holdout_maps: list[str] = field(default_factory=list)  # file names whose ground is held out entirely
    holdout_fraction: float = 0.0     # eastern fraction of every other map held out
    gsd_m: float = 0.25               # map resolution the tiles are cut at
    tile_m: float = 60.0              # satellite tile side, metres
    stride_m: float = 15.0            # spacing of training locations, metres
    holdout_stride_m: float = 0.0     # spacing of held-out locations (0 = stride_m)
    min_valid_fraction: float = 0.97  # a tile needs this much map data
    view_px: int = 160                # side of the satellite and drone images produced
    views_per_location: int = 4       # drone views per location per training epoch
    eval_views_per_location: int = 2  # drone views per held-out location for evaluation
    drone_view: Literal["rectified", "camera"] = "rectified"
    height_m: tuple[float, float] = (45.0, 80.0)
    camera_hfov_deg: float = 75.0
    camera_px: int = 320
    max_tilt_deg: float = 12.0
    nadir_jitter_m: float = 4.0       # drone nadir offset from the location centre (per axis)
    yaw_error_deg: float = 6.0        # 1-sigma telemetry errors used when rectifying
    attitude_error_deg: float = 1.5
    height_error_fraction: float = 0.08
    degrade_strength: tuple[float, float] = (0.3, 1.0)
    occlusion_strength: float = 0.3


@dataclass
class Location:
    map_index: int
    x: float   # centre in the map's metric CRS
    y: float


def _map_paths(cfg: SyntheticConfig, out_dir: Path | None, base_dir: Path | None) -> list[Path]:
    paths = []
    for m in cfg.maps:
        p = Path(m)
        if not p.is_absolute() and base_dir is not None and not p.exists():
            p = base_dir / p
        if not p.is_file():
            raise MeanNavError(f"data.synthetic.maps: {m}: map file not found; give GeoTIFF paths "
                               "(absolute or relative to the working directory)")
        paths.append(p)
    if cfg.procedural_seeds:
        from .world import generate_world

        world_dir = Path(cfg.world_dir) if cfg.world_dir else (out_dir or Path("runs")) / "worlds"
        world_dir.mkdir(parents=True, exist_ok=True)
        for seed in cfg.procedural_seeds:
            p = world_dir / f"world_seed{seed}_{cfg.procedural_size_px}px_{cfg.gsd_m:g}m.tif"
            if not p.is_file():
                generate_world(p, seed=seed, size_px=cfg.procedural_size_px, gsd_m=cfg.gsd_m)
            paths.append(p)
    if not paths:
        raise MeanNavError("data.synthetic: no maps; list GeoTIFFs in `maps` or seeds in `procedural_seeds`")
    return paths


class SyntheticPairSource:
    """Locations of one split and the images of each (satellite tile, drone views)."""

    def __init__(self, cfg: SyntheticConfig, split: Literal["train", "holdout"],
                 out_dir: Path | None = None, base_dir: Path | None = None,
                 rasters: list[MetricRaster] | None = None):
        if split not in ("train", "holdout"):
            raise ValueError(f"split must be train or holdout, got {split!r}")
        if not 0.0 <= cfg.holdout_fraction < 1.0:
            raise MeanNavError(f"data.synthetic.holdout_fraction: must be in [0, 1), got {cfg.holdout_fraction}")
        if cfg.tile_m <= 0 or cfg.stride_m <= 0 or cfg.gsd_m <= 0:
            raise MeanNavError("data.synthetic: tile_m, stride_m and gsd_m must be positive")
        self.cfg = cfg
        self.split = split
        if rasters is None:
            paths = _map_paths(cfg, out_dir, base_dir)
            rasters = [read_metric_raster(p, cfg.gsd_m) for p in paths]
        self.rasters = rasters
        self.names = [Path(r.sources[0]).name if r.sources else f"map{i}" for i, r in enumerate(rasters)]
        unknown = sorted(set(cfg.holdout_maps) - set(self.names))
        if unknown:
            raise MeanNavError(f"data.synthetic.holdout_maps: {unknown[0]!r} is not one of the maps "
                               f"({', '.join(self.names)}); use the file name")
        self.locations = self._grid_locations()
        self.camera = CameraModel.from_fov(cfg.camera_px, cfg.camera_px, cfg.camera_hfov_deg)
        if not self.locations:
            raise MeanNavError(f"data.synthetic: no {split} locations; the maps are smaller than "
                               f"tile_m={cfg.tile_m} m or mostly nodata (lower tile_m or add maps)")

    @classmethod
    def both_splits(cls, cfg: SyntheticConfig, out_dir: Path | None = None,
                    base_dir: Path | None = None) -> tuple["SyntheticPairSource", "SyntheticPairSource"]:
        """Train and held-out sources sharing one read of the maps."""
        train = cls(cfg, "train", out_dir, base_dir)
        if not cfg.holdout_maps and cfg.holdout_fraction == 0:
            return train, None
        try:
            holdout = cls(cfg, "holdout", rasters=train.rasters)
        except MeanNavError:
            raise MeanNavError(f"data.synthetic: no held-out locations in holdout_maps {cfg.holdout_maps} or "
                               f"the eastern {cfg.holdout_fraction:.0%} of the maps at tile_m={cfg.tile_m} m; "
                               "raise holdout_fraction or hold out a larger map") from None
        return train, holdout

    # --- locations ----------------------------------------------------------------------
    def _grid_locations(self) -> list[Location]:
        cfg = self.cfg
        half = cfg.tile_m / 2
        margin = half + cfg.nadir_jitter_m
        stride = cfg.holdout_stride_m if self.split == "holdout" and cfg.holdout_stride_m > 0 else cfg.stride_m
        out = []
        for i, r in enumerate(self.rasters):
            left, bottom, right, top = r.bounds
            whole_map_held_out = self.names[i] in cfg.holdout_maps
            boundary = right - cfg.holdout_fraction * (right - left)
            ys = np.arange(top - margin, bottom + margin - 1e-6, -stride)
            if cfg.holdout_fraction > 0 and not whole_map_held_out:
                # held out: whole tiles east of the boundary; training: tile and jitter west of it
                if self.split == "holdout":
                    xs = np.arange(max(boundary + half, left + margin), right - margin + 1e-6, stride)
                else:
                    xs = np.arange(left + margin, boundary - margin + 1e-6, stride)
            elif whole_map_held_out == (self.split == "holdout"):
                xs = np.arange(left + margin, right - margin + 1e-6, stride)
            else:
                xs = np.zeros(0)
            for y in ys:
                for x in xs:
                    if self._valid_fraction(r, x, y) >= cfg.min_valid_fraction:
                        out.append(Location(i, float(x), float(y)))
        return out

    def _tile_window(self, r: MetricRaster, x: float, y: float) -> tuple[int, int, int]:
        n = int(round(self.cfg.tile_m / r.gsd_m))
        col, row = r.xy_to_pixel(x, y)
        c0 = int(round(float(col) - (n - 1) / 2))
        r0 = int(round(float(row) - (n - 1) / 2))
        return r0, c0, n

    def _valid_fraction(self, r: MetricRaster, x: float, y: float) -> float:
        r0, c0, n = self._tile_window(r, x, y)
        if r0 < 0 or c0 < 0 or r0 + n > r.shape[0] or c0 + n > r.shape[1]:
            return 0.0
        # some orthophotos mark their unsurveyed area only by black pixels, not by nodata
        tile = r.image[r0:r0 + n, c0:c0 + n].astype(np.int16)
        has_data = r.valid[r0:r0 + n, c0:c0 + n] & (tile.sum(axis=2) > 6)
        return float(has_data.mean())

    def __len__(self) -> int:
        return len(self.locations)

    @property
    def num_classes(self) -> int:
        return len(self.locations)

    def location_lonlat(self, index: int) -> tuple[float, float]:
        from ..geo.crs import to_lonlat

        loc = self.locations[index]
        lon, lat = to_lonlat(self.rasters[loc.map_index].crs, loc.x, loc.y)
        return float(lon), float(lat)

    # --- images -------------------------------------------------------------------------
    def satellite(self, index: int) -> np.ndarray:
        """North-up tile of `tile_m` centred on the location, `view_px` square, RGB uint8."""
        loc = self.locations[index]
        r = self.rasters[loc.map_index]
        r0, c0, n = self._tile_window(r, loc.x, loc.y)
        tile = r.image[r0:r0 + n, c0:c0 + n]
        size = self.cfg.view_px
        interp = cv2.INTER_AREA if n > size else cv2.INTER_LINEAR
        return cv2.resize(tile, (size, size), interpolation=interp)

    def drone(self, index: int, rng: np.random.Generator) -> np.ndarray:
        """One random drone view of the location, `view_px` square, RGB uint8."""
        cfg = self.cfg
        loc = self.locations[index]
        r = self.rasters[loc.map_index]
        nadir_x = loc.x + rng.uniform(-cfg.nadir_jitter_m, cfg.nadir_jitter_m)
        nadir_y = loc.y + rng.uniform(-cfg.nadir_jitter_m, cfg.nadir_jitter_m)
        height = rng.uniform(*cfg.height_m)
        tilt = np.radians(cfg.max_tilt_deg)
        roll, pitch = rng.uniform(-tilt, tilt, size=2)
        yaw = rng.uniform(-np.pi, np.pi)
        frame = render_view(r.image, r.map_from_ground(nadir_x, nadir_y), self.camera,
                            roll, pitch, yaw, height)
        frame = degrade_photometric(frame, rng, float(rng.uniform(*cfg.degrade_strength)))
        frame = add_occlusions(frame, rng, cfg.occlusion_strength)
        size = cfg.view_px
        if cfg.drone_view == "camera":
            return cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA)
        # rectify with the attitude and height the autopilot would report (with errors)
        att_err = np.radians(cfg.attitude_error_deg)
        est_roll = roll + rng.normal(0, att_err)
        est_pitch = pitch + rng.normal(0, att_err)
        est_yaw = yaw + rng.normal(0, np.radians(cfg.yaw_error_deg))
        est_height = height * max(0.5, 1 + rng.normal(0, cfg.height_error_fraction))
        # the drone's nadir is the view centre: the localizer has no better idea
        view, _ = rectify_to_nadir(frame, self.camera, est_roll, est_pitch, est_yaw, est_height,
                                   cfg.tile_m / size, size)
        return view

    def evaluation_set(self, seed: int = 12345) -> tuple[list[np.ndarray], np.ndarray, list[np.ndarray], np.ndarray]:
        """(drone images, labels, satellite images, labels): fixed views for before/after scoring."""
        drones, d_labels = [], []
        for i in range(len(self)):
            for v in range(self.cfg.eval_views_per_location):
                drones.append(self.drone(i, np.random.default_rng([seed, i, v])))
                d_labels.append(i)
        sats = [self.satellite(i) for i in range(len(self))]
        return drones, np.asarray(d_labels), sats, np.arange(len(self))
