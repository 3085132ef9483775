"""`mean-nav run --config nav.yaml`: the onboard daemon.

camera (newest frame) + MAVLink telemetry -> Localizer (filter) -> output loop, which sends
GPS_INPUT / GLOBAL_POSITION_SENSOR at a fixed rate from the filter state propagated to the
send time (output.py), with a 1 Hz HEARTBEAT that tells the truth about the pipeline:

  state        system_status   when
  starting     STANDBY         start-up, before camera and telemetry are both seen
  searching    STANDBY         pipeline healthy, no visual fix in the last fix_timeout_s
  tracking     ACTIVE          a gated visual fix within fix_timeout_s
  broken       CRITICAL        camera lost, no telemetry, the localizer or the output failing

State changes go out as STATUSTEXT (rate-limited) and into the log. Every processed
frame is logged as one JSON line: queue_ms (capture to processing start: only the newest
frame is ever processed, none waits in a queue), processing_ms (the localizer alone, what
`mean-nav bench` measures) and latency_ms (capture to estimate ready). An exception in
one frame's processing or sending is logged, counted, reported CRITICAL, and the daemon
carries on. The daemon waits for the autopilot's port (tcp, serial) and reconnects; it
stops cleanly on SIGTERM/SIGINT and exits with a message only for what it cannot run
without (config, camera model, model, tile cache, a model that does not match the cache).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np

from ..config import bounded, load_config
from ..errors import MeanNavError
from .camera import Frame, FrameSource, LatestFrameGrabber, open_source
from .camera_model import CameraModel
from .estimate import Estimate, FixQuality
from .localizer import Localizer, LocalizerConfig
from .mavlink_io import MAV, MavlinkConfig, MavlinkLink
from .output import AltitudeSource, OutputConfig, OutputLoop, check_output_config

log = logging.getLogger(__name__)


@dataclass
class CameraConfig:
    uri: str = "csi://0"                 # csi://N, v4l2:///dev/videoN, rtsp://..., video file, image folder,
                                         # sim://map.tif?camera=camera.yaml&mavlink=tcp:127.0.0.1:5763 (SITL)
    calibration: str = "camera.yaml"     # CameraModel YAML (mean-nav calibrate-camera)
    width: int = bounded(1280, ge=1, le=16384, unit="px")  # capture mode for csi:// and v4l2://
    height: int = bounded(720, ge=1, le=16384, unit="px")
    fps: int = bounded(30, ge=1, le=1000, unit="Hz")
    folder_fps: float = bounded(2.0, gt=0, le=1000, unit="Hz")  # image folders without frames.csv
    loop: bool = False                   # replay a file source forever (bench tests)
    reopen_max_s: float = bounded(10.0, gt=0, le=3600, unit="s")  # back-off limit when reopening a lost camera
    # exposure-to-grab delay of a live camera (measure it once)
    capture_delay_s: float = bounded(0.0, ge=0, le=10, unit="s")


@dataclass
class ModelConfig:
    path: str = "model.onnx"             # .onnx (TensorRT engine beside it is used when present), .engine, .pt
    backend: Literal["auto", "onnxruntime", "tensorrt", "torch"] = "auto"
    threads: int | None = bounded(None, ge=1, le=1024)


@dataclass
class CacheConfig:
    path: str = "cache"
    verify_checksums: bool = True


@dataclass
class NavConfig:
    camera: CameraConfig = field(default_factory=CameraConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    mavlink: MavlinkConfig = field(default_factory=MavlinkConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    localizer: LocalizerConfig = field(default_factory=LocalizerConfig)
    initial_lat: float | None = bounded(None, ge=-90, le=90, unit="deg")  # optional prior: narrows the first search
    initial_lon: float | None = bounded(None, ge=-180, le=180, unit="deg")
    # frames processed per second at most (the output rate is output.rate_hz)
    max_rate_hz: float = bounded(5.0, gt=0, le=1000, unit="Hz")
    fix_timeout_s: float = bounded(5.0, gt=0, le=3600, unit="s")  # ACTIVE while the last fix is younger than this
    telemetry_timeout_s: float = bounded(2.0, gt=0, le=3600, unit="s")  # no attitude this long: broken
    # before this, missing camera/telemetry is "starting"
    startup_grace_s: float = bounded(5.0, ge=0, le=3600, unit="s")
    max_latency_s: float = bounded(0.25, gt=0, le=60, unit="s")  # capture-to-fix latency logged above this
    attitude_wait_s: float = bounded(0.1, ge=0, le=10, unit="s")  # wait this long for the attitude sample after a frame
    frame_log: str | None = None         # JSON lines, one per processed frame
    summary_interval_s: float = bounded(10.0, gt=0, le=86_400, unit="s")


def resolve(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def load_nav_config(path: str | Path) -> NavConfig:
    cfg = load_config(path, NavConfig)
    if (cfg.initial_lat is None) != (cfg.initial_lon is None):
        raise MeanNavError(f"{path}: set both initial_lat and initial_lon, or neither")
    check_output_config(cfg.output, str(path))
    return cfg


STATUS = {"starting": MAV.MAV_STATE_STANDBY, "searching": MAV.MAV_STATE_STANDBY,
          "tracking": MAV.MAV_STATE_ACTIVE, "broken": MAV.MAV_STATE_CRITICAL}
SEVERITY = {"starting": MAV.MAV_SEVERITY_INFO, "searching": MAV.MAV_SEVERITY_WARNING,
            "tracking": MAV.MAV_SEVERITY_INFO, "broken": MAV.MAV_SEVERITY_CRITICAL}


class NavDaemon:
    """The onboard loop. Parts may be injected (tests, the ROS node); otherwise built from cfg."""

    def __init__(self, cfg: NavConfig, config_dir: Path = Path("."), embedder=None, cache=None,
                 camera: CameraModel | None = None, source: FrameSource | None = None,
                 link: MavlinkLink | None = None):
        self.cfg = cfg
        self.camera = camera or CameraModel.from_yaml(resolve(config_dir, cfg.camera.calibration))
        if embedder is None:
            from ..deploy.backends import load_embedder
            embedder = load_embedder(resolve(config_dir, cfg.model.path), cfg.model.backend, cfg.model.threads,
                                     spin=False)
        if cache is None:
            from ..geo.cache import TileCache
            cache = TileCache.load(resolve(config_dir, cfg.cache.path), expect_model_hash=embedder.model_hash,
                                   verify=cfg.cache.verify_checksums)
        initial = None if cfg.initial_lat is None else (cfg.initial_lon, cfg.initial_lat)
        from .features.xfeat import models_relative_to
        self.localizer = Localizer(embedder, cache, self.camera, models_relative_to(cfg.localizer, config_dir),
                                   initial_lonlat=initial)
        # operator notices (a prior that disagrees with the map, ...) go to the ground station
        self.localizer.on_notice = lambda text: self.link.send_statustext(MAV.MAV_SEVERITY_WARNING, f"MNAV: {text}")
        if source is None:
            uri = cfg.camera.uri
            if "://" not in uri and not uri.isdigit():
                uri = str(resolve(config_dir, uri))
            source = open_source(uri, cfg.camera.width, cfg.camera.height, cfg.camera.fps, realtime=True,
                                 loop=cfg.camera.loop, folder_fps=cfg.camera.folder_fps, base_dir=config_dir)
        self.source = source
        self.link = link or MavlinkLink(cfg.mavlink)
        self.on_estimate: list[Callable[[Estimate, Frame], None]] = []
        self.state = "starting"
        self.state_detail = ""
        self.stop_event = threading.Event()
        self.epoch_minus_monotonic = time.time() - time.monotonic()
        self.output = OutputLoop(cfg.output, self.link, AltitudeSource(cfg.output, config_dir),
                                 cfg.localizer.vertical_sigma_m, self.epoch_minus_monotonic)
        self.stats = {"frames": 0, "fixes": 0, "errors": 0, "latency_s": [], "processed_at": []}
        self.last_fix_s = -math.inf          # capture time of the newest gated visual fix
        self._frame_log = None
        self._output_errors_seen = 0
        self._output_failing_until = -math.inf

    # --- control ----------------------------------------------------------------------
    def stop(self) -> None:
        self.stop_event.set()

    def run(self, duration_s: float | None = None) -> int:
        """Run until stopped, the duration passes, or a file source ends. Returns 0."""
        handlers = self._install_signal_handlers()
        # before any thread runs: first-use set-up would otherwise hold the first frame in flight
        log.info("warm-up: %.0f ms", 1e3 * self.localizer.warm_up())
        grabber = LatestFrameGrabber(self.source, reopen_max_s=self.cfg.camera.reopen_max_s)
        if self.cfg.frame_log:
            Path(self.cfg.frame_log).parent.mkdir(parents=True, exist_ok=True)
            self._frame_log = open(self.cfg.frame_log, "a", buffering=1, encoding="utf-8")
        self.link.start()
        grabber.start()
        self.output.start()
        started = time.monotonic()
        log.info("running: camera %s, output %s at %g Hz on %s", self.source.uri, self.cfg.mavlink.output,
                 self.cfg.output.rate_hz, self.cfg.mavlink.connection)
        next_heartbeat = 0.0
        next_summary = started + self.cfg.summary_interval_s
        last_index = -1
        last_processed = -math.inf
        try:
            while not self.stop_event.is_set():
                now = time.monotonic()
                if duration_s is not None and now - started >= duration_s:
                    break
                self._update_state(now, started, grabber)
                if now >= next_heartbeat:
                    self.link.send_heartbeat(STATUS[self.state])
                    next_heartbeat = now + 1.0
                self.link.flush_statustext(now)
                if now >= next_summary:
                    self._log_summary()
                    next_summary = now + self.cfg.summary_interval_s
                wait = max(0.0, min(0.05, next_heartbeat - now))
                ready_at = last_processed + 1.0 / self.cfg.max_rate_hz
                if now < ready_at:
                    # at the rate limit: wait, then take the newest frame (never an older one)
                    self.stop_event.wait(min(wait, ready_at - now))
                    continue
                frame = grabber.latest(newer_than=last_index, timeout_s=wait)
                if frame is None:
                    if grabber.state == "ended":
                        log.info("camera source ended")
                        break
                    continue
                last_index = frame.index
                last_processed = time.monotonic()
                self._process_safely(frame)
        finally:
            self.output.stop()
            grabber.stop()
            self.link.send_heartbeat(MAV.MAV_STATE_POWEROFF if self.stop_event.is_set() else STATUS[self.state])
            self.link.close()
            if self._frame_log:
                self._frame_log.close()
            self._restore_signal_handlers(handlers)
            self._log_summary()
        return 0

    # --- per frame --------------------------------------------------------------------
    def _process_safely(self, frame: Frame) -> Estimate | None:
        """One frame; any exception in it is logged and counted (CRITICAL), never fatal."""
        try:
            return self._process(frame)
        except Exception:
            self.stats["errors"] += 1
            log.exception("processing frame %d failed", frame.index)
            return None

    def _process(self, frame: Frame) -> Estimate:
        started = time.monotonic()
        if self.source.live and self.cfg.camera.capture_delay_s:
            # the photo was taken before the grab returned: look up the attitude of that instant
            frame.time_s -= self.cfg.camera.capture_delay_s
        queue_s = started - frame.time_s
        telemetry = self.link.telemetry_at(frame.time_s, wait_s=self.cfg.attitude_wait_s)
        try:
            est = self.localizer.process(frame.image if not frame.problem else None, telemetry, frame.time_s)
        except Exception as exc:   # a bug or a broken model must not stop the heartbeat
            self.stats["errors"] += 1
            log.exception("localizer failed on frame %d", frame.index)
            est = Estimate(time_s=frame.time_s, fix=FixQuality.NONE, reason=f"internal error: {exc}")
        if est.fix == FixQuality.FIX:
            self.last_fix_s = frame.time_s
        # the output loop propagates this state to each send time
        self.output.update(self.localizer.filter, self.last_fix_s, self.localizer.cache.xy_to_lonlat,
                           self.localizer.too_low, self.localizer.visual_floor_m)
        processing_s = est.latency_s if math.isfinite(est.latency_s) else 0.0
        done = time.monotonic()
        latency = done - frame.time_s
        est.latency_s = latency
        self.stats["frames"] += 1
        self.stats["fixes"] += est.fix == FixQuality.FIX
        self.stats["latency_s"].append(latency)
        self.stats["processed_at"].append(done)
        del self.stats["latency_s"][:-1000], self.stats["processed_at"][:-1000]
        if latency > self.cfg.max_latency_s and est.fix == FixQuality.FIX:
            log.debug("capture-to-fix latency %.0f ms (the output loop propagates the fix to each send time)",
                      latency * 1000)
        record = {"frame": frame.index, "capture_s": round(frame.time_s, 4), "recorded_s": frame.source_time_s,
                  "fix": int(est.fix), "lat": _num(est.lat, 8), "lon": _num(est.lon, 8),
                  "sigma_h_m": _num(est.sigma_h_m, 2), "vn": round(est.vn, 2), "ve": round(est.ve, 2),
                  "tile": est.tile_id, "inliers": est.inliers, "queue_ms": round(queue_s * 1000, 1),
                  "processing_ms": round(processing_s * 1000, 1), "latency_ms": round(latency * 1000, 1),
                  "reason": est.reason or frame.problem,
                  # where the time went (a slow frame says which step was slow)
                  "stages_ms": {k: round(v * 1000, 1) for k, v in self.localizer.stages.seconds.items()}}
        tel = self.link.telemetry.at(frame.time_s)
        if tel is not None:   # the attitude the frame was rectified with (against a simulator's truth)
            record["roll_deg"], record["pitch_deg"] = _num(math.degrees(tel.roll), 2), _num(math.degrees(tel.pitch), 2)
        line = json.dumps(record)
        log.debug("frame %s", line)
        if self._frame_log:
            self._frame_log.write(line + "\n")
        for callback in self.on_estimate:
            try:
                callback(est, frame)
            except Exception:
                log.exception("estimate callback failed")
        return est

    # --- health -----------------------------------------------------------------------
    def _update_state(self, now: float, started: float, grabber: LatestFrameGrabber) -> None:
        in_grace = now - started < self.cfg.startup_grace_s
        if self.output.stats["errors"] > self._output_errors_seen:
            self._output_errors_seen = self.output.stats["errors"]
            self._output_failing_until = now + 5.0
        telemetry = self.link.telemetry.at(now)
        telemetry_ok = telemetry is not None and now - telemetry.time_s < self.cfg.telemetry_timeout_s
        if grabber.state == "reconnecting" and not in_grace:
            state, detail = "broken", "camera lost, reconnecting"
        elif not telemetry_ok and not in_grace:
            state, detail = "broken", "no attitude from the vehicle"
        elif self.stats["errors"] and self.stats["errors"] >= self.stats["frames"] // 2 + 1:
            state, detail = "broken", "localizer failing"
        elif now < self._output_failing_until:
            state, detail = "broken", f"output failing: {self.output.last_error}"[:40]
        elif now - self.last_fix_s < self.cfg.fix_timeout_s:
            state, detail = "tracking", "visual fix"
        elif grabber.state in ("starting",) or not telemetry_ok:
            state, detail = "starting", "waiting for camera and telemetry"
        else:
            state, detail = "searching", "no visual fix"
        if state != self.state or (state == "broken" and detail != self.state_detail):
            log.log(logging.WARNING if state in ("broken", "searching") else logging.INFO,
                    "state %s -> %s (%s)", self.state, state, detail)
            self.link.send_statustext(SEVERITY[state], f"MNAV: {state}: {detail}", now)
            self.state, self.state_detail = state, detail

    def achieved_rates(self) -> dict:
        """Frames processed per second and positions sent per second, over the recent past."""
        done = self.stats["processed_at"][-50:]
        frame_hz = (len(done) - 1) / (done[-1] - done[0]) if len(done) > 1 and done[-1] > done[0] else math.nan
        iv = np.array(self.output.stats["intervals_s"][-500:])
        return {"frames_hz": frame_hz, "output_hz": self.output.achieved_rate_hz(),
                "output_max_interval_ms": float(iv.max() * 1000) if iv.size else math.nan}

    def _log_summary(self) -> None:
        s = self.stats
        lat = np.array(s["latency_s"][-500:]) * 1000
        rates = self.achieved_rates()
        log.info("frames %d (%.1f/s), fixes %d, output %.1f Hz (max interval %.0f ms), fixes sent %d, errors %d, "
                 "capture-to-fix latency median %.0f ms p95 %.0f ms, state %s",
                 s["frames"], rates["frames_hz"], s["fixes"], rates["output_hz"], rates["output_max_interval_ms"],
                 self.output.stats["fixes_sent"], s["errors"] + self.output.stats["errors"],
                 np.median(lat) if len(lat) else math.nan, np.percentile(lat, 95) if len(lat) else math.nan,
                 self.state)

    # --- signals ----------------------------------------------------------------------
    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return None
        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda signum, _frame: self._on_signal(signum))
        return previous

    def _on_signal(self, signum: int) -> None:
        log.info("signal %d: stopping", signum)
        self.stop_event.set()

    @staticmethod
    def _restore_signal_handlers(previous) -> None:
        for sig, handler in (previous or {}).items():
            signal.signal(sig, handler)


def _num(value: float, digits: int):
    return round(float(value), digits) if math.isfinite(value) else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", required=True, help="nav.yaml (see mean_nav/nav/nav.example.yaml)")
    parser.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    parser.add_argument("--check", action="store_true",
                        help="load config, camera, model and cache, then exit (pre-flight check)")


def _features(loc) -> str:
    """`sift+ratio`, or `xfeat+lighterglue on tensorrt`: what refinement runs, and where."""
    fm = loc.verifier.matcher
    graphs = [g for g in (getattr(fm.extractor, "graph", None), getattr(fm.matcher, "graph", None)) if g is not None]
    where = ", ".join(dict.fromkeys(g.backend for g in graphs))
    return f"{fm.extractor.name}+{fm.matcher.name}" + (f" on {where}" if where else "")


def run(args: argparse.Namespace) -> int:
    config_path = Path(args.config)
    cfg = load_nav_config(config_path)
    daemon = NavDaemon(cfg, config_dir=config_path.resolve().parent)
    if args.check:
        loc = daemon.localizer
        port = "" if daemon.link.connected else " (port not reachable yet: the daemon will wait for it)"
        print(f"ok: camera {daemon.camera.width}x{daemon.camera.height}, model {loc.embedder.model_hash} "
              f"({loc.embedder.name}, {loc.embedder.precision}), cache {len(loc.cache)} tiles at "
              f"{loc.gsd_m:g} m/px, MAVLink {cfg.mavlink.connection} -> {cfg.mavlink.output} at "
              f"{cfg.output.rate_hz:g} Hz, altitude {cfg.output.altitude}{port}, features "
              f"{_features(loc)}")
        daemon.link.close()
        return 0
    return daemon.run(args.duration)
