"""ONNX export of the MEAN deploy graph: metadata, agreement with PyTorch, input layouts, errors."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from mean_nav.cli import main as cli_main  # noqa: E402
from mean_nav.deploy.backends import OnnxRuntimeEmbedder, TorchEmbedder, read_onnx_info  # noqa: E402
from mean_nav.deploy.export import export_onnx  # noqa: E402
from mean_nav.errors import MeanNavError  # noqa: E402
from deploy_testing import sample_images  # noqa: E402
from mean_nav.model import ModelConfig, build_model  # noqa: E402
from mean_nav.model.checkpoint import deploy_hash, save_checkpoint  # noqa: E402

SIZE = 64


def _images(n=6):
    return sample_images(n, SIZE)


@pytest.fixture(scope="module")
def lite0():
    torch.set_num_threads(1)
    cfg = ModelConfig(backbone="efficientnet_lite0", img_size=SIZE, pretrained="package", num_classes=7)
    return build_model(cfg).eval(), cfg


@pytest.fixture(scope="module")
def exported(lite0, tmp_path_factory):
    model, cfg = lite0
    out = tmp_path_factory.mktemp("export") / "m.onnx"
    report = export_onnx(model, cfg, out, check_images=_images(), threads=1)
    return out, report


def test_export_records_model_identity_in_onnx_metadata(lite0, exported):
    model, cfg = lite0
    out, report = exported
    info = read_onnx_info(out)
    assert info.model_hash == deploy_hash(model)
    assert info.backbone == "efficientnet_lite0"
    assert info.embed_dim == model.embed_dim == model.backbone.num_features
    assert info.preprocessing.img_size == SIZE
    assert info.precision == "fp32" and info.input_layout == "float_nchw"
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["mean_nav.input"] == "float_nchw"
    assert report.min_cosine >= 0.9999


def test_onnxruntime_matches_pytorch_with_dynamic_batch(lite0, exported):
    model, cfg = lite0
    out, _ = exported
    images = _images(5)
    ref = TorchEmbedder(model, cfg).embed(images)
    emb = OnnxRuntimeEmbedder(out, threads=1)
    # batch sizes 1, 2 and 5 through the same session: the batch axis is dynamic
    for bs in (1, 2, 5):
        got = emb.embed(images, batch_size=bs)
        assert got.shape == (5, model.embed_dim)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        assert np.min(np.sum(ref * got, axis=1)) > 0.9999
    raw = emb.session.run(None, {emb.input_name: np.zeros((3, 3, SIZE, SIZE), np.float32)})[0]
    np.testing.assert_allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-5)  # the graph itself L2-normalises


def test_uint8_nhwc_graph_does_the_preprocessing_itself(lite0, exported, tmp_path):
    model, cfg = lite0
    f32, u8 = exported[0], tmp_path / "u.onnx"
    export_onnx(model, cfg, u8, input_layout="uint8_nhwc", check_images=_images(), threads=1)
    sess = ort.InferenceSession(str(u8), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    assert inp.type == "tensor(uint8)" and inp.shape[1:] == [SIZE, SIZE, 3]
    import onnx

    readers = [n.op_type for n in onnx.load(str(u8)).graph.node if inp.name in n.input]
    assert readers == ["Cast"]     # cast before the transpose: TensorRT transposes no UINT8 tensor
    images = _images(4)
    a = OnnxRuntimeEmbedder(f32, threads=1).embed(images)
    b = OnnxRuntimeEmbedder(u8, threads=1).embed(images)
    assert np.min(np.sum(a * b, axis=1)) > 0.99999


def test_export_failing_the_check_leaves_no_file(lite0, tmp_path):
    model, cfg = lite0
    out = tmp_path / "m.onnx"
    with pytest.raises(MeanNavError, match="disagrees with PyTorch"):
        export_onnx(model, cfg, out, check_images=_images(2), threads=1, min_cosine=1.5)
    assert list(tmp_path.iterdir()) == []


def test_export_cli_from_checkpoint_keeps_its_hash(lite0, tmp_path, capsys):
    model, cfg = lite0
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, model, cfg)
    out = tmp_path / "exported" / "m.onnx"
    assert cli_main(["export", str(ckpt), "-o", str(out), "--check-count", "3", "--threads", "1"]) == 0
    assert read_onnx_info(out).model_hash == deploy_hash(model)
    assert "cosine min" in capsys.readouterr().out


def test_export_cli_from_imagenet_without_checkpoint(tmp_path):
    out = tmp_path / "lite0.onnx"
    assert cli_main(["export", "--from-imagenet", "--backbone", "efficientnet_lite0", "--img-size", "32",
                     "-o", str(out), "--check-count", "2", "--threads", "1"]) == 0
    info = read_onnx_info(out)
    assert info.preprocessing.img_size == 32 and info.backbone == "efficientnet_lite0"


def test_export_cli_errors_are_one_line(tmp_path, capsys):
    assert cli_main(["export", str(tmp_path / "missing.pt")]) == 1
    assert "missing.pt: checkpoint not found" in capsys.readouterr().err
    assert cli_main(["export"]) == 1
    assert "either a checkpoint or --from-imagenet" in capsys.readouterr().err
    bad = tmp_path / "notimages"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"not a jpeg")
    assert cli_main(["export", "--from-imagenet", "--img-size", "32", "-o", str(tmp_path / "x.onnx"),
                     "--images", str(bad)]) == 1
    assert "cannot decode as an image" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_checkpoint_with_other_training_heads_exports_its_backbone(lite0, tmp_path):
    from mean_nav.deploy.export import deploy_model_from_checkpoint
    from mean_nav.model.checkpoint import load_checkpoint

    model, cfg = lite0
    ckpt_path = tmp_path / "old_heads.pt"
    save_checkpoint(ckpt_path, model, cfg)
    ckpt = load_checkpoint(ckpt_path)
    # a MEAN version whose heads had other parameter names: the deploy graph is unaffected
    ckpt["state_dict"] = {k.replace("heads.0.", "heads.0.renamed_"): v for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, ckpt_path)
    loaded, _ = deploy_model_from_checkpoint(ckpt_path)
    assert deploy_hash(loaded) == deploy_hash(model)
    # a damaged backbone is still refused: its weights no longer give the stored deploy hash
    key = next(k for k in ckpt["state_dict"] if k.startswith("backbone.") and k.endswith("weight"))
    ckpt["state_dict"][key] = ckpt["state_dict"][key] + 1.0
    torch.save(ckpt, ckpt_path)
    with pytest.raises(MeanNavError, match="deploy_hash"):
        deploy_model_from_checkpoint(ckpt_path)


def test_same_padding_pads_are_folded_into_the_convolutions(exported):
    """EfficientNet's TF-style SAME padding must not reach onnxruntime as separate Pads
    (they break its NCHWc chain): the exported graph has none, and the stride-2 Convs
    carry the asymmetric pads themselves."""
    path, _ = exported
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert "Pad" not in ops and "ConstantOfShape" not in ops
    asymmetric = [n for n in graph.node if n.op_type == "Conv"
                  for a in n.attribute if a.name == "pads" and list(a.ints[:2]) != list(a.ints[2:])]
    assert len(asymmetric) == 5  # stem + the 4 stride-2 depthwise convolutions of Lite0


def test_fold_pad_into_conv_keeps_the_result_and_skips_what_it_cannot_fold(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    from mean_nav.deploy.export import fold_pad_into_conv

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    zero_pads = numpy_helper.from_array(np.array([0, 0, 0, 1, 0, 0, 2, 1], np.int64), "p")
    channel_pads = numpy_helper.from_array(np.array([0, 1, 0, 0, 0, 0, 0, 0], np.int64), "pc")
    nodes = [
        helper.make_node("Pad", ["x", "p"], ["xp"]),
        helper.make_node("Conv", ["xp", "w"], ["y"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Pad", ["x", "pc"], ["xc"]),  # pads a channel: must stay a Pad
        helper.make_node("ReduceSum", ["xc"], ["z"], keepdims=0),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 9, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
                              initializer=[w, zero_pads, channel_pads])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = rng.standard_normal((1, 3, 9, 10)).astype(np.float32)
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})

    assert fold_pad_into_conv(model) == 1
    conv = [n for n in model.graph.node if n.op_type == "Conv"][0]
    assert [list(a.ints) for a in conv.attribute if a.name == "pads"] == [[1, 2, 3, 2]]
    assert [n.op_type for n in model.graph.node].count("Pad") == 1
    assert {t.name for t in model.graph.initializer} == {"w", "pc"}
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(after[0], before[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(after[1], before[1])


def test_fold_pad_into_conv_leaves_pads_over_chosen_axes_alone():
    from onnx import TensorProto, helper, numpy_helper

    from mean_nav.deploy.export import fold_pad_into_conv

    w = numpy_helper.from_array(np.ones((2, 3, 3, 3), np.float32), "w")
    # two entries per listed axis, not per tensor axis: read as NCHW pads they would wipe the Conv's own
    pads = numpy_helper.from_array(np.array([0, 0, 0, 0], np.int64), "p")
    axes = numpy_helper.from_array(np.array([2, 3], np.int64), "axes")
    nodes = [helper.make_node("Pad", ["x", "p", "", "axes"], ["xp"]),
             helper.make_node("Conv", ["xp", "w"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=[w, pads, axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    assert fold_pad_into_conv(model) == 0
    assert [n.op_type for n in model.graph.node] == ["Pad", "Conv"]
    assert [list(a.ints) for a in model.graph.node[1].attribute if a.name == "pads"] == [[1, 1, 1, 1]]
