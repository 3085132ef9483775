"""The training config (`mean-nav train --config cfg.yaml`): dataclasses and their loader.

Its own module so that evaluation can read a training config without importing the
training loop (train.py imports evaluate.py for its held-out scores).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .config import from_dict, load_yaml
from .data.augment import AugmentConfig
from .data.synthetic import SyntheticConfig
from .errors import MeanNavError


@dataclass
class DataConfig:
    kind: Literal["university1652", "sues200", "synthetic"] = "synthetic"
    root: str = ""                 # dataset top folder (university1652, sues200)
    altitude: int = 150            # sues200: 150, 200, 250 or 300
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    num_workers: int = 0


@dataclass
class OptimConfig:
    epochs: int = 1
    batch_size: int = 24           # pairs per step and per process
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1   # of all steps, linear from 0 to lr
    grad_clip_value: float = 100.0  # 0 disables
    amp: bool = True               # float16 autocast + GradScaler; CUDA only
    max_steps_per_epoch: int = 0   # 0 = the whole epoch (a cap for smoke runs)
    # backbone parameter-name prefixes kept frozen (weights and BatchNorm statistics), e.g.
    # ["conv_stem", "bn_stem", "blocks.0", "blocks.1"]; saves compute on CPU. [] = train all (the recipe)
    freeze_backbone_prefixes: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    model: dict = field(default_factory=dict)   # mean_nav.model.ModelConfig fields
    loss: dict = field(default_factory=dict)    # mean_nav.model.losses.LossConfig fields
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 1
    out_dir: str = "runs/train"
    threads: int = 0               # torch CPU threads (0 = torch's default)
    log_every: int = 10            # steps between metrics.jsonl lines
    evaluate_holdout: bool = True  # synthetic: held-out retrieval before and after training
    eval_batch_size: int = 64
    keep_epoch_checkpoints: bool = False  # also keep epoch_NNN.pt next to last.pt


def load_train_config(path: str | Path):
    """YAML -> (TrainConfig, ModelConfig, LossConfig); every error names the field."""
    from .model.losses import LossConfig
    from .model.mean import ModelConfig

    raw = load_yaml(path)
    cfg = from_dict(TrainConfig, raw, source=str(path))
    model_raw = dict(cfg.model)
    model_raw.setdefault("num_classes", 1)  # replaced by the dataset's location count
    model_cfg = from_dict(ModelConfig, model_raw, source=str(path), prefix="model.")
    loss_cfg = from_dict(LossConfig, cfg.loss, source=str(path), prefix="loss.")
    check_train_config(cfg, str(path))
    return cfg, model_cfg, loss_cfg


def check_train_config(cfg: TrainConfig, source: str) -> None:
    o = cfg.optim
    if o.epochs < 1:
        raise MeanNavError(f"{source}: field 'optim.epochs' must be >= 1, got {o.epochs}")
    if o.batch_size < 2:
        raise MeanNavError(f"{source}: field 'optim.batch_size' must be >= 2 (InfoNCE needs negatives)")
    if not 0 <= o.warmup_fraction < 1:
        raise MeanNavError(f"{source}: field 'optim.warmup_fraction' must be in [0, 1)")
    if o.lr <= 0:
        raise MeanNavError(f"{source}: field 'optim.lr' must be positive")
    if cfg.data.kind in ("university1652", "sues200") and not cfg.data.root:
        raise MeanNavError(f"{source}: field 'data.root' is needed for data.kind {cfg.data.kind}")
