"""MEAN checkpoints: a torch state dict plus the model config, loadable with weights_only=True.

File layout (format "mean-nav-checkpoint", version 1), one dict saved with torch.save:

    format        "mean-nav-checkpoint"
    version       1
    model_config  ModelConfig as a plain dict (mean_nav.config.to_dict)
    state_dict    MEAN.state_dict() (training branches included)
    deploy_hash   16 hex chars identifying the deploy-graph weights (see deploy_hash)
    ...           anything passed as `extra` (optimizer, scheduler, epoch, step, loss, ...)
                  sits at the top level next to these keys

Writes are atomic (`<path>.tmp` then os.replace), so a crash never leaves half a file.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import from_dict, to_dict
from ..errors import MeanNavError
from .convnext import load_state_strict
from .mean import MEAN, ModelConfig

CHECKPOINT_FORMAT = "mean-nav-checkpoint"
CHECKPOINT_VERSION = 1
RESERVED_KEYS = ("format", "version", "model_config", "state_dict", "deploy_hash")


def deploy_hash(model: MEAN) -> str:
    """16 hex chars of sha256 over the deploy graph's tensors (backbone incl. the gap norm),
    in sorted key order, each as name, dtype, shape and raw bytes.

    BatchNorm's `num_batches_tracked` counters are left out: they never change the output.
    The same weights give the same hash whatever device or module instance holds them.
    """
    digest = hashlib.sha256()
    state = model.backbone.state_dict()
    for name in sorted(state):
        if name.endswith("num_batches_tracked"):
            continue
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        # bytes via numpy (bfloat16 has no numpy dtype: view its bits as int16)
        array = tensor.view(torch.int16).numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def save_checkpoint(path: str | os.PathLike, model: MEAN, model_cfg: ModelConfig,
                    extra: dict | None = None) -> None:
    """Write model weights + config (+ `extra` training state) atomically to `path`."""
    path = Path(path)
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(RESERVED_KEYS))
    if clash:
        raise ValueError(f"save_checkpoint: extra keys {clash} are reserved by the checkpoint format")
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model_config": to_dict(model_cfg),
        "state_dict": {k: v.detach().to("cpu") for k, v in model.state_dict().items()},
        "deploy_hash": deploy_hash(model),
        **extra,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a mean-nav checkpoint with weights_only=True; MeanNavError naming the file when it
    is missing, truncated, not a checkpoint, or from a newer format version."""
    path = Path(path)
    if not path.is_file():
        raise MeanNavError(f"{path}: checkpoint not found; check the path")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, objects refused by weights_only
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise MeanNavError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {first_line}); "
                           f"the file may be truncated or not written by mean-nav train") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        hint = ("it looks like a bare state dict; ImageNet backbone weights go in model.pretrained"
                if isinstance(ckpt, dict) and ckpt and all(torch.is_tensor(v) for v in ckpt.values())
                else "give a file written by mean-nav train")
        raise MeanNavError(f"{path}: not a mean-nav checkpoint (no format '{CHECKPOINT_FORMAT}'); {hint}")
    version = ckpt.get("version")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise MeanNavError(f"{path}: checkpoint format version {version!r} is newer than this mean-nav "
                           f"supports ({CHECKPOINT_VERSION}); upgrade mean-nav")
    for key in ("model_config", "state_dict"):
        if not isinstance(ckpt.get(key), dict):
            raise MeanNavError(f"{path}: checkpoint has no '{key}' mapping; the file is damaged")
    return ckpt


def config_from_checkpoint(ckpt: dict, source: str) -> ModelConfig:
    cfg = dict(ckpt["model_config"])
    # weights come from the checkpoint itself; never reload ImageNet weights over them
    cfg["pretrained"] = None
    return from_dict(ModelConfig, cfg, source=f"{source} model_config")


def model_from_checkpoint(path: str | os.PathLike, expect: ModelConfig | None = None,
                          map_location: str | torch.device = "cpu") -> tuple[MEAN, ModelConfig]:
    """Rebuild MEAN from a checkpoint (in eval mode). With `expect`, the backbone and
    num_classes must agree, else MeanNavError naming the file and the differing field."""
    ckpt = load_checkpoint(path, map_location)
    cfg = config_from_checkpoint(ckpt, str(path))
    if expect is not None:
        for name in ("backbone", "num_classes", "efficientnet_features"):
            have, want = getattr(cfg, name), getattr(expect, name)
            if have != want:
                raise MeanNavError(f"{path}: checkpoint has model.{name} = {have!r} but the config asks for "
                                   f"{want!r}; use a matching checkpoint or fix model.{name}")
    model = MEAN(cfg)
    load_state_strict(model, ckpt["state_dict"], str(path))
    stored = ckpt.get("deploy_hash")
    if stored is not None and stored != deploy_hash(model):
        raise MeanNavError(f"{path}: deploy_hash {stored} does not match the stored weights; the file is damaged")
    return model.eval(), cfg
