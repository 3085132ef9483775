#!/usr/bin/env python3
"""ROS 2 node around the mean-nav daemon: the same loop (camera -> localizer -> MAVLink),
plus every estimate published as sensor_msgs/NavSatFix.

    ros2 launch ros_launch/mean_nav.launch.py params:=ros_launch/mean_nav_params.yaml

Parameters: config (nav.yaml path), topic, frame_id, publish_without_fix.
NavSatFix conventions: status -1 (STATUS_NO_FIX) unless the localizer has a gated visual
fix (0, STATUS_FIX); position covariance in ENU m^2 from the reported accuracy;
altitude above the WGS84 ellipsoid when the EGM96 geoid grid is installed for PROJ,
otherwise the autopilot's AMSL altitude with (50 m)^2 added to its variance for the
unknown geoid height. rclpy is imported only in this file.
"""
from __future__ import annotations

import math
import threading

import rclpy
from rclpy.node import Node
from sensor_msgs.msg import NavSatFix, NavSatStatus

from mean_nav.huge_pages import reexec_with_huge_pages
from mean_nav.nav.daemon import NavDaemon, load_nav_config
from mean_nav.nav.estimate import Estimate, FixQuality
from mean_nav.nav.filter import RADIUS68_PER_SIGMA

GEOID_UNKNOWN_VARIANCE_M2 = 50.0 ** 2   # |geoid - ellipsoid| is within about 100 m worldwide


def amsl_to_ellipsoid():
    """A function (lon, lat, h_amsl) -> h_ellipsoid, or None when PROJ lacks the geoid grid."""
    try:
        from pyproj import Transformer

        t = Transformer.from_crs("EPSG:4326+5773", "EPSG:4979", always_xy=True)
        _, _, h = t.transform(0.0, 0.0, 0.0, errcheck=True)
        if not math.isfinite(h) or h == 0.0:     # grid missing: PROJ returns the input
            return None
        return lambda lon, lat, alt: t.transform(lon, lat, alt)[2]
    except Exception:
        return None


class MeanNavNode(Node):
    def __init__(self):
        super().__init__("mean_nav")
        self.declare_parameter("config", "/etc/mean-nav/nav.yaml")
        self.declare_parameter("topic", "mean_nav/fix")
        self.declare_parameter("frame_id", "gps")
        self.declare_parameter("publish_without_fix", True)
        config = self.get_parameter("config").value
        self.frame_id = self.get_parameter("frame_id").value
        self.publish_without_fix = bool(self.get_parameter("publish_without_fix").value)
        self.publisher = self.create_publisher(NavSatFix, self.get_parameter("topic").value, 10)
        self.to_ellipsoid = amsl_to_ellipsoid()
        if self.to_ellipsoid is None:
            self.get_logger().warning("EGM96 geoid grid not installed for PROJ: NavSatFix altitude is AMSL "
                                      "with inflated variance (install proj-data egm96_15.gtx to fix)")
        from pathlib import Path

        # the embedder is loaded here, on rclpy's thread, and runs on the "mean-nav" thread below:
        # the TensorRT backend makes the CUDA context current around each inference (pycuda
        # push/pop, or the runtime API's primary context), so no context has to follow the thread
        self.daemon = NavDaemon(load_nav_config(config), config_dir=Path(config).resolve().parent)
        self.daemon.on_estimate.append(self.publish)
        self.thread = threading.Thread(target=self._run, name="mean-nav", daemon=True)
        self.thread.start()

    def _run(self):
        self.daemon.run()
        self.get_logger().info("mean-nav loop ended")

    def publish(self, est: Estimate, frame) -> None:
        has_fix = est.fix == FixQuality.FIX
        if not has_fix and not self.publish_without_fix:
            return
        msg = NavSatFix()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.header.frame_id = self.frame_id
        msg.status.status = NavSatStatus.STATUS_FIX if has_fix else NavSatStatus.STATUS_NO_FIX
        msg.status.service = 0     # not a satellite service: a visual fix
        if has_fix:
            per_axis = est.sigma_h_m / RADIUS68_PER_SIGMA
            msg.latitude, msg.longitude = est.lat, est.lon
            variance_up = est.sigma_v_m ** 2
            alt = est.alt_m
            if self.to_ellipsoid is not None and math.isfinite(alt):
                alt = self.to_ellipsoid(est.lon, est.lat, alt)
            else:
                variance_up += GEOID_UNKNOWN_VARIANCE_M2
            msg.altitude = alt if math.isfinite(alt) else math.nan
            msg.position_covariance = [per_axis ** 2, 0.0, 0.0, 0.0, per_axis ** 2, 0.0, 0.0, 0.0, variance_up]
            msg.position_covariance_type = NavSatFix.COVARIANCE_TYPE_DIAGONAL_KNOWN
        else:
            msg.latitude = msg.longitude = msg.altitude = math.nan
            msg.position_covariance_type = NavSatFix.COVARIANCE_TYPE_UNKNOWN
        self.publisher.publish(msg)

    def shutdown(self):
        self.daemon.stop()
        self.thread.join(timeout=10)


def main():
    reexec_with_huge_pages()  # before rclpy starts any thread: the process starts over once
    rclpy.init()
    node = MeanNavNode()
    try:
        rclpy.spin(node)
    except KeyboardInterrupt:
        pass
    finally:
        node.shutdown()
        node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()


if __name__ == "__main__":
    main()
