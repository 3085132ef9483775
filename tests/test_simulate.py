"""simulate-flight: trajectory physics, frames that match the telemetry, map exits, CLI."""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from mean_nav.cli import main
from mean_nav.errors import MeanNavError
from mean_nav.geo.crs import from_lonlat
from mean_nav.geo.raster import read_metric_raster
from mean_nav.nav.camera_model import gimbal_attitude, ground_to_image, rectify_to_nadir
from mean_nav.replay.flight import Flight
from mean_nav.replay.logs import read_telemetry_csv
from mean_nav.replay.simulate import SimulationConfig, simulate_flight

ORTHO = Path(__file__).resolve().parents[2] / "shared" / "data" / "orthophotos" / "test_tiled.tif"
G = 9.80665


@pytest.fixture(scope="module")
def ortho() -> Path:
    if not ORTHO.is_file():
        print(f"skipping: {ORTHO} is absent (CI keeps shared/data beside the clone)")
        pytest.skip("orthophoto absent")
    return ORTHO


@pytest.fixture(scope="module")
def lap(ortho, tmp_path_factory) -> Path:
    """One full lap with an exit leg, small frames, no photometric change."""
    cfg = SimulationConfig(width=192, height=144, fps=0.5, seed=2, map_gsd_m=0.5, leave_map_m=100,
                           photometric_strength=0.0, occlusion_strength=0.0, attitude_error_deg=0.0,
                           turbulence_deg=0.5)
    return simulate_flight([ortho], tmp_path_factory.mktemp("sim") / "lap", cfg, progress=False)


def test_turns_are_coordinated_and_altitude_and_speed_change(lap):
    track = read_telemetry_csv(lap / "telemetry.csv")
    t = track.channels["yaw"].time_s
    yaw = np.unwrap(track.channels["yaw"].values)
    roll = track.channels["roll"].values
    speed = np.hypot(track.channels["vn"].values, track.channels["ve"].values)
    rate = np.gradient(yaw, t)
    turning = np.abs(rate) > 0.15
    assert turning.mean() > 0.05  # there are turns
    expected = np.arctan(speed * rate / G)
    # bank follows the turn (light turbulence on top)
    assert np.median(np.abs(roll[turning] - expected[turning])) < math.radians(4)
    assert np.all(np.sign(roll[turning & (np.abs(expected) > 0.2)]) == np.sign(rate[turning & (np.abs(expected) > 0.2)]))
    assert np.abs(roll).max() < math.radians(35)
    alt = track.channels["rel_alt_m"].values
    assert np.ptp(alt) > 10  # altitude changes between legs
    assert np.ptp(speed) > 2  # speed changes: the vehicle pitches to accelerate
    accel = np.gradient(speed, t)
    pitch = track.channels["pitch"].values
    hard = np.abs(accel) > 0.5
    assert np.corrcoef(accel[hard], pitch[hard])[0, 1] < -0.5  # nose down to speed up


