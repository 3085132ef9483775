"""Helpers for the navigation tests (E): a tiny deterministic embedder, a tile cache and
simulated flights, over the real orthophotos in ../shared/data when they are there and
over a procedural world the tests generate otherwise (a fresh clone)."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import cv2
import numpy as np
import pytest

from mean_nav.deploy.embedder import Embedder, Preprocessing

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ORTHO = SHARED_DATA / "orthophotos" / "test_tiled.tif"       # Gorinchem, 250 m square, 0.25 m/px
OTHER_ORTHO = SHARED_DATA / "orthophotos" / "OSBS_029.tif"    # Florida forest: not in the cache
# MEAN_NAV_TESTS_WITHOUT_SHARED=1 runs the suite as a fresh clone would (no ../shared)
WITHOUT_SHARED = os.environ.get("MEAN_NAV_TESTS_WITHOUT_SHARED", "") == "1"
# the procedural stand-in for ORTHO: the same 250 m square at 0.25 m/px
WORLD_SEED, WORLD_PX, WORLD_GSD_M = 11, 1000, 0.25   # seed 11: 19 of 20 test-flight fixes with the thumbnail embedder


def shared_data_present() -> bool:
    return ORTHO.is_file() and not WITHOUT_SHARED


def free_udp_port() -> int:
    """A UDP port on the loopback that nothing uses now (for a link and its pymavlink peer)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_shared_data() -> None:
    if not shared_data_present():
        pytest.skip(f"{ORTHO} not found: ../shared/data is absent")


def navigation_map(folder: Path) -> Path:
    """The map the core navigation tests fly over: the real orthophoto when ../shared is
    there, else a procedural world of the same size written into `folder`."""
    if shared_data_present():
        return ORTHO
    from mean_nav.data.world import generate_world

    return generate_world(folder / f"world_{WORLD_SEED}.tif", seed=WORLD_SEED, size_px=WORLD_PX, gsd_m=WORLD_GSD_M)


class ThumbnailEmbedder(Embedder):
    """A fast stand-in for MEAN: a 16x16 zero-mean grey thumbnail. Good enough for
    north-up rectified views over a small area, and it runs in microseconds."""

    name = "thumbnail"
    dim = 256
    model_hash = "thumbnail16-test"
    precision = "fp32"
    preprocessing = Preprocessing(img_size=64)

    def _embed_batch(self, batch_uint8: np.ndarray) -> np.ndarray:
        out = []
        for img in batch_uint8:
            grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
            small = cv2.resize(grey, (16, 16), interpolation=cv2.INTER_AREA).astype(np.float32)
            out.append((small - small.mean()).ravel())
        return np.stack(out)


def build_test_cache(folder: Path, embedder: Embedder | None = None, map_path: Path = ORTHO) -> Path:
    """60 m tiles at 20 m stride, 0.25 m/px, over a 250 m map (~150 tiles)."""
    from mean_nav.geo.cache import build_cache

    return build_cache([map_path], folder, embedder or ThumbnailEmbedder(), gsd_m=0.25, tile_size_m=60.0,
                       stride_m=20.0, progress=False)


def simulate(folder: Path, map_path: Path = ORTHO, duration_s: float = 12.0, seed: int = 0,
             width: int = 480, height: int = 360, **overrides) -> Path:
    from mean_nav.replay.simulate import SimulationConfig, simulate_flight

    cfg = SimulationConfig(duration_s=duration_s, seed=seed, width=width, height=height, **overrides)
    return simulate_flight([map_path], folder, cfg, progress=False)
