"""Telemetry from recorded flights: telemetry.csv, ArduPilot .tlog / DataFlash .bin, PX4 .ulg.

Every reader returns a `TelemetryTrack`: per-channel time series (seconds on the log's
own clock, strictly increasing) in the units of `mean_nav.nav.telemetry.Telemetry`
(radians, metres, m/s NED, WGS84 degrees). `TelemetryTrack.at(times)` interpolates every
channel to frame times (angles unwrapped first) and reports frames that fall in a gap or
outside the log instead of inventing values there.

Time bases: .tlog uses the autopilot's boot clock (`time_boot_ms`), .bin its `TimeUS`
boot clock, .ulg its `timestamp` (boot clock, or Unix time in SITL logs). A flight's
`time_offset_s` maps log time to frame time: frame_time = log_time + time_offset_s.
"""
from __future__ import annotations

import contextlib
import csv
import gc
import io
import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import Limits, read_csv, show
from ..errors import MeanNavError
from ..nav.telemetry import Telemetry

log = logging.getLogger(__name__)

ANGLE_CHANNELS = ("roll", "pitch", "yaw", "gimbal_roll", "gimbal_pitch", "gimbal_yaw")
# Channels a frame cannot be localized without; the others may be missing (nan).
REQUIRED_CHANNELS = ("roll", "pitch", "yaw", "rel_alt_m")
ALL_CHANNELS = ("roll", "pitch", "yaw", "rel_alt_m", "alt_amsl_m", "range_m",
                "vn", "ve", "vd", "lat", "lon", "gimbal_roll", "gimbal_pitch", "gimbal_yaw")
CSV_REQUIRED_COLUMNS = ("time_s", "lat", "lon", "alt_m", "rel_alt_m", "roll", "pitch", "yaw")
# gimbal_*: the camera's own attitude (Telemetry.gimbal_*), written only when a flight has it
GIMBAL_COLUMNS = ("gimbal_roll", "gimbal_pitch", "gimbal_yaw")
CSV_COLUMNS = CSV_REQUIRED_COLUMNS + ("vn", "ve", "vd", "range_m") + GIMBAL_COLUMNS
CHANNEL_COLUMN = {"alt_amsl_m": "alt_m"}  # channel names that differ from telemetry.csv's
_ANGLE = Limits(ge=-2 * math.pi, le=2 * math.pi, unit="radians")
# plausible values (units of telemetry.csv); log samples outside them are dropped
CSV_LIMITS = {
    "time_s": Limits(ge=-1e10, le=1e10, unit="s"),
    "lat": Limits(ge=-90, le=90, unit="deg"), "lon": Limits(ge=-180, le=180, unit="deg"),
    "alt_m": Limits(ge=-1000, le=100_000, unit="m"), "rel_alt_m": Limits(ge=-10_000, le=100_000, unit="m"),
    "vn": Limits(ge=-1000, le=1000, unit="m/s"), "ve": Limits(ge=-1000, le=1000, unit="m/s"),
    "vd": Limits(ge=-1000, le=1000, unit="m/s"), "range_m": Limits(ge=0, le=100_000, unit="m"),
    **{c: _ANGLE for c in ("roll", "pitch", "yaw") + GIMBAL_COLUMNS},
}

DOWNWARD = 25  # MAV_SENSOR_ROTATION_PITCH_270: a rangefinder looking down


@dataclass
class Series:
    """One channel: values at strictly increasing times (seconds)."""

    time_s: np.ndarray
    values: np.ndarray


@dataclass
class TelemetryAt:
    """Telemetry interpolated at a list of times; `problem[i]` says why item i is None."""

    telemetry: list[Telemetry | None]
    problem: list[str]


