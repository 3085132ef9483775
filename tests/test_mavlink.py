"""MAVLink I/O over UDP loopback with a pymavlink peer acting as the autopilot."""
import calendar
import math
import socket
import threading
import time

import pytest

from mean_nav.nav.estimate import Estimate, FixQuality
from mean_nav.nav.gps_time import gps_week_and_ms
from mean_nav.errors import MeanNavError
from mean_nav.nav.mavlink_io import (IGNORE_ALT, IGNORE_VEL_VERT, MAV, MavlinkConfig, MavlinkLink, TelemetryHistory,
                                     dop_for_accuracy, mavutil)
from nav_testing import free_udp_port



@pytest.fixture
def pair():
    """(link under test, autopilot-side peer) over UDP loopback."""
    port = free_udp_port()
    peer = mavutil.mavlink_connection(f"udpin:127.0.0.1:{port}", source_system=7, source_component=1,
                                      dialect="common")
    link = MavlinkLink(MavlinkConfig(connection=f"udpout:127.0.0.1:{port}", statustext_interval_s=0.5))
    yield link, peer
    link.close()
    peer.close()


def recv(peer, kind, timeout=2.0, cond=lambda m: True):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = peer.recv_match(type=kind, blocking=True, timeout=0.1)
        if msg is not None and cond(msg):
            return msg
    return None


def quaternion_zyx(yaw, pitch, roll):
    """(w, x, y, z) of the aerospace rotation yaw about z, then pitch about y, then roll about x."""
    cy, sy, cp, sp = math.cos(yaw / 2), math.sin(yaw / 2), math.cos(pitch / 2), math.sin(pitch / 2)
    cr, sr = math.cos(roll / 2), math.sin(roll / 2)
    return [cr * cp * cy + sr * sp * sy, sr * cp * cy - cr * sp * sy,
            cr * sp * cy + sr * cp * sy, cr * cp * sy - sr * sp * cy]


def fix_estimate(**kw):
    base = dict(time_s=1.0, fix=FixQuality.FIX, lat=51.8401685, lon=4.9866870, alt_m=70.5, vn=4.0, ve=-1.0,
                vd=0.2, sigma_h_m=2.4, sigma_v_m=3.0, sigma_speed_ms=0.4)
    base.update(kw)
    return Estimate(**base)


def test_gps_time_counts_leap_seconds():
    new_year_2017 = calendar.timegm((2017, 1, 1, 0, 0, 0))   # GPS week 1930 started then (GPS time)
    assert gps_week_and_ms(new_year_2017) == (1930, 18_000)
    # one second earlier only 17 leap seconds applied: 17 - 1 = 16 s into week 1930
    assert gps_week_and_ms(new_year_2017 - 1.0) == (1930, 16_000)
    assert gps_week_and_ms(new_year_2017 - 20.0) == (1929, 604_800_000 - 3000)
    assert gps_week_and_ms(calendar.timegm((2024, 6, 1, 12, 0, 0)) + 0.25)[1] % 1000 == 250


def test_gps_input_carries_a_gated_fix_with_policy_fields(pair):
    link, peer = pair
    unix = calendar.timegm((2026, 3, 1, 10, 0, 0)) + 0.5
    assert link.send_estimate(fix_estimate(), unix)
    msg = recv(peer, "GPS_INPUT")
    assert msg is not None
    assert msg.fix_type == 3 and msg.gps_id == 0
    assert msg.lat == round(51.8401685e7) and msg.lon == round(4.9866870e7)
    assert msg.alt == pytest.approx(70.5)
    assert msg.horiz_accuracy == pytest.approx(2.4) and msg.vert_accuracy == pytest.approx(3.0)
    # per axis, as EKF3 uses it: a 2-D velocity error of RMS 0.4 m/s is 0.4 / sqrt(2) on each of vn, ve
    assert msg.speed_accuracy == pytest.approx(0.4 / math.sqrt(2), abs=1e-6)
    assert (msg.vn, msg.ve) == (pytest.approx(4.0), pytest.approx(-1.0))
    # horizontal velocity is a real filter estimate; vision measures no vertical velocity, and
    # EK3_SRC1_VELZ defaults to GPS: vd must be flagged, never the vehicle's own vz echoed back
    assert msg.ignore_flags == IGNORE_VEL_VERT and msg.vd == 0
    assert msg.hdop == pytest.approx(2.4 / 3.5)         # the documented 3.5 m nominal range error
    assert msg.satellites_visible == 10                  # 2 m < 2.4 m <= 5 m: 10 satellites
    # 2026-03-01 is a Sunday 16856 days = 2408 weeks after the GPS epoch; 10:00:00.5 UTC + 18 s
    assert (msg.time_week, msg.time_week_ms) == (2408, 36_018_500)
    assert msg.time_usec == int(unix * 1e6)


