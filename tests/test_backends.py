"""Backends behind one Embedder, load_embedder's choices, image sets, and `mean-nav bench backends`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mean_nav.cli import main as cli_main
from mean_nav.deploy.backends import OnnxRuntimeEmbedder, load_embedder, read_onnx_info
from mean_nav.deploy.images import (geotiff_pairs, load_images, read_list_file, retrieval_metrics,
                                    synthetic_aerial_images)
from mean_nav.errors import MeanNavError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MAP = DATA / "orthophotos" / "test_tiled.tif"
SIZE = 64


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """A tiny Lite0 checkpoint and its FP32 ONNX export."""
    torch = pytest.importorskip("torch")
    from mean_nav.deploy.export import export_onnx
    from mean_nav.model import ModelConfig, build_model
    from mean_nav.model.checkpoint import save_checkpoint

    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("models")
    cfg = ModelConfig(backbone="efficientnet_lite0", img_size=SIZE, pretrained="package", num_classes=5)
    model = build_model(cfg).eval()
    save_checkpoint(d / "m.pt", model, cfg)
    export_onnx(model, cfg, d / "m.onnx", check_images=synthetic_aerial_images(2, SIZE), threads=1)
    return d / "m.pt", d / "m.onnx"


def _plain_onnx(path: Path) -> Path:
    """A valid ONNX that is not a MEAN export (no mean_nav metadata)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), str(path))
    return path


def test_torch_and_onnxruntime_backends_give_the_same_descriptors(model_files):
    ckpt, onnx_path = model_files
    images = synthetic_aerial_images(3, 80, seed=5) + [np.full((30, 50, 3), 90, np.uint8)]  # sizes differ
    t = load_embedder(ckpt)
    o = load_embedder(onnx_path, threads=1)
    assert (t.name, o.name) == ("torch", "onnxruntime")
    assert t.model_hash == o.model_hash and t.dim == o.dim == t.module.backbone.num_features
    assert t.preprocessing == o.preprocessing
    a, b = t.embed(images), o.embed(images)
    assert a.shape == b.shape == (4, t.dim) and a.dtype == b.dtype == np.float32
    assert np.min(np.sum(a * b, axis=1)) > 0.9999
    assert o.embed([]).shape == (0, o.dim)
    assert o.run_batch == 1                  # a float graph on onnxruntime's CPU kernels: one image per call
    o.run_batch = None
    np.testing.assert_allclose(o.embed(images), b, atol=1e-5)    # the whole batch in one call: the same


