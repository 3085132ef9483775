"""TensorRT engine backend (TensorRT 10.3 .. 11 runtime API) and engine identity checks.

Engines are executables tied to the TensorRT version, the GPU and the model. Each engine
`<model_hash>.<onnx_sha256[:12]>.trt<version>.<gpu>.<precision>.engine` has a sidecar JSON
(`<engine>.json`) written by engines/build_engine.py; the runtime refuses an engine whose
sidecar does not match the expected model, source ONNX (sha256: a re-quantized or
re-exported file is a new engine), preprocessing, this TensorRT, this GPU, or whose
checksum differs.

Device buffers use pycuda (`mem_alloc`, `Stream`, `memcpy_*_async`) and fall back to
cuda-python (`cuda.bindings.runtime`, or `cuda.cudart` before 12.8; removed in 13).
Tensors are bound by name and run with `execute_async_v3`. Every CUDA call runs inside
`_CudaApi.activate()`, which makes the device's primary context current on the calling
thread (pycuda: push/pop; the runtime API: cudaSetDevice), so an embedder built on one
thread infers on any other (the ROS node and the daemon do exactly that). No torch here.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from ..errors import MeanNavError
from .deploy_info import DeployInfo, prepare_input
from .embedder import Embedder, Preprocessing

log = logging.getLogger(__name__)

SIDECAR_VERSION = 1


# ----------------------------------------------------------------------------- identity


def sanitize_gpu_name(name: str) -> str:
    """'NVIDIA Jetson AGX Orin' -> 'nvidia-jetson-agx-orin' (safe in file names)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


ONNX_KEY_CHARS = 12   # of the source ONNX sha256 in engine names: tells re-exports apart at a glance


def engine_file_name(model_hash: str, onnx_sha256: str, trt_version: str, gpu_name: str, precision: str) -> str:
    """`<model_hash>.<onnx_sha256[:12]>.trt<ver>.<gpu>.<precision>.engine`, ver = major.minor.patch."""
    ver = ".".join(str(trt_version).split(".")[:3])
    return (f"{model_hash}.{onnx_sha256[:ONNX_KEY_CHARS]}.trt{ver}.{sanitize_gpu_name(gpu_name)}"
            f".{precision}.engine")


def sidecar_path(engine_path: str | Path) -> Path:
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class EngineSidecar:
    """Identity of one serialized engine: what it computes and where it may run."""

    model_hash: str
    backbone: str
    embed_dim: int
    preprocessing: str            # Preprocessing.to_json()
    precision: str
    input_layout: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str       # "8.7"
    input_name: str
    input_shape: list[int]        # opt shape, batch dimension included
    max_batch: int
    engine_sha256: str
    source_onnx: str = ""
    source_onnx_sha256: str = ""
    built_utc: str = ""
    format_version: int = SIDECAR_VERSION
    extra: dict = field(default_factory=dict)

    def deploy_info(self) -> DeployInfo:
        return DeployInfo(self.model_hash, self.backbone, self.embed_dim,
                          Preprocessing.from_json(self.preprocessing), self.precision, self.input_layout)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "EngineSidecar":
        path = Path(path)
        if not path.is_file():
            raise MeanNavError(f"{path}: engine sidecar missing; rebuild the engine with engines/build_engine.py "
                               "(an engine without its sidecar is not trusted)")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            known = {f for f in cls.__dataclass_fields__}
            return cls(**{k: v for k, v in d.items() if k in known})
        except (ValueError, TypeError) as exc:
            raise MeanNavError(f"{path}: unreadable engine sidecar ({exc}); rebuild the engine") from None


