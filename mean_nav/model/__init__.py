"""MEAN model: backbones (ConvNeXt-Tiny, EfficientNet-Lite0), MEAN branches, losses,
checkpoints. Imports torch; the runtime path (geo/, nav/, replay/) must not import this."""
from .checkpoint import deploy_hash, load_checkpoint, model_from_checkpoint, save_checkpoint
from .losses import LossConfig, MEANLoss
from .mean import MEAN, DeployGraph, ModelConfig, build_model, preprocessing_for

__all__ = [
    "MEAN", "DeployGraph", "ModelConfig", "build_model", "preprocessing_for",
    "LossConfig", "MEANLoss",
    "save_checkpoint", "load_checkpoint", "model_from_checkpoint", "deploy_hash",
]
