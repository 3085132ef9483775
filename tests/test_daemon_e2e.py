"""End to end over UDP loopback: the daemon replays a flight simulated over a real
orthophoto from an image folder in real time, a pymavlink peer plays the autopilot
(streams ATTITUDE and GLOBAL_POSITION_INT, acknowledges rate requests, decodes what the
daemon sends), and every GPS_INPUT is checked against the simulated truth."""
import csv
import json
import math
import threading
import time

import numpy as np
import pytest

from mean_nav.cli import main
from mean_nav.errors import MeanNavError
from mean_nav.nav.camera import ImageFolderSource
from mean_nav.nav.daemon import NavConfig, NavDaemon
from mean_nav.nav.localizer import LocalizerConfig
from mean_nav.nav.mavlink_io import MAV, MavlinkConfig, mavutil
from mean_nav.nav.output import OutputConfig
from nav_testing import SHARED_DATA, ThumbnailEmbedder, build_test_cache, free_udp_port, require_shared_data, simulate

FIX_MAX_AGE_S = 1.0
MANILA = SHARED_DATA / "orthophotos" / "5b90f92da0d7280005fab355_4310.tif"



class TruthTrack:
    """telemetry.csv of a simulated flight, interpolated at any recorded time."""

    def __init__(self, path):
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        self.cols = {k: np.array([float(r[k]) for r in rows]) for k in
                     ("time_s", "lat", "lon", "alt_m", "rel_alt_m", "roll", "pitch", "yaw", "vn", "ve", "vd")}
        self.cols["yaw"] = np.unwrap(self.cols["yaw"])

    def __call__(self, t, name):
        return float(np.interp(t, self.cols["time_s"], self.cols[name]))


class Autopilot(threading.Thread):
    """The vehicle side: streams the flight's telemetry on the daemon's clock, records replies."""

    def __init__(self, port, truth, source, pause=None):
        super().__init__(daemon=True)
        self.conn = mavutil.mavlink_connection(f"udpin:127.0.0.1:{port}", source_system=1, source_component=1,
                                               dialect="common")
        self.truth, self.source, self.pause = truth, source, pause
        self.gps_inputs, self.heartbeats, self.statustexts, self.rate_requests = [], [], [], []
        self.heartbeat_times = []
        self.stop_event = threading.Event()
        self.running = threading.Event()

    def recorded_now(self):
        if self.source.started_at is None:
            return self.truth.cols["time_s"][0]
        return self.source.recorded_time_of(time.monotonic())

    def run(self):
        self.running.set()
        next_hb = next_att = next_pos = 0.0
        while not self.stop_event.is_set():
            now = time.monotonic()
            t = self.recorded_now()
            tr = self.truth
            if now >= next_hb:
                self.conn.mav.heartbeat_send(MAV.MAV_TYPE_QUADROTOR, MAV.MAV_AUTOPILOT_ARDUPILOTMEGA, 0, 0,
                                             MAV.MAV_STATE_ACTIVE)
                next_hb = now + 1.0
            paused = self.pause is not None and self.pause[0] <= t <= self.pause[1]
            if now >= next_att and not paused:
                yaw = math.remainder(tr(t, "yaw"), 2 * math.pi)
                self.conn.mav.attitude_send(int(t * 1000), tr(t, "roll"), tr(t, "pitch"), yaw, 0, 0, 0)
                next_att = now + 0.02
            if now >= next_pos and not paused:
                self.conn.mav.global_position_int_send(
                    int(t * 1000), 0, 0, int(tr(t, "alt_m") * 1000), int(tr(t, "rel_alt_m") * 1000),
                    int(tr(t, "vn") * 100), int(tr(t, "ve") * 100), int(tr(t, "vd") * 100), 65535)
                next_pos = now + 0.1
            msg = self.conn.recv_match(blocking=True, timeout=0.005)
            if msg is not None:
                self._record(msg)
        # what the daemon sent before it returned is in the socket already (localhost UDP)
        while (msg := self.conn.recv_match(blocking=False)) is not None:
            self._record(msg)

    def _record(self, msg):
        kind = msg.get_type()
        if kind == "GPS_INPUT":
            self.gps_inputs.append(msg)
        elif kind == "HEARTBEAT":
            self.heartbeats.append(msg)
            self.heartbeat_times.append(self.recorded_now())
        elif kind == "STATUSTEXT":
            self.statustexts.append(msg.text)
        elif kind == "COMMAND_LONG":
            if msg.command == MAV.MAV_CMD_SET_MESSAGE_INTERVAL:
                self.rate_requests.append(int(msg.param1))
            self.conn.mav.command_ack_send(msg.command, MAV.MAV_RESULT_ACCEPTED)

    def close(self):
        self.stop_event.set()
        self.join(timeout=5)
        self.conn.close()


