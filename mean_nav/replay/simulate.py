"""`mean-nav simulate-flight`: render a recorded-flight folder from a GeoTIFF orthophoto.

A multicopter flies a loop of straight legs inside the map (optionally one leg that
leaves it), with coordinated turns (bank = atan(v * turn rate / g)), pitch from
acceleration and climb, light turbulence, altitude changes between legs, and optionally
a stop (`--stop`: brake to a hover at a waypoint, hold it, turn, fly on). Frames are
rendered with perspective from the true attitude and height (`render_view`), then get a
flight-wide illumination/colour change plus per-frame blur and sensor noise
(`degrade_photometric`) and a few occluding blobs (vehicles, birds: `add_occlusions`).
Beyond the map edge the camera sees mirrored map imagery (`--outside mirror`): plausible
ground that is not in any cache, so a fix there is a real false fix, not an easy reject
of a black frame. telemetry.csv holds the true position; its attitude carries a slowly
varying estimator error (`--attitude-error`, correlation time `--attitude-error-tau`) as a
real autopilot's would, and optionally a constant heading error (`--heading-error`: a bad
compass). With `--gimbal` the camera hangs on a stabilising gimbal: it looks straight
down with the image top along the heading while the vehicle pitches and rolls
(`--cruise-pitch`: nose-down pitch at cruise speed), and telemetry.csv gets the gimbal's
own attitude (gimbal_roll/pitch/yaw columns, with the same estimator error).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import yaml

from ..config import bounded, validate
from ..errors import MeanNavError
from ..geo.crs import to_lonlat
from ..geo.raster import MetricRaster, read_metric_raster
from ..nav.camera_model import CameraModel, render_view
from ..nav.telemetry import Telemetry
from .flight import check_new_flight_folder, new_flight_folder, write_frames_csv
from .logs import write_telemetry_csv

log = logging.getLogger(__name__)

G = 9.80665
STEP_S = 0.02  # integration step of the vehicle model


@dataclass
class SimulationConfig:
    altitude_m: float = bounded(60.0, gt=0, le=10_000, unit="m")  # nominal height above ground
    altitude_change_m: float = bounded(8.0, ge=0, le=5000, unit="m")  # legs alternate between altitude +/- this
    speed_ms: float = bounded(8.0, gt=0, le=200, unit="m/s")  # cruise ground speed
    # legs alternate speed +/- this (acceleration pitches)
    speed_change_ms: float = bounded(2.0, ge=0, le=100, unit="m/s")
    max_bank_deg: float = bounded(25.0, gt=0, le=60, unit="deg")
    climb_rate_ms: float = bounded(1.5, gt=0, le=100, unit="m/s")
    fps: float = bounded(2.0, gt=0, le=240, unit="Hz")
    telemetry_hz: float = bounded(20.0, gt=0, le=1000, unit="Hz")
    duration_s: float | None = bounded(None, gt=0, le=86_400, unit="s")  # None: one lap of the planned route
    # keep the nadir this far inside the map edges (<0: outside them)
    margin_m: float = bounded(30.0, ge=-1e5, le=1e5, unit="m")
    leave_map_m: float = bounded(0.0, ge=0, le=1e5, unit="m")  # >0: one leg flies this far beyond the map edge and back
    # >0: on reaching route waypoint stop_waypoint the vehicle brakes to a hover, holds it this
    # long, then turns to the next waypoint (a stop: nose-up braking, zero speed)
    stop_s: float = bounded(0.0, ge=0, le=3600, unit="s")
    stop_waypoint: int = bounded(2, ge=1, le=1000)
    seed: int = bounded(0, ge=0, lt=2**32)
    width: int = bounded(640, ge=16, le=16384, unit="px")
    height: int = bounded(480, ge=16, le=16384, unit="px")
    hfov_deg: float = bounded(70.0, gt=0, lt=180, unit="deg")
    map_gsd_m: float = bounded(0.25, gt=0, le=100, unit="m")
    photometric_strength: float = bounded(0.5, ge=0, le=1)
    occlusion_strength: float = bounded(0.3, ge=0, le=1)  # chance of each of up to 3 blobs per frame
    outside: str = "mirror"           # ground beyond the map: "mirror" (mirrored map) or "black"
    attitude_error_deg: float = bounded(0.3, ge=0, le=45, unit="deg")  # telemetry roll/pitch error (yaw 3x), 1 sigma
    # correlation time of that error (slowly varying: tens of seconds)
    attitude_error_tau_s: float = bounded(5.0, gt=0, le=86_400, unit="s")
    heading_error_deg: float = bounded(0.0, ge=-360, le=360, unit="deg")  # constant telemetry yaw offset (bad compass)
    # steady nose-down pitch at cruise speed (drag), scaled by speed
    cruise_pitch_deg: float = bounded(0.0, ge=-45, le=45, unit="deg")
    gimbal: bool = False              # camera on a stabilising gimbal pointing straight down
    gimbal_jitter_deg: float = bounded(0.3, ge=0, le=10, unit="deg")  # residual wobble of the stabilised camera
    turbulence_deg: float = bounded(1.5, ge=0, le=45, unit="deg")  # true attitude wobble
    ground_amsl_m: float = bounded(10.0, ge=-500, le=9000, unit="m")  # terrain elevation (flat) for alt_m
    start_time_s: float = bounded(100.0, ge=0, le=1e10, unit="s")  # frame/telemetry clock at take-over
    jpeg_quality: int = bounded(92, ge=1, le=100)


@dataclass
class Trajectory:
    """Sampled truth: metric position in the map CRS, attitude, height, velocity."""

    time_s: np.ndarray
    x: np.ndarray
    y: np.ndarray
    height_m: np.ndarray
    roll: np.ndarray
    pitch: np.ndarray
    yaw: np.ndarray
    vn: np.ndarray
    ve: np.ndarray
    vd: np.ndarray
    waypoints: list = field(default_factory=list)

    def sample(self, times: np.ndarray) -> dict[str, np.ndarray]:
        out = {}
        for name in ("x", "y", "height_m", "vn", "ve", "vd", "roll", "pitch"):
            out[name] = np.interp(times, self.time_s, getattr(self, name))
        yaw = np.interp(times, self.time_s, np.unwrap(self.yaw))
        out["yaw"] = (yaw + np.pi) % (2 * np.pi) - np.pi
        return out


def plan_route(raster: MetricRaster, cfg: SimulationConfig) -> list[tuple[float, float, float, float]]:
    """Waypoints (x, y, height, speed): a loop around the valid map with a diagonal, plus
    optionally an out-and-back leg beyond the east edge."""
    rows, cols = np.nonzero(raster.valid)
    if rows.size == 0:
        raise MeanNavError(f"{raster.sources[0]}: the map has no valid pixels")
    x0, y1 = raster.pixel_to_xy(cols.min(), rows.min())
    x1, y0 = raster.pixel_to_xy(cols.max(), rows.max())
    m = cfg.margin_m
    if x1 - x0 < 2 * m + 40 or y1 - y0 < 2 * m + 40:
        raise MeanNavError(f"{raster.sources[0]}: map is {x1 - x0:.0f} x {y1 - y0:.0f} m, too small for "
                           f"margin_m={m:g}; lower --margin-m")
    left, right, bottom, top = x0 + m, x1 - m, y0 + m, y1 - m
    cx, cy = (left + right) / 2, (bottom + top) / 2
    corners = [(left, bottom), (left, top), (right, top), (right, bottom)]
    xy = corners + [(left, bottom), (right, top), (cx, cy)]
    if cfg.leave_map_m > 0:
        # out across the east edge at mid height and back to the centre
        xy += [(right, cy), (x1 + cfg.leave_map_m, cy), (right, cy), (cx, cy)]
    route = []
    for i, (x, y) in enumerate(xy):
        h = cfg.altitude_m + (cfg.altitude_change_m if i % 2 else -cfg.altitude_change_m) * (i > 0)
        v = cfg.speed_ms + (cfg.speed_change_ms if i % 3 == 1 else -cfg.speed_change_ms if i % 3 == 2 else 0)
        route.append((float(x), float(y), float(h), max(float(v), 1.0)))
    return route


def fly(route, cfg: SimulationConfig, rng: np.random.Generator) -> Trajectory:
    """Integrate a point-mass multicopter along `route` with bank-limited turns."""
    x, y, h, v = route[0][0], route[0][1], route[0][2], route[0][3]
    heading = math.atan2(route[1][0] - x, route[1][1] - y)  # from north, clockwise
    max_rate_at = lambda speed: G * math.tan(math.radians(cfg.max_bank_deg)) / max(speed, 0.5)
    wp = 1
    t = 0.0
    out = {k: [] for k in ("time_s", "x", "y", "height_m", "roll", "pitch", "yaw", "vn", "ve", "vd")}
    turb = np.zeros(3)
    tau = 1.5  # turbulence correlation time, s
    limit = cfg.duration_s
    stop = "pending" if cfg.stop_s > 0 else "done"   # pending -> braking -> hover -> done
    hover_end = math.inf
    while True:
        tx, ty, th, tv = route[wp]
        dist = math.hypot(tx - x, ty - y)
        turn_radius = v / max_rate_at(v)
        if stop in ("braking", "hover"):
            # brake along the heading (nose up), hover, then fly on to the next waypoint
            tv = 0.0
            if stop == "braking" and v < 0.1:
                stop, hover_end, v = "hover", t + cfg.stop_s, 0.0
            if stop == "hover" and t >= hover_end:
                stop = "done"
                continue
        elif dist < max(3.0, 0.8 * turn_radius):
            if stop == "pending" and wp == cfg.stop_waypoint:
                stop = "braking"
            wp += 1
            if wp >= len(route):
                if limit is None or t >= limit:
                    break
                wp = 1  # lap again until the duration is flown
            continue
        desired = math.atan2(tx - x, ty - y)
        err = (desired - heading + math.pi) % (2 * math.pi) - math.pi
        if stop in ("braking", "hover"):
            err = 0.0   # the heading is held while stopping
        rate = float(np.clip(1.2 * err, -max_rate_at(v), max_rate_at(v)))
        accel = float(np.clip((1.5 if stop == "braking" else 0.6) * (tv - v), -1.5, 1.5))
        climb = float(np.clip(0.5 * (th - h), -cfg.climb_rate_ms, cfg.climb_rate_ms))
        # first-order coloured noise for gusts
        turb += (-turb / tau) * STEP_S + rng.normal(0, math.radians(cfg.turbulence_deg), 3) * math.sqrt(2 * STEP_S / tau)
        roll = math.atan(v * rate / G) + turb[0]
        # a multicopter noses down to speed up, and to hold speed against drag
        pitch = -math.atan(accel / G) - math.radians(cfg.cruise_pitch_deg) * v / cfg.speed_ms + turb[1]
        yaw = heading + 0.5 * turb[2]
        vn, ve = v * math.cos(heading), v * math.sin(heading)
        for k, val in (("time_s", t), ("x", x), ("y", y), ("height_m", h), ("roll", roll), ("pitch", pitch),
                       ("yaw", (yaw + math.pi) % (2 * math.pi) - math.pi), ("vn", vn), ("ve", ve), ("vd", -climb)):
            out[k].append(val)
        x += ve * STEP_S
        y += vn * STEP_S
        h += climb * STEP_S
        v += accel * STEP_S
        heading += rate * STEP_S
        t += STEP_S
        if limit is not None and t >= limit:
            break
        if limit is None and t > 3600:   # one lap that never ends (a duration_s ends at its limit)
            raise MeanNavError("simulate-flight: route not finished after an hour; check speed and margins")
    arrays = {k: np.asarray(v_, float) for k, v_ in out.items()}
    return Trajectory(waypoints=list(route), **arrays)


def colour_shift(rng: np.random.Generator, strength: float):
    """A flight-wide illumination and white-balance change (season/time of day vs. the map)."""
    gain = 1.0 + strength * rng.uniform(-0.25, 0.25)
    tint = 1.0 + strength * rng.uniform(-0.08, 0.08, 3)
    gamma = 1.0 + strength * rng.uniform(-0.2, 0.2)
    lut = np.stack([np.clip(255 * ((np.arange(256) / 255.0) ** gamma) * gain * tint[c], 0, 255)
                    for c in range(3)], 1).astype(np.uint8)

    def apply(img: np.ndarray) -> np.ndarray:
        return np.stack([lut[:, c][img[..., c]] for c in range(3)], -1)

    return apply


def _degradations():
    """Photometric degradation and occlusions shared with the synthetic training pairs."""
    from ..data.augment import add_occlusions, degrade_photometric

    return degrade_photometric, add_occlusions


def inner_valid_rect(valid: np.ndarray) -> tuple[int, int, int, int]:
    """(row0, row1, col0, col1) of a large axis-aligned rectangle with only valid pixels,
    found by shaving the edge with the most invalid pixels (reprojected maps have slanted
    nodata borders)."""
    rows, cols = np.flatnonzero(valid.any(1)), np.flatnonzero(valid.any(0))
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    while r1 - r0 > 2 and c1 - c0 > 2:
        holes = ~valid[r0:r1, c0:c1]
        if not holes.any():
            break
        edge = int(np.argmax([holes[0].sum(), holes[-1].sum(), holes[:, 0].sum(), holes[:, -1].sum()]))
        r0, r1, c0, c1 = (r0 + (edge == 0), r1 - (edge == 1), c0 + (edge == 2), c1 - (edge == 3))
    return r0, r1, c0, c1


def ground_image(raster: MetricRaster, pad_m: float, outside: str) -> tuple[np.ndarray, int]:
    """The map image padded by `pad_m` on every side with what the camera sees beyond the map
    (mirrored map or black); returns (image, pad in pixels). With "mirror" the map's own
    nodata border is filled by the mirror too, so no black seams appear beyond the edge."""
    if outside not in ("mirror", "black"):
        raise MeanNavError(f"simulate-flight --outside {outside!r}: use mirror or black")
    pad = int(math.ceil(pad_m / raster.gsd_m))
    if outside == "black":
        return cv2.copyMakeBorder(raster.image, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0), pad
    h, w = raster.shape
    r0, r1, c0, c1 = inner_valid_rect(raster.valid)
    if (r1 - r0) * (c1 - c0) < 0.25 * raster.valid.sum():  # mostly nodata: mirror the whole raster
        r0, r1, c0, c1 = 0, h, 0, w
    ground = cv2.copyMakeBorder(raster.image[r0:r1, c0:c1], pad + r0, pad + h - r1, pad + c0, pad + w - c1,
                                cv2.BORDER_REFLECT_101)
    inside = ground[pad:pad + h, pad:pad + w]
    inside[raster.valid] = raster.image[raster.valid]  # the map itself stays exactly as it is
    return ground, pad


def simulate_flight(map_paths: list[Path], out_dir: Path, cfg: SimulationConfig, progress: bool = True) -> Path:
    """Write a complete flight folder to `out_dir` (built in a temp folder, then renamed)."""
    out_dir = Path(out_dir)
    check_new_flight_folder(out_dir)  # before the slow part
    if min(cfg.fps, cfg.telemetry_hz, cfg.speed_ms, cfg.altitude_m, cfg.attitude_error_tau_s) <= 0:
        raise MeanNavError("simulate-flight: fps, telemetry rate, speed, altitude and attitude error "
                           "correlation time must be positive")
    for name in ("photometric_strength", "occlusion_strength"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise MeanNavError(f"simulate-flight {name}: must be between 0 and 1, got {getattr(cfg, name)}")
    rng = np.random.default_rng(cfg.seed)
    raster = read_metric_raster(map_paths, cfg.map_gsd_m)
    route = plan_route(raster, cfg)
    traj = fly(route, cfg, rng)
    cam = CameraModel.from_fov(cfg.width, cfg.height, cfg.hfov_deg)
    degrade, occlude = _degradations()
    # the camera footprint reaches about height * tan(diagonal half-FOV) beyond the nadir
    reach_m = (cfg.altitude_m + cfg.altitude_change_m) * 1.5 + cfg.leave_map_m + abs(cfg.margin_m)
    ground, pad = ground_image(raster, reach_m, cfg.outside)
    shift_px = np.array([[1, 0, pad], [0, 1, pad], [0, 0, 1.0]])
    shift = colour_shift(rng, cfg.photometric_strength)

    with new_flight_folder(out_dir) as tmp:
        _write_flight(tmp, raster, route, traj, cam, ground, shift_px, shift, degrade, occlude, rng, cfg, map_paths,
                      progress)
    log.info("wrote %.0f s of flight to %s", traj.time_s[-1], out_dir)
    return out_dir


def _write_flight(tmp: Path, raster: MetricRaster, route, traj: Trajectory, cam: CameraModel, ground: np.ndarray,
                  shift_px: np.ndarray, shift, degrade, occlude, rng: np.random.Generator, cfg: SimulationConfig,
                  map_paths, progress: bool) -> None:
    from tqdm import tqdm

    cam.to_yaml(tmp / "camera.yaml")

    # telemetry: truth position, attitude with a slowly varying estimator error
    t_tel = np.arange(0.0, traj.time_s[-1] + 1e-9, 1.0 / cfg.telemetry_hz)
    s = traj.sample(t_tel)
    err = _smooth_noise(rng, len(t_tel), cfg.telemetry_hz, math.radians(cfg.attitude_error_deg),
                        cfg.attitude_error_tau_s)
    heading_error = math.radians(cfg.heading_error_deg)
    camera = camera_attitude(s, cfg, rng, cfg.telemetry_hz)
    lon, lat = to_lonlat(raster.crs, s["x"], s["y"])
    rows, truth = [], []
    for i, t in enumerate(t_tel):
        true = Telemetry(time_s=cfg.start_time_s + float(t), roll=float(s["roll"][i]), pitch=float(s["pitch"][i]),
                         yaw=float(s["yaw"][i]), rel_alt_m=float(s["height_m"][i]),
                         alt_amsl_m=float(s["height_m"][i] + cfg.ground_amsl_m),
                         vn=float(s["vn"][i]), ve=float(s["ve"][i]), vd=float(s["vd"][i]),
                         lat=float(lat[i]), lon=float(lon[i]))
        if camera is not None:
            true = dataclasses.replace(true, gimbal_roll=float(camera[i, 0]), gimbal_pitch=float(camera[i, 1]),
                                       gimbal_yaw=float(camera[i, 2]))
        truth.append(true)
        # what the autopilot (and the gimbal's own IMU) believe
        measured = dataclasses.replace(true, roll=true.roll + err[i, 0], pitch=true.pitch + err[i, 1],
                                       yaw=wrap_angle(true.yaw + 3 * err[i, 2] + heading_error))
        if camera is not None:
            measured = dataclasses.replace(measured, gimbal_roll=true.gimbal_roll + err[i, 0],
                                           gimbal_pitch=true.gimbal_pitch + err[i, 1],
                                           gimbal_yaw=wrap_angle(true.gimbal_yaw + 3 * err[i, 2] + heading_error))
        rows.append(measured)
    write_telemetry_csv(tmp / "telemetry.csv", rows)
    # the same rows with the true attitude: what the camera really did (for diagnosis)
    write_telemetry_csv(tmp / "truth.csv", truth)

    # frames: truth attitude and height, rendered then degraded
    # camera not synchronised with telemetry: frames fall between telemetry samples
    t_frames = np.arange(0.5 / cfg.fps + 0.37 / cfg.telemetry_hz, traj.time_s[-1], 1.0 / cfg.fps)
    f = traj.sample(t_frames)
    gimbal_at_frames = None
    if camera is not None:  # interpolate the camera attitude of the telemetry clock to the frames
        unwrapped = np.unwrap(camera, axis=0)
        gimbal_at_frames = np.stack([np.interp(t_frames, t_tel, unwrapped[:, k]) for k in range(3)], 1)
    for i in tqdm(range(len(t_frames)), desc="render frames", unit="frame", disable=not progress):
        m = shift_px @ raster.map_from_ground(f["x"][i], f["y"][i])
        gimbal = None if gimbal_at_frames is None else tuple(float(v) for v in gimbal_at_frames[i])
        view = render_view(ground, m, cam, f["roll"][i], f["pitch"][i], f["yaw"][i], f["height_m"][i],
                           gimbal=gimbal)
        view = occlude(view, rng, cfg.occlusion_strength)
        view = degrade(shift(view), rng, cfg.photometric_strength)
        cv2.imwrite(str(tmp / "frames" / f"{i:06d}.jpg"), cv2.cvtColor(view, cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, cfg.jpeg_quality])
    write_frames_csv(tmp / "frames.csv", range(len(t_frames)), cfg.start_time_s + t_frames)
    meta = {
        "description": f"simulated over {', '.join(p.name for p in map_paths)}",
        "map": [str(Path(p).resolve()) for p in map_paths],
        "simulated": {**asdict(cfg), "crs": raster.crs.to_string(),
                      "route_xy_h_speed": [list(w) for w in route]},
    }
    (tmp / "flight.yaml").write_text(yaml.safe_dump(meta, sort_keys=False), encoding="utf-8")


def wrap_angle(a: float) -> float:
    return float((a + math.pi) % (2 * math.pi) - math.pi)


def camera_attitude(s: dict[str, np.ndarray], cfg: SimulationConfig, rng: np.random.Generator,
                    rate_hz: float) -> np.ndarray | None:
    """[n, 3] true gimbal (roll, pitch, yaw) of a stabilised camera looking straight down with
    the image top along the vehicle heading, with a small residual wobble; None without gimbal."""
    if not cfg.gimbal:
        return None
    wobble = _smooth_noise(rng, len(s["yaw"]), rate_hz, math.radians(cfg.gimbal_jitter_deg), tau_s=0.5)
    out = np.stack([wobble[:, 0], -math.pi / 2 + wobble[:, 1], s["yaw"] + wobble[:, 2]], 1)
    out[:, 2] = (out[:, 2] + math.pi) % (2 * math.pi) - math.pi
    return out


def _smooth_noise(rng: np.random.Generator, n: int, rate_hz: float, sigma: float, tau_s: float = 5.0) -> np.ndarray:
    """Gauss-Markov noise [n, 3] with standard deviation `sigma` and correlation time `tau_s`."""
    a = math.exp(-1.0 / (rate_hz * tau_s))
    out = np.zeros((n, 3))
    state = rng.normal(0, sigma, 3)
    for i in range(n):
        state = a * state + math.sqrt(1 - a * a) * rng.normal(0, sigma, 3)
        out[i] = state
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = SimulationConfig()
    parser.add_argument("maps", nargs="+", type=Path, help="GeoTIFF orthophoto(s) to fly over")
    parser.add_argument("-o", "--out", type=Path, required=True, help="flight folder to create")
    parser.add_argument("--altitude", type=float, default=d.altitude_m, help="height above ground, m")
    parser.add_argument("--altitude-change", type=float, default=d.altitude_change_m, help="+/- m between legs")
    parser.add_argument("--speed", type=float, default=d.speed_ms, help="cruise ground speed, m/s")
    parser.add_argument("--fps", type=float, default=d.fps, help="camera frame rate")
    parser.add_argument("--duration", type=float, default=None, help="seconds (default: one lap of the route)")
    parser.add_argument("--margin", type=float, default=d.margin_m, help="keep the track this far inside the map, m")
    parser.add_argument("--leave-map", type=float, default=d.leave_map_m,
                        help="add a leg flying this many metres beyond the map edge and back (0: none)")
    parser.add_argument("--stop", type=float, default=d.stop_s,
                        help="brake to a hover at waypoint --stop-waypoint and hold it this many seconds (0: none)")
    parser.add_argument("--stop-waypoint", type=int, default=d.stop_waypoint,
                        help="route waypoint of the stop (1: the end of the first leg)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--size", type=int, nargs=2, default=(d.width, d.height), metavar=("W", "H"),
                        help="camera image size in pixels")
    parser.add_argument("--hfov", type=float, default=d.hfov_deg, help="camera horizontal field of view, degrees")
    parser.add_argument("--map-gsd", type=float, default=d.map_gsd_m, help="map resampling for rendering, m/px")
    parser.add_argument("--photometric", type=float, default=d.photometric_strength,
                        help="illumination/colour/blur/noise strength 0..1")
    parser.add_argument("--occlusions", type=float, default=d.occlusion_strength,
                        help="occluding blobs (vehicles, birds) strength 0..1")
    parser.add_argument("--outside", choices=("mirror", "black"), default=d.outside,
                        help="ground beyond the map: mirrored map imagery (default) or black")
    parser.add_argument("--attitude-error", type=float, default=d.attitude_error_deg,
                        help="telemetry roll/pitch error (1 sigma, degrees; yaw 3x)")
    parser.add_argument("--attitude-error-tau", type=float, default=d.attitude_error_tau_s,
                        help="correlation time of the attitude error, s")
    parser.add_argument("--heading-error", type=float, default=d.heading_error_deg,
                        help="constant telemetry yaw error, degrees (bad compass)")
    parser.add_argument("--cruise-pitch", type=float, default=d.cruise_pitch_deg,
                        help="nose-down pitch at cruise speed, degrees")
    parser.add_argument("--gimbal", action="store_true",
                        help="camera on a stabilising gimbal looking straight down (gimbal columns in telemetry)")


def config_from_args(args) -> SimulationConfig:
    return validate(SimulationConfig(
        altitude_m=args.altitude, altitude_change_m=args.altitude_change, speed_ms=args.speed, fps=args.fps,
        duration_s=args.duration, margin_m=args.margin, leave_map_m=args.leave_map, seed=args.seed,
        stop_s=args.stop, stop_waypoint=args.stop_waypoint,
        width=args.size[0], height=args.size[1], hfov_deg=args.hfov, map_gsd_m=args.map_gsd,
        photometric_strength=args.photometric, occlusion_strength=args.occlusions, outside=args.outside,
        attitude_error_deg=args.attitude_error, attitude_error_tau_s=args.attitude_error_tau,
        heading_error_deg=args.heading_error, cruise_pitch_deg=args.cruise_pitch, gimbal=args.gimbal),
        "simulate-flight options")


def run(args) -> int:
    out = simulate_flight(args.maps, args.out, config_from_args(args))
    print(f"flight folder: {out}")
    return 0
