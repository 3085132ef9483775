"""MAVLink I/O for the onboard daemon (pymavlink).

Input: ATTITUDE, GLOBAL_POSITION_INT, DISTANCE_SENSOR and, when the autopilot streams them,
GIMBAL_DEVICE_ATTITUDE_STATUS / MOUNT_ORIENTATION (camera attitude of a stabilising gimbal)
and GPS_GLOBAL_ORIGIN, stamped with the host monotonic clock on arrival (the same clock the
camera stamps frames with) and kept as a short history so the attitude at a frame's
capture time can be interpolated. Their rates are requested with
MAV_CMD_SET_MESSAGE_INTERVAL and the COMMAND_ACK checked.

Output: one Estimate, encoded as
  - GPS_INPUT (ArduPilot, GPS1_TYPE=14), or
  - GLOBAL_POSITION_SENSOR (PX4 aux global position; in pymavlink's common dialect),
plus HEARTBEAT as an onboard controller (type 18, autopilot 8, component 191) and
rate-limited STATUSTEXT. The fixed-rate loop that decides what to send is output.py; this
layer refuses, whatever produced it, a position that is not finite or not plausible
(latitude/longitude out of range, accuracy not positive): it goes out as "no fix".
Samples closer than 50 ms are dropped (ArduPilot ignores them anyway).

GPS_INPUT policies (documented in the README):
  fix_type 3 for a fix, 1 ("connected, no fix") without one (0 would mean "no GPS");
  horiz_accuracy = the filter's 68 % horizontal radius at the send time; vert_accuracy = the
  altitude source's sigma; speed_accuracy = the filter's velocity sigma *per axis*
  (sqrt(trace / 2) of its velocity covariance): EKF3 takes it as the noise of each of vn and
  ve, and flags "GPS Glitch" while its low-passed, peak-held value exceeds 1.5 m/s;
  hdop = horiz_accuracy / 3.5 m, vdop likewise, clamped 0.5..50: HDOP <= GPS_HDOP_GOOD (1.4,
  Copter's arming check in GPS modes) exactly when the accuracy is <= 4.9 m, just inside
  EKF3's own 5 m start check (EK3_GPS_CHECK);
  satellites_visible = 12/10/8/6/5 for horiz_accuracy <= 2/5/10/20/above m, so that the
  autopilot's own checks (noise inflation below 6, pre-arm) tighten as the fix coarsens;
  IGNORE_VEL_VERT always (vision measures no vertical velocity and EK3_SRC1_VELZ defaults
  to GPS), IGNORE_ALT when no honest altitude exists.
"""
from __future__ import annotations

import bisect
import logging
import math
import os
import socket
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

NOMINAL_RANGE_ERROR_M = 3.5     # hdop = horizontal accuracy / this: 4.9 m <-> GPS_HDOP_GOOD 1.4
MIN_SEND_INTERVAL_S = 0.05      # ArduPilot drops GPS samples closer than 50 ms
MAX_INTERPOLATION_GAP_S = 0.3   # attitude samples further apart are not interpolated between
NO_FIX_ACCURACY_M = 9999.0      # horiz_accuracy sent with fix_type 1, so no old accuracy lingers
GIMBAL_MAX_AGE_S = 0.5          # gimbal attitude older than this is not used
# from the dialect, not typed: 32 here once read the vehicle-frame flag as the earth-frame one
GIMBAL_YAW_IN_EARTH_FRAME = MAV.GIMBAL_DEVICE_FLAGS_YAW_IN_EARTH_FRAME   # 64


