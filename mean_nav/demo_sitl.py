"""`mean-nav demo --sitl`: GNSS-free flight with a real autopilot (ArduCopter SITL) in the loop.

  1. map and cache: the demo's procedural world (300 m square) and its tile cache, built
     with the shipped demo model (mean_nav/assets/demo_lite0.onnx);
  2. ArduCopter SITL (../shared/sitl) at home = the map centre, GPS1 = SITL's simulated
     GNSS, GPS2 = mean-nav (GPS2_TYPE 14, GPS_INPUT gps_id 1), GPS_AUTO_SWITCH 0;
  3. the daemon (`mean-nav run`, a separate process) with the `sim://` camera: frames
     rendered from SITL's true pose (SIM_STATE), telemetry and GPS_INPUT over SERIAL1;
  4. the flight, commanded as a ground station would over SERIAL0: arm and take off in
     GUIDED on GNSS; once mean-nav holds a 3D fix, GPS_PRIMARY 1 and SIM_GPS1_ENABLE 0 (the
     EKF now runs on mean-nav alone); a rectangle route (5 corners, 540 m) at 60 m; land;
     with `faults` "camera": the camera is lost for 10 s mid-route; "edge": after the route
     one leg crosses the map edge (80 m beyond) and comes back;
  5. the report: what ArduPilot said, the true track (SIM_STATE) against the route, EKF
     vs truth vs mean-nav, error over time (report.png, summary.json).

SITL and the daemon run at normal priority (when allowed: as root), everything else as it
was started (niced): SITL must keep real time, and the daemon plays the companion computer,
which on a vehicle has its own CPU. On a shared, loaded machine a niced daemon was starved
(frames taking 1-2 s instead of 30 ms), which is the machine's load, not the product.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import MeanNavError

log = logging.getLogger(__name__)

PROJECT = Path(__file__).resolve().parents[1]
SHARED_SITL = PROJECT.parent / "shared" / "sitl"
GUIDED, LAND = 4, 9
ARMED_FLAG = 128            # HEARTBEAT base_mode MAV_MODE_FLAG_SAFETY_ARMED


@dataclass
class SitlFlightConfig:
    sitl_dir: Path = SHARED_SITL
    instance: int = 0                      # SITL -I: ports 5760 + 10 * instance ...
    altitude_m: float = 80.0                # the 70 deg camera then sees a whole 60 m tile, also banked in turns
    speed_ms: float = 8.0
    ground_amsl_m: float = 10.0
    # route corners in metres east, north of home (the map centre): 5 legs, 4 turns
    route_en: list = field(default_factory=lambda: [(-75.0, -60.0), (-75.0, 60.0), (75.0, 60.0), (75.0, -60.0),
                                                    (-75.0, -60.0)])
    camera_fps: float = 2.0
    faults: tuple = ()                     # "camera": lost 10 s mid-route; "edge": a leg across the map edge
    camera_outage_s: float = 10.0
    edge_leg_en: tuple = (230.0, 0.0)      # 80 m beyond the east edge of the 300 m world
    model_threads: int = 1
    timeout_s: float = 600.0

    @property
    def ports(self) -> tuple[int, int, int]:
        base = 5760 + 10 * self.instance
        return base, base + 2, base + 3   # SERIAL0 (ground station), SERIAL1 (daemon), SERIAL2 (camera)


def sitl_available(sitl_dir: Path = SHARED_SITL) -> str:
    """'' when the shared SITL can run here, else why not."""
    if not (sitl_dir / "arducopter").is_file():
        return f"{sitl_dir}/arducopter not found (the shared ArduCopter SITL)"
    if not (sitl_dir / "copter.parm").is_file():
        return f"{sitl_dir}/copter.parm not found"
    return ""


# --- processes ---------------------------------------------------------------------------
def _normal_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 0)    # real time for the vehicle's side (possible as root)
    except OSError:
        pass


def stop_process(proc: subprocess.Popen | None, timeout_s: float = 10.0) -> None:
    """Stop one process we started, by its PID: SIGTERM, then SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