def sidecar_mismatch(sidecar: EngineSidecar, trt_version: str, gpu_name: str, compute_capability: str,
                     expect: DeployInfo | None = None, source_onnx_sha256: str | None = None) -> str | None:
    """Why an engine may not run here (None if it may).

    `expect` / `source_onnx_sha256`: the ONNX the engine should have been built from.
    """
    if expect is not None:
        if sidecar.model_hash != expect.model_hash:
            return f"built for model {sidecar.model_hash}, expected {expect.model_hash}"
        if sidecar.precision != expect.precision:
            return f"built at precision {sidecar.precision}, expected {expect.precision}"
        if sidecar.input_layout != expect.input_layout:
            return f"input layout {sidecar.input_layout}, expected {expect.input_layout}"
        try:
            built_for = Preprocessing.from_json(sidecar.preprocessing)
        except (ValueError, TypeError):
            built_for = None
        if built_for != expect.preprocessing:
            return f"built for preprocessing {sidecar.preprocessing}, expected {expect.preprocessing.to_json()}"
    if source_onnx_sha256 is not None and sidecar.source_onnx_sha256 != source_onnx_sha256:
        return (f"built from another ONNX (sha256 {sidecar.source_onnx_sha256[:ONNX_KEY_CHARS] or 'unknown'}, "
                f"this one is {source_onnx_sha256[:ONNX_KEY_CHARS]}: re-exported or re-quantized since)")
    if sidecar.tensorrt_version != trt_version:
        return f"built with TensorRT {sidecar.tensorrt_version}, this is TensorRT {trt_version}"
    if sanitize_gpu_name(sidecar.gpu_name) != sanitize_gpu_name(gpu_name) or sidecar.compute_capability != compute_capability:
        return (f"built on {sidecar.gpu_name} (sm {sidecar.compute_capability}), "
                f"this device is {gpu_name} (sm {compute_capability})")
    return None


# ----------------------------------------------------------------------------- CUDA access


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise MeanNavError("TensorRT is not installed (python module `tensorrt`); on a Jetson it comes with "
                           "JetPack (python3-libnvinfer), elsewhere `pip install 'mean-nav[tensorrt]'`") from None
    return trt


class _CudaApi:
    """The few CUDA calls the backend needs, over pycuda or cuda-python."""

    kind = "none"

    @contextlib.contextmanager
    def activate(self):
        """The device's primary context current on this thread for the block (any thread)."""
        yield

    def device_info(self) -> tuple[str, str]:
        raise NotImplementedError

    def alloc(self, nbytes: int): ...
    def ptr(self, allocation) -> int: ...
    def free(self, allocation) -> None: ...
    def new_stream(self): ...
    def release_stream(self, stream) -> None: ...
    def stream_handle(self, stream) -> int: ...
    def htod(self, dst, host: np.ndarray, stream) -> None: ...
    def dtoh(self, host: np.ndarray, src, stream) -> None: ...
    def sync(self, stream) -> None: ...
    def host_buffer(self, shape, dtype) -> np.ndarray: ...
    def close(self) -> None: ...


class _PyCuda(_CudaApi):
    kind = "pycuda"

    def __init__(self):
        import pycuda.driver as cuda

        self.cuda = cuda
        cuda.init()
        if cuda.Device.count() == 0:
            raise RuntimeError("no CUDA device")
        self.device = cuda.Device(0)
        # the primary context is the one TensorRT's runtime API uses too; it is current only
        # inside activate(): a context pushed on the building thread is absent on the others
        self.context = self.device.retain_primary_context()

    @contextlib.contextmanager
    def activate(self):
        self.context.push()
        try:
            yield
        finally:
            self.cuda.Context.pop()

    def device_info(self):
        major, minor = self.device.compute_capability()
        return self.device.name(), f"{major}.{minor}"

    def alloc(self, nbytes):
        return self.cuda.mem_alloc(max(1, int(nbytes)))

    def ptr(self, allocation):
        return int(allocation)

    def free(self, allocation):
        allocation.free()

    def new_stream(self):
        return self.cuda.Stream()

    def release_stream(self, stream):
        pass  # pycuda destroys it with the object

    def stream_handle(self, stream):
        return stream.handle

    def htod(self, dst, host, stream):
        self.cuda.memcpy_htod_async(dst, host, stream)

    def dtoh(self, host, src, stream):
        self.cuda.memcpy_dtoh_async(host, src, stream)

    def sync(self, stream):
        stream.synchronize()

    def host_buffer(self, shape, dtype):
        return self.cuda.pagelocked_empty(shape, dtype)

    def close(self):
        try:
            self.context.detach()   # releases our hold on the primary context
        except Exception:  # already released by the interpreter shutting down
            pass


