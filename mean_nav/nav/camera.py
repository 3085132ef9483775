"""Camera frame sources by URI, and a capture thread that keeps only the newest frame.

URIs (as jetson-inference users know them):
  csi://0                  Jetson CSI camera through Argus (GStreamer; needs OpenCV with GStreamer)
  v4l2:///dev/video0       V4L2 device (also a bare index such as `0`)
  rtsp://host:port/path    network stream (also http(s)://)
  /path/video.mp4          video file; timestamps from frames.csv beside it or the container
  /path/folder             image folder: a flight folder (frames.csv + frames/) or plain images
                           in name order at `fps`
  sim://map.tif?camera=camera.yaml[&mavlink=tcp:127.0.0.1:5763&fps=2&ground=10&gsd=0.25]
                           a simulated downward camera over a GeoTIFF, rendered with the
                           simulator's renderer from the vehicle's true pose (SIM_STATE, as
                           ArduPilot SITL streams it on every MAVLink port); `ground` is the
                           terrain elevation (m AMSL; default: the first SIM_STATE altitude,
                           the vehicle standing on the ground); `pause_file=PATH`: no frames
                           while PATH exists (a lost camera, for fault tests)

Live sources stamp each frame with the host monotonic clock when it is grabbed. File
sources either play back in real time (`realtime=True`, stamped on delivery, like a live
camera; the daemon) or as fast as asked (stamped with their recorded time; tools).
"""
from __future__ import annotations

import abc
import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import cv2
import numpy as np

from ..deploy.images import read_image_rgb
from ..errors import MeanNavError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".h264", ".webm")


@dataclass
class Frame:
    image: np.ndarray | None          # RGB uint8, None when the source delivered an unreadable frame
    time_s: float                     # capture time on the daemon's clock (monotonic) or recorded time
    index: int                        # running count from the source
    source_time_s: float | None = None  # the recorded timestamp (file sources); SITL's clock (sim://)
    problem: str = ""


class FrameSource(abc.ABC):
    """A camera or a recording. `read()` blocks until the next frame; None means the source ended
    (files) or failed (live: the capture thread reopens it)."""

    uri: str = ""
    live: bool = True

    @abc.abstractmethod
    def open(self) -> None:
        """Open the device or file; raise MeanNavError when it cannot be opened."""

    @abc.abstractmethod
    def read(self) -> Frame | None: ...

    def close(self) -> None:
        pass


def gstreamer_csi_pipeline(sensor_id: int, width: int, height: int, fps: int) -> str:
    """The Argus pipeline NVIDIA documents, converted to BGR for OpenCV's appsink."""
    return (f"nvarguscamerasrc sensor-id={sensor_id} ! "
            f"video/x-raw(memory:NVMM),width={width},height={height},framerate={fps}/1 ! "
            "nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! "
            "appsink drop=1 max-buffers=1")


class OpenCVSource(FrameSource):
    """Any source cv2.VideoCapture opens: CSI (GStreamer), V4L2, RTSP/HTTP."""

    def __init__(self, uri: str, target, api: int = cv2.CAP_ANY, width: int = 0, height: int = 0,
                 fps: int = 0):
        self.uri, self.target, self.api = uri, target, api
        self.width, self.height, self.fps = width, height, fps
        self._cap: cv2.VideoCapture | None = None
        self._count = 0

    def open(self) -> None:
        self.close()
        cap = cv2.VideoCapture(self.target, self.api)
        if not cap.isOpened():
            cap.release()
            hint = (" (OpenCV needs GStreamer support for csi://; pip wheels lack it: use the JetPack OpenCV)"
                    if self.api == cv2.CAP_GSTREAMER else "")
            raise MeanNavError(f"camera {self.uri}: cannot open{hint}; check the device and the URI")
        if self.api == cv2.CAP_V4L2:
            if self.width and self.height:
                cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.width)
                cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.height)
            if self.fps:
                cap.set(cv2.CAP_PROP_FPS, self.fps)
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)   # newest frame, not a queue of old ones
        self._cap = cap

    def read(self) -> Frame | None:
        if self._cap is None:
            return None
        ok, bgr = self._cap.read()
        stamp = time.monotonic()
        if not ok or bgr is None:
            return None
        self._count += 1
        return Frame(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), stamp, self._count - 1)

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class _RecordedSource(FrameSource):
    """Shared pacing for files: real-time playback or as fast as read."""

    live = False

    def __init__(self, uri: str, realtime: bool, loop: bool = False):
        self.uri, self.realtime, self.loop = uri, realtime, loop
        self.started_at: float | None = None   # monotonic time of the first delivered frame
        self._first_time: float | None = None
        self._count = 0

    def _deliver(self, image: np.ndarray | None, recorded_t: float, problem: str = "") -> Frame:
        if self._first_time is None:
            self._first_time = recorded_t
            self.started_at = time.monotonic()
        if self.realtime:
            due = self.started_at + (recorded_t - self._first_time)
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            stamp = due
        else:
            stamp = recorded_t
        self._count += 1
        return Frame(image, stamp, self._count - 1, recorded_t, problem)

    def recorded_time_of(self, stamp: float) -> float:
        """Map a real-time playback stamp back to the recorded clock."""
        return stamp - self.started_at + self._first_time


