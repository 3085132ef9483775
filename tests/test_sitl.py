"""The closed loop on a real autopilot: ArduCopter SITL (../shared/sitl) flies GNSS-free on
mean-nav's GPS_INPUT, and lands on it. Takes about 4 minutes of real time (SITL runs at speedup 1)."""
import socket

import pytest

from mean_nav.demo_sitl import SitlFlightConfig, fly, print_summary, sitl_available


def free_instance() -> int:
    """A SITL -I instance whose four TCP ports are free (others may run SITL on this machine)."""
    for instance in range(3, 10):
        base = 5760 + 10 * instance
        try:
            for port in range(base, base + 4):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return instance
    pytest.fail("no free SITL instance (ports 5790-5853 all busy)")


def test_copter_flies_a_route_gnss_free_on_mean_nav_and_lands_healthy(tmp_path):
    why = sitl_available()
    if why:
        pytest.skip(why)
    summary = fly(tmp_path, SitlFlightConfig(instance=free_instance()), progress=False)
    print_summary(summary, tmp_path)
    route, gps, ap, landing = summary["route"], summary["gps_input"], summary["ardupilot"], summary["landing"]
    assert route["waypoints"] >= 4 and route["length_m"] >= 500
    # the EKF stayed healthy on mean-nav alone, GNSS off, from the switch through the landing to
    # touchdown: no failsafe, GPS2 3D throughout (the last 5 m on the held fix)
    assert summary["seconds_on_mean_nav"] > 60 and landing["seconds"] > 20
    assert ap["failsafes_on_mean_nav"] == [], ap["messages_after_switch"]
    gps2 = summary["gps2_raw_on_mean_nav"]
    assert gps2["samples"] > 300
    # GPS2 3D throughout, except where the host stalled the daemon past fix_max_age_s (it then
    # rightly sends no fix): at most 3 % of the samples, and never without such a stall
    assert gps2["below_3d"] == gps2["below_3d_in_processing_stalls"] <= 0.03 * gps2["samples"], gps2
    # the vehicle really flew the route (truth from SIM_STATE, not what the EKF believed)
    assert route["true_track_to_route_max_m"] < 5.0
    # every 3D fix within 3 x its reported accuracy of the truth; a steady stream ArduPilot accepts
    assert gps["fix3"] > 300 and gps["fix3_beyond_3_sigma"] == 0
    assert gps["mean_interval_ms"] <= 215
    # visual fixes went on far below where feature matching stops (~35 m), and it landed where planned
    assert landing["lowest_visual_fix_m"] < 12.0
    assert landing["touchdown_to_planned_m"] < 6.0
    assert ap["modes"][-1] == 9 and summary["events_s"].get("landed") is not None   # LAND, disarmed
    print("after touchdown:", landing["touchdown_to_disarm_s"], "s to the disarm;", landing["after_touchdown"])
