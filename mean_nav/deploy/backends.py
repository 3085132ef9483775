"""Inference backends behind the one `Embedder` interface, and `load_embedder`.

- onnxruntime: the CPU default (embedded boards, replay, cache building); uses the
  TensorRT / CUDA execution providers when the installed onnxruntime has them.
- tensorrt: a serialized engine built on the target (see tensorrt_backend.py).
- torch: a training checkpoint (imports torch lazily, inside that backend only).

This module is on the runtime path: it must not import torch at module level.

Every exported ONNX carries its identity in metadata_props (see `DeployInfo`); a file
without it is not a MEAN deploy graph and is refused.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

import numpy as np

from ..errors import MeanNavError
from .deploy_info import DeployInfo, prepare_input
from .embedder import Embedder

log = logging.getLogger(__name__)

BackendName = Literal["auto", "onnxruntime", "tensorrt", "torch"]


# ----------------------------------------------------------------------------- onnxruntime


def _import_onnxruntime():
    try:
        import onnxruntime as ort
    except ImportError:
        raise MeanNavError("onnxruntime is not installed; `pip install onnxruntime` (or onnxruntime-gpu)") from None
    ort.set_default_logger_severity(3)  # warnings about unused initializers etc. are noise here
    return ort


def onnx_providers(cache_dir: Path | None = None) -> list:
    """Execution providers in order of preference among those this onnxruntime has.

    FP16 and Q/DQ INT8 graphs carry their precision in their types, so the TensorRT
    provider needs no precision flags.
    """
    ort = _import_onnxruntime()
    available = set(ort.get_available_providers())
    providers: list = []
    if "TensorrtExecutionProvider" in available:
        opts = {}
        if cache_dir is not None:
            opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache_dir))
        providers.append(("TensorrtExecutionProvider", opts))
    if "CUDAExecutionProvider" in available:
        providers.append("CUDAExecutionProvider")
    providers.append("CPUExecutionProvider")
    return providers


# onnxruntime's WeightBiasQuantization quantizes the float weights of any Conv that reads a
# DequantizeLinear output, per tensor: it undoes every layer `mean-nav quantize` keeps float
# on purpose (Lite0's depthwise convolutions: descriptor cosine 0.99 -> 0.93). Unknown names
# are ignored, so older onnxruntime versions are fine.
DISABLED_OPTIMIZERS = ["WeightBiasQuantization"]


def session_options(threads: int | None = None, spin: bool = True):
    """Sequential, all graph optimizations. `spin=False`: the intra-op threads sleep between
    parallel sections instead of spinning, for sessions that run one after another within a
    frame (XFeat, then LighterGlue per candidate): a pool still spinning from the previous
    session steals the cores from the next (LighterGlue per candidate on 2 shared cores:
    67 ms spinning, 37 ms not)."""
    ort = _import_onnxruntime()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    return so


def open_onnx_session(path: str | Path, threads: int | None = None, cpu_only: bool = False, spin: bool = True):
    """An onnxruntime session for `path` with a MeanNavError for unreadable files (`spin`: see
    session_options)."""
    ort = _import_onnxruntime()
    path = Path(path)
    if not path.is_file():
        raise MeanNavError(f"{path}: ONNX file not found; check the path or run `mean-nav export`")
    providers = ["CPUExecutionProvider"] if cpu_only else onnx_providers()
    try:
        return ort.InferenceSession(str(path), sess_options=session_options(threads, spin), providers=providers,
                                    disabled_optimizers=DISABLED_OPTIMIZERS)
    except Exception as exc:  # onnxruntime raises several private exception types
        raise MeanNavError(f"{path}: onnxruntime cannot load it ({str(exc).splitlines()[0]}); re-export the model") from None


def read_onnx_info(path: str | Path) -> DeployInfo:
    """The DeployInfo recorded in an ONNX file's metadata (reads only the model proto header)."""
    path = Path(path)
    if not path.is_file():
        raise MeanNavError(f"{path}: ONNX file not found; check the path or run `mean-nav export`")
    try:
        import onnx
    except ImportError:  # flight computers may have onnxruntime only
        sess = open_onnx_session(path, cpu_only=True)
        return DeployInfo.from_metadata(dict(sess.get_modelmeta().custom_metadata_map), str(path))
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise MeanNavError(f"{path}: not a readable ONNX file ({str(exc).splitlines()[0]})") from None
    return DeployInfo.from_metadata({p.key: p.value for p in model.metadata_props}, str(path))


