"""Regression tests for the bad inputs of issue 14: each is one clear MeanNavError (exit 1
from the CLI) naming the file and the field, never a traceback, a hang or a silent result."""
from __future__ import annotations

import pytest

from mean_nav.cli import main
from mean_nav.config import load_config, validate
from mean_nav.errors import MeanNavError
from mean_nav.nav.daemon import NavConfig, load_nav_config
from mean_nav.nav.filter import FilterConfig
from mean_nav.nav.localizer import LocalizerConfig
from mean_nav.nav.mavlink_io import MavlinkConfig
from mean_nav.nav.refine import RefineConfig
from mean_nav.replay.flight import FlightConfig
from mean_nav.replay.simulate import SimulationConfig


@pytest.mark.parametrize("cls", [NavConfig, LocalizerConfig, FilterConfig, RefineConfig, MavlinkConfig,
                                 SimulationConfig, FlightConfig])
def test_defaults_lie_within_their_declared_limits(cls):
    validate(cls())


@pytest.mark.parametrize("text, field", [
    ("localizer:\n  position_floor_m: .nan\n", "localizer.position_floor_m"),
    ("localizer:\n  filter:\n    accel_sigma_ms2: .nan\n", "localizer.filter.accel_sigma_ms2"),
    ("localizer:\n  filter:\n    gate_chi2: -1\n", "localizer.filter.gate_chi2"),
    ("localizer:\n  top_k: 1.0e+30\n", "localizer.top_k"),
    ("max_rate_hz: .nan\n", "max_rate_hz"),
    ("initial_lat: 1" + "0" * 400 + "\ninitial_lon: 0\n", "initial_lat"),
    ("mavlink:\n  baud: .inf\n", "mavlink.baud"),
])
def test_nav_config_refuses_values_that_made_nan_fixes_or_tracebacks(tmp_path, text, field):
    path = tmp_path / "nav.yaml"
    path.write_text(text)
    with pytest.raises(MeanNavError, match=rf"nav.yaml: field '{field}'"):
        load_nav_config(path)


@pytest.mark.parametrize("text, message", [
    ("1: 2\n", "key 1 is not a field name"),
    ("null: 2\n", "key None is not a field name"),
    ("localizer: {top_k: 4, 7: 1}\n", "localizer: key 7 is not a field name"),
])
def test_yaml_keys_that_are_not_names_are_refused(tmp_path, text, message):
    (tmp_path / "nav.yaml").write_text(text)
    with pytest.raises(MeanNavError, match=message):
        load_nav_config(tmp_path / "nav.yaml")


def test_negative_telemetry_gap_in_flight_yaml_is_refused(tmp_path):
    (tmp_path / "flight.yaml").write_text("max_telemetry_gap_s: -1\n")
    with pytest.raises(MeanNavError, match="flight.yaml: field 'max_telemetry_gap_s' must be > 0 s"):
        load_config(tmp_path / "flight.yaml", FlightConfig)


def test_cli_prints_one_line_and_exits_1_for_a_bad_config(tmp_path, capsys):
    (tmp_path / "nav.yaml").write_bytes(b"max_rate_hz: 5\ncamera:\n  uri: \xc3\x28\n")
    assert main(["run", "--check", "--config", str(tmp_path / "nav.yaml")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "nav.yaml: line 3" in err and "UTF-8" in err


def test_simulation_options_are_checked():
    from argparse import ArgumentParser

    from mean_nav.replay.simulate import add_arguments, config_from_args

    parser = ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["map.tif", "-o", "out", "--fps", "nan"])
    with pytest.raises(MeanNavError, match="'fps' must be a number, not NaN"):
        config_from_args(args)
