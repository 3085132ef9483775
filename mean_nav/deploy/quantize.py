"""`mean-nav quantize`: FP32 ONNX -> INT8 Q/DQ (TensorRT), INT8 for onnxruntime's CPU, FP16.

Three artefacts from one command, all carrying the FP32 model's identity in metadata:

- `<stem>.int8-qdq.onnx`: onnxruntime static quantization in QDQ format, symmetric signed
  int8 activations and per-channel symmetric int8 weights on Conv/MatMul/Gemm inputs (and
  around ReLU/ReLU6), biases left float: the explicit-quantization form TensorRT 10.x/11
  builds from (no calibrator API on device), checked against TensorRT's rules
  (`explicit_quantization_problems`) before it is written. onnxruntime's quantizer rather
  than NVIDIA ModelOpt (`modelopt.onnx.quantization`): ModelOpt 0.47's `[onnx]` extra pins
  onnxruntime-gpu 1.24 (the same `onnxruntime` module, replacing the CPU package), onnx 1.21
  and cupy-cuda12x, so it neither installs beside this project's onnxruntime nor calibrates
  on a machine without CUDA.
  Its accuracy is checked here with onnxruntime, on CPU, before it reaches a device.
- `<stem>.int8-cpu.onnx`: the fastest INT8 form for onnxruntime's CPU kernels. Several
  candidates are built and timed on this machine (dynamic int8 MatMul; static u8
  activations / s8 per-channel weights in QOperator form, ReLU6 folded into the u8 ranges
  so that layers chain in INT8); the fastest that keeps the
  cosine bar wins, and the report says which and why. TensorRT-style symmetric s8
  activations run slower than FP32 on onnxruntime's CPU, hence two INT8 files.
- `<stem>.fp16.onnx`: float16 weights and compute, float32 inputs/outputs; LayerNorm
  stays float32 because its variance overflows float16.

By default the first and the last Conv/MatMul stay float (the stem sees raw pixels, the
last layer feeds the descriptor) and activation ranges come from the 99.999th percentile
of the calibration histograms rather than min/max: both measured more accurate on
EfficientNet-Lite0 at 384 px for little speed. A variant that still misses the cosine bar
keeps more layers float, most damaging first (`--keep-float auto`, measured per layer): on
Lite0 one depthwise convolution (blocks.0, fed by the stem's uneven channel ranges) costs
more than all other layers together.

Each variant is compared with FP32 on held-out images (cosine per descriptor, min/mean)
and, given an evaluation set, on retrieval (R@1 / AP and their change).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from ..errors import MeanNavError
from .backends import OnnxRuntimeEmbedder, read_onnx_info
from .deploy_info import DeployInfo, prepare_input
from .images import RetrievalSet, cosine_per_row, load_images, load_retrieval_set, retrieval_metrics

log = logging.getLogger(__name__)

VARIANTS = ("int8-qdq", "int8-cpu", "fp16")
INT8_VARIANTS = {"int8-qdq", "int8-cpu"}   # the ones that need calibration images
MIN_COSINE = 0.98              # per descriptor, against FP32
MAX_R1_DROP = 1.0              # held-out R@1 points a variant may lose (checked when there is an eval set)
QUANTIZED_OPS = ["Conv", "MatMul", "Gemm"]
# ReLU/ReLU6 quantized too: their clipping then lives in the output range of the layer before
# (u8 [0, 6] exactly), so INT8 runs layer to layer without a float round trip per activation
# (Lite0 384 CPU INT8: 16.3 -> 8.0 ms, and more accurate)
ACTIVATION_OPS = ["Clip", "Relu"]
AUTO_KEEP_FLOAT_MAX = 8        # layers "auto" may leave float before it reports failure
# LayerNorm's variance overflows float16; the L2-norm tail after it is tiny and fine either way
# (blocking it too trips a duplicate-Cast-name bug in onnxruntime's float16 converter)
FP16_KEEP_FLOAT32_OPS = ["LayerNormalization"]


@dataclass
class VariantResult:
    """One produced (or candidate) ONNX and how it compares with FP32."""

    name: str
    precision: str
    path: str
    cosine_min: float = float("nan")
    cosine_mean: float = float("nan")
    latency_ms: float = float("nan")        # batch 1, best of N runs, this machine
    speedup_vs_fp32: float = float("nan")
    retrieval: dict = field(default_factory=dict)
    note: str = ""
    kept_float: list = field(default_factory=list)     # compute nodes left unquantized


@dataclass
class QuantizeReport:
    source: str
    model_hash: str
    calibration_images: int
    check_images: int
    threads: int
    fp32_latency_ms: float
    variants: list[VariantResult]
    cpu_candidates: list[VariantResult]
    cpu_choice: str
    cpu_choice_reason: str
    eval_description: str = ""
    fp32_retrieval: dict = field(default_factory=dict)
    kept_float: list = field(default_factory=list)       # kept float in every variant (first/last, --keep-float N)
    calibrate_method: str = ""
    sensitivity: list = field(default_factory=list)      # [node, mean cosine with only it INT8], worst first

    def table(self) -> str:
        rows = [("variant", "file", "cos min", "cos mean", "ms b1", "x FP32", "R@1", "AP")]
        fp = self.fp32_retrieval
        rows.append(("fp32", Path(self.source).name, "1", "1", f"{self.fp32_latency_ms:.1f}", "1.00",
                     _fmt(fp.get("R@1")), _fmt(fp.get("AP"))))
        for v in self.variants:
            r = v.retrieval
            rows.append((v.precision, Path(v.path).name, f"{v.cosine_min:.4f}", f"{v.cosine_mean:.4f}",
                         f"{v.latency_ms:.1f}", f"{v.speedup_vs_fp32:.2f}",
                         _fmt(r.get("R@1"), r.get("dR@1")), _fmt(r.get("AP"), r.get("dAP"))))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        lines.append(f"CPU INT8 variant: {self.cpu_choice} ({self.cpu_choice_reason})")
        for c in self.cpu_candidates:
            if not np.isfinite(c.latency_ms):
                lines.append(f"  candidate {c.name}: {c.note}")
                continue
            lines.append(f"  candidate {c.name}: {c.latency_ms:.1f} ms (x{c.speedup_vs_fp32:.2f}), "
                         f"cosine min {c.cosine_min:.4f}{'  ' + c.note if c.note else ''}")
        if self.eval_description:
            lines.append(f"retrieval on {self.eval_description}")
        for v in self.variants:
            if v.kept_float:
                lines.append(f"{v.precision} keeps {len(v.kept_float)} layers float: {', '.join(v.kept_float)}")
        return "\n".join(lines)


def _fmt(value, delta=None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if delta is None else f"{value:.2f} ({delta:+.2f})"


# ----------------------------------------------------------------------------- building blocks


class _quiet_root_logger:
    """onnxruntime's quantizer and float16 converter log per-tensor INFO lines (partly on the
    root logger); hide those, keep their warnings."""

    @staticmethod
    def _drop(record: logging.LogRecord) -> bool:
        chatty = record.name == "root" or record.name.startswith("onnxruntime")
        return not (chatty and record.levelno < logging.WARNING)

    def __enter__(self):
        for h in logging.getLogger().handlers:
            h.addFilter(self._drop)
        return self

    def __exit__(self, *exc):
        for h in logging.getLogger().handlers:
            h.removeFilter(self._drop)


class _CalibrationReader:
    """onnxruntime CalibrationDataReader over in-memory images (batches of `batch_size`).

    Supports `set_range` so that the calibrator consumes one batch at a time
    (CalibStridedMinMax = 1): ranges and histograms are merged batch by batch instead of
    holding every intermediate tensor of every image in memory at once.
    """

    def __init__(self, images: list[np.ndarray], info: DeployInfo, input_name: str, batch_size: int = 4):
        from .embedder import to_batch_uint8

        self.batches = [prepare_input(to_batch_uint8(images[i:i + batch_size], info.preprocessing.img_size), info)
                        for i in range(0, len(images), batch_size)]
        self.input_name = input_name
        self.bar = tqdm(total=len(self.batches), desc="calibration", unit="batch", leave=False)
        self.index, self.end = 0, len(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.index, self.end = start_index, min(end_index, len(self.batches))

    def get_next(self):
        if self.index >= self.end:
            if self.end >= len(self.batches):
                self.bar.close()
            return None
        batch = self.batches[self.index]
        self.index += 1
        self.bar.update(1)
        return {self.input_name: batch}

    def rewind(self):
        self.index, self.end = 0, len(self.batches)
        self.bar.reset()


def _as_calibration_reader(images, info, input_name):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(_CalibrationReader, CalibrationDataReader):
        pass

    return Reader(images, info, input_name)


def _input_name(path: Path) -> str:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in initializers][0]


def _has_ops(path: Path, op_types: tuple[str, ...]) -> bool:
    import onnx

    return any(n.op_type in op_types for n in onnx.load(str(path), load_external_data=False).graph.node)


def layer_sensitivity(prepared: Path, work: Path, calibration: list[np.ndarray], info: DeployInfo,
                      images: list[np.ndarray], reference: np.ndarray, calibrate_method: str,
                      threads: int | None, cache: Path | None = None) -> list[tuple[str, float]]:
    """(node, mean cosine to FP32 when only that node is INT8), most damaging first.

    One calibration (ranges cached in `cache`), then one Q/DQ graph per Conv/MatMul/Gemm
    with just that node quantized: a direct measure of what each layer costs the descriptor.
    """
    import onnx

    cache = cache or work / "calibration_ranges.json"
    if not cache.is_file():
        build_int8_qdq(prepared, work / "all.onnx", calibration, info, calibrate_method, cache=cache)
    nodes = [n.name for n in onnx.load(str(prepared), load_external_data=False).graph.node
             if n.op_type in QUANTIZED_OPS]
    scores = []
    for name in tqdm(nodes, desc="layer sensitivity", unit="layer", leave=False):
        out = work / "one.onnx"
        build_int8_qdq(prepared, out, None, info, calibrate_method, only=[name], cache=cache)
        _stamp(out, info.replace(precision="int8-qdq"))
        emb = OnnxRuntimeEmbedder(out, threads=threads, providers=["CPUExecutionProvider"])
        scores.append((name, float(cosine_per_row(reference, emb.embed(images, batch_size=8)).mean())))
    return sorted(scores, key=lambda item: item[1])


def _with_their_activations(path: Path, kept: list[str]) -> list[str]:
    """`kept` plus the ReLU/Clip nodes that read a kept node's output: quantized on their own,
    such an activation would be fed through the unclipped output's (much wider) INT8 range."""
    import onnx

    nodes = onnx.load(str(path), load_external_data=False).graph.node
    outputs = {o for n in nodes if n.name in kept for o in n.output}
    extra = [n.name for n in nodes if n.op_type in ACTIVATION_OPS and n.input and n.input[0] in outputs]
    return list(kept) + [name for name in extra if name not in kept]