class _CudaPython(_CudaApi):
    kind = "cuda-python"

    def __init__(self):
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart  # cuda-python < 12.8 (removed in 13)
        self.rt = cudart
        count = self._check(cudart.cudaGetDeviceCount())
        if count == 0:
            raise RuntimeError("no CUDA device")
        try:  # cuda-bindings >= 12.9.1; int() on handle objects is deprecated there
            from cuda.bindings.utils import get_cuda_native_handle
        except ImportError:
            get_cuda_native_handle = int
        self.native_handle = get_cuda_native_handle

    @contextlib.contextmanager
    def activate(self):
        # the runtime API binds a thread to the device's primary context on first use
        self._check(self.rt.cudaSetDevice(0))
        yield

    def _check(self, result):
        err, *values = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise RuntimeError(f"CUDA error {err}")
        return values[0] if len(values) == 1 else (values or None)

    def device_info(self):
        prop = self._check(self.rt.cudaGetDeviceProperties(0))
        name = prop.name.decode() if isinstance(prop.name, bytes) else str(prop.name)
        return name.rstrip("\x00"), f"{prop.major}.{prop.minor}"

    def alloc(self, nbytes):
        return self._check(self.rt.cudaMalloc(max(1, int(nbytes))))

    def ptr(self, allocation):
        return int(allocation)

    def free(self, allocation):
        self.rt.cudaFree(allocation)

    def new_stream(self):
        return self._check(self.rt.cudaStreamCreate())

    def release_stream(self, stream):
        self.rt.cudaStreamDestroy(stream)

    def stream_handle(self, stream):
        return self.native_handle(stream)

    def htod(self, dst, host, stream):
        self._check(self.rt.cudaMemcpyAsync(dst, host.ctypes.data, host.nbytes,
                                            self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))

    def dtoh(self, host, src, stream):
        self._check(self.rt.cudaMemcpyAsync(host.ctypes.data, src, host.nbytes,
                                            self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))

    def sync(self, stream):
        self._check(self.rt.cudaStreamSynchronize(stream))

    def host_buffer(self, shape, dtype):
        return np.empty(shape, dtype)


def open_cuda() -> _CudaApi:
    """pycuda if it works, else cuda-python; MeanNavError when neither finds a device."""
    reasons = []
    for api in (_PyCuda, _CudaPython):
        try:
            return api()
        except Exception as exc:  # ImportError, driver errors, no device
            reasons.append(f"{api.kind}: {exc}")
    raise MeanNavError("no CUDA device usable (" + "; ".join(reasons) + "); TensorRT needs an NVIDIA GPU, "
                       "use the onnxruntime backend on this machine")


