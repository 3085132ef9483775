"""The one interface every inference backend implements (no torch import here).

uint8 RGB images in, float32 L2-normalised descriptors out. Preprocessing lives here
so that torch, onnxruntime and TensorRT see identical input tensors.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import cv2
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How an RGB uint8 image becomes the network's float input."""

    img_size: int = 384
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Preprocessing":
        d = json.loads(text)
        return cls(img_size=int(d["img_size"]), mean=tuple(d["mean"]), std=tuple(d["std"]))


def to_batch_uint8(images: Sequence[np.ndarray] | np.ndarray, size: int) -> np.ndarray:
    """Resize RGB uint8 images (any HxW) to [N,size,size,3] uint8."""
    out = np.empty((len(images), size, size, 3), np.uint8)
    for i, img in enumerate(images):
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"image {i}: expected HxWx3 uint8 RGB, got {img.shape} {img.dtype}")
        if img.shape[:2] != (size, size):
            interp = cv2.INTER_AREA if min(img.shape[:2]) > size else cv2.INTER_LINEAR
            img = cv2.resize(img, (size, size), interpolation=interp)
        out[i] = img
    return out


def normalize(batch_uint8: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """[N,H,W,3] uint8 -> [N,3,H,W] float32 normalised with the model's mean/std.

    Per image, OpenCV splits the channels and writes each one's multiply-add straight into
    its NCHW plane: 0.17 ms per 384 px image, against 0.28 ms for numpy's strided
    per-channel multiply-add and 2 ms for cast, scale, subtract, divide and transpose as
    separate passes (a Lite0 run on 2 cores is ~11 ms).
    """
    n, h, w, _ = batch_uint8.shape
    scale = 1.0 / (255.0 * np.asarray(prep.std, np.float64))
    shift = -np.asarray(prep.mean, np.float64) / np.asarray(prep.std, np.float64)
    out = np.empty((n, 3, h, w), np.float32)
    for i in range(n):
        for c, plane in enumerate(cv2.split(np.ascontiguousarray(batch_uint8[i]))):
            # dst is a contiguous [H,W] float32 view of `out`: OpenCV writes into it in place
            cv2.addWeighted(plane, scale[c], plane, 0.0, shift[c], dst=out[i, c], dtype=cv2.CV_32F)
    return out


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    n = np.linalg.norm(x, axis=axis, keepdims=True)
    return (x / np.maximum(n, 1e-12)).astype(np.float32)


class Embedder:
    """A MEAN deploy graph behind one call: images -> L2-normalised descriptors.

    Attributes every backend sets:
      name           backend name ("torch", "onnxruntime", "tensorrt")
      dim            descriptor length
      model_hash     identity of the trained weights (shared by FP32/FP16/INT8 variants)
      precision      "fp32", "fp16", "int8-qdq", "int8-cpu"
      preprocessing  Preprocessing used for every input
    A backend implements `_infer` (the network on a prepared array) and, if its input is
    not normalised NCHW float32, `_prepare`; a test double may override `_embed_batch` alone.
    """

    name: str = "abstract"
    dim: int
    model_hash: str
    precision: str = "fp32"
    preprocessing: Preprocessing

    def _embed_batch(self, batch_uint8: np.ndarray) -> np.ndarray:
        """[N,S,S,3] uint8 at preprocessing.img_size -> [N,dim] float32 (normalised)."""
        return self._infer(self._prepare(batch_uint8))

    def _prepare(self, batch_uint8: np.ndarray) -> np.ndarray:
        """[N,S,S,3] uint8 -> the network's input: normalised NCHW float32 by default."""
        return normalize(batch_uint8, self.preprocessing)

    def _infer(self, x: np.ndarray) -> np.ndarray:
        """The network alone on a prepared input -> [N,dim] float32 (`bench` times it apart)."""
        raise NotImplementedError(f"{type(self).__name__} implements _embed_batch only")

    def embed(self, images: Sequence[np.ndarray] | np.ndarray, batch_size: int = 32) -> np.ndarray:
        """RGB uint8 images of any size -> [N,dim] float32, L2-normalised."""
        if len(images) == 0:
            return np.zeros((0, self.dim), np.float32)
        out = []
        for start in range(0, len(images), batch_size):
            batch = to_batch_uint8(images[start:start + batch_size], self.preprocessing.img_size)
            out.append(l2_normalize(self._embed_batch(batch)))
        return np.concatenate(out)

    def describe(self) -> dict:
        return {
            "backend": self.name,
            "dim": self.dim,
            "model_hash": self.model_hash,
            "precision": self.precision,
            "preprocessing": asdict(self.preprocessing),
        }

    def close(self) -> None:
        """Release device resources (TensorRT); a no-op by default."""


def iter_batches(items: Sequence, size: int) -> Iterable[Sequence]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