def test_without_a_fix_no_position_is_sent(pair):
    link, peer = pair
    coasting = fix_estimate(fix=FixQuality.COASTING, reason="fix gated out")
    t0 = time.monotonic()
    assert not link.send_estimate(coasting, time.time(), now=t0)
    msg = recv(peer, "GPS_INPUT")
    assert msg is not None and msg.fix_type == 1         # "connected, no fix"; 0 would mean "no GPS"
    assert msg.lat == 0 and msg.lon == 0                 # the coasting prediction is not leaked
    assert msg.horiz_accuracy > 1000                     # the last fix's accuracy does not linger
    link.cfg.send_no_fix = False
    link.send_estimate(coasting, time.time(), now=t0 + 1.0)   # past the 50 ms minimum interval
    assert recv(peer, "GPS_INPUT", timeout=0.3) is None


def test_silent_until_the_first_fix_then_no_fix_is_reported(pair):
    link, peer = pair
    link.cfg.silent_until_first_fix = True
    coasting = fix_estimate(fix=FixQuality.NONE)
    t0 = time.monotonic()          # sends a second apart: never inside the 50 ms minimum interval
    link.send_estimate(coasting, time.time(), now=t0)
    assert recv(peer, "GPS_INPUT", timeout=0.3) is None      # on the ground: not even "no fix"
    assert link.send_estimate(fix_estimate(), time.time(), now=t0 + 1.0)
    link.send_estimate(coasting, time.time(), now=t0 + 2.0)
    kinds = [recv(peer, "GPS_INPUT").fix_type, recv(peer, "GPS_INPUT").fix_type]
    assert kinds == [3, 1]


def test_samples_closer_than_50_ms_are_dropped(pair):
    link, peer = pair
    now = time.monotonic()
    assert link.send_estimate(fix_estimate(), time.time(), now=now)
    assert not link.send_estimate(fix_estimate(), time.time(), now=now + 0.03)
    assert link.send_estimate(fix_estimate(), time.time(), now=now + 0.06)
    assert link.positions_sent == 2


def test_px4_output_uses_global_position_sensor(pair):
    link, peer = pair
    link.cfg.output = "global_position_sensor"
    t0 = time.monotonic()
    assert link.send_estimate(fix_estimate(), time.time(), processing_s=0.12, now=t0)
    msg = recv(peer, "GLOBAL_POSITION_SENSOR")
    assert msg is not None
    assert msg.source == MAV.GLOBAL_POSITION_SRC_VISION
    assert msg.eph == pytest.approx(2.4) and msg.processing_time == 120_000
    assert msg.lat == round(51.8401685e7)
    assert not link.send_estimate(fix_estimate(fix=FixQuality.NONE), time.time(), now=t0 + 1.0)
    assert recv(peer, "GLOBAL_POSITION_SENSOR", timeout=0.3) is None


def test_heartbeat_identifies_an_onboard_controller(pair):
    link, peer = pair
    link.send_heartbeat(MAV.MAV_STATE_ACTIVE)
    msg = recv(peer, "HEARTBEAT")
    assert msg is not None
    assert (msg.type, msg.autopilot, msg.system_status) == (18, 8, MAV.MAV_STATE_ACTIVE)
    assert msg.get_srcComponent() == 191


def test_statustext_is_rate_limited_and_keeps_the_newest(pair):
    link, peer = pair
    t = 100.0
    assert link.send_statustext(MAV.MAV_SEVERITY_INFO, "MNAV: first", now=t)
    assert not link.send_statustext(MAV.MAV_SEVERITY_WARNING, "MNAV: second", now=t + 0.1)
    assert not link.send_statustext(MAV.MAV_SEVERITY_CRITICAL, "MNAV: third", now=t + 0.2)
    assert link.flush_statustext(now=t + 0.6)
    texts = []
    for _ in range(2):
        msg = recv(peer, "STATUSTEXT")
        texts.append((msg.severity, msg.text))
    assert texts == [(MAV.MAV_SEVERITY_INFO, "MNAV: first"), (MAV.MAV_SEVERITY_CRITICAL, "MNAV: third")]


