"""`mean-nav flight import-photos`: DJI-style geotagged photos (written here with Pillow from
simulated frames) become a flight folder whose frames rectify onto the map."""
from __future__ import annotations

import datetime as dt
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from PIL import ExifTags, Image

from mean_nav.cli import main
from mean_nav.data.world import generate_world
from mean_nav.errors import MeanNavError
from mean_nav.geo.crs import from_lonlat
from mean_nav.geo.raster import read_metric_raster
from mean_nav.nav.camera_model import gimbal_attitude, ground_to_image, rectify_to_nadir
from mean_nav.replay.flight import Flight
from mean_nav.replay.photos import import_photos
from mean_nav.replay.simulate import SimulationConfig, simulate_flight

FOCAL_MM = 4.5
EPOCH = dt.datetime(2026, 5, 1, 10, 0, 0, tzinfo=dt.timezone.utc)
GROUND_AMSL = 10.0  # the simulator's flat terrain


def dms(deg: float) -> tuple[float, float, float]:
    deg = abs(deg)
    d, rest = int(deg), (abs(deg) - int(deg)) * 60
    return (float(d), float(int(rest)), (rest - int(rest)) * 60)


def write_dji_photo(path: Path, rgb: np.ndarray, tel, time_s: float, fx: float, orientation: int = 1,
                    focal: str = "plane", xmp: bool = True, capture_time: bool = True) -> None:
    """A JPEG with the EXIF and XMP a DJI drone writes (GPS, time, focal length, attitude)."""
    exif = Image.Exif()
    exif[ExifTags.Base.Model] = "FC6310"
    exif[ExifTags.Base.Orientation] = orientation
    sub = exif.get_ifd(ExifTags.IFD.Exif)
    if capture_time:
        when = EPOCH + dt.timedelta(seconds=time_s)
        sub[ExifTags.Base.DateTimeOriginal] = when.strftime("%Y:%m:%d %H:%M:%S")
        sub[ExifTags.Base.SubsecTimeOriginal] = f"{when.microsecond // 1000:03d}"
        sub[ExifTags.Base.OffsetTimeOriginal] = "+00:00"
    if focal == "plane":
        sub[ExifTags.Base.FocalLength] = FOCAL_MM
        sub[ExifTags.Base.FocalPlaneXResolution] = fx / FOCAL_MM * 25.4  # pixels per inch on the sensor
        sub[ExifTags.Base.FocalPlaneYResolution] = fx / FOCAL_MM * 25.4
        sub[ExifTags.Base.FocalPlaneResolutionUnit] = 2
    elif focal == "35mm":
        h, w = rgb.shape[:2]
        sub[ExifTags.Base.FocalLengthIn35mmFilm] = int(round(fx / math.hypot(w, h) * math.hypot(36, 24)))
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = "N" if tel.lat >= 0 else "S"
    gps[ExifTags.GPS.GPSLatitude] = dms(tel.lat)
    gps[ExifTags.GPS.GPSLongitudeRef] = "E" if tel.lon >= 0 else "W"
    gps[ExifTags.GPS.GPSLongitude] = dms(tel.lon)
    gps[ExifTags.GPS.GPSAltitudeRef] = 0
    gps[ExifTags.GPS.GPSAltitude] = tel.alt_amsl_m
    packet = None
    if xmp:
        deg = lambda a: f"{math.degrees(a):+.5f}"
        fields = {"RelativeAltitude": f"{tel.rel_alt_m:+.3f}", "AbsoluteAltitude": f"{tel.alt_amsl_m:+.3f}",
                  "FlightRollDegree": deg(tel.roll), "FlightPitchDegree": deg(tel.pitch),
                  "FlightYawDegree": deg(tel.yaw)}
        if tel.has_gimbal_attitude:
            fields.update(GimbalRollDegree=deg(tel.gimbal_roll), GimbalPitchDegree=deg(tel.gimbal_pitch),
                          GimbalYawDegree=deg(tel.gimbal_yaw))
        attrs = " ".join(f'drone-dji:{k}="{v}"' for k, v in fields.items())
        packet = ('<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
                  '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
                  f'<rdf:Description rdf:about="" xmlns:drone-dji="http://www.dji.com/drone-dji/1.0/" {attrs}/>'
                  '</rdf:RDF></x:xmpmeta><?xpacket end="w"?>').encode()
    Image.fromarray(rgb).save(path, "JPEG", quality=95, exif=exif, **({"xmp": packet} if packet else {}))


@pytest.fixture(scope="module")
def gimbal_survey(tmp_path_factory):
    """A simulated gimbal survey (vehicle pitched 10 deg) and its map."""
    root = tmp_path_factory.mktemp("survey")
    world = generate_world(root / "w.tif", seed=6, size_px=800, gsd_m=0.5)
    cfg = SimulationConfig(width=320, height=240, fps=0.25, duration_s=40, seed=2, map_gsd_m=0.5, altitude_m=80,
                           gimbal=True, cruise_pitch_deg=10, photometric_strength=0.0, occlusion_strength=0.0,
                           attitude_error_deg=0.0, margin_m=60)
    return Flight(simulate_flight([world], root / "sim", cfg, progress=False)), world


def dji_folder(sim: Flight, folder: Path, **kwargs) -> Path:
    folder.mkdir()
    t0 = sim.frame_times[0]
    for frame in sim.frames():
        write_dji_photo(folder / f"DJI_{frame.frame_id + 1:04d}.JPG", frame.image, frame.telemetry,
                        frame.time_s - t0, sim.camera.fx, **kwargs)
    return folder


