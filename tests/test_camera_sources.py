"""Frame sources by URI and the newest-frame capture thread with reconnection."""
import csv
import time

import cv2
import numpy as np
import pytest

from mean_nav.errors import MeanNavError
from mean_nav.nav.camera import (Frame, FrameSource, ImageFolderSource, LatestFrameGrabber, OpenCVSource,
                                 VideoFileSource, open_source)


def write_images(folder, n, size=(64, 48)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = np.full((size[1], size[0], 3), 10 * i, np.uint8)
        cv2.imwrite(str(folder / f"{i:06d}.png"), img)


def test_flight_folder_frames_come_with_their_recorded_times(tmp_path):
    write_images(tmp_path / "frames", 4)
    with open(tmp_path / "frames.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["frame", "time_s"])
        for i, t in enumerate([100.0, 100.5, 101.25, 102.0]):
            w.writerow([i, t])
    src = open_source(str(tmp_path), realtime=False)
    assert isinstance(src, ImageFolderSource)
    src.open()
    frames = [src.read() for _ in range(4)]
    assert src.read() is None
    assert [f.time_s for f in frames] == [100.0, 100.5, 101.25, 102.0]
    assert [int(f.image[0, 0, 0]) for f in frames] == [0, 10, 20, 30]


def test_realtime_playback_paces_frames_like_a_camera(tmp_path):
    write_images(tmp_path, 3)
    src = ImageFolderSource(tmp_path, realtime=True, fps=10.0)
    src.open()
    frames = [src.read() for _ in range(3)]
    gaps = np.diff([f.time_s for f in frames])
    assert np.allclose(gaps, 0.1, atol=0.02)
    assert abs(frames[-1].time_s - time.monotonic()) < 0.05      # stamped on the host clock
    assert src.recorded_time_of(frames[2].time_s) == pytest.approx(0.2)


def test_unreadable_image_is_reported_not_fatal(tmp_path):
    write_images(tmp_path, 2)
    (tmp_path / "000001.png").write_bytes(b"not a png")
    src = ImageFolderSource(tmp_path, realtime=False)
    src.open()
    assert src.read().image is not None
    bad = src.read()
    assert bad.image is None and "unreadable" in bad.problem


def test_video_file_source_reads_frames(tmp_path):
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (64, 48))
    for i in range(5):
        writer.write(np.full((48, 64, 3), 40 * i, np.uint8))
    writer.release()
    src = open_source(str(path), realtime=False)
    assert isinstance(src, VideoFileSource)
    src.open()
    frames = []
    while (f := src.read()) is not None:
        frames.append(f)
    assert len(frames) == 5
    assert frames[0].image.shape == (48, 64, 3)
    assert frames[1].time_s == pytest.approx(0.2, abs=0.01)


@pytest.mark.parametrize("uri, target", [
    ("csi://1", "sensor-id=1"), ("v4l2:///dev/video3", "/dev/video3"), ("2", 2),
    ("rtsp://10.0.0.5:8554/cam", "rtsp://10.0.0.5:8554/cam"),
])
def test_uris_map_to_capture_targets(uri, target):
    src = open_source(uri)
    assert isinstance(src, OpenCVSource)
    if isinstance(target, str) and "sensor-id" in target:
        assert target in src.target and "nvarguscamerasrc" in src.target and src.api == cv2.CAP_GSTREAMER
    else:
        assert src.target == target


@pytest.mark.parametrize("uri", ["", "ftp://x/y", "/no/such/file.mp4", "csi://left"])
def test_bad_uris_are_clear_errors(uri):
    with pytest.raises(MeanNavError, match="camera"):
        open_source(uri)


class FlakyCamera(FrameSource):
    """A live camera that fails to open twice, delivers 5 frames, dies, then comes back."""

    uri = "fake://flaky"
    live = True

    def __init__(self):
        self.opens = 0
        self.count = 0

    def open(self):
        self.opens += 1
        if self.opens in (1, 2, 4):
            raise MeanNavError("camera fake://flaky: cannot open")

    def read(self):
        self.count += 1
        if self.count == 6:
            return None           # the camera vanishes
        time.sleep(0.005)
        return Frame(np.zeros((4, 4, 3), np.uint8), time.monotonic(), self.count)


def test_lost_camera_is_reopened_with_backoff_and_frames_keep_increasing():
    cam = FlakyCamera()
    grabber = LatestFrameGrabber(cam, reopen_min_s=0.02, reopen_max_s=0.05).start()
    try:
        states = set()
        deadline = time.monotonic() + 3.0
        last = None
        while time.monotonic() < deadline and cam.opens < 5 or (last is None or last.index < 8):
            states.add(grabber.state)
            last = grabber.latest(timeout_s=0.01) or last
            if time.monotonic() > deadline:
                break
        assert cam.opens >= 5
        assert "reconnecting" in states or grabber.last_error
        assert last is not None and last.index >= 8
    finally:
        grabber.stop()


class FastCamera(FrameSource):
    uri = "fake://fast"
    live = True

    def __init__(self):
        self.i = 0

    def open(self):
        pass

    def read(self):
        time.sleep(0.002)
        self.i += 1
        return Frame(np.zeros((2, 2, 3), np.uint8), time.monotonic(), self.i)


def test_grabber_hands_out_only_the_newest_frame():
    grabber = LatestFrameGrabber(FastCamera()).start()
    try:
        first = grabber.latest(timeout_s=1.0)
        # a slow consumer: ten more frames arrive before it asks again
        assert grabber.latest(newer_than=first.index + 10, timeout_s=5.0) is not None
        second = grabber.latest(newer_than=first.index, timeout_s=1.0)
        assert second.index > first.index + 10            # old frames were dropped, not queued
        assert grabber.latest(newer_than=10**9, timeout_s=0.05) is None
    finally:
        grabber.stop()


def test_file_source_end_is_reported():
    class Ends(FrameSource):
        uri, live = "fake://file", False

        def open(self):
            pass

        def read(self):
            return None

    grabber = LatestFrameGrabber(Ends()).start()
    try:
        assert grabber.latest(timeout_s=1.0) is None
        grabber._thread.join(timeout=5.0)                 # the grabber stops by itself at the end
        assert grabber.state == "ended"
    finally:
        grabber.stop()


class FakeSimulator:
    """A TCP port streaming HEARTBEAT and SIM_STATE (the vehicle's true pose) as ArduPilot SITL does."""

    def __init__(self, lat, lon, alt):
        import socket
        import threading

        from mean_nav.nav.mavlink_io import MAV, mavutil

        self.pose = [lat, lon, alt, 0.0, 0.0, 0.0]
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(1)
        self.port = self.server.getsockname()[1]
        self.mav = mavutil.mavlink.MAVLink(None, srcSystem=1, srcComponent=1)
        self.MAV = MAV
        self.sent_at, self.boot_s = [], []    # each SIM_STATE's send time, and SITL's clock then
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        self.server.settimeout(0.5)
        while not self.stop.is_set():       # a client that reconnects is served again
            try:
                conn, _ = self.server.accept()
            except OSError:
                continue
            with conn:
                try:
                    self.stream(conn)
                except OSError:
                    pass

    def stream(self, conn):
        boot_ms = 5000
        while not self.stop.is_set():
            lat, lon, alt, roll, pitch, yaw = self.pose
            msg = self.mav.sim_state_encode(1, 0, 0, 0, roll, pitch, yaw, 0, 0, -9.8, 0, 0, 0, lat, lon, alt,
                                            0, 0, 0, 0, 0, int(lat * 1e7), int(lon * 1e7))
            # as SITL does: SYSTEM_TIME, then the SIM_STATE of the same pass; its clock runs at
            # 1/3 of the wall clock (a stalling SITL), so it cannot be mistaken for the arrival
            conn.sendall(self.mav.system_time_encode(0, boot_ms).pack(self.mav) + msg.pack(self.mav)
                         + self.mav.heartbeat_encode(self.MAV.MAV_TYPE_QUADROTOR,
                                                     self.MAV.MAV_AUTOPILOT_ARDUPILOTMEGA, 0, 0, 4).pack(self.mav))
            self.sent_at.append(time.monotonic())
            self.boot_s.append(boot_ms / 1000.0)
            boot_ms += 7
            time.sleep(0.02)

    def close(self):
        self.stop.set()
        self.thread.join(timeout=2)
        self.server.close()


def test_sim_camera_renders_what_a_downward_camera_sees_from_the_true_pose(tmp_path):
    from mean_nav.data.world import generate_world
    from mean_nav.geo.crs import to_lonlat
    from mean_nav.geo.raster import read_metric_raster
    from mean_nav.nav.camera_model import CameraModel, rectify_to_nadir

    world = generate_world(tmp_path / "world.tif", seed=3, size_px=400, gsd_m=0.5)
    CameraModel.from_fov(320, 240, 70).to_yaml(tmp_path / "camera.yaml")
    raster = read_metric_raster([world], 0.5)
    left, bottom, right, top = raster.bounds
    x, y = (left + right) / 2 + 15, (bottom + top) / 2 - 10
    lon, lat = (float(v) for v in to_lonlat(raster.crs, x, y))
    sim = FakeSimulator(lat, lon, 10.0 + 40.0)        # 40 m above ground at 10 m AMSL
    pause = tmp_path / "camera-lost"
    source = open_source(f"sim://world.tif?camera=camera.yaml&mavlink=tcp:127.0.0.1:{sim.port}&fps=10&ground=10"
                         f"&gsd=0.5&pause_file={pause.name}", base_dir=tmp_path)
    try:
        source.open()
        frame = source.read()
        assert frame is not None and frame.image.shape == (240, 320, 3)
        nearest = int(np.argmin([abs(frame.time_s - t) for t in sim.sent_at]))
        assert abs(frame.time_s - sim.sent_at[nearest]) < 0.015     # stamped on the pose's arrival
        # and with SITL's own time of that pose (a closed-loop analysis judges in SITL's clock)
        assert frame.source_time_s is not None and abs(frame.source_time_s - sim.boot_s[nearest]) <= 0.0071
        # rectified at the true pose, the frame is the map around the vehicle and not 15 m away
        view, valid = rectify_to_nadir(frame.image, source.cam, 0.0, 0.0, 0.0, 40.0, 0.5, 80)
        col, row = (int(round(float(v))) for v in raster.xy_to_pixel(x, y))

        def crop_error(dc):
            crop = raster.image[row - 40:row + 40, col - 40 + dc:col + 40 + dc].astype(float)
            return float(np.abs(view.astype(float) - crop)[valid].mean())

        assert crop_error(0) < 6.0 and crop_error(30) > 3 * crop_error(0), (crop_error(0), crop_error(30))
        pause.touch()                                   # the camera is lost while the file exists
        assert source.read() is None
        with pytest.raises(MeanNavError, match="paused"):
            source.open()
        pause.unlink()
        source.open()
        assert source.read() is not None
    finally:
        source.close()
        sim.close()


@pytest.mark.parametrize("query, words", [("camera=nope.yaml", "camera model"), ("camera=camera.yaml&fps=0", "fps"),
                                          ("camera=camera.yaml&zoom=2", "unknown option")])
def test_bad_sim_uris_are_clear_errors(tmp_path, query, words):
    from mean_nav.nav.camera_model import CameraModel

    (tmp_path / "map.tif").write_bytes(b"")
    CameraModel.from_fov(64, 48, 70).to_yaml(tmp_path / "camera.yaml")
    with pytest.raises(MeanNavError, match=words):
        open_source(f"sim://map.tif?{query}", base_dir=tmp_path)
    with pytest.raises(MeanNavError, match="map"):
        open_source("sim://missing.tif?camera=camera.yaml", base_dir=tmp_path)