class ImageFolderSource(_RecordedSource):
    """A flight folder (frames.csv + frames/) or a plain folder of images at `fps`."""

    def __init__(self, folder: str | Path, realtime: bool = True, fps: float = 2.0, loop: bool = False):
        super().__init__(str(folder), realtime, loop)
        self.folder = Path(folder)
        self.fps = fps
        self._items: list[tuple[Path, float]] = []
        self._pos = 0

    def open(self) -> None:
        folder = self.folder
        if not folder.is_dir():
            raise MeanNavError(f"camera {folder}: image folder not found")
        frames_csv = folder / "frames.csv"
        if frames_csv.is_file():
            from ..replay.flight import read_frames_csv  # the recorded-flight format
            image_dir = folder / "frames" if (folder / "frames").is_dir() else folder
            ids, times = read_frames_csv(frames_csv)
            items = []
            for fid, t in zip(ids, times):
                path = next((image_dir / f"{int(fid):06d}{s}" for s in IMAGE_SUFFIXES
                             if (image_dir / f"{int(fid):06d}{s}").is_file()), image_dir / f"{int(fid):06d}.jpg")
                items.append((path, float(t)))
        else:
            if self.fps <= 0:
                raise MeanNavError(f"camera {folder}: fps must be positive for a folder without frames.csv")
            paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            items = [(p, i / self.fps) for i, p in enumerate(paths)]
        if not items:
            raise MeanNavError(f"camera {folder}: no images (.jpg/.png) found; check the folder")
        self._items = items
        self._pos = 0

    def read(self) -> Frame | None:
        if self._pos >= len(self._items):
            if not self.loop:
                return None
            # a loop restarts the recorded clock so time keeps increasing
            period = self._items[-1][1] - self._items[0][1] + 1.0 / max(self.fps, 1e-3)
            self._items = [(p, t + period) for p, t in self._items]
            self._pos = 0
        path, t = self._items[self._pos]
        self._pos += 1
        try:  # a truncated or corrupt file is refused whole, never partly decoded
            rgb = read_image_rgb(path, ignore_orientation=True)
        except MeanNavError as exc:
            return self._deliver(None, t, str(exc))
        return self._deliver(rgb, t)


