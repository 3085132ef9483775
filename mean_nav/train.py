"""`mean-nav train --config cfg.yaml`: train MEAN on University-1652, SUES-200 or synthetic pairs.

The MEAN recipe (spec/mean-model.md): AdamW (lr 1e-3, weight decay 0.01, one parameter
group), cosine schedule with linear warm-up stepped per iteration, AMP with gradient
scaling on CUDA, gradient value clipping at 100, batches of unique locations.

Runs single-process on CPU or one GPU, and under `torchrun --nproc_per_node N` as
DistributedDataParallel (each rank takes its share of the unique-location batches).

Outputs in `out_dir`: last.pt (full training state, resumable with --resume), model.pt
(weights + model config, what export/evaluate need), config.yaml (resolved config),
metrics.jsonl (one JSON object per line), loss_curve.png, holdout.json (held-out
retrieval before and after training, synthetic data).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .config import to_dict
from .errors import MeanNavError
from .train_config import TrainConfig, check_train_config, load_train_config

log = logging.getLogger(__name__)


# --- data -------------------------------------------------------------------------------

def build_pairs(cfg: TrainConfig, out_dir: Path, base_dir: Path | None):
    """(training pair source, held-out SyntheticPairSource or None)."""
    from .data.datasets import read_sues200_train, read_university1652_train
    from .data.pairs import FolderPairs, SyntheticPairs
    from .data.synthetic import SyntheticPairSource

    d = cfg.data
    if d.kind == "university1652":
        return FolderPairs(read_university1652_train(d.root)), None
    if d.kind == "sues200":
        return FolderPairs(read_sues200_train(d.root, d.altitude)), None
    train, holdout = SyntheticPairSource.both_splits(d.synthetic, out_dir, base_dir)
    return SyntheticPairs(train), holdout


# --- schedule ---------------------------------------------------------------------------

def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear 0 -> 1 over `warmup` steps, then cosine 1 -> 0 at `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# --- outputs ----------------------------------------------------------------------------

def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def plot_loss_curve(metrics_path: Path, png_path: Path) -> None:
    """Loss (total and parts) per step, and held-out R@1 per epoch when present."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, evals = [], []
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if rec.get("event") == "step":
            steps.append(rec)
        elif rec.get("event") == "holdout":
            evals.append(rec)
    if not steps:
        return
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(11 if evals else 6, 4), squeeze=False)
    ax = axes[0][0]
    x = [r["step"] for r in steps]
    marker = "." if len(steps) < 40 else None  # a short run would otherwise draw nothing visible
    for key in ("loss", "infonce", "ce", "cda"):
        if key in steps[0]:
            ax.plot(x, [r[key] for r in steps], label=key, lw=1.5 if key == "loss" else 1, marker=marker)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if evals:
        ax = axes[0][1]
        ep = [r["epoch"] for r in evals]
        ax.plot(ep, [r["drone->satellite"]["R@1"] for r in evals], "o-", label="D->S R@1")
        ax.plot(ep, [r["drone->satellite"]["AP"] for r in evals], "s--", label="D->S AP")
        ax.set_xlabel("epoch (0 = before training)")
        ax.set_xticks(ep)
        ax.set_ylabel("%")
        ax.set_title("held-out retrieval")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=png_path.parent, prefix=png_path.name, suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png_path)


