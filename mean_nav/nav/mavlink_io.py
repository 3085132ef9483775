"""MAVLink I/O for the onboard daemon (pymavlink).

Input: ATTITUDE, GLOBAL_POSITION_INT and DISTANCE_SENSOR from the autopilot, stamped with
the host monotonic clock on arrival (the same clock the camera stamps frames with) and
kept as a short history so the attitude at a frame's capture time can be interpolated.
Their rates are requested with MAV_CMD_SET_MESSAGE_INTERVAL and the COMMAND_ACK checked.

Output: one Estimate, encoded as
  - GPS_INPUT (ArduPilot, GPS1_TYPE=14), or
  - GLOBAL_POSITION_SENSOR (PX4 aux global position; in pymavlink's common dialect),
plus HEARTBEAT as an onboard controller (type 18, autopilot 8, component 191) and
rate-limited STATUSTEXT. Positions are only sent for a gated visual fix; samples closer
than 50 ms are dropped (ArduPilot ignores them anyway).

GPS_INPUT policies (documented in the README):
  horiz_accuracy = the localizer's 68 % horizontal radius; vert_accuracy = its vertical sigma;
  speed_accuracy = filter velocity sigma;
  hdop = horiz_accuracy / 2.5 m (a nominal GNSS range error), vdop likewise, clamped 0.5..50;
  satellites_visible = 12/10/8/6/5 for horiz_accuracy <= 2/5/10/20/above m, so that the
  autopilot's own checks (noise inflation below 6, pre-arm) tighten as the fix coarsens.
"""
from __future__ import annotations

import bisect
import logging
import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal

# MAVLink 2 is required for GLOBAL_POSITION_SENSOR (id 296) and for signing.
os.environ["MAVLINK20"] = "1"
from pymavlink import mavutil  # noqa: E402

from ..config import bounded  # noqa: E402
from ..errors import MeanNavError  # noqa: E402
from .estimate import Estimate, FixQuality  # noqa: E402
from .gps_time import gps_week_and_ms  # noqa: E402
from .telemetry import Telemetry  # noqa: E402

log = logging.getLogger(__name__)

mavutil.set_dialect("common")
MAV = mavutil.mavlink

MAV_TYPE_ONBOARD_CONTROLLER = 18
MAV_AUTOPILOT_INVALID = 8
MAV_COMP_ID_ONBOARD_COMPUTER = 191
DOWNWARD = 25

IGNORE_ALT = 1
IGNORE_HDOP = 2
IGNORE_VDOP = 4
IGNORE_VEL_HORIZ = 8
IGNORE_VEL_VERT = 16
IGNORE_SPEED_ACCURACY = 32
IGNORE_HORIZONTAL_ACCURACY = 64
IGNORE_VERTICAL_ACCURACY = 128

NOMINAL_RANGE_ERROR_M = 2.5     # hdop = horizontal accuracy / this
MIN_SEND_INTERVAL_S = 0.05      # ArduPilot drops GPS samples closer than 50 ms
MAX_INTERPOLATION_GAP_S = 0.3   # attitude samples further apart are not interpolated between


@dataclass
class MavlinkConfig:
    connection: str = "udpout:127.0.0.1:14550"   # as mavutil takes it; serial: /dev/ttyTHS1
    baud: int = bounded(921600, ge=300, le=20_000_000, unit="baud")  # serial only
    system_id: int | None = bounded(None, ge=1, le=255)  # None: the vehicle's, from its HEARTBEAT
    component_id: int = bounded(MAV_COMP_ID_ONBOARD_COMPUTER, ge=0, le=255)
    output: Literal["gps_input", "global_position_sensor", "none"] = "gps_input"
    gps_id: int = bounded(0, ge=0, le=255)  # GPS_INPUT gps_id (0 = GPS1)
    send_no_fix: bool = True                      # GPS_INPUT fix_type 0 when there is no fix
    attitude_rate_hz: float = bounded(50.0, gt=0, le=1000, unit="Hz")
    position_rate_hz: float = bounded(10.0, gt=0, le=1000, unit="Hz")
    rangefinder_rate_hz: float = bounded(10.0, gt=0, le=1000, unit="Hz")
    request_rates: bool = True
    link_timeout_s: float = bounded(3.0, gt=0, le=3600, unit="s")  # no message from the vehicle this long: link lost
    statustext_interval_s: float = bounded(2.0, ge=0, le=3600, unit="s")  # at most one STATUSTEXT per interval
    signing_key_hex: str | None = None            # 64 hex chars: MAVLink 2 signing key
    telemetry_history_s: float = bounded(3.0, gt=0, le=3600, unit="s")
    position_max_age_s: float = bounded(1.5, gt=0, le=3600, unit="s")  # altitude older than this is treated as missing
    rangefinder_max_age_s: float = bounded(0.5, gt=0, le=3600, unit="s")