def test_reads_telemetry_and_requests_rates_with_acknowledgement(pair):
    link, peer = pair
    link.start()
    link.send_heartbeat(MAV.MAV_STATE_STANDBY)          # lets the udpin peer learn our address
    assert recv(peer, "HEARTBEAT") is not None
    requested, origin_requests = [], []
    stop = threading.Event()
    gimbal_q = quaternion_zyx(yaw=0.5, pitch=math.radians(-80), roll=math.radians(2))

    def autopilot():
        while not stop.is_set():
            peer.mav.heartbeat_send(MAV.MAV_TYPE_QUADROTOR, MAV.MAV_AUTOPILOT_ARDUPILOTMEGA, 0, 0, 4)
            peer.mav.attitude_send(int(time.monotonic() * 1000) % 2**32, 0.1, -0.05, 3.0, 0, 0, 0)
            peer.mav.global_position_int_send(0, int(51.84e7), int(4.98e7), 70_500, 60_250, 400, -100, 20, 9000)
            peer.mav.distance_sensor_send(0, 20, 10000, 5830, 0, 0, 25, 0)   # cm, facing down
            # gimbal: camera pitched 80 deg down, rolled 2 deg, yawed 0.5 rad right of the vehicle's nose
            peer.mav.gimbal_device_attitude_status_send(0, 0, 0, 0, gimbal_q, 0, 0, 0, 0)
            msg = peer.recv_match(type="COMMAND_LONG", blocking=True, timeout=0.05)
            if msg is not None and msg.command == MAV.MAV_CMD_SET_MESSAGE_INTERVAL:
                requested.append((int(msg.param1), msg.param2))
                peer.mav.command_ack_send(msg.command, MAV.MAV_RESULT_ACCEPTED)
            elif msg is not None and msg.command == MAV.MAV_CMD_REQUEST_MESSAGE:
                origin_requests.append(int(msg.param1))
                peer.mav.gps_global_origin_send(int(51.84e7), int(4.98e7), 9_800)

    thread = threading.Thread(target=autopilot, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 5.0
        while len(link.rate_acks) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        tel = link.telemetry_at(time.monotonic())
    finally:
        stop.set()
        thread.join()
    assert link.vehicle_system == 7
    assert dict(requested)[MAV.MAVLINK_MSG_ID_ATTITUDE] == pytest.approx(1e6 / 50)
    assert set(link.rate_acks.values()) == {MAV.MAV_RESULT_ACCEPTED} and len(link.rate_acks) == 3
    assert tel is not None
    assert (tel.roll, tel.pitch, tel.yaw) == (pytest.approx(0.1), pytest.approx(-0.05), pytest.approx(3.0))
    assert tel.rel_alt_m == pytest.approx(60.25) and tel.alt_amsl_m == pytest.approx(70.5)
    assert tel.vn == pytest.approx(4.0) and tel.ve == pytest.approx(-1.0)
    # the camera attitude of the gimbal: yaw in the vehicle frame, so the vehicle's 3.0 rad is added
    assert tel.gimbal_roll == pytest.approx(math.radians(2), abs=1e-4)   # float32 quaternion
    assert tel.gimbal_pitch == pytest.approx(math.radians(-80), abs=1e-4)
    assert tel.gimbal_yaw == pytest.approx(math.remainder(3.5, 2 * math.pi), abs=1e-4)
    assert origin_requests and origin_requests[0] == MAV.MAVLINK_MSG_ID_GPS_GLOBAL_ORIGIN
    assert link.telemetry.origin_alt_m == pytest.approx(9.8)
    assert tel.range_m == pytest.approx(58.3)
    assert tel.height_above_ground_m == pytest.approx(58.3)   # rangefinder preferred
    assert link.link_up


def test_attitude_is_interpolated_at_the_frame_time_across_the_yaw_wrap():
    h = TelemetryHistory()
    h.add_attitude(10.0, 0.0, 0.1, math.pi - 0.1)
    h.add_attitude(10.1, 0.2, 0.1, -math.pi + 0.1)
    tel = h.at(10.05)
    assert tel.time_s == 10.05
    assert tel.roll == pytest.approx(0.1)
    assert abs(math.remainder(tel.yaw - math.pi, 2 * math.pi)) < 1e-9   # through +-pi, not through 0
    late = h.at(12.0)
    assert late.time_s == 10.1            # not interpolated: the age shows it is stale
    assert math.isnan(late.rel_alt_m)     # no position received at all
    h.add_attitude(13.0, 0.3, 0.1, 0.0)   # after a 2.9 s hole
    inside_hole = h.at(11.0)
    assert inside_hole.time_s == 10.1 and inside_hole.roll == pytest.approx(0.2)   # never bridged


def test_attitude_interpolated_across_a_step_carries_its_rms_error():
    h = TelemetryHistory()
    h.add_attitude(10.0, 0.0, 0.0, 0.0)
    h.add_attitude(10.05, 0.0, math.radians(10), 0.0)   # pitch steps 10 deg at an unknown moment
    # at the midpoint the interpolated pitch is 5 deg off whichever side the step fell
    assert math.degrees(h.at(10.025).attitude_interp_sigma_rad) == pytest.approx(5.0)
    assert h.at(10.05).attitude_interp_sigma_rad == 0.0 and h.at(10.0).attitude_interp_sigma_rad == 0.0


def test_signed_messages_verify_only_with_the_right_key():
    port = free_udp_port()
    key = bytes(range(32))
    good = mavutil.mavlink_connection(f"udpin:127.0.0.1:{port}", dialect="common")
    good.setup_signing(key, sign_outgoing=False)
    link = MavlinkLink(MavlinkConfig(connection=f"udpout:127.0.0.1:{port}", signing_key_hex=key.hex()))
    try:
        link.send_heartbeat(MAV.MAV_STATE_STANDBY)
        msg = recv(good, "HEARTBEAT")
        assert msg is not None and msg.get_signed()
        good.setup_signing(bytes(32), sign_outgoing=False)      # wrong key: rejected
        link.send_heartbeat(MAV.MAV_STATE_STANDBY)
        assert recv(good, "HEARTBEAT", timeout=0.5) is None
    finally:
        link.close()
        good.close()
    with pytest.raises(MeanNavError, match="signing_key_hex"):
        MavlinkLink(MavlinkConfig(connection=f"udpout:127.0.0.1:{port}", signing_key_hex="abcd"))


def test_link_loss_is_detected_and_rates_are_requested_again_when_it_returns():
    port = free_udp_port()
    peer = mavutil.mavlink_connection(f"udpin:127.0.0.1:{port}", source_system=3, source_component=1,
                                      dialect="common")
    link = MavlinkLink(MavlinkConfig(connection=f"udpout:127.0.0.1:{port}", link_timeout_s=0.4)).start()
    requests, up_states = [], []
    try:
        link.send_heartbeat(MAV.MAV_STATE_STANDBY)
        assert recv(peer, "HEARTBEAT") is not None

        def stream(seconds):
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                peer.mav.heartbeat_send(MAV.MAV_TYPE_QUADROTOR, MAV.MAV_AUTOPILOT_PX4, 0, 0, 4)
                peer.mav.attitude_send(0, 0.0, 0.0, 0.0, 0, 0, 0)
                msg = peer.recv_match(type="COMMAND_LONG", blocking=True, timeout=0.03)
                if msg is not None and msg.command == MAV.MAV_CMD_SET_MESSAGE_INTERVAL:
                    requests.append(int(msg.param1))
                    peer.mav.command_ack_send(msg.command, MAV.MAV_RESULT_ACCEPTED)
            up_states.append(link.link_up)

        stream(1.0)
        time.sleep(0.8)                      # the vehicle falls silent
        up_states.append(link.link_up)
        stream(1.0)
    finally:
        link.close()
        peer.close()
    assert up_states == [True, False, True]
    assert len(requests) == 6 and requests[:3] == requests[3:]


def test_waiting_for_the_attitude_after_a_frame_allows_interpolation():
    h = TelemetryHistory()
    h.add_attitude(1.0, 0.0, 0.0, 0.0)
    assert not h.wait_for_attitude_after(1.05, timeout_s=0.05)
    threading.Timer(0.05, lambda: h.add_attitude(1.1, 0.2, 0.0, 0.0)).start()
    assert h.wait_for_attitude_after(1.05, timeout_s=1.0)
    assert h.at(1.05).roll == pytest.approx(0.1)


def test_hdop_passes_copters_arming_check_exactly_when_the_fix_is_good_enough():
    gps_hdop_good = 1.4          # ArduCopter GPS_HDOP_GOOD default; EKF3 starts on hAcc <= 5 m
    assert dop_for_accuracy(4.8) <= gps_hdop_good < dop_for_accuracy(5.0)


@pytest.mark.parametrize("bad", [dict(lat=math.nan), dict(lon=math.inf), dict(lat=91.0), dict(lon=-180.5),
                                 dict(sigma_h_m=0.0), dict(sigma_h_m=-1.0), dict(sigma_h_m=math.nan),
                                 dict(vn=math.nan), dict(alt_m=1e7)])
def test_an_implausible_position_is_never_sent_whatever_produced_it(pair, bad):
    link, peer = pair
    assert not link.send_estimate(fix_estimate(**bad), time.time())
    msg = recv(peer, "GPS_INPUT")
    assert msg is not None and msg.fix_type == 1 and msg.lat == 0 and msg.lon == 0
    assert link.positions_sent == 0 and link.refused_positions == 1


def test_without_an_honest_altitude_the_altitude_is_flagged_ignored(pair):
    link, peer = pair
    assert link.send_estimate(fix_estimate(alt_m=math.nan), time.time())
    msg = recv(peer, "GPS_INPUT")
    assert msg.fix_type == 3 and msg.ignore_flags & IGNORE_ALT and msg.ignore_flags & IGNORE_VEL_VERT


@pytest.mark.parametrize("connection, words", [
    ("udpin:0.0.0.0:99999", "port"), ("udpout:127.0.0.1:0", "port"), ("tcp:127.0.0.1:http", "port"),
    ("udpout:no-such-host.invalid:14550", "resolved"), ("tcp:5760", "host:port"), ("bogus:1:2", "unknown kind"),
    ("", "empty")])
def test_bad_connection_strings_are_one_clear_error(connection, words):
    with pytest.raises(MeanNavError, match=words):
        MavlinkLink(MavlinkConfig(connection=connection))


def test_tcp_link_waits_for_the_autopilot_port_and_connects_when_it_comes_up():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]     # free now: nothing listens yet
    link = MavlinkLink(MavlinkConfig(connection=f"tcp:127.0.0.1:{port}", reconnect_s=0.2, request_rates=False))
    assert not link.connected and "Refused" in link.connect_error
    link.start()
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        time.sleep(0.5)
        server.bind(("127.0.0.1", port))
        server.listen(1)
        server.settimeout(3.0)
        peer_sock, _ = server.accept()     # the daemon connected by itself
        vehicle = mavutil.mavlink.MAVLink(None, srcSystem=1, srcComponent=1)
        peer_sock.sendall(vehicle.heartbeat_encode(MAV.MAV_TYPE_QUADROTOR, MAV.MAV_AUTOPILOT_ARDUPILOTMEGA,
                                                   0, 0, 0).pack(vehicle))
        deadline = time.monotonic() + 3.0
        while not link.link_up and time.monotonic() < deadline:
            time.sleep(0.05)
        assert link.connected and link.link_up and link.vehicle_system == 1
        peer_sock.close()
    finally:
        link.close()
        server.close()


