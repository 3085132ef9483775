"""`mean-nav flight import-photos DIR -o FLIGHT`: geotagged drone photos -> a flight folder.

Each JPEG becomes one frame, in capture-time order, with one telemetry row at its own
capture time. What is read (EXIF with Pillow, XMP with defusedxml):

  time       EXIF DateTimeOriginal + SubSecTimeOriginal + OffsetTimeOriginal (local time
             without an offset is taken as UTC, noted), else GPSDateStamp + GPSTimeStamp
  position   EXIF GPS latitude/longitude/altitude: ground truth and initial prior only
  height     DJI XMP RelativeAltitude (above take-off), else GPS altitude - `--ground-alt`
  attitude   DJI XMP GimbalRoll/Pitch/YawDegree: the camera's own attitude (gimbal columns);
             FlightRoll/Pitch/YawDegree: the vehicle's. Without any: a nadir camera with the
             image top along the track between photos (noted)
  camera     `--camera` YAML, else EXIF FocalLength with FocalPlaneX/YResolution (or
             `--sensor-width-mm`), else FocalLengthIn35mmFilm; principal point at the centre
  orientation EXIF Orientation is a display hint: frames keep the sensor's pixel layout that
             the attitude describes (the flight reader ignores the tag too); noted when set

Photos are copied unchanged. The folder is built beside FLIGHT and renamed when complete.
"""
from __future__ import annotations

import argparse
import datetime as dt
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from ..errors import MeanNavError
from ..nav.camera_model import CameraModel
from ..nav.telemetry import Telemetry

log = logging.getLogger(__name__)

PHOTO_SUFFIXES = (".jpg", ".jpeg")
DJI_NS = "http://www.dji.com/drone-dji/1.0/"
DIAGONAL_35MM = math.hypot(36.0, 24.0)        # mm: 35 mm equivalent focal lengths scale the diagonal
MM_PER_UNIT = {2: 25.4, 3: 10.0, 4: 1.0, 5: 0.001}  # EXIF FocalPlaneResolutionUnit: inch, cm, mm, um


@dataclass
class Photo:
    """What one photo's metadata says (angles in degrees, as stored; NaN when absent)."""

    path: Path
    width: int
    height: int
    time_s: float
    lat: float = math.nan
    lon: float = math.nan
    gps_alt_m: float = math.nan
    relative_alt_m: float = math.nan
    gimbal_deg: tuple[float, float, float] | None = None   # roll, pitch, yaw
    flight_deg: tuple[float, float, float] | None = None
    focal_mm: float = math.nan
    focal_35mm: float = math.nan
    focal_plane_px_per_mm: tuple[float, float] | None = None
    orientation: int = 1
    notes: list[str] = field(default_factory=list)


# --- reading ---------------------------------------------------------------------------------

def _float(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError, ZeroDivisionError):
        return math.nan


def _dms(v, ref: str | None) -> float:
    """EXIF (degrees, minutes, seconds) and N/S/E/W -> signed degrees."""
    try:
        d, m, s = (float(x) for x in v)
    except (TypeError, ValueError, ZeroDivisionError):
        return math.nan
    sign = -1.0 if str(ref or "").strip().upper() in ("S", "W") else 1.0
    return sign * (d + m / 60 + s / 3600)


def _capture_time(exif_ifd: dict, gps: dict, path: Path, notes: list[str]) -> float:
    """Unix seconds of the capture."""
    from PIL import ExifTags

    original = exif_ifd.get(ExifTags.Base.DateTimeOriginal)
    if original:
        try:
            t = dt.datetime.strptime(str(original).strip(), "%Y:%m:%d %H:%M:%S")
        except ValueError:
            raise MeanNavError(f"{path}: EXIF DateTimeOriginal {original!r} is not 'YYYY:MM:DD HH:MM:SS'; "
                               "fix the tag or remove the photo") from None
        subsec = str(exif_ifd.get(ExifTags.Base.SubsecTimeOriginal) or "").strip()
        fraction = float("0." + subsec) if subsec.isdigit() else 0.0
        offset = str(exif_ifd.get(ExifTags.Base.OffsetTimeOriginal) or "").strip()
        if offset:
            try:
                t = t.replace(tzinfo=dt.datetime.strptime(offset, "%z").tzinfo)
            except ValueError:
                raise MeanNavError(f"{path}: EXIF OffsetTimeOriginal {offset!r} is not '+HH:MM'") from None
        else:
            t = t.replace(tzinfo=dt.timezone.utc)
            notes.append("capture time without a UTC offset: taken as UTC")
        return t.timestamp() + fraction
    date, hms = gps.get(ExifTags.GPS.GPSDateStamp), gps.get(ExifTags.GPS.GPSTimeStamp)
    if date and hms:
        try:
            day = dt.datetime.strptime(str(date).strip(), "%Y:%m:%d").replace(tzinfo=dt.timezone.utc)
            h, m, s = (float(x) for x in hms)
        except (TypeError, ValueError, ZeroDivisionError):
            raise MeanNavError(f"{path}: EXIF GPS date/time stamp is malformed; fix it or remove the photo") from None
        return day.timestamp() + h * 3600 + m * 60 + s
    raise MeanNavError(f"{path}: no capture time (EXIF DateTimeOriginal or GPS time stamp); a flight needs "
                       "the time of every photo")