class VanishingCamera(ImageFolderSource):
    """A live camera replaying a flight folder that drops out after `vanish_after` frames
    and cannot be reopened for `outage_s` seconds (a loose cable)."""

    live = True

    def __init__(self, folder, vanish_after, outage_s):
        super().__init__(folder, realtime=True)
        self.vanish_after, self.outage_s = vanish_after, outage_s
        self.gone_at = None
        self.opened_once = False

    def open(self):
        if self.gone_at is not None and time.monotonic() - self.gone_at < self.outage_s:
            raise MeanNavError("camera fake://loose-cable: cannot open")
        if not self.opened_once:
            super().open()
            self.opened_once = True

    def read(self):
        if self.gone_at is None and self._count == self.vanish_after:
            self.gone_at = time.monotonic()
            return None
        if self.gone_at is not None and self._count == self.vanish_after:
            # frames recorded during the outage are lost: skip them on the recorded clock
            while self._pos < len(self._items) and self.recorded_time_of(time.monotonic()) > self._items[self._pos][1]:
                self._pos += 1
            self._count += 1
        frame = super().read()
        if frame is None:
            self.live = False     # the recording is over: let the daemon finish
        return frame


def fly(tmp_path, cache, flight_dir, pause=None, timeout_s=60.0, source=None):
    from mean_nav.nav.camera_model import CameraModel

    port = free_udp_port()
    truth = TruthTrack(flight_dir / "telemetry.csv")
    source = source or ImageFolderSource(flight_dir, realtime=True)
    autopilot = Autopilot(port, truth, source, pause)
    autopilot.start()
    cfg = NavConfig(mavlink=MavlinkConfig(connection=f"udpout:127.0.0.1:{port}", statustext_interval_s=0.3),
                    output=OutputConfig(fix_max_age_s=FIX_MAX_AGE_S),
                    localizer=LocalizerConfig(max_telemetry_age_s=0.2), telemetry_timeout_s=0.6,
                    startup_grace_s=1.0, frame_log=str(tmp_path / "frames.jsonl"))
    daemon = NavDaemon(cfg, embedder=ThumbnailEmbedder(), cache=cache,
                       camera=CameraModel.from_yaml(flight_dir / "camera.yaml"), source=source)
    assert autopilot.running.wait(5.0)     # the vehicle is up before the daemon starts
    try:
        assert daemon.run(duration_s=timeout_s) == 0
    finally:
        autopilot.close()
    return daemon, autopilot, truth, source


def truth_error(msg, daemon, source, truth, cache):
    capture = msg.time_usec / 1e6 - daemon.epoch_minus_monotonic
    t = source.recorded_time_of(capture)
    tx, ty = cache.lonlat_to_xy(truth(t, "lon"), truth(t, "lat"))
    ex, ey = cache.lonlat_to_xy(msg.lon / 1e7, msg.lat / 1e7)
    return t, math.hypot(ex - tx, ey - ty)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, nav_map):
    from mean_nav.geo.cache import TileCache

    return TileCache.load(build_test_cache(tmp_path_factory.mktemp("cache") / "nav_map", map_path=nav_map))