@dataclass
class MavlinkConfig:
    connection: str = "udpout:127.0.0.1:14550"   # as mavutil takes it; serial: /dev/ttyTHS1
    baud: int = bounded(921600, ge=300, le=20_000_000, unit="baud")  # serial only
    system_id: int | None = bounded(None, ge=1, le=255)  # None: the vehicle's, from its HEARTBEAT
    component_id: int = bounded(MAV_COMP_ID_ONBOARD_COMPUTER, ge=0, le=255)
    output: Literal["gps_input", "global_position_sensor", "none"] = "gps_input"
    gps_id: int = bounded(0, ge=0, le=255)  # GPS_INPUT gps_id (0 = GPS1)
    send_no_fix: bool = True                      # GPS_INPUT fix_type 1 ("no fix") when there is no fix
    # nothing at all before the first fix: a MAV GPS2 beside a GNSS receiver stays undetected on the
    # ground, so Copter's arming check ("GPS 2: Bad fix") does not block a GNSS take-off
    silent_until_first_fix: bool = False
    attitude_rate_hz: float = bounded(50.0, gt=0, le=1000, unit="Hz")
    position_rate_hz: float = bounded(10.0, gt=0, le=1000, unit="Hz")
    rangefinder_rate_hz: float = bounded(10.0, gt=0, le=1000, unit="Hz")
    gimbal_rate_hz: float = bounded(0.0, ge=0, le=1000, unit="Hz")  # >0: request GIMBAL_DEVICE_ATTITUDE_STATUS
    request_rates: bool = True
    link_timeout_s: float = bounded(3.0, gt=0, le=3600, unit="s")  # no message from the vehicle this long: link lost
    statustext_interval_s: float = bounded(2.0, ge=0, le=3600, unit="s")  # at most one STATUSTEXT per interval
    signing_key_hex: str | None = None            # 64 hex chars: MAVLink 2 signing key
    telemetry_history_s: float = bounded(3.0, gt=0, le=3600, unit="s")
    position_max_age_s: float = bounded(1.5, gt=0, le=3600, unit="s")  # altitude older than this is treated as missing
    rangefinder_max_age_s: float = bounded(0.5, gt=0, le=3600, unit="s")
    reconnect_s: float = bounded(1.0, gt=0, le=60, unit="s")  # retry while the autopilot's port is not up


def check_connection(connection: str) -> None:
    """Refuse a connection string mavutil would fail on obscurely (bad port, unknown host)."""
    where = f"mavlink.connection {connection!r}"
    if not isinstance(connection, str) or not connection.strip():
        raise MeanNavError(f"{where}: empty; use udpout:host:port, udpin:0.0.0.0:port, tcp:host:port "
                           "or a serial device such as /dev/ttyTHS1")
    scheme, _, rest = connection.partition(":")
    if scheme not in ("udp", "udpin", "udpout", "udpbcast", "tcp", "tcpin"):
        if connection.startswith(("/", "COM")):
            try:
                import serial  # noqa: F401  pymavlink opens serial links with pyserial
            except ImportError:
                raise MeanNavError(f"{where}: serial links need pyserial; `pip install pyserial`") from None
            return
        raise MeanNavError(f"{where}: unknown kind {scheme!r}; use udpout:host:port, udpin:0.0.0.0:port, "
                           "tcp:host:port or a serial device such as /dev/ttyTHS1")
    host, sep, port = rest.rpartition(":")
    if not sep or not host:
        raise MeanNavError(f"{where}: give host:port after {scheme}:")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise MeanNavError(f"{where}: port {port!r} is not a port number (1-65535)")
    try:
        socket.getaddrinfo(host, int(port))
    except (socket.gaierror, UnicodeError) as exc:
        raise MeanNavError(f"{where}: host {host!r} cannot be resolved ({exc}); use an IP address or a "
                           "name this computer resolves") from None


