"""meta.json of a tile cache: its schema, and the manifest check of the cache's files.

The manifest is mandatory: every file the cache reads (embeddings, tile table, map
parts, the approximate index) must be listed with its size and sha256, and each listed
file must match. A new meta.json key must be declared in CacheMeta: unknown keys are
refused like in every other file the program reads.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

from ..config import bounded, from_dict, read_text, show
from ..errors import MeanNavError

SHA256 = re.compile(r"[0-9a-f]{64}")
PIXELS = 2 ** 40   # global pixel coordinates stay far below this


@dataclass(kw_only=True)
class FileEntry:
    bytes: int = bounded(ge=0)
    sha256: str


@dataclass(kw_only=True)
class GridMeta:
    crs: str = ""
    crs_wkt: str
    gsd_m: float = bounded(gt=0, le=10_000, unit="m")
    tile_px: int = bounded(ge=8, le=16_384, unit="px")
    stride_px: int = bounded(ge=1, le=16_384, unit="px")
    tile_size_m: float = bounded(0.0, ge=0, unit="m")     # derived, recorded for people
    stride_m: float = bounded(0.0, ge=0, unit="m")
    pixel_grid: str = ""


@dataclass(kw_only=True)
class MapPart:
    file: str
    col0: int = bounded(gt=-PIXELS, lt=PIXELS, unit="px")
    row0: int = bounded(gt=-PIXELS, lt=PIXELS, unit="px")
    width: int = bounded(ge=1, le=1 << 20, unit="px")
    height: int = bounded(ge=1, le=1 << 20, unit="px")


@dataclass(kw_only=True)
class ApproxIndexMeta:
    """The optional faiss index (TileCache.build_approx_index)."""

    file: str
    factory: str
    nprobe: int = bounded(1, ge=1, le=1 << 20)
    rerank: int = bounded(0, ge=0, le=1 << 20)
    build_s: float | None = bounded(None, ge=0)
    ef_search: int | None = bounded(None, ge=1, le=1 << 20)


@dataclass(kw_only=True)
class CacheMeta:
    format: str
    format_version: int
    created_utc: str = ""
    num_tiles: int = bounded(ge=0, lt=2 ** 40)
    dim: int = bounded(ge=1, le=65_536)
    embedding_dtype: Literal["float16"] = "float16"
    model_hash: str
    model: dict
    grid: GridMeta
    tile_range: list[int] | None = None
    min_valid_fraction: float = bounded(0.0, ge=0, le=1)
    shard: list[int] | None = None
    sources: list[dict] = field(default_factory=list)
    maps: list[MapPart] = field(default_factory=list)
    approx_index: ApproxIndexMeta | None = None
    map_features: dict = field(default_factory=dict)   # detector -> stored features (geo/map_features.py)
    merged_from: list[str] | None = None   # merge_caches: the input caches
    generated: dict | None = None     # synthetic benchmark caches (bench/cache.py)
    files: dict[str, FileEntry]


def read_meta(path: Path, format_name: str, version: int) -> tuple[dict, CacheMeta]:
    """meta.json -> (the raw dict, its checked CacheMeta)."""
    try:
        raw = json.loads(read_text(path, "cache description", max_bytes=64 << 20))
    except (json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise MeanNavError(f"{path}: not valid JSON ({show(str(exc))}); the cache is damaged, rebuild it") from None
    if not isinstance(raw, dict) or raw.get("format") != format_name:
        raise MeanNavError(f"{path}: not a mean-nav tile cache description; rebuild the cache")
    if raw.get("format_version") != version:
        raise MeanNavError(f"{path}: cache format version {show(raw.get('format_version'))} is not supported by "
                           f"this mean-nav (reads version {version}); rebuild the cache")
    try:
        meta = from_dict(CacheMeta, raw, source=str(path))
    except MeanNavError as exc:
        raise MeanNavError(f"{str(exc).removesuffix('; fix the value')}; the cache is damaged, rebuild it") from None
    for name, entry in meta.files.items():
        if not SHA256.fullmatch(entry.sha256):
            raise MeanNavError(f"{path}: files[{show(name)}].sha256 is not a sha256 hex digest; the cache is "
                               "damaged, rebuild it")
        inner = PurePosixPath(name)
        if not name or inner.is_absolute() or ".." in inner.parts or "\\" in name:
            raise MeanNavError(f"{path}: files lists {show(name)}, which is not a path inside the cache; "
                               "the cache is damaged, rebuild it")
    return raw, meta


def check_manifest(folder: Path, meta: CacheMeta, required: list[str], verify: bool, sha256_file) -> None:
    """Every required file listed; every listed file present with its size (and sha256)."""
    meta_path = folder / "meta.json"
    unlisted = [name for name in required if name not in meta.files]
    if unlisted:
        raise MeanNavError(f"{meta_path}: files does not list {unlisted[0]} (the manifest is incomplete or "
                           "was edited, so the data cannot be checked); rebuild the cache")
    for name, entry in meta.files.items():
        path = folder / name
        if not path.is_file():
            raise MeanNavError(f"{path}: file of the cache is missing; rebuild the cache")
        size = path.stat().st_size
        if size != entry.bytes:
            raise MeanNavError(f"{path}: {size} bytes, meta.json records {entry.bytes}; the file is "
                               "truncated or modified, rebuild the cache")
        if verify and sha256_file(path) != entry.sha256:
            raise MeanNavError(f"{path}: checksum does not match meta.json; the file is corrupt or "
                               "was modified, rebuild the cache")
