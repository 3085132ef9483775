"""`mean-nav quantize`: Q/DQ INT8 in TensorRT form, CPU INT8 choice, FP16, reports, errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
from onnx import numpy_helper  # noqa: E402

from mean_nav.cli import main as cli_main  # noqa: E402
from mean_nav.deploy.backends import OnnxRuntimeEmbedder, read_onnx_info  # noqa: E402
from mean_nav.deploy.images import load_images, synthetic_aerial_images  # noqa: E402
from mean_nav.deploy.quantize import explicit_quantization_problems, quantize_model  # noqa: E402
from mean_nav.errors import MeanNavError  # noqa: E402
from deploy_testing import sample_images, tiny_deploy_onnx  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MAP = DATA / "orthophotos" / "test_tiled.tif"
SIZE = 64
# A 64 px ImageNet Lite0 whose LayerNorm'd descriptor moves to cosine ~0.96 under +-1 grey
# level of input noise: quantization error is large relative to that, so these tests pin
# the structure and bookkeeping, and accuracy bars that this model can meet.
TEST_MIN_COSINE = 0.2


def _calibration(n=8):
    return sample_images(n, SIZE)


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory):
    from mean_nav.deploy.export import export_onnx
    from mean_nav.model import ModelConfig, build_model

    torch.set_num_threads(1)
    cfg = ModelConfig(backbone="efficientnet_lite0", img_size=SIZE, pretrained="package", num_classes=5)
    out = tmp_path_factory.mktemp("q") / "lite0.onnx"
    export_onnx(build_model(cfg).eval(), cfg, out, check_images=synthetic_aerial_images(2, SIZE), threads=1)
    return out


@pytest.fixture(scope="module")
def quantized(fp32_onnx):
    check = synthetic_aerial_images(6, SIZE, seed=99)
    report = quantize_model(fp32_onnx, _calibration(), check, threads=1, latency_repeats=2,
                            min_cosine=TEST_MIN_COSINE, cpu_candidates=["dynamic-matmul", "static-u8s8"])
    return fp32_onnx, report


def test_all_variants_written_with_the_fp32_identity(quantized):
    src, report = quantized
    base = read_onnx_info(src)
    files = {v.precision: Path(v.path) for v in report.variants}
    assert set(files) == {"int8-qdq", "int8-cpu", "fp16"}
    for precision, path in files.items():
        assert path.parent == src.parent and path.name == f"lite0.{precision}.onnx"
        info = read_onnx_info(path)
        assert info.precision == precision
        assert (info.model_hash, info.embed_dim, info.preprocessing) == (base.model_hash, base.embed_dim,
                                                                         base.preprocessing)
    saved = json.loads((src.parent / "lite0.quantize.json").read_text())
    assert saved["model_hash"] == base.model_hash and len(saved["variants"]) == 3
    # no temp folders or candidates left behind
    assert sorted(p.name for p in src.parent.iterdir()) == sorted(
        ["lite0.onnx", "lite0.quantize.json"] + [f"lite0.{p}.onnx" for p in files])


def test_qdq_variant_is_in_tensorrt_explicit_quantization_form(quantized):
    src, report = quantized
    path = next(Path(v.path) for v in report.variants if v.precision == "int8-qdq")
    model = onnx.load(str(path))
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    q_nodes = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert q_nodes, "no QuantizeLinear nodes"
    for q in q_nodes:  # symmetric signed int8 activations: zero point 0 of type int8
        zp = init[q.input[2]]
        assert zp.dtype == np.int8 and not zp.any()
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    kept = set(report.kept_float)
    assert len(kept) == 2 and kept <= {n.name for n in convs}   # first and last Conv stay float
    for conv in convs:
        if conv.name in kept:
            assert conv.input[1] in init and init[conv.input[1]].dtype == np.float32
            continue
        # every other Conv reads dequantized activations and per-channel int8 weights
        x_dq, w_dq = producers[conv.input[0]], producers[conv.input[1]]
        assert x_dq.op_type == w_dq.op_type == "DequantizeLinear"
        weight, w_scale = init[w_dq.input[0]], init[w_dq.input[1]]
        assert weight.dtype == np.int8
        assert w_scale.size == weight.shape[0]       # one scale per output channel
        assert not _axis(w_dq)                       # ... along the output-channel axis
        if len(conv.input) > 2:                      # TensorRT dequantizes INT8 only: biases stay float
            assert init[conv.input[2]].dtype == np.float32
    _assert_tensorrt_explicit_quantization(model)
    assert explicit_quantization_problems(model) == []


def _axis(node) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 1)


def _assert_tensorrt_explicit_quantization(model):
    """TensorRT's Q/DQ rules, read straight from the ONNX (independent of the module's own checker)."""
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 13
    assert not [n for n in model.graph.node if n.op_type.startswith("QLinear") or n.op_type.endswith("Integer")]
    dq_nodes = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert dq_nodes
    for node in dq_nodes + [n for n in model.graph.node if n.op_type == "QuantizeLinear"]:
        zero_point, scale = init[node.input[2]], init[node.input[1]]
        assert zero_point.dtype == np.int8 and not zero_point.any(), node.name
        assert np.all(scale > 0), node.name
    for dq in dq_nodes:
        source = dq.input[0]
        if source in init:                           # a weight: int8, symmetric per channel
            q = init[source]
            assert q.dtype == np.int8, f"{dq.name} dequantizes {q.dtype}"
            if init[dq.input[1]].size > 1:
                assert q.min() >= -127 and np.abs(q.astype(int)).max() == 127, dq.name
        else:
            assert producers[source].op_type == "QuantizeLinear", dq.name


def test_qdq_per_channel_axes_and_float_biases_on_conv_gemm_and_matmul(tmp_path):
    """Every weight kind: Conv [Cout,..] axis 0, Gemm transB [N,K] axis 0, MatMul [K,N] axis 1."""
    from mean_nav.deploy.quantize import build_int8_qdq, preprocess_for_quantization

    src = tiny_deploy_onnx(tmp_path / "tiny.onnx", size=32)
    prepared = tmp_path / "prepared.onnx"
    preprocess_for_quantization(src, prepared)
    out = tmp_path / "tiny.int8-qdq.onnx"
    build_int8_qdq(prepared, out, load_images(None, 8, 32), read_onnx_info(src))
    model = onnx.load(str(out))
    _assert_tensorrt_explicit_quantization(model)
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    nodes = {n.name: n for n in model.graph.node}
    for name, axis, channels in (("conv1", 0, 8), ("conv2", 0, 16), ("fc", 0, 16), ("proj", 1, 16)):
        w_dq = producers[nodes[name].input[1]]
        assert w_dq.op_type == "DequantizeLinear" and _axis(w_dq) == axis, name
        assert init[w_dq.input[1]].size == channels, name
        if len(nodes[name].input) > 2:
            assert nodes[name].input[2] in init and init[nodes[name].input[2]].dtype == np.float32, name


def test_rule_check_catches_onnxruntime_default_int32_biases(tmp_path):
    """onnxruntime's default QDQ output (INT32 bias behind a DequantizeLinear) is what TensorRT
    cannot parse: the check must name it."""
    from onnxruntime.quantization import QuantFormat, QuantType

    from mean_nav.deploy.quantize import _quantize_static, preprocess_for_quantization

    src = tiny_deploy_onnx(tmp_path / "tiny.onnx", size=32)
    prepared = tmp_path / "prepared.onnx"
    preprocess_for_quantization(src, prepared)
    out = tmp_path / "default.onnx"
    _quantize_static(prepared, out, load_images(None, 4, 32), read_onnx_info(src), "minmax", None,
                     quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv", "Gemm"], per_channel=True,
                     activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                     extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    problems = explicit_quantization_problems(out)
    assert any("conv1: bias c1.b is quantized" in p for p in problems)
    assert any("dequantizes int32" in p for p in problems)


def test_fp16_variant_keeps_float32_io_and_layernorm(quantized):
    src, report = quantized
    v = next(v for v in report.variants if v.precision == "fp16")
    model = onnx.load(v.path)
    io_types = {t.type.tensor_type.elem_type for t in list(model.graph.input) + list(model.graph.output)}
    assert io_types == {onnx.TensorProto.FLOAT}
    weights = [t for t in model.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT)]
    conv_w = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    assert all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights if t.name in conv_w)
    ln = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    ln_w = {t.name: t.data_type for t in model.graph.initializer}
    assert ln and all(ln_w[n.input[1]] == onnx.TensorProto.FLOAT for n in ln)
    assert v.cosine_min > 0.999   # float16 is nearly lossless even for this sensitive descriptor


def test_cpu_variant_is_the_fastest_candidate_that_meets_the_bar(quantized):
    _, report = quantized
    ran = [c for c in report.cpu_candidates if np.isfinite(c.latency_ms)]
    ok = [c for c in ran if c.cosine_min >= TEST_MIN_COSINE]
    assert report.cpu_choice == min(ok, key=lambda c: c.latency_ms).name
    skipped = [c for c in report.cpu_candidates if c.name == "dynamic-matmul"]
    assert skipped and "no MatMul" in skipped[0].note   # Lite0 is all convolutions
    cpu = next(v for v in report.variants if v.precision == "int8-cpu")
    model = onnx.load(cpu.path)
    assert any(n.op_type in ("QLinearConv", "ConvInteger") for n in model.graph.node)
    assert "int8-cpu" in report.table() and report.cpu_choice in report.table()


def test_int8_descriptors_still_follow_fp32(quantized):
    src, report = quantized
    images = load_images(MAP, 6, SIZE, seed=11) if MAP.is_file() else synthetic_aerial_images(6, SIZE, seed=11)
    ref = OnnxRuntimeEmbedder(src, threads=1).embed(images)
    for v in report.variants:
        emb = OnnxRuntimeEmbedder(v.path, threads=1)
        # float graphs run one image per call on CPU, quantized ones the whole batch
        assert emb.run_batch == (1 if v.precision == "fp16" else None), v.precision
        got = emb.embed(images)
        same = np.sum(ref * got, axis=1)
        others = ref @ got.T
        # each quantized descriptor is closer to its own image's FP32 descriptor than to any other's
        assert np.all(same >= others.max(axis=1) - 1e-6), v.precision


def test_drifting_variant_is_an_error_and_writes_nothing(fp32_onnx, tmp_path):
    with pytest.raises(MeanNavError, match="drifts from FP32"):
        quantize_model(fp32_onnx, _calibration(2), synthetic_aerial_images(2, SIZE), out_dir=tmp_path,
                       threads=1, latency_repeats=1, variants=("fp16",), min_cosine=1.01)
    assert list(tmp_path.iterdir()) == []


def test_variant_losing_too_much_r1_is_an_error_and_writes_nothing(fp32_onnx, tmp_path):
    from mean_nav.deploy.images import RetrievalSet

    gallery = sample_images(6, SIZE)
    rng = np.random.default_rng(3)
    queries = [np.clip(g.astype(int) + rng.integers(-20, 21, g.shape), 0, 255).astype(np.uint8) for g in gallery]
    labels = np.arange(6)
    eval_set = RetrievalSet(queries, labels, gallery, labels, "6 noisy copies")
    # the bar (gain at least 200 R@1 points) is one no variant can meet: the R@1 check alone fails it
    with pytest.raises(MeanNavError, match=r"drifts from FP32 \(R@1 .* points, more than -200.0 lost"):
        quantize_model(fp32_onnx, _calibration(2), gallery, out_dir=tmp_path, eval_set=eval_set, threads=1,
                       latency_repeats=1, variants=("int8-qdq",), min_cosine=TEST_MIN_COSINE, keep_float=0,
                       max_r1_drop=-200.0)
    assert list(tmp_path.iterdir()) == []
    # the same run under a loose bar goes through and reports the change
    report = quantize_model(fp32_onnx, _calibration(2), gallery, out_dir=tmp_path, eval_set=eval_set, threads=1,
                            latency_repeats=1, variants=("int8-qdq",), min_cosine=TEST_MIN_COSINE, keep_float=0,
                            max_r1_drop=100.0)
    (qdq,) = report.variants
    assert "dR@1" in qdq.retrieval and Path(qdq.path).is_file()


def test_bad_inputs_are_clear_errors(fp32_onnx, tmp_path, capsys):
    with pytest.raises(MeanNavError, match="calibration set is empty"):
        quantize_model(fp32_onnx, [], synthetic_aerial_images(2, SIZE), out_dir=tmp_path)
    # FP16 alone needs no calibration
    fp16_only = quantize_model(fp32_onnx, [], synthetic_aerial_images(2, SIZE), out_dir=tmp_path / "fp16",
                               threads=1, latency_repeats=1, variants=("fp16",))
    assert [v.precision for v in fp16_only.variants] == ["fp16"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(["quantize", str(fp32_onnx), "--calibration", str(empty)]) == 1
    assert "folder has no images" in capsys.readouterr().err
    fp16 = fp32_onnx.parent / "lite0.fp16.onnx"
    if fp16.is_file():
        assert cli_main(["quantize", str(fp16), "-o", str(tmp_path)]) == 1
        assert "already fp16" in capsys.readouterr().err
    plain = tmp_path / "plain.onnx"
    plain.write_bytes(onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [])).SerializeToString())
    assert cli_main(["quantize", str(plain)]) == 1
    assert "not a MEAN deploy graph" in capsys.readouterr().err


def test_calibration_ranges_cover_every_batch(fp32_onnx, tmp_path):
    """The extreme image sits in the first of 8 calibration batches: its range must survive."""
    from mean_nav.deploy.deploy_info import prepare_input
    from mean_nav.deploy.embedder import to_batch_uint8
    from mean_nav.deploy.quantize import build_int8_qdq, preprocess_for_quantization

    info = read_onnx_info(fp32_onnx)
    calibration = [np.full((SIZE, SIZE, 3), 255, np.uint8)] + synthetic_aerial_images(31, SIZE, seed=4)
    prepared, out = tmp_path / "prepared.onnx", tmp_path / "q.onnx"
    preprocess_for_quantization(fp32_onnx, prepared)
    build_int8_qdq(prepared, out, calibration, info, calibrate_method="minmax", exclude=[])
    model = onnx.load(str(out))
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    # the stem's SAME padding (a Pad of the input) is what gets quantized first: same range as the input
    stem_in = {"input"} | {n.output[0] for n in model.graph.node if n.op_type == "Pad" and n.input[0] == "input"}
    (q_input,) = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in stem_in]
    expected = np.abs(prepare_input(to_batch_uint8(calibration, SIZE), info)).max() / 127
    assert float(init[q_input.input[1]]) == pytest.approx(expected, rel=1e-4)


def _outlier_graph(path: Path) -> Path:
    """Five small convs; c2 emits one channel ~1000x larger than the rest, so the per-tensor
    INT8 scale of c3's input wipes out c3's other input channels: c3 is the sensitive layer."""
    from onnx import TensorProto, helper

    from mean_nav.deploy.deploy_info import DeployInfo
    from mean_nav.deploy.embedder import Preprocessing
    from mean_nav.deploy.export import set_metadata

    rng = np.random.default_rng(0)
    shapes = {"c1": (8, 3, 3, 3), "c2": (8, 8, 1, 1), "c3": (8, 8, 3, 3), "c4": (8, 8, 1, 1), "c5": (4, 8, 1, 1)}
    inits, nodes, prev = [], [], "input"
    for name, shape in shapes.items():
        w = rng.normal(0, 0.3, shape).astype(np.float32)
        b = np.zeros(shape[0], np.float32)
        if name == "c2":
            b[0] = 1000.0
        inits += [numpy_helper.from_array(w, f"{name}.w"), numpy_helper.from_array(b, f"{name}.b")]
        pad = shape[-1] // 2
        nodes.append(helper.make_node("Conv", [prev, f"{name}.w", f"{name}.b"], [f"{name}.y"], name=name,
                                      pads=[pad] * 4))
        prev = f"{name}.y"
    nodes += [helper.make_node("GlobalAveragePool", [prev], ["gap"]), helper.make_node("Flatten", ["gap"], ["descriptor"])]
    graph = helper.make_graph(nodes, "outlier", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 16, 16])],
                              [helper.make_tensor_value_info("descriptor", TensorProto.FLOAT, ["batch", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    set_metadata(model, DeployInfo("0" * 16, "test", 4, Preprocessing(img_size=16)))
    onnx.save(model, str(path))
    return path


def test_keep_float_leaves_the_most_sensitive_layer_unquantized(tmp_path):
    src = _outlier_graph(tmp_path / "outlier.onnx")
    check = synthetic_aerial_images(6, 16, seed=8)
    report = quantize_model(src, synthetic_aerial_images(8, 16, seed=1), check, out_dir=tmp_path, threads=1,
                            latency_repeats=1, variants=("int8-qdq",), min_cosine=0.0, keep_float=1,
                            keep_first_last=False, calibrate_method="minmax")
    cosines = [c for _, c in report.sensitivity]
    assert [n for n, _ in report.sensitivity][0] == "c3" and len(cosines) == 5
    assert cosines == sorted(cosines) and cosines[0] < cosines[-1]
    assert report.kept_float == ["c3"]
    model = onnx.load(report.variants[0].path)
    init = {t.name for t in model.graph.initializer}
    for conv in (n for n in model.graph.node if n.op_type == "Conv"):
        assert (conv.input[1] in init) == (conv.name == "c3")   # only c3 reads its float weight directly


def test_cpu_variant_chains_int8_through_relu6(quantized):
    """ReLU6 folds into the u8 output ranges: no Dequantize -> float Clip -> Quantize round trips
    between quantized layers (they made Lite0's CPU INT8 slower than FP32)."""
    _, report = quantized
    cpu = next(v for v in report.variants if v.precision == "int8-cpu")
    model = onnx.load(cpu.path)
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    clips = [n for n in model.graph.node if n.op_type == "Clip"]
    qlinear = [n for n in model.graph.node if n.op_type == "QLinearConv"]
    assert len(qlinear) > 40
    assert not [c for c in clips if producers.get(c.input[0]) == "DequantizeLinear"]


def test_auto_keep_float_adds_sensitive_layers_until_the_bar_is_met(tmp_path):
    src = _outlier_graph(tmp_path / "outlier.onnx")
    check = synthetic_aerial_images(6, 16, seed=8)
    calibration = synthetic_aerial_images(8, 16, seed=1)
    kwargs = dict(threads=1, latency_repeats=1, variants=("int8-qdq",), keep_first_last=False,
                  calibrate_method="minmax")
    plain = quantize_model(src, calibration, check, out_dir=tmp_path / "plain", min_cosine=0.0, keep_float=0, **kwargs)
    bar = plain.variants[0].cosine_min + 0.5 * (1 - plain.variants[0].cosine_min)  # halfway to perfect
    with pytest.raises(MeanNavError, match="drifts from FP32"):
        quantize_model(src, calibration, check, out_dir=tmp_path / "none", min_cosine=bar, keep_float=0, **kwargs)
    report = quantize_model(src, calibration, check, out_dir=tmp_path / "auto", min_cosine=bar, **kwargs)
    variant = report.variants[0]
    assert variant.cosine_min >= bar
    assert variant.kept_float[0] == "c3" == report.sensitivity[0][0]
    assert "int8-qdq keeps" in report.table()


def test_layers_kept_float_stay_float_when_onnxruntime_runs_them(fp32_onnx, tmp_path):
    """onnxruntime would quantize a float Conv that reads a DequantizeLinear on its own, per
    tensor (WeightBiasQuantization); our sessions must run the graph as written."""
    import onnxruntime as ort

    from mean_nav.deploy.deploy_info import prepare_input
    from mean_nav.deploy.embedder import to_batch_uint8
    from mean_nav.deploy.quantize import _stamp, _with_their_activations, build_int8_qdq, preprocess_for_quantization

    info = read_onnx_info(fp32_onnx)
    prepared, path = tmp_path / "prepared.onnx", tmp_path / "q.onnx"
    preprocess_for_quantization(fp32_onnx, prepared)
    depthwise = [n.name for n in onnx.load(str(prepared)).graph.node if n.name.endswith("dw_conv/Conv")]
    kept = _with_their_activations(prepared, depthwise[1:4])
    build_int8_qdq(prepared, path, _calibration(), info, "minmax", exclude=kept)
    _stamp(path, info.replace(precision="int8-qdq"))
    images = synthetic_aerial_images(4, SIZE, seed=3)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    x = prepare_input(to_batch_uint8(images, SIZE), info)
    as_written = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    naive = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    got = OnnxRuntimeEmbedder(path, threads=1).embed(images)
    # integer kernels round differently from the float Q/DQ simulation; re-quantized float
    # layers are a far larger error (measured: 0.004 vs 0.024)
    assert np.abs(got - as_written).max() < 0.3 * np.abs(naive - as_written).max()


def test_a_narrow_tensor_in_the_calibration_is_a_clear_error(tmp_path, capsys):
    """Old exports normalised with a Clip of the per-image norm, which onnxruntime's percentile
    calibrator cannot histogram: one clear error naming the file, nothing written."""
    from onnx import helper

    src = _outlier_graph(tmp_path / "old.onnx")
    model = onnx.load(str(src))
    graph = model.graph
    graph.node[-1].output[0] = "flat"
    graph.initializer.extend([numpy_helper.from_array(np.array(1e-12, np.float32), "eps"),
                              numpy_helper.from_array(np.ones(4, np.float32), "ln_scale")])
    # as MEAN's descriptor: LayerNorm, so every image's norm is ~sqrt(dim)
    graph.node.extend([helper.make_node("LayerNormalization", ["flat", "ln_scale"], ["ln"], axis=-1),
                       helper.make_node("ReduceL2", ["ln"], ["norm"], axes=[1], keepdims=1),
                       helper.make_node("Clip", ["norm", "eps"], ["norm_c"]),
                       helper.make_node("Div", ["ln", "norm_c"], ["descriptor"])])
    onnx.save(model, str(src))
    out = tmp_path / "out"
    assert cli_main(["quantize", str(src), "-o", str(out), "--variants", "int8-qdq", "--calibration-count", "4",
                     "--check-count", "2", "--threads", "1"]) == 1
    err = capsys.readouterr().err
    assert f"{src}: onnxruntime's percentile calibration cannot histogram" in err and "re-export" in err
    assert list(out.iterdir()) == []
