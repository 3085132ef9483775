"""Which runtime runs a feature graph (XFeat, LighterGlue): onnxruntime or a TensorRT engine.

`FeatureGraph(path, kind, backend)` is what the localizer's extractor and matcher call
(nav/features/xfeat.py, lighterglue.py), like the MEAN embedder's `load_embedder`:

- `onnxruntime`: the ONNX from `mean-nav export-features` (CPU, or the CUDA / TensorRT
  execution providers where this onnxruntime has them);
- `tensorrt`: the FP16 engine engines/build_engine.py built from that very ONNX file (same
  sha256), this TensorRT version and this GPU, found next to the ONNX or in ./engines
  ($MEAN_NAV_ENGINE_DIR); an error when there is none;
- `auto` (default): that engine where TensorRT, a CUDA device and the engine are present,
  else onnxruntime (an engine that fails to load is reported once and onnxruntime used).

An XFeat engine has a fixed keypoint count K (its name carries `-k<K>`): it serves the
query (K = refine.max_features); calls it cannot serve (another K, as map windows ask for
every keypoint, or an image outside the engine's profile) run on onnxruntime. No torch
and no nav imports here: deploy/ stays free of import cycles.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from ..errors import MeanNavError
from .backends import open_onnx_session

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime", "tensorrt")
KINDS = ("xfeat", "lighterglue")
OUTPUTS = {"xfeat": ("keypoints", "scores", "descriptors"), "lighterglue": ("matches0", "scores0")}
ENGINE_PRECISION = "fp16"


def engine_key(meta: dict[str, str]) -> str:
    """What a feature engine's file name starts with: the graph kind, its weights and (XFeat) K."""
    key = f"{meta['kind']}-{meta['weights_sha256'][:12]}"
    return key + (f"-k{meta['keypoints']}" if meta["kind"] == "xfeat" else "")


def onnx_feature_metadata(path: str | Path) -> dict[str, str]:
    """The mean_nav.* metadata of a feature ONNX (the header only; onnxruntime where onnx is absent)."""
    path = Path(path)
    try:
        import onnx
    except ImportError:   # flight computers may have onnxruntime only
        props = dict(open_onnx_session(path, cpu_only=True).get_modelmeta().custom_metadata_map)
    else:
        try:
            props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        except Exception as exc:
            raise MeanNavError(f"{path}: not a readable ONNX file ({str(exc).splitlines()[0]}); re-export it "
                               "with `mean-nav export-features`") from None
    return {k[len("mean_nav."):]: v for k, v in props.items() if k.startswith("mean_nav.")}


def engine_dirs(onnx_path: Path) -> list[Path]:
    return [onnx_path.parent, Path(os.environ.get("MEAN_NAV_ENGINE_DIR", "engines"))]


def find_feature_engine(onnx_path: str | Path, meta: dict[str, str], keypoints: int | None = None
                        ) -> tuple[Path | None, str, str]:
    """(engine, why not when None, the ONNX's sha256) for the engine built from `onnx_path` for
    this TensorRT and GPU; `keypoints`: the K an XFeat engine must have."""
    from . import tensorrt_backend as trt_backend

    onnx_path = Path(onnx_path)
    reason = trt_backend.runtime_unavailable_reason()
    if reason is not None:
        return None, reason, ""
    if meta.get("kind") == "xfeat" and not keypoints:
        return None, "an XFeat engine has a fixed keypoint count and this extraction asks for every keypoint", ""
    trt = trt_backend.import_tensorrt()
    api = trt_backend.open_cuda()
    try:
        gpu, _ = api.device_info()
    finally:
        api.close()
    onnx_sha256 = trt_backend.sha256_file(onnx_path)
    key = engine_key({**meta, "keypoints": str(keypoints)})
    name = trt_backend.engine_file_name(key, onnx_sha256, trt.__version__, gpu, ENGINE_PRECISION)
    for d in engine_dirs(onnx_path):
        if (Path(d) / name).is_file():
            return Path(d) / name, "", onnx_sha256
    return None, f"no {name} next to the ONNX or in the engine folder (build it with engines/build_engine.py)", onnx_sha256


