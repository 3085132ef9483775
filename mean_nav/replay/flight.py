"""The recorded-flight folder: camera, timestamped frames and telemetry.

```
flight/
  camera.yaml      CameraModel YAML (mean_nav/nav/camera_model.py)
  frames.csv       frame,time_s            one row per frame, time increasing
  frames/          000000.jpg 000001.jpg   (or .png), named by the frame column
  video.mp4        ...or a video instead of frames/ (any name via flight.yaml `video`);
                   frames.csv then gives the time of each video frame in order
  telemetry.csv    time_s,lat,lon,alt_m,rel_alt_m,roll,pitch,yaw[,vn,ve,vd,range_m]
                   [,gimbal_roll,gimbal_pitch,gimbal_yaw]: the camera's own attitude on a
                   stabilising gimbal (radians, ZYX in NED of a frame whose x is the optical
                   axis: pitch -pi/2 looks down); where set it replaces attitude + mount
  flight.yaml      optional: telemetry_log (a .tlog/.bin/.ulg instead of telemetry.csv),
                   time_offset_s (frame_time = log_time + offset), video, max_telemetry_gap_s,
                   map (orthophoto used for the report and for in-map scoring)
```
Telemetry lat/lon is GNSS: ground truth for scoring and at most the initial prior.
Frames are used as stored: an EXIF orientation tag is ignored, because camera.yaml and the
attitude describe the sensor's pixel grid, not how a viewer displays it.
"""
from __future__ import annotations

import csv
import logging
import math
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from ..config import Limits, bounded, load_config, read_csv
from ..deploy.images import read_image_rgb
from ..errors import MeanNavError
from ..nav.camera_model import CameraModel
from ..nav.telemetry import Telemetry
from .logs import TelemetryTrack, read_telemetry_csv, read_telemetry_log

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
FRAME_ID_LIMITS = Limits(ge=0, lt=10**9)
TIME_LIMITS = Limits(ge=-1e10, le=1e10, unit="s")


@dataclass
class FlightConfig:
    """flight.yaml: everything optional."""

    telemetry_log: str | None = None     # path relative to the folder; replaces telemetry.csv
    time_offset_s: float = bounded(0.0, ge=-1e10, le=1e10, unit="s")  # frame_time = log_time + time_offset_s
    video: str | None = None             # video file relative to the folder; replaces frames/
    # a frame in a longer telemetry hole gets no estimate
    max_telemetry_gap_s: float = bounded(1.0, gt=0, le=3600, unit="s")
    map: list[str] | None = None         # orthophoto(s) of the area (report background, in-map scoring)
    description: str = ""
    simulated: dict | None = None        # what simulate-flight used (seed, speed, ...), informative
    imported: dict | None = None         # what `flight import-photos` read and assumed, informative


@dataclass
class FlightFrame:
    """One camera frame with the telemetry at its time; `problem` says why either is missing."""

    index: int            # row in frames.csv
    frame_id: int         # the frame column (file name number)
    time_s: float
    image: np.ndarray | None       # RGB uint8
    telemetry: Telemetry | None
    problem: str = ""


