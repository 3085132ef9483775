from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from mean_nav.config import bounded, from_dict, load_config, load_yaml, to_dict, validate
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
    with pytest.raises(MeanNavError, match="required field 'name' is missing"):
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


@dataclass
class Ranged:
    rate_hz: float = bounded(5.0, gt=0, le=100, unit="Hz")
    count: int = bounded(3, ge=1, le=10)
    sigmas: list[float] = bounded(default_factory=lambda: [1.0], gt=0)
    timeout_s: float = bounded(1.0, gt=0, allow_inf=True)
    plain: float = 1.0


@pytest.mark.parametrize("data, message", [
    ({"rate_hz": 0}, r"'rate_hz' must be > 0 Hz and <= 100 Hz"),
    ({"rate_hz": 101.0}, "'rate_hz' must be"),
    ({"count": 11}, "'count' must be"),
    ({"sigmas": [1.0, -2.0]}, r"'sigmas\[1\]' must be > 0"),
    ({"plain": float("nan")}, "'plain' must be a number, not NaN"),
    ({"plain": float("inf")}, "'plain' must be finite"),
    ({"plain": 10 ** 400}, "'plain' is far out of range"),
    ({"count": True}, "'count' should be int"),
])
def test_declared_limits_and_finiteness_are_enforced(data, message):
    with pytest.raises(MeanNavError, match=message):
        from_dict(Ranged, data, source="r.yaml")


def test_limits_allow_what_the_field_declares():
    cfg = from_dict(Ranged, {"timeout_s": float("inf"), "rate_hz": 100, "count": 1})
    assert cfg.timeout_s == float("inf") and cfg.rate_hz == 100.0


def test_validate_checks_configs_built_in_code():
    with pytest.raises(MeanNavError, match="'inner.lr' must be a number"):
        validate(Outer(name="x", inner=Inner(lr=float("nan"))))
    assert validate(Ranged()).count == 3


def test_keys_that_are_not_names_are_refused():
    for key in (1, None, 2.5):
        with pytest.raises(MeanNavError, match="is not a field name"):
            from_dict(Outer, {"name": "x", key: 1})


def test_error_messages_stay_short_for_huge_values():
    with pytest.raises(MeanNavError) as info:
        from_dict(Outer, {"name": ["x"] * 1_000_000})
    assert len(str(info.value)) < 300


def test_billion_laughs_is_refused_quickly(tmp_path):
    text = 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    for prev, name in zip("abcdefgh", "bcdefghi"):
        text += f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]\n"
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(MeanNavError, match="expands to more than"):
        load_yaml(tmp_path / "c.yaml")


@pytest.mark.parametrize("text, message", [
    ("a: &x [*x]\n", "refers to itself"),
    ("a: " + "[" * 100 + "]" * 100 + "\n", "nested more than"),
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", "cannot be read|nested"),
    ("a: 1" + "0" * 5000 + "\n", "cannot be read"),
    ("a: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
    ("- 1\n- 2\n", "expected a mapping"),
])
def test_hostile_yaml_is_one_clear_error(tmp_path, text, message):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(MeanNavError, match=message):
        load_yaml(tmp_path / "c.yaml")


def test_text_with_bad_bytes_names_the_line(tmp_path):
    (tmp_path / "c.yaml").write_bytes(b"name: x\nepochs: \xff\xfe\n")
    with pytest.raises(MeanNavError, match=r"c.yaml: line 2: byte 16 is not UTF-8"):
        load_config(tmp_path / "c.yaml", Outer)


def test_oversized_yaml_is_refused(tmp_path):
    (tmp_path / "c.yaml").write_text("name: x\n" + "# padding\n" * 200_000)
    with pytest.raises(MeanNavError, match="bytes, more than"):
        load_config(tmp_path / "c.yaml", Outer)


def test_numbers_inside_free_form_values_are_checked_too():
    @dataclass
    class Free:
        notes: dict | None = None
        anything: Any = None

    assert from_dict(Free, {"notes": {"seed": 3, "x": [1.5]}}).notes == {"seed": 3, "x": [1.5]}
    with pytest.raises(MeanNavError, match=r"notes\['x'\]\[0\]. must be a number, not NaN"):
        from_dict(Free, {"notes": {"x": [float("nan")]}})
    with pytest.raises(MeanNavError, match="'anything' is far out of range"):
        from_dict(Free, {"anything": 10 ** 400})
