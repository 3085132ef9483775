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
        time.sleep(0.1)                                   # a slow consumer
        second = grabber.latest(newer_than=first.index, timeout_s=1.0)
        assert second.index > first.index + 5             # old frames were dropped, not queued
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
        time.sleep(0.05)
        assert grabber.state == "ended"
    finally:
        grabber.stop()
