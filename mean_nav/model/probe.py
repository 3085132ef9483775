"""Descriptor probe on real orthophotos: how well does a model's `embed()` find a tile
again after the changes a drone view brings (rotation, scale, shift, exposure)?

Tiles are cut from every GeoTIFF in a folder (nodata-heavy tiles skipped); each query is
its tile rotated, rescaled, shifted and colour-jittered, cut from the surrounding map so
no border is invented. Recall@1/5 of queries against all tiles. No training involved:
use it to compare backbones, feature maps and ImageNet initialisations.

    python -m mean_nav.model.probe ../shared/data/orthophotos --backbone efficientnet_lite0 \
        --pretrained package --features blocks
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from ..errors import MeanNavError


def make_probe_set(ortho_dir: Path, tile_px: int, out_px: int, max_rotation_deg: float, seed: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(tiles, queries), both [N,out_px,out_px,3] uint8 RGB, query i is a view of tile i."""
    import rasterio

    rng = np.random.default_rng(seed)
    files = sorted(p for p in Path(ortho_dir).iterdir() if p.suffix.lower() in (".tif", ".tiff"))
    if not files:
        raise MeanNavError(f"{ortho_dir}: no GeoTIFF (.tif) files; give a folder of orthophotos")
    tiles, queries = [], []
    for path in files:
        with rasterio.open(path) as src:
            image = np.ascontiguousarray(src.read([1, 2, 3]).transpose(1, 2, 0))
        if image.dtype != np.uint8:
            raise MeanNavError(f"{path}: expected 8-bit RGB, got {image.dtype}")
        h, w = image.shape[:2]
        # a margin of half a tile lets the rotated/scaled query come from real map pixels
        margin = tile_px // 2
        for y in range(margin, h - tile_px - margin + 1, tile_px):
            for x in range(margin, w - tile_px - margin + 1, tile_px):
                tile = image[y:y + tile_px, x:x + tile_px]
                if (tile.max(axis=2) == 0).mean() > 0.2:
                    continue  # mostly outside the surveyed footprint
                centre = (x + tile_px / 2 + rng.uniform(-0.08, 0.08) * tile_px,
                          y + tile_px / 2 + rng.uniform(-0.08, 0.08) * tile_px)
                warp = cv2.getRotationMatrix2D(centre, rng.uniform(-max_rotation_deg, max_rotation_deg),
                                               rng.uniform(0.85, 1.15))
                warp[:, 2] += (tile_px / 2 - centre[0], tile_px / 2 - centre[1])
                view = cv2.warpAffine(image, warp, (tile_px, tile_px), flags=cv2.INTER_LINEAR)
                gain, offset = rng.uniform(0.7, 1.3), rng.uniform(-25, 25)
                view = np.clip(view.astype(np.float32) * gain + offset, 0, 255).astype(np.uint8)
                tiles.append(cv2.resize(tile, (out_px, out_px), interpolation=cv2.INTER_AREA))
                queries.append(cv2.resize(view, (out_px, out_px), interpolation=cv2.INTER_AREA))
    if not tiles:
        raise MeanNavError(f"{ortho_dir}: images too small for {tile_px}-px tiles; use a smaller --tile-px")
    return np.stack(tiles), np.stack(queries)


def recall_at(queries: np.ndarray, gallery: np.ndarray, ks=(1, 5)) -> dict[str, float]:
    """Recall@k for L2-normalised descriptors where query i matches gallery item i."""
    sims = queries @ gallery.T
    own = sims[np.arange(len(queries)), np.arange(len(queries))]
    ranks = (sims > own[:, None]).sum(axis=1)
    return {f"R@{k}": float(np.mean(ranks < k)) for k in ks}


def run_probe(cfg, ortho_dir: Path, tile_px: int, max_rotation_deg: float, seed: int, batch: int = 16) -> dict:
    import torch

    from ..deploy.embedder import normalize
    from .mean import build_model, preprocessing_for

    tiles, queries = make_probe_set(ortho_dir, tile_px, cfg.img_size, max_rotation_deg, seed)
    model = build_model(cfg).eval()
    prep = preprocessing_for(cfg)

    def embed(images: np.ndarray, what: str) -> np.ndarray:
        out = []
        with torch.no_grad():
            for i in tqdm(range(0, len(images), batch), desc=f"embed {what}", unit="batch", leave=False):
                out.append(model.embed(torch.from_numpy(normalize(images[i:i + batch], prep))).numpy())
        return np.concatenate(out)

    result = recall_at(embed(queries, "queries"), embed(tiles, "tiles"))
    result.update(tiles=len(tiles), dim=model.embed_dim)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mean_nav.model.probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("ortho_dir", type=Path)
    parser.add_argument("--backbone", default="efficientnet_lite0", choices=["convnext_tiny", "efficientnet_lite0"])
    parser.add_argument("--pretrained", default="package", help="ImageNet weights (path, or 'package' for Lite0)")
    parser.add_argument("--features", default="blocks", choices=["blocks", "conv_head"],
                        help="EfficientNet-Lite0 feature map")
    parser.add_argument("--img-size", type=int, default=160)
    parser.add_argument("--tile-px", type=int, default=200, help="tile side in source pixels")
    parser.add_argument("--max-rotation", type=float, default=20.0, help="query rotation range, degrees")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    import torch

    from .mean import ModelConfig

    torch.set_num_threads(args.threads)
    try:
        cfg = ModelConfig(backbone=args.backbone, img_size=args.img_size, pretrained=args.pretrained,
                          efficientnet_features=args.features)
        result = run_probe(cfg, args.ortho_dir, args.tile_px, args.max_rotation, args.seed)
    except MeanNavError as exc:
        print(f"probe: error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.backbone} features={args.features} dim={result['dim']} tiles={result['tiles']} "
          f"rotation<={args.max_rotation:g}deg: R@1 {100 * result['R@1']:.1f}%  R@5 {100 * result['R@5']:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