@dataclass
class TelemetryTrack:
    """Per-channel telemetry series of one recorded flight."""

    channels: dict[str, Series]
    source: str
    max_gap_s: float = 1.0          # longer holes in a required channel are reported, not bridged
    notes: list[str] = field(default_factory=list)  # what the reader fixed up (dropped samples...)

    def time_range(self) -> tuple[float, float]:
        """Span covered by all required channels."""
        starts = [self.channels[c].time_s[0] for c in REQUIRED_CHANNELS]
        ends = [self.channels[c].time_s[-1] for c in REQUIRED_CHANNELS]
        return max(starts), min(ends)

    def shifted(self, offset_s: float) -> "TelemetryTrack":
        """The same track on another clock: t + offset_s."""
        return TelemetryTrack({k: Series(s.time_s + offset_s, s.values) for k, s in self.channels.items()},
                              self.source, self.max_gap_s, list(self.notes))

    def column(self, name: str, times: np.ndarray) -> np.ndarray:
        """Channel `name` interpolated at `times` (nan outside the channel's span or in its gaps)."""
        times = np.asarray(times, float)
        series = self.channels.get(name)
        if series is None or len(series.time_s) == 0:
            return np.full(times.shape, np.nan)
        t, v = series.time_s, series.values
        if name in ANGLE_CHANNELS:
            v = np.unwrap(v)
        if len(t) == 1:
            out = np.where(np.abs(times - t[0]) <= 1e-9, v[0], np.nan)
        else:
            out = np.interp(times, t, v)
            # a sample must exist within max_gap_s on both sides
            right = np.clip(np.searchsorted(t, times, side="left"), 0, len(t) - 1)
            left = np.clip(right - 1, 0, len(t) - 1)
            exact = np.isclose(t[right], times, atol=1e-9)
            gap = (t[right] - t[left]) > self.max_gap_s
            outside = (times < t[0] - 1e-9) | (times > t[-1] + 1e-9)
            out[(gap & ~exact) | outside] = np.nan
        if name in ANGLE_CHANNELS:
            out = wrap_pi(out)
        return out

    def interpolation_sigma(self, name: str, times: np.ndarray) -> np.ndarray:
        """RMS error of channel `name` interpolated at `times` if the change between the two
        bracketing samples is a step at an unknown moment (see Telemetry.attitude_interp_sigma_rad)."""
        times = np.asarray(times, float)
        series = self.channels.get(name)
        if series is None or len(series.time_s) < 2:
            return np.zeros(times.shape)
        t, v = series.time_s, series.values
        if name in ANGLE_CHANNELS:
            v = np.unwrap(v)
        right = np.clip(np.searchsorted(t, times, side="left"), 1, len(t) - 1)
        left = right - 1
        w = np.clip((times - t[left]) / (t[right] - t[left]), 0.0, 1.0)
        return np.abs(v[right] - v[left]) * np.sqrt(w * (1 - w))

    def at(self, times) -> TelemetryAt:
        """Telemetry at each time, or None with the reason (outside the log, gap)."""
        times = np.asarray(times, float)
        cols = {name: self.column(name, times) for name in ALL_CHANNELS}
        attitude_sigma = np.maximum(self.interpolation_sigma("roll", times), self.interpolation_sigma("pitch", times))
        first, last = self.time_range()
        result: list[Telemetry | None] = []
        problems: list[str] = []
        for i, t in enumerate(times):
            missing = [c for c in REQUIRED_CHANNELS if not math.isfinite(cols[c][i])]
            if missing:
                if t < first or t > last:
                    why = (f"no telemetry at t={t:.3f} s: the log covers {first:.3f}..{last:.3f} s "
                           "(check time_offset_s)")
                else:
                    why = f"telemetry gap longer than {self.max_gap_s:g} s at t={t:.3f} s in {', '.join(missing)}"
                result.append(None)
                problems.append(why)
                continue
            result.append(Telemetry(
                time_s=float(t), roll=float(cols["roll"][i]), pitch=float(cols["pitch"][i]),
                yaw=float(cols["yaw"][i]), rel_alt_m=float(cols["rel_alt_m"][i]),
                alt_amsl_m=float(cols["alt_amsl_m"][i]), range_m=float(cols["range_m"][i]),
                vn=float(cols["vn"][i]), ve=float(cols["ve"][i]), vd=float(cols["vd"][i]),
                lat=float(cols["lat"][i]), lon=float(cols["lon"][i]),
                gimbal_roll=float(cols["gimbal_roll"][i]), gimbal_pitch=float(cols["gimbal_pitch"][i]),
                gimbal_yaw=float(cols["gimbal_yaw"][i]), attitude_interp_sigma_rad=float(attitude_sigma[i])))
            problems.append("")
        return TelemetryAt(result, problems)