# --- the ground station ------------------------------------------------------------------
class GroundStation(threading.Thread):
    """SERIAL0 of SITL: commands the flight and records what the autopilot reports."""

    def __init__(self, port: int):
        super().__init__(name="gcs", daemon=True)
        from .nav.mavlink_io import MAV, mavutil

        self.MAV = MAV
        deadline = time.monotonic() + 30.0
        while True:
            try:
                self.conn = mavutil.mavlink_connection(f"tcp:127.0.0.1:{port}", source_system=255,
                                                       source_component=190, dialect="common", retries=0)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise MeanNavError(f"SITL: nothing listens on 127.0.0.1:{port}; see sitl.log") from None
                time.sleep(0.5)
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.truth, self.ekf, self.gps1, self.gps2, self.texts, self.modes = [], [], [], [], [], []
        self.params: dict[str, float] = {}
        # SITL's own clock: SIM_STATE has no time field, but SITL sends it in the same pass as
        # SYSTEM_TIME and GLOBAL_POSITION_INT of the same interval (right after them)
        self.sitl_s = math.nan
        self.armed = False
        self.mode = -1
        self.target = (1, 1)
        self.watch = None          # called while waiting: raises when a process the flight needs died

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                msg = self.conn.recv_match(blocking=True, timeout=0.2)
            except Exception:
                return
            if msg is None:
                continue
            t = time.time()
            kind = msg.get_type()
            boot_ms = getattr(msg, "time_boot_ms", None)
            if boot_ms is not None:
                self.sitl_s = boot_ms / 1000.0
            if kind == "SIM_STATE":
                lat = msg.lat_int / 1e7 if msg.lat_int else msg.lat
                lon = msg.lon_int / 1e7 if msg.lon_int else msg.lon
                self.truth.append((t, lat, lon, msg.alt, msg.vn, msg.ve, math.degrees(msg.roll), math.degrees(msg.pitch),
                                   self.sitl_s))
            elif kind == "GLOBAL_POSITION_INT":
                self.ekf.append((t, msg.lat / 1e7, msg.lon / 1e7, msg.relative_alt / 1000.0, self.sitl_s))
            elif kind == "GPS_RAW_INT":
                self.gps1.append((t, msg.fix_type))
            elif kind == "GPS2_RAW":
                self.gps2.append((t, msg.fix_type, msg.lat / 1e7, msg.lon / 1e7, msg.h_acc / 1000.0))
            elif kind == "STATUSTEXT":
                self.texts.append((t, msg.text))
                log.info("ArduPilot: %s", msg.text)
            elif kind == "PARAM_VALUE":
                self.params[msg.param_id] = msg.param_value
            elif kind == "HEARTBEAT" and msg.get_srcComponent() == 1 and msg.type != 18:
                self.target = (msg.get_srcSystem(), msg.get_srcComponent())
                self.armed = bool(msg.base_mode & ARMED_FLAG)
                if msg.custom_mode != self.mode:
                    self.modes.append((t, msg.custom_mode))
                self.mode = msg.custom_mode

    def close(self) -> None:
        self.stop_event.set()
        self.join(timeout=3)
        self.conn.close()

    # commands
    def command(self, command: int, *params: float) -> None:
        p = list(params) + [0.0] * (7 - len(params))
        with self.lock:
            self.conn.mav.command_long_send(*self.target, command, 0, *p)

    def request_streams(self) -> None:
        MAV = self.MAV
        for msg_id, hz in ((MAV.MAVLINK_MSG_ID_SYSTEM_TIME, 10), (MAV.MAVLINK_MSG_ID_GLOBAL_POSITION_INT, 10),
                           (MAV.MAVLINK_MSG_ID_SIM_STATE, 10),
                           (MAV.MAVLINK_MSG_ID_GPS_RAW_INT, 5), (MAV.MAVLINK_MSG_ID_GPS2_RAW, 5)):
            self.command(MAV.MAV_CMD_SET_MESSAGE_INTERVAL, msg_id, 1e6 / hz)

    def set_param(self, name: str, value: float, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                self.conn.mav.param_set_send(*self.target, name.encode(), float(value),
                                             self.MAV.MAV_PARAM_TYPE_REAL32)
            time.sleep(0.3)
            if name in self.params and abs(self.params[name] - value) < 1e-3:
                return
        raise MeanNavError(f"SITL: parameter {name} did not take the value {value}")

    def set_mode(self, mode: int) -> None:
        self.command(self.MAV.MAV_CMD_DO_SET_MODE, 1, mode)

    def goto(self, lat: float, lon: float, rel_alt_m: float) -> None:
        mask = 0b110111111000          # position only
        with self.lock:
            self.conn.mav.set_position_target_global_int_send(
                0, *self.target, self.MAV.MAV_FRAME_GLOBAL_RELATIVE_ALT_INT, mask, int(lat * 1e7), int(lon * 1e7),
                rel_alt_m, 0, 0, 0, 0, 0, 0, 0, 0)

    def wait(self, what: str, condition, timeout_s: float, every=None) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if self.watch:
                self.watch()
            if time.monotonic() > deadline:
                raise MeanNavError(f"SITL flight: timed out waiting for {what}")
            if every:
                every()
            time.sleep(0.5)


def check_running(proc: subprocess.Popen, name: str, log_path: Path) -> None:
    """Raise with the last line of its log where `proc` has exited (waiting on would only time out)."""
    status = proc.poll()
    if status is None:
        return
    try:
        lines = [l for l in log_path.read_text(encoding="utf-8", errors="replace").splitlines() if l.strip()]
    except OSError:
        lines = []
    last = lines[-1].strip() if lines else "(nothing logged)"
    raise MeanNavError(f"SITL flight: {name} exited with status {status}: {last} (see {log_path})")


# --- the flight --------------------------------------------------------------------------
def prepare(out: Path, cfg: SitlFlightConfig, progress: bool = True):
    """World, cache, camera model, home and the route in lon/lat."""
    from .demo import DemoConfig, ensure_model, world_and_cache
    from .geo.crs import from_lonlat, to_lonlat
    from .geo.raster import read_metric_raster
    from .nav.camera_model import CameraModel

    demo = DemoConfig(threads=cfg.model_threads)
    model = ensure_model(None)
    world, _ = world_and_cache(out, demo, model, progress)
    raster = read_metric_raster([world], 1.0)
    lon0, lat0 = raster.centre_lonlat()
    crs = raster.crs
    x0, y0 = from_lonlat(crs, lon0, lat0)

    def lonlat(e, n):
        lon, lat = to_lonlat(crs, float(x0) + e, float(y0) + n)
        return float(lon), float(lat)

    CameraModel.from_fov(demo.camera_px[0], demo.camera_px[1], demo.hfov_deg).to_yaml(out / "camera.yaml")
    return world, model, out / "cache", (lon0, lat0), lonlat, (crs, float(x0), float(y0))


def write_configs(out: Path, cfg: SitlFlightConfig, world: Path, model: Path, cache_dir: Path, home) -> Path:
    import yaml

    _, serial1, serial2 = cfg.ports
    nav = {
        "camera": {"uri": f"sim://{world.resolve()}?camera=camera.yaml&mavlink=tcp:127.0.0.1:{serial2}"
                          f"&fps={cfg.camera_fps:g}&ground={cfg.ground_amsl_m:g}&pause_file=camera_lost",
                   "calibration": "camera.yaml", "reopen_max_s": 1.0},
        "model": {"path": str(model), "threads": cfg.model_threads},
        "cache": {"path": str(cache_dir.resolve())},
        "mavlink": {"connection": f"tcp:127.0.0.1:{serial1}", "gps_id": 1, "silent_until_first_fix": True},
        "output": {"rate_hz": 5.0, "altitude": "baro", "output_log": str((out / "output.jsonl").resolve())},
        "initial_lat": home[1], "initial_lon": home[0],
        "frame_log": str((out / "frames.jsonl").resolve()),
    }
    path = out / "nav.yaml"
    path.write_text(yaml.safe_dump(nav, sort_keys=False), encoding="utf-8")
    # GPS2 (mean-nav) is configured only in the air: Copter's arming check wants every configured
    # GPS at a 3D fix ("PreArm: GPS 2: Bad fix"), and a downward camera has none on the ground
    params = {"GPS1_TYPE": 1, "GPS2_TYPE": 0, "GPS_AUTO_SWITCH": 0, "GPS_PRIMARY": 0, "SIM_GPS1_ENABLE": 1,
              "SERIAL1_PROTOCOL": 2, "SERIAL2_PROTOCOL": 2, "WPNAV_SPEED": cfg.speed_ms * 100,
              "WPNAV_SPEED_UP": 400, "WPNAV_SPEED_DN": 300, "LAND_SPEED": 100,
              # EKF3 takes horizontal velocity from its IMU and the fixes' positions: the visual
              # velocity lags the truth by ~0.5 s at 2 fps, and fused it made LAND wander +-1.5 m/s
              "EK3_SRC1_VELXY": 0}
    (out / "mean_nav.parm").write_text("".join(f"{k} {v:g}\n" for k, v in params.items()), encoding="utf-8")
    return path


def fly(out: Path, cfg: SitlFlightConfig | None = None, progress: bool = True) -> dict:
    """Run the whole flight; returns the summary (also written to out/summary.json)."""
    cfg = cfg or SitlFlightConfig()
    why = sitl_available(cfg.sitl_dir)
    if why:
        raise MeanNavError(f"demo --sitl: {why}")
    # absolute: SITL and the daemon run in `out`, and the paths handed to them must hold there
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("frames.jsonl", "output.jsonl", "camera_lost"):
        (out / stale).unlink(missing_ok=True)
    world, model, cache_dir, home, lonlat, frame = prepare(out, cfg, progress)
    nav_yaml = write_configs(out, cfg, world, model, cache_dir, home)
    serial0, _, _ = cfg.ports
    sitl = daemon = gcs = None
    events: dict[str, float] = {}
    started = time.time()
    sitl_log, daemon_log = open(out / "sitl.log", "wb"), open(out / "daemon.log", "wb")
    try:
        sitl = subprocess.Popen(
            [str(cfg.sitl_dir / "arducopter"), "--model", "+", "--speedup", "1", "--defaults",
             f"{cfg.sitl_dir / 'copter.parm'},{(out / 'mean_nav.parm').resolve()}",
             "--home", f"{home[1]:.7f},{home[0]:.7f},{cfg.ground_amsl_m:g},0", f"-I{cfg.instance}", "--wipe"],
            cwd=out, stdout=sitl_log, stderr=subprocess.STDOUT, preexec_fn=_normal_priority)
        gcs = GroundStation(serial0)
        gcs.start()
        env = dict(os.environ, PYTHONPATH=str(PROJECT))
        daemon = subprocess.Popen([sys.executable, "-m", "mean_nav.cli", "run", "--config", str(nav_yaml)],
                                  cwd=out, env=env, stdout=daemon_log,
                                  stderr=subprocess.STDOUT, preexec_fn=_normal_priority)
        gcs.watch = lambda: (check_running(daemon, "the mean-nav daemon", out / "daemon.log"),
                             check_running(sitl, "SITL", out / "sitl.log"))
        gcs.wait("the autopilot's heartbeat", lambda: gcs.mode >= 0, 60)
        gcs.request_streams()
        _flight(gcs, cfg, lonlat, out, events)
    finally:
        stop_process(daemon)
        if gcs is not None:
            gcs.close()
        stop_process(sitl)
        sitl_log.close()
        daemon_log.close()
    events["total_s"] = time.time() - started
    np.savez(out / "series.npz", truth=np.array(gcs.truth), ekf=np.array(gcs.ekf), gps2=np.array(gcs.gps2),
             gps1=np.array(gcs.gps1), texts=np.array(gcs.texts, dtype=object), events=json.dumps(events))
    judged = _judged(out, gcs, frame)
    summary = analyse(out, gcs, cfg, frame, events, judged)
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    plot_report(world, out, cfg, frame, events, judged)
    return summary


def _flight(gcs: GroundStation, cfg: SitlFlightConfig, lonlat, out: Path, events: dict) -> None:
    def rel_alt():
        return gcs.ekf[-1][3] if gcs.ekf else 0.0

    def gps2_fixed_for(seconds):
        recent = [g for g in gcs.gps2 if g[0] > time.time() - seconds]
        return len(recent) >= 3 * seconds and all(g[1] >= 3 for g in recent)

    def arm():
        gcs.set_mode(GUIDED)
        gcs.command(gcs.MAV.MAV_CMD_COMPONENT_ARM_DISARM, 1)

    gcs.wait("GNSS 3D fix", lambda: gcs.gps1 and gcs.gps1[-1][1] >= 3, 90)
    gcs.wait("arming in GUIDED on GNSS", lambda: gcs.armed, 120, every=lambda: (arm(), time.sleep(2.5)))
    events["armed"] = time.time()
    gcs.command(gcs.MAV.MAV_CMD_NAV_TAKEOFF, 0, 0, 0, 0, 0, 0, cfg.altitude_m)
    gcs.wait("take-off altitude", lambda: rel_alt() > cfg.altitude_m - 2, 90)
    events["airborne"] = time.time()
    gcs.set_param("GPS2_TYPE", 14)
    gcs.wait("a steady mean-nav 3D fix on GPS2", lambda: gps2_fixed_for(3), 90)
    # mean-nav takes over: the EKF now runs on GPS2 alone, the simulated GNSS is switched off
    gcs.set_param("GPS_PRIMARY", 1)
    gcs.set_param("SIM_GPS1_ENABLE", 0)
    events["switched"] = time.time()
    time.sleep(3.0)

    def leg(target_en, name):
        events["land_at_en"] = tuple(target_en)     # LAND comes down where the last leg ended
        lon, lat = lonlat(*target_en)
        gcs.goto(lat, lon, cfg.altitude_m)
        distance = math.hypot(*np.subtract(target_en, _en(gcs.ekf[-1], lonlat)))

        def arrived():
            if gcs.mode != GUIDED:
                return True        # a failsafe took over: the route is over
            return math.hypot(*np.subtract(target_en, _en(gcs.ekf[-1], lonlat))) < 2.0
        gcs.wait(f"waypoint {name}", arrived, distance / cfg.speed_ms + 40)
        events[f"wp_{name}"] = time.time()

    for i, corner in enumerate(cfg.route_en):
        if "camera" in cfg.faults and i == 2:
            # mid-route: the camera is lost for camera_outage_s while flying the next leg
            lon, lat = lonlat(*corner)
            gcs.goto(lat, lon, cfg.altitude_m)
            time.sleep(4.0)
            (out / "camera_lost").touch()
            events["camera_lost"] = time.time()
            time.sleep(cfg.camera_outage_s)
            (out / "camera_lost").unlink()
            events["camera_back"] = time.time()
        leg(corner, str(i + 1))
        if gcs.mode != GUIDED:
            break
    events["route_done"] = time.time()
    if "edge" in cfg.faults and gcs.mode == GUIDED:
        events["edge_leg"] = time.time()
        leg(cfg.edge_leg_en, "beyond_edge")
        if gcs.mode == GUIDED:
            leg((0.0, 0.0), "back")
    events["landing"] = time.time()
    gcs.set_mode(LAND)
    gcs.wait("landing and disarm", lambda: not gcs.armed, 150)
    events["landed"] = time.time()


def _en(sample, lonlat) -> tuple[float, float]:
    """Metres east, north of home of a (t, lat, lon, ...) sample (inverse of lonlat, by Newton)."""
    e0, n0 = 0.0, 0.0
    for _ in range(3):
        lon, lat = lonlat(e0, n0)
        lon1, lat1 = lonlat(e0 + 1.0, n0 + 1.0)
        e0 += (sample[2] - lon) / (lon1 - lon)
        n0 += (sample[1] - lat) / (lat1 - lat)
    return e0, n0


# --- analysis ----------------------------------------------------------------------------
def _local(frame, lat, lon):
    from .geo.crs import from_lonlat

    crs, x0, y0 = frame
    x, y = from_lonlat(crs, np.asarray(lon, float), np.asarray(lat, float))
    return np.asarray(x) - x0, np.asarray(y) - y0


SIM_STATE_PERIOD_S = 0.1     # request_streams asks SITL for SIM_STATE at 10 Hz of its own clock


def sitl_lag(wall: np.ndarray, period_s: float = SIM_STATE_PERIOD_S,
             sim: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Wall minus SITL time at each truth sample, and SITL's time of each, from their arrival
    stamps `wall` and SITL's clock `sim` (without it: one SIM_STATE every period_s of SITL's clock).

    On a loaded host SITL (speedup 1) gets descheduled: its simulated world stands still while
    the wall clock runs on, and it does not catch up (measured: 3.6 s lost in a 170 s flight,
    up to 0.6 s at once, each SIM_STATE still exactly 0.1 s of motion apart). Arrival stamps add
    a receive delay on top, which only makes a sample later, so the lower envelope from the
    future of (arrival - sample count x period) is the lost time alone (it never decreases)."""
    wall = np.asarray(wall, float)
    sim = period_s * np.arange(len(wall)) if sim is None else np.asarray(sim, float)
    return np.minimum.accumulate((wall - sim)[::-1])[::-1], sim


def fix_truth_at_represented_time(t: np.ndarray, age: np.ndarray, truth_wall: np.ndarray,
                                  tx: np.ndarray, ty: np.ndarray,
                                  period_s: float = SIM_STATE_PERIOD_S) -> tuple[np.ndarray, np.ndarray]:
    """The true position a message sent at wall time t stands for: the daemon propagated its last
    fix (captured age s before t, stamped with the SIM_STATE it rendered) by age s of wall time;
    a real vehicle moves on for those age s, SITL's may have stood still part of them. So the
    truth at SITL time sim(capture) + age (interpolated in SITL's own clock)."""
    lag, sim = sitl_lag(truth_wall, period_s)
    capture = np.asarray(t, float) - np.asarray(age, float)
    target = capture - np.interp(capture, truth_wall, lag) + age
    return np.interp(target, sim, tx), np.interp(target, sim, ty)


def fix_truth_in_sitl_clock(fix_unix: np.ndarray, age: np.ndarray, frame_capture: np.ndarray,
                            frame_sitl: np.ndarray, truth_sitl: np.ndarray, tx: np.ndarray, ty: np.ndarray,
                            unix_minus_mono: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The true position each sent fix stands for, in SITL's clock alone: the frame it came from
    (captured age s before the send, on the daemon's monotonic clock) was rendered from the
    SIM_STATE of SITL time frame_sitl; the fix stands for age s after that. Truth samples carry
    SITL's time too (truth_sitl), so neither a stalled SITL nor a ground station that reads its
    link late (arrival stamps seconds behind) moves the judgement. Returns x, y and which fixes
    could be matched to their frame."""
    capture = np.asarray(fix_unix, float) - np.asarray(age, float) - unix_minus_mono
    x, y = np.full(len(capture), np.nan), np.full(len(capture), np.nan)
    ok = np.zeros(len(capture), bool)
    frame_capture, frame_sitl = np.asarray(frame_capture, float), np.asarray(frame_sitl, float)
    keep = np.isfinite(frame_sitl)
    frame_capture, frame_sitl = frame_capture[keep], frame_sitl[keep]
    good = np.isfinite(truth_sitl)
    if not len(frame_capture) or good.sum() < 2:
        return x, y, ok
    order = np.argsort(frame_capture)
    frame_capture, frame_sitl = frame_capture[order], frame_sitl[order]
    j = np.clip(np.searchsorted(frame_capture, capture), 1, len(frame_capture) - 1) if len(frame_capture) > 1 \
        else np.zeros(len(capture), int)
    if len(frame_capture) > 1:
        j = np.where(np.abs(frame_capture[j - 1] - capture) < np.abs(frame_capture[j] - capture), j - 1, j)
    ok = np.isfinite(capture) & (np.abs(frame_capture[j] - capture) < 0.02)   # age is logged to 1 ms
    target = frame_sitl[j] + np.asarray(age, float)
    x = np.where(ok, np.interp(target, truth_sitl[good], tx[good]), np.nan)
    y = np.where(ok, np.interp(target, truth_sitl[good], ty[good]), np.nan)
    return x, y, ok


STALL_GAP_S = 1.0       # frames finished this far apart (2 fps: two periods) are a processing stall
STALL_SLACK_S = 0.6     # GPS2_RAW reports a fix type up to a few of its 0.2 s samples later


def processing_stalls(frames: list[dict], unix_minus_mono: float) -> list[tuple[float, float]]:
    """(start, end) unix times in which the daemon finished no frame for STALL_GAP_S or more:
    from the last frame finished before to the first after, plus STALL_SLACK_S."""
    done = sorted(r["capture_s"] + r["latency_ms"] / 1000.0 + unix_minus_mono for r in frames
                  if r.get("latency_ms") is not None)
    return [(a, b + STALL_SLACK_S) for a, b in zip(done[:-1], done[1:]) if b - a >= STALL_GAP_S]


def distance_to_polyline(points: np.ndarray, route: np.ndarray) -> np.ndarray:
    """Distance of each (N, 2) point to the polyline through route (M, 2)."""
    best = np.full(len(points), np.inf)
    for a, b in zip(route[:-1], route[1:]):
        ab = b - a
        s = np.clip(((points - a) @ ab) / max(ab @ ab, 1e-9), 0.0, 1.0)
        best = np.minimum(best, np.linalg.norm(points - (a + s[:, None] * ab), axis=1))
    return best


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclass
class Judged:
    """The flight's series and their errors against the truth, as analyse and the plot use them."""
    truth: np.ndarray          # SIM_STATE rows: wall, lat, lon, alt, vn, ve, roll, pitch, SITL s
    tx: np.ndarray
    ty: np.ndarray
    ekf: np.ndarray            # GLOBAL_POSITION_INT rows with an origin: wall, lat, lon, rel alt, SITL s
    ekf_err: np.ndarray
    fixes: list                # output.jsonl rows with fix 3, within the truth's time span
    fix_t: np.ndarray          # their send times (unix)
    fix_err: np.ndarray        # against the truth at the time each stands for
    wall_err: np.ndarray       # against the truth received at the send time
    sigma: np.ndarray
    judged_in_sitl_clock: int  # fixes judged through their frame in SITL's clock
    lag: np.ndarray            # wall minus SITL time (SITL's stalls)
    read_delay: np.ndarray     # how late the ground station read each SIM_STATE, beyond the stalls
    frames: list
    unix_minus_mono: float     # the host's clocks: the daemon's monotonic stamps to unix time


def _judged(out: Path, gcs: GroundStation, frame) -> Judged:
    truth = np.array(gcs.truth, float)
    tx, ty = _local(frame, truth[:, 1], truth[:, 2])
    ekf = _ekf_with_origin(gcs)
    ex, ey = _local(frame, ekf[:, 1], ekf[:, 2])
    unix_minus_mono = time.time() - time.monotonic()      # one host: the daemon's clocks are these
    # SITL's own clock on the truth and the EKF (the SYSTEM_TIME sent with them): arrival stamps
    # run late when the ground station reads its link behind, SITL's time does not
    truth_sitl = truth[:, 8] if truth.shape[1] > 8 else np.full(len(truth), np.nan)
    ekf_sitl = ekf[:, 4] if ekf.shape[1] > 4 else np.full(len(ekf), np.nan)
    timed = np.isfinite(truth_sitl)
    in_sitl_clock = timed.sum() > 1
    ekf_err = np.hypot(ex - np.interp(ekf[:, 0], truth[:, 0], tx), ey - np.interp(ekf[:, 0], truth[:, 0], ty))
    if in_sitl_clock:
        ekf_err = np.where(np.isfinite(ekf_sitl),
                           np.hypot(ex - np.interp(ekf_sitl, truth_sitl[timed], tx[timed]),
                                    ey - np.interp(ekf_sitl, truth_sitl[timed], ty[timed])), ekf_err)

    frames = _read_jsonl(out / "frames.jsonl")
    fixes = [r for r in _read_jsonl(out / "output.jsonl")
             if r["fix"] == 3 and truth[0, 0] < r["unix_s"] < truth[-1, 0]]
    fix_t = np.array([r["unix_s"] for r in fixes], float)
    judged = 0
    if fixes:
        fx, fy = _local(frame, [r["lat"] for r in fixes], [r["lon"] for r in fixes])
        wall_err = np.hypot(fx - np.interp(fix_t, truth[:, 0], tx), fy - np.interp(fix_t, truth[:, 0], ty))
        # judged against where the vehicle is at the time each message stands for (SITL's clock
        # stalls under load, a real vehicle's does not); without the age, at the wall time
        age = np.array([r.get("fix_age_s") if r.get("fix_age_s") is not None else math.nan for r in fixes])
        sx, sy = fix_truth_at_represented_time(fix_t, np.nan_to_num(age), truth[:, 0], tx, ty)
        fix_err = np.where(np.isfinite(age), np.hypot(fx - sx, fy - sy), wall_err)
        # best: in SITL's clock alone, through the frame each fix came from
        rendered = [(r["capture_s"], r["recorded_s"]) for r in frames if r.get("recorded_s") is not None]
        if in_sitl_clock and rendered:
            cx, cy, matched = fix_truth_in_sitl_clock(fix_t, age, *np.array(rendered, float).T, truth_sitl,
                                                       tx, ty, unix_minus_mono)
            fix_err = np.where(matched, np.hypot(fx - cx, fy - cy), fix_err)
            judged = int(matched.sum())
        sigma = np.array([r["sigma_h_m"] for r in fixes], float)
    else:
        fix_err = wall_err = sigma = np.zeros(0)
    wall, sim = (truth[timed, 0], truth_sitl[timed]) if in_sitl_clock else (truth[:, 0], None)
    lag, sim = sitl_lag(wall, sim=sim)
    return Judged(truth, tx, ty, ekf, ekf_err, fixes, fix_t, fix_err, wall_err, sigma, judged, lag,
                  wall - sim - lag, frames, unix_minus_mono)


def analyse(out: Path, gcs: GroundStation, cfg: SitlFlightConfig, frame, events: dict, judged: Judged) -> dict:
    truth, tx, ty, ekf, ekf_err = judged.truth, judged.tx, judged.ty, judged.ekf, judged.ekf_err
    ex, ey = _local(frame, ekf[:, 1], ekf[:, 2])
    unix_minus_mono = judged.unix_minus_mono
    t_switch = events.get("switched", math.inf)
    t_land = events.get("landing", math.inf)
    # the health window: from the switch to mean-nav alone until touchdown (the true height above
    # the ground under 0.3 m after the land command); after it, until the disarm, reported apart
    down = np.nonzero((truth[:, 0] > t_land) & (truth[:, 3] - cfg.ground_amsl_m < 0.3))[0]
    t_end = float(truth[down[0], 0]) if len(down) else events.get("landed", truth[-1, 0])
    t_disarm = events.get("landed", truth[-1, 0])
    ekf_on = (ekf[:, 0] > t_switch) & (ekf[:, 0] < t_land)
    ekf_landing = (ekf[:, 0] >= t_land) & (ekf[:, 0] <= t_end)

    # the planned route: from the first corner to the last, flown with mean-nav alone
    route = np.array(cfg.route_en, float)
    t_first, t_last = events.get("wp_1", math.nan), events.get(f"wp_{len(route)}", math.nan)
    on_route = (truth[:, 0] >= t_first) & (truth[:, 0] <= t_last)
    if "camera" in cfg.faults:
        on_route &= ~((truth[:, 0] > events.get("camera_lost", math.inf)) & (truth[:, 0] < events.get("wp_3", 0)))
    route_err = distance_to_polyline(np.stack([tx, ty], 1)[on_route], route)
    length = float(np.sum(np.linalg.norm(np.diff(route, axis=0), axis=1)))

    sent = _read_jsonl(out / "output.jsonl")
    frames, fixes = judged.frames, judged.fixes
    fix_err, wall_err, sigma, lag = judged.fix_err, judged.wall_err, judged.sigma, judged.lag
    send_t = np.array([r["unix_s"] for r in sent])
    flying = (send_t > events.get("airborne", math.inf)) & (send_t < t_land)
    intervals = np.diff(send_t)
    gps2_on = [g for g in gcs.gps2 if t_switch < g[0] < t_end]
    stalls = processing_stalls(frames, unix_minus_mono)
    below = [g[0] for g in gps2_on if g[1] < 3]
    in_stalls = sum(any(a < t <= b for a, b in stalls) for t in below)
    ms = lambda key: [r[key] for r in frames if r.get(key) is not None]
    failsafes = [txt for t, txt in gcs.texts if "failsafe" in txt.lower() and t_switch < t < t_end]
    landing = [txt for t, txt in gcs.texts if t >= t_land]
    after_touchdown = [txt for t, txt in gcs.texts if t_end <= t <= t_disarm + 1.0]
    velocity = _velocity_honesty(fixes, truth)
    touchdown = touchdown_planned = None
    lowest_fix = None
    if "landed" in events:   # where the vehicle landed against where its EKF believed it was, and the plan
        i, j = np.searchsorted(truth[:, 0], t_end), np.searchsorted(ekf[:, 0], t_end)
        i, j = min(i, len(truth) - 1), min(j, len(ekf) - 1)
        touchdown = _r(math.hypot(tx[i] - ex[j], ty[i] - ey[j]))
        touchdown_planned = _r(math.hypot(*(np.array([tx[i], ty[i]]) - np.array(events["land_at_en"]))))
        # the lowest visual fix (frame capture times are the daemon's monotonic clock, the same here)
        fix_t = [r["capture_s"] + unix_minus_mono for r in frames if r["fix"] == 3]
        landing_fix_t = [ft for ft in fix_t if ft >= t_land]
        if landing_fix_t:
            k = np.searchsorted(truth[:, 0], landing_fix_t[-1])
            lowest_fix = _r(truth[min(k, len(truth) - 1), 3] - cfg.ground_amsl_m)
    summary = {
        "route": {"waypoints": len(route), "length_m": round(length, 1),
                  "true_track_to_route_max_m": _r(np.max(route_err)) if route_err.size else None,
                  "true_track_to_route_p95_m": _r(np.percentile(route_err, 95)) if route_err.size else None},
        "ekf_vs_truth_on_mean_nav_m": {"median": _r(np.median(ekf_err[ekf_on])) if ekf_on.any() else None,
                                       "max": _r(np.max(ekf_err[ekf_on])) if ekf_on.any() else None},
        "gps_input": {"messages": len(sent), "fix3": len(fixes),
                      "fix3_fraction_in_flight": _r(np.mean([r["fix"] == 3 for r, f in zip(sent, flying) if f]))
                      if flying.any() else None,
                      "mean_interval_ms": _r(np.mean(intervals) * 1000) if intervals.size else None,
                      "max_interval_ms": _r(np.max(intervals) * 1000) if intervals.size else None,
                      "fix3_error_median_m": _r(np.median(fix_err)) if fix_err.size else None,
                      "fix3_error_max_m": _r(np.max(fix_err)) if fix_err.size else None,
                      "fix3_worst_error_over_accuracy": _r(np.max(fix_err / sigma)) if fix_err.size else None,
                      "fix3_beyond_3_sigma": int(np.sum(fix_err > 3 * sigma)),
                      # the same against the truth at the wall time (counts SITL's stalls as errors)
                      "fix3_beyond_3_sigma_wall_time": int(np.sum(wall_err > 3 * sigma)),
                      "fix3_within_accuracy": _r(np.mean(fix_err <= sigma)) if fix_err.size else None,
                      "fix3_judged_in_sitl_clock": judged.judged_in_sitl_clock,
                      "sitl_time_lost_s": _r(lag[-1] - lag[0]),
                      # the test's own reading of SITL's link: late reads skew wall-time judgements
                      "ground_station_read_delay_p95_s": _r(np.percentile(judged.read_delay, 95)),
                      "ground_station_read_delay_max_s": _r(np.max(judged.read_delay)),
                      "accuracy_median_m": _r(np.median(sigma)) if sigma.size else None},
        "gps2_raw_on_mean_nav": {"samples": len(gps2_on), "below_3d": len(below),
                                 # "no fix" while the daemon finished no frame for >= 1 s (a
                                 # stalled host): withholding a stale fix is the design
                                 "below_3d_in_processing_stalls": in_stalls,
                                 "processing_stalls_s": [_r(b - a - STALL_SLACK_S) for a, b in stalls
                                                         if t_switch < b and a < t_end]},
        "velocity": velocity,
        "frames": {"processed": len(frames), "fixes": sum(r["fix"] == 3 for r in frames),
                   "processing_ms_median": _r(np.median(ms("processing_ms"))) if frames else None,
                   "processing_ms_p95": _r(np.percentile(ms("processing_ms"), 95)) if frames else None,
                   "latency_ms_median": _r(np.median(ms("latency_ms"))) if frames else None,
                   "latency_ms_p95": _r(np.percentile(ms("latency_ms"), 95)) if frames else None,
                   "rate_hz": _r(len(frames) / (frames[-1]["capture_s"] - frames[0]["capture_s"]))
                   if len(frames) > 1 else None},
        "ardupilot": {"failsafes_on_mean_nav": failsafes, "landing_messages": landing,
                      "touchdown_ekf_error_m": touchdown,
                      "messages_after_switch": [txt for t, txt in gcs.texts if t > t_switch],
                      "modes": [m for _, m in gcs.modes]},
        "landing": {"touchdown_to_planned_m": touchdown_planned, "touchdown_ekf_error_m": touchdown,
                    "ekf_vs_truth_max_m": _r(np.max(ekf_err[ekf_landing])) if ekf_landing.any() else None,
                    "lowest_visual_fix_m": lowest_fix,
                    "seconds": _r(t_end - t_land) if math.isfinite(t_end - t_land) else None,
                    "touchdown_to_disarm_s": _r(t_disarm - t_end) if "landed" in events else None,
                    "after_touchdown": after_touchdown},
        "seconds_on_mean_nav": _r(t_land - t_switch) if math.isfinite(t_land - t_switch) else None,
        "events_s": {k: _r(v - events.get("armed", v)) for k, v in events.items()
                     if k not in ("total_s", "land_at_en")},
        "total_s": _r(events.get("total_s", math.nan)),
        "faults": list(cfg.faults),
    }
    if "camera_lost" in events:
        lost, back = events["camera_lost"], events["camera_back"]
        window = (ekf[:, 0] > lost) & (ekf[:, 0] < back + 15)
        summary["camera_outage"] = {"ekf_error_max_m": _r(np.max(ekf_err[window])) if window.any() else None,
                                    "ardupilot": [txt for t, txt in gcs.texts if lost <= t <= back + 15]}
    if "edge_leg" in events:
        window = ekf[:, 0] > events["edge_leg"]
        summary["map_edge"] = {"ekf_error_max_m": _r(np.max(ekf_err[window])) if window.any() else None,
                               "ardupilot": [txt for t, txt in gcs.texts if t >= events["edge_leg"]]}
    return summary


def _ekf_with_origin(gcs: GroundStation) -> np.ndarray:
    """GLOBAL_POSITION_INT samples once the EKF has an origin (before, it reports 0, 0)."""
    ekf = np.array(gcs.ekf)
    return ekf[(ekf[:, 1] != 0) | (ekf[:, 2] != 0)]


def _velocity_honesty(fixes: list[dict], truth: np.ndarray) -> dict:
    """Sent velocity against SIM_STATE's: per-axis error and the speed_accuracy that went with it.
    1 for error_over_accuracy_rms is an honest accuracy."""
    rows = [r for r in fixes if r.get("vn") is not None and truth[0, 0] < r["unix_s"] < truth[-1, 0]]
    if not rows:
        return {}
    t = np.array([r["unix_s"] for r in rows])
    err = np.concatenate([np.array([r["vn"] for r in rows]) - np.interp(t, truth[:, 0], truth[:, 4]),
                          np.array([r["ve"] for r in rows]) - np.interp(t, truth[:, 0], truth[:, 5])])
    sacc = np.array([r["sigma_speed_ms"] for r in rows]) / math.sqrt(2.0)   # GPS_INPUT sends it per axis
    return {"error_rms_per_axis_ms": _r(np.sqrt(np.mean(err ** 2))), "error_p95_ms": _r(np.percentile(np.abs(err), 95)),
            "speed_accuracy_median_ms": _r(np.median(sacc)), "speed_accuracy_p95_ms": _r(np.percentile(sacc, 95)),
            "error_over_accuracy_rms": _r(np.sqrt(np.mean(err ** 2 / np.tile(sacc, 2) ** 2)))}


def _r(v, digits: int = 2):
    return round(float(v), digits) if v is not None and math.isfinite(float(v)) else None


def plot_report(world: Path, out: Path, cfg: SitlFlightConfig, frame, events, j: Judged) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .geo.raster import read_metric_raster

    raster = read_metric_raster([world], 1.0)
    left, bottom, right, top = raster.bounds
    _, x0, y0 = frame
    truth, ekf, tx, ty, fixes = j.truth, j.ekf, j.tx, j.ty, j.fixes
    ex, ey = _local(frame, ekf[:, 1], ekf[:, 2])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(15, 6.5), gridspec_kw={"width_ratios": [1, 1.3]})
    ax.imshow(raster.image, extent=(left - x0, right - x0, bottom - y0, top - y0))
    route = np.array(cfg.route_en)
    ax.plot(route[:, 0], route[:, 1], "w--", lw=1.5, label="planned route")
    ax.plot(tx, ty, "-", color="lime", lw=1.2, label="truth (SIM_STATE)")
    ax.plot(ex, ey, "-", color="orange", lw=0.8, label="EKF (GLOBAL_POSITION_INT)")
    if fixes:
        fx, fy = _local(frame, [r["lat"] for r in fixes], [r["lon"] for r in fixes])
        ax.plot(fx, fy, ".", color="red", ms=1.5, label="mean-nav GPS_INPUT (fix 3)")
    ax.set_xlabel("east of home (m)")
    ax.set_ylabel("north of home (m)")
    ax.set_xlim(min(left - x0, tx.min() - 10), max(right - x0, tx.max() + 10))
    ax.set_ylim(min(bottom - y0, ty.min() - 10), max(top - y0, ty.max() + 10))
    ax.legend(loc="lower left", fontsize=7)
    ax.set_title("ArduCopter SITL on mean-nav: track over the map")
    t0 = events.get("armed", truth[0, 0])
    ax2.set_ylim(0, 12)
    ax2.plot(ekf[:, 0] - t0, j.ekf_err, color="orange", lw=1, label="EKF - truth")
    if fixes:
        ax2.plot(j.fix_t - t0, j.fix_err, ".", color="red", ms=2, label="mean-nav fix - truth")
        ax2.plot(j.fix_t - t0, j.sigma, "-", color="grey", lw=0.8, label="reported accuracy")
    for name, colour in (("switched", "blue"), ("camera_lost", "black"), ("camera_back", "black"),
                         ("edge_leg", "purple"), ("landing", "green")):
        if name in events:
            ax2.axvline(events[name] - t0, color=colour, ls=":", lw=1)
            ax2.text(events[name] - t0, ax2.get_ylim()[1] * 0.95, name, rotation=90, fontsize=7, va="top")
    ax2.set_xlabel("seconds since arming")
    ax2.set_ylabel("horizontal error (m)")
    ax2.set_xlim(-5, (events.get("landed", truth[-1, 0]) - t0) + 5)
    ax2.set_ylim(0, 12)
    ax2.legend(fontsize=7)
    ax2.set_title("error over time (GNSS off after 'switched')")
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=110)
    plt.close(fig)


def print_summary(summary: dict, out: Path) -> None:
    r, g, f = summary["route"], summary["gps_input"], summary["frames"]
    print(f"route: {r['waypoints']} waypoints, {r['length_m']:.0f} m; true track within "
          f"{r['true_track_to_route_max_m']} m of it (p95 {r['true_track_to_route_p95_m']} m)")
    print(f"EKF vs truth on mean-nav alone: median {summary['ekf_vs_truth_on_mean_nav_m']['median']} m, "
          f"max {summary['ekf_vs_truth_on_mean_nav_m']['max']} m, for {summary['seconds_on_mean_nav']} s")
    print(f"GPS_INPUT: {g['messages']} sent, mean interval {g['mean_interval_ms']} ms (max {g['max_interval_ms']}), "
          f"fix 3 in flight {g['fix3_fraction_in_flight']}, error median {g['fix3_error_median_m']} m max "
          f"{g['fix3_error_max_m']} m, worst error/accuracy {g['fix3_worst_error_over_accuracy']}, beyond 3 x "
          f"{g['fix3_beyond_3_sigma']} ({g['fix3_judged_in_sitl_clock']} judged in SITL's clock; "
          f"{g['fix3_beyond_3_sigma_wall_time']} at wall time; SITL lost {g['sitl_time_lost_s']} s, ground "
          f"station read SIM_STATE up to {g['ground_station_read_delay_max_s']} s late)")
    g2 = summary["gps2_raw_on_mean_nav"]
    print(f"GPS2_RAW on mean-nav: {g2['samples']} samples, {g2['below_3d']} below 3D "
          f"({g2['below_3d_in_processing_stalls']} inside processing stalls of {g2['processing_stalls_s']} s)")
    print(f"frames: {f['processed']} at {f['rate_hz']} Hz, {f['fixes']} fixes, processing median "
          f"{f['processing_ms_median']} ms p95 {f['processing_ms_p95']} ms, capture-to-fix latency median "
          f"{f['latency_ms_median']} ms p95 {f['latency_ms_p95']} ms")
    print(f"ArduPilot after the switch: {summary['ardupilot']['messages_after_switch']}")
    for fault in ("camera_outage", "map_edge"):
        if fault in summary:
            print(f"{fault}: EKF error max {summary[fault]['ekf_error_max_m']} m; ArduPilot: "
                  f"{summary[fault]['ardupilot']}")
    print(f"report: {out / 'report.png'}, {out / 'summary.json'}")


def run(args: argparse.Namespace) -> int:
    faults = tuple(f for f in (args.faults or "").split(",") if f)
    unknown = sorted(set(faults) - {"camera", "edge"})
    if unknown:
        raise MeanNavError(f"demo --faults {args.faults!r}: unknown fault {unknown[0]!r}; use camera, edge or camera,edge")
    cfg = SitlFlightConfig(faults=faults, model_threads=args.threads)
    summary = fly(args.out / "sitl", cfg)
    print_summary(summary, args.out / "sitl")
    return 0