# onnxruntime's CPU kernels run float graphs faster one image per call than batched (2-core
# Xeon, 384 px, ms per image: Lite0 FP32 10.3 vs 11.0 at batch 4, ConvNeXt-T 116 vs 125, Lite0
# FP16 15.4 vs 17.3): one image's early feature maps stay in L2. Quantized graphs gain a
# little from batches (Lite0 int8-cpu 6.1 vs 5.9), so they run whole.
CPU_FLOAT_RUN_BATCH = 1


class OnnxRuntimeEmbedder(Embedder):
    """onnxruntime session over an exported (optionally quantized) MEAN deploy graph."""

    name = "onnxruntime"

    def __init__(self, path: str | Path, threads: int | None = None, providers: list | None = None,
                 spin: bool = True):
        ort = _import_onnxruntime()
        self.path = Path(path)
        if not self.path.is_file():
            raise MeanNavError(f"{self.path}: ONNX file not found; check the path or run `mean-nav export`")
        # the session is created first: its metadata is the identity check
        if providers is None:
            providers = onnx_providers(cache_dir=self.path.parent)
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=session_options(threads, spin),
                                                providers=providers, disabled_optimizers=DISABLED_OPTIMIZERS)
        except Exception as exc:
            raise MeanNavError(f"{self.path}: onnxruntime cannot load it ({str(exc).splitlines()[0]}); "
                               "re-export the model") from None
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        self.info = DeployInfo.from_metadata(meta, str(self.path))
        self.model_hash = self.info.model_hash
        self.dim = self.info.embed_dim
        self.precision = self.info.precision
        self.preprocessing = self.info.preprocessing
        self.backbone = self.info.backbone
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise MeanNavError(f"{self.path}: expected one image input and a descriptor output; re-export the model")
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        self.providers = self.session.get_providers()
        cpu_only = self.providers == ["CPUExecutionProvider"]
        self.run_batch = CPU_FLOAT_RUN_BATCH if cpu_only and self.precision in ("fp32", "fp16") else None

    def _prepare(self, batch_uint8: np.ndarray) -> np.ndarray:
        return prepare_input(batch_uint8, self.info)

    def _infer(self, x: np.ndarray) -> np.ndarray:
        step = self.run_batch or len(x)
        outs = [self.session.run([self.output_name], {self.input_name: x[i:i + step]})[0]
                for i in range(0, len(x), step)]
        return np.asarray(outs[0] if len(outs) == 1 else np.concatenate(outs), np.float32)

    def describe(self) -> dict:
        d = super().describe()
        d.update(path=str(self.path), providers=self.providers, input_layout=self.info.input_layout,
                 run_batch=self.run_batch)
        return d


# ----------------------------------------------------------------------------- torch


