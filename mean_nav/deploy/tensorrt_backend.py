"""TensorRT engine backend (TensorRT 10.3 .. 11 runtime API) and engine identity checks.

Engines are executables tied to the TensorRT version, the GPU and the model. Each engine
`<model_hash>.trt<version>.<gpu>.<precision>.engine` has a sidecar JSON
(`<engine>.json`) written by engines/build_engine.py; the runtime refuses an engine whose
sidecar does not match the expected model, this TensorRT, this GPU, or whose checksum
differs.

Device buffers use pycuda (`mem_alloc`, `Stream`, `memcpy_*_async`) and fall back to
cuda-python (`cuda.bindings.runtime`, or the older `cuda.cudart`). Tensors are bound by
name and run with `execute_async_v3`. No torch here.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
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


def engine_file_name(model_hash: str, trt_version: str, gpu_name: str, precision: str) -> str:
    """`<model_hash>.trt<ver>.<gpu>.<precision>.engine`, ver = major.minor.patch."""
    ver = ".".join(str(trt_version).split(".")[:3])
    return f"{model_hash}.trt{ver}.{sanitize_gpu_name(gpu_name)}.{precision}.engine"


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
                     expect: DeployInfo | None = None) -> str | None:
    """Why an engine may not run here (None if it may)."""
    if expect is not None:
        if sidecar.model_hash != expect.model_hash:
            return f"built for model {sidecar.model_hash}, expected {expect.model_hash}"
        if sidecar.precision != expect.precision:
            return f"built at precision {sidecar.precision}, expected {expect.precision}"
        if sidecar.input_layout != expect.input_layout:
            return f"input layout {sidecar.input_layout}, expected {expect.input_layout}"
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

    def device_info(self) -> tuple[str, str]:
        raise NotImplementedError

    def alloc(self, nbytes: int): ...
    def ptr(self, allocation) -> int: ...
    def free(self, allocation) -> None: ...
    def new_stream(self): ...
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
        # the primary context is the one TensorRT's runtime API uses too
        self.context = self.device.retain_primary_context()
        self.context.push()

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
            self.context.pop()
        except Exception:  # already popped by the interpreter shutting down
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

    def stream_handle(self, stream):
        return int(stream)

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


def find_engine(info: DeployInfo, dirs: Iterable[Path]) -> tuple[Path | None, str]:
    """The engine for `info` built for this TensorRT and GPU in one of `dirs`, and why not if none."""
    trt = import_tensorrt()
    api = open_cuda()
    try:
        gpu, cc = api.device_info()
    finally:
        api.close()
    name = engine_file_name(info.model_hash, trt.__version__, gpu, info.precision)
    for d in dirs:
        candidate = Path(d) / name
        if not candidate.is_file():
            continue
        try:
            sidecar = EngineSidecar.load(sidecar_path(candidate))
        except MeanNavError as exc:
            return None, str(exc)
        why = sidecar_mismatch(sidecar, trt.__version__, gpu, cc, expect=info)
        if why:
            return None, f"{candidate}: {why}"
        return candidate, ""
    return None, f"no {name} next to the ONNX or in the engine folder"


# ----------------------------------------------------------------------------- embedder


class TensorRTEmbedder(Embedder):
    """A serialized TensorRT engine of the MEAN deploy graph."""

    name = "tensorrt"

    def __init__(self, engine_path: str | Path, expect: DeployInfo | None = None, verify_checksum: bool = True):
        self.path = Path(engine_path)
        if not self.path.is_file():
            raise MeanNavError(f"{self.path}: engine file not found; build it with engines/build_engine.py")
        self.sidecar = EngineSidecar.load(sidecar_path(self.path))
        trt = import_tensorrt()
        self.trt = trt
        self.cuda = open_cuda()
        self._buffers: list = []
        gpu, cc = self.cuda.device_info()
        why = sidecar_mismatch(self.sidecar, trt.__version__, gpu, cc, expect=expect)
        if why:
            self.cuda.close()
            raise MeanNavError(f"{self.path}: engine {why}; rebuild it on this device with engines/build_engine.py")
        if verify_checksum and sha256_file(self.path) != self.sidecar.engine_sha256:
            self.cuda.close()
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
            self.cuda.close()
            raise MeanNavError(f"{self.path}: TensorRT could not deserialize the engine; rebuild it on this device")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or not outputs:
            raise MeanNavError(f"{self.path}: engine has inputs {inputs} / outputs {outputs}; expected one image input")
        self.input_name, self.output_name = inputs[0], outputs[0]
        _, _, max_shape = self.engine.get_tensor_profile_shape(self.input_name, 0)
        self.max_batch = int(max_shape[0])
        self.input_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.input_name)))
        self.output_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.output_name)))
        sample = tuple(int(v) for v in max_shape[1:])
        self.stream = self.cuda.new_stream()
        self.host_in = self.cuda.host_buffer((self.max_batch, *sample), self.input_dtype)
        self.host_out = self.cuda.host_buffer((self.max_batch, self.dim), self.output_dtype)
        self.dev_in = self.cuda.alloc(self.host_in.nbytes)
        self.dev_out = self.cuda.alloc(self.host_out.nbytes)
        self._buffers = [self.dev_in, self.dev_out]
        self.context.set_tensor_address(self.input_name, self.cuda.ptr(self.dev_in))
        self.context.set_tensor_address(self.output_name, self.cuda.ptr(self.dev_out))

    def _prepare(self, batch_uint8: np.ndarray) -> np.ndarray:
        return prepare_input(batch_uint8, self.info).astype(self.input_dtype, copy=False)

    def _infer(self, x: np.ndarray) -> np.ndarray:
        out = []
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
        for buf in self._buffers:
            self.cuda.free(buf)
        self._buffers = []
        self.context = None
        self.engine = None
        self.cuda.close()