class FeatureEngine:
    """A built XFeat / LighterGlue engine on TensorRT, called like an onnxruntime session's run:
    feeds (name -> array; names it lacks are ignored) -> outputs in the engine's output order
    (`self.outputs`). Refuses an engine whose sidecar says it was built for another TensorRT,
    GPU or source ONNX, or whose bytes changed."""

    def __init__(self, engine_path: str | Path, source_onnx_sha256: str | None = None):
        from .tensorrt_backend import import_tensorrt, open_cuda, sha256_file, sidecar_path

        trt = import_tensorrt()
        self.path = Path(engine_path)
        side = sidecar_path(self.path)
        if not self.path.is_file() or not side.is_file():
            raise MeanNavError(f"{self.path}: engine or its sidecar {side.name} missing; build it with engines/build_engine.py")
        try:
            self.sidecar = json.loads(side.read_text())
        except ValueError as exc:
            raise MeanNavError(f"{side}: unreadable engine sidecar ({exc}); rebuild the engine") from None
        self.cuda = open_cuda()
        gpu, cc = self.cuda.device_info()
        expected = {"tensorrt_version": trt.__version__, "gpu_name": gpu, "compute_capability": cc,
                    "engine_sha256": sha256_file(self.path)}
        if source_onnx_sha256:
            expected["source_onnx_sha256"] = source_onnx_sha256
        for field, value in expected.items():
            if self.sidecar.get(field) != value:
                self.cuda.close()
                raise MeanNavError(f"{self.path}: engine {field} is {self.sidecar.get(field)!r}, here {value!r}; "
                                   "rebuild it on this device with engines/build_engine.py")
        self.trt = trt
        # the engine, its context and the stream belong to the CUDA context: made while it is current
        # (pycuda's is current only inside activate())
        with self.cuda.activate():
            self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self.engine is not None:
                self.context = self.engine.create_execution_context()
                self.stream = self.cuda.new_stream()
        if self.engine is None:
            self.cuda.close()
            raise MeanNavError(f"{self.path}: TensorRT could not deserialize the engine; rebuild it on this device")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def profile(self) -> dict[str, tuple[tuple, tuple]]:
        """Per input, the (min, max) shape the engine was built for."""
        out = {}
        for name in self.inputs:
            lo, _, hi = self.engine.get_tensor_profile_shape(name, 0)
            out[name] = (tuple(int(v) for v in lo), tuple(int(v) for v in hi))
        return out

    def __call__(self, feeds: dict) -> list:
        buffers, hosts = [], []
        with self.cuda.activate():
            try:
                for name in self.inputs:
                    dtype = np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name)))
                    host = self.cuda.host_buffer(feeds[name].shape, dtype)
                    host[...] = feeds[name]
                    self.context.set_input_shape(name, tuple(host.shape))
                    dev = self.cuda.alloc(max(host.nbytes, 1))
                    buffers.append(dev)
                    self.cuda.htod(dev, host, self.stream)
                    self.context.set_tensor_address(name, self.cuda.ptr(dev))
                for name in self.outputs:
                    dtype = np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name)))
                    host = self.cuda.host_buffer(tuple(self.context.get_tensor_shape(name)), dtype)
                    dev = self.cuda.alloc(max(host.nbytes, 1))
                    buffers.append(dev)
                    hosts.append((host, dev))
                    self.context.set_tensor_address(name, self.cuda.ptr(dev))
                if not self.context.execute_async_v3(self.cuda.stream_handle(self.stream)):
                    raise MeanNavError(f"{self.path}: TensorRT execution failed; see the TensorRT log above")
                for host, dev in hosts:
                    self.cuda.dtoh(host, dev, self.stream)
                self.cuda.sync(self.stream)
                return [np.array(host) for host, _ in hosts]
            finally:
                for dev in buffers:
                    self.cuda.free(dev)

    def close(self) -> None:
        if self.cuda is None:
            return
        with self.cuda.activate():
            self.cuda.release_stream(self.stream)
            self.stream = self.context = self.engine = None
        self.cuda.close()
        self.cuda = None


