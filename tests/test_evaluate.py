"""Retrieval metrics on hand-computed rankings, and `mean-nav evaluate` on a tiny dataset."""
import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from mean_nav.data.metrics import average_precision, retrieval_metrics
from mean_nav.errors import MeanNavError


def unit(deg):
    """2-D unit vectors at the given angles: dot products rank by angular distance."""
    a = np.radians(np.atleast_1d(deg))
    return np.stack([np.cos(a), np.sin(a)], 1).astype(np.float32)


# gallery at 10, 20, 30, 40 degrees with labels 2, 1, 3, 1; query 0 (label 1) at 0 degrees
GALLERY = unit([10, 20, 30, 40])
GALLERY_LABELS = [2, 1, 3, 1]


def test_average_precision_follows_the_university1652_formula():
    # good items at ranks 1 and 3: (0 + 1/2)/2/2 + (1/3 + 2/4)/2/2 = 1/3
    assert average_precision(np.array([1, 3])) == pytest.approx(1 / 3)
    # a good item at rank 0 counts P_old = 1: a perfect single hit has AP 1
    assert average_precision(np.array([0])) == pytest.approx(1.0)


def test_original_convention_ranks_every_gallery_item():
    m = retrieval_metrics(unit([0]), [1], GALLERY, GALLERY_LABELS, convention="original")
    assert m["R@1"] == 0.0 and m["R@5"] == 100.0
    assert m["AP"] == pytest.approx(100 / 3)


def test_family_convention_drops_gallery_ids_no_query_has():
    queries, labels = unit([0, 90]), [1, 2]
    fam = retrieval_metrics(queries, labels, GALLERY, GALLERY_LABELS, convention="family")
    orig = retrieval_metrics(queries, labels, GALLERY, GALLERY_LABELS, convention="original")
    # family: label 3 is junk. query 0 ranks 2,1,1 -> good at 1,2 -> 1/8 + 7/24 = 5/12;
    # query 1 (90 deg) ranks 1,1,2 -> good at 2 -> 1/6
    assert fam["AP"] == pytest.approx(100 * (5 / 12 + 1 / 6) / 2)
    # original: query 1 ranks 1,3,1,2 -> good at 3 -> 1/8; query 0 as above: 1/3
    assert orig["AP"] == pytest.approx(100 * (1 / 3 + 1 / 8) / 2)
    assert fam["R@1"] == 0.0 and fam["R@5"] == 100.0


def test_junk_label_minus_one_is_removed_from_the_ranking():
    gallery = np.concatenate([unit([5]), GALLERY])
    m = retrieval_metrics(unit([0]), [1], gallery, [-1] + GALLERY_LABELS, convention="original")
    assert m["AP"] == pytest.approx(100 / 3)
    m = retrieval_metrics(unit([0]), [1], unit([5, 10]), [-1, 1], convention="original")
    assert m["R@1"] == 100.0


def test_recall_at_one_percent_uses_the_reference_index():
    # 150 gallery items: index round(1.5) = 2, so a first hit at rank 2 counts, at rank 3 not
    angles = np.arange(1, 151, dtype=float) * 0.5
    labels = np.arange(150) + 10
    for hit_rank, expected in ((2, 100.0), (3, 0.0)):
        lab = labels.copy()
        lab[hit_rank] = 1
        m = retrieval_metrics(unit([0]), [1], unit(angles), lab, convention="original")
        assert m["R@1%"] == expected
        assert m["R@1"] == 0.0


def test_queries_without_a_match_are_skipped_and_counted():
    m = retrieval_metrics(unit([0, 0]), [1, 7], GALLERY, GALLERY_LABELS, convention="original")
    assert m["queries"] == 1


def test_bad_convention_and_shapes_are_rejected():
    with pytest.raises(ValueError):
        retrieval_metrics(unit([0]), [1], GALLERY, GALLERY_LABELS, convention="nope")
    with pytest.raises(ValueError):
        retrieval_metrics(np.zeros((1, 3), np.float32), [1], GALLERY, GALLERY_LABELS)


# --- the command ------------------------------------------------------------------------

def _write_university_test(root: Path, ids=(3, 5, 8)):
    rng = np.random.default_rng(0)
    for folder, per_id in (("query_drone", 2), ("gallery_satellite", 1), ("query_satellite", 1),
                           ("gallery_drone", 2)):
        for i in ids:
            d = root / "test" / folder / f"{i:04d}"
            d.mkdir(parents=True)
            for k in range(per_id):
                img = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
                cv2.imwrite(str(d / f"img{k}.jpg"), img)