class VideoFileSource(_RecordedSource):
    """A video file; frame times from frames.csv beside it, else the container timestamps."""

    def __init__(self, path: str | Path, realtime: bool = True, loop: bool = False):
        super().__init__(str(path), realtime, loop)
        self.path = Path(path)
        self._cap: cv2.VideoCapture | None = None
        self._times: np.ndarray | None = None
        self._pos = 0

    def open(self) -> None:
        if not self.path.is_file():
            raise MeanNavError(f"camera {self.path}: video file not found")
        cap = cv2.VideoCapture(str(self.path))
        if not cap.isOpened():
            raise MeanNavError(f"camera {self.path}: cannot open the video (codec missing?); convert it to H.264 MP4")
        self._cap = cap
        frames_csv = self.path.parent / "frames.csv"
        if frames_csv.is_file():
            from ..replay.flight import read_frames_csv
            self._times = read_frames_csv(frames_csv)[1]
        self._pos = 0

    def read(self) -> Frame | None:
        if self._cap is None:
            return None
        ok, bgr = self._cap.read()
        if not ok:
            return None
        if self._times is not None:
            if self._pos >= len(self._times):
                return None
            t = float(self._times[self._pos])
        else:
            t = self._cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
        self._pos += 1
        return self._deliver(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), t)

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class SimulatedCamera(FrameSource):
    """sim://: what a downward camera sees of a map from the simulated vehicle's true pose.

    A reader thread stamps every SIM_STATE with the host monotonic clock on arrival (the
    clock the daemon stamps telemetry with); each frame is rendered from the newest one and
    carries its stamp, so frames agree with the attitude the daemon receives. Each frame also
    carries SITL's own time of that state (source_time_s, from the SYSTEM_TIME SITL sends just
    before it): SITL stalls on a loaded host, and a closed-loop analysis judges in its clock.
    """

    live = True

    def __init__(self, uri: str, map_path: Path, camera_yaml: Path, mavlink: str = "tcp:127.0.0.1:5763",
                 fps: float = 2.0, ground_amsl_m: float | None = None, gsd_m: float = 0.25,
                 pause_file: Path | None = None, pad_m: float = 300.0):
        self.uri, self.map_path, self.camera_yaml, self.mavlink = uri, map_path, camera_yaml, mavlink
        self.fps, self.ground_amsl_m, self.gsd_m, self.pause_file, self.pad_m = fps, ground_amsl_m, gsd_m, pause_file, pad_m
        self.cam = None
        self._ground = None
        self._conn = None
        self._state = None              # (stamp, lat, lon, alt, roll, pitch, yaw, sitl_s)
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_due = 0.0
        self._count = 0

    def _load_map(self) -> None:
        from ..geo.raster import read_metric_raster
        from ..replay.simulate import ground_image
        from .camera_model import CameraModel

        self.cam = CameraModel.from_yaml(self.camera_yaml)
        self.raster = read_metric_raster([self.map_path], self.gsd_m)
        # beyond the map the camera sees mirrored map imagery: plausible ground that is in no cache
        self._ground, pad = ground_image(self.raster, self.pad_m, "mirror")
        self._shift = np.array([[1, 0, pad], [0, 1, pad], [0, 0, 1.0]])

    def open(self) -> None:
        if self.pause_file is not None and self.pause_file.exists():
            raise MeanNavError(f"camera {self.uri}: paused ({self.pause_file} exists)")
        if self._ground is None:
            self._load_map()
        self.close()
        from .mavlink_io import MAV, mavutil
        try:
            conn = mavutil.mavlink_connection(self.mavlink, source_system=254, source_component=100,
                                              dialect="common", retries=0)
        except (OSError, ValueError) as exc:
            raise MeanNavError(f"camera {self.uri}: cannot reach the simulator at {self.mavlink} ({exc})") from None
        self._conn = conn
        self._stop.clear()
        self._thread = threading.Thread(target=self._reader, args=(conn, MAV), name="sim-camera", daemon=True)
        self._thread.start()

    def _reader(self, conn, MAV) -> None:
        requested_at = -math.inf
        sitl_s = None
        while not self._stop.is_set():
            try:
                msg = conn.recv_match(type=["SIM_STATE", "SYSTEM_TIME", "HEARTBEAT"], blocking=True, timeout=0.1)
            except Exception:
                return
            now = time.monotonic()
            if msg is None:
                continue
            if msg.get_type() == "HEARTBEAT":
                if (self._state is None or now - self._state[0] > 1.0) and now - requested_at > 2.0:
                    requested_at = now   # ask for the truth at 50 Hz on this link, and SITL's clock with it
                    for msg_id in (MAV.MAVLINK_MSG_ID_SYSTEM_TIME, MAV.MAVLINK_MSG_ID_SIM_STATE):
                        conn.mav.command_long_send(msg.get_srcSystem(), msg.get_srcComponent(),
                                                   MAV.MAV_CMD_SET_MESSAGE_INTERVAL, 0, msg_id, 20000, 0, 0, 0, 0, 0)
                continue
            if msg.get_type() == "SYSTEM_TIME":
                sitl_s = msg.time_boot_ms / 1000.0
                continue
            lat = msg.lat_int / 1e7 if msg.lat_int else msg.lat
            lon = msg.lon_int / 1e7 if msg.lon_int else msg.lon
            if self.ground_amsl_m is None:
                self.ground_amsl_m = float(msg.alt)
                log.info("camera %s: ground at %.1f m AMSL (first SIM_STATE)", self.uri, msg.alt)
            with self._cond:
                self._state = (now, lat, lon, float(msg.alt), msg.roll, msg.pitch, msg.yaw, sitl_s)
                self._cond.notify_all()

    def read(self) -> Frame | None:
        from ..geo.crs import from_lonlat
        from .camera_model import render_view

        now = time.monotonic()
        if self._next_due > now:
            time.sleep(self._next_due - now)
        self._next_due = max(self._next_due + 1.0 / self.fps, time.monotonic())
        if self.pause_file is not None and self.pause_file.exists():
            return None     # the camera is "lost": the grabber reopens (and open() waits for the file to go)
        with self._cond:
            self._cond.wait_for(lambda: self._state is not None and time.monotonic() - self._state[0] < 0.5,
                                timeout=2.0)
            state = self._state
        if state is None or time.monotonic() - state[0] >= 0.5:
            return None     # the simulator is not streaming its true state
        stamp, lat, lon, alt, roll, pitch, yaw, sitl_s = state
        x, y = from_lonlat(self.raster.crs, lon, lat)
        height = max(alt - self.ground_amsl_m, 0.5)
        m = self._shift @ self.raster.map_from_ground(float(x), float(y))
        view = render_view(self._ground, m, self.cam, roll, pitch, yaw, height)
        self._count += 1
        return Frame(view, stamp, self._count - 1, source_time_s=sitl_s)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
            self._thread = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._state = None


