"""Fuzz suite (issue 14): seeded, deterministic mutations of every input file type; each
outcome must be a clean load (finite, plausible values) or one MeanNavError, never a
traceback, a hang or a silently wrong value. `mean-nav bench fuzz` runs the same
mutators 1,000 times per loader and counts the outcomes."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mean_nav.bench.fuzz import LOADERS, mutate, prepare, run_case

# mutations per loader in CI (~375 in all); the logs are the slow ones
CASES = {"telemetry_csv": 60, "frames_csv": 50, "flight_yaml": 30, "camera_yaml": 60, "config_yaml": 50, "cache_meta": 50,
         "tlog": 25, "dataflash_bin": 25, "ulog": 25}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.parametrize("name", list(CASES))
def test_mutated_input_loads_cleanly_or_is_one_clear_error(name, workdir):
    loader = LOADERS[name]
    try:
        path, seed = prepare(loader, workdir)
    except FileNotFoundError as exc:
        print(f"skipping: {exc} is absent (CI keeps shared/data beside the clone)")
        pytest.skip(f"{exc} absent: ../shared/data is missing")
    assert run_case(loader, path, seed).kind == "clean load"  # the unmutated seed is valid

    @settings(max_examples=CASES[name], derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.randoms(use_true_random=False))
    def check(rng):
        outcome = run_case(loader, path, mutate(seed, rng, loader.mutators), timeout_s=30)
        assert outcome.kind in ("clean load", "clean error"), f"{outcome.kind}: {outcome.detail}"

    check()
