from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from mean_nav.config import from_dict, load_config, to_dict
from mean_nav.errors import MeanNavError


@dataclass
class Inner:
    lr: float = 1e-3
    mode: Literal["a", "b"] = "a"


@dataclass
class Outer:
    name: str
    epochs: int = 2
    maps: list[Path] = field(default_factory=list)
    inner: Inner = field(default_factory=Inner)
    size: tuple[int, int] = (4, 4)
    extra: float | None = None


def test_nested_values_convert_to_declared_types():
    cfg = from_dict(Outer, {"name": "x", "epochs": 3, "maps": ["a.tif"], "inner": {"lr": 1, "mode": "b"},
                            "size": [2, 3]})
    assert cfg.maps == [Path("a.tif")]
    assert cfg.inner.lr == 1.0 and isinstance(cfg.inner.lr, float)
    assert cfg.size == (2, 3)
    assert to_dict(cfg)["maps"] == ["a.tif"]


def test_unknown_field_is_named_with_its_section():
    with pytest.raises(MeanNavError, match=r"inner\.lrr"):
        from_dict(Outer, {"name": "x", "inner": {"lrr": 1}})


def test_ill_typed_field_is_named():
    with pytest.raises(MeanNavError, match="'epochs' should be int"):
        from_dict(Outer, {"name": "x", "epochs": "two"})
    with pytest.raises(MeanNavError, match="must be one of"):
        from_dict(Outer, {"name": "x", "inner": {"mode": "c"}})


def test_missing_required_field_is_named():
    with pytest.raises(MeanNavError, match="missing required field 'name'"):
        from_dict(Outer, {})


def test_yaml_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(MeanNavError, match="bad.yaml"):
        load_config(bad, Outer)
    with pytest.raises(MeanNavError, match="not found"):
        load_config(tmp_path / "none.yaml", Outer)
    good = tmp_path / "good.yaml"
    good.write_text("name: run1\nepochs: 5\n")
    assert load_config(good, Outer).epochs == 5


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "mean_nav" / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_training_config_parses(path):
    from mean_nav.train import load_train_config

    cfg, model_cfg, _ = load_train_config(path)   # typed all the way down: a wrong field raises
    assert model_cfg.backbone in ("efficientnet_lite0", "convnext_tiny")
    assert model_cfg.img_size in (128, 224, 256, 384, 512)
