"""Flight folder reading: frames, timestamps, telemetry at frame times, bad folders."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from mean_nav.errors import MeanNavError
from mean_nav.replay.flight import Flight, write_frames_csv
from mean_nav.replay.simulate import SimulationConfig, simulate_flight

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ORTHO = DATA / "orthophotos" / "test_tiled.tif"


def need(path: Path) -> Path:
    if not path.exists():
        print(f"skipping: {path} is absent (CI keeps shared/data beside the clone)")
        pytest.skip(f"{path} absent")
    return path


@pytest.fixture(scope="module")
def tiny_flight(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("flight") / "tiny"
    cfg = SimulationConfig(width=160, height=120, fps=1.0, duration_s=12, seed=1, map_gsd_m=0.5)
    return simulate_flight([need(ORTHO)], out, cfg, progress=False)


def copy_flight(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_frames_come_with_telemetry_interpolated_at_their_time(tiny_flight):
    flight = Flight(tiny_flight)
    frames = list(flight.frames())
    assert len(frames) == len(flight) == 12
    assert all(f.problem == "" and f.image.shape == (120, 160, 3) for f in frames)
    times = [f.time_s for f in frames]
    assert np.all(np.diff(times) > 0)
    tel = [f.telemetry for f in frames]
    assert all(abs(t.time_s - f.time_s) < 1e-9 for t, f in zip(tel, frames))
    # relative altitude near the commanded 60 m, radians for attitude
    assert all(40 < t.rel_alt_m < 80 and abs(t.roll) < 0.8 and abs(t.yaw) <= math.pi for t in tel)
    # frame times sit between telemetry rows: the position is interpolated, not the nearest row
    lat = flight.telemetry.channels["lat"]
    k = np.searchsorted(lat.time_s, frames[3].time_s)
    assert lat.time_s[k - 1] < frames[3].time_s < lat.time_s[k]
    assert min(lat.values[k - 1], lat.values[k]) <= tel[3].lat <= max(lat.values[k - 1], lat.values[k])


def test_frames_after_the_telemetry_ends_are_reported_not_guessed(tiny_flight, tmp_path):
    root = copy_flight(tiny_flight, tmp_path / "f")
    flight = Flight(root)
    times = list(flight.frame_times) + [flight.frame_times[-1] + 30.0]
    ids = list(flight.frame_ids) + [len(times) - 1]
    shutil.copy(root / "frames" / "000000.jpg", root / "frames" / f"{ids[-1]:06d}.jpg")
    write_frames_csv(root / "frames.csv", ids, times)
    frames = list(Flight(root).frames())
    assert frames[-1].telemetry is None and "no telemetry" in frames[-1].problem
    assert all(f.telemetry is not None for f in frames[:-1])


def test_missing_frame_image_is_a_per_frame_problem(tiny_flight, tmp_path):
    root = copy_flight(tiny_flight, tmp_path / "f")
    (root / "frames" / "000004.jpg").unlink()
    frames = list(Flight(root).frames())
    assert frames[4].image is None and "000004" in frames[4].problem
    assert frames[5].image is not None and frames[5].problem == ""


def test_video_that_ends_early_stops_with_a_clear_problem(tiny_flight, tmp_path):
    root = copy_flight(tiny_flight, tmp_path / "f")
    frames_dir = root / "frames"
    writer = cv2.VideoWriter(str(root / "video.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 1.0, (160, 120))
    for i in range(6):  # frames.csv lists 12
        writer.write(cv2.imread(str(frames_dir / f"{i:06d}.jpg")))
    writer.release()
    shutil.rmtree(frames_dir)
    cfg = yaml.safe_load((root / "flight.yaml").read_text())
    cfg["video"] = "video.avi"
    (root / "flight.yaml").write_text(yaml.safe_dump(cfg))
    frames = list(Flight(root).frames())
    assert len(frames) == 7
    assert all(f.image is not None for f in frames[:6])
    assert frames[6].image is None and "video ended after 6 frame(s)" in frames[6].problem


@pytest.mark.parametrize("remove, message", [("camera.yaml", "camera file not found"),
                                             ("frames.csv", "frame timestamps not found"),
                                             ("telemetry.csv", "telemetry file not found"),
                                             ("frames", "frames folder not found")])
def test_missing_parts_of_a_flight_folder_name_the_file(tiny_flight, tmp_path, remove, message):
    root = copy_flight(tiny_flight, tmp_path / "f")
    target = root / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(MeanNavError, match=message):
        Flight(root)


def test_frames_out_of_time_order_are_refused(tiny_flight, tmp_path):
    root = copy_flight(tiny_flight, tmp_path / "f")
    flight = Flight(root)
    times = flight.frame_times.copy()
    times[5] = times[3]
    write_frames_csv(root / "frames.csv", flight.frame_ids, times)
    with pytest.raises(MeanNavError, match="line 7: time_s .* does not increase"):
        Flight(root)


def test_telemetry_log_with_time_offset_aligns_to_frame_clock(tmp_path):
    """A real .tlog on the boot clock, frames on another clock: the offset maps one onto the other."""
    tlog = need(DATA / "logs" / "uavlogviewer_vtol.tlog")
    root = tmp_path / "f"
    (root / "frames").mkdir(parents=True)
    from mean_nav.nav.camera_model import CameraModel

    CameraModel.from_fov(64, 48, 70).to_yaml(root / "camera.yaml")
    cv2.imwrite(str(root / "frames" / "000000.jpg"), np.zeros((48, 64, 3), np.uint8))
    shutil.copy(tlog, root / "flight.tlog")
    # frames start at 0 s; the log's boot clock is at 608.6 s at its start
    write_frames_csv(root / "frames.csv", [0], [30.0])
    (root / "flight.yaml").write_text(yaml.safe_dump({"telemetry_log": "flight.tlog", "time_offset_s": -600.0}))
    frame = next(Flight(root).frames())
    assert frame.telemetry is not None, frame.problem
    from mean_nav.replay.logs import read_tlog

    expected = read_tlog(tlog)  # the same log read at boot time 630 s
    expected = expected.at([630.0]).telemetry[0]
    assert frame.telemetry.lat == pytest.approx(expected.lat) and frame.telemetry.yaw == pytest.approx(expected.yaw)
    # without the offset no frame falls inside the log: a clear error naming the fix
    (root / "flight.yaml").write_text(yaml.safe_dump({"telemetry_log": "flight.tlog"}))
    with pytest.raises(MeanNavError, match="time_offset_s"):
        Flight(root)


def test_gimbal_columns_give_each_frame_the_camera_attitude(tiny_flight, tmp_path):
    import csv

    plain = Flight(tiny_flight)
    assert not any(f.telemetry.has_gimbal_attitude for f in plain.frames())
    assert "gimbal" not in (tiny_flight / "telemetry.csv").read_text().splitlines()[0]
    root = copy_flight(tiny_flight, tmp_path / "g")
    with (root / "telemetry.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:  # a camera held level and pointing down, turning with the vehicle
        r.update(gimbal_roll="0.01", gimbal_pitch=f"{-math.pi / 2:.6f}", gimbal_yaw=r["yaw"])
    with (root / "telemetry.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    frames = list(Flight(root).frames())
    tel = [f.telemetry for f in frames]
    assert all(t.has_gimbal_attitude for t in tel)
    assert all(abs(t.gimbal_pitch + math.pi / 2) < 1e-6 and abs(t.gimbal_roll - 0.01) < 1e-9 for t in tel)
    assert all(abs(math.remainder(t.gimbal_yaw - t.yaw, 2 * math.pi)) < 1e-6 for t in tel)