def wrap_pi(a):
    """Angles to [-pi, pi)."""
    return (np.asarray(a, float) + np.pi) % (2 * np.pi) - np.pi


def _series(source: str, name: str, t, v, notes: list[str]) -> Series:
    """Sorted-in-time series with non-finite or implausible values, repeated and backwards
    stamps dropped."""
    t = np.asarray(t, float)
    v = np.asarray(v, float)
    limits = CSV_LIMITS[CHANNEL_COLUMN.get(name, name)]
    ok = np.isfinite(t) & limits.within(v)
    implausible = int((np.isfinite(v) & ~ok).sum())
    if implausible:
        notes.append(f"{name}: dropped {implausible} implausible sample(s) ({limits.describe()})")
        log.warning("%s: %s: dropped %d implausible sample(s)", source, name, implausible)
    t, v = t[ok], v[ok]
    if name in ANGLE_CHANNELS:  # e.g. DataFlash yaw is 0..360 degrees
        v = wrap_pi(v)
    keep = np.ones(len(t), bool)
    latest = -np.inf
    for i, ti in enumerate(t):  # keep a sample only if it moves time forward
        if ti <= latest:
            keep[i] = False
        else:
            latest = ti
    dropped = int((~keep).sum())
    if dropped:
        notes.append(f"{name}: dropped {dropped} sample(s) whose time did not increase")
        log.warning("%s: %s: dropped %d sample(s) whose time did not increase", source, name, dropped)
    return Series(t[keep], v[keep])


def _finish(source: str, raw: dict[str, tuple], max_gap_s: float) -> TelemetryTrack:
    notes: list[str] = []
    channels = {name: _series(source, name, t, v, notes) for name, (t, v) in raw.items() if len(t)}
    missing = [c for c in REQUIRED_CHANNELS if c not in channels or len(channels[c].time_s) == 0]
    if missing:
        raise MeanNavError(f"{source}: the log has no {missing[0]} data (needs attitude and altitude); "
                           "log ATTITUDE/GLOBAL_POSITION_INT (tlog), ATT/POS (bin) or "
                           "vehicle_attitude/vehicle_local_position (ulg)")
    return TelemetryTrack(channels, source, max_gap_s, notes)


# --- telemetry.csv --------------------------------------------------------------------------

def read_telemetry_csv(path: str | Path, max_gap_s: float = 1.0) -> TelemetryTrack:
    """The flight folder's telemetry.csv (time_s, lat, lon, alt_m, rel_alt_m, roll, pitch, yaw
    in radians, optional vn, ve, vd, range_m and the camera's gimbal_roll, gimbal_pitch,
    gimbal_yaw). Time must increase row by row."""
    path = Path(path)
    if not path.is_file():
        raise MeanNavError(f"{path}: telemetry file not found; a flight needs telemetry.csv or "
                           "flight.yaml telemetry_log")
    _, lines = read_csv(path, "telemetry.csv", CSV_REQUIRED_COLUMNS)
    rows = {c: [] for c in CSV_COLUMNS}
    previous = -math.inf
    for line, row in lines:
        values = {}
        for c in CSV_COLUMNS:
            text = row.get(c)
            if text is None or not text.strip():
                values[c] = math.nan  # an empty cell: not measured
                continue
            try:
                values[c] = float(text)
            except ValueError:
                raise MeanNavError(f"{path}: line {line}: {c} {show(text)} is not a number; "
                                   "fix the row (leave the cell empty when a value is missing)") from None
            CSV_LIMITS[c].check(values[c], f"{path}: line {line}: {c}")
        t = values["time_s"]
        if not math.isfinite(t):
            raise MeanNavError(f"{path}: line {line}: time_s is empty; every row needs a time")
        if t <= previous:
            raise MeanNavError(f"{path}: line {line}: time_s {t} does not increase (previous {previous}); "
                               "sort the rows by time and remove duplicates")
        previous = t
        for c in CSV_COLUMNS:
            rows[c].append(values[c])
    if not rows["time_s"]:
        raise MeanNavError(f"{path}: telemetry.csv has no rows")
    t = np.array(rows["time_s"])
    column_channel = {c: ch for ch, c in CHANNEL_COLUMN.items()}
    raw = {column_channel.get(c, c): (t, np.array(rows[c])) for c in CSV_COLUMNS if c != "time_s"}
    return _finish(str(path), raw, max_gap_s)