def test_frames_show_the_ground_under_the_logged_position(lap, ortho):
    """Rectifying a frame with its telemetry lands on the map at the GNSS truth, not elsewhere."""
    flight = Flight(lap)
    raster = read_metric_raster([ortho], 0.5)
    gsd, size = 0.5, 80
    scores_true, scores_shifted = [], []
    for frame in list(flight.frames())[2:20:3]:
        tel = frame.telemetry
        x, y = from_lonlat(raster.crs, tel.lon, tel.lat)
        view, valid = rectify_to_nadir(frame.image, flight.camera, tel.roll, tel.pitch, tel.yaw,
                                       tel.height_above_ground_m, gsd, size)
        for shift, scores in ((0.0, scores_true), (15.0, scores_shifted)):
            m = raster.map_from_ground(x + shift, y) @ np.linalg.inv(ground_to_image(gsd, size))
            ref = cv2.warpPerspective(raster.image, m, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
            a = cv2.cvtColor(view, cv2.COLOR_RGB2GRAY)[valid].astype(float)
            b = cv2.cvtColor(ref, cv2.COLOR_RGB2GRAY)[valid].astype(float)
            scores.append(np.corrcoef(a, b)[0, 1])
    assert np.median(scores_true) > 0.8
    assert np.median(scores_shifted) < np.median(scores_true) - 0.3


def frames_beyond_east_edge(flight: Flight, ortho: Path, beyond_m: float = 60.0) -> list:
    raster = read_metric_raster([ortho], 1.0)
    right = raster.bounds[2]
    images = []
    for frame in flight.frames():
        x, _ = from_lonlat(raster.crs, frame.telemetry.lon, frame.telemetry.lat)
        if x > right + beyond_m:  # farther out than half the footprint: no map in view
            images.append(frame.image)
    return images


def test_exit_leg_leaves_the_map_over_plausible_ground(lap, ortho):
    """Beyond the map the camera sees ground (mirrored map), never a black frame to reject."""
    outside = frames_beyond_east_edge(Flight(lap), ortho)
    assert len(outside) >= 2
    assert all(img.std() > 10 and (img.max(axis=2) < 3).mean() < 0.005 for img in outside)


def test_black_outside_option_renders_nothing_beyond_the_map(ortho, tmp_path):
    cfg = SimulationConfig(width=64, height=48, fps=0.5, seed=2, map_gsd_m=1.0, leave_map_m=100,
                           photometric_strength=0.0, occlusion_strength=0.0, outside="black")
    outside = frames_beyond_east_edge(Flight(simulate_flight([ortho], tmp_path / "f", cfg, progress=False)), ortho)
    assert len(outside) >= 2 and all(img.max() == 0 for img in outside)


def test_same_seed_same_flight_other_seed_other_noise(ortho, tmp_path):
    cfg = SimulationConfig(width=64, height=48, fps=1.0, duration_s=8, seed=5, map_gsd_m=1.0)
    a = simulate_flight([ortho], tmp_path / "a", cfg, progress=False)
    b = simulate_flight([ortho], tmp_path / "b", cfg, progress=False)
    c = simulate_flight([ortho], tmp_path / "c", SimulationConfig(**{**cfg.__dict__, "seed": 6}), progress=False)
    assert (a / "telemetry.csv").read_text() == (b / "telemetry.csv").read_text()
    assert (a / "frames" / "000003.jpg").read_bytes() == (b / "frames" / "000003.jpg").read_bytes()
    assert (a / "telemetry.csv").read_text() != (c / "telemetry.csv").read_text()


def test_cli_writes_a_flight_folder_and_refuses_to_overwrite(ortho, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["simulate-flight", str(ortho), "-o", str(out), "--duration", "6", "--fps", "1",
            "--size", "64", "48", "--map-gsd", "1.0", "--altitude", "50"]
    assert main(args) == 0
    flight = Flight(out)
    assert len(flight) == 6 and flight.camera.width == 64
    assert 35 < next(flight.frames()).telemetry.rel_alt_m < 65
    assert not list(tmp_path.glob("*.partial"))
    assert main(args) == 1
    assert "not empty" in capsys.readouterr().err


def test_map_too_small_for_margin_is_a_clear_error(ortho, tmp_path):
    with pytest.raises(MeanNavError, match="margin"):
        simulate_flight([ortho], tmp_path / "x", SimulationConfig(margin_m=150, map_gsd_m=1.0), progress=False)


def test_telemetry_attitude_differs_from_the_truth_by_the_configured_error(ortho, tmp_path):
    cfg = SimulationConfig(width=64, height=48, fps=0.5, duration_s=60, seed=8, map_gsd_m=1.0, attitude_error_deg=1.0)
    root = simulate_flight([ortho], tmp_path / "f", cfg, progress=False)
    logged, truth = read_telemetry_csv(root / "telemetry.csv"), read_telemetry_csv(root / "truth.csv")
    roll_err = logged.channels["roll"].values - truth.channels["roll"].values
    assert 0.3 < np.degrees(roll_err).std() < 2.0
    assert np.array_equal(logged.channels["lat"].values, truth.channels["lat"].values)  # position is the truth


def test_failure_while_rendering_leaves_no_half_written_flight(ortho, tmp_path, monkeypatch):
    import mean_nav.replay.simulate as simulate

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(simulate.cv2, "imwrite", disk_full)
    with pytest.raises(OSError):
        simulate_flight([ortho], tmp_path / "f", SimulationConfig(width=64, height=48, duration_s=4, map_gsd_m=1.0),
                        progress=False)
    assert list(tmp_path.iterdir()) == []


def test_photometric_strength_out_of_range_names_the_option(ortho, tmp_path):
    with pytest.raises(MeanNavError, match="photometric_strength"):
        simulate_flight([ortho], tmp_path / "f", SimulationConfig(photometric_strength=2.0), progress=False)


def test_gimbal_camera_looks_down_while_the_vehicle_pitches(tmp_path):
    """--gimbal: the vehicle noses down at cruise, the camera stays nadir; the frames match the
    map when rectified with the logged gimbal attitude, not with the vehicle's."""
    from mean_nav.data.world import generate_world

    world = generate_world(tmp_path / "w.tif", seed=5, size_px=800, gsd_m=0.5)
    cfg = SimulationConfig(width=160, height=120, fps=0.5, duration_s=40, seed=3, map_gsd_m=0.5, altitude_m=80,
                           gimbal=True, cruise_pitch_deg=10, photometric_strength=0.0, occlusion_strength=0.0,
                           attitude_error_deg=0.0, margin_m=60)
    flight = Flight(simulate_flight([world], tmp_path / "f", cfg, progress=False))
    assert "gimbal_pitch" in (flight.root / "telemetry.csv").read_text().splitlines()[0]
    raster = read_metric_raster([world], 0.5)
    gsd, size = 0.5, 80
    pitches, corr_gimbal, corr_vehicle = [], [], []
    for frame in list(flight.frames())[1::2]:
        tel = frame.telemetry
        assert tel.has_gimbal_attitude and abs(tel.gimbal_pitch + math.pi / 2) < math.radians(2)
        pitches.append(tel.pitch)
        x, y = from_lonlat(raster.crs, tel.lon, tel.lat)
        m = raster.map_from_ground(x, y) @ np.linalg.inv(ground_to_image(gsd, size))
        ref = cv2.cvtColor(cv2.warpPerspective(raster.image, m, (size, size),
                                               flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP), cv2.COLOR_RGB2GRAY)
        for gimbal, out in ((gimbal_attitude(tel), corr_gimbal), (None, corr_vehicle)):
            view, valid = rectify_to_nadir(frame.image, flight.camera, tel.roll, tel.pitch, tel.yaw,
                                           tel.height_above_ground_m, gsd, size, gimbal=gimbal)
            a = cv2.cvtColor(view, cv2.COLOR_RGB2GRAY)[valid].astype(float)
            out.append(np.corrcoef(a, ref[valid].astype(float))[0, 1])
    assert np.median(pitches) < math.radians(-7)  # nose down ~10 deg at cruise
    assert np.median(corr_gimbal) > 0.8
    assert np.median(corr_vehicle) < np.median(corr_gimbal) - 0.3


def test_a_stop_brakes_nose_up_to_a_hover_at_its_waypoint_then_flies_on():
    from mean_nav.replay.simulate import fly

    route = [(0.0, 0.0, 60.0, 8.0), (0.0, 100.0, 60.0, 8.0), (100.0, 100.0, 60.0, 8.0), (100.0, 0.0, 60.0, 8.0)]
    calm = dict(turbulence_deg=0.0, duration_s=60.0)
    plain = fly(route, SimulationConfig(**calm), np.random.default_rng(0))
    stop = fly(route, SimulationConfig(**calm, stop_s=4.0, stop_waypoint=2), np.random.default_rng(0))
    speed = np.hypot(stop.vn, stop.ve)
    still = np.flatnonzero(speed < 1e-9)
    assert still.size and np.all(np.diff(still) == 1)                 # one hover
    hover = stop.time_s[still]
    assert hover[-1] - hover[0] == pytest.approx(4.0, abs=0.05)
    # where it stops: past waypoint 2 by at most the braking distance at 1.5 m/s^2 (+ 3 m reach)
    at = np.hypot(stop.x[still[0]] - 100.0, stop.y[still[0]] - 100.0)
    assert at < 8.0 ** 2 / (2 * 1.5) + 3.0 + 14.0                    # (the turn starts 0.8 turn radii early)
    braking = (stop.time_s < hover[0]) & (stop.time_s > hover[0] - 4.0) & (speed > 1.0)
    assert np.all(stop.pitch[braking] > 0) and stop.pitch[braking].max() == pytest.approx(math.atan(1.5 / G), abs=1e-3)
    before = plain.time_s < hover[0] - 8.0                          # identical up to the braking
    n = int(before.sum())
    assert np.array_equal(plain.x[:n], stop.x[:n]) and np.array_equal(plain.yaw[:n], stop.yaw[:n])
    after = stop.time_s > hover[-1] + 8.0
    assert np.hypot(stop.vn[after], stop.ve[after]).max() > 7.0      # flies on
    # without stop_s the route is flown exactly as before the option existed
    assert np.array_equal(fly(route, SimulationConfig(**calm, stop_waypoint=1), np.random.default_rng(0)).x, plain.x)


def test_a_duration_over_an_hour_laps_the_route_until_it_is_flown():
    from mean_nav.replay.simulate import fly

    route = [(0.0, 0.0, 60.0, 10.0), (0.0, 300.0, 60.0, 10.0), (300.0, 300.0, 60.0, 10.0), (300.0, 0.0, 60.0, 10.0)]
    trajectory = fly(route, SimulationConfig(turbulence_deg=0.0, duration_s=3700.0), np.random.default_rng(0))
    assert trajectory.time_s[-1] == pytest.approx(3700.0, abs=0.05)
