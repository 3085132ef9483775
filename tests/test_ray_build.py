"""`cache build --ray`: the same cache as the local build, a killed worker, a crashed driver.

One local Ray cluster (2 CPUs, this machine only) serves the module and is shut down at
the end, with a check that none of its processes outlive it. Ray's start-up is most of
this module's time (about 20 s on the loaded 2-core CI machine).
"""
from __future__ import annotations

import json
import logging
import re
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

from deploy_testing import tiny_deploy_onnx  # noqa: E402
from test_cache import UTM32N, synthetic_map, write_geotiff  # noqa: E402

from mean_nav.deploy.backends import OnnxRuntimeEmbedder  # noqa: E402
from mean_nav.geo.cache import META, WORK, build_cache  # noqa: E402
from mean_nav.geo.ray_build import ModelSpec, RayBlockRunner  # noqa: E402
from mean_nav.geo.tiles import TileGrid, area_tile_range, plan_blocks  # noqa: E402

# no map features except where the output must carry them too (the equality test): SIFT per
# block is most of a build's time here, and the subject is where blocks run
BUILD = dict(gsd_m=2.0, tile_size_m=32.0, stride_m=16.0, crs=UTM32N, batch_size=16, progress=False, block_px=64,
             features=())


@pytest.fixture(scope="module")
def cluster():
    # only what ray.init starts: earlier tests may have left long-lived helpers of their own
    # (e.g. multiprocessing's resource tracker), which are not Ray's to stop
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    ours = {p.pid for p in psutil.Process().children(recursive=True)} - before
    yield
    ray.shutdown()
    # Ray's processes exit on their own after shutdown; on a loaded 2-core machine that took
    # over 15 s, so allow a minute before calling one left behind (and then end it ourselves)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _alive(ours):
        time.sleep(0.2)
    left = _alive(ours)
    for pid in left:
        psutil.Process(pid).kill()
    assert not left, f"Ray processes left behind: {left}"


def _alive(pids) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("ray_inputs")
    return write_geotiff(d / "map.tif", synthetic_map(320, 320, seed=5)), tiny_deploy_onnx(d / "tiny.onnx", size=32)


@pytest.fixture(scope="module")
def local_cache(inputs, tmp_path_factory):
    map_path, model = inputs
    out = tmp_path_factory.mktemp("local") / "cache"
    build_cache([map_path], out, OnnxRuntimeEmbedder(model, threads=1), **BUILD)
    return out


WITH_FEATURES = dict(BUILD, features=None)    # the default map features (SIFT)


def _runner(model, **kw) -> RayBlockRunner:
    return RayBlockRunner(ModelSpec(str(model), "onnxruntime", 1), OnnxRuntimeEmbedder(model, threads=1).model_hash,
                          **kw)


def _assert_same_cache(a: Path, b: Path) -> None:
    """Byte for byte, meta.json's creation time aside."""
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files_a:
        if rel.name == META:
            meta_a, meta_b = (json.loads((root / rel).read_text()) for root in (a, b))
            meta_a.pop("created_utc"), meta_b.pop("created_utc")
            assert meta_a == meta_b
        else:
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def _settled_block_files(work: Path, quiet_s: float = 2.0, timeout_s: float = 60.0) -> set[str]:
    """Finished block files once no new one has appeared for quiet_s."""
    deadline = time.monotonic() + timeout_s
    seen, since = None, time.monotonic()
    while time.monotonic() < deadline:
        # not block-000003.tmp-<pid>.npz: a worker force-killed mid-write leaves its temp file
        now = {p.name for p in work.glob("block-*.npz") if re.fullmatch(r"block-\d+\.npz", p.name)}
        if now != seen:
            seen, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
        time.sleep(0.2)
    return seen


def _block_count(map_path: Path) -> int:
    grid = TileGrid.from_metres(UTM32N, BUILD["gsd_m"], BUILD["tile_size_m"], BUILD["stride_m"])
    return len(plan_blocks(grid, area_tile_range([map_path], grid), BUILD["block_px"]))


