"""TensorRT: engine naming and sidecar refusal rules (always), engine build and run (GPU only).

The GPU tests need only tensorrt, a CUDA device (pycuda or cuda-python), onnx and onnxruntime:
the model is a tiny ONNX made with onnx.helper (no torch), built as FP32, FP16 and INT8 Q/DQ.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import sys
import threading
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


def test_engine_file_name_keys_model_onnx_trt_gpu_and_precision():
    assert engine_file_name("0123456789abcdef", "ab" * 32, "10.3.0.30", "NVIDIA Jetson AGX Orin", "int8-qdq") == \
        "0123456789abcdef.abababababab.trt10.3.0.nvidia-jetson-agx-orin.int8-qdq.engine"
    # the same weights re-exported or re-quantized: another ONNX, another engine
    assert engine_file_name("0123456789abcdef", "cd" * 32, "10.3.0.30", "Orin", "fp16") != \
        engine_file_name("0123456789abcdef", "ab" * 32, "10.3.0.30", "Orin", "fp16")
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
    other_size = INFO.replace(preprocessing=Preprocessing(img_size=128))
    assert "built for preprocessing" in sidecar_mismatch(sc, "10.3.0.30", "Orin", "8.7", expect=other_size)
    built = _sidecar(source_onnx_sha256="ab" * 32)
    assert sidecar_mismatch(built, "10.3.0.30", "Orin", "8.7", expect=INFO, source_onnx_sha256="ab" * 32) is None
    assert "built from another ONNX (sha256 abababababab, this one is cdcdcdcdcdcd" in sidecar_mismatch(
        built, "10.3.0.30", "Orin", "8.7", expect=INFO, source_onnx_sha256="cd" * 32)


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
    cmd = be.trtexec_command(Path("m.onnx"), Path("e/m.fp16.engine"), "input", shapes, 1024, Path("t.cache"))
    for part in ("--onnx=m.onnx", "--stronglyTyped", "--minShapes=input:1x3x64x64", "--optShapes=input:4x3x64x64",
                 "--maxShapes=input:8x3x64x64", "--memPoolSize=workspace:1024M",
                 "--saveEngine=e/m.fp16.trtexec.engine", "--timingCacheFile=t.cache"):
        assert part in cmd.split()
    assert "--saveEngine=e/m.fp16.engine" not in cmd.split()   # running it never replaces the checked engine


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


def test_parse_failure_hint_names_the_broken_qdq_rule(tmp_path):
    """The hint after a parse failure reads the Q/DQ rules instead of suggesting another opset."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from mean_nav.deploy.export import set_metadata

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("descriptor", TensorProto.FLOAT, ["batch", 4])
    bias_q = numpy_helper.from_array(np.arange(4, dtype=np.int32), "bias_q")   # an INT32 DequantizeLinear input
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zero = numpy_helper.from_array(np.array(0, np.int32), "z")
    graph = helper.make_graph([helper.make_node("DequantizeLinear", ["bias_q", "s", "z"], ["bias"], name="dq_bias"),
                               helper.make_node("Add", ["input", "bias"], ["descriptor"], name="add")],
                              "g", [x], [y], [bias_q, scale, zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    set_metadata(model, INFO)
    path = tmp_path / "bad.int8-qdq.onnx"
    onnx.save(model, str(path))
    hint = _build_engine_module().parse_failure_hint(path, INFO)
    assert "dq_bias: dequantizes int32 bias_q" in hint and "opset" not in hint


def test_auto_falls_back_to_onnxruntime_when_the_engine_fails_to_load(tmp_path, monkeypatch, caplog):
    """A corrupt engine found for an ONNX: `auto` warns and runs onnxruntime; `tensorrt` refuses."""
    pytest.importorskip("onnx")
    from deploy_testing import tiny_deploy_onnx

    from mean_nav.deploy import backends

    onnx_path = tiny_deploy_onnx(tmp_path / "tiny.onnx")
    engine = tmp_path / "tiny.engine"
    engine.write_bytes(b"\x00 not an engine")           # garbage, and no sidecar to vouch for it
    info = backends.read_onnx_info(onnx_path)
    monkeypatch.setattr(backends, "find_matching_engine",
                        lambda path, required=False: (engine, info, sha256_file(onnx_path)))
    with caplog.at_level(logging.WARNING, logger=backends.__name__):
        emb = backends.load_embedder(onnx_path, backend="auto")
    assert isinstance(emb, backends.OnnxRuntimeEmbedder)
    assert "engine sidecar missing" in caplog.text and "running" in caplog.text
    with pytest.raises(MeanNavError, match="engine sidecar missing"):
        backends.load_embedder(onnx_path, backend="tensorrt")


# ----------------------------------------------------------------------------- on a GPU


@pytest.fixture(scope="module")
def gpu():
    reason = runtime_unavailable_reason()
    if reason is not None:
        print(f"TensorRT tests skipped: {reason}")
        pytest.skip(f"TensorRT engine tests need tensorrt and a CUDA device: {reason}")


TINY_SIZE = 32


@pytest.fixture(scope="module")
def tiny_models(gpu, tmp_path_factory):
    """{precision: ONNX} for the tiny graph: FP32, FP16 and INT8 Q/DQ (mean-nav's own quantizer)."""
    pytest.importorskip("onnx")
    from deploy_testing import tiny_deploy_onnx

    from mean_nav.deploy.backends import read_onnx_info
    from mean_nav.deploy.images import load_images
    from mean_nav.deploy.quantize import _stamp, build_fp16, build_int8_qdq, preprocess_for_quantization

    d = tmp_path_factory.mktemp("trt")
    fp32 = tiny_deploy_onnx(d / "tiny.onnx", size=TINY_SIZE)
    info = read_onnx_info(fp32)
    fp16 = d / "tiny.fp16.onnx"
    build_fp16(fp32, fp16)
    _stamp(fp16, info.replace(precision="fp16"))
    prepared, qdq = d / "prepared.onnx", d / "tiny.int8-qdq.onnx"
    preprocess_for_quantization(fp32, prepared)
    build_int8_qdq(prepared, qdq, load_images(None, 16, TINY_SIZE), info)
    _stamp(qdq, info.replace(precision="int8-qdq"))
    prepared.unlink()
    return {"fp32": fp32, "fp16": fp16, "int8-qdq": qdq}


# per descriptor against onnxruntime running the same ONNX (16-d descriptors: a little
# INT8 rounding moves a short vector's cosine more than Lite0's 1280-d one)
ENGINE_BAR = {"fp32": 0.999, "fp16": 0.99, "int8-qdq": 0.98}


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8-qdq"])
def test_engine_builds_and_matches_onnxruntime(tiny_models, precision, tmp_path):
    from mean_nav.deploy.backends import OnnxRuntimeEmbedder, read_onnx_info
    from mean_nav.deploy.images import synthetic_aerial_images

    onnx_path = tiny_models[precision]
    be = _build_engine_module()
    result = be.build_engine(onnx_path, out_dir=tmp_path, max_batch=4, check_count=8,
                             min_cosine=ENGINE_BAR[precision])
    assert result.min_cosine >= ENGINE_BAR[precision] and result.latency_ms_p50 > 0
    side = json.loads(result.sidecar.read_text())
    assert side["engine_sha256"] == sha256_file(result.engine) and side["max_batch"] == 4
    assert side["source_onnx_sha256"] == sha256_file(onnx_path) and side["precision"] == precision
    assert sha256_file(onnx_path)[:12] in result.engine.name
    assert f"--saveEngine={be.trtexec_engine_path(result.engine)}" in result.trtexec
    images = synthetic_aerial_images(6, TINY_SIZE, seed=3)
    emb = TensorRTEmbedder(result.engine, expect=read_onnx_info(onnx_path),
                           source_onnx_sha256=sha256_file(onnx_path))
    try:
        got = emb.embed(images, batch_size=6)       # more than max_batch: chunked
        assert got.shape == (6, 16) and emb.host_out.shape == (4, 16)   # sized from the engine's output
    finally:
        emb.close()
    ref = OnnxRuntimeEmbedder(onnx_path, providers=["CPUExecutionProvider"]).embed(images)
    assert np.min(np.sum(ref * got, axis=1)) >= ENGINE_BAR[precision]


def test_inference_from_another_thread_than_the_one_that_loaded(tiny_models, tmp_path):
    """The ROS node and the daemon load on the main thread and infer on a worker thread."""
    from mean_nav.deploy.images import synthetic_aerial_images

    result = _build_engine_module().build_engine(tiny_models["fp32"], out_dir=tmp_path, max_batch=4, verify=False)
    images = synthetic_aerial_images(5, TINY_SIZE, seed=4)
    emb = TensorRTEmbedder(result.engine)
    try:
        here = emb.embed(images)
        got, errors = {}, []

        def worker(key):
            try:
                got[key] = emb.embed(images)
            except Exception as exc:  # surfaced below with the thread's own message
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for key in got:
            np.testing.assert_allclose(got[key], here, atol=1e-5)
    finally:
        emb.close()


def test_rejected_timing_cache_is_replaced_not_fatal(tiny_models, tmp_path):
    cache = tmp_path / "damaged.timing_cache"
    cache.write_bytes(b"not a timing cache" * 8)
    result = _build_engine_module().build_engine(tiny_models["fp32"], out_dir=tmp_path, max_batch=2,
                                                 timing_cache=cache, verify=False)
    assert result.engine.is_file()
    assert cache.read_bytes() != b"not a timing cache" * 8 and cache.stat().st_size > 0


def test_stale_tampered_and_foreign_engines_are_refused(tiny_models, tmp_path):
    import shutil

    from mean_nav.deploy.backends import load_embedder, read_onnx_info

    src = tmp_path / "tiny.onnx"
    shutil.copyfile(tiny_models["fp32"], src)
    result = _build_engine_module().build_engine(src, out_dir=tmp_path, max_batch=2, verify=False)
    auto = load_embedder(src)          # the engine sits next to the ONNX: auto picks it
    assert auto.name == "tensorrt"
    auto.close()
    side = json.loads(result.sidecar.read_text())
    # re-export / re-quantize: the same model hash, another file -> the old engine is not used
    import onnx

    from mean_nav.deploy.export import set_metadata

    model = onnx.load(str(src))
    model.doc_string = "re-exported"
    set_metadata(model, read_onnx_info(src))
    onnx.save(model, str(src))
    assert load_embedder(src).name == "onnxruntime"
    with pytest.raises(MeanNavError, match="built from another ONNX"):
        TensorRTEmbedder(result.engine, source_onnx_sha256=sha256_file(src))
    # a sidecar from another device is refused
    data = dict(side, gpu_name="Some Other GPU")
    result.sidecar.write_text(json.dumps(data))
    with pytest.raises(MeanNavError, match="rebuild it on this device"):
        TensorRTEmbedder(result.engine)
    # a modified engine is refused
    result.sidecar.write_text(json.dumps(side))
    with open(result.engine, "ab") as f:
        f.write(b"\0")
    with pytest.raises(MeanNavError, match="checksum"):
        TensorRTEmbedder(result.engine)
