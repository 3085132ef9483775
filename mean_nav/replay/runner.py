"""`mean-nav replay`: run the localizer loop on a recorded flight and score it.

The loop is the onboard one (frame + telemetry -> Localizer.process -> Estimate) on the
flight's own clock, so two replays give the same estimates. GNSS from the flight reaches
the localizer at most once, as the initial prior (`--prior gnss`); every Telemetry handed
to the localizer has lat/lon set to nan. Outputs, in --out:

  estimates.csv   one row per frame, written and flushed as it is computed, so a replay that
                  stops (error, Ctrl-C) keeps every finished row and still gets its summary; a
                  killed process leaves `estimates.csv.partial` with the same rows
  summary.json    error median/p95/max, fix rate, false-fix rate, 68 % coverage, time to
                  first fix, latency, fixes outside the map, problems met, the most common
                  no-fix reasons, settings that cannot serve the frame spacing (see report.py)
  track.png, error.png
  gps_input.tlog  optional (--tlog): the GPS_INPUT messages the daemon would have sent
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
import math
import os
import time
from collections import Counter
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import MeanNavError
from ..nav.estimate import Estimate, FixQuality
from ..nav.telemetry import Telemetry
from .flight import Flight
from .report import horizontal_error_m, write_report

log = logging.getLogger(__name__)

ESTIMATE_FIELDS = [f.name for f in dataclasses.fields(Estimate)]
CSV_FIELDS = ["frame", "processed"] + ESTIMATE_FIELDS + ["truth_lat", "truth_lon", "error_m", "in_map"]
# latency_s is the only column that depends on the machine; everything else is deterministic.


class LocalizerLike(Protocol):
    def process(self, frame_rgb: np.ndarray, telemetry: Telemetry, frame_time_s: float) -> Estimate: ...


class MapCoverage:
    """Whether a lat/lon is over valid map pixels (and the map for plotting)."""

    def __init__(self, map_paths: list[Path], max_side_px: int = 1000):
        from ..geo.raster import read_metric_raster, union_bounds, area_crs

        crs = area_crs(map_paths)
        left, bottom, right, top = union_bounds(map_paths, crs)
        gsd = max(0.25, max(right - left, top - bottom) / max_side_px)
        self.raster = read_metric_raster(map_paths, gsd, crs=crs)

    def contains(self, lat: float, lon: float) -> float:
        """1.0 over the map, 0.0 off it, nan when the truth is unknown."""
        from ..geo.crs import from_lonlat

        if not (math.isfinite(lat) and math.isfinite(lon)):
            return math.nan
        x, y = from_lonlat(self.raster.crs, lon, lat)
        col, row = self.raster.xy_to_pixel(x, y)
        c, r = int(round(float(col))), int(round(float(row)))
        h, w = self.raster.shape
        return float(0 <= r < h and 0 <= c < w and bool(self.raster.valid[r, c]))


# Frame clocks that are not Unix time (boot clocks, simulations) are placed at this epoch
# for the tlog and the GPS week fields, so the log opens in any MAVLink tool.
REPLAY_EPOCH_UNIX_S = 1_700_000_000.0


def replay_unix_time(time_s: float) -> float:
    return time_s if time_s > 1e9 else REPLAY_EPOCH_UNIX_S + time_s


class _TlogConnection:
    """Stands in for a mavutil connection: every packet goes to a .tlog with its timestamp."""

    def __init__(self, file, system_id: int, component_id: int):
        from pymavlink.dialects.v20 import common as mavlink

        self.file = file
        self.stamp_us = 0
        self.packets = 0
        self.mav = mavlink.MAVLink(self, srcSystem=system_id, srcComponent=component_id)

    def write(self, buf: bytes) -> None:
        self.file.write(self.stamp_us.to_bytes(8, "big") + bytes(buf))
        self.packets += 1

    def close(self) -> None:
        pass


class TlogWriter:
    """Writes what the daemon would have sent for each estimate, encoded by the daemon's own
    MAVLink link (mean_nav.nav.mavlink_io.MavlinkLink: GPS_INPUT policy, 50 ms limit,
    fix_type 0 without a fix), into a MAVLink telemetry log (.tlog: 8-byte big-endian
    Unix microseconds + packet)."""

    def __init__(self, path: Path, output: str = "gps_input", system_id: int = 1):
        from ..nav.mavlink_io import MavlinkConfig, MavlinkLink

        self.path = path
        self.tmp = path.with_suffix(path.suffix + ".partial")
        self.file = self.tmp.open("wb")
        conn = _TlogConnection(self.file, system_id, 191)
        self.conn = conn

        class ReplayLink(MavlinkLink):
            def _connect(self) -> None:  # no socket: packets go to the tlog
                self._conn = conn

        self.link = ReplayLink(MavlinkConfig(connection="tlog", system_id=system_id, output=output))

    @property
    def count(self) -> int:
        return self.conn.packets

    def write(self, estimate: Estimate) -> None:
        unix_s = replay_unix_time(estimate.time_s)
        self.conn.stamp_us = int(round(unix_s * 1e6))
        self.link.send_estimate(estimate, capture_unix_s=unix_s, now=estimate.time_s)

    def close(self) -> None:
        self.file.close()
        os.replace(self.tmp, self.path)


def without_gnss(tel: Telemetry) -> Telemetry:
    """The telemetry the localizer may see: GNSS removed."""
    return dataclasses.replace(tel, lat=math.nan, lon=math.nan)


def replay(flight: Flight, localizer: LocalizerLike, out_dir: Path, coverage: MapCoverage | None = None,
           tlog: bool = False, start: int = 0,
           stop: int | None = None, progress: bool = True, extra_summary: dict | None = None) -> dict:
    """Run `localizer` over the flight's frames, write the outputs, return the summary."""
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    settings_warnings = frame_spacing_warnings(flight, localizer, start, stop)
    for warning in settings_warnings:
        log.warning("settings: %s", warning)
    csv_path = out_dir / "estimates.csv"
    partial = out_dir / "estimates.csv.partial"
    tlog = TlogWriter(out_dir / "gps_input.tlog") if tlog else None
    problems: Counter[str] = Counter()
    no_fix_reasons: Counter[str] = Counter()
    first_problems: list[str] = []
    stopped = ""
    n = (len(flight) if stop is None else min(stop, len(flight))) - start
    fixes = 0
    errors: list[float] = []
    with partial.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, CSV_FIELDS)
        writer.writeheader()
        f.flush()
        bar = tqdm(flight.frames(start, stop), total=n, desc="replay", unit="frame", disable=not progress)
        try:
            for frame in bar:
                truth_lat = truth_lon = math.nan
                if frame.telemetry is not None:
                    truth_lat, truth_lon = frame.telemetry.lat, frame.telemetry.lon
                else:  # a gap in attitude may still leave GNSS for scoring
                    truth_lat = float(flight.telemetry.column("lat", [frame.time_s])[0])
                    truth_lon = float(flight.telemetry.column("lon", [frame.time_s])[0])
                in_map = coverage.contains(truth_lat, truth_lon) if coverage else math.nan
                if frame.problem or frame.image is None or frame.telemetry is None:
                    reason = frame.problem or "no image or telemetry"
                    problems[problem_kind(reason)] += 1
                    if len(first_problems) < 10:
                        first_problems.append(f"frame {frame.frame_id}: {reason}")
                    est = Estimate(time_s=frame.time_s, fix=FixQuality.NONE, reason=reason)
                    processed = 0
                    if "video ended" in reason:
                        stopped = reason
                else:
                    t0 = time.perf_counter()
                    est = localizer.process(frame.image, without_gnss(frame.telemetry), frame.time_s)
                    est.latency_s = time.perf_counter() - t0
                    processed = 1
                err = float(horizontal_error_m([est.lat], [est.lon], [truth_lat], [truth_lon])[0])
                row = est.to_row()
                row.update(frame=frame.frame_id, processed=processed, truth_lat=truth_lat, truth_lon=truth_lon,
                           error_m=err, in_map=in_map)
                writer.writerow({k: _fmt(row[k]) for k in CSV_FIELDS})
                f.flush()
                if tlog is not None:
                    tlog.write(est)
                if not est.has_fix and est.reason:
                    no_fix_reasons[reason_kind(est.reason)] += 1
                if est.has_fix:
                    fixes += 1
                    if math.isfinite(err):
                        errors.append(err)
                bar.set_postfix(fixes=fixes, median_err=f"{np.median(errors):.1f}m" if errors else "-", refresh=False)
        except BaseException as exc:
            stopped = stopped or f"replay stopped: {type(exc).__name__}: {exc}"
            raise
        finally:
            bar.close()
            f.flush()
            os.replace(partial, csv_path)
            if tlog is not None:
                tlog.close()
            extra = dict(extra_summary or {})
            extra.update(problems=dict(problems), first_problems=first_problems, stopped_early=stopped or None,
                         no_fix_reasons=dict(no_fix_reasons.most_common(8)), settings_warnings=settings_warnings,
                         telemetry_source=flight.telemetry.source, telemetry_notes=list(flight.telemetry.notes),
                         gps_input_messages=tlog.count if tlog else None)
            summary = write_report(csv_path, out_dir, coverage.raster if coverage else None, extra)
    return summary