def test_dji_photos_become_a_flight_that_rectifies_onto_the_map(gimbal_survey, tmp_path):
    sim, world = gimbal_survey
    photos = dji_folder(sim, tmp_path / "photos")
    assert main(["flight", "import-photos", str(photos), "-o", str(tmp_path / "flight")]) == 0
    flight = Flight(tmp_path / "flight")
    assert len(flight) == len(sim)
    assert np.allclose(flight.frame_times - flight.frame_times[0], sim.frame_times - sim.frame_times[0], atol=1e-3)
    assert flight.frame_times[0] == pytest.approx(EPOCH.timestamp(), abs=1e-3)
    assert flight.camera.fx == pytest.approx(sim.camera.fx, rel=1e-3)
    assert (flight.camera.width, flight.camera.height) == (320, 240)
    raster = read_metric_raster([world], 0.5)
    gsd, size = 0.5, 80
    corr = []
    for got, want in zip(flight.frames(), sim.frames()):
        g, w = got.telemetry, want.telemetry
        assert g.lat == pytest.approx(w.lat, abs=1e-7) and g.lon == pytest.approx(w.lon, abs=1e-7)
        assert g.rel_alt_m == pytest.approx(w.rel_alt_m, abs=1e-3)
        assert g.alt_amsl_m == pytest.approx(w.alt_amsl_m, abs=1e-3)
        assert g.has_gimbal_attitude
        assert np.allclose(gimbal_attitude(g), gimbal_attitude(w), atol=1e-5)
        assert g.pitch == pytest.approx(w.pitch, abs=1e-5)  # the vehicle's own, nosed down
        # the imported frame and camera land on the map where the GNSS says
        x, y = from_lonlat(raster.crs, g.lon, g.lat)
        m = raster.map_from_ground(x, y) @ np.linalg.inv(ground_to_image(gsd, size))
        ref = cv2.cvtColor(cv2.warpPerspective(raster.image, m, (size, size),
                                               flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP), cv2.COLOR_RGB2GRAY)
        view, valid = rectify_to_nadir(got.image, flight.camera, g.roll, g.pitch, g.yaw, g.height_above_ground_m,
                                       gsd, size, gimbal=gimbal_attitude(g))
        corr.append(np.corrcoef(cv2.cvtColor(view, cv2.COLOR_RGB2GRAY)[valid].astype(float),
                                ref[valid].astype(float))[0, 1])
    assert np.median(corr) > 0.8
    assert yaml.safe_load((tmp_path / "flight" / "flight.yaml").read_text())["imported"]["photos"][0] == "DJI_0001.JPG"


def test_orientation_tag_leaves_the_sensor_pixels_and_is_noted(gimbal_survey, tmp_path):
    sim, _ = gimbal_survey
    photos = dji_folder(sim, tmp_path / "photos", orientation=3)  # a viewer "rotated" them by 180 deg
    flight = Flight(import_photos(photos, tmp_path / "flight", progress=False))
    first = next(flight.frames()).image
    stored = np.asarray(Image.open(photos / "DJI_0001.JPG").convert("RGB"))  # Pillow does not apply the tag
    assert first.shape == stored.shape and np.abs(first.astype(int) - stored).mean() < 2
    notes = yaml.safe_load((flight.root / "flight.yaml").read_text())["imported"]["notes"]
    assert any("orientation 3 ignored" in n for n in notes)


def test_plain_geotagged_photos_use_35mm_focal_ground_altitude_and_the_track(gimbal_survey, tmp_path):
    sim, _ = gimbal_survey
    photos = dji_folder(sim, tmp_path / "photos", focal="35mm", xmp=False)
    with pytest.raises(MeanNavError, match="--ground-alt"):
        import_photos(photos, tmp_path / "no", progress=False)
    assert not (tmp_path / "no").exists() and not (tmp_path / "no.partial").exists()
    flight = Flight(import_photos(photos, tmp_path / "flight", ground_alt_m=GROUND_AMSL, progress=False))
    assert flight.camera.fx == pytest.approx(sim.camera.fx, rel=0.02)  # 35 mm equivalents are whole mm
    tel = [f.telemetry for f in flight.frames()]
    truth = [f.telemetry for f in sim.frames()]
    assert all(t.rel_alt_m == pytest.approx(w.rel_alt_m, abs=0.01) for t, w in zip(tel, truth))
    assert not any(t.has_gimbal_attitude for t in tel)
    assert all(t.roll == 0 and t.pitch == 0 for t in tel)
    # yaw from the track between photos: the vehicle's course, within the turns between photos
    course = [math.atan2(w.ve, w.vn) for w in truth]
    diff = [abs(math.remainder(t.yaw - c, 2 * math.pi)) for t, c in zip(tel, course)]
    assert np.median(diff) < math.radians(15)
    notes = yaml.safe_load((flight.root / "flight.yaml").read_text())["imported"]["notes"]
    assert any("no attitude" in n for n in notes)


def test_missing_focal_length_or_capture_time_is_one_clear_error(gimbal_survey, tmp_path, capsys):
    sim, _ = gimbal_survey
    photos = dji_folder(sim, tmp_path / "nofocal", focal="none")
    assert main(["flight", "import-photos", str(photos), "-o", str(tmp_path / "out")]) == 1
    assert "--camera" in capsys.readouterr().err and not (tmp_path / "out").exists()
    sim.camera.to_yaml(tmp_path / "camera.yaml")  # the camera YAML supplies what EXIF lacks
    flight = Flight(import_photos(photos, tmp_path / "out", camera_yaml=tmp_path / "camera.yaml", progress=False))
    assert flight.camera.fx == pytest.approx(sim.camera.fx)
    untimed = dji_folder(sim, tmp_path / "untimed", capture_time=False)
    with pytest.raises(MeanNavError, match=r"DJI_0001\.JPG: no capture time"):
        import_photos(untimed, tmp_path / "out2", progress=False)
