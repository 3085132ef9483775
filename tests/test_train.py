"""`mean-nav train` end to end on a few synthetic pairs at 64 px: outputs, resume, config errors."""
import json
from pathlib import Path

import pytest
import yaml

torch = pytest.importorskip("torch")

from mean_nav.cli import main
from mean_nav.data.world import generate_world
from mean_nav.train import warmup_cosine


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("w") / "w.tif", seed=5, size_px=448, gsd_m=0.5)


def write_config(path: Path, world: Path, out_dir: Path, **overrides) -> Path:
    cfg = {
        "model": {"backbone": "efficientnet_lite0", "img_size": 64, "efficientnet_features": "blocks"},
        "data": {"kind": "synthetic", "synthetic": {
            "maps": [str(world)], "gsd_m": 0.5, "tile_m": 60.0, "stride_m": 30.0, "holdout_fraction": 0.35,
            "view_px": 64, "camera_px": 128, "views_per_location": 1, "eval_views_per_location": 1}},
        "optim": {"epochs": 2, "batch_size": 4, "max_steps_per_epoch": 2, "lr": 1e-3},
        "seed": 3, "threads": 1, "log_every": 1, "out_dir": str(out_dir),
    }
    for dotted, value in overrides.items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


def steps_in(metrics: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, metrics.read_text().splitlines()) if r["event"] == "step"]


def test_train_writes_checkpoints_logs_and_plot_then_resumes(tmp_path, world, capsys):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", world, out)
    assert main(["train", "--config", str(cfg)]) == 0
    printed = capsys.readouterr().out
    assert "held-out drone->satellite before" in printed and "after" in printed
    for name in ("last.pt", "model.pt", "metrics.jsonl", "loss_curve.png", "config.yaml", "holdout.json"):
        assert (out / name).is_file(), name
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and state["step"] == 4
    assert "optimizer" in state and "scheduler" in state
    assert steps_in(out / "metrics.jsonl") == [1, 2, 3, 4]
    holdout = json.loads((out / "holdout.json").read_text())
    assert set(holdout) >= {"before", "after"}
    assert 0 <= holdout["after"]["drone->satellite"]["R@1"] <= 100

    # resume: one more epoch continues the step count and the schedule
    assert main(["train", "--config", str(cfg), "--resume", "--epochs", "3"]) == 0
    resumed = torch.load(out / "last.pt", weights_only=True)
    assert resumed["epoch"] == 3 and resumed["step"] == 6
    assert steps_in(out / "metrics.jsonl") == [1, 2, 3, 4, 5, 6]
    changed = [k for k, v in state["state_dict"].items()
               if v.is_floating_point() and not torch.equal(v, resumed["state_dict"][k])]
    assert changed  # the extra epoch trained
    assert resumed["scheduler"]["last_epoch"] == 6


def test_resume_refuses_a_checkpoint_of_another_class_count(tmp_path, world, capsys):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", world, out, **{"optim.epochs": 1, "optim.max_steps_per_epoch": 1,
                                                           "evaluate_holdout": False})
    assert main(["train", "--config", str(cfg)]) == 0
    other = write_config(tmp_path / "d.yaml", world, out, **{"data.synthetic.stride_m": 25.0,
                                                             "evaluate_holdout": False})
    assert main(["train", "--config", str(other), "--resume"]) == 1
    assert "model.num_classes" in capsys.readouterr().err


@pytest.mark.parametrize("field,value,message", [
    ("optim.learning_rate", 0.1, "optim.learning_rate"),
    ("optim.lr", "fast", "optim.lr"),
    ("model.backbone", "resnet50", "model.backbone"),
    ("data.kind", "imagenet", "data.kind"),
])
def test_bad_config_fields_are_named(tmp_path, world, capsys, field, value, message):
    cfg = write_config(tmp_path / "c.yaml", world, tmp_path / "run", **{field: value})
    assert main(["train", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_schedule_warms_up_linearly_then_decays_to_zero():
    total, warm = 100, 10
    lrs = [warmup_cosine(s, total, warm) for s in range(total)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert warmup_cosine(total, total, warm) == pytest.approx(0.0)


def test_train_reads_a_university1652_folder(tmp_path):
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    for i in range(5):
        for view, n in (("drone", 2), ("satellite", 1)):
            d = tmp_path / "u" / "train" / view / f"{i:04d}"
            d.mkdir(parents=True)
            for k in range(n):
                cv2.imwrite(str(d / f"{k}.jpg"), rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
    cfg = {"model": {"backbone": "efficientnet_lite0", "img_size": 64, "efficientnet_features": "blocks"},
           "data": {"kind": "university1652", "root": str(tmp_path / "u")},
           "optim": {"epochs": 1, "batch_size": 4}, "threads": 1, "out_dir": str(tmp_path / "run")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(tmp_path / "c.yaml")]) == 0
    ckpt = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert ckpt["model_config"]["num_classes"] == 5
    # 10 pairs of 5 locations in batches of 4 unique locations: 2 full batches
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 2