class FeatureGraph:
    """One feature graph on the backend chosen as the module doc says: `run(feeds)` -> outputs
    in the ONNX's order (OUTPUTS[kind]); `metadata` (the ONNX's mean_nav.* entries), `backend`
    ("onnxruntime" or "tensorrt")."""

    def __init__(self, path: str | Path, kind: str, backend: str = "auto", keypoints: int | None = None,
                 threads: int | None = None, cpu_only: bool = False):
        if backend not in BACKENDS:
            raise MeanNavError(f"refine.feature_backend: {backend!r} unknown; use one of {', '.join(BACKENDS)}")
        self.path, self.kind, self.threads, self.cpu_only = Path(path), kind, threads, cpu_only
        if not self.path.is_file():
            raise MeanNavError(f"{self.path}: ONNX file not found; run `mean-nav export-features`")
        self.keypoints = int(keypoints) if keypoints else None
        self._session = None
        self.engine: FeatureEngine | None = None
        if backend == "onnxruntime" or cpu_only:
            self.metadata = self._open_session()
        else:
            self.metadata = onnx_feature_metadata(self.path)
            self._check_kind(self.metadata)
            # "tensorrt" requires the engine wherever one can serve: not for an XFeat without a
            # keypoint budget (map windows computed in flight), which onnxruntime runs
            servable = not (kind == "xfeat" and self.keypoints is None)
            self.engine = self._open_engine(required=backend == "tensorrt" and servable)
            if self.engine is None:
                self._open_session()
        self.backend = "tensorrt" if self.engine is not None else "onnxruntime"

    def _check_kind(self, meta: dict) -> None:
        if meta.get("kind") != self.kind:
            raise MeanNavError(f"{self.path}: not a {self.kind} graph from `mean-nav export-features` "
                               f"(kind {meta.get('kind')!r}); export it with `mean-nav export-features`")

    def _open_session(self) -> dict:
        self._session = open_onnx_session(self.path, threads=self.threads, cpu_only=self.cpu_only, spin=False)
        meta = {k[len("mean_nav."):]: v for k, v in self._session.get_modelmeta().custom_metadata_map.items()
                if k.startswith("mean_nav.")}
        self._check_kind(meta)
        return meta

    def _open_engine(self, required: bool) -> FeatureEngine | None:
        engine, why, onnx_sha256 = find_feature_engine(self.path, self.metadata, self.keypoints)
        if engine is not None:
            try:
                opened = FeatureEngine(engine, source_onnx_sha256=onnx_sha256)
            except MeanNavError as exc:
                if required:
                    raise
                log.warning("%s; running %s on onnxruntime instead", exc, self.path.name)
                return None
            if opened.sidecar.get("kind") == self.kind:
                return opened
            opened.close()
            why = f"{engine}: built from a {opened.sidecar.get('kind')!r} graph"
        if required:
            raise MeanNavError(f"refine.feature_backend: tensorrt: no usable engine for {self.path} ({why})")
        log.debug("TensorRT not used for %s: %s", self.path, why)
        return None

    def _engine_serves(self, feeds: dict) -> bool:
        if self.kind == "xfeat" and int(np.asarray(feeds.get("max_keypoints", [0])).ravel()[0]) != self.keypoints:
            return False
        for name, (lo, hi) in self.engine.profile().items():
            shape = np.shape(feeds[name])
            if len(shape) != len(lo) or any(s < a or s > b for s, a, b in zip(shape, lo, hi)):
                return False
        return True

    def run(self, feeds: dict) -> list:
        if self.engine is not None and self._engine_serves(feeds):
            out = dict(zip(self.engine.outputs, self.engine(feeds)))
            result = [out[name] for name in OUTPUTS[self.kind]]
            if self.kind == "lighterglue":
                result[0] = result[0].astype(np.int64)
            return result
        if self._session is None:   # a call the engine cannot serve: onnxruntime, opened once
            log.debug("%s: a call outside the engine (%s); onnxruntime runs it", self.path.name,
                      {k: np.shape(v) for k, v in feeds.items()})
            self._open_session()
        return self._session.run(None, feeds)

    def describe(self) -> str:
        return f"{self.kind} on {self.backend}" + (f" ({self.engine.path.name})" if self.engine is not None else "")

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
