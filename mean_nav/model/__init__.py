"""MEAN model: backbones (ConvNeXt-Tiny, EfficientNet-Lite0), MEAN branches, losses,
checkpoints. Imports torch; the runtime path (geo/, nav/, replay/) must not import this."""
from .mean import MEAN, DeployGraph, ModelConfig, build_model, preprocessing_for

__all__ = ["MEAN", "DeployGraph", "ModelConfig", "build_model", "preprocessing_for"]
