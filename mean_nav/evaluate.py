"""`mean-nav evaluate`: Drone->Satellite and Satellite->Drone retrieval of a checkpoint.

University-1652 and SUES-200 (per altitude) test folders, or the held-out split of a
synthetic training config. Descriptors are the deploy graph's (`MEAN.embed`), fed
exactly as the deployment Embedder preprocesses (same resize and normalisation), and
scored by `mean_nav.data.metrics.retrieval_metrics` (University-1652 formulas).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from .data.datasets import (DIRECTIONS, ImageList, read_sues200_test, read_university1652_test,
                            sues200_altitudes_present, SUES200_ALTITUDES)
from .data.metrics import CONVENTIONS, retrieval_metrics
from .deploy.embedder import Preprocessing, normalize, to_batch_uint8
from .errors import MeanNavError

log = logging.getLogger(__name__)

CONVENTION_HELP = {
    "family": "gallery ids absent from the queries are junk (Sample4Geo/CAMP/MEAN)",
    "original": "every gallery image is ranked, distractors included (University-1652 release)",
}


# --- embedding (torch imported lazily: this module is also imported by torch-free code) ----

def embed_arrays(model, images: Sequence[np.ndarray], prep: Preprocessing, device, batch_size: int = 64,
                 desc: str | None = None) -> np.ndarray:
    """RGB uint8 images -> [N, D] float32 L2-normalised descriptors via model.embed."""
    import torch
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", disable=desc is None, leave=False):
            batch = normalize(to_batch_uint8(images[start:start + batch_size], prep.img_size), prep)
            out.append(model.embed(torch.from_numpy(batch).to(device)).float().cpu().numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, 1), np.float32)


def embed_paths(model, paths: Sequence[Path], prep: Preprocessing, device, batch_size: int = 64,
                num_workers: int = 0, desc: str | None = None) -> np.ndarray:
    """Image files -> descriptors, decoding in DataLoader workers (streams large test sets)."""
    import torch
    from torch.utils.data import DataLoader, Dataset
    from tqdm import tqdm

    from .data.datasets import load_rgb

    class Files(Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, i):
            img = to_batch_uint8([load_rgb(paths[i])], prep.img_size)
            return normalize(img, prep)[0]

    loader = DataLoader(Files(), batch_size=batch_size, num_workers=num_workers)
    model.eval()
    out = []
    with torch.no_grad():
        for batch in tqdm(loader, desc=desc, unit="batch", disable=desc is None, leave=False):
            out.append(model.embed(batch.to(device)).float().cpu().numpy())
    return np.concatenate(out)


def evaluate_holdout(model, prep: Preprocessing, holdout_set, device, batch_size: int = 64,
                     convention: str = "family") -> dict:
    """Both directions on a synthetic held-out set from SyntheticPairSource.evaluation_set()."""
    drones, d_labels, sats, s_labels = holdout_set
    d_feats = embed_arrays(model, drones, prep, device, batch_size)
    s_feats = embed_arrays(model, sats, prep, device, batch_size)
    return {
        "drone->satellite": retrieval_metrics(d_feats, d_labels, s_feats, s_labels, convention=convention),
        "satellite->drone": retrieval_metrics(s_feats, s_labels, d_feats, d_labels, convention=convention),
    }


# --- CLI --------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="model.pt or last.pt from mean-nav train")
    parser.add_argument("--dataset-kind", required=True, choices=["university1652", "sues200", "synthetic"])
    parser.add_argument("--root", help="dataset top folder (university1652, sues200)")
    parser.add_argument("--altitude", type=int, nargs="+", choices=SUES200_ALTITUDES,
                        help="sues200 altitudes to evaluate (default: all present)")
    parser.add_argument("--config", help="synthetic: the training YAML whose held-out split to score")
    parser.add_argument("--gallery-convention", choices=CONVENTIONS, default="family",
                        help="family (default): gallery ids without queries are junk; original: rank all")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="image-decoding worker processes")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--json", help="also write the results to this JSON file")


def _score_lists(model, prep, device, query: ImageList, gallery: ImageList, args, tag: str) -> dict:
    q = embed_paths(model, query.paths, prep, device, args.batch_size, args.workers, f"{tag} queries")
    g = embed_paths(model, gallery.paths, prep, device, args.batch_size, args.workers, f"{tag} gallery")
    return retrieval_metrics(q, query.labels, g, gallery.labels, convention=args.gallery_convention)


def format_table(rows: list[dict]) -> str:
    head = f"{'set':<22} {'direction':<18} {'R@1':>7} {'R@5':>7} {'R@10':>7} {'R@1%':>7} {'AP':>7} {'queries':>8} {'gallery':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['set']:<22} {r['direction']:<18} {r['R@1']:7.2f} {r['R@5']:7.2f} {r['R@10']:7.2f} "
                     f"{r['R@1%']:7.2f} {r['AP']:7.2f} {r['queries']:8d} {r['gallery']:8d}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import torch

    from .model.checkpoint import load_checkpoint, model_from_checkpoint
    from .model.mean import preprocessing_for

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if args.dataset_kind in ("university1652", "sues200") and not args.root:
        raise MeanNavError(f"--root: the {args.dataset_kind} dataset folder is needed")
    if args.dataset_kind == "synthetic" and not args.config:
        raise MeanNavError("--config: the synthetic training YAML is needed (its held-out split is scored)")
    model, model_cfg = model_from_checkpoint(args.checkpoint, map_location=device)
    model.to(device)
    prep = preprocessing_for(model_cfg)
    deploy_hash = load_checkpoint(args.checkpoint).get("deploy_hash")
    print(f"gallery convention: {args.gallery_convention} - {CONVENTION_HELP[args.gallery_convention]}")
    print("R@1% is CMC[round(0.01 * gallery size)], the reference code's index")

    rows = []
    if args.dataset_kind == "university1652":
        for direction in DIRECTIONS:
            query, gallery = read_university1652_test(args.root, direction)
            rows.append({"set": "university1652", "direction": direction,
                         **_score_lists(model, prep, device, query, gallery, args, direction)})
    elif args.dataset_kind == "sues200":
        altitudes = args.altitude or sues200_altitudes_present(args.root)
        if not altitudes:
            raise MeanNavError(f"{Path(args.root) / 'Testing'}: no altitude folders (150, 200, 250, 300); "
                               "point --root at the SUES-200 top folder")
        for h in altitudes:
            for direction in DIRECTIONS:
                query, gallery = read_sues200_test(args.root, h, direction)
                rows.append({"set": f"sues200 {h} m", "direction": direction,
                             **_score_lists(model, prep, device, query, gallery, args, f"{h} m {direction}")})
    else:
        from .data.synthetic import SyntheticPairSource
        from .train_config import load_train_config

        cfg, _, _ = load_train_config(args.config)
        if cfg.data.kind != "synthetic":
            raise MeanNavError(f"{args.config}: data.kind is {cfg.data.kind}, not synthetic")
        holdout = SyntheticPairSource(cfg.data.synthetic, "holdout", out_dir=Path(cfg.out_dir),
                                      base_dir=Path(args.config).resolve().parent)
        if holdout.cfg.view_px != model_cfg.img_size:
            log.info("views rendered at %d px are resized to the model's %d px", holdout.cfg.view_px,
                     model_cfg.img_size)
        res = evaluate_holdout(model, prep, holdout.evaluation_set(), device, args.batch_size,
                               args.gallery_convention)
        for direction, metrics in res.items():
            rows.append({"set": "synthetic held-out", "direction": direction, **metrics})

    print(format_table(rows))
    if args.json:
        report = {"checkpoint": str(args.checkpoint), "deploy_hash": deploy_hash,
                  "gallery_convention": args.gallery_convention, "img_size": model_cfg.img_size,
                  "backbone": model_cfg.backbone, "results": rows}
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        os.replace(tmp, path)
        print(f"wrote {path}")
    return 0