def test_daemon_sends_fixes_within_their_accuracy_and_stops_during_a_telemetry_outage(cache, nav_map, tmp_path):
    flight_dir = simulate(tmp_path / "flight", map_path=nav_map, duration_s=14.0, seed=5)
    t_start = TruthTrack(flight_dir / "telemetry.csv").cols["time_s"][0]
    pause = (t_start + 6.0, t_start + 8.5)
    daemon, ap, truth, source = fly(tmp_path, cache, flight_dir, pause=pause)

    fixes = [m for m in ap.gps_inputs if m.fix_type == 3]
    frames = daemon.stats["frames"]
    assert frames >= 10             # of 28: under CPU load the newest frame wins and some are skipped
    assert len(fixes) >= 0.6 * frames, (len(fixes), frames)
    # the output loop's steady 5 Hz, whatever the camera (2 fps) and processing rates
    times = np.array([m.time_usec for m in ap.gps_inputs]) / 1e6
    assert 0.18 < np.mean(np.diff(times)) < 0.215, np.mean(np.diff(times))
    for msg in fixes:
        t, err = truth_error(msg, daemon, source, truth, cache)
        assert err < 3 * msg.horiz_accuracy, (t, err, msg.horiz_accuracy)
        assert msg.horiz_accuracy < 10 and msg.satellites_visible >= 6
        # no new fix from a frame without fresh attitude: the last one is propagated, then dropped
        assert not (pause[0] + 0.3 + FIX_MAX_AGE_S < t < pause[1]), t
    assert any(m.fix_type == 1 for m in ap.gps_inputs)        # the outage was reported as "no fix"

    ours = [(h, t) for h, t in zip(ap.heartbeats, ap.heartbeat_times) if h.get_srcComponent() == 191]
    assert ours and all(h.type == 18 and h.autopilot == 8 for h, _ in ours)
    assert all(h.get_srcSystem() == 1 for h, _ in ours[1:])    # took the vehicle's system id
    statuses = [(round(t - t_start, 1), h.system_status) for h, t in ours]
    assert statuses[0][1] == MAV.MAV_STATE_STANDBY
    during_outage = [s for t, s in statuses if pause[0] - t_start + 1.0 <= t <= pause[1] - t_start + 0.5]
    assert MAV.MAV_STATE_CRITICAL in during_outage, statuses
    assert MAV.MAV_STATE_ACTIVE in [s for t, s in statuses], statuses
    assert any("no attitude" in s for s in ap.statustexts)
    assert any("tracking" in s for s in ap.statustexts)

    assert sorted(set(ap.rate_requests)) == sorted([MAV.MAVLINK_MSG_ID_ATTITUDE, MAV.MAVLINK_MSG_ID_GLOBAL_POSITION_INT,
                                                    MAV.MAVLINK_MSG_ID_DISTANCE_SENSOR])
    assert set(daemon.link.rate_acks.values()) == {MAV.MAV_RESULT_ACCEPTED}

    records = [json.loads(line) for line in (tmp_path / "frames.jsonl").read_text().splitlines()]
    assert len(records) == frames
    assert all(r["latency_ms"] > 0 for r in records)
    assert np.median([r["latency_ms"] for r in records]) < 1000
    assert any("stale telemetry" in r["reason"] for r in records)
    # the attitude each frame was rectified with is logged (to compare with a simulator's truth)
    assert all(abs(r["roll_deg"]) < 45 and abs(r["pitch_deg"]) < 45 for r in records if "roll_deg" in r)
    assert sum("roll_deg" in r for r in records) > frames // 2


def test_camera_loss_is_reported_critical_and_tracking_resumes_when_it_returns(cache, nav_map, tmp_path):
    flight_dir = simulate(tmp_path / "flight", map_path=nav_map, duration_s=9.0, seed=6)
    camera = VanishingCamera(flight_dir, vanish_after=6, outage_s=2.0)
    daemon, ap, truth, source = fly(tmp_path, cache, flight_dir, source=camera)
    ours = [h.system_status for h in ap.heartbeats if h.get_srcComponent() == 191]
    assert MAV.MAV_STATE_CRITICAL in ours
    after_outage = ours[ours.index(MAV.MAV_STATE_CRITICAL):]
    assert MAV.MAV_STATE_ACTIVE in after_outage                   # recovered without a restart
    assert any("camera lost" in s for s in ap.statustexts)
    fixes = [m for m in ap.gps_inputs if m.fix_type == 3]
    capture = [m.time_usec / 1e6 - daemon.epoch_minus_monotonic for m in fixes]
    assert max(capture) > camera.gone_at + camera.outage_s       # fixes again after the outage
    for msg in fixes:
        assert truth_error(msg, daemon, source, truth, cache)[1] < 3 * msg.horiz_accuracy


