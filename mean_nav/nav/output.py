"""The fixed-rate output loop: what the autopilot receives, whatever the camera does.

ArduPilot calls a GPS unhealthy when the mean interval between its messages exceeds
215 ms (or two in a row exceed 245 ms), so positions cannot go out when frames happen to
be processed. This loop sends at `rate_hz` (5 Hz by default) on its own thread:

  - position and velocity are the Kalman filter's state *propagated to the send time*
    (the frame that produced the last fix was captured hundreds of milliseconds earlier),
    and the reported accuracy is the propagated covariance: it grows honestly between fixes;
  - fix_type 3 only while the filter holds a gated visual fix younger than `fix_max_age_s`;
    otherwise "no fix" (GPS_INPUT fix_type 1). Below the camera's visual floor (the last metres
    of a landing, where no view holds enough map pixels, or descending onto it) the last fix is
    held for `low_hold_s`: its position, velocity 0, and accuracies that cover the filter's
    propagated spread and the step to its extrapolation; once landed (`ground_height_m`) velocity 0 with 0.1 m/s and the
    accuracy frozen at touchdown (a landed vehicle does not move). Not the extrapolation itself: the autopilot holds position in
    that descent, and the velocity of the last fix, fed back through its position hold, drove
    the EKF 39 m off on ArduCopter SITL (the extrapolation drifted 15 m in 10 s at 1.5 m/s);
  - altitude from the source the user configures (`altitude`), never the autopilot's own
    GPS-derived altitude echoed back: `baro` (GLOBAL_POSITION_INT.alt once the autopilot
    reports an EKF origin: then it is origin + barometric height), `field_elevation`
    (`field_elevation_m` + the autopilot's relative altitude), `dem` (a DEM GeoTIFF sampled
    at the fix + the downward rangefinder) or `none`; without an honest value the message
    carries IGNORE_ALT.

Since positions are propagated to the send time, GPS1_DELAY_MS should stay near 0.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from ..config import bounded, validate
from ..errors import MeanNavError
from .estimate import Estimate, FixQuality
from .filter import RADIUS68_PER_SIGMA

log = logging.getLogger(__name__)

LANDED_MAX_VZ_MS = 0.3          # vertical speed of a vehicle on the ground (a landing descends >= 0.5 m/s)
LANDED_SPEED_SIGMA_MS = 0.1     # per axis: what a landed vehicle's velocity is known to


@dataclass
class OutputConfig:
    # GPS_INPUT rate: ArduPilot calls a GPS unhealthy below 5 Hz (mean interval > 215 ms; 4.5 Hz fails)
    # and drops samples closer than 50 ms
    rate_hz: float = bounded(5.0, ge=5, le=20, unit="Hz")
    # fix_type 3 only while the last gated fix is younger. Measured on ArduCopter SITL: across a
    # turn, a fix propagated for 1.5 s after a processing stall was 2.5 x its accuracy off and
    # tripped EKF3's variance failsafe; EKF3's own IMU dead reckoning bridges such gaps better
    fix_max_age_s: float = bounded(1.5, gt=0, le=60, unit="s")
    # below the visual floor (localizer.min_height_m, or a footprint under
    # localizer.correlate.min_footprint_px map pixels: ~4 m at 0.25 m/px, 70 deg lens), or
    # descending onto it (there within fix_max_age_s at the autopilot's descent rate), the last
    # fix goes on as fix_type 3 this long (velocity 0, accuracy growing as the filter's spread),
    # while its 68 % radius stays within filter.max_sigma_m: a landing descends the last metres
    # without the autopilot losing its GPS (5 m at Copter's default LAND_SPEED 0.5 m/s: 10 s). 0: off
    low_hold_s: float = bounded(20.0, ge=0, le=60, unit="s")
    # a held fix below this height above ground (rangefinder, else relative altitude) with the
    # autopilot's vertical speed under 0.3 m/s is a landed vehicle: velocity 0 (0.1 m/s) and the
    # accuracy of touchdown, no longer growing. Without it EKF3 kept the velocity error it had at
    # touchdown (~1 m/s), drifted on the ground, and Copter's land detector waited for its failsafe
    ground_height_m: float = bounded(0.5, ge=0, le=10, unit="m")
    altitude: Literal["baro", "field_elevation", "dem", "none"] = "baro"
    # take-off ground AMSL, for altitude: field_elevation
    field_elevation_m: float | None = bounded(None, ge=-500, le=9000, unit="m")
    dem: str | None = None               # DEM GeoTIFF (metres AMSL), for altitude: dem
    output_log: str | None = None        # JSON lines, one per message sent (time, fix, position, accuracy)


def check_output_config(cfg: OutputConfig, where: str = "config") -> None:
    """The declared limits, and the settings each altitude source needs."""
    validate(cfg, where, "output.")
    if cfg.altitude not in ("baro", "field_elevation", "dem", "none"):
        raise MeanNavError(f"{where}: output.altitude {cfg.altitude!r}: use baro, field_elevation, dem or none")
    if cfg.altitude == "field_elevation" and cfg.field_elevation_m is None:
        raise MeanNavError(f"{where}: output.field_elevation_m: set the take-off ground elevation (m AMSL) "
                           "for altitude: field_elevation")
    if cfg.altitude == "dem" and not cfg.dem:
        raise MeanNavError(f"{where}: output.dem: give the DEM GeoTIFF for altitude: dem")


class Dem:
    """Terrain elevation (m AMSL) from a single-band GeoTIFF, sampled bilinearly at lon/lat."""

    def __init__(self, path: str | Path):
        import rasterio

        from ..geo.crs import from_lonlat

        self._from_lonlat = from_lonlat
        try:
            with rasterio.open(path) as ds:
                band = ds.read(1, masked=True).astype(np.float64)
                self.crs, self.transform = ds.crs, ds.transform
        except (rasterio.errors.RasterioError, OSError) as exc:
            raise MeanNavError(f"output.dem {path}: cannot read the DEM ({exc}); give a GeoTIFF of heights") from None
        if self.crs is None:
            raise MeanNavError(f"output.dem {path}: the DEM has no coordinate reference system")
        self.height = band.filled(np.nan)
        self.path = path

    def elevation(self, lon: float, lat: float) -> float:
        x, y = self._from_lonlat(self.crs, lon, lat)
        col, row = ~self.transform @ (float(x), float(y))
        c, r = col - 0.5, row - 0.5        # pixel centres
        c0, r0 = math.floor(c), math.floor(r)
        h, w = self.height.shape
        if not (0 <= c0 < w - 1 and 0 <= r0 < h - 1):
            return math.nan
        fc, fr = c - c0, r - r0
        patch = self.height[r0:r0 + 2, c0:c0 + 2]
        return float((patch[0, 0] * (1 - fc) + patch[0, 1] * fc) * (1 - fr)
                     + (patch[1, 0] * (1 - fc) + patch[1, 1] * fc) * fr)


class AltitudeSource:
    """The altitude (m AMSL) that goes out with a fix, NaN when there is no honest one."""

    def __init__(self, cfg: OutputConfig, config_dir: Path = Path(".")):
        self.kind = cfg.altitude
        self.field_elevation_m = cfg.field_elevation_m
        self.dem = None
        if cfg.altitude == "dem":
            dem = Path(cfg.dem).expanduser()
            self.dem = Dem(dem if dem.is_absolute() else config_dir / dem)

    def altitude(self, telemetry, origin_alt_m: float, lat: float, lon: float) -> float:
        if telemetry is None or self.kind == "none":
            return math.nan
        if self.kind == "baro":
            # before an EKF origin exists the autopilot reports 0 (or its own GPS altitude): never echo that
            return telemetry.alt_amsl_m if math.isfinite(origin_alt_m) else math.nan
        if self.kind == "field_elevation":
            return self.field_elevation_m + telemetry.rel_alt_m
        if math.isfinite(telemetry.range_m) and telemetry.range_m > 0:
            return self.dem.elevation(lon, lat) + telemetry.range_m
        return math.nan


@dataclass
class TrackSnapshot:
    """The filter as the last processed frame left it, with the time of its last gated fix."""
    filter: object               # a private copy of the localizer's PositionFilter
    last_fix_s: float            # monotonic capture time of the newest FIX estimate
    xy_to_lonlat: object         # the tile cache's CRS conversion
    too_low: bool = False        # the newest frame was below the camera's visual floor
    fix_xy: tuple | None = None  # the filter's position at the last fix (what a hold sends)
    visual_floor_m: float = math.nan   # that floor (height above ground)


class OutputLoop:
    """Sends the propagated filter state at a fixed rate on its own thread."""

    def __init__(self, cfg: OutputConfig, link, altitude: AltitudeSource, vertical_sigma_m: float,
                 epoch_minus_monotonic: float):
        self.cfg, self.link, self.altitude = cfg, link, altitude
        self.vertical_sigma_m = vertical_sigma_m
        self.epoch_minus_monotonic = epoch_minus_monotonic
        self.stats = {"ticks": 0, "sent": 0, "fixes_sent": 0, "errors": 0, "intervals_s": []}
        self.last_error = ""
        self.last_sent: Estimate | None = None
        self._snapshot: TrackSnapshot | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="output", daemon=True)
        self._last_tick = math.nan
        self._log = None
        self._touchdown: tuple[float, float] | None = None   # (last_fix_s of the hold, accuracy then)

    def update(self, position_filter, last_fix_s: float, xy_to_lonlat, too_low: bool = False,
               visual_floor_m: float = math.nan) -> None:
        """Called after every processed frame: copy the filter state for the loop to propagate."""
        snap = TrackSnapshot(copy.deepcopy(position_filter), last_fix_s, xy_to_lonlat, too_low,
                             visual_floor_m=visual_floor_m) \
            if position_filter.tracking else None
        with self._lock:
            if snap is not None:
                if position_filter.last_accept_t == last_fix_s:      # the filter's state is at that fix
                    pos, _ = position_filter.position_at(last_fix_s)
                    snap.fix_xy = (float(pos[0]), float(pos[1]))
                elif self._snapshot is not None and self._snapshot.last_fix_s == last_fix_s:
                    snap.fix_xy = self._snapshot.fix_xy
            self._snapshot = snap

    def start(self) -> "OutputLoop":
        if self.cfg.output_log:
            Path(self.cfg.output_log).parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.cfg.output_log, "a", buffering=1, encoding="utf-8")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0)
        if self._log is not None:
            self._log.close()
            self._log = None

    def estimate_at(self, t: float, telemetry=None, origin_alt_m: float = math.nan) -> Estimate:
        """What goes out at monotonic time t."""
        with self._lock:
            snap = self._snapshot
        if snap is None:
            return Estimate(time_s=t, fix=FixQuality.NONE, reason="no track")
        age = t - snap.last_fix_s
        low = snap.too_low or self._descending_onto_floor(telemetry, snap.visual_floor_m)
        hold = low and snap.fix_xy is not None and self.cfg.fix_max_age_s < age <= self.cfg.low_hold_s
        if not (age <= self.cfg.fix_max_age_s or hold):
            return Estimate(time_s=t, fix=FixQuality.NONE, reason=f"last visual fix {age:.1f} s old")
        flt = copy.deepcopy(snap.filter)
        out = flt.predict(t)
        if not out.tracking:
            return Estimate(time_s=t, fix=FixQuality.NONE, reason=out.reason)
        x, y, vx, vy = out.x, out.y, out.vx, out.vy
        sigma_h, sigma_speed, reason = out.sigma_h_m, out.sigma_speed_ms, ""
        if hold:
            # the last fix and no motion, with the spread about *that*: the filter's propagated
            # covariance plus the step to its extrapolation (and to its velocity)
            step2 = (x - snap.fix_xy[0]) ** 2 + (y - snap.fix_xy[1]) ** 2
            sigma_h = math.sqrt(sigma_h ** 2 + RADIUS68_PER_SIGMA ** 2 * step2 / 2.0)
            sigma_speed = math.sqrt(sigma_speed ** 2 + vx ** 2 + vy ** 2)
            (x, y), vx, vy = snap.fix_xy, 0.0, 0.0
            if self._landed(telemetry):
                if self._touchdown is None or self._touchdown[0] != snap.last_fix_s:
                    self._touchdown = (snap.last_fix_s, sigma_h)
                sigma_h, sigma_speed = self._touchdown[1], LANDED_SPEED_SIGMA_MS * math.sqrt(2.0)
            else:
                self._touchdown = None
            if sigma_h > snap.filter.cfg.max_sigma_m:
                return Estimate(time_s=t, fix=FixQuality.NONE, reason=f"held fix {age:.1f} s old: 68% radius "
                                f"{sigma_h:.0f} m above filter.max_sigma_m")
            where = "landed" if self._touchdown else "below the visual floor" if snap.too_low else \
                "descending onto the visual floor"
            reason = f"{where}: last fix held ({age:.1f} s)"
        lon, lat = snap.xy_to_lonlat(x, y)
        alt = self.altitude.altitude(telemetry, origin_alt_m, float(lat), float(lon))
        return Estimate(time_s=t, fix=FixQuality.FIX, lat=float(lat), lon=float(lon), alt_m=float(alt),
                        vn=float(vy), ve=float(vx), vd=0.0, sigma_h_m=float(sigma_h),
                        sigma_v_m=self.vertical_sigma_m, sigma_speed_ms=float(sigma_speed), reason=reason)

    def _descending_onto_floor(self, telemetry, floor_m: float) -> bool:
        """Reaches the visual floor within fix_max_age_s at the autopilot's descent rate. The last
        metres above the floor give no fix either (a view of ~1 % of a tile correlates
        ambiguously), and waiting for a frame below it left GPS2 without a fix for 0.4 s of
        a SITL landing."""
        if telemetry is None or not math.isfinite(floor_m):
            return False
        h, vd = telemetry.height_above_ground_m, telemetry.vd
        return math.isfinite(h) and math.isfinite(vd) and vd > LANDED_MAX_VZ_MS and \
            h - floor_m <= vd * self.cfg.fix_max_age_s

    def _landed(self, telemetry) -> bool:
        if telemetry is None:
            return False
        h = telemetry.height_above_ground_m
        return (math.isfinite(h) and h <= self.cfg.ground_height_m and math.isfinite(telemetry.vd)
                and abs(telemetry.vd) < LANDED_MAX_VZ_MS)

    def tick(self, now: float) -> Estimate:
        telemetry = self.link.telemetry.at(now)
        est = self.estimate_at(now, telemetry, self.link.telemetry.origin_alt_m)
        sent = self.link.send_estimate(est, now + self.epoch_minus_monotonic, now=now)
        self.stats["ticks"] += 1
        self.stats["fixes_sent"] += bool(sent)
        if math.isfinite(self._last_tick):
            self.stats["intervals_s"].append(now - self._last_tick)
            del self.stats["intervals_s"][:-1000]
        self._last_tick = now
        self.last_sent = est
        if self._log is not None:
            fix = est.fix == FixQuality.FIX
            snap = self._snapshot
            # how far the state was propagated past the last fix: lets a simulator whose clock
            # fell behind the wall clock be compared at the time the message stands for
            age = round(now - snap.last_fix_s, 3) if fix and snap is not None else None
            self._log.write(json.dumps({"unix_s": round(now + self.epoch_minus_monotonic, 4), "fix": 3 if fix else 1,
                                        "lat": round(est.lat, 8) if fix else None,
                                        "lon": round(est.lon, 8) if fix else None,
                                        "alt_m": round(est.alt_m, 2) if fix and math.isfinite(est.alt_m) else None,
                                        "sigma_h_m": round(est.sigma_h_m, 2) if fix else None,
                                        "sigma_speed_ms": round(est.sigma_speed_ms, 2) if fix else None,
                                        "vn": round(est.vn, 2) if fix else None,
                                        "ve": round(est.ve, 2) if fix else None,
                                        "fix_age_s": age, "reason": est.reason}) + "\n")
        return est

    def achieved_rate_hz(self) -> float:
        iv = self.stats["intervals_s"][-100:]
        return 1.0 / float(np.mean(iv)) if iv else math.nan

    def _run(self) -> None:
        period = 1.0 / self.cfg.rate_hz
        next_t = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now < next_t:
                self._stop.wait(next_t - now)
                continue
            # a late tick is sent now; the schedule does not try to catch up with a burst
            next_t = max(next_t + period, now + 0.5 * period)
            try:
                self.tick(now)
            except Exception as exc:   # never let one bad sample stop the stream
                self.stats["errors"] += 1
                self.last_error = str(exc)
                log.exception("output loop: sending failed")