def frame_spacing_warnings(flight: Flight, localizer, start: int = 0, stop: int | None = None) -> list[str]:
    """What the localizer's settings cannot serve at this flight's median frame spacing,
    known before the first frame instead of discovered frame by frame."""
    check = getattr(localizer, "frame_spacing_problems", None)
    times = np.asarray(flight.frame_times, float)[start:stop]
    steps = np.diff(times[np.isfinite(times)])
    steps = steps[steps > 0]
    if check is None or not steps.size:
        return []
    return list(check(float(np.median(steps))))


def reason_kind(reason: str) -> str:
    """A no-fix reason without its numbers and per-candidate details, for counting."""
    head = reason.split(";")[0].split("(")[0].strip()
    return "".join(ch for ch in head if not ch.isdigit() and ch not in ".%+-").replace("  ", " ").strip()


def problem_kind(reason: str) -> str:
    """Group per-frame problems for the summary."""
    for key, kind in (("video ended", "video ended early"), ("gap", "telemetry gap"),
                      ("no telemetry", "no telemetry at frame time"), ("is missing", "frame image missing"),
                      ("truncated or damaged", "frame image damaged"), ("cannot decode", "frame image damaged")):
        if key in reason:
            return kind
    return reason


def _fmt(v):
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return f"{v:.9f}".rstrip("0").rstrip(".") if abs(v) < 1e6 else repr(v)
    return v