def _tiny_checkpoint(path: Path):
    torch = pytest.importorskip("torch")
    from mean_nav.model.checkpoint import save_checkpoint
    from mean_nav.model.mean import ModelConfig, build_model

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="efficientnet_lite0", num_classes=3, img_size=64, efficientnet_features="blocks")
    save_checkpoint(path, build_model(cfg), cfg)


def _args(**kw):
    base = dict(checkpoint=None, dataset_kind="university1652", root=None, altitude=None, config=None,
                gallery_convention="family", batch_size=8, workers=0, device="cpu", json=None)
    base.update(kw)
    return argparse.Namespace(**base)


def test_evaluate_command_scores_both_directions_and_writes_json(tmp_path, capsys):
    from mean_nav import evaluate

    _write_university_test(tmp_path / "u1652")
    _tiny_checkpoint(tmp_path / "m.pt")
    out = tmp_path / "res.json"
    assert evaluate.run(_args(checkpoint=str(tmp_path / "m.pt"), root=str(tmp_path / "u1652"),
                              json=str(out), gallery_convention="original")) == 0
    printed = capsys.readouterr().out
    assert "gallery convention: original" in printed
    report = json.loads(out.read_text())
    assert report["gallery_convention"] == "original"
    directions = {r["direction"]: r for r in report["results"]}
    assert set(directions) == {"drone->satellite", "satellite->drone"}
    assert directions["drone->satellite"]["queries"] == 6
    assert directions["drone->satellite"]["gallery"] == 3
    assert 0.0 <= directions["satellite->drone"]["AP"] <= 100.0


def test_evaluate_names_a_missing_folder_and_an_undecodable_image(tmp_path):
    from mean_nav import evaluate

    _tiny_checkpoint(tmp_path / "m.pt")
    with pytest.raises(MeanNavError, match="query_drone"):
        evaluate.run(_args(checkpoint=str(tmp_path / "m.pt"), root=str(tmp_path / "nothing")))
    _write_university_test(tmp_path / "u1652")
    bad = tmp_path / "u1652" / "test" / "query_drone" / "0003" / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(MeanNavError, match="broken.jpg"):
        evaluate.run(_args(checkpoint=str(tmp_path / "m.pt"), root=str(tmp_path / "u1652")))


def test_sues200_is_scored_per_altitude(tmp_path, capsys):
    from mean_nav import evaluate

    rng = np.random.default_rng(1)
    for h in (150, 300):
        for folder, n in (("query_drone", 2), ("gallery_satellite", 1), ("query_satellite", 1), ("gallery_drone", 2)):
            for i in (1, 2):
                d = tmp_path / "sues" / "Testing" / str(h) / folder / f"{i:04d}"
                d.mkdir(parents=True)
                for k in range(n):
                    cv2.imwrite(str(d / f"{k}.png"), rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    _tiny_checkpoint(tmp_path / "m.pt")
    out = tmp_path / "r.json"
    evaluate.run(_args(checkpoint=str(tmp_path / "m.pt"), dataset_kind="sues200", root=str(tmp_path / "sues"),
                       json=str(out)))
    sets = [(r["set"], r["direction"]) for r in json.loads(out.read_text())["results"]]
    assert sets == [("sues200 150 m", "drone->satellite"), ("sues200 150 m", "satellite->drone"),
                    ("sues200 300 m", "drone->satellite"), ("sues200 300 m", "satellite->drone")]
    assert "gallery convention: family" in capsys.readouterr().out


def test_synthetic_held_out_split_is_scored_from_a_training_config(tmp_path):
    import yaml

    from mean_nav import evaluate
    from mean_nav.data.world import generate_world

    world = generate_world(tmp_path / "w.tif", seed=9, size_px=320, gsd_m=0.5)
    cfg = {"model": {"backbone": "efficientnet_lite0", "img_size": 64},
           "data": {"kind": "synthetic", "synthetic": {
               "maps": [str(world)], "gsd_m": 0.5, "stride_m": 30.0, "holdout_fraction": 0.5,
               "view_px": 64, "camera_px": 128, "eval_views_per_location": 2}},
           "out_dir": str(tmp_path / "run")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    _tiny_checkpoint(tmp_path / "m.pt")
    out = tmp_path / "r.json"
    evaluate.run(_args(checkpoint=str(tmp_path / "m.pt"), dataset_kind="synthetic", config=str(tmp_path / "c.yaml"),
                       json=str(out)))
    rows = json.loads(out.read_text())["results"]
    d2s = next(r for r in rows if r["direction"] == "drone->satellite")
    assert d2s["set"] == "synthetic held-out"
    assert d2s["queries"] == 2 * d2s["gallery"] > 0