def write_telemetry_csv(path: str | Path, rows: list[Telemetry]) -> None:
    """Write telemetry.csv (temp file then rename); unknown values as empty cells, gimbal
    columns only when a row has them."""
    path = Path(path)
    gimbal = any(r.has_gimbal_attitude for r in rows)
    num = lambda v, fmt: "" if not math.isfinite(v) else format(v, fmt)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS if gimbal else CSV_COLUMNS[:-len(GIMBAL_COLUMNS)])
        for r in rows:
            row = [f"{r.time_s:.6f}", num(r.lat, ".9f"), num(r.lon, ".9f"), num(r.alt_amsl_m, ".3f"),
                   f"{r.rel_alt_m:.3f}", f"{r.roll:.6f}", f"{r.pitch:.6f}", f"{r.yaw:.6f}",
                   num(r.vn, ".4f"), num(r.ve, ".4f"), num(r.vd, ".4f"), num(r.range_m, ".3f")]
            if gimbal:
                row += [num(r.gimbal_roll, ".6f"), num(r.gimbal_pitch, ".6f"), num(r.gimbal_yaw, ".6f")]
            w.writerow(row)
    tmp.replace(path)


# --- ArduPilot MAVLink telemetry log (.tlog) ------------------------------------------------

def read_tlog(path: str | Path, max_gap_s: float = 1.0) -> TelemetryTrack:
    """ATTITUDE, GLOBAL_POSITION_INT and downward DISTANCE_SENSOR on the `time_boot_ms` clock."""
    from pymavlink import mavutil

    path = _existing(path)
    raw = {c: ([], []) for c in ALL_CHANNELS}

    def add(name, t, v):
        raw[name][0].append(t)
        raw[name][1].append(v)

    conn = None
    try:
        with _parsers_quiet():
            conn = mavutil.mavlink_connection(str(path), dialect="common")
            types = ["ATTITUDE", "GLOBAL_POSITION_INT", "DISTANCE_SENSOR"]
            while True:
                msg = conn.recv_match(type=types)
                if msg is None:
                    break
                kind = msg.get_type()
                if kind == "BAD_DATA":
                    continue
                t = msg.time_boot_ms / 1000.0
                if kind == "ATTITUDE":
                    add("roll", t, msg.roll); add("pitch", t, msg.pitch); add("yaw", t, msg.yaw)
                elif kind == "GLOBAL_POSITION_INT":
                    if msg.lat == 0 and msg.lon == 0:  # "unknown" in MAVLink
                        continue
                    add("lat", t, msg.lat * 1e-7); add("lon", t, msg.lon * 1e-7)
                    add("alt_amsl_m", t, msg.alt / 1000.0); add("rel_alt_m", t, msg.relative_alt / 1000.0)
                    add("vn", t, msg.vx / 100.0); add("ve", t, msg.vy / 100.0); add("vd", t, msg.vz / 100.0)
                elif kind == "DISTANCE_SENSOR" and msg.orientation == DOWNWARD:
                    add("range_m", t, msg.current_distance / 100.0 if msg.current_distance > 0 else math.nan)
    except Exception as exc:  # pymavlink raises any exception type on damaged files
        raise MeanNavError(f"{path}: cannot read as a MAVLink telemetry log ({_reason(exc)}); the file is "
                           "damaged or not a .tlog, copy it again from the vehicle") from None
    finally:
        _close(conn)
    return _finish(str(path), raw, max_gap_s)


# --- ArduPilot DataFlash log (.bin) -----------------------------------------------------------