def runtime_unavailable_reason() -> str | None:
    """None if TensorRT and a CUDA device are usable here, else why not (no side effects)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "python module tensorrt is not installed"
    try:
        api = open_cuda()
    except MeanNavError as exc:
        return str(exc)
    api.close()
    return None


def find_engine(info: DeployInfo, onnx_sha256: str, dirs: Iterable[Path]) -> tuple[Path | None, str]:
    """The engine built from the ONNX (`info`, its sha256) for this TensorRT and GPU in one of
    `dirs`, and why not if none."""
    trt = import_tensorrt()
    api = open_cuda()
    try:
        gpu, cc = api.device_info()
    finally:
        api.close()
    name = engine_file_name(info.model_hash, onnx_sha256, trt.__version__, gpu, info.precision)
    for d in dirs:
        candidate = Path(d) / name
        if not candidate.is_file():
            continue
        try:
            sidecar = EngineSidecar.load(sidecar_path(candidate))
        except MeanNavError as exc:
            return None, str(exc)
        why = sidecar_mismatch(sidecar, trt.__version__, gpu, cc, expect=info, source_onnx_sha256=onnx_sha256)
        if why:
            return None, f"{candidate}: {why}"
        return candidate, ""
    return None, f"no {name} next to the ONNX or in the engine folder"


# ----------------------------------------------------------------------------- embedder


class TensorRTEmbedder(Embedder):
    """A serialized TensorRT engine of the MEAN deploy graph.

    Usable from any thread (one inference at a time: the execution context and the
    buffers are shared); each call makes the CUDA context current for itself.
    """

    name = "tensorrt"

    def __init__(self, engine_path: str | Path, expect: DeployInfo | None = None, verify_checksum: bool = True,
                 source_onnx_sha256: str | None = None):
        """`expect` / `source_onnx_sha256`: the ONNX this engine must have been built from."""
        self.path = Path(engine_path)
        if not self.path.is_file():
            raise MeanNavError(f"{self.path}: engine file not found; build it with engines/build_engine.py")
        self.sidecar = EngineSidecar.load(sidecar_path(self.path))
        trt = import_tensorrt()
        self.trt = trt
        self.cuda = open_cuda()
        self._buffers: list = []
        self._lock = threading.Lock()
        self.context = self.engine = self.stream = self.host_in = self.host_out = None
        try:
            with self.cuda.activate():
                self._load(trt, expect, verify_checksum, source_onnx_sha256)
        except BaseException:
            self.close()
            raise

    def _load(self, trt, expect, verify_checksum, source_onnx_sha256) -> None:
        gpu, cc = self.cuda.device_info()
        why = sidecar_mismatch(self.sidecar, trt.__version__, gpu, cc, expect=expect,
                               source_onnx_sha256=source_onnx_sha256)
        if why:
            raise MeanNavError(f"{self.path}: engine {why}; rebuild it on this device with engines/build_engine.py")
        if verify_checksum and sha256_file(self.path) != self.sidecar.engine_sha256:
            raise MeanNavError(f"{self.path}: engine checksum does not match its sidecar (corrupt or replaced); rebuild it")
        self.info = self.sidecar.deploy_info()
        self.model_hash = self.info.model_hash
        self.dim = self.info.embed_dim
        self.precision = self.info.precision
        self.preprocessing = self.info.preprocessing
        self.backbone = self.info.backbone

        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise MeanNavError(f"{self.path}: TensorRT could not deserialize the engine; rebuild it on this device")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or not outputs:
            raise MeanNavError(f"{self.path}: engine has inputs {inputs} / outputs {outputs}; expected one image input")
        self.input_name, self.output_name = inputs[0], outputs[0]
        _, _, max_shape = self.engine.get_tensor_profile_shape(self.input_name, 0)
        max_shape = tuple(int(v) for v in max_shape)
        self.max_batch = max_shape[0]
        self.input_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.input_name)))
        self.output_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.output_name)))
        # the output buffer is sized from what the engine computes at the largest batch
        self.context.set_input_shape(self.input_name, max_shape)
        out_shape = tuple(int(v) for v in self.context.get_tensor_shape(self.output_name))
        if len(out_shape) != 2 or out_shape[0] != self.max_batch or out_shape[1] != self.dim:
            raise MeanNavError(f"{self.path}: engine output {self.output_name} has shape {out_shape} at batch "
                               f"{self.max_batch}, its sidecar says [{self.max_batch}, {self.dim}]; rebuild it")
        self.stream = self.cuda.new_stream()
        self.host_in = self.cuda.host_buffer(max_shape, self.input_dtype)
        self.host_out = self.cuda.host_buffer(out_shape, self.output_dtype)
        self.dev_in = self.cuda.alloc(self.host_in.nbytes)
        self._buffers.append(self.dev_in)
        self.dev_out = self.cuda.alloc(self.host_out.nbytes)
        self._buffers.append(self.dev_out)
        self.context.set_tensor_address(self.input_name, self.cuda.ptr(self.dev_in))
        self.context.set_tensor_address(self.output_name, self.cuda.ptr(self.dev_out))

    def _prepare(self, batch_uint8: np.ndarray) -> np.ndarray:
        return prepare_input(batch_uint8, self.info).astype(self.input_dtype, copy=False)

    def _infer(self, x: np.ndarray) -> np.ndarray:
        out = []
        with self._lock, self.cuda.activate():
            for start in range(0, len(x), self.max_batch):
                chunk = x[start:start + self.max_batch]
                n = len(chunk)
                self.host_in[:n] = chunk
                self.context.set_input_shape(self.input_name, tuple(chunk.shape))
                self.cuda.htod(self.dev_in, self.host_in[:n], self.stream)
                if not self.context.execute_async_v3(self.cuda.stream_handle(self.stream)):
                    raise MeanNavError(f"{self.path}: TensorRT execution failed; see the TensorRT log above")
                self.cuda.dtoh(self.host_out[:n], self.dev_out, self.stream)
                self.cuda.sync(self.stream)
                out.append(np.array(self.host_out[:n], np.float32))
        return np.concatenate(out)

    def describe(self) -> dict:
        d = super().describe()
        d.update(path=str(self.path), tensorrt=self.sidecar.tensorrt_version, gpu=self.sidecar.gpu_name,
                 cuda_api=self.cuda.kind, max_batch=self.max_batch)
        return d

    def close(self) -> None:
        if self.cuda is None:
            return
        with self._lock, self.cuda.activate():
            for buf in self._buffers:
                self.cuda.free(buf)
            self._buffers = []
            if self.stream is not None:
                self.cuda.release_stream(self.stream)
            # pinned host memory, the execution context and the engine go while the context is current
            self.stream = self.host_in = self.host_out = None
            self.context = None
            self.engine = None
        self.cuda.close()
        self.cuda = None