def implausible(est: Estimate) -> str:
    """Why a position must not be sent ('' when it may be)."""
    values = (est.lat, est.lon, est.sigma_h_m, est.vn, est.ve)
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        return "position, velocity or accuracy not finite"
    if not (-90.0 <= est.lat <= 90.0 and -180.0 <= est.lon <= 180.0):
        return f"latitude/longitude {est.lat:.6f}, {est.lon:.6f} out of range"
    if est.sigma_h_m <= 0.0:
        return f"horizontal accuracy {est.sigma_h_m:g} m is not positive"
    if math.isfinite(est.alt_m) and not -1000.0 <= est.alt_m <= 20000.0:
        return f"altitude {est.alt_m:.0f} m AMSL implausible"
    return ""


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
        self.gimbal: tuple[float, float, float] | None = None   # camera roll, pitch, yaw (NED, optical axis x)
        self.gimbal_time = -math.inf
        self.origin_alt_m = math.nan     # EKF origin altitude (GPS_GLOBAL_ORIGIN) once the autopilot has one
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

    def add_gimbal(self, t: float, roll: float, pitch: float, yaw: float) -> None:
        with self._lock:
            self.gimbal, self.gimbal_time = (roll, pitch, yaw), t

    def vehicle_yaw_at(self, t: float) -> float:
        """The newest vehicle yaw at or before t (for a gimbal yaw given in the vehicle frame)."""
        with self._lock:
            i = bisect.bisect_right(list(self._times), t)
            return self._attitudes[i - 1][2] if i > 0 else (self._attitudes[0][2] if self._times else math.nan)

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
                sigma = max(abs(a1[0] - a0[0]), abs(a1[1] - a0[1])) * math.sqrt(w * (1 - w))
            else:
                if i == 0:
                    j = 0
                elif i == len(times):
                    j = len(times) - 1
                else:
                    j = i if times[i] - t < t - times[i - 1] else i - 1
                roll, pitch, yaw = self._attitudes[j]
                stamp, sigma = times[j], 0.0     # a stale sample is judged by its age instead
            tel = Telemetry(time_s=stamp, roll=roll, pitch=pitch, yaw=yaw, rel_alt_m=math.nan,
                            attitude_interp_sigma_rad=sigma)
            if self.position is not None and abs(t - self.position_time) <= position_max_age_s:
                lat, lon, alt, rel, vn, ve, vd, _ = self.position
                tel.lat, tel.lon, tel.alt_amsl_m, tel.rel_alt_m = lat, lon, alt, rel
                tel.vn, tel.ve, tel.vd = vn, ve, vd
            if abs(t - self.range_time) <= range_max_age_s:
                tel.range_m = self.range_m
            if self.gimbal is not None and abs(t - self.gimbal_time) <= GIMBAL_MAX_AGE_S:
                tel.gimbal_roll, tel.gimbal_pitch, tel.gimbal_yaw = self.gimbal
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
        self.refused_positions = 0                  # implausible positions turned into "no fix"
        self.connect_error = ""                     # why the port is not open yet ('' when it is)
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
    def _connect(self) -> bool:
        """Open the port once. A tcp port not up yet or a serial device not there yet is
        waited for (the reader retries); anything else is a configuration error."""
        cfg = self.cfg
        check_connection(cfg.connection)
        try:
            conn = mavutil.mavlink_connection(cfg.connection, baud=cfg.baud, source_system=cfg.system_id or 1,
                                              source_component=cfg.component_id, dialect="common",
                                              autoreconnect=True, retries=0)
        except (OSError, ValueError) as exc:
            waitable = cfg.connection.startswith("tcp:") or cfg.connection.startswith(("/", "COM"))
            if not waitable or isinstance(exc, ValueError):
                raise MeanNavError(f"mavlink.connection {cfg.connection!r}: cannot open ({exc}); use udpout:host:port, "
                                   "udpin:0.0.0.0:port, tcp:host:port or a serial device") from None
            if exc.__class__.__name__ + str(exc) != self.connect_error:
                log.warning("mavlink: %s not reachable (%s); waiting for the autopilot", cfg.connection, exc)
            self.connect_error = exc.__class__.__name__ + str(exc)
            return False
        if self._signing_key:
            conn.setup_signing(self._signing_key, sign_outgoing=True)
        if self.vehicle_system is not None and cfg.system_id is None:
            conn.mav.srcSystem = self.vehicle_system
        with self._send_lock:
            self._conn = conn
        if self.connect_error:
            log.info("mavlink: %s open", cfg.connection)
        self.connect_error = ""
        return True

    @property
    def connected(self) -> bool:
        return self._conn is not None

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
        next_origin_request = 0.0
        while not self._stop.is_set():
            if self._conn is None:
                if not self._connect():
                    self._stop.wait(self.cfg.reconnect_s)
                continue
            try:
                msg = self._conn.recv_match(blocking=True, timeout=0.1)
            except Exception as exc:  # a serial device that vanished, a socket error
                log.warning("mavlink: receive failed (%s); reconnecting", exc)
                self._stop.wait(self.cfg.reconnect_s)
                with self._send_lock:
                    conn, self._conn = self._conn, None
                try:
                    conn.close()
                except Exception:
                    pass
                try:
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
            if msg is not None:
                self._handle(msg)
            if not requested and self.vehicle_system is not None and self.cfg.request_rates:
                requested = True
                self._request_rates()
            now = time.monotonic()
            if self.vehicle_system is not None and not math.isfinite(self.telemetry.origin_alt_m) \
                    and now >= next_origin_request:
                # the EKF origin's altitude makes GLOBAL_POSITION_INT.alt an honest (barometric) AMSL
                next_origin_request = now + 5.0
                self._command(MAV.MAV_CMD_REQUEST_MESSAGE, MAV.MAVLINK_MSG_ID_GPS_GLOBAL_ORIGIN)

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
        elif kind == "GIMBAL_DEVICE_ATTITUDE_STATUS":
            self._handle_gimbal_quaternion(now, msg)
        elif kind == "MOUNT_ORIENTATION":
            yaw = math.radians(msg.yaw_absolute if math.isfinite(msg.yaw_absolute) and msg.yaw_absolute != 0
                               else msg.yaw + math.degrees(self.telemetry.vehicle_yaw_at(now)))
            self._add_gimbal(now, math.radians(msg.roll), math.radians(msg.pitch), yaw)
        elif kind == "GPS_GLOBAL_ORIGIN":
            if not math.isfinite(self.telemetry.origin_alt_m):
                log.info("mavlink: EKF origin at %.1f m AMSL", msg.altitude / 1000.0)
            self.telemetry.origin_alt_m = msg.altitude / 1000.0
        elif kind == "COMMAND_ACK" and msg.command == MAV.MAV_CMD_SET_MESSAGE_INTERVAL:
            self._last_ack = msg.result

    def _handle_gimbal_quaternion(self, now: float, msg) -> None:
        """GIMBAL_DEVICE_ATTITUDE_STATUS: q (w, x, y, z) of the gimbal frame in NED (roll and
        pitch relative to the horizon); yaw in the vehicle frame unless the earth-frame flag is set."""
        w, x, y, z = (float(v) for v in msg.q)
        if not all(math.isfinite(v) for v in (w, x, y, z)) or abs(w * w + x * x + y * y + z * z - 1.0) > 0.1:
            return
        roll = math.atan2(2 * (w * x + y * z), 1 - 2 * (x * x + y * y))
        pitch = math.asin(max(-1.0, min(1.0, 2 * (w * y - z * x))))
        yaw = math.atan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z))
        if not msg.flags & GIMBAL_YAW_IN_EARTH_FRAME:
            # MAVLink's default (and the "vehicle frame" flag): yaw relative to the vehicle's heading
            yaw += self.telemetry.vehicle_yaw_at(now)
        self._add_gimbal(now, roll, pitch, yaw)

    def _add_gimbal(self, now: float, roll: float, pitch: float, yaw: float) -> None:
        if all(math.isfinite(v) for v in (roll, pitch, yaw)):
            self.telemetry.add_gimbal(now, roll, pitch, math.remainder(yaw, 2 * math.pi))

    def _command(self, command: int, *params: float) -> None:
        """COMMAND_LONG without waiting for its acknowledgement."""
        p = list(params) + [0.0] * (7 - len(params))
        with self._send_lock:
            if self._conn is not None:
                self._conn.mav.command_long_send(self.vehicle_system, self.vehicle_component, command, 0, *p)

    def _request_rates(self) -> None:
        """MAV_CMD_SET_MESSAGE_INTERVAL per message, each acknowledged before the next."""
        cfg = self.cfg
        for msg_id, rate in ((MAV.MAVLINK_MSG_ID_ATTITUDE, cfg.attitude_rate_hz),
                             (MAV.MAVLINK_MSG_ID_GLOBAL_POSITION_INT, cfg.position_rate_hz),
                             (MAV.MAVLINK_MSG_ID_DISTANCE_SENSOR, cfg.rangefinder_rate_hz),
                             (MAV.MAVLINK_MSG_ID_GIMBAL_DEVICE_ATTITUDE_STATUS, cfg.gimbal_rate_hz)):
            if rate <= 0:
                continue
            result = None
            for _attempt in range(3):
                self._last_ack = None
                self._command(MAV.MAV_CMD_SET_MESSAGE_INTERVAL, msg_id, 1e6 / rate)
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

    # --- sending ---------------------------------------------------------------------
    def _send(self, encode) -> bool:
        """Run one encoder on the open connection (False while the port is not open)."""
        with self._send_lock:
            if self._conn is None:
                return False
            encode(self._conn.mav)
            self.messages_sent += 1
            return True

    def send_heartbeat(self, system_status: int) -> None:
        self._send(lambda mav: mav.heartbeat_send(MAV_TYPE_ONBOARD_CONTROLLER, MAV_AUTOPILOT_INVALID, 0, 0,
                                                  system_status))

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
        return self._send(lambda mav: mav.statustext_send(severity, text.encode("ascii", "replace")))

    def send_estimate(self, est: Estimate, capture_unix_s: float, processing_s: float = 0.0,
                      now: float | None = None) -> bool:
        """Encode one estimate, valid at `capture_unix_s` (the frame time in replay, the send time
        in the daemon), for the configured autopilot.
        Returns True if a position went out. A fix that is not finite or not plausible is
        refused here whatever produced it, and goes out as "no fix"."""
        now = time.monotonic() if now is None else now
        if self.cfg.output == "none" or now - self._last_position_send < MIN_SEND_INTERVAL_S:
            return False
        if est.fix == FixQuality.FIX:
            problem = implausible(est)
            if problem:
                self.refused_positions += 1
                log.error("mavlink: refusing to send a position: %s", problem)
                est = Estimate(time_s=est.time_s, fix=FixQuality.NONE, reason=f"refused: {problem}")
        if self.cfg.output == "gps_input":
            sent = self._send_gps_input(est, capture_unix_s)
        else:
            sent = self._send_global_position_sensor(est, capture_unix_s, processing_s)
        if sent:
            self._last_position_send = now
        return sent and est.fix == FixQuality.FIX

    def _send_gps_input(self, est: Estimate, time_unix_s: float) -> bool:
        week, week_ms = gps_week_and_ms(time_unix_s)
        time_usec = int(time_unix_s * 1e6)
        if est.fix != FixQuality.FIX:
            if not self.cfg.send_no_fix or (self.cfg.silent_until_first_fix and not self.positions_sent):
                return False
            # fix_type 1: "connected, no fix" (0 would say no GPS is there); the accuracy goes out
            # too so the autopilot does not keep showing the last fix's
            ignore = (IGNORE_ALT | IGNORE_VEL_HORIZ | IGNORE_VEL_VERT | IGNORE_SPEED_ACCURACY
                      | IGNORE_VERTICAL_ACCURACY)
            return self._send(lambda mav: mav.gps_input_send(
                time_usec, self.cfg.gps_id, ignore, week_ms, week, 1, 0, 0, 0.0, 99.99, 99.99,
                0.0, 0.0, 0.0, 0.0, NO_FIX_ACCURACY_M, 0.0, 0, 0))
        ignore = IGNORE_VEL_VERT
        alt = est.alt_m
        if not math.isfinite(alt):
            ignore |= IGNORE_ALT | IGNORE_VDOP | IGNORE_VERTICAL_ACCURACY
            alt = 0.0
        sigma_v = _finite_or(est.sigma_v_m, 100.0)
        # Estimate.sigma_speed_ms is the RMS of the 2-D velocity error; the autopilot wants one axis
        sigma_speed = _finite_or(est.sigma_speed_ms, 100.0) / math.sqrt(2.0)
        sent = self._send(lambda mav: mav.gps_input_send(
            time_usec, self.cfg.gps_id, ignore, week_ms, week, 3,
            int(round(est.lat * 1e7)), int(round(est.lon * 1e7)), float(alt),
            dop_for_accuracy(est.sigma_h_m), dop_for_accuracy(sigma_v),
            float(est.vn), float(est.ve), 0.0, float(min(sigma_speed, 100.0)),
            float(min(est.sigma_h_m, 1000.0)), float(min(sigma_v, 1000.0)),
            satellites_for_accuracy(est.sigma_h_m), 0))
        self.positions_sent += sent
        return sent

    def _send_global_position_sensor(self, est: Estimate, time_unix_s: float, processing_s: float) -> bool:
        if est.fix != FixQuality.FIX:
            return False    # PX4: no message is the honest "no fix"
        alt = est.alt_m if math.isfinite(est.alt_m) else math.nan
        sent = self._send(lambda mav: mav.global_position_sensor_send(
            self.vehicle_system or 0, 0, 0, int(time_unix_s * 1e6), int(max(processing_s, 0.0) * 1e6),
            MAV.GLOBAL_POSITION_SRC_VISION, MAV.GLOBAL_POSITION_PRIMARY,
            int(round(est.lat * 1e7)), int(round(est.lon * 1e7)), math.nan, float(alt),
            float(est.sigma_h_m), float(_finite_or(est.sigma_v_m, 1000.0))))
        self.positions_sent += sent
        return sent