def test_serial_link_opens_through_a_pseudo_terminal():
    """pyserial must be installed and a serial MAVLink device must work (the example config's
    /dev/ttyTHS1): the vehicle writes to one end of a pty pair, the daemon's link reads the other."""
    import os
    import pty

    vehicle_fd, device_fd = pty.openpty()
    device = os.ttyname(device_fd)
    link = MavlinkLink(MavlinkConfig(connection=device, baud=57600, request_rates=False)).start()
    try:
        assert link.connected
        vehicle = mavutil.mavlink.MAVLink(None, srcSystem=3, srcComponent=1)
        deadline = time.monotonic() + 3.0
        while not link.link_up and time.monotonic() < deadline:
            os.write(vehicle_fd, vehicle.heartbeat_encode(MAV.MAV_TYPE_QUADROTOR, MAV.MAV_AUTOPILOT_ARDUPILOTMEGA,
                                                          0, 0, 0).pack(vehicle))
            time.sleep(0.1)
        assert link.vehicle_system == 3
        link.send_heartbeat(MAV.MAV_STATE_STANDBY)      # and the daemon's bytes reach the vehicle
        parser = mavutil.mavlink.MAVLink(None)
        got = []
        deadline = time.monotonic() + 3.0
        while not got and time.monotonic() < deadline:
            import select
            if select.select([vehicle_fd], [], [], 0.1)[0]:
                got = [m for m in parser.parse_buffer(os.read(vehicle_fd, 4096)) or [] if m.get_type() == "HEARTBEAT"]
        assert got and got[0].type == 18 and got[0].get_srcSystem() == 3
    finally:
        link.close()
        os.close(vehicle_fd)
        os.close(device_fd)
