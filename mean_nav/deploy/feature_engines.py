"""XFeat / LighterGlue ONNX -> what TensorRT builds (FP16), and the check an engine must pass.

engines/build_engine.py builds a feature ONNX (from `mean-nav export-features`) strongly
typed, so FP16 comes from the graph: `prepare_fp16` converts it (float32 inputs and
outputs; the normalisations whose variance overflows float16, and TopK, stay float32) and,
for XFeat, fixes the keypoint count K (an engine input that sets an output's shape would
have to be a shape tensor; a fixed K keys the engine instead). `compare_features` is the
check a built engine (or any other runner of the two graphs) must pass against onnxruntime
FP32 on real image pairs; the CPU tests run it on the FP16 ONNX itself. Running an engine
(`FeatureEngine`) and choosing it at run time is feature_backends.py. No torch here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import MeanNavError
from ..nav.features.xfeat import SIZE_MULTIPLE, grey_input
from .feature_backends import FeatureEngine, engine_key  # noqa: F401  (build_engine.py's names)

# float16 overflows in the variance of these; TopK's indices must stay exact
FP16_KEEP_FLOAT32_OPS = ["LayerNormalization", "InstanceNormalization", "ReduceL2", "TopK"]
# an FP16 engine moves scores near the detection threshold and the top-K boundary a little
MIN_KEYPOINT_AGREEMENT = 0.9
MIN_DESCRIPTOR_COSINE = 0.99
MIN_MATCH_AGREEMENT = 0.9

Runner = Callable[[dict], list]   # feeds -> outputs, in the graph's output order


def feature_kind(path: str | Path) -> str | None:
    """'xfeat' / 'lighterglue' for a graph from `mean-nav export-features`, else None (reads the header only)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return None
    meta = {p.key: p.value for p in model.metadata_props}
    return meta.get("mean_nav.kind")