def _first_and_last_compute_nodes(path: Path) -> list[str]:
    import onnx

    names = [n.name for n in onnx.load(str(path), load_external_data=False).graph.node
             if n.op_type in QUANTIZED_OPS]
    return sorted({names[0], names[-1]}) if names else []


def _stamp(path: Path, info: DeployInfo) -> None:
    """Record `info` (with its precision) in an ONNX file's metadata, atomically."""
    import onnx

    from .export import set_metadata, write_onnx_atomic

    proto = onnx.load(str(path))
    set_metadata(proto, info)
    write_onnx_atomic(proto, path)


def preprocess_for_quantization(src: Path, dst: Path) -> None:
    """Shape inference + EP-independent graph optimisation (BN folding etc.) before quantizing."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
    except Exception as exc:  # symbolic shape inference fails on a few graphs: plain ONNX shape inference
        log.debug("symbolic shape inference failed (%s); using ONNX shape inference", exc)
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)


def _calibration_method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy}[name]


class CalibrationHistogramError(MeanNavError):
    """The percentile/entropy calibrator met a tensor too narrow to histogram."""


def _quantize_static(prepared: Path, out: Path, calibration: list[np.ndarray] | None, info: DeployInfo,
                     calibrate_method: str, cache: Path | None, **kwargs) -> None:
    """onnxruntime's quantize_static with our calibration reader and ranges cache; its
    histogram failure on a near-constant tensor becomes an error that says what to do."""
    from onnxruntime.quantization import quantize_static

    reader = None if calibration is None else _as_calibration_reader(calibration, info, _input_name(prepared))
    try:
        quantize_static(str(prepared), str(out), reader, calibrate_method=_calibration_method(calibrate_method),
                        calibration_cache_path=None if cache is None else str(cache), **kwargs)
    except ValueError as exc:
        if "bins" not in str(exc):
            raise
        raise CalibrationHistogramError(
            f"onnxruntime's {calibrate_method} calibration cannot histogram a near-constant tensor (ONNX "
            "files exported before the L2 normalisation became ReduceL2/Max/Div have a Clip of the "
            "per-image norm); re-export with `mean-nav export` or use --calibrate-method minmax") from None


def build_int8_qdq(prepared: Path, out: Path, calibration: list[np.ndarray] | None, info: DeployInfo,
                   calibrate_method: str = "minmax", exclude: list[str] | None = None,
                   only: list[str] | None = None, cache: Path | None = None) -> None:
    """TensorRT-style Q/DQ: symmetric s8 activations, per-channel symmetric s8 weights.

    `cache`: calibration ranges JSON, written on first use and reused afterwards (then
    `calibration` may be None); `only`: quantize just these nodes (sensitivity analysis).
    """
    from onnxruntime.quantization import QuantFormat, QuantType

    _quantize_static(
        prepared, out, calibration, info, calibrate_method, cache,
        quant_format=QuantFormat.QDQ, op_types_to_quantize=QUANTIZED_OPS + ACTIVATION_OPS, per_channel=True,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
        nodes_to_exclude=exclude or [], nodes_to_quantize=only,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                       # TensorRT wants Q/DQ in front of every quantized input, nothing folded away
                       "QDQKeepRemovableActivations": True, "CalibStridedMinMax": 1,
                       # TensorRT's IDequantizeLayer takes INT8/FP8/INT4 only: an INT32 bias
                       # behind a DequantizeLinear fails the parse; TensorRT fuses a float bias
                       "QuantizeBias": False,
                       "QDQOpTypePerChannelSupportToAxis": {"Conv": 0, "MatMul": -1}})
    problems = explicit_quantization_problems(out)
    if problems:
        raise MeanNavError(f"{out}: the Q/DQ graph breaks TensorRT's explicit-quantization rules "
                           f"({'; '.join(problems[:3])}); report this with the onnxruntime version")


def _per_channel_axis(consumer, input_index: int, rank: int) -> int | None:
    """The output-channel axis of a weight feeding `consumer` (None: not a weight input)."""
    if input_index != 1:
        return None
    if consumer.op_type == "Conv":
        return 0                                  # [C_out, C_in/g, kh, kw]
    if consumer.op_type == "ConvTranspose":
        return 1                                  # [C_in, C_out/g, kh, kw]
    if consumer.op_type == "Gemm":
        trans_b = next((a.i for a in consumer.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if consumer.op_type == "MatMul":
        return rank - 1                           # [..., K, N]
    return None


def explicit_quantization_problems(path_or_model) -> list[str]:
    """Why TensorRT's explicit quantization would refuse this Q/DQ ONNX (empty: it follows the rules).

    The rules (TensorRT 10.x/11 "Working with Quantized Types", onnx-tensorrt's Q/DQ import):
    opset >= 13 (per-channel axis); no QLinear*/ *Integer operators; every DequantizeLinear
    reads INT8 (an INT8 initializer or a QuantizeLinear), so biases stay float; zero points
    present, INT8 and 0; scales positive and finite; per-channel weight scales along the
    output-channel axis of the weight's consumer, one per channel, symmetric (q within
    -127..127, the full range used).
    """
    import onnx
    from onnx import numpy_helper

    model = path_or_model if isinstance(path_or_model, onnx.ModelProto) else onnx.load(str(path_or_model))
    graph = model.graph
    problems: list[str] = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        problems.append(f"opset {opset} < 13 (per-channel DequantizeLinear needs 13)")
    init = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i, name in enumerate(n.input):
            consumers.setdefault(name, []).append((n, i))
    for n in graph.node:
        if n.op_type.startswith("QLinear") or n.op_type in ("ConvInteger", "MatMulInteger", "DynamicQuantizeLinear"):
            problems.append(f"{n.name}: {n.op_type} is not explicit Q/DQ")
        if n.op_type in ("Conv", "Gemm", "ConvTranspose") and len(n.input) > 2 and n.input[2]:
            bias = producers.get(n.input[2])
            if bias is not None and bias.op_type == "DequantizeLinear":
                problems.append(f"{n.name}: bias {n.input[2]} is quantized (must stay float)")
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if len(n.input) < 3 or n.input[2] not in init:
            problems.append(f"{n.name}: no INT8 zero point initializer")
            continue
        zero_point = numpy_helper.to_array(init[n.input[2]])
        if zero_point.dtype != np.int8 or zero_point.any():
            problems.append(f"{n.name}: zero point {zero_point.dtype} {zero_point.ravel()[:3]} (must be int8 0)")
        scale = numpy_helper.to_array(init[n.input[1]]) if n.input[1] in init else None
        if scale is None or not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
            problems.append(f"{n.name}: scale is not a positive finite initializer")
            continue
        if n.op_type != "DequantizeLinear":
            continue
        source = n.input[0]
        if source in init:
            q = numpy_helper.to_array(init[source])
            if q.dtype != np.int8:
                problems.append(f"{n.name}: dequantizes {q.dtype} {source} (TensorRT takes INT8 only)")
                continue
        elif source not in producers or producers[source].op_type != "QuantizeLinear":
            problems.append(f"{n.name}: input {source} is neither an INT8 initializer nor a QuantizeLinear")
            continue
        if scale.size == 1 or source not in init:
            continue
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1) % q.ndim
        for consumer, index in consumers.get(n.output[0], []):
            want = _per_channel_axis(consumer, index, q.ndim)
            if want is not None and want != axis:
                problems.append(f"{n.name}: per-channel axis {axis}, {consumer.op_type} weights need {want}")
        if scale.size != q.shape[axis]:
            problems.append(f"{n.name}: {scale.size} scales for {q.shape[axis]} channels")
            continue
        # symmetric: q in [-127, 127] with the full range used (onnxruntime gives near-dead
        # channels, |w| ~ 1e-6, a floor scale, so not every channel reaches 127)
        if q.min() < -127 or np.abs(q.astype(np.int16)).max() != 127:
            problems.append(f"{n.name}: weights are not symmetric int8 (q in {q.min()}..{q.max()}, "
                            "want -127..127)")
    return problems


def build_int8_cpu_static(prepared: Path, out: Path, calibration: list[np.ndarray] | None, info: DeployInfo,
                          exclude: list[str] | None = None, calibrate_method: str = "minmax",
                          cache: Path | None = None) -> None:
    """u8 activations (asymmetric) x s8 per-channel weights, QOperator form (QLinearConv/QLinearMatMul),
    ReLU/ReLU6 folded into the ranges. `cache` as in build_int8_qdq."""
    from onnxruntime.quantization import QuantFormat, QuantType

    _quantize_static(
        prepared, out, calibration, info, calibrate_method, cache,
        quant_format=QuantFormat.QOperator, op_types_to_quantize=QUANTIZED_OPS + ACTIVATION_OPS, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude or [],
        extra_options={"CalibStridedMinMax": 1})


def build_int8_cpu_dynamic(prepared: Path, out: Path, op_types: list[str], exclude: list[str] | None = None) -> None:
    """Weights int8 offline, activations quantized on the fly per tensor (no calibration)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(prepared), str(out), op_types_to_quantize=op_types, per_channel=False,
                     weight_type=QuantType.QInt8, nodes_to_exclude=exclude or [])


