"""TensorRT: engine naming and sidecar refusal rules (always), engine build and run (GPU only)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from mean_nav.deploy.deploy_info import DeployInfo
from mean_nav.deploy.embedder import Preprocessing
from mean_nav.deploy.tensorrt_backend import (EngineSidecar, TensorRTEmbedder, engine_file_name,
                                              runtime_unavailable_reason, sanitize_gpu_name, sha256_file,
                                              sidecar_mismatch, sidecar_path)
from mean_nav.errors import MeanNavError

ROOT = Path(__file__).resolve().parents[1]
INFO = DeployInfo("0123456789abcdef", "efficientnet_lite0", 1280, Preprocessing(img_size=64), "int8-qdq", "float_nchw")


def _build_engine_module():
    spec = importlib.util.spec_from_file_location("build_engine", ROOT / "engines" / "build_engine.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_engine"] = module   # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def _sidecar(**changes) -> EngineSidecar:
    fields = dict(model_hash=INFO.model_hash, backbone=INFO.backbone, embed_dim=INFO.embed_dim,
                  preprocessing=INFO.preprocessing.to_json(), precision=INFO.precision,
                  input_layout=INFO.input_layout, tensorrt_version="10.3.0.30", gpu_name="Orin",
                  compute_capability="8.7", input_name="input", input_shape=[8, 3, 64, 64], max_batch=8,
                  engine_sha256="0" * 64)
    fields.update(changes)
    return EngineSidecar(**fields)


def test_engine_file_name_keys_model_trt_gpu_and_precision():
    assert engine_file_name("0123456789abcdef", "10.3.0.30", "NVIDIA Jetson AGX Orin", "int8-qdq") == \
        "0123456789abcdef.trt10.3.0.nvidia-jetson-agx-orin.int8-qdq.engine"
    assert sanitize_gpu_name("Orin (nvgpu)") == "orin-nvgpu"
    assert sidecar_path("/x/a.engine") == Path("/x/a.engine.json")


def test_sidecar_mismatches_are_refused_with_the_reason():
    sc = _sidecar()
    assert sidecar_mismatch(sc, "10.3.0.30", "Orin", "8.7", expect=INFO) is None
    assert "TensorRT 10.3.0.30, this is TensorRT 10.13.0" in sidecar_mismatch(sc, "10.13.0", "Orin", "8.7")
    assert "built on Orin" in sidecar_mismatch(sc, "10.3.0.30", "NVIDIA GeForce RTX 4090", "8.9")
    assert "sm 8.7" in sidecar_mismatch(sc, "10.3.0.30", "Orin", "8.9")
    assert "built for model" in sidecar_mismatch(sc, "10.3.0.30", "Orin", "8.7",
                                                 expect=INFO.replace(model_hash="ffffffffffffffff"))
    assert "precision int8-qdq, expected fp16" in sidecar_mismatch(sc, "10.3.0.30", "Orin", "8.7",
                                                                 expect=INFO.replace(precision="fp16"))


def test_sidecar_round_trip_and_missing_sidecar_is_refused(tmp_path):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"serialized engine bytes")
    with pytest.raises(MeanNavError, match="engine sidecar missing"):
        TensorRTEmbedder(engine)
    sc = _sidecar(engine_sha256=sha256_file(engine))
    sc.save(sidecar_path(engine))
    loaded = EngineSidecar.load(sidecar_path(engine))
    assert loaded == sc and loaded.deploy_info() == INFO
    sidecar_path(engine).write_text("{not json")
    with pytest.raises(MeanNavError, match="unreadable engine sidecar"):
        EngineSidecar.load(sidecar_path(engine))


def test_trtexec_line_matches_the_build_settings():
    be = _build_engine_module()
    shapes = be.input_shapes(INFO, max_batch=8, opt_batch=4)
    assert shapes == ((1, 3, 64, 64), (4, 3, 64, 64), (8, 3, 64, 64))
    u8 = be.input_shapes(INFO.replace(input_layout="uint8_nhwc"), 2, 2)
    assert u8[2] == (2, 64, 64, 3)
    cmd = be.trtexec_command(Path("m.onnx"), Path("m.engine"), "input", shapes, 1024, Path("t.cache"))
    for part in ("--onnx=m.onnx", "--stronglyTyped", "--minShapes=input:1x3x64x64", "--optShapes=input:4x3x64x64",
                 "--maxShapes=input:8x3x64x64", "--memPoolSize=workspace:1024M", "--saveEngine=m.engine",
                 "--timingCacheFile=t.cache"):
        assert part in cmd


def test_build_engine_without_tensorrt_stops_with_a_clear_message(tmp_path, capsys):
    reason = runtime_unavailable_reason()
    if reason is None:
        pytest.skip("TensorRT and a CUDA device are present")
    onnx_path = _metadata_only_onnx(tmp_path)
    be = _build_engine_module()
    assert be.main([str(onnx_path), "-o", str(tmp_path / "engines")]) == 1
    err = capsys.readouterr().err
    assert "TensorRT is not installed" in err or "no CUDA device" in err
    assert not (tmp_path / "engines").exists() or not any((tmp_path / "engines").iterdir())


def _metadata_only_onnx(tmp_path: Path) -> Path:
    """A valid ONNX carrying MEAN metadata (enough for the checks that run before TensorRT)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from mean_nav.deploy.export import set_metadata

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 64, 64])
    y = helper.make_tensor_value_info("descriptor", TensorProto.FLOAT, ["batch", 3, 64, 64])
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["descriptor"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    set_metadata(model, INFO.replace(precision="fp32"))
    path = tmp_path / "meta_only.onnx"
    onnx.save(model, str(path))
    return path


def test_build_engine_refuses_the_cpu_int8_variant(tmp_path, capsys):
    path = _metadata_only_onnx(tmp_path)
    import onnx

    from mean_nav.deploy.export import set_metadata

    model = onnx.load(str(path))
    set_metadata(model, INFO.replace(precision="int8-cpu"))
    onnx.save(model, str(path))
    assert _build_engine_module().main([str(path)]) == 1
    assert "use the .int8-qdq.onnx file for TensorRT" in capsys.readouterr().err


def _tiny_onnx(tmp_path: Path) -> Path:
    pytest.importorskip("torch")
    from mean_nav.deploy.export import export_onnx
    from mean_nav.deploy.images import synthetic_aerial_images
    from mean_nav.model import ModelConfig, build_model

    cfg = ModelConfig(backbone="efficientnet_lite0", img_size=64, pretrained="package", num_classes=3)
    out = tmp_path / "m.onnx"
    export_onnx(build_model(cfg).eval(), cfg, out, check_images=synthetic_aerial_images(2, 64), threads=1)
    return out


# ----------------------------------------------------------------------------- on a GPU


@pytest.fixture(scope="module")
def gpu():
    reason = runtime_unavailable_reason()
    if reason is not None:
        print(f"TensorRT tests skipped: {reason}")
        pytest.skip(f"TensorRT engine tests need tensorrt and a CUDA device: {reason}")


def test_engine_builds_matches_onnxruntime_and_refuses_tampering(gpu, tmp_path):
    from mean_nav.deploy.backends import OnnxRuntimeEmbedder, load_embedder
    from mean_nav.deploy.images import synthetic_aerial_images

    onnx_path = _tiny_onnx(tmp_path)
    be = _build_engine_module()
    result = be.build_engine(onnx_path, out_dir=tmp_path / "engines", max_batch=4, check_count=4)
    assert result.min_cosine >= 0.99 and result.latency_ms_p50 > 0
    side = json.loads(result.sidecar.read_text())
    assert side["engine_sha256"] == sha256_file(result.engine) and side["max_batch"] == 4
    images = synthetic_aerial_images(6, 64, seed=3)
    trt_emb = TensorRTEmbedder(result.engine)
    try:
        got = trt_emb.embed(images, batch_size=6)       # more than max_batch: chunked
    finally:
        trt_emb.close()
    ref = OnnxRuntimeEmbedder(onnx_path).embed(images)
    assert np.min(np.sum(ref * got, axis=1)) >= 0.99
    # auto picks the engine when it sits next to the ONNX
    result.engine.rename(onnx_path.parent / result.engine.name)
    result.sidecar.rename(onnx_path.parent / result.sidecar.name)
    auto = load_embedder(onnx_path)
    assert auto.name == "tensorrt"
    auto.close()
    # a sidecar from another device is refused
    moved = onnx_path.parent / result.engine.name
    data = json.loads(sidecar_path(moved).read_text())
    data["gpu_name"] = "Some Other GPU"
    sidecar_path(moved).write_text(json.dumps(data))
    with pytest.raises(MeanNavError, match="rebuild it on this device"):
        TensorRTEmbedder(moved)
    # a modified engine is refused
    data["gpu_name"] = side["gpu_name"]
    sidecar_path(moved).write_text(json.dumps(data))
    with open(moved, "ab") as f:
        f.write(b"\0")
    with pytest.raises(MeanNavError, match="checksum"):
        TensorRTEmbedder(moved)
