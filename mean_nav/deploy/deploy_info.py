"""What a deploy graph is (`DeployInfo`, stored in ONNX metadata and engine sidecars) and
the input each graph wants. Shared by every backend, so no backend imports another.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import MeanNavError
from .embedder import Preprocessing, normalize

META_PREFIX = "mean_nav."
PRECISIONS = ("fp32", "fp16", "int8-qdq", "int8-cpu")
INPUT_LAYOUTS = ("float_nchw", "uint8_nhwc")


@dataclass(frozen=True)
class DeployInfo:
    """What an exported deploy graph is: recorded in ONNX metadata and engine sidecars."""

    model_hash: str
    backbone: str
    embed_dim: int
    preprocessing: Preprocessing
    precision: str = "fp32"
    input_layout: str = "float_nchw"

    def to_metadata(self) -> dict[str, str]:
        return {
            META_PREFIX + "model_hash": self.model_hash,
            META_PREFIX + "backbone": self.backbone,
            META_PREFIX + "embed_dim": str(self.embed_dim),
            META_PREFIX + "preprocessing": self.preprocessing.to_json(),
            META_PREFIX + "precision": self.precision,
            META_PREFIX + "input": self.input_layout,
        }

    @classmethod
    def from_metadata(cls, meta: dict[str, str], source: str) -> "DeployInfo":
        missing = [k for k in ("model_hash", "backbone", "embed_dim", "preprocessing", "precision", "input")
                   if META_PREFIX + k not in meta]
        if missing:
            raise MeanNavError(
                f"{source}: not a MEAN deploy graph (no {META_PREFIX}{missing[0]} metadata); "
                "export it with `mean-nav export` (and `mean-nav quantize` for INT8/FP16)")
        try:
            info = cls(
                model_hash=meta[META_PREFIX + "model_hash"],
                backbone=meta[META_PREFIX + "backbone"],
                embed_dim=int(meta[META_PREFIX + "embed_dim"]),
                preprocessing=Preprocessing.from_json(meta[META_PREFIX + "preprocessing"]),
                precision=meta[META_PREFIX + "precision"],
                input_layout=meta[META_PREFIX + "input"],
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise MeanNavError(f"{source}: malformed {META_PREFIX}* metadata ({exc}); re-export the model") from None
        if info.precision not in PRECISIONS:
            raise MeanNavError(f"{source}: unknown precision {info.precision!r} in metadata; expected one of {PRECISIONS}")
        if info.input_layout not in INPUT_LAYOUTS:
            raise MeanNavError(f"{source}: unknown input layout {info.input_layout!r}; expected one of {INPUT_LAYOUTS}")
        return info

    def replace(self, **changes) -> "DeployInfo":
        from dataclasses import replace

        return replace(self, **changes)


def prepare_input(batch_uint8: np.ndarray, info: DeployInfo) -> np.ndarray:
    """[N,S,S,3] uint8 -> what the graph's input wants (uint8 NHWC as is, or normalised NCHW)."""
    if info.input_layout == "uint8_nhwc":
        return np.ascontiguousarray(batch_uint8)
    return normalize(batch_uint8, info.preprocessing)