def satellites_for_accuracy(horiz_accuracy_m: float) -> int:
    for limit, sats in ((2.0, 12), (5.0, 10), (10.0, 8), (20.0, 6)):
        if horiz_accuracy_m <= limit:
            return sats
    return 5


def dop_for_accuracy(accuracy_m: float) -> float:
    if not math.isfinite(accuracy_m):
        return 50.0
    return min(50.0, max(0.5, accuracy_m / NOMINAL_RANGE_ERROR_M))


def _finite_or(value: float, default: float) -> float:
    return value if math.isfinite(value) else default


class TelemetryHistory:
    """Attitude samples (host clock) with interpolation, plus the latest position and range."""

    def __init__(self, keep_s: float = 3.0):
        self.keep_s = keep_s
        self._times: deque[float] = deque()
        self._attitudes: deque[tuple[float, float, float]] = deque()
        self.position: tuple[float, float, float, float, float, float, float, float] | None = None
        self.position_time = -math.inf
        self.range_m = math.nan
        self.range_time = -math.inf
        self._lock = threading.Lock()
        self._new_attitude = threading.Condition(self._lock)

    def add_attitude(self, t: float, roll: float, pitch: float, yaw: float) -> None:
        with self._lock:
            if self._times and t <= self._times[-1]:
                return
            self._times.append(t)
            self._attitudes.append((roll, pitch, yaw))
            while self._times and self._times[0] < t - self.keep_s:
                self._times.popleft()
                self._attitudes.popleft()
            self._new_attitude.notify_all()

    def wait_for_attitude_after(self, t: float, timeout_s: float) -> bool:
        """Wait until an attitude sample newer than t arrives (so t can be interpolated)."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            if not self._times or self._times[-1] < t - 1.0:
                return False      # no attitude stream at all: nothing worth waiting for
            while not (self._times and self._times[-1] >= t):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._new_attitude.wait(remaining)
            return True

    def add_position(self, t: float, lat: float, lon: float, alt_amsl: float, rel_alt: float,
                     vn: float, ve: float, vd: float, heading: float) -> None:
        with self._lock:
            self.position = (lat, lon, alt_amsl, rel_alt, vn, ve, vd, heading)
            self.position_time = t

    def add_range(self, t: float, range_m: float) -> None:
        with self._lock:
            self.range_m, self.range_time = range_m, t

    def at(self, t: float, position_max_age_s: float = 1.5, range_max_age_s: float = 0.5) -> Telemetry | None:
        """Telemetry for a frame captured at host time t; its time_s says how close the
        attitude sample is (interpolated samples carry t itself). None before any attitude."""
        with self._lock:
            if not self._times:
                return None
            times = list(self._times)
            i = bisect.bisect_left(times, t)
            # interpolate only between close samples: across a telemetry hole the nearest
            # sample keeps its own (old) time, so the localizer sees that it is stale
            if 0 < i < len(times) and times[i] - times[i - 1] <= MAX_INTERPOLATION_GAP_S:
                t0, t1 = times[i - 1], times[i]
                a0, a1 = self._attitudes[i - 1], self._attitudes[i]
                w = (t - t0) / (t1 - t0)
                roll = a0[0] + w * (a1[0] - a0[0])
                pitch = a0[1] + w * (a1[1] - a0[1])
                dyaw = math.remainder(a1[2] - a0[2], 2 * math.pi)   # unwrap across +-pi
                yaw = math.remainder(a0[2] + w * dyaw, 2 * math.pi)
                stamp = t
            else:
                if i == 0:
                    j = 0
                elif i == len(times):
                    j = len(times) - 1
                else:
                    j = i if times[i] - t < t - times[i - 1] else i - 1
                roll, pitch, yaw = self._attitudes[j]
                stamp = times[j]
            tel = Telemetry(time_s=stamp, roll=roll, pitch=pitch, yaw=yaw, rel_alt_m=math.nan)
            if self.position is not None and abs(t - self.position_time) <= position_max_age_s:
                lat, lon, alt, rel, vn, ve, vd, _ = self.position
                tel.lat, tel.lon, tel.alt_amsl_m, tel.rel_alt_m = lat, lon, alt, rel
                tel.vn, tel.ve, tel.vd = vn, ve, vd
            if abs(t - self.range_time) <= range_max_age_s:
                tel.range_m = self.range_m
            return tel


class MavlinkLink:
    """One MAVLink connection: a reader thread for telemetry, thread-safe senders."""

    def __init__(self, cfg: MavlinkConfig):
        self.cfg = cfg
        if cfg.output not in ("gps_input", "global_position_sensor", "none"):
            raise MeanNavError(f"mavlink.output {cfg.output!r}: use gps_input (ArduPilot), "
                               "global_position_sensor (PX4) or none")
        self._signing_key = None
        if cfg.signing_key_hex:
            try:
                self._signing_key = bytes.fromhex(cfg.signing_key_hex)
            except ValueError:
                self._signing_key = b""
            if len(self._signing_key) != 32:
                raise MeanNavError("mavlink.signing_key_hex: must be 64 hex characters (a 32-byte key)")
        self.telemetry = TelemetryHistory(cfg.telemetry_history_s)
        self.vehicle_system: int | None = None
        self.vehicle_component = 1
        self.last_vehicle_message = -math.inf
        self.rate_acks: dict[int, int] = {}         # message id -> MAV_RESULT
        self.messages_sent = 0
        self.positions_sent = 0
        self._conn = None
        self._send_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._reader, name="mavlink", daemon=True)
        self._last_position_send = -math.inf
        self._last_statustext = -math.inf
        self._pending_statustext: tuple[int, str] | None = None
        self._link_was_up = False
        self._last_ack: int | None = None
        self._connect()

    # --- connection -------------------------------------------------------------------
    def _connect(self) -> None:
        cfg = self.cfg
        try:
            conn = mavutil.mavlink_connection(cfg.connection, baud=cfg.baud, source_system=cfg.system_id or 1,
                                              source_component=cfg.component_id, dialect="common",
                                              autoreconnect=True)
        except (OSError, ValueError) as exc:
            raise MeanNavError(f"mavlink.connection {cfg.connection!r}: cannot open ({exc}); "
                               "use udpout:host:port, udpin:0.0.0.0:port, tcp:host:port or a serial device") from None
        if self._signing_key:
            conn.setup_signing(self._signing_key, sign_outgoing=True)
        self._conn = conn

    def start(self) -> "MavlinkLink":
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=3.0)
        if self._conn is not None:
            self._conn.close()

    @property
    def link_up(self) -> bool:
        return time.monotonic() - self.last_vehicle_message < self.cfg.link_timeout_s

    # --- reading ----------------------------------------------------------------------
    def _reader(self) -> None:
        requested = False
        while not self._stop.is_set():
            try:
                msg = self._conn.recv_match(blocking=True, timeout=0.1)
            except Exception as exc:  # a serial device that vanished, a socket error
                log.warning("mavlink: receive failed (%s); reconnecting", exc)
                self._stop.wait(1.0)
                try:
                    self._conn.close()
                    self._connect()
                except MeanNavError as err:
                    log.warning("%s", err)
                continue
            up = self.link_up
            if up != self._link_was_up:
                log.log(logging.INFO if up else logging.WARNING, "mavlink: link to the vehicle %s",
                        "up" if up else "lost")
                self._link_was_up = up
                if not up:
                    requested = False   # rates apply per link: ask again when it returns
            if msg is None:
                continue
            self._handle(msg)
            if not requested and self.vehicle_system is not None and self.cfg.request_rates:
                requested = True
                self._request_rates()

    def _handle(self, msg) -> None:
        kind = msg.get_type()
        now = time.monotonic()
        src_system = msg.get_srcSystem()
        if kind == "HEARTBEAT":
            if msg.autopilot == MAV_AUTOPILOT_INVALID or msg.type == MAV_TYPE_ONBOARD_CONTROLLER:
                return   # another companion computer or a GCS: not the vehicle
            if self.vehicle_system is None:
                self.vehicle_system = src_system
                self.vehicle_component = msg.get_srcComponent()
                if self.cfg.system_id is None:
                    self._conn.mav.srcSystem = src_system
                log.info("mavlink: vehicle system %d component %d", src_system, self.vehicle_component)
        if self.vehicle_system is not None and src_system != self.vehicle_system:
            return
        if kind in ("HEARTBEAT", "ATTITUDE", "GLOBAL_POSITION_INT", "DISTANCE_SENSOR"):
            self.last_vehicle_message = now
        if kind == "ATTITUDE":
            self.telemetry.add_attitude(now, msg.roll, msg.pitch, msg.yaw)
        elif kind == "GLOBAL_POSITION_INT":
            heading = math.radians(msg.hdg / 100.0) if msg.hdg != 65535 else math.nan
            self.telemetry.add_position(now, msg.lat / 1e7, msg.lon / 1e7, msg.alt / 1000.0,
                                        msg.relative_alt / 1000.0, msg.vx / 100.0, msg.vy / 100.0,
                                        msg.vz / 100.0, heading)
        elif kind == "DISTANCE_SENSOR":
            if msg.orientation == DOWNWARD:
                d = msg.current_distance / 100.0
                valid = msg.min_distance <= msg.current_distance <= msg.max_distance
                self.telemetry.add_range(now, d if valid else math.nan)
        elif kind == "COMMAND_ACK" and msg.command == MAV.MAV_CMD_SET_MESSAGE_INTERVAL:
            self._last_ack = msg.result

    def _request_rates(self) -> None:
        """MAV_CMD_SET_MESSAGE_INTERVAL per message, each acknowledged before the next."""
        cfg = self.cfg
        for msg_id, rate in ((MAV.MAVLINK_MSG_ID_ATTITUDE, cfg.attitude_rate_hz),
                             (MAV.MAVLINK_MSG_ID_GLOBAL_POSITION_INT, cfg.position_rate_hz),
                             (MAV.MAVLINK_MSG_ID_DISTANCE_SENSOR, cfg.rangefinder_rate_hz)):
            if rate <= 0:
                continue
            result = None
            for _attempt in range(3):
                self._last_ack = None
                with self._send_lock:
                    self._conn.mav.command_long_send(self.vehicle_system, self.vehicle_component,
                                                     MAV.MAV_CMD_SET_MESSAGE_INTERVAL, 0, msg_id,
                                                     1e6 / rate, 0, 0, 0, 0, 0)
                deadline = time.monotonic() + 1.0
                while time.monotonic() < deadline and self._last_ack is None and not self._stop.is_set():
                    msg = self._conn.recv_match(blocking=True, timeout=0.1)
                    if msg is not None:
                        self._handle(msg)
                if self._last_ack is not None:
                    result = self._last_ack
                    break
            if result is None:
                log.warning("mavlink: no COMMAND_ACK for the rate of message %d", msg_id)
                continue
            self.rate_acks[msg_id] = result
            if result != MAV.MAV_RESULT_ACCEPTED:
                log.warning("mavlink: vehicle refused %g Hz for message %d (MAV_RESULT %d); set its stream "
                            "rates (SRn_* / MAV_n_RATE) instead", rate, msg_id, result)
            else:
                log.info("mavlink: message %d at %g Hz accepted", msg_id, rate)

    def telemetry_at(self, t: float, wait_s: float = 0.0) -> Telemetry | None:
        """Telemetry at host time t; waits up to wait_s for the attitude sample after t so the
        attitude is interpolated rather than extrapolated from an older sample."""
        if wait_s > 0:
            self.telemetry.wait_for_attitude_after(t, wait_s)
        return self.telemetry.at(t, self.cfg.position_max_age_s, self.cfg.rangefinder_max_age_s)

    # --- sending ----------------------------------------------------------------------
    def send_heartbeat(self, system_status: int) -> None:
        with self._send_lock:
            self._conn.mav.heartbeat_send(MAV_TYPE_ONBOARD_CONTROLLER, MAV_AUTOPILOT_INVALID, 0, 0, system_status)
            self.messages_sent += 1

    def send_statustext(self, severity: int, text: str, now: float | None = None) -> bool:
        """Queue a status line; sent at once unless one went out less than the interval ago
        (then the newest pending line goes out on a later `flush_statustext`)."""
        self._pending_statustext = (severity, text[:50])
        return self.flush_statustext(now)

    def flush_statustext(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if self._pending_statustext is None or now - self._last_statustext < self.cfg.statustext_interval_s:
            return False
        severity, text = self._pending_statustext
        self._pending_statustext = None
        self._last_statustext = now
        with self._send_lock:
            self._conn.mav.statustext_send(severity, text.encode("ascii", "replace"))
            self.messages_sent += 1
        return True

    def send_estimate(self, est: Estimate, capture_unix_s: float, processing_s: float = 0.0,
                      now: float | None = None) -> bool:
        """Encode one estimate for the configured autopilot. Returns True if a position went out."""
        now = time.monotonic() if now is None else now
        if self.cfg.output == "none" or now - self._last_position_send < MIN_SEND_INTERVAL_S:
            return False
        if self.cfg.output == "gps_input":
            sent = self._send_gps_input(est, capture_unix_s)
        else:
            sent = self._send_global_position_sensor(est, capture_unix_s, processing_s)
        if sent:
            self._last_position_send = now
        return sent and est.fix == FixQuality.FIX

    def _send_gps_input(self, est: Estimate, capture_unix_s: float) -> bool:
        week, week_ms = gps_week_and_ms(capture_unix_s)
        time_usec = int(capture_unix_s * 1e6)
        if est.fix != FixQuality.FIX:
            if not self.cfg.send_no_fix:
                return False
            # fix_type 0: "GPS present, no fix"; every field ignored, no position at all
            with self._send_lock:
                self._conn.mav.gps_input_send(time_usec, self.cfg.gps_id, 255, week_ms, week, 0, 0, 0, 0.0,
                                              99.99, 99.99, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0)
                self.messages_sent += 1
            return True
        ignore = 0
        alt = est.alt_m
        if not math.isfinite(alt):
            ignore |= IGNORE_ALT | IGNORE_VDOP | IGNORE_VERTICAL_ACCURACY
            alt = 0.0
        sigma_v = _finite_or(est.sigma_v_m, 100.0)
        sigma_speed = _finite_or(est.sigma_speed_ms, 100.0)
        with self._send_lock:
            self._conn.mav.gps_input_send(
                time_usec, self.cfg.gps_id, ignore, week_ms, week, 3,
                int(round(est.lat * 1e7)), int(round(est.lon * 1e7)), float(alt),
                dop_for_accuracy(est.sigma_h_m), dop_for_accuracy(sigma_v),
                float(est.vn), float(est.ve), float(est.vd), float(min(sigma_speed, 100.0)),
                float(min(est.sigma_h_m, 1000.0)), float(min(sigma_v, 1000.0)),
                satellites_for_accuracy(est.sigma_h_m), 0)
            self.messages_sent += 1
            self.positions_sent += 1
        return True

    def _send_global_position_sensor(self, est: Estimate, capture_unix_s: float, processing_s: float) -> bool:
        if est.fix != FixQuality.FIX:
            return False    # PX4: no message is the honest "no fix"
        alt = est.alt_m if math.isfinite(est.alt_m) else math.nan
        with self._send_lock:
            self._conn.mav.global_position_sensor_send(
                self.vehicle_system or 0, 0, 0, int(capture_unix_s * 1e6), int(max(processing_s, 0.0) * 1e6),
                MAV.GLOBAL_POSITION_SRC_VISION, MAV.GLOBAL_POSITION_PRIMARY,
                int(round(est.lat * 1e7)), int(round(est.lon * 1e7)), math.nan, float(alt),
                float(est.sigma_h_m), float(_finite_or(est.sigma_v_m, 1000.0)))
            self.messages_sent += 1
            self.positions_sent += 1
        return True