def _dji_xmp(xmp: bytes | str | None, path: Path) -> dict[str, float]:
    """The drone-dji fields of an XMP packet (as attributes or elements) as numbers."""
    if not xmp:
        return {}
    from defusedxml import ElementTree

    text = xmp.decode("utf-8", "replace") if isinstance(xmp, bytes) else xmp
    start, end = text.find("<x:xmpmeta"), text.rfind("</x:xmpmeta>")
    if start < 0 or end < 0:
        return {}
    try:
        root = ElementTree.fromstring(text[start:end + len("</x:xmpmeta>")])
    except Exception as exc:  # defusedxml raises its own errors for hostile XML too
        raise MeanNavError(f"{path}: the XMP metadata is not valid XML ({exc}); remove it or the photo") from None
    prefix = "{" + DJI_NS + "}"
    out = {}
    for element in root.iter():
        for key, value in element.attrib.items():
            if key.startswith(prefix):
                out[key[len(prefix):]] = _float(value)
        if element.tag.startswith(prefix) and element.text:
            out[element.tag[len(prefix):]] = _float(element.text)
    return out


def read_photo(path: Path) -> Photo:
    from PIL import ExifTags, Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            width, height = img.size
            exif = img.getexif()
            xmp = img.info.get("xmp")
    except (UnidentifiedImageError, OSError) as exc:
        raise MeanNavError(f"{path}: not a readable JPEG ({exc}); remove it from the folder") from None
    exif_ifd = exif.get_ifd(ExifTags.IFD.Exif)
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    notes: list[str] = []
    photo = Photo(path, width, height, _capture_time(exif_ifd, gps, path, notes), notes=notes)
    photo.lat = _dms(gps.get(ExifTags.GPS.GPSLatitude), gps.get(ExifTags.GPS.GPSLatitudeRef))
    photo.lon = _dms(gps.get(ExifTags.GPS.GPSLongitude), gps.get(ExifTags.GPS.GPSLongitudeRef))
    alt = _float(gps.get(ExifTags.GPS.GPSAltitude))
    below_sea = gps.get(ExifTags.GPS.GPSAltitudeRef) in (1, b"\x01")
    photo.gps_alt_m = -alt if below_sea else alt
    photo.focal_mm = _float(exif_ifd.get(ExifTags.Base.FocalLength))
    photo.focal_35mm = _float(exif_ifd.get(ExifTags.Base.FocalLengthIn35mmFilm))
    unit_code = _float(exif_ifd.get(ExifTags.Base.FocalPlaneResolutionUnit))
    mm_per_unit = MM_PER_UNIT.get(int(unit_code) if math.isfinite(unit_code) else 2)  # EXIF default: inch
    xres = _float(exif_ifd.get(ExifTags.Base.FocalPlaneXResolution))  # pixels per unit on the sensor
    yres = _float(exif_ifd.get(ExifTags.Base.FocalPlaneYResolution))
    if mm_per_unit and xres > 0:
        photo.focal_plane_px_per_mm = (xres / mm_per_unit, (yres if yres > 0 else xres) / mm_per_unit)
    photo.orientation = int(exif.get(ExifTags.Base.Orientation, 1) or 1)
    dji = _dji_xmp(xmp, path)
    if not math.isfinite(photo.gps_alt_m) and math.isfinite(dji.get("AbsoluteAltitude", math.nan)):
        photo.gps_alt_m = dji["AbsoluteAltitude"]
    photo.relative_alt_m = dji.get("RelativeAltitude", math.nan)
    for kind in ("Gimbal", "Flight"):
        angles = tuple(dji.get(f"{kind}{axis}Degree", math.nan) for axis in ("Roll", "Pitch", "Yaw"))
        if all(math.isfinite(a) for a in angles):
            setattr(photo, f"{kind.lower()}_deg", angles)
    return photo