def test_runtime_backends_do_not_import_torch(model_files):
    _, onnx_path = model_files
    code = (
        "import sys, numpy as np\n"
        "from mean_nav.deploy.backends import load_embedder\n"
        "import mean_nav.deploy.tensorrt_backend\n"
        f"e = load_embedder({str(onnx_path)!r}, threads=1)\n"
        f"d = e.embed([np.zeros(({SIZE}, {SIZE}, 3), np.uint8)])\n"
        "assert d.shape == (1, e.dim) and abs(float((d * d).sum()) - 1) < 1e-5\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_onnx_without_mean_nav_metadata_is_refused(tmp_path):
    plain = _plain_onnx(tmp_path / "plain.onnx")
    with pytest.raises(MeanNavError, match="not a MEAN deploy graph"):
        load_embedder(plain)
    with pytest.raises(MeanNavError, match="not a MEAN deploy graph"):
        read_onnx_info(plain)


def test_load_embedder_rejects_bad_paths_and_backends(model_files, tmp_path):
    ckpt, onnx_path = model_files
    with pytest.raises(MeanNavError, match="not found"):
        load_embedder(tmp_path / "nope.onnx")
    weird = tmp_path / "m.bin"
    weird.write_bytes(b"x")
    with pytest.raises(MeanNavError, match="unknown model file type"):
        load_embedder(weird)
    with pytest.raises(MeanNavError, match="needs the training checkpoint"):
        load_embedder(onnx_path, backend="torch")
    with pytest.raises(MeanNavError, match="runs on the torch backend"):
        load_embedder(ckpt, backend="onnxruntime")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07garbage")
    with pytest.raises(MeanNavError):
        load_embedder(broken)


def test_auto_backend_falls_back_to_onnxruntime_without_tensorrt(model_files):
    from mean_nav.deploy.tensorrt_backend import runtime_unavailable_reason

    reason = runtime_unavailable_reason()
    if reason is None:
        pytest.skip("TensorRT and a CUDA device are present: the fallback is not exercised here")
    _, onnx_path = model_files
    assert isinstance(load_embedder(onnx_path, backend="auto"), OnnxRuntimeEmbedder)
    with pytest.raises(MeanNavError, match="no usable TensorRT engine"):
        load_embedder(onnx_path, backend="tensorrt")


# ----------------------------------------------------------------------------- image sets


def test_image_sources_folder_list_file_and_errors(tmp_path):
    import cv2

    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    cv2.imwrite(str(folder / "a.png"), np.zeros((10, 12, 3), np.uint8))
    cv2.imwrite(str(folder / "sub" / "b.jpg"), np.full((8, 8, 3), 200, np.uint8))
    imgs = load_images(folder, None, 32)
    assert [i.shape for i in imgs] == [(10, 12, 3), (8, 8, 3)]
    lst = tmp_path / "calib.txt"
    lst.write_text("# comment\nimgs/sub/b.jpg\n\nimgs/a.png  # trailing comment\n")
    assert [p.name for p in read_list_file(lst)] == ["b.jpg", "a.png"]
    lst.write_text("imgs/a.png\nimgs/missing.png\n")
    with pytest.raises(MeanNavError, match=r"calib.txt:2: listed image 'imgs/missing.png' not found"):
        load_images(lst, None, 32)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MeanNavError, match="folder has no images"):
        load_images(empty, None, 32)
    (folder / "bad.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(MeanNavError, match="bad.png: cannot decode"):
        load_images(folder, None, 32)


def test_geotiff_tiles_and_pairs_come_from_the_surveyed_footprint():
    if not MAP.is_file():
        pytest.skip(f"shared data absent: {MAP}")
    tiles = load_images(MAP, 5, 64, seed=3)
    assert len(tiles) == 5 and all(t.shape == (64, 64, 3) for t in tiles)
    assert all(t.std() > 3 for t in tiles)  # real texture, not nodata
    manila = DATA / "orthophotos" / "5b90f92da0d7280005fab355_4310.tif"
    pairs = geotiff_pairs(manila, 8, 64, seed=1)
    # the Manila map is partly black nodata: no query or gallery tile may come from there
    assert all((g.reshape(-1, 3).max(axis=1) > 0).mean() > 0.99 for g in pairs.gallery)
    assert len(pairs.queries) == len(pairs.gallery) == 8


def test_retrieval_metrics_follow_the_university1652_convention():
    q = np.eye(3, dtype=np.float32)
    g = np.eye(3, dtype=np.float32)[[1, 0, 2]]     # gallery 0 is class 1, gallery 1 is class 0
    m = retrieval_metrics(q, np.array([0, 1, 2]), g, np.array([1, 0, 2]))
    assert m["R@1"] == 100.0 and m["AP"] == 100.0
    # the match at 0-based rank 1: P_1 = 1/2, P_old = (1-1)/1 = 0, AP = (0 + 1/2)/2 = 0.25, R@1 = 0
    g2 = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]], np.float32)
    q2 = np.array([[0.6, 0.8, 0]], np.float32)
    m2 = retrieval_metrics(q2, np.array([0]), g2, np.array([1, 0, 2]))
    assert m2["R@1"] == 0.0 and m2["AP"] == pytest.approx(25.0)


# ----------------------------------------------------------------------------- bench