def read_dataflash(path: str | Path, max_gap_s: float = 1.0) -> TelemetryTrack:
    """ATT (degrees), POS (EKF position, RelHomeAlt), GPS as a fallback position, XKF1/NKF1
    velocity and RFND range, on the `TimeUS` boot clock."""
    from pymavlink import mavutil

    path = _existing(path)
    raw = {c: ([], []) for c in ALL_CHANNELS}
    gps = {c: ([], []) for c in ("lat", "lon", "alt_amsl_m")}

    def add(table, name, t, v):
        table[name][0].append(t)
        table[name][1].append(v)

    conn = None
    try:
        with _parsers_quiet():
            conn = mavutil.mavlink_connection(str(path))
            types = ["ATT", "POS", "GPS", "XKF1", "NKF1", "RFND"]
            while True:
                msg = conn.recv_match(type=types)
                if msg is None:
                    break
                kind = msg.get_type()
                t = msg.TimeUS / 1e6
                if kind == "ATT":
                    add(raw, "roll", t, math.radians(msg.Roll)); add(raw, "pitch", t, math.radians(msg.Pitch))
                    add(raw, "yaw", t, math.radians(msg.Yaw))
                elif kind == "POS":
                    add(raw, "lat", t, msg.Lat); add(raw, "lon", t, msg.Lng)
                    add(raw, "alt_amsl_m", t, msg.Alt)
                    if hasattr(msg, "RelHomeAlt"):
                        add(raw, "rel_alt_m", t, msg.RelHomeAlt)
                elif kind == "GPS" and msg.Status >= 3:
                    add(gps, "lat", t, msg.Lat); add(gps, "lon", t, msg.Lng); add(gps, "alt_amsl_m", t, msg.Alt)
                elif kind in ("XKF1", "NKF1") and getattr(msg, "C", 0) == 0:  # core 0 only
                    add(raw, "vn", t, msg.VN); add(raw, "ve", t, msg.VE); add(raw, "vd", t, msg.VD)
                elif kind == "RFND":
                    dist = getattr(msg, "Dist", getattr(msg, "Dist1", math.nan))
                    if getattr(msg, "Orient", DOWNWARD) == DOWNWARD:
                        add(raw, "range_m", t, dist if dist > 0 else math.nan)
    except Exception as exc:  # pymavlink raises any exception type on damaged files
        raise MeanNavError(f"{path}: cannot read as a DataFlash log ({_reason(exc)}); the file is damaged "
                           "or not a .bin, copy it again from the vehicle") from None
    finally:
        _close(conn)
    if not raw["lat"][0] and gps["lat"][0]:
        for c in gps:
            raw[c] = gps[c]
    return _finish(str(path), raw, max_gap_s)


# --- PX4 ULog (.ulg) --------------------------------------------------------------------------

