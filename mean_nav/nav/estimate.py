"""The one position estimate that leaves the localizer.

MAVLink GPS_INPUT, PX4 GLOBAL_POSITION_SENSOR, ROS NavSatFix and the replay CSV are all
encoders of this record.
"""
from __future__ import annotations

import enum
from dataclasses import asdict, dataclass


class FixQuality(enum.IntEnum):
    NONE = 0       # nothing to send (lost, start-up, outside the map, rejected)
    COASTING = 1   # filter prediction only: reported, never sent as a fix
    FIX = 3        # a gated visual fix the daemon stands behind (GPS_INPUT fix_type 3)


@dataclass
class Estimate:
    time_s: float                 # timestamp of the camera frame (vehicle/replay clock)
    fix: FixQuality
    lat: float = float("nan")     # WGS84 degrees
    lon: float = float("nan")
    alt_m: float = float("nan")   # AMSL metres (from telemetry; vision gives no altitude)
    vn: float = 0.0               # m/s NED, from the filter
    ve: float = 0.0
    vd: float = 0.0
    sigma_h_m: float = float("inf")      # 1-sigma horizontal accuracy
    sigma_v_m: float = float("inf")      # 1-sigma vertical accuracy
    sigma_speed_ms: float = float("inf") # 1-sigma speed accuracy
    tile_id: int = -1             # best matching cache tile, -1 if none
    score: float = float("nan")   # retrieval similarity of that tile
    inliers: int = 0              # RANSAC inliers of the geometric verification
    heading_error_deg: float = float("nan")  # turn of the view against the map: the telemetry yaw error
    latency_s: float = float("nan")  # capture-to-estimate time
    reason: str = ""              # why there is no fix, when there is none (and operator notices)
    attitude_sigma_deg: float = float("nan")  # the filter's online estimate of the telemetry attitude error

    @property
    def has_fix(self) -> bool:
        return self.fix == FixQuality.FIX

    def to_row(self) -> dict:
        d = asdict(self)
        d["fix"] = int(self.fix)
        return d