def prepare_fp16(src: str | Path, out: str | Path, keypoints: int | None = None) -> dict[str, str]:
    """Write the FP16 (float32 I/O) version of a feature ONNX to `out`; XFeat gets a fixed K.
    Returns the graph's mean_nav metadata (plus `keypoints` for XFeat)."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    from .export import write_onnx_atomic

    model = onnx.load(str(src))
    meta = {p.key[len("mean_nav."):]: p.value for p in model.metadata_props if p.key.startswith("mean_nav.")}
    if meta.get("kind") not in ("xfeat", "lighterglue"):
        raise MeanNavError(f"{src}: not an XFeat or LighterGlue graph from `mean-nav export-features`")
    if meta["kind"] == "xfeat":
        if not keypoints or keypoints < 1:
            raise MeanNavError("--keypoints: an XFeat engine needs a fixed keypoint count (e.g. 1024)")
        inputs = [i for i in model.graph.input if i.name == "max_keypoints"]
        if not inputs:
            raise MeanNavError(f"{src}: no max_keypoints input; re-export with `mean-nav export-features`")
        model.graph.input.remove(inputs[0])
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([keypoints], np.int64), "max_keypoints"))
        meta["keypoints"] = str(keypoints)
    fp16 = convert_float_to_float16(model, keep_io_types=True, op_block_list=DEFAULT_OP_BLOCK_LIST + FP16_KEEP_FLOAT32_OPS)
    del fp16.metadata_props[:]
    for key, value in sorted({**meta, "precision": "fp16"}.items()):
        prop = fp16.metadata_props.add()
        prop.key, prop.value = "mean_nav." + key, value
    write_onnx_atomic(fp16, Path(out))
    return meta


@dataclass
class FeatureCheck:
    pairs: int
    keypoint_agreement: float
    descriptor_cosine_min: float
    match_agreement: float
    matches_per_pair: float
    # what ok() asks for: the engine defaults; the export against torch asks for more
    min_keypoints: float = MIN_KEYPOINT_AGREEMENT
    min_cosine: float = MIN_DESCRIPTOR_COSINE
    min_matches: float = MIN_MATCH_AGREEMENT

    def ok(self) -> bool:
        return (self.keypoint_agreement >= self.min_keypoints and self.descriptor_cosine_min >= self.min_cosine
                and self.match_agreement >= self.min_matches)

    def summary(self) -> str:
        return (f"{self.pairs} image pairs: keypoints {self.keypoint_agreement:.2%} identical, descriptor cosine min "
                f"{self.descriptor_cosine_min:.5f}, LighterGlue matches {self.match_agreement:.2%} identical "
                f"({self.matches_per_pair:.0f} per pair; needs {self.min_keypoints:.0%}, {self.min_cosine}, "
                f"{self.min_matches:.0%})")


def _xfeat_feeds(image: np.ndarray, keypoints: int | None) -> dict:
    feeds = {"image": grey_input(image)}
    if keypoints is not None:
        feeds["max_keypoints"] = np.array([keypoints], np.int64)
    return feeds


def _glue_feeds(k0, d0, k1, d1, size) -> dict:
    wh = np.array([[size[1], size[0]]], np.float32)
    return {"keypoints0": k0[None], "keypoints1": k1[None], "descriptors0": d0[None], "descriptors1": d1[None],
            "size0": wh, "size1": wh}


def compare_features(reference_xfeat: Runner, reference_glue: Runner | None, xfeat: Runner | None,
                     glue: Runner | None, pairs: list[tuple[np.ndarray, np.ndarray]], keypoints: int,
                     min_score: float = 0.1, candidate_takes_k: bool = False, **thresholds) -> FeatureCheck:
    """Keypoints, descriptors (XFeat) and matches (LighterGlue, on the reference's keypoints) of
    candidate runners against reference ones (onnxruntime FP32 for an engine, torch for the
    export). Image sides must be multiples of 32; `thresholds` override FeatureCheck's."""
    agree_kp, cos_min, agree_m, n_matches = [], 1.0, [], []
    for a, b in pairs:
        sides = []
        for img in (a, b):
            if img.shape[0] % SIZE_MULTIPLE or img.shape[1] % SIZE_MULTIPLE:
                raise MeanNavError(f"check images must have sides that are multiples of {SIZE_MULTIPLE}")
            k, s, d = reference_xfeat(_xfeat_feeds(img, keypoints))
            k, d = k[s > 0], d[s > 0]
            if xfeat is not None:
                k2, s2, d2 = xfeat(_xfeat_feeds(img, keypoints if candidate_takes_k else None))
                k2, d2 = k2[s2 > 0], d2[s2 > 0]
                index = {tuple(p): i for i, p in enumerate(k2.astype(int).tolist())}
                common = [(i, index[tuple(p)]) for i, p in enumerate(k.astype(int).tolist()) if tuple(p) in index]
                agree_kp.append(len(common) / max(len(k), 1))
                if common:
                    i_ref, i_got = np.array(common).T
                    cos_min = min(cos_min, float(np.min(np.sum(d[i_ref] * d2[i_got], axis=1))))
            sides.append((k.astype(np.float32), d.astype(np.float32)))
        if glue is not None:
            feeds = _glue_feeds(*sides[0], *sides[1], a.shape)
            m_ref, p_ref = reference_glue(feeds)
            m_got, p_got = glue(feeds)
            m_ref = np.where(p_ref > min_score, m_ref, -1)
            agree_m.append(float(np.mean(m_ref == np.where(p_got > min_score, m_got, -1))))
            n_matches.append(int((m_ref >= 0).sum()))
    return FeatureCheck(len(pairs), float(min(agree_kp)) if agree_kp else 1.0, cos_min,
                        float(min(agree_m)) if agree_m else 1.0, float(np.mean(n_matches)) if n_matches else 0.0,
                        **thresholds)


def onnxruntime_runner(path: str | Path) -> Runner:
    from .backends import open_onnx_session

    session = open_onnx_session(path, cpu_only=True)
    return lambda feeds: session.run(None, feeds)