def _block_workers() -> list[psutil.Process]:
    """Ray workers running a block task right now (Ray titles them ray::<task>)."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "mean_nav_cache_block" in " ".join(p.cmdline()) or "_run_block" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            pass
    return found


def test_a_worker_killed_mid_build_loses_only_its_block(cluster, inputs, local_cache, tmp_path):
    """Runs first: a fresh cluster's first tasks import onnxruntime and load the model (seconds),
    so the killer surely finds a block task running."""
    map_path, model = inputs
    killed: list[int] = []

    def kill_one_running_worker():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            running = _block_workers()
            if running:
                killed.append(running[0].pid)
                running[0].kill()
            time.sleep(0.01)

    killer = threading.Thread(target=kill_one_running_worker)
    killer.start()
    runner = _runner(model)
    try:
        build_cache([map_path], tmp_path / "cache", OnnxRuntimeEmbedder(model, threads=1), runner=runner, **BUILD)
    finally:
        killed.append(-1)   # stops the killer if the build ended first
        killer.join()
    assert killed[0] > 0, "no block task was seen running"
    assert not any(name.endswith(f":{killed[0]}") for name in runner.per_worker)   # it finished no block
    _assert_same_cache(local_cache, tmp_path / "cache")


def test_ray_build_equals_the_local_build_shared_storage_and_shipped(cluster, inputs, local_cache, tmp_path,
                                                                     caplog):
    map_path, model = inputs
    blocks = _block_count(map_path)
    assert blocks >= 8       # enough blocks for both workers to get several
    runner = _runner(model)
    with caplog.at_level(logging.INFO, logger="mean_nav.geo.cache"):
        build_cache([map_path], tmp_path / "shared", OnnxRuntimeEmbedder(model, threads=1), runner=runner, **BUILD)
    _assert_same_cache(local_cache, tmp_path / "shared")
    assert sum(b for b, _, _ in runner.per_worker.values()) == blocks
    final = [r.getMessage() for r in caplog.records if r.getMessage().startswith("embedded")][-1]
    assert f"ray: {len(runner.per_worker)} workers" in final
    assert final.count(" tiles/s (") == len(runner.per_worker) >= 2    # one throughput per worker
    # no shared storage: model and map through the object store, every file a block writes (map
    # part, map features, block file) back to the driver
    with_features = tmp_path / "local-with-features"
    build_cache([map_path], with_features, OnnxRuntimeEmbedder(model, threads=1), **WITH_FEATURES)
    assert any((with_features / "features").iterdir())
    shipped = _runner(model, ship=True, scratch=str(tmp_path / "worker-scratch"))
    build_cache([map_path], tmp_path / "shipped", OnnxRuntimeEmbedder(model, threads=1), runner=shipped,
                **WITH_FEATURES)
    _assert_same_cache(with_features, tmp_path / "shipped")
    assert any((tmp_path / "worker-scratch" / "inputs").rglob("map.tif"))   # it really travelled


class _DriverDiesAfter:
    """The driver process dying after `blocks` finished blocks (as with Ctrl-C or a lost login
    node): the Ray runner's generator is abandoned mid-build."""

    def __init__(self, runner: RayBlockRunner, blocks: int):
        self.runner, self.blocks = runner, blocks

    def run(self, job, blocks):
        for done, item in enumerate(self.runner.run(job, blocks), 1):
            yield item
            if done == self.blocks:
                raise KeyboardInterrupt

    def summary(self) -> str:
        return ""


def test_rerun_after_a_driver_crash_resumes_from_the_finished_blocks(cluster, inputs, local_cache, tmp_path):
    map_path, model = inputs
    out = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        build_cache([map_path], out, OnnxRuntimeEmbedder(model, threads=1),
                    runner=_DriverDiesAfter(_runner(model), 3), **BUILD)
    assert not (out / META).exists()
    # the driver "died" but this process lives on, so blocks already running on the workers
    # still finish: let them, then count what a rerun finds
    deadline = time.monotonic() + 60
    while _block_workers() and time.monotonic() < deadline:
        time.sleep(0.2)
    finished = _settled_block_files(out / WORK)
    blocks = _block_count(map_path)
    assert 3 <= len(finished) < blocks
    rerun = _runner(model)
    build_cache([map_path], out, OnnxRuntimeEmbedder(model, threads=1), runner=rerun, **BUILD)
    assert sum(b for b, _, _ in rerun.per_worker.values()) == blocks - len(finished)   # only the missing ones ran
    _assert_same_cache(local_cache, out)


def test_cli_ray_flag_builds_the_same_cache(cluster, inputs, local_cache, tmp_path, monkeypatch):
    from mean_nav.cli import main

    map_path, model = inputs
    out = tmp_path / "cli"
    monkeypatch.chdir(map_path.parent)      # a relative map path: the workers' working folder is another
    assert main(["cache", "build", map_path.name, "--out", str(out), "--model", str(model), "--backend",
                 "onnxruntime", "--threads", "1", "--gsd", "2", "--tile-size", "32", "--stride", "16", "--crs", UTM32N,
                 "--batch-size", "16", "--block-px", "64", "--features", "none", "--no-progress", "--ray"]) == 0
    _assert_same_cache(local_cache, out)