def quaternion_to_euler(q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hamilton quaternions [N, 4] (w, x, y, z; body -> NED) -> ZYX roll, pitch, yaw radians."""
    w, x, y, z = (q[:, i] for i in range(4))
    roll = np.arctan2(2 * (w * x + y * z), 1 - 2 * (x * x + y * y))
    pitch = np.arcsin(np.clip(2 * (w * y - z * x), -1.0, 1.0))
    yaw = np.arctan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z))
    return roll, pitch, yaw


def read_ulog(path: str | Path, max_gap_s: float = 1.0) -> TelemetryTrack:
    """vehicle_attitude, vehicle_local_position (-z = height above the EKF origin, velocity),
    vehicle_global_position (or the GNSS topic) and a downward distance_sensor, on the
    log's `timestamp` clock."""
    from pyulog import ULog

    path = _existing(path)
    try:
        with _parsers_quiet(), _ReadBudget(path) as handle:
            ulog = ULog(handle, ["vehicle_attitude", "vehicle_local_position", "vehicle_global_position",
                                 "vehicle_gps_position", "sensor_gps", "distance_sensor"])
    except Exception as exc:  # pyulog raises bare exceptions on corrupt files
        raise MeanNavError(f"{path}: cannot read as a PX4 ULog ({_reason(exc)}); the file is damaged or "
                           "not a .ulg, copy it again from the vehicle") from None
    topics = {}
    for d in ulog.data_list:
        if d.multi_id == 0 or d.name == "distance_sensor":
            topics.setdefault(d.name, []).append(d.data)
    raw: dict[str, tuple] = {}

    def first(name):
        return topics[name][0] if name in topics else None

    att = first("vehicle_attitude")
    if att is not None:
        t = att["timestamp"] / 1e6
        q = np.stack([att[f"q[{i}]"] for i in range(4)], 1).astype(float)
        roll, pitch, yaw = quaternion_to_euler(q)
        raw.update(roll=(t, roll), pitch=(t, pitch), yaw=(t, yaw))
    lpos = first("vehicle_local_position")
    if lpos is not None:
        t = lpos["timestamp"] / 1e6
        z_ok = lpos["z_valid"].astype(bool) if "z_valid" in lpos else np.ones(len(t), bool)
        raw["rel_alt_m"] = (t[z_ok], -lpos["z"][z_ok].astype(float))
        v_ok = lpos["v_xy_valid"].astype(bool) if "v_xy_valid" in lpos else np.ones(len(t), bool)
        for ch, key in (("vn", "vx"), ("ve", "vy"), ("vd", "vz")):
            raw[ch] = (t[v_ok], lpos[key][v_ok].astype(float))
    gpos = first("vehicle_global_position")
    if gpos is not None:
        t = gpos["timestamp"] / 1e6
        raw.update(lat=(t, gpos["lat"]), lon=(t, gpos["lon"]), alt_amsl_m=(t, gpos["alt"]))
    else:
        gnss = first("sensor_gps") if first("vehicle_gps_position") is None else first("vehicle_gps_position")
        if gnss is not None:
            ok = gnss["fix_type"] >= 3
            t = gnss["timestamp"][ok] / 1e6
            if "latitude_deg" in gnss:  # PX4 >= 1.14 field names
                lat, lon, alt = gnss["latitude_deg"], gnss["longitude_deg"], gnss["altitude_msl_m"]
            else:  # older: degE7 and millimetres
                lat, lon, alt = gnss["lat"] * 1e-7, gnss["lon"] * 1e-7, gnss["alt"] / 1000.0
            raw.update(lat=(t, np.asarray(lat, float)[ok]), lon=(t, np.asarray(lon, float)[ok]),
                       alt_amsl_m=(t, np.asarray(alt, float)[ok]))
    for rng in topics.get("distance_sensor", []):
        if "orientation" in rng and np.all(rng["orientation"] == DOWNWARD):
            d = rng["current_distance"].astype(float)
            raw["range_m"] = (rng["timestamp"] / 1e6, np.where(d > 0, d, np.nan))
            break
    return _finish(str(path), raw, max_gap_s)


def read_telemetry_log(path: str | Path, max_gap_s: float = 1.0) -> TelemetryTrack:
    """Pick the reader by file extension: .tlog, .bin, .ulg (or .csv)."""
    suffix = Path(path).suffix.lower()
    readers = {".tlog": read_tlog, ".bin": read_dataflash, ".ulg": read_ulog, ".csv": read_telemetry_csv}
    if suffix not in readers:
        raise MeanNavError(f"{path}: unknown telemetry log type {suffix!r}; use a .tlog, .bin, .ulg or .csv file")
    return readers[suffix](path, max_gap_s=max_gap_s)


def _existing(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise MeanNavError(f"{path}: telemetry log not found; check flight.yaml telemetry_log")
    return path


def _parsers_quiet():
    """pymavlink and pyulog print every damaged header (stdout and stderr): keep it off the
    user's terminal."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(_Discard()))
    stack.enter_context(contextlib.redirect_stderr(_Discard()))
    return stack


class _Discard(io.TextIOBase):
    def write(self, text: str) -> int:
        return len(text)


class _ReadBudget:
    """A binary file that refuses to be read more than a few times over: pyulog 1.3 can
    seek back and forth forever on a damaged message near the end of a .ulg."""

    def __init__(self, path: Path, times: int = 4):
        self._file = open(path, "rb")
        self._left = times * max(path.stat().st_size, 1 << 16)

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size)
        self._left -= max(len(data), 1)
        if self._left < 0:
            raise OSError("the reader keeps re-reading the same bytes (damaged message)")
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "_ReadBudget":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _close(conn) -> None:
    if conn is not None:
        with contextlib.suppress(Exception):  # a damaged reader may fail to close too
            conn.close()
    else:
        # pymavlink's DFReader opens the log before it parses the header and does not close it
        # when its constructor fails on a damaged file: finalise that orphan here, quietly,
        # instead of leaving a ResourceWarning for whatever code runs next
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()


def _reason(exc: Exception) -> str:
    return f"{type(exc).__name__}: {show(' '.join(str(exc).split()))}"
