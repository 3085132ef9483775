"""`mean-nav bench localizer`: stored and in-flight map features side by side, per stage."""
import json

from mean_nav.replay.simulate import SimulationConfig, simulate_flight


def test_bench_localizer_prints_every_stage_and_both_sources_decide_alike(tmp_path, capsys):
    from mean_nav.cli import main
    from mean_nav.data.world import generate_world
    from mean_nav.demo import ASSET
    from mean_nav.deploy.backends import load_embedder
    from mean_nav.geo.cache import build_cache

    world = generate_world(tmp_path / "world.tif", seed=11, size_px=560, gsd_m=0.25)
    build_cache([world], tmp_path / "cache", load_embedder(ASSET, threads=2), gsd_m=0.25, tile_size_m=60,
                stride_m=20, progress=False)
    simulate_flight([world], tmp_path / "flight", SimulationConfig(width=320, height=240, fps=1.0, duration_s=6,
                                                                   seed=3, map_gsd_m=0.25), progress=False)
    out = tmp_path / "bench.json"
    every = tmp_path / "every_candidate.yaml"    # a second configuration side by side, same cache
    every.write_text("stop_at_inliers: 1000000\nverify_prediction: false\n")
    code = main(["bench", "localizer", str(tmp_path / "flight"), "--model", str(ASSET), "--cache",
                 str(tmp_path / "cache"), "--json", str(out), "--compare", f"{every}@{tmp_path / 'cache'}"])
    printed = capsys.readouterr().out
    assert code == 0
    for row in ("rectify", "embed", "query features", "map features", "match", "filter",
                "capture-to-send p50", "capture-to-send p95", "cpu per frame p50"):
        assert row in printed
    results = json.loads(out.read_text())
    stored, in_flight = results["stored map features"], results["map features in flight"]
    assert stored["frames"] == in_flight["frames"] == 6
    # the same keypoints either way: the same fixes, the same stages run on the same frames
    assert stored["fixes"] == in_flight["fixes"] >= 3
    for stage in ("rectify", "query features", "match", "filter"):
        assert stored["stages_ms"][stage]["frames"] == in_flight["stages_ms"][stage]["frames"] > 0
    assert stored["capture_to_send_ms"]["p50"] <= stored["capture_to_send_ms"]["p95"] <= \
        stored["capture_to_send_ms"]["max"]
    compared = results["every_candidate (stored)"]
    assert compared["frames"] == 6 and "every_candidate (stored): sift+ratio (opencv, 1500 kp)" in printed
    # without the prediction's early exit every frame runs the network
    assert compared["stages_ms"]["embed"]["frames"] == 6 >= stored["stages_ms"]["embed"]["frames"]