class TorchEmbedder(Embedder):
    """A MEAN model's deploy graph in PyTorch (training machines, reference for export)."""

    name = "torch"

    def __init__(self, model, cfg, threads: int | None = None, device: str = "cpu", source: str = "model"):
        """`model`: a MEAN; `cfg`: its ModelConfig (backbone, img_size -> preprocessing)."""
        import torch

        from ..model import preprocessing_for
        from ..model.checkpoint import deploy_hash

        if threads:
            torch.set_num_threads(int(threads))
        self.device = torch.device(device)
        self.module = model.deploy_module().eval().to(self.device)
        self.model_hash = deploy_hash(model)
        self.dim = int(model.embed_dim)
        self.backbone = cfg.backbone
        self.preprocessing = preprocessing_for(cfg)
        self.source = source

    @classmethod
    def from_checkpoint(cls, path: str | Path, threads: int | None = None, device: str = "cpu") -> "TorchEmbedder":
        from ..model.checkpoint import model_from_checkpoint

        path = Path(path)
        if not path.is_file():
            raise MeanNavError(f"{path}: checkpoint not found; check the path")
        model, cfg = model_from_checkpoint(path)
        return cls(model, cfg, threads=threads, device=device, source=str(path))

    def _infer(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.module(torch.from_numpy(x).to(self.device)).float().cpu().numpy()


# ----------------------------------------------------------------------------- selection


def load_embedder(path: str | Path, backend: BackendName = "auto", threads: int | None = None,
                  spin: bool = True) -> Embedder:
    """An Embedder for a checkpoint (.pt/.pth: torch), an .onnx or an .engine (TensorRT).

    `spin=False` (onnxruntime): for the localizer, whose embedder runs between the feature
    graphs of a frame (see session_options); batch work (cache builds) keeps spinning.

    backend="auto": an .onnx runs on a matching TensorRT engine found next to it (built
    from this very ONNX file, this TensorRT version and GPU, intact checksum) when
    TensorRT and a CUDA device are present; otherwise, and when that engine fails to
    load (corrupt, tampered, refused), on onnxruntime with a warning.
    """
    path = Path(path)
    if not path.exists():
        raise MeanNavError(f"{path}: model file not found; pass a checkpoint (.pt), an .onnx or an .engine")
    suffix = path.suffix.lower()
    if backend not in ("auto", "onnxruntime", "tensorrt", "torch"):
        raise MeanNavError(f"backend {backend!r} unknown; use auto, onnxruntime, tensorrt or torch")
    if suffix in (".pt", ".pth", ".ckpt"):
        if backend not in ("auto", "torch"):
            raise MeanNavError(f"{path}: a checkpoint runs on the torch backend; export it to ONNX for {backend}")
        return TorchEmbedder.from_checkpoint(path, threads=threads)
    if suffix in (".engine", ".plan"):
        if backend not in ("auto", "tensorrt"):
            raise MeanNavError(f"{path}: a TensorRT engine runs on the tensorrt backend only")
        from .tensorrt_backend import TensorRTEmbedder

        return TensorRTEmbedder(path)
    if suffix != ".onnx":
        raise MeanNavError(f"{path}: unknown model file type {suffix!r}; expected .pt, .onnx or .engine")
    if backend == "torch":
        raise MeanNavError(f"{path}: the torch backend needs the training checkpoint (.pt), not an ONNX file")
    if backend in ("auto", "tensorrt"):
        found = find_matching_engine(path, required=backend == "tensorrt")
        if found is not None:
            from .tensorrt_backend import TensorRTEmbedder

            engine, info, onnx_sha256 = found
            try:
                return TensorRTEmbedder(engine, expect=info, source_onnx_sha256=onnx_sha256)
            except MeanNavError as exc:
                if backend == "tensorrt":
                    raise
                log.warning("%s; running %s on onnxruntime instead", exc, path)
    return OnnxRuntimeEmbedder(path, threads=threads, spin=spin)


def find_matching_engine(onnx_path: Path, required: bool = False) -> tuple[Path, DeployInfo, str] | None:
    """(engine, the ONNX's DeployInfo, its sha256) for an engine built from this ONNX, found
    next to it or in ./engines ($MEAN_NAV_ENGINE_DIR); None if TensorRT, a GPU or the engine is
    missing. With required=True the reason no engine fits becomes a MeanNavError instead.
    """
    from . import tensorrt_backend as trt_backend

    reason = trt_backend.runtime_unavailable_reason()
    if reason is None:
        info = read_onnx_info(onnx_path)
        onnx_sha256 = trt_backend.sha256_file(onnx_path)
        dirs = [onnx_path.parent, Path(os.environ.get("MEAN_NAV_ENGINE_DIR", "engines"))]
        engine, reason = trt_backend.find_engine(info, onnx_sha256, dirs)
        if engine is not None:
            return engine, info, onnx_sha256
    if required:
        raise MeanNavError(f"{onnx_path}: no usable TensorRT engine ({reason}); "
                           "build one on this device with engines/build_engine.py")
    log.debug("TensorRT not used for %s: %s", onnx_path, reason)
    return None