class MetricsLog:
    """metrics.jsonl writer; on resume, lines past the checkpoint's step are dropped."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path = path
        self.enabled = enabled
        if enabled and resume_step is not None and path.is_file():
            kept = [ln for ln in path.read_text(encoding="utf-8").splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            _atomic_write_text(path, "".join(ln + "\n" for ln in kept))
        elif enabled and resume_step is None:
            _atomic_write_text(path, "")

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


# --- the run ----------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="training YAML (see mean_nav/configs/)")
    parser.add_argument("--out-dir", help="override out_dir")
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                        help="continue from CKPT, or from <out_dir>/last.pt when no path is given")
    parser.add_argument("--epochs", type=int, help="override optim.epochs")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (torchrun sets the rank's GPU)")


def run(args: argparse.Namespace) -> int:
    cfg, model_cfg, loss_cfg = load_train_config(args.config)
    if args.out_dir:
        cfg.out_dir = args.out_dir
    if args.epochs:
        cfg.optim.epochs = args.epochs
        check_train_config(cfg, "--epochs")
    result = train(cfg, model_cfg, loss_cfg, resume=args.resume, device=args.device,
                   base_dir=Path(args.config).resolve().parent)
    if result.get("rank", 0) == 0:
        print(f"checkpoint: {result['model_path']}  (resumable state: {result['last_path']})")
        if result.get("holdout"):
            for tag in ("before", "after"):
                m = result["holdout"].get(tag)
                if m:
                    ds = m["drone->satellite"]
                    print(f"held-out drone->satellite {tag:>6}: R@1 {ds['R@1']:.2f}  R@5 {ds['R@5']:.2f}  "
                          f"AP {ds['AP']:.2f}  ({ds['queries']} queries, {ds['gallery']} tiles)")
    return 0


def _setup_distributed(device_arg: str):
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(device_arg)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise MeanNavError(f"--device {device_arg}: no CUDA device here; use --device cpu")
    if world > 1:
        if device.type == "cuda":
            device = torch.device(f"cuda:{local_rank}")
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _worker_init(_worker_id: int) -> None:
    import torch

    torch.set_num_threads(1)  # data workers render and augment with numpy/OpenCV


def train(cfg: TrainConfig, model_cfg, loss_cfg, resume: str | None = None, device: str = "auto",
          base_dir: Path | None = None) -> dict:
    """Train; returns paths and held-out metrics. Rank 0 writes every output."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from .data.pairs import PairDataset
    from .data.sampler import UniqueLocationBatchSampler
    from .evaluate import evaluate_holdout
    from .model.checkpoint import load_checkpoint, save_checkpoint
    from .model.losses import MEANLoss
    from .model.mean import MEAN, build_model, preprocessing_for
    from .model.convnext import load_state_strict

    rank, world, dev = _setup_distributed(device)
    is_main = rank == 0
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir = Path(cfg.out_dir)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    _seed_everything(cfg.seed + rank)

    pairs, holdout = build_pairs(cfg, out_dir, base_dir)
    model_cfg.num_classes = pairs.num_classes
    prep = preprocessing_for(model_cfg)
    dataset = PairDataset(pairs, model_cfg.img_size, cfg.augment, seed=cfg.seed, preprocessing=prep)
    try:
        sampler = UniqueLocationBatchSampler(pairs.labels, cfg.optim.batch_size, cfg.seed, rank, world)
    except ValueError as exc:
        raise MeanNavError(f"optim.batch_size: {exc}") from None
    steps_per_epoch = len(sampler)
    if cfg.optim.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.optim.max_steps_per_epoch)
    if steps_per_epoch == 0:
        raise MeanNavError("optim.batch_size: not one complete batch of unique locations per process; "
                           "lower the batch size or add data")
    total_steps = steps_per_epoch * cfg.optim.epochs
    warmup_steps = int(round(cfg.optim.warmup_fraction * total_steps))

    # resume: the checkpoint's model must be the one this config builds
    ckpt = None
    if resume is not None:
        resume_path = out_dir / "last.pt" if resume == "auto" else Path(resume)
        ckpt = load_checkpoint(resume_path)
        if "optimizer" not in ckpt or "epoch" not in ckpt:
            raise MeanNavError(f"{resume_path}: has no training state (optimizer, epoch); resume from last.pt")
        have = ckpt["model_config"]
        for name in ("backbone", "num_classes", "img_size"):
            if have.get(name) != getattr(model_cfg, name):
                raise MeanNavError(f"{resume_path}: checkpoint has model.{name} = {have.get(name)!r} but this "
                                   f"config and data give {getattr(model_cfg, name)!r}; resume with the same "
                                   "config and data")
        model_cfg.pretrained = None  # the checkpoint holds the weights
        model = MEAN(model_cfg)
        load_state_strict(model, ckpt["state_dict"], str(resume_path))
    else:
        model = build_model(model_cfg)
    model.to(dev)
    frozen_norms = freeze_backbone(model.backbone, cfg.optim.freeze_backbone_prefixes)
    criterion = MEANLoss(loss_cfg).to(dev)
    params = [p for p in list(model.parameters()) + list(criterion.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, total_steps, warmup_steps))
    use_amp = cfg.optim.amp and dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    start_epoch, step = 0, 0
    holdout_results: dict[str, Any] = {}
    if ckpt is not None:
        criterion.load_state_dict(ckpt["criterion"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if use_amp and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, step = int(ckpt["epoch"]), int(ckpt["step"])
        torch.set_rng_state(ckpt["torch_rng"])
        holdout_results = json.loads(ckpt.get("holdout_json", "{}"))
        if start_epoch >= cfg.optim.epochs:
            log.info("checkpoint already finished epoch %d of %d", start_epoch, cfg.optim.epochs)

    siamese = _Siamese(model)
    if world > 1:
        siamese = nn.parallel.DistributedDataParallel(
            siamese, device_ids=[dev.index] if dev.type == "cuda" else None)

    metrics = MetricsLog(out_dir / "metrics.jsonl", is_main, step if ckpt is not None else None)
    if is_main:
        resolved = to_dict(cfg)
        resolved["model"] = to_dict(model_cfg)
        resolved["loss"] = to_dict(loss_cfg)
        _atomic_write_text(out_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
        log.info("%d training pairs, %d locations, %d steps/epoch x %d epochs, device %s, world %d",
                 len(dataset), pairs.num_classes, steps_per_epoch, cfg.optim.epochs, dev, world)

    holdout_set = None
    if is_main and holdout is not None and cfg.evaluate_holdout:
        holdout_set = holdout.evaluation_set()
        if "before" not in holdout_results:
            holdout_results["before"] = evaluate_holdout(model, prep, holdout_set, dev, cfg.eval_batch_size)
            metrics.write({"event": "holdout", "epoch": 0, "step": 0, **holdout_results["before"]})

    def save_state(epoch: int) -> None:
        extra = {
            "epoch": epoch, "step": step,
            "criterion": criterion.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if use_amp else {},
            "torch_rng": torch.get_rng_state(),
            "train_config_json": json.dumps(to_dict(cfg)),
            "holdout_json": json.dumps(holdout_results),
        }
        save_checkpoint(out_dir / "last.pt", model, model_cfg, extra)
        if cfg.keep_epoch_checkpoints:
            save_checkpoint(out_dir / f"epoch_{epoch:03d}.pt", model, model_cfg, extra)

    for epoch in range(start_epoch, cfg.optim.epochs):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                            worker_init_fn=_worker_init if cfg.data.num_workers else None,
                            pin_memory=dev.type == "cuda")
        siamese.train()
        for norm in frozen_norms:
            norm.eval()  # frozen layers keep their ImageNet statistics too
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.optim.epochs}", unit="step", disable=not is_main,
                   dynamic_ncols=True)
        t0, sums, count = time.time(), {}, 0
        for i, (sat, drone, labels) in enumerate(loader):
            if i >= steps_per_epoch:
                break
            sat = sat.to(dev, non_blocking=True)
            drone = drone.to(dev, non_blocking=True)
            labels = labels.to(dev, non_blocking=True)
            with torch.autocast(device_type=dev.type, dtype=torch.float16, enabled=use_amp):
                out_sat, out_drone = siamese(sat, drone)
                loss, parts = criterion(out_sat, out_drone, labels)
            if not torch.isfinite(loss):
                raise MeanNavError(f"training diverged at step {step} (loss {loss.item()}); lower optim.lr "
                                   "or check the data")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.optim.grad_clip_value > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_value_(params, cfg.optim.grad_clip_value)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            count += 1
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.update(1)
            bar.set_postfix(loss=f"{parts['loss']:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if step % cfg.log_every == 0 or i == steps_per_epoch - 1:
                metrics.write({"event": "step", "epoch": epoch + 1, "step": step,
                               "lr": scheduler.get_last_lr()[0], **parts})
        bar.close()
        epoch_record = {"event": "epoch", "epoch": epoch + 1, "step": step, "seconds": round(time.time() - t0, 1),
                        **{k: v / max(count, 1) for k, v in sums.items()}}
        metrics.write(epoch_record)
        if is_main and holdout_set is not None:
            holdout_results["after"] = evaluate_holdout(model, prep, holdout_set, dev, cfg.eval_batch_size)
            holdout_results["after_epoch"] = epoch + 1
            metrics.write({"event": "holdout", "epoch": epoch + 1, "step": step, **holdout_results["after"]})
            ds = holdout_results["after"]["drone->satellite"]
            log.info("epoch %d: held-out drone->satellite R@1 %.2f AP %.2f", epoch + 1, ds["R@1"], ds["AP"])
        if is_main:
            save_state(epoch + 1)
            plot_loss_curve(out_dir / "metrics.jsonl", out_dir / "loss_curve.png")
        if world > 1:
            torch.distributed.barrier()

    result = {"rank": rank, "last_path": str(out_dir / "last.pt"), "model_path": str(out_dir / "model.pt"),
              "holdout": holdout_results, "steps": step}
    if is_main:
        save_checkpoint(out_dir / "model.pt", model, model_cfg,
                        {"train_config_json": json.dumps(to_dict(cfg)), "holdout_json": json.dumps(holdout_results)})
        if holdout_results:
            _atomic_write_text(out_dir / "holdout.json", json.dumps(holdout_results, indent=2))
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return result


def freeze_backbone(backbone, prefixes: list[str]) -> list:
    """Stop gradients for backbone parameters named with one of `prefixes`; returns the
    BatchNorm modules inside them (to be kept in eval mode while training)."""
    from torch import nn

    if not prefixes:
        return []
    names = [n for n, _ in backbone.named_parameters()]
    unused = [p for p in prefixes if not any(n.startswith(p) for n in names)]
    if unused:
        raise MeanNavError(f"optim.freeze_backbone_prefixes: {unused[0]!r} matches no backbone parameter; "
                           f"names start like {', '.join(sorted({n.split('.')[0] for n in names}))}")
    for name, param in backbone.named_parameters():
        if any(name.startswith(p) for p in prefixes):
            param.requires_grad_(False)
    return [m for n, m in backbone.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and any(n.startswith(p) for p in prefixes)]


def _siamese_module():
    from torch import nn

    class Siamese(nn.Module):
        """Both views in one forward call: DDP expects one forward per backward."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, sat, drone):
            return self.model(sat), self.model(drone)

    return Siamese


def _Siamese(model):
    return _siamese_module()(model)