# --- the flight folder -------------------------------------------------------------------------

def camera_from_photo(photo: Photo, sensor_width_mm: float | None) -> CameraModel:
    """Pinhole intrinsics from the photo's focal length and sensor geometry (no distortion)."""
    w, h = photo.width, photo.height
    fx = fy = math.nan
    if math.isfinite(photo.focal_mm) and photo.focal_mm > 0:
        if sensor_width_mm:
            fx = fy = photo.focal_mm * w / sensor_width_mm
        elif photo.focal_plane_px_per_mm:
            fx, fy = (photo.focal_mm * r for r in photo.focal_plane_px_per_mm)
    if not (fx > 0) and math.isfinite(photo.focal_35mm) and photo.focal_35mm > 0:
        fx = fy = photo.focal_35mm / DIAGONAL_35MM * math.hypot(w, h)
    if not (fx > 0 and fy > 0):
        raise MeanNavError(f"{photo.path}: no focal length with sensor size in EXIF (FocalLength + "
                           "FocalPlaneXResolution, or FocalLengthIn35mmFilm); give --camera camera.yaml "
                           "or --sensor-width-mm")
    return CameraModel(w, h, float(fx), float(fy), (w - 1) / 2, (h - 1) / 2)


def track_yaw(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Course over ground between consecutive photos (forward azimuth, radians), for photos
    without attitude: survey drones fly nose first."""
    from pyproj import Geod

    yaw = np.zeros(len(lat))
    if len(lat) > 1 and np.isfinite(lat).all() and np.isfinite(lon).all():
        az, _, _ = Geod(ellps="WGS84").inv(lon[:-1], lat[:-1], lon[1:], lat[1:])
        az = np.radians(np.atleast_1d(az))
        yaw[:-1], yaw[-1] = az, az[-1]
    return yaw


def telemetry_rows(photos: list[Photo], ground_alt_m: float | None) -> list[Telemetry]:
    """One telemetry row per photo at its capture time; notes what had to be assumed."""
    courses = track_yaw(np.array([p.lat for p in photos]), np.array([p.lon for p in photos]))
    rows = []
    for photo, course in zip(photos, courses):
        height = photo.relative_alt_m
        if not math.isfinite(height):
            if not math.isfinite(photo.gps_alt_m):
                raise MeanNavError(f"{photo.path}: no height above ground: neither XMP RelativeAltitude nor "
                                   "an EXIF GPS altitude; such photos cannot be localized")
            if ground_alt_m is None:
                raise MeanNavError(f"{photo.path}: no height above ground (XMP RelativeAltitude); give "
                                   "--ground-alt, the ground's altitude above sea level, to use the GPS altitude")
            height = photo.gps_alt_m - ground_alt_m
        gimbal = tuple(math.radians(a) for a in photo.gimbal_deg) if photo.gimbal_deg else (math.nan,) * 3
        if photo.flight_deg:
            roll, pitch, yaw = (math.radians(a) for a in photo.flight_deg)
        elif photo.gimbal_deg:  # the vehicle's own attitude is then only used for plausibility checks
            roll, pitch, yaw = 0.0, 0.0, gimbal[2]
        else:
            roll, pitch, yaw = 0.0, 0.0, float(course)
            photo.notes.append("no attitude in the metadata: nadir camera, image top along the track")
        rows.append(Telemetry(time_s=photo.time_s, roll=roll, pitch=pitch, yaw=math.remainder(yaw, 2 * math.pi),
                              rel_alt_m=float(height), alt_amsl_m=photo.gps_alt_m, lat=photo.lat, lon=photo.lon,
                              gimbal_roll=gimbal[0], gimbal_pitch=gimbal[1],
                              gimbal_yaw=math.remainder(gimbal[2], 2 * math.pi) if photo.gimbal_deg else math.nan))
        if photo.orientation != 1:
            photo.notes.append(f"EXIF orientation {photo.orientation} ignored: the frame keeps the sensor's "
                               "pixel layout, which the attitude describes")
    return rows


def import_photos(folder: Path, out: Path, camera_yaml: Path | None = None, sensor_width_mm: float | None = None,
                  ground_alt_m: float | None = None, map_paths: list[Path] | None = None,
                  progress: bool = True) -> Path:
    """Write the flight folder `out` from the photos in `folder`; returns `out`."""
    from tqdm import tqdm

    from .flight import check_new_flight_folder, new_flight_folder, write_frames_csv
    from .logs import write_telemetry_csv

    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise MeanNavError(f"{folder}: photo folder not found")
    check_new_flight_folder(out)
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES and p.is_file())
    if not paths:
        raise MeanNavError(f"{folder}: no .jpg/.jpeg photos found")
    photos = [read_photo(p) for p in tqdm(paths, desc="read photo metadata", unit="photo", disable=not progress)]
    photos.sort(key=lambda p: p.time_s)
    for a, b in zip(photos, photos[1:]):
        if b.time_s <= a.time_s:
            raise MeanNavError(f"{b.path}: same capture time as {a.path.name} ({b.time_s:.3f} s); frames need "
                               "increasing times: remove one of them")
    sizes = {(p.width, p.height) for p in photos}
    if len(sizes) > 1:
        raise MeanNavError(f"{folder}: photos of different sizes {sorted(sizes)}; import one camera at a time")
    camera = CameraModel.from_yaml(camera_yaml) if camera_yaml else camera_from_photo(photos[0], sensor_width_mm)
    if (camera.width, camera.height) != (photos[0].width, photos[0].height):
        raise MeanNavError(f"{camera_yaml}: camera is {camera.width}x{camera.height} but the photos are "
                           f"{photos[0].width}x{photos[0].height}; give the YAML of this camera and resolution")
    rows = telemetry_rows(photos, ground_alt_m)

    notes = sorted({n for p in photos for n in p.notes})
    with new_flight_folder(out) as tmp:
        camera.to_yaml(tmp / "camera.yaml")
        for i, photo in enumerate(tqdm(photos, desc="copy photos", unit="photo", disable=not progress)):
            shutil.copyfile(photo.path, tmp / "frames" / f"{i:06d}.jpg")
        write_frames_csv(tmp / "frames.csv", range(len(photos)), [p.time_s for p in photos])
        write_telemetry_csv(tmp / "telemetry.csv", rows)
        meta = {"description": f"imported from the photos in {folder.resolve()}",
                "imported": {"source": str(folder.resolve()),
                             "camera": str(camera_yaml) if camera_yaml else "from EXIF",
                             "photos": [p.path.name for p in photos], "notes": notes}}
        if map_paths:
            meta["map"] = [str(Path(m).resolve()) for m in map_paths]
        (tmp / "flight.yaml").write_text(yaml.safe_dump(meta, sort_keys=False), encoding="utf-8")
    for note in notes:
        log.warning("%s: %s", folder, note)
    return out


# --- command line ------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="flight_command", required=True, metavar="{import-photos}")
    p = sub.add_parser("import-photos", help="a folder of geotagged drone photos -> a flight folder",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("photos", type=Path, help="folder of JPEG photos with EXIF GPS and capture time")
    p.add_argument("-o", "--out", type=Path, required=True, help="flight folder to create")
    p.add_argument("--camera", type=Path, default=None, help="camera YAML (intrinsics); default: from EXIF")
    p.add_argument("--sensor-width-mm", type=float, default=None,
                   help="sensor width for EXIF FocalLength when the photos lack FocalPlaneXResolution")
    p.add_argument("--ground-alt", type=float, default=None,
                   help="ground altitude above sea level, m: height = GPS altitude - this when the photos "
                        "have no RelativeAltitude")
    p.add_argument("--map", type=Path, nargs="*", default=None, help="orthophoto(s) of the area for flight.yaml")


def run(args) -> int:
    if args.sensor_width_mm is not None and not args.sensor_width_mm > 0:
        raise MeanNavError(f"--sensor-width-mm: must be positive, got {args.sensor_width_mm}")
    out = import_photos(args.photos, args.out, args.camera, args.sensor_width_mm, args.ground_alt, args.map)
    print(f"flight folder: {out}")
    return 0