# --- command line ----------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("flight", type=Path, help="flight folder (camera.yaml, frames, telemetry)")
    parser.add_argument("--model", type=Path, required=True, help="embedder: .onnx, .engine or checkpoint")
    parser.add_argument("--cache", type=Path, required=True, help="tile cache folder built with the same model")
    parser.add_argument("--config", type=Path, default=None, help="localizer YAML (LocalizerConfig); defaults otherwise")
    parser.add_argument("-o", "--out", type=Path, default=None, help="output folder (default: FLIGHT/replay)")
    parser.add_argument("--map", type=Path, nargs="*", default=None,
                        help="orthophoto(s) for the plots and in-map scoring (default: flight.yaml map)")
    parser.add_argument("--prior", choices=("gnss", "none"), default="gnss",
                        help="initial position prior: first GNSS fix of the log, or none (global search)")
    parser.add_argument("--tlog", action="store_true", help="also write gps_input.tlog of the GPS_INPUT it would send")
    parser.add_argument("--backend", default="auto", help="embedder backend: auto, onnxruntime, tensorrt, torch")
    parser.add_argument("--threads", type=int, default=2, help="inference threads")
    parser.add_argument("--frames", type=str, default=None, metavar="START:STOP", help="replay only these frame rows")
    parser.add_argument("--require-fixes", action="store_true",
                        help="exit with status 1 unless the replay has fixes and GNSS truth to score them against")


def build_localizer(model: Path, cache: Path, camera, config: Path | None, initial_lonlat,
                    backend: str = "auto", threads: int = 2):
    """Embedder + tile cache + camera -> E's Localizer, the same objects the daemon builds."""
    from ..config import load_config
    from ..deploy.backends import load_embedder
    from ..geo.cache import TileCache
    from ..nav.localizer import Localizer, LocalizerConfig

    embedder = load_embedder(model, backend=backend, threads=threads, spin=False)
    tile_cache = TileCache.load(cache)
    from ..nav.features.xfeat import models_relative_to

    cfg = models_relative_to(load_config(config, LocalizerConfig), Path(config).parent) if config else LocalizerConfig()
    return Localizer(embedder, tile_cache, camera, cfg, initial_lonlat=initial_lonlat)


