"""Regression tests for the bad inputs of issue 14: each is one clear MeanNavError (exit 1
from the CLI) naming the file and the field, never a traceback, a hang or a silent result."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mean_nav.cli import main
from mean_nav.config import load_config, validate
from mean_nav.errors import MeanNavError
from mean_nav.nav.daemon import NavConfig, load_nav_config
from mean_nav.nav.filter import FilterConfig
from mean_nav.nav.localizer import LocalizerConfig
from mean_nav.nav.mavlink_io import MavlinkConfig
from mean_nav.nav.refine import RefineConfig
from mean_nav.replay.flight import FlightConfig
from mean_nav.replay.simulate import SimulationConfig


@pytest.mark.parametrize("cls", [NavConfig, LocalizerConfig, FilterConfig, RefineConfig, MavlinkConfig,
                                 SimulationConfig, FlightConfig])
def test_defaults_lie_within_their_declared_limits(cls):
    validate(cls())


@pytest.mark.parametrize("text, field", [
    ("localizer:\n  position_floor_m: .nan\n", "localizer.position_floor_m"),
    ("localizer:\n  filter:\n    accel_sigma_ms2: .nan\n", "localizer.filter.accel_sigma_ms2"),
    ("localizer:\n  filter:\n    gate_chi2: -1\n", "localizer.filter.gate_chi2"),
    ("localizer:\n  top_k: 1.0e+30\n", "localizer.top_k"),
    ("max_rate_hz: .nan\n", "max_rate_hz"),
    ("initial_lat: 1" + "0" * 400 + "\ninitial_lon: 0\n", "initial_lat"),
    ("mavlink:\n  baud: .inf\n", "mavlink.baud"),
])
def test_nav_config_refuses_values_that_made_nan_fixes_or_tracebacks(tmp_path, text, field):
    path = tmp_path / "nav.yaml"
    path.write_text(text)
    with pytest.raises(MeanNavError, match=rf"nav.yaml: field '{field}'"):
        load_nav_config(path)


@pytest.mark.parametrize("text, message", [
    ("1: 2\n", "key 1 is not a field name"),
    ("null: 2\n", "key None is not a field name"),
    ("localizer: {top_k: 4, 7: 1}\n", "localizer: key 7 is not a field name"),
])
def test_yaml_keys_that_are_not_names_are_refused(tmp_path, text, message):
    (tmp_path / "nav.yaml").write_text(text)
    with pytest.raises(MeanNavError, match=message):
        load_nav_config(tmp_path / "nav.yaml")


def test_negative_telemetry_gap_in_flight_yaml_is_refused(tmp_path):
    (tmp_path / "flight.yaml").write_text("max_telemetry_gap_s: -1\n")
    with pytest.raises(MeanNavError, match="flight.yaml: field 'max_telemetry_gap_s' must be > 0 s"):
        load_config(tmp_path / "flight.yaml", FlightConfig)


def test_cli_prints_one_line_and_exits_1_for_a_bad_config(tmp_path, capsys):
    (tmp_path / "nav.yaml").write_bytes(b"max_rate_hz: 5\ncamera:\n  uri: \xc3\x28\n")
    assert main(["run", "--check", "--config", str(tmp_path / "nav.yaml")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "nav.yaml: line 3" in err and "UTF-8" in err


def test_simulation_options_are_checked():
    from argparse import ArgumentParser

    from mean_nav.replay.simulate import add_arguments, config_from_args

    parser = ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["map.tif", "-o", "out", "--fps", "nan"])
    with pytest.raises(MeanNavError, match="'fps' must be a number, not NaN"):
        config_from_args(args)


CAMERA = "width: 640\nheight: 480\nfx: 500.0\nfy: 500.0\ncx: 320.0\ncy: 240.0\n"


@pytest.mark.parametrize("text, message", [
    (CAMERA + "dist_coeffs: [0.1, 0, 0, 0, 0]\n", "unknown field 'dist_coeffs'"),
    (CAMERA + "fxx: 500\n", "unknown field 'fxx'"),
    (CAMERA.replace("width: 640", "width: .inf"), "'width' should be int"),
    (CAMERA.replace("fx: 500.0", "fx: .nan"), "'fx' must be a number, not NaN"),
    (CAMERA.replace("fy: 500.0", "fy: -1"), "'fy' must be > 0"),
    (CAMERA + "mount: [1, 2, 3]\n", "mount: expected a mapping"),
    (CAMERA + "mount: {roll_deg: 1, pitch: 2}\n", "unknown field 'mount.pitch'"),
    (CAMERA + "distortion: [0.1, 0.2]\n", "'distortion' has 2 coefficients"),
    (CAMERA.replace("cx: 320.0", "cx: 3200"), "'cx' = 3200 lies outside"),
    (CAMERA.replace("height: 480\n", ""), "required field 'height' is missing"),
    ("1: 2\n" + CAMERA, "key 1 is not a field name"),
])
def test_camera_yaml_goes_through_the_same_checks(tmp_path, text, message):
    from mean_nav.nav.camera_model import CameraModel

    (tmp_path / "camera.yaml").write_text(text)
    with pytest.raises(MeanNavError, match=rf"camera.yaml: .*{message}"):
        CameraModel.from_yaml(tmp_path / "camera.yaml")


def test_camera_yaml_with_bad_bytes_is_refused(tmp_path):
    from mean_nav.nav.camera_model import CameraModel

    (tmp_path / "camera.yaml").write_bytes(CAMERA.encode() + b"# \xe9t\xe9\n")
    with pytest.raises(MeanNavError, match="camera.yaml: line 7: .* not UTF-8"):
        CameraModel.from_yaml(tmp_path / "camera.yaml")


TELEMETRY_HEADER = "time_s,lat,lon,alt_m,rel_alt_m,roll,pitch,yaw\n"


@pytest.mark.parametrize("body, message", [
    ("0,200,10,50,40,0,0,0\n", "line 2: lat must be >= -90 deg and <= 90 deg, got 200"),
    ("0,nan,10,50,40,0,0,0\n", "line 2: lat must be a number, not NaN"),
    ("0,45,10,50,inf,0,0,0\n", "line 2: rel_alt_m must be finite"),
    ("0,45,10,50,40,0,0,abc\n", "line 2: yaw 'abc' is not a number"),
    ("0,45,10,50,40,0,0,0\n0,45,10,50,40,0,0,0\n", "line 3: time_s 0.0 does not increase"),
])
def test_telemetry_csv_values_are_checked_per_row(tmp_path, body, message):
    from mean_nav.replay.logs import read_telemetry_csv

    (tmp_path / "telemetry.csv").write_text(TELEMETRY_HEADER + body)
    with pytest.raises(MeanNavError, match=rf"telemetry.csv: {message}"):
        read_telemetry_csv(tmp_path / "telemetry.csv")


def test_telemetry_csv_empty_cells_are_missing_values(tmp_path):
    from mean_nav.replay.logs import read_telemetry_csv

    (tmp_path / "telemetry.csv").write_text(TELEMETRY_HEADER + "0,,,50,40,0,0,0\n1,,,50,41,0,0,0.1\n")
    track = read_telemetry_csv(tmp_path / "telemetry.csv")
    assert len(track.channels["lat"].time_s) == 0 and list(track.channels["rel_alt_m"].values) == [40.0, 41.0]


@pytest.mark.parametrize("name, data, message", [
    ("telemetry.csv", TELEMETRY_HEADER.encode() + b"0,45,10,50,40,0,0,\xff\n", "line 2: byte 64 is not UTF-8"),
    ("frames.csv", b"frame,time_s\n0,0.0\n1,\xc0\x80\n", "line 3: byte 21 is not UTF-8"),
    ("frames.csv", b"frame,time_s\n0,nan\n", "line 2: time_s must be a number, not NaN"),
    ("frames.csv", b"frame,time_s\n" + b"9" * 30 + b",1.0\n", "line 2: frame is far out of range"),
    ("frames.csv", b"frame,time_s\n-3,1.0\n", "line 2: frame must be >= 0"),
    ("frames.csv", b"time_s\n1.0\n", "column 'frame' is missing"),
])
def test_flight_csvs_with_bad_bytes_or_values_are_refused(tmp_path, name, data, message):
    from mean_nav.replay.flight import read_frames_csv
    from mean_nav.replay.logs import read_telemetry_csv

    (tmp_path / name).write_bytes(data)
    reader = read_telemetry_csv if name == "telemetry.csv" else read_frames_csv
    with pytest.raises(MeanNavError, match=rf"{name}: {message}"):
        reader(tmp_path / name)


LOGS = Path(__file__).resolve().parents[2] / "shared" / "data" / "logs"


def _shared_log(name: str) -> bytes:
    path = LOGS / name
    if not path.is_file():
        pytest.skip(f"{path} absent (CI keeps shared/data beside the clone)")
    return path.read_bytes()


def test_tlog_cut_to_100_bytes_is_one_error_naming_the_file(tmp_path):
    from mean_nav.replay.logs import read_telemetry_log

    path = tmp_path / "cut.tlog"
    path.write_bytes(_shared_log("uavlogviewer_vtol.tlog")[:100])
    with pytest.raises(MeanNavError, match=r"cut.tlog: cannot read as a MAVLink telemetry log .*damaged"):
        read_telemetry_log(path)


def test_bit_flipped_dataflash_log_is_an_error_or_a_clean_track(tmp_path):
    from mean_nav.replay.logs import read_telemetry_log

    data = _shared_log("pymavlink_test.BIN")
    rng = np.random.default_rng(0)
    outcomes = set()
    for case in range(12):
        flipped = bytearray(data)
        for k in rng.integers(0, len(data), 20):
            flipped[k] ^= 1 << int(rng.integers(8))
        path = tmp_path / f"flip{case}.BIN"
        path.write_bytes(bytes(flipped))
        try:
            track = read_telemetry_log(path)
        except MeanNavError as exc:
            assert str(exc).startswith(str(path))
            outcomes.add("error")
        else:
            roll = track.channels["roll"].values
            assert np.all(np.abs(roll) <= np.pi) and np.all(np.diff(track.channels["roll"].time_s) > 0)
            outcomes.add("track")
    assert "error" in outcomes  # a format-table flip (unsupported format char) must be caught


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    from mean_nav.bench.cache import generate_cache

    return generate_cache(tmp_path_factory.mktemp("cache") / "c", n=20, dim=8, tile_size_m=60.0, stride_m=20.0,
                          progress=False)


def _edited_cache(small_cache, tmp_path, edit):
    import json
    import shutil

    folder = tmp_path / "cache"
    shutil.copytree(small_cache, folder)
    meta = json.loads((folder / "meta.json").read_text())
    edit(meta)
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def _set(path: str, value):
    def edit(meta):
        *parents, last = path.split(".")
        d = meta
        for p in parents:
            d = d[p]
        d[last] = value
    return edit


@pytest.mark.parametrize("edit, message", [
    (_set("files", {}), "files does not list embeddings.npy"),
    (lambda m: m["files"].pop("tiles.npy"), "files does not list tiles.npy"),
    (_set("files", []), "field 'files' should be dict"),
    (_set("dim", "abc"), "field 'dim' should be int"),
    (_set("grid", None), "grid: expected a mapping"),
    (_set("grid.crs_wkt", "PROJCS[nonsense"), "grid.crs_wkt is not a CRS"),
    (_set("grid.crs_wkt", 'GEOGCS["WGS 84",DATUM["WGS_1984",SPHEROID["WGS 84",6378137,298.257223563]],'
                          'PRIMEM["Greenwich",0],UNIT["degree",0.0174532925199433]]'), "not a projected"),
    (_set("grid.gsd_m", 0), "field 'grid.gsd_m' must be > 0 m"),
    (_set("num_tiles", -1), "field 'num_tiles' must be >= 0"),
    (lambda m: m["files"]["embeddings.npy"].update(sha256="not-a-digest"),
     r"files\['embeddings.npy'\].sha256 is not a sha256"),
    (_set("surprise", 1), "unknown field 'surprise'"),
    (_set("format_version", "1"), "format version '1' is not supported"),
])
def test_edited_cache_meta_is_one_clear_error(small_cache, tmp_path, edit, message):
    from mean_nav.geo.cache import TileCache

    folder = _edited_cache(small_cache, tmp_path, edit)
    with pytest.raises(MeanNavError, match=rf"meta.json: .*{message}"):
        TileCache.load(folder)


def test_empty_manifest_no_longer_switches_off_the_checksums(small_cache, tmp_path):
    from mean_nav.geo.cache import TileCache

    folder = _edited_cache(small_cache, tmp_path, _set("files", {}))
    emb = np.load(folder / "embeddings.npy")
    emb[0, 0] += 1
    np.save(folder / "embeddings.npy", emb)
    with pytest.raises(MeanNavError, match="manifest is incomplete"):
        TileCache.load(folder)
    TileCache.load(small_cache)  # the untouched cache still loads


def test_manifest_paths_stay_inside_the_cache(small_cache, tmp_path):
    from mean_nav.geo.cache import TileCache

    def edit(meta):
        meta["files"]["../outside"] = {"bytes": 1, "sha256": "0" * 64}
    folder = _edited_cache(small_cache, tmp_path, edit)
    with pytest.raises(MeanNavError, match="not a path inside the cache"):
        TileCache.load(folder)


def _write_geotiff(path, bands, dtype):
    import rasterio
    from affine import Affine

    with rasterio.open(path, "w", driver="GTiff", width=bands.shape[2], height=bands.shape[1], count=3,
                       dtype=dtype, crs="EPSG:32632", transform=Affine(1, 0, 500000, 0, -1, 5200000)) as dst:
        dst.write(bands.astype(dtype))
    return path


def test_float_map_with_values_beyond_8_bit_is_refused(tmp_path):
    from mean_nav.geo.raster import read_metric_raster

    bands = np.random.default_rng(0).uniform(0, 255_000, (3, 64, 64))
    path = _write_geotiff(tmp_path / "f32.tif", bands, "float32")
    with pytest.raises(MeanNavError, match=r"f32.tif: map bands are float32 with values .* gdal_translate -ot Byte"):
        read_metric_raster(path, 1.0)


def test_float_map_holding_8_bit_values_is_read_like_the_uint8_one(tmp_path):
    from mean_nav.geo.raster import read_metric_raster

    bands = np.random.default_rng(0).integers(0, 256, (3, 64, 64))
    as_float = read_metric_raster(_write_geotiff(tmp_path / "f.tif", bands, "float32"), 1.0)
    as_bytes = read_metric_raster(_write_geotiff(tmp_path / "b.tif", bands, "uint8"), 1.0)
    assert np.array_equal(as_float.image, as_bytes.image)


def test_map_that_is_a_text_file_is_one_error(tmp_path):
    from mean_nav.replay.runner import MapCoverage

    (tmp_path / "notes.tif").write_text("not a map\n")
    with pytest.raises(MeanNavError, match="notes.tif: cannot read as a GeoTIFF"):
        MapCoverage([tmp_path / "notes.tif"])


def _tiny_flight(root, telemetry_rows: str):
    import cv2

    from mean_nav.nav.camera_model import CameraModel

    (root / "frames").mkdir(parents=True)
    CameraModel.from_fov(64, 48, 70).to_yaml(root / "camera.yaml")
    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    cv2.imwrite(str(root / "frames" / "000000.jpg"), image)
    cv2.imwrite(str(root / "frames" / "000001.png"), image)
    (root / "frames.csv").write_text("frame,time_s\n0,0.0\n1,0.5\n")
    (root / "telemetry.csv").write_text(TELEMETRY_HEADER + telemetry_rows)
    return root


GOOD_TELEMETRY = "0,52,5,60,50,0,0,0\n1,52,5,60,50,0,0,0\n"


@pytest.mark.parametrize("name, keep", [("000000.jpg", 0.6), ("000001.png", 0.6), ("000000.jpg", 0.98)])
def test_truncated_frames_are_refused_whole_with_a_reason(tmp_path, name, keep):
    from mean_nav.replay.flight import Flight

    root = _tiny_flight(tmp_path / "f", GOOD_TELEMETRY)
    path = root / "frames" / name
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    frames = {f.frame_id: f for f in Flight(root).frames()}
    hit, other = frames[int(name[:6])], frames[1 - int(name[:6])]
    assert hit.image is None and "truncated or damaged" in hit.problem and name in hit.problem
    assert other.image is not None and other.problem == ""


def test_replay_refuses_a_flight_with_latitude_200_before_writing_anything(tmp_path, capsys):
    root = _tiny_flight(tmp_path / "f", "0,200,5,60,50,0,0,0\n1,52,5,60,50,0,0,0\n")
    out = tmp_path / "out"
    code = main(["replay", str(root), "--model", str(tmp_path / "m.onnx"), "--cache", str(tmp_path / "c"),
                 "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "telemetry.csv: line 2: lat must be >= -90 deg" in err and "\n" not in err
    assert not out.exists()


class _Payload:
    """Pickles to a call that creates a file: what a hostile checkpoint would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import pathlib

        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_checkpoint_with_a_pickle_payload_is_refused_without_running_it(tmp_path):
    import torch

    from mean_nav.model.checkpoint import load_checkpoint

    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "payload": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(MeanNavError, match="evil.pt"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_approx_index_entry_is_checked_and_its_file_must_be_listed(small_cache, tmp_path):
    from mean_nav.geo.cache import TileCache

    def no_factory(meta):
        meta["approx_index"] = {"file": "approx.faiss"}
    with pytest.raises(MeanNavError, match="required field 'approx_index.factory' is missing"):
        TileCache.load(_edited_cache(small_cache, tmp_path / "a", no_factory))

    def unlisted(meta):
        meta["approx_index"] = {"file": "approx.faiss", "factory": "IVF64,PQ8", "nprobe": 8}
    with pytest.raises(MeanNavError, match="files does not list approx.faiss"):
        TileCache.load(_edited_cache(small_cache, tmp_path / "b", unlisted))


def test_ulog_with_a_damaged_message_size_is_an_error_not_a_hang(tmp_path):
    """pyulog 1.3 seeks back and forth forever when a definition message claims 65535 bytes."""
    import struct

    from mean_nav.bench.fuzz import time_limit
    from mean_nav.replay.logs import read_telemetry_log

    data = bytearray(_shared_log("pyulog_sample_log_small.ulg")[:128 << 10])
    offset = 57870  # a FORMAT ('M') message of the definitions section
    assert struct.unpack("<HB", data[offset:offset + 3]) == (52, ord("M"))
    data[offset:offset + 2] = struct.pack("<H", 0xFFFF)
    path = tmp_path / "damaged.ulg"
    path.write_bytes(bytes(data))
    with time_limit(20), pytest.raises(MeanNavError, match="damaged.ulg: cannot read as a PX4 ULog"):
        read_telemetry_log(path)  # a hang raises fuzz.Hang and fails the test