def test_daemon_over_an_unmapped_area_sends_no_3d_fix(cache, tmp_path):
    require_shared_data()          # flies over a real Manila orthophoto
    flight_dir = simulate(tmp_path / "manila", map_path=MANILA, duration_s=5.0, seed=2)
    daemon, ap, _, _ = fly(tmp_path, cache, flight_dir)
    assert daemon.stats["frames"] >= 3     # lost-mode frames are slower: the newest frame wins
    assert ap.gps_inputs and all(m.fix_type == 1 and m.lat == 0 for m in ap.gps_inputs)
    ours = [h for h in ap.heartbeats if h.get_srcComponent() == 191]
    assert ours and MAV.MAV_STATE_ACTIVE not in [h.system_status for h in ours]


def test_invalid_config_exits_with_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "nav.yaml"
    bad.write_text("camera:\n  uri: csi://0\nlocalizer:\n  top_k: many\n")
    assert main(["run", "--config", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert "localizer.top_k" in err and len(err.splitlines()) == 1

    typo = tmp_path / "typo.yaml"
    typo.write_text("mavlink:\n  conection: udpout:127.0.0.1:14550\n")
    assert main(["run", "--config", str(typo)]) == 1
    assert "conection" in capsys.readouterr().err

    missing = tmp_path / "missing.yaml"
    missing.write_text(f"camera:\n  calibration: {tmp_path / 'nope.yaml'}\n")
    assert main(["run", "--config", str(missing)]) == 1
    assert "nope.yaml" in capsys.readouterr().err


def daemon_on_grey_frames(cache, tmp_path, fps: float, **nav):
    """A daemon on a looping folder of three plain grey frames, and the ground station it talks to."""
    import cv2

    from mean_nav.nav.camera_model import CameraModel

    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(3):
        cv2.imwrite(str(frames / f"{i:03d}.png"), np.full((120, 160, 3), 60 + 40 * i, np.uint8))
    port = free_udp_port()
    peer = mavutil.mavlink_connection(f"udpin:127.0.0.1:{port}", dialect="common")
    cfg = NavConfig(mavlink=MavlinkConfig(connection=f"udpout:127.0.0.1:{port}"), **nav)
    daemon = NavDaemon(cfg, embedder=ThumbnailEmbedder(), cache=cache, camera=CameraModel.from_fov(160, 120, 70),
                       source=ImageFolderSource(frames, realtime=True, fps=fps, loop=True))
    return daemon, peer


def test_sigterm_stops_the_daemon_cleanly_with_a_last_heartbeat(cache, tmp_path):
    import os
    import signal

    daemon, peer = daemon_on_grey_frames(cache, tmp_path, fps=5.0)
    previous = signal.getsignal(signal.SIGTERM)
    timer = threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    started = time.monotonic()
    try:
        assert daemon.run(duration_s=20.0) == 0          # looping source: only the signal ends it
    finally:
        timer.cancel()
    assert time.monotonic() - started < 5.0
    assert signal.getsignal(signal.SIGTERM) == previous  # handlers restored
    statuses = []
    while (msg := peer.recv_match(type="HEARTBEAT", blocking=True, timeout=0.2)) is not None:
        statuses.append(msg.system_status)
    peer.close()
    assert statuses and statuses[-1] == MAV.MAV_STATE_POWEROFF
    assert daemon.stats["frames"] >= 3


def test_an_exception_in_one_frame_is_reported_critical_and_the_daemon_carries_on(cache, tmp_path):
    daemon, peer = daemon_on_grey_frames(cache, tmp_path, fps=10.0, startup_grace_s=0.0)
    calls = {"n": 0}
    real_telemetry_at = daemon.link.telemetry_at

    def broken_for_a_while(t, wait_s=0.0):
        calls["n"] += 1
        if calls["n"] <= 4:
            raise RuntimeError("telemetry decoder bug")
        return real_telemetry_at(t, wait_s)

    daemon.link.telemetry_at = broken_for_a_while
    assert daemon.run(duration_s=3.0) == 0          # never raised out of the loop
    statuses = []
    while (msg := peer.recv_match(type="HEARTBEAT", blocking=True, timeout=0.2)) is not None:
        statuses.append(msg.system_status)
    peer.close()
    assert daemon.stats["errors"] == 4 and daemon.stats["frames"] >= 8     # and it carried on
    assert MAV.MAV_STATE_CRITICAL in statuses[:3]
    assert daemon.output.stats["ticks"] >= 12                                 # the output loop kept going