def initial_prior(flight: Flight) -> tuple[float, float] | None:
    """(lon, lat) of the first GNSS sample at or after the first frame."""
    lat = flight.telemetry.column("lat", flight.frame_times)
    lon = flight.telemetry.column("lon", flight.frame_times)
    ok = np.flatnonzero(np.isfinite(lat) & np.isfinite(lon))
    return (float(lon[ok[0]]), float(lat[ok[0]])) if ok.size else None


def parse_frames(spec: str | None, n: int) -> tuple[int, int | None]:
    if not spec:
        return 0, None
    try:
        a, _, b = spec.partition(":")
        return int(a or 0), (int(b) if b else None)
    except ValueError:
        raise MeanNavError(f"--frames {spec!r}: expected START:STOP row numbers, e.g. 0:100") from None


def run(args) -> int:
    flight = Flight(args.flight)
    out = args.out or (args.flight / "replay")
    map_paths = list(args.map) if args.map else flight.map_paths
    missing = [p for p in map_paths if not Path(p).is_file()]
    if missing:
        log.warning("map %s not found: no background and no in-map scoring", missing[0])
        map_paths = []
    coverage = MapCoverage(map_paths) if map_paths else None
    prior = initial_prior(flight) if args.prior == "gnss" else None
    localizer = build_localizer(args.model, args.cache, flight.camera, args.config, prior,
                                args.backend, args.threads)
    start, stop = parse_frames(args.frames, len(flight))
    summary = replay(flight, localizer, out, coverage, args.tlog, start, stop,
                     extra_summary={"flight": str(args.flight), "model": str(args.model), "cache": str(args.cache),
                                    "prior": args.prior})
    print_summary(summary, out)
    if getattr(args, "require_fixes", False):
        missing = scoring_gaps(summary)
        if missing:
            raise MeanNavError(f"{args.flight}: --require-fixes: {'; '.join(missing)} (see {out}/estimates.csv)")
    return 0


def scoring_gaps(s: dict) -> list[str]:
    """Why this replay cannot be scored (empty: it can)."""
    gaps = []
    if not s.get("fixes"):
        gaps.append(f"no fix in {s.get('frames', 0)} frames")
    if not s.get("truth_frames"):
        gaps.append("the flight has no GNSS truth to score against")
    return gaps


def print_summary(s: dict, out: Path) -> None:
    def num(v, fmt="{:.2f}"):
        return "n/a" if v is None else fmt.format(v)

    e = s.get("error_m", {})
    for warning in s.get("settings_warnings") or []:
        print(f"settings: {warning}")
    print(f"frames {s['frames']} (processed {s.get('frames_processed')}), fixes {s.get('fixes')}")
    if not s.get("fixes"):
        reasons = s.get("no_fix_reasons") or {}
        top = "; ".join(f"{k} ({v} frames)" for k, v in list(reasons.items())[:3]) or "see estimates.csv"
        print(f"NO FIX in {s['frames']} frames: nothing to score. Most common reasons: {top}")
    elif not s.get("truth_frames"):
        print("NO GNSS truth in this flight: errors, fix rate over the map, false fixes and coverage are not "
              f"scored ({s.get('fixes')} fixes made)")
    else:
        print(f"horizontal error: median {num(e.get('median'))} m, p95 {num(e.get('p95'))} m, "
              f"max {num(e.get('max'))} m")
        print(f"fix rate {num(s.get('fix_rate'), '{:.1%}')}, false-fix rate {num(s.get('false_fix_rate'), '{:.2%}')}, "
              f"68% radius holds {num(s.get('coverage_68'), '{:.0%}')} of the errors, "
              f"time to first fix {num(s.get('time_to_first_fix_s'), '{:.1f}')} s")
    lat = s.get("latency_s", {})
    print(f"latency median {num(lat.get('median'), '{:.3f}')} s, p95 {num(lat.get('p95'), '{:.3f}')} s "
          f"({num(s.get('frames_per_s'), '{:.1f}')} frames/s); fixes outside map: "
          f"{num(s.get('fixes_outside_map'), '{}')}")
    if s.get("problems"):
        print(f"problems: {s['problems']}")
    if s.get("stopped_early"):
        print(f"stopped early: {s['stopped_early']}")
    print(f"report: {out}/summary.json, {out}/track.png, {out}/error.png")
