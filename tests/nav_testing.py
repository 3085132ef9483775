"""Helpers for the navigation tests (E): a tiny deterministic embedder, a tile cache and
simulated flights over the real orthophotos in ../shared/data."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from mean_nav.deploy.embedder import Embedder, Preprocessing

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ORTHO = SHARED_DATA / "orthophotos" / "test_tiled.tif"       # Gorinchem, 250 m square, 0.25 m/px
OTHER_ORTHO = SHARED_DATA / "orthophotos" / "OSBS_029.tif"    # Florida forest: not in the cache


def require_shared_data() -> None:
    if not ORTHO.is_file():
        print(f"skipping: real orthophoto {ORTHO} absent (CI has ../shared/data beside the clone)")
        pytest.skip(f"{ORTHO} not found: ../shared/data is absent")


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


def build_test_cache(folder: Path, embedder: Embedder | None = None) -> Path:
    """60 m tiles at 20 m stride, 0.25 m/px, over the Gorinchem orthophoto (~150 tiles)."""
    from mean_nav.geo.cache import build_cache

    return build_cache([ORTHO], folder, embedder or ThumbnailEmbedder(), gsd_m=0.25, tile_size_m=60.0,
                       stride_m=20.0, progress=False)


def simulate(folder: Path, map_path: Path = ORTHO, duration_s: float = 12.0, seed: int = 0,
             width: int = 480, height: int = 360, **overrides) -> Path:
    from mean_nav.replay.simulate import SimulationConfig, simulate_flight

    cfg = SimulationConfig(duration_s=duration_s, seed=seed, width=width, height=height, **overrides)
    return simulate_flight([map_path], folder, cfg, progress=False)