def simulated_camera(uri: str, base_dir: Path | None) -> SimulatedCamera:
    """Parse sim://MAP?camera=...&mavlink=...&fps=...&ground=...&gsd=...&pause_file=..."""
    parsed = urlparse(uri)
    query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
    known = {"camera", "mavlink", "fps", "ground", "gsd", "pause_file"}
    unknown = sorted(set(query) - known)
    if unknown:
        raise MeanNavError(f"camera.uri {uri!r}: unknown option {unknown[0]!r}; use {', '.join(sorted(known))}")

    def path(value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() or base_dir is None else base_dir / p

    map_path = path(parsed.netloc + parsed.path)
    if not map_path.is_file():
        raise MeanNavError(f"camera.uri {uri!r}: map {map_path} not found; give a GeoTIFF after sim://")
    if "camera" not in query or not path(query["camera"]).is_file():
        raise MeanNavError(f"camera.uri {uri!r}: give the camera model, e.g. ?camera=camera.yaml")

    def number(name: str, default):
        if name not in query:
            return default
        try:
            value = float(query[name])
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or (name != "ground" and value <= 0):
            raise MeanNavError(f"camera.uri {uri!r}: {name}={query[name]!r} must be a "
                               f"{'' if name == 'ground' else 'positive '}number")
        return value

    return SimulatedCamera(uri, map_path, path(query["camera"]), query.get("mavlink", "tcp:127.0.0.1:5763"),
                           number("fps", 2.0), number("ground", None), number("gsd", 0.25),
                           path(query["pause_file"]) if "pause_file" in query else None)


def open_source(uri: str, width: int = 1280, height: int = 720, fps: int = 30,
                realtime: bool = True, loop: bool = False, folder_fps: float = 2.0,
                base_dir: Path | None = None) -> FrameSource:
    """Make a FrameSource from a URI (not yet opened). Relative paths inside a sim:// URI are
    relative to `base_dir` (the config's folder)."""
    uri = str(uri).strip()
    if not uri:
        raise MeanNavError("camera.uri: empty; give csi://0, v4l2:///dev/video0, rtsp://..., a video file or an image folder")
    parsed = urlparse(uri)
    if parsed.scheme == "sim":
        return simulated_camera(uri, base_dir)
    if parsed.scheme == "csi":
        try:
            sensor = int(parsed.netloc or parsed.path.strip("/") or 0)
        except ValueError:
            raise MeanNavError(f"camera.uri {uri!r}: csi:// needs a sensor number, e.g. csi://0") from None
        return OpenCVSource(uri, gstreamer_csi_pipeline(sensor, width, height, fps), cv2.CAP_GSTREAMER)
    if parsed.scheme == "v4l2":
        device = parsed.path or parsed.netloc
        return OpenCVSource(uri, device, cv2.CAP_V4L2, width, height, fps)
    if uri.isdigit():
        return OpenCVSource(uri, int(uri), cv2.CAP_V4L2, width, height, fps)
    if parsed.scheme in ("rtsp", "rtsps", "http", "https", "udp", "rtp"):
        return OpenCVSource(uri, uri, cv2.CAP_FFMPEG)
    if parsed.scheme in ("", "file"):
        path = Path(parsed.path if parsed.scheme == "file" else uri)
        if path.is_dir():
            return ImageFolderSource(path, realtime=realtime, fps=folder_fps, loop=loop)
        if path.is_file():
            return VideoFileSource(path, realtime=realtime, loop=loop)
        raise MeanNavError(f"camera.uri {uri!r}: no such file or folder; check the path")
    raise MeanNavError(f"camera.uri {uri!r}: unknown scheme {parsed.scheme!r}; use csi://, v4l2://, rtsp://, "
                       "sim://, a video file or an image folder")


class LatestFrameGrabber:
    """Reads a source on its own thread and keeps only the newest frame.

    A live camera that fails is reopened with exponential back-off while the daemon runs
    on; `state` says what is happening ("starting", "ok", "reconnecting", "ended").
    """

    def __init__(self, source: FrameSource, reopen_min_s: float = 0.5, reopen_max_s: float = 10.0):
        self.source = source
        self.reopen_min_s, self.reopen_max_s = reopen_min_s, reopen_max_s
        self.state = "starting"
        self.last_error = ""
        self.frames_read = 0
        self._latest: Frame | None = None
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="camera", daemon=True)

    def start(self) -> "LatestFrameGrabber":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout=5.0)
        self.source.close()

    def latest(self, newer_than: int = -1, timeout_s: float = 0.0) -> Frame | None:
        """The newest frame with index > newer_than, waiting up to timeout_s for one."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._latest is None or self._latest.index <= newer_than:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stop.is_set() or self.state == "ended":
                    break
                self._cond.wait(remaining)
            frame = self._latest
        return frame if frame is not None and frame.index > newer_than else None

    def _set_state(self, state: str, error: str = "") -> None:
        if state != self.state:
            if error:
                log.warning("camera %s: %s (%s)", self.source.uri, state, error)
            else:
                log.info("camera %s: %s", self.source.uri, state)
        self.state, self.last_error = state, error or self.last_error

    def _run(self) -> None:
        backoff = self.reopen_min_s
        opened = False
        index_offset = 0   # frame indices keep increasing across reopenings
        last_index = -1
        while not self._stop.is_set():
            if not opened:
                try:
                    self.source.open()
                    opened = True
                    backoff = self.reopen_min_s
                    index_offset = last_index + 1
                except MeanNavError as exc:
                    if not self.source.live:
                        self._set_state("ended", str(exc))
                        break
                    self._set_state("reconnecting", str(exc))
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, self.reopen_max_s)
                    continue
            frame = self.source.read()
            if frame is None:
                if not self.source.live:
                    self._set_state("ended")
                    break
                self.source.close()
                opened = False
                self._set_state("reconnecting", "camera stopped delivering frames")
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.reopen_max_s)
                continue
            frame.index += index_offset
            last_index = frame.index
            self.frames_read += 1
            self._set_state("ok")
            with self._cond:
                self._latest = frame
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()
