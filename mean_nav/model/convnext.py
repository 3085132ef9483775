"""ConvNeXt-Tiny backbone and its ImageNet checkpoint loading (no timm/torchvision).

Architecture (Liu et al. 2022): a 4x4/4 patchify stem, four stages of depths
[3, 3, 9, 3] and widths [96, 192, 384, 768], each block DW7x7 -> LayerNorm ->
Linear 4x -> GELU -> Linear -> layer scale -> residual, 2x2/2 downsampling between
stages, and a final LayerNorm over the spatially averaged stage-4 map. MEAN keeps that
final LayerNorm as its `gap` descriptor norm, so it belongs to the backbone here; the
ImageNet classifier does not.

Our parameter names follow timm's layout (`stem.0`, `stages.i.downsample.1`,
`stages.i.blocks.j.conv_dw`, ...) with the final norm called `norm`. Two checkpoint
formats convert to it explicitly: the official ConvNeXt release
(`downsample_layers.0.0.weight`, `stages.0.0.dwconv.weight`, `norm.weight`,
`head.weight`, usually under a "model" key) and timm's (`head.norm.weight`,
`head.fc.weight`). Anything that does not map is reported, never silently dropped.
"""
from __future__ import annotations

import json
import re
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MeanNavError

CONVNEXT_TINY_DEPTHS = (3, 3, 9, 3)
CONVNEXT_TINY_DIMS = (96, 192, 384, 768)
LAYER_NORM_EPS = 1e-6


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of an NCHW tensor (ConvNeXt's channels_first LN)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # permute -> layer_norm -> permute exports to ONNX/TensorRT as one LayerNormalization
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample while training."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class ConvNeXtMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ConvNeXtBlock(nn.Module):
    """DW7x7 -> LN -> MLP(4x, GELU) -> layer scale, added to the input."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init: float = 1e-6):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = ConvNeXtMlp(dim, 4 * dim)
        self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_dw(x).permute(0, 2, 3, 1)  # NHWC so LN and Linear act on channels
        x = self.mlp(self.norm(x)) * self.gamma
        return shortcut + self.drop_path(x.permute(0, 3, 1, 2))


class ConvNeXtStage(nn.Module):
    def __init__(self, in_dim: int, dim: int, depth: int, drop_paths: list[float], downsample: bool):
        super().__init__()
        if downsample:
            self.downsample = nn.Sequential(
                LayerNorm2d(in_dim, eps=LAYER_NORM_EPS), nn.Conv2d(in_dim, dim, kernel_size=2, stride=2)
            )
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[ConvNeXtBlock(dim, drop_paths[i]) for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class ConvNeXt(nn.Module):
    """ConvNeXt feature extractor: image -> stage-4 map (`forward_features`) -> `gap`.

    `num_features` is the channel count of the last map (768 for Tiny); the total stride
    is 32, so a 384x384 input gives a 12x12 map.
    """

    def __init__(
        self,
        depths: tuple[int, ...] = CONVNEXT_TINY_DEPTHS,
        dims: tuple[int, ...] = CONVNEXT_TINY_DIMS,
        drop_path_rate: float = 0.0,
        in_chans: int = 3,
    ):
        super().__init__()
        self.depths, self.dims = tuple(depths), tuple(dims)
        self.num_features = dims[-1]
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0], eps=LAYER_NORM_EPS)
        )
        # stochastic depth rate grows linearly with block index, as in the paper
        n = sum(depths)
        rates = [drop_path_rate * i / max(n - 1, 1) for i in range(n)]
        stages, start, in_dim = [], 0, dims[0]
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            stages.append(ConvNeXtStage(in_dim, dim, depth, rates[start:start + depth], downsample=i > 0))
            start, in_dim = start + depth, dim
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(dims[-1], eps=LAYER_NORM_EPS)
        self.apply(_init_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_pool(self, part: torch.Tensor) -> torch.Tensor:
        """Stage-4 map [B,C,h,w] -> LayerNorm(mean over h,w) [B,C]: MEAN's `gap`."""
        return self.norm(part.mean(dim=(-2, -1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_pool(self.forward_features(x))


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def convnext_tiny(drop_path_rate: float = 0.0) -> ConvNeXt:
    return ConvNeXt(CONVNEXT_TINY_DEPTHS, CONVNEXT_TINY_DIMS, drop_path_rate)


# ----------------------------------------------------------------------------------------
# ImageNet checkpoints: official release format and timm format -> our names

# ImageNet classifier keys, expected in a checkpoint and dropped on purpose
_OFFICIAL_HEAD = re.compile(r"^head\.(weight|bias)$")
_TIMM_HEAD = re.compile(r"^head\.fc\.(weight|bias)$")

_OFFICIAL_BLOCK_PARTS = {
    "dwconv": "conv_dw",
    "norm": "norm",
    "pwconv1": "mlp.fc1",
    "pwconv2": "mlp.fc2",
}


def unwrap_state_dict(obj: object, source: str) -> dict[str, torch.Tensor]:
    """Find the tensor mapping inside a loaded file ("model"/"state_dict" wrappers, DDP "module.")."""
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "model_state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise MeanNavError(f"{source}: no state dict of tensors found (looked at the top level and "
                           f"under 'model'/'state_dict'); give an ImageNet checkpoint file")
    out = {}
    for k, v in obj.items():
        out[k[len("module."):] if k.startswith("module.") else k] = v
    return out


def detect_convnext_format(state: Mapping[str, torch.Tensor]) -> str:
    """"official", "timm" or "native" (ours), judged by the stem keys."""
    if "downsample_layers.0.0.weight" in state:
        return "official"
    if "stem.0.weight" in state and "head.norm.weight" in state:
        return "timm"
    if "stem.0.weight" in state:
        return "native"
    return "unknown"


def convert_official_convnext(state: Mapping[str, torch.Tensor]) -> tuple[dict, list[str], list[str]]:
    """Official ConvNeXt release keys -> ours. Returns (converted, dropped_head, unmapped)."""
    out, dropped, unmapped = {}, [], []
    for key, value in state.items():
        if _OFFICIAL_HEAD.match(key):
            dropped.append(key)
            continue
        m = re.match(r"^downsample_layers\.(\d+)\.([01])\.(weight|bias)$", key)
        if m:
            stage, idx, kind = int(m.group(1)), m.group(2), m.group(3)
            out[f"stem.{idx}.{kind}" if stage == 0 else f"stages.{stage}.downsample.{idx}.{kind}"] = value
            continue
        m = re.match(r"^stages\.(\d+)\.(\d+)\.(gamma|(dwconv|norm|pwconv1|pwconv2)\.(weight|bias))$", key)
        if m:
            stage, block, rest = m.group(1), m.group(2), m.group(3)
            if rest != "gamma":
                rest = f"{_OFFICIAL_BLOCK_PARTS[m.group(4)]}.{m.group(5)}"
            out[f"stages.{stage}.blocks.{block}.{rest}"] = value
            continue
        if key in ("norm.weight", "norm.bias"):
            out[key] = value
            continue
        unmapped.append(key)
    return out, dropped, unmapped


def convert_timm_convnext(state: Mapping[str, torch.Tensor]) -> tuple[dict, list[str], list[str]]:
    """timm ConvNeXt keys -> ours (only the head norm moves). Returns (converted, dropped_head, unmapped)."""
    out, dropped, unmapped = {}, [], []
    for key, value in state.items():
        if _TIMM_HEAD.match(key):
            dropped.append(key)
        elif key.startswith("head.norm."):
            out["norm." + key[len("head.norm."):]] = value
        elif key.startswith(("stem.", "stages.")):
            out[key] = value
        else:
            unmapped.append(key)
    return out, dropped, unmapped


def load_state_strict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str,
                      unmapped: list[str] | None = None) -> None:
    """Load `state` into `module`, raising MeanNavError that lists every missing,
    unexpected or wrongly shaped key (never a silent strict=False)."""
    own = module.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(set(unmapped or []) | {k for k in state if k not in own})
    shapes = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches ({len(shapes)}): {_listing(shapes)}")
    if problems:
        raise MeanNavError(f"{source}: checkpoint does not match the {type(module).__name__} "
                           f"architecture: {'; '.join(problems)}; check that the file is for this backbone")
    with torch.no_grad():
        module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


def _listing(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... and {len(keys) - limit} more" if len(keys) > limit else "")


def load_convnext_imagenet(model: ConvNeXt, path: str | Path) -> dict[str, object]:
    """Load an ImageNet ConvNeXt checkpoint (official or timm format) into `model`.

    The ImageNet classifier is dropped on purpose; every other key must match exactly.
    Returns a small report: {"format", "dropped"}.
    """
    path = Path(path)
    state = unwrap_state_dict(read_weights_file(path), str(path))
    fmt = detect_convnext_format(state)
    if fmt == "official":
        converted, dropped, unmapped = convert_official_convnext(state)
    elif fmt == "timm":
        converted, dropped, unmapped = convert_timm_convnext(state)
    elif fmt == "native":
        converted, dropped, unmapped = dict(state), [], []
    else:
        raise MeanNavError(f"{path}: not a ConvNeXt checkpoint (no 'downsample_layers.0.0.weight' or "
                           f"'stem.0.weight' key; first keys: {_listing(sorted(state), 5)}); give the "
                           f"official ConvNeXt release file or a timm ConvNeXt state dict")
    load_state_strict(model, converted, str(path), unmapped)
    return {"format": fmt, "dropped": dropped}


def read_weights_file(path: Path) -> object:
    """torch.load(weights_only=True) (or a .safetensors reader) with one clear error for
    missing, truncated or foreign files."""
    if not path.is_file():
        raise MeanNavError(f"{path}: weights file not found; check the path (nothing is downloaded)")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or pickled-object files
        raise MeanNavError(f"{path}: cannot be read as a PyTorch weights file with weights_only=True "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                           f"the file may be truncated or not a state dict") from None


_SAFETENSORS_DTYPES = {
    "F64": (np.float64, torch.float64), "F32": (np.float32, torch.float32), "F16": (np.float16, torch.float16),
    "BF16": (np.int16, torch.bfloat16), "I64": (np.int64, torch.int64), "I32": (np.int32, torch.int32),
    "I16": (np.int16, torch.int16), "I8": (np.int8, torch.int8), "U8": (np.uint8, torch.uint8),
    "BOOL": (np.bool_, torch.bool),
}


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a .safetensors file (timm/Hugging Face weights) without the safetensors package.

    Layout: 8-byte little-endian header length, a JSON header {name: {dtype, shape,
    data_offsets}} (plus optional "__metadata__"), then the raw little-endian tensor bytes.
    """
    data = path.read_bytes()
    try:
        (header_len,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + header_len])
        base = 8 + header_len
        out = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            np_dtype, torch_dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
            start, end = entry["data_offsets"]
            if base + end > len(data):
                raise ValueError(f"tensor {name} runs past the end of the file")
            array = np.frombuffer(data, dtype=np.dtype(np_dtype).newbyteorder("<"), count=(end - start)
                                  // np.dtype(np_dtype).itemsize, offset=base + start)
            tensor = torch.from_numpy(array.astype(np_dtype, copy=True)).reshape(entry["shape"])
            out[name] = tensor.view(torch_dtype) if torch_dtype == torch.bfloat16 else tensor
        return out
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise MeanNavError(f"{path}: not a valid .safetensors file ({exc}); the file may be truncated") from None


def native_to_official(state: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """Our keys -> the official release layout (for tests and for sharing weights back)."""
    reverse = {v: k for k, v in _OFFICIAL_BLOCK_PARTS.items()}
    out = OrderedDict()
    for key, value in state.items():
        m = re.match(r"^stem\.([01])\.(weight|bias)$", key)
        if m:
            out[f"downsample_layers.0.{m.group(1)}.{m.group(2)}"] = value
            continue
        m = re.match(r"^stages\.(\d+)\.downsample\.([01])\.(weight|bias)$", key)
        if m:
            out[f"downsample_layers.{m.group(1)}.{m.group(2)}.{m.group(3)}"] = value
            continue
        m = re.match(r"^stages\.(\d+)\.blocks\.(\d+)\.(gamma|(conv_dw|norm|mlp\.fc1|mlp\.fc2)\.(weight|bias))$", key)
        if m:
            rest = m.group(3) if m.group(3) == "gamma" else f"{reverse[m.group(4)]}.{m.group(5)}"
            out[f"stages.{m.group(1)}.{m.group(2)}.{rest}"] = value
            continue
        out[key] = value  # norm.weight / norm.bias keep their names
    return out
