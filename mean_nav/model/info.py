"""`mean-nav model-info`: parameters per module and multiply-accumulates (MACs) per image.

MACs are counted by running the graph once on the meta device (no memory, no weights,
about a second for ConvNeXt-Tiny at 384 px):

- forward hooks on nn.Conv1d/Conv2d/Conv3d (output elements x in_channels/groups x kernel
  size) and nn.Linear (output elements x in_features);
- a torch-function mode for matrix products written outside those modules (torch.matmul
  and `@`, mm, bmm, addmm, baddbmm, einsum, F.linear, F.conv*): output elements x the
  contracted size.

Not counted: normalisations, activations, pooling, softmax and element-wise ops (as in
the paper's and fvcore-style "FLOPs", which are really MACs). Biases are not counted.

The test-time graph is what runs on the drone: backbone -> gap -> L2 (MEAN.embed).
"""
from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..config import from_dict, load_yaml, to_dict
from ..errors import MeanNavError
from .mean import MEAN, ModelConfig

IMAGENET_CLASSES = 1000
# the paper's setting (spec mean-model.md), printed for comparison
PAPER = {"backbone": "convnext_tiny", "num_classes": 701, "img_size": 384,
         "params": 35_729_820, "params_with_imagenet_head": 36_498_820, "gmacs_per_image": 13.09}


@dataclass
class MacCount:
    total: int = 0
    by_module: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    by_op: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, module: str, op: str, macs: int) -> None:
        self.total += macs
        self.by_module[module] += macs
        self.by_op[op] += macs


def _conv_macs(out: torch.Tensor, weight: torch.Tensor, groups: int) -> int:
    # weight: [out_ch, in_ch/groups, *kernel]; every output element sums in_ch/groups * kernel products
    return out.numel() * math.prod(weight.shape[1:])


def _matmul_macs(func, args, kwargs, out) -> int:
    """MACs of a matrix-product-like torch function call, from its inputs and output."""
    name = getattr(func, "__name__", str(func))
    if name == "einsum":
        equation, operands = args[0], args[1:]
        if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = operands[0]
        sizes = {}
        inputs = equation.split("->")[0].replace(" ", "").split(",")
        for letters, tensor in zip(inputs, operands):
            for letter, size in zip(letters, tensor.shape):
                sizes[letter] = size
        return math.prod(sizes.values())  # every index combination is one product
    if name in ("linear",):
        return out.numel() * args[0].shape[-1]
    if name.startswith("conv") and name[4:5].isdigit():
        weight = args[1] if len(args) > 1 else kwargs["weight"]
        return out.numel() * math.prod(weight.shape[1:])
    if name in ("addmm", "baddbmm"):
        a = args[1]
    else:
        a = args[0]
    return out.numel() * a.shape[-1]


_MATMUL_FUNCS = {
    torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.baddbmm, torch.einsum,
    torch.Tensor.matmul, torch.Tensor.mm, torch.Tensor.bmm, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__,
    F.linear, F.conv1d, F.conv2d, F.conv3d,
}
_HOOKED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class _FunctionalMatmulCounter(TorchFunctionMode):
    """Counts matrix products that no hooked Conv/Linear module accounts for."""

    def __init__(self, counter: MacCount, stack: list[str], hooked_depth: list[int]):
        super().__init__()
        self.counter, self.stack, self.hooked_depth = counter, stack, hooked_depth

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _MATMUL_FUNCS and self.hooked_depth[0] == 0 and torch.is_tensor(out):
            if func is torch.Tensor.__rmatmul__:
                args = (args[1], args[0])
            name = getattr(func, "__name__", "matmul").strip("_")
            self.counter.add(self.stack[-1] if self.stack else "", name, _matmul_macs(func, args, kwargs, out))
        return out