class Flight:
    """A recorded-flight folder, validated on open; frames are read lazily in order."""

    def __init__(self, root: str | Path):
        root = Path(root)
        if not root.is_dir():
            raise MeanNavError(f"{root}: flight folder not found; give a folder with camera.yaml, "
                               "frames.csv, frames/ (or a video) and telemetry.csv")
        self.root = root
        cfg_path = root / "flight.yaml"
        self.config = load_config(cfg_path, FlightConfig) if cfg_path.is_file() else FlightConfig()
        self.camera = CameraModel.from_yaml(root / "camera.yaml")
        self.frame_ids, self.frame_times = read_frames_csv(root / "frames.csv")
        self.video_path = self._find_video()
        if self.video_path is None:
            frames_dir = root / "frames"
            if not frames_dir.is_dir():
                raise MeanNavError(f"{frames_dir}: frames folder not found; a flight needs frames/ with "
                                   "images or a video named in flight.yaml `video`")
            self._check_first_frame_exists()
        self.telemetry = self._read_telemetry()

    # --- loading -----------------------------------------------------------------------
    def _find_video(self) -> Path | None:
        if self.config.video:
            path = self.root / self.config.video
            if not path.is_file():
                raise MeanNavError(f"{self.root / 'flight.yaml'}: video {self.config.video!r} not found in "
                                   f"{self.root}; fix the `video` field")
            return path
        if not (self.root / "frames").is_dir():
            for name in ("video.mp4", "video.avi", "video.mkv"):
                if (self.root / name).is_file():
                    return self.root / name
        return None

    def _check_first_frame_exists(self) -> None:
        if self.frame_path(self.frame_ids[0]) is None:
            raise MeanNavError(f"{self.root / 'frames'}: no image for frame {self.frame_ids[0]} "
                               f"(expected {self.frame_ids[0]:06d}.jpg or .png); check frames.csv")

    def _read_telemetry(self) -> TelemetryTrack:
        gap = self.config.max_telemetry_gap_s
        if self.config.telemetry_log:
            track = read_telemetry_log(self.root / self.config.telemetry_log, max_gap_s=gap)
            track = track.shifted(self.config.time_offset_s)
        else:
            track = read_telemetry_csv(self.root / "telemetry.csv", max_gap_s=gap)
            if self.config.time_offset_s:
                track = track.shifted(self.config.time_offset_s)
        first, last = track.time_range()
        inside = (self.frame_times >= first) & (self.frame_times <= last)
        if not inside.any():
            raise MeanNavError(
                f"{self.root}: no frame time ({self.frame_times[0]:.3f}..{self.frame_times[-1]:.3f} s) falls "
                f"inside the telemetry ({first:.3f}..{last:.3f} s); set flight.yaml time_offset_s "
                "(frame_time = log_time + time_offset_s)")
        return track

    def frame_path(self, frame_id: int) -> Path | None:
        for suffix in IMAGE_SUFFIXES:
            p = self.root / "frames" / f"{frame_id:06d}{suffix}"
            if p.is_file():
                return p
        return None

    # --- access ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.frame_times)

    @property
    def map_paths(self) -> list[Path]:
        return [Path(p) if Path(p).is_absolute() else self.root / p for p in (self.config.map or [])]

    def frames(self, start: int = 0, stop: int | None = None) -> Iterator[FlightFrame]:
        """Frames in time order with their telemetry. A missing image or telemetry becomes a
        FlightFrame with `problem` set; a video that ends early yields one last FlightFrame
        saying so and stops."""
        stop = len(self) if stop is None else min(stop, len(self))
        telemetry = self.telemetry.at(self.frame_times[start:stop])
        images = self._video_frames(start) if self.video_path else None
        for k, i in enumerate(range(start, stop)):
            fid, t = int(self.frame_ids[i]), float(self.frame_times[i])
            if images is not None:
                image = next(images, None)
                if image is None:
                    yield FlightFrame(i, fid, t, None, None,
                                      f"{self.video_path}: video ended after {i} frame(s) but frames.csv "
                                      f"lists {len(self)}; the remaining frames are not replayed")
                    return
                image_problem = ""
            else:
                image, image_problem = self._read_image(fid)
            problem = image_problem or telemetry.problem[k]
            yield FlightFrame(i, fid, t, image, telemetry.telemetry[k], problem)

    def _read_image(self, frame_id: int) -> tuple[np.ndarray | None, str]:
        """(RGB image, "") or (None, why not): a truncated or corrupt file is refused whole."""
        path = self.frame_path(frame_id)
        if path is None:
            return None, f"{self.root / 'frames'}: frame {frame_id:06d} is missing"
        try:  # pixels as stored: camera.yaml calibrates the sensor, not an EXIF-rotated view
            return read_image_rgb(path, ignore_orientation=True), ""
        except MeanNavError as exc:
            return None, str(exc)

    def _video_frames(self, start: int) -> Iterator[np.ndarray]:
        cap = cv2.VideoCapture(str(self.video_path))
        if not cap.isOpened():
            raise MeanNavError(f"{self.video_path}: cannot open the video (codec missing?); "
                               "convert it to frames/ or H.264 MP4")
        try:
            for _ in range(start):  # seeking is unreliable across codecs: decode forward
                if not cap.grab():
                    return
            while True:
                ok, bgr = cap.read()
                if not ok:
                    return
                yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        finally:
            cap.release()


def read_frames_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """frames.csv -> (frame ids, times in seconds), checked for increasing time."""
    if not path.is_file():
        raise MeanNavError(f"{path}: frame timestamps not found; a flight needs frames.csv with columns frame,time_s")
    ids, times = [], []
    _, rows = read_csv(path, "frames.csv", ("frame", "time_s"))
    previous = -math.inf
    for line, row in rows:
        try:
            fid, t = int(row["frame"]), float(row["time_s"])
        except (TypeError, ValueError):
            raise MeanNavError(f"{path}: line {line}: frame must be an integer and time_s a number") from None
        FRAME_ID_LIMITS.check(fid, f"{path}: line {line}: frame")
        TIME_LIMITS.check(t, f"{path}: line {line}: time_s")
        if not t > previous:
            raise MeanNavError(f"{path}: line {line}: time_s {t} does not increase (previous {previous}); "
                               "frames must be in time order without duplicates")
        previous = t
        ids.append(fid)
        times.append(t)
    if not ids:
        raise MeanNavError(f"{path}: frames.csv lists no frames")
    return np.array(ids, int), np.array(times, float)


def write_frames_csv(path: Path, frame_ids, times) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["frame", "time_s"])
        for fid, t in zip(frame_ids, times):
            w.writerow([int(fid), f"{float(t):.6f}"])
    tmp.replace(path)


def check_new_flight_folder(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise MeanNavError(f"{out}: output folder exists and is not empty; choose a new folder or delete it")


@contextmanager
def new_flight_folder(out: str | Path) -> Iterator[Path]:
    """Yield a temp folder (with frames/) to write a flight into; it becomes `out` only when
    the block finishes, so a failure never leaves a half-written flight. Refuses a non-empty `out`."""
    out = Path(out)
    check_new_flight_folder(out)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "frames").mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    tmp.rename(out)


def open_flight(root: str | Path) -> Flight:
    return Flight(root)
