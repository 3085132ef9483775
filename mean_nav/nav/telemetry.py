"""Vehicle state the localizer needs with each frame, from MAVLink or a recorded log."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Telemetry:
    time_s: float                  # same clock as the frame timestamps
    roll: float                    # radians, aerospace ZYX
    pitch: float
    yaw: float                     # radians from north, clockwise
    rel_alt_m: float               # height above home/take-off (GLOBAL_POSITION_INT.relative_alt)
    alt_amsl_m: float = math.nan   # for the altitude field of outgoing fixes
    range_m: float = math.nan      # downward rangefinder (DISTANCE_SENSOR), preferred when valid
    vn: float = math.nan           # m/s NED from the autopilot, if any
    ve: float = math.nan
    vd: float = math.nan
    lat: float = math.nan          # GNSS, when the log has it: scoring and initial prior only
    lon: float = math.nan
    # Camera attitude from a stabilising gimbal, when known (radians, NaN when absent):
    # aerospace ZYX Euler angles in NED of the gimbal frame, whose x axis is the optical
    # axis (DJI and MAVLink GIMBAL_DEVICE_ATTITUDE_STATUS convention: pitch -pi/2 looks
    # straight down). When all three are finite they replace vehicle attitude + mount.
    gimbal_roll: float = math.nan
    gimbal_pitch: float = math.nan
    gimbal_yaw: float = math.nan
    # RMS error (radians) of the roll/pitch interpolated at time_s between two attitude samples,
    # 0 at a sample: a change of d between them may be a step at any moment in between, so at
    # fraction w of the interval the interpolation is off by w*d or (1-w)*d, RMS d*sqrt(w(1-w)).
    # The localizer widens that frame's measurement by height x tan(this).
    attitude_interp_sigma_rad: float = 0.0

    @property
    def has_gimbal_attitude(self) -> bool:
        return all(math.isfinite(v) for v in (self.gimbal_roll, self.gimbal_pitch, self.gimbal_yaw))

    @property
    def height_above_ground_m(self) -> float:
        """Rangefinder when valid, else relative altitude (flat terrain at home level)."""
        return self.range_m if math.isfinite(self.range_m) and self.range_m > 0 else self.rel_alt_m