def count_macs(module: nn.Module, *inputs: torch.Tensor, call=None) -> MacCount:
    """MACs of one call of `module` (or of `call(*inputs)`), attributed to module names."""
    counter = MacCount()
    stack: list[str] = []
    hooked_depth = [0]
    handles = []
    for name, sub in module.named_modules():
        def pre(mod, args, name=name):
            stack.append(name)
            if isinstance(mod, _HOOKED):
                hooked_depth[0] += 1

        def post(mod, args, out, name=name):
            stack.pop()
            if isinstance(mod, _HOOKED):
                hooked_depth[0] -= 1
                if isinstance(mod, nn.Linear):
                    counter.add(name, "linear", out.numel() * mod.in_features)
                else:
                    counter.add(name, type(mod).__name__.lower(), _conv_macs(out, mod.weight, mod.groups))

        handles.append(sub.register_forward_pre_hook(pre))
        handles.append(sub.register_forward_hook(post))
    try:
        with torch.no_grad(), _FunctionalMatmulCounter(counter, stack, hooked_depth):
            (call or module)(*inputs)
    finally:
        for h in handles:
            h.remove()
    return counter


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_rows(model: MEAN) -> list[tuple[str, str, int]]:
    """(name, description, parameters) per part of MEAN, backbone split by stage."""
    rows = [("backbone", f"{model.cfg.backbone} (with the gap LayerNorm)", _params(model.backbone))]
    for name, child in model.backbone.named_children():
        if name == "stages":  # ConvNeXt: one row per stage
            for idx, stage in child.named_children():
                rows.append((f"  backbone.stages.{idx}", f"{len(stage.blocks)} blocks", _params(stage)))
            continue
        n = _params(child)
        if n:
            rows.append((f"  backbone.{name}", "", n))
    rows += [
        ("pee", "PEE / DEG: dilated convs, fusion, 2 dropout draws", _params(model.pee)),
        ("heads.0", "DEC head on PEE draw 1", _params(model.heads[0])),
        ("heads.1", "DEC head on PEE draw 2", _params(model.heads[1])),
        ("heads.2", "DEC head on gap (GEE)", _params(model.heads[2])),
        ("cea.de", "CEA / DE", _params(model.cea.de)),
        ("cea.fat", "CEA / FAT", _params(model.cea.fat)),
        ("cea.msf", "CEA / MSF", _params(model.cea.msf_part) + _params(model.cea.msf_attn)
         + _params(model.cea.msf_fuse)),
    ]
    return rows


def imagenet_head_params(cfg: ModelConfig, embed_dim: int) -> int:
    """Parameters of the ImageNet checkpoint that MEAN leaves out (the paper counts them)."""
    if cfg.backbone == "efficientnet_lite0":
        from .efficientnet import HEAD_CHANNELS, LITE0_STAGES

        unused = HEAD_CHANNELS * IMAGENET_CLASSES + IMAGENET_CLASSES       # _fc
        if cfg.efficientnet_features == "blocks":                          # _conv_head + _bn1
            unused += LITE0_STAGES[-1][5] * HEAD_CHANNELS + 2 * HEAD_CHANNELS
        return unused
    return embed_dim * IMAGENET_CLASSES + IMAGENET_CLASSES