def test_mac_count_of_a_known_graph(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from mean_nav.bench.backends import onnx_macs_per_image

    w = numpy_helper.from_array(np.zeros((8, 3, 3, 3), np.float32), "w")      # conv 3->8, k3, pad 1
    dw = numpy_helper.from_array(np.zeros((8, 1, 3, 3), np.float32), "dw")    # depthwise 8, k3, stride 2
    m = numpy_helper.from_array(np.zeros((8, 5), np.float32), "m")            # matmul 8->5
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c", "dw"], ["d"], group=8, strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["d"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("MatMul", ["f", "m"], ["y"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=[w, dw, m])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), str(path))
    expected = 8 * 16 * 16 * 27 + 8 * 8 * 8 * 9 + 5 * 8
    assert onnx_macs_per_image(path) == expected


def test_bench_backends_cli_writes_json_with_efficiency(model_files, tmp_path, capsys):
    _, onnx_path = model_files
    out = tmp_path / "bench.json"
    assert cli_main(["bench", "backends", str(onnx_path), "--batch", "2", "--repeats", "3", "--threads", "1",
                     "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    (r,) = data["results"]
    assert r["backend"] == "onnxruntime" and r["precision"] == "fp32"
    assert 0 < r["latency_ms_p50"] <= r["latency_ms_p95"]
    assert r["images_per_s"] > 0
    assert r["macs_per_image"] > 1e7                 # Lite0 at 64 px is ~31 MMAC
    assert 0 < r["gemm_fraction_batchN"] < 5 and 0 < r["gemm_fraction_batchN_cpu_time"] < 5
    assert data["gemm"]["best_macs_per_s"] > 1e8
    # the fractions are the network alone (net times), latency and images/s end to end
    assert r["gemm_fraction_batch1"] == pytest.approx(
        r["macs_per_image"] / (r["net_latency_ms_best"] / 1000) / data["gemm"]["best_macs_per_s"])
    assert r["gemm_fraction_batchN"] == pytest.approx(
        r["macs_per_image"] * 2 / r["net_batch_s_best"] / data["gemm"]["best_macs_per_s"])
    assert data["memory"]["malloc_huge_pages"] == ("glibc.malloc.hugetlb" in os.environ.get("GLIBC_TUNABLES", ""))
    assert "GEMM" in capsys.readouterr().out


MEAN_NAV_SCRIPT = Path(sys.executable).parent / "mean-nav"


@pytest.mark.skipif(not MEAN_NAV_SCRIPT.exists(), reason="the mean-nav console script is not installed beside python")
def test_mean_nav_command_benchmarks_on_huge_pages_where_the_machine_has_them(model_files, tmp_path):
    import platform

    from mean_nav.huge_pages import environment_with_huge_pages, thp_mode

    _, onnx_path = model_files
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    subprocess.run([str(MEAN_NAV_SCRIPT), "bench", "backends", str(onnx_path),
                    "--batch", "1", "--repeats", "1", "--threads", "1", "--json", str(out)],
                   env=env, check=True, capture_output=True)
    applies = sys.platform == "linux" and environment_with_huge_pages(env, platform.libc_ver(), thp_mode()) is not None
    assert json.loads(out.read_text())["memory"] == {"malloc_huge_pages": applies, "thp_mode": thp_mode()}


def test_bench_siblings_are_found_next_to_the_fp32_onnx(tmp_path):
    from mean_nav.bench.backends import expand_models

    base = tmp_path / "m.onnx"
    for name in ("m.onnx", "m.int8-cpu.onnx", "m.fp16.onnx", "other.int8-qdq.onnx"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in expand_models([str(base)], siblings=True)] == ["m.onnx", "m.int8-cpu.onnx", "m.fp16.onnx"]
    assert [p.name for p in expand_models([str(base)], siblings=False)] == ["m.onnx"]
    with pytest.raises(MeanNavError, match="not found"):
        expand_models([str(tmp_path / "x.onnx")], siblings=True)


def test_synthetic_training_config_gives_held_out_pairs_and_calibration_images(tmp_path):
    if not MAP.is_file():
        pytest.skip(f"shared data absent: {MAP}")
    from mean_nav.deploy.images import load_retrieval_set

    cfg = tmp_path / "train.yaml"
    cfg.write_text(
        "data:\n  kind: synthetic\n  synthetic:\n"
        f"    maps: [{MAP}]\n    holdout_maps: [{MAP.name}]\n"
        "    tile_m: 60.0\n    stride_m: 60.0\n    holdout_stride_m: 90.0\n"
        "    view_px: 64\n    eval_views_per_location: 2\n")
    rs = load_retrieval_set(cfg, 0, 64)
    assert len(rs.gallery) >= 2 and len(rs.queries) == 2 * len(rs.gallery)
    assert set(rs.query_labels) == set(rs.gallery_labels)
    assert all(q.shape == (64, 64, 3) for q in rs.queries)
    train_cfg = tmp_path / "train_all.yaml"
    train_cfg.write_text(cfg.read_text().replace(f"    holdout_maps: [{MAP.name}]\n", ""))
    calib = load_images(train_cfg, 5, 64, seed=2)   # calibration on the training split
    assert len(calib) == 5 and all(c.shape == (64, 64, 3) and c.std() > 3 for c in calib)
    bad = tmp_path / "u1652.yaml"
    bad.write_text("data:\n  kind: university1652\n")
    with pytest.raises(MeanNavError, match="not 'synthetic'"):
        load_retrieval_set(bad, 0, 64)


def test_normalize_matches_the_textbook_formula():
    from mean_nav.deploy.embedder import Preprocessing, normalize

    prep = Preprocessing(img_size=24, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    batch = np.random.default_rng(0).integers(0, 256, (3, 24, 24, 3), dtype=np.uint8)
    expected = ((batch / 255.0 - np.array(prep.mean)) / np.array(prep.std)).transpose(0, 3, 1, 2)
    for x in (batch, batch[:, :, ::-1]):     # contiguous, and a strided view
        want = expected if x is batch else expected[:, :, :, ::-1]
        got = normalize(x, prep)
        assert got.dtype == np.float32 and got.shape == (3, 3, 24, 24)
        np.testing.assert_allclose(got, want, atol=1e-5)