def build_fp16(src: Path, out: Path) -> None:
    """float16 compute with float32 I/O; LayerNorm stays float32."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    from .export import write_onnx_atomic

    model = onnx.load(str(src))
    fp16 = convert_float_to_float16(model, keep_io_types=True,
                                    op_block_list=DEFAULT_OP_BLOCK_LIST + FP16_KEEP_FLOAT32_OPS)
    write_onnx_atomic(fp16, out)


def interleaved_latency_ms(paths: list[Path], info: DeployInfo, threads: int | None, repeats: int = 5,
                           batch: int = 1) -> list[float]:
    """Best-of-`repeats` batch time of each model on onnxruntime's CPU provider, timed round-robin.

    Round-robin so that load from other processes hits every model alike, and the
    minimum because interference only ever adds time: the fastest run is the best
    estimate of what a graph itself costs. Each run waits for the previous session's
    threads to stop spinning (`bench.backends.settle`).
    """
    from ..bench.backends import settle

    size = info.preprocessing.img_size
    x = prepare_input(np.random.default_rng(0).integers(0, 255, (batch, size, size, 3), dtype=np.uint8), info)
    sessions = []
    for path in paths:
        emb = OnnxRuntimeEmbedder(path, threads=threads, providers=["CPUExecutionProvider"])
        feed = {emb.input_name: x}
        emb.session.run(None, feed)  # warm-up
        sessions.append((emb.session, feed))
    best = [float("inf")] * len(paths)
    for _ in tqdm(range(repeats), desc="timing", unit="round", leave=False):
        for i, (sess, feed) in enumerate(sessions):
            settle()
            t0 = time.perf_counter()
            sess.run(None, feed)
            best[i] = min(best[i], time.perf_counter() - t0)
    return [1000.0 * b for b in best]


# ----------------------------------------------------------------------------- the command


CPU_CANDIDATES: dict[str, Callable] = {
    # name -> builder(prepared, out, calibration, info, nodes kept in float, calibration method, ranges cache)
    "dynamic-matmul": lambda p, o, c, i, x, m, k: build_int8_cpu_dynamic(p, o, ["MatMul", "Gemm"], x),
    "dynamic-matmul-conv": lambda p, o, c, i, x, m, k: build_int8_cpu_dynamic(p, o, ["MatMul", "Gemm", "Conv"], x),
    "static-u8s8": lambda p, o, c, i, x, m, k: build_int8_cpu_static(p, o, c, i, x, m, k),
}
# ConvInteger (dynamic Conv) measured 0.69x FP32 on ConvNeXt-Tiny 384 (onnxruntime 1.31, 2 cores):
# it stays available by name but is not tried by default
DEFAULT_CPU_CANDIDATES = ["dynamic-matmul", "static-u8s8"]


def quantize_model(onnx_path: str | Path, calibration: list[np.ndarray], check_images: list[np.ndarray],
                   out_dir: str | Path | None = None, eval_set: RetrievalSet | None = None,
                   threads: int | None = None, cpu_candidates: list[str] | None = None,
                   calibrate_method: str = "percentile", min_cosine: float = MIN_COSINE,
                   latency_repeats: int = 5, variants: tuple[str, ...] = VARIANTS,
                   keep_first_last: bool = True, keep_float: int | str = "auto",
                   max_r1_drop: float = MAX_R1_DROP) -> QuantizeReport:
    """Write the INT8 Q/DQ, CPU INT8 and FP16 variants of an FP32 MEAN ONNX and compare them with it.

    Outputs appear only complete (written in a temp folder, renamed). A variant whose
    cosine against FP32 falls below `min_cosine`, or that loses more than `max_r1_drop`
    points of R@1 on `eval_set` (when given), misses the bar: an error, nothing written.
    keep_first_last leaves the first and the last Conv/MatMul/Gemm in float (the usual
    mixed-precision compromise: the stem sees raw pixels, the last layer feeds the descriptor).
    keep_float=N also leaves the N layers float whose quantization alone hurts the check
    images' descriptors most (measured per layer, see `layer_sensitivity`); "auto" (the
    default) does so only for an INT8 variant that misses the bar, one layer at a time
    in that order until it meets it (at most AUTO_KEEP_FLOAT_MAX layers).
    """
    src = Path(onnx_path)
    info = read_onnx_info(src)
    if info.precision != "fp32":
        raise MeanNavError(f"{src}: is already {info.precision}; quantize the FP32 export")
    int8 = bool(INT8_VARIANTS & set(variants))
    if not calibration and int8:
        raise MeanNavError("calibration set is empty; pass --calibration with a folder, list file or GeoTIFF")
    if not check_images:
        raise MeanNavError("no check images; pass --check-images")
    auto = keep_float == "auto"
    if not auto and not (isinstance(keep_float, int) and keep_float >= 0):
        raise MeanNavError(f"--keep-float: {keep_float!r} is neither 'auto' nor a layer count >= 0")
    out_dir = Path(out_dir) if out_dir else src.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = src.name[:-len(".onnx")]
    for suffix in (".fp32", ".int8-qdq", ".int8-cpu", ".fp16"):
        stem = stem[:-len(suffix)] if stem.endswith(suffix) else stem
    threads = threads or os.cpu_count() or 1
    cpu_candidates = cpu_candidates or list(DEFAULT_CPU_CANDIDATES)
    unknown = [c for c in cpu_candidates if c not in CPU_CANDIDATES]
    if unknown:
        raise MeanNavError(f"--cpu-candidates: unknown {unknown[0]!r}; choose from {', '.join(CPU_CANDIDATES)}")

    fp32 = OnnxRuntimeEmbedder(src, threads=threads, providers=["CPUExecutionProvider"])
    reference = fp32.embed(check_images, batch_size=8)
    fp32_retrieval = _retrieval(fp32, eval_set) if eval_set else {}
    del fp32

    results: list[VariantResult] = []
    candidates: list[VariantResult] = []
    choice, reason = "", ""
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".quantize-") as tmp, _quiet_root_logger():
        tmp = Path(tmp)
        prepared = tmp / "prepared.onnx"
        qdq_ranges, cpu_ranges = tmp / "ranges-qdq.json", tmp / "ranges-cpu.json"
        exclude: list[str] = []
        ranked: list[tuple[str, float]] = []

        def ranking() -> list[tuple[str, float]]:
            if not ranked:
                work = tmp / "sensitivity"
                work.mkdir(exist_ok=True)
                ranked.extend(layer_sensitivity(prepared, work, calibration, info, check_images, reference,
                                                calibrate_method, threads, cache=qdq_ranges))
                log.info("most sensitive layers (mean cosine with only that layer INT8): %s",
                         ", ".join(f"{n} {c:.4f}" for n, c in ranked[:AUTO_KEEP_FLOAT_MAX]))
            return ranked

        if int8:
            preprocess_for_quantization(src, prepared)
            exclude = _first_and_last_compute_nodes(prepared) if keep_first_last else []
            if not auto and keep_float > 0:
                exclude = sorted(set(exclude) | {n for n, _ in ranking()[:keep_float]})
        if exclude:
            log.info("kept in float: %s", ", ".join(exclude))

        def shortfall(r: VariantResult) -> str:
            """Why `r` misses the bar ("" when it meets it)."""
            if not r.cosine_min >= min_cosine:
                return f"cosine min {r.cosine_min:.4f} < {min_cosine}"
            if r.retrieval and not r.retrieval["dR@1"] >= -max_r1_drop:
                return f"R@1 {r.retrieval['dR@1']:+.2f} points, more than {max_r1_drop} lost"
            return ""

        def evaluate(name: str, precision: str, path: Path) -> VariantResult:
            _stamp(path, info.replace(precision=precision))
            emb = OnnxRuntimeEmbedder(path, threads=threads, providers=["CPUExecutionProvider"])
            cos = cosine_per_row(reference, emb.embed(check_images, batch_size=8))
            r = VariantResult(name, precision, str(path), float(cos.min()), float(cos.mean()))
            if eval_set is not None:
                r.retrieval = _retrieval(emb, eval_set, fp32_retrieval)
            return r

        def build_to_bar(name: str, precision: str, path: Path, build: Callable[[Path, list[str]], None]):
            """Build with `exclude` kept float; in auto mode keep the next most sensitive layer
            float as well until the variant meets the bar."""
            kept = list(exclude)
            while True:
                build(path, _with_their_activations(prepared, kept))
                r = evaluate(name, precision, path)
                r.kept_float = kept
                why = shortfall(r)
                if not auto or not why:
                    return r
                more = [n for n, _ in ranking() if n not in kept]
                if not more or len(kept) - len(exclude) >= AUTO_KEEP_FLOAT_MAX:
                    return r
                log.info("%s: %s; keeping %s float too", name, why, more[0])
                kept = kept + more[:1]

        final: dict[str, Path] = {}
        if "int8-qdq" in variants:
            path = tmp / f"{stem}.int8-qdq.onnx"
            log.info("building INT8 Q/DQ (TensorRT form)")
            results.append(build_to_bar("int8-qdq", "int8-qdq", path, lambda out, kept: build_int8_qdq(
                prepared, out, None if qdq_ranges.is_file() else calibration, info, calibrate_method, kept,
                cache=qdq_ranges)))
            final["int8-qdq"] = path
        if "int8-cpu" in variants:
            for name in tqdm(cpu_candidates, desc="CPU INT8 candidates", unit="candidate", leave=False):
                path = tmp / f"candidate-{name}.onnx"
                if name == "dynamic-matmul" and not _has_ops(prepared, ("MatMul", "Gemm")):
                    # it would return the FP32 graph unchanged (e.g. EfficientNet: convolutions only)
                    candidates.append(VariantResult(name, "int8-cpu", "", note="skipped: the graph has no MatMul/Gemm"))
                    continue
                log.info("building CPU INT8 candidate %s", name)
                build = CPU_CANDIDATES[name]
                try:
                    candidates.append(build_to_bar(name, "int8-cpu", path, lambda out, kept: build(
                        prepared, out, None if cpu_ranges.is_file() else calibration, info, kept, calibrate_method,
                        cpu_ranges)))
                except MeanNavError:
                    raise
                except Exception as exc:  # a candidate the installed onnxruntime cannot build or run
                    candidates.append(VariantResult(name, "int8-cpu", "", note=f"failed: {str(exc)[:120]}"))
        if "fp16" in variants:
            path = tmp / f"{stem}.fp16.onnx"
            log.info("building FP16")
            build_fp16(src, path)
            r = evaluate("fp16", "fp16", path)
            r.note = "onnxruntime's CPU runs float16 through casts: latency here says nothing about a GPU"
            results.append(r)
            final["fp16"] = path

        # one interleaved timing pass over FP32 and everything built, so all see the same load
        timed = [r for r in results + candidates if r.path]
        latencies = interleaved_latency_ms([src] + [Path(r.path) for r in timed], info, threads, latency_repeats)
        fp32_latency = latencies[0]
        for r, ms in zip(timed, latencies[1:]):
            r.latency_ms, r.speedup_vs_fp32 = ms, fp32_latency / ms

        if "int8-cpu" in variants:
            good = [c for c in candidates if c.path and not shortfall(c)]
            if good:
                best = min(good, key=lambda c: c.latency_ms)
                bar = f"cosine >= {min_cosine}" + (f", R@1 drop <= {max_r1_drop}" if eval_set is not None else "")
                reason = (f"fastest of {len(candidates)} candidates on this CPU with {bar}: "
                          f"{best.latency_ms:.1f} ms vs FP32 {fp32_latency:.1f} ms at batch 1")
            else:
                best = max((c for c in candidates if np.isfinite(c.cosine_min)), key=lambda c: c.cosine_min,
                           default=None)
                if best is None:
                    raise MeanNavError(f"{src}: no CPU INT8 candidate could be built: "
                                       + "; ".join(f"{c.name} {c.note}" for c in candidates))
                reason = "no candidate met the bar; kept the one with the best cosine"
            if best.speedup_vs_fp32 < 1.0:
                reason += "; NOTE: slower than FP32 on this CPU, prefer the FP32 model for onnxruntime here"
            choice = best.name
            chosen = VariantResult(**{**asdict(best), "name": f"int8-cpu ({best.name})"})
            path = tmp / f"{stem}.int8-cpu.onnx"
            shutil.copyfile(best.path, path)
            chosen.path = str(path)
            results.append(chosen)
            final["int8-cpu"] = path

        bad = [r for r in results if shortfall(r)]
        if bad:
            raise MeanNavError(
                f"{src}: {bad[0].name} drifts from FP32 ({shortfall(bad[0])}"
                f"{f' with {len(bad[0].kept_float)} layers float' if bad[0].kept_float else ''}); "
                "nothing written. Use more (and more representative) --calibration images, keep more layers "
                "float (--keep-float N), try --calibrate-method entropy, or accept the drift explicitly with a "
                "lower --min-cosine / higher --max-r1-drop after checking the R@1 change with --eval")
        for key, path in final.items():
            dest = out_dir / path.name
            os.replace(path, dest)
            for r in results:
                if r.path == str(path):
                    r.path = str(dest)
    for c in candidates:
        c.path = ""  # candidates lived in the temp folder
    report = QuantizeReport(str(src), info.model_hash, len(calibration), len(check_images), threads,
                            fp32_latency, results, candidates, choice, reason,
                            eval_set.description if eval_set else "", fp32_retrieval, exclude, calibrate_method,
                            [list(item) for item in ranked])
    _write_json_atomic(out_dir / f"{stem}.quantize.json", asdict(report))
    return report


def _retrieval(emb, eval_set: RetrievalSet, baseline: dict | None = None) -> dict:
    q = emb.embed(eval_set.queries, batch_size=8)
    g = emb.embed(eval_set.gallery, batch_size=8)
    m = retrieval_metrics(q, eval_set.query_labels, g, eval_set.gallery_labels)
    if baseline:
        m["dR@1"] = m["R@1"] - baseline["R@1"]
        m["dAP"] = m["AP"] - baseline["AP"]
    return m


def _write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("onnx", help="FP32 ONNX from `mean-nav export`")
    parser.add_argument("-o", "--out-dir", help="folder for the variants (default: next to the input)")
    parser.add_argument("--calibration", help="calibration images: a folder, a list file (see calibration/), "
                        "a GeoTIFF to cut tiles from, or a synthetic training config .yaml (its training split); "
                        "default: procedural aerial-like images")
    parser.add_argument("--calibration-count", type=int, default=256,
                        help="images used (default 256: with 64, a trained Lite0's CPU INT8 lost 1.05-1.26 R@1 "
                             "points on 950 held-out views, with 256 0.53)")
    parser.add_argument("--calibrate-method", choices=("minmax", "percentile", "entropy"), default="percentile",
                        help="activation range estimate for the static INT8 variants (default percentile, 99.999%%: "
                        "measured more accurate than minmax on Lite0 at 384)")
    parser.add_argument("--quantize-first-last", action="store_true",
                        help="also quantize the first and last Conv/MatMul (kept float by default: the stem sees "
                        "raw pixels and the last layer feeds the descriptor; a little faster, less accurate)")
    parser.add_argument("--keep-float", type=_keep_float_arg, default="auto", metavar="N|auto",
                        help="also keep the N layers float whose INT8 version alone hurts the descriptors most "
                        "(measured: one quantization + check per layer). 'auto' (default): only for a variant "
                        f"below --min-cosine, one layer at a time until it passes (at most {AUTO_KEEP_FLOAT_MAX}); "
                        "0: never")
    parser.add_argument("--check-images", help="held-out images for the cosine check (default: the evaluation "
                        "set's images, else procedural images not used for calibration)")
    parser.add_argument("--check-count", type=int, default=32)
    parser.add_argument("--eval", dest="eval_set", help="retrieval evaluation: a GeoTIFF (synthetic drone/tile "
                        "pairs), a synthetic training config .yaml (its held-out set) or a University-1652 folder")
    parser.add_argument("--eval-count", type=int, default=100, help="pairs / classes evaluated (default 100)")
    parser.add_argument("--variants", default="int8-qdq,int8-cpu,fp16", help="comma list of variants to build")
    parser.add_argument("--cpu-candidates", default=",".join(DEFAULT_CPU_CANDIDATES),
                        help=f"CPU INT8 forms to try, of {', '.join(CPU_CANDIDATES)} "
                        f"(default: {','.join(DEFAULT_CPU_CANDIDATES)})")
    parser.add_argument("--min-cosine", type=float, default=MIN_COSINE)
    parser.add_argument("--max-r1-drop", type=float, default=MAX_R1_DROP,
                        help=f"R@1 points a variant may lose on --eval (default {MAX_R1_DROP})")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument("--latency-repeats", type=int, default=5, help="timed runs per variant (best counts)")
    parser.add_argument("--seed", type=int, default=0)


def _keep_float_arg(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is neither 'auto' nor a layer count >= 0")
    return value


def run(args: argparse.Namespace) -> int:
    info = read_onnx_info(args.onnx)
    size = info.preprocessing.img_size
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise MeanNavError(f"--variants: unknown {unknown[0]!r}; choose from int8-qdq, int8-cpu, fp16")
    calibration = (load_images(args.calibration, args.calibration_count, size, seed=args.seed)
                   if INT8_VARIANTS & set(variants) else [])
    eval_set = load_retrieval_set(args.eval_set, args.eval_count, size, seed=args.seed + 1) if args.eval_set else None
    if args.check_images:
        check = load_images(args.check_images, args.check_count, size, seed=args.seed + 2)
    elif eval_set is not None:
        check = (eval_set.queries + eval_set.gallery)[:args.check_count]
    else:
        check = load_images(None, args.check_count, size, seed=args.seed + 1_000_003)
    try:
        report = quantize_model(args.onnx, calibration, check, out_dir=args.out_dir, eval_set=eval_set,
                                threads=args.threads, calibrate_method=args.calibrate_method,
                                cpu_candidates=[c.strip() for c in args.cpu_candidates.split(",") if c.strip()],
                                min_cosine=args.min_cosine, max_r1_drop=args.max_r1_drop, variants=variants,
                                latency_repeats=args.latency_repeats,
                                keep_first_last=not args.quantize_first_last, keep_float=args.keep_float)
    except CalibrationHistogramError as exc:
        raise MeanNavError(f"{args.onnx}: {exc}") from None
    print(report.table())
    for v in report.variants:
        print(f"wrote {v.path}")
    return 0