def model_info(cfg: ModelConfig) -> dict:
    """Parameter and MAC report for `cfg` (built on the meta device: no weights loaded)."""
    with torch.device("meta"):
        model = MEAN(cfg).eval()
        image = torch.empty(1, 3, cfg.img_size, cfg.img_size)
    deploy = count_macs(model, image, call=model.embed)
    training = count_macs(model, image)
    rows = parameter_rows(model)
    total = _params(model)
    imagenet_head = imagenet_head_params(cfg, model.embed_dim)
    top_level_deploy = defaultdict(int)  # in execution order; ConvNeXt stages listed one by one
    for name, macs in deploy.by_module.items():
        parts = name.split(".")
        top_level_deploy[".".join(parts[:3] if parts[1:2] == ["stages"] else parts[:2])] += macs
    return {
        "model_config": to_dict(cfg),
        "embed_dim": model.embed_dim,
        "feature_map": [model.embed_dim, cfg.img_size // 32, cfg.img_size // 32],
        "parameters": {name.strip(): n for name, _, n in rows},
        "parameter_rows": rows,
        "parameters_total": total,
        "loss_logit_scale": 1,
        "parameters_total_with_loss_scalars": total + 1,
        "imagenet_head_unused": imagenet_head,
        "parameters_total_with_imagenet_head": total + imagenet_head,
        "deploy_gmacs_per_image": deploy.total / 1e9,
        "deploy_macs_per_image": deploy.total,
        "deploy_macs_by_module": dict(top_level_deploy),
        "deploy_macs_by_op": dict(deploy.by_op),
        "training_gmacs_per_image": training.total / 1e9,
        "counted": "Conv1d/2d/3d and Linear (forward hooks), matmul/mm/bmm/addmm/baddbmm/einsum/F.linear/F.conv* "
                   "outside them (torch-function mode); not norms, activations, pooling, softmax, element-wise, biases",
    }


def format_report(info: dict) -> str:
    cfg = info["model_config"]
    c, h, w = info["feature_map"]
    lines = [
        f"MEAN, backbone {cfg['backbone']}, {cfg['num_classes']} classes, input {cfg['img_size']}x{cfg['img_size']}: "
        f"feature map {c}x{h}x{w}, descriptor {info['embed_dim']}-d",
        "",
        f"{'module':<22}{'parameters':>14}  description",
    ]
    for name, description, n in info["parameter_rows"]:
        lines.append(f"{name:<22}{n:>14,}  {description}")
    lines += [
        f"{'total (MEAN module)':<22}{info['parameters_total']:>14,}",
        f"{'+ loss logit scale':<22}{info['loss_logit_scale']:>14,}  learnable InfoNCE scale (in MEANLoss)",
        f"{'+ ImageNet head':<22}{info['imagenet_head_unused']:>14,}  unused ImageNet classifier"
        + (" and head conv" if cfg["backbone"] == "efficientnet_lite0" and cfg["efficientnet_features"] == "blocks"
           else "") + " (the paper counts it)",
        f"{'total with it':<22}{info['parameters_total_with_imagenet_head']:>14,}",
        "",
        f"test-time graph (backbone -> gap -> L2), per {cfg['img_size']}x{cfg['img_size']} image:",
    ]
    for name, macs in info["deploy_macs_by_module"].items():
        lines.append(f"  {name:<20}{macs / 1e9:>10.3f} GMACs")
    lines += [
        f"  {'total':<20}{info['deploy_gmacs_per_image']:>10.3f} GMACs "
        f"({2 * info['deploy_gmacs_per_image']:.2f} G for a drone + satellite pair)",
        f"training graph (all branches): {info['training_gmacs_per_image']:.3f} GMACs per image",
        f"counted: {info['counted']}",
    ]
    if all(cfg[k] == PAPER[k] for k in ("backbone", "num_classes", "img_size")):
        lines.append(
            f"reference implementation: {PAPER['params']:,} parameters ({PAPER['params_with_imagenet_head']:,} "
            f"with the ImageNet head), {PAPER['gmacs_per_image']} GMACs per image (paper: 36.50M, 26.18 GFLOPs per pair)"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", choices=["convnext_tiny", "efficientnet_lite0"], default=None,
                        help="backbone (default convnext_tiny)")
    parser.add_argument("--num-classes", type=int, default=None, help="training locations (default 701)")
    parser.add_argument("--img-size", type=int, default=None, help="input side in pixels (default 384)")
    parser.add_argument("--efficientnet-features", choices=["conv_head", "blocks"], default=None,
                        help="EfficientNet-Lite0 feature map: 320-ch blocks (default) or 1280-ch conv_head")
    parser.add_argument("--config", type=Path, help="YAML with model fields (top level or under 'model:')")
    parser.add_argument("--checkpoint", type=Path, help="mean-nav checkpoint: take its config, print its deploy hash")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")


def _config_from_args(args: argparse.Namespace) -> tuple[ModelConfig, str | None]:
    data: dict = {}
    digest = None
    if args.config and args.checkpoint:
        raise MeanNavError("--config and --checkpoint: give one of them, not both")
    if args.config:
        raw = load_yaml(args.config)
        data = raw["model"] if isinstance(raw.get("model"), dict) else raw
        data = dict(data)
        source = str(args.config)
    elif args.checkpoint:
        from .checkpoint import load_checkpoint

        ckpt = load_checkpoint(args.checkpoint)
        data, digest, source = dict(ckpt["model_config"]), ckpt.get("deploy_hash"), str(args.checkpoint)
    else:
        source = "command line"
    for field_name, value in (("backbone", args.backbone), ("num_classes", args.num_classes),
                              ("img_size", args.img_size), ("efficientnet_features", args.efficientnet_features)):
        if value is not None:
            data[field_name] = value
    data["pretrained"] = None  # counting never needs weights
    return from_dict(ModelConfig, data, source=source), digest


def run(args: argparse.Namespace) -> int:
    cfg, digest = _config_from_args(args)
    info = model_info(cfg)
    if digest:
        info["deploy_hash"] = digest
    if args.json:
        out = dict(info)
        out["parameter_rows"] = [{"module": n.strip(), "description": d, "parameters": p}
                                 for n, d, p in info["parameter_rows"]]
        print(json.dumps(out, indent=2))
    else:
        print(format_report(info))
        if digest:
            print(f"deploy hash: {digest}")
    return 0
