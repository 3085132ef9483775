"""`mean-nav bench fuzz`: random mutations of every file a user or a field system hands
the program, counted by outcome.

Loaders: telemetry.csv, frames.csv and flight.yaml (flight folder), camera.yaml, nav.yaml (the daemon
config, seeded from nav.example.yaml), a tile cache's meta.json, and telemetry logs (.tlog,
DataFlash .BIN and PX4 .ulg from ../shared/data/logs, when present). Each case applies one to three
mutations (bit flips, truncation, inserted bytes, deleted or duplicated lines, a token
replaced by a hostile value such as NaN, 10^400, an alias bomb or bad UTF-8, or an edit of
the parsed YAML/JSON tree) to a valid seed file and runs the loader on it. Outcomes:

  clean load    the loader returned, and what it returned is finite and plausible
  clean error   MeanNavError: one message for the user
  bad value     the loader returned a NaN/inf/implausible value (a silent wrong result)
  crash         any other exception (a traceback for the user)
  hang          the loader ran past --timeout-s (SIGALRM), or ran out of --memory-gb

Deterministic for a given --seed. tests/test_fuzz.py runs the same mutators on fewer cases.
Only loader APIs that predate the validation layer are used, so the benchmark also runs on
older commits (to compare before/after).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import random
import re
import resource
import signal
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from ..errors import MeanNavError

OUTCOMES = ("clean load", "clean error", "bad value", "crash", "hang")
SHARED_LOGS = Path(__file__).resolve().parents[3] / "shared" / "data" / "logs"
NAV_EXAMPLE = Path(__file__).resolve().parents[1] / "nav" / "nav.example.yaml"
log_folder = SHARED_LOGS   # where the log seeds come from (--logs)


def _alias_bomb(levels: int = 9) -> str:
    """One YAML flow value that expands to 9**levels items (the billion laughs)."""
    items = ['&a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    names = "abcdefghijklmnop"
    for k in range(1, levels):
        items.append(f"&{names[k]} [" + ", ".join([f"*{names[k - 1]}"] * 9) + "]")
    return "[" + ", ".join(items) + "]"


HOSTILE_TEXT = [
    ".nan", ".inf", "-.inf", "nan", "inf", "-inf", "NaN", "-1", "0", "-0.0", "1e400", "-1e400", "1e-400",
    "1" + "0" * 400, "9" * 5000, "", "null", "~", "[]", "{}", "[1, 2]", "{a: 1}", "abc", "true", "''",
    "&x 1", "*x", "!!python/object/apply:os.system ['true']", "!!binary aGVsbG8=", "'", "{", "- - -", "? x",
    "x" * 100_000, "[" * 300 + "]" * 300, _alias_bomb(), "2020-01-01", "0x1F", "1_000", "+12", "200", "-200",
    "1e30", "4294967296", "9223372036854775808", "\t", "\x00", "é", "\u202e",
]
HOSTILE_BYTES = [b"\xff", b"\xfe\xff", b"\xc3\x28", b"\x80", b"\xed\xa0\x80", b"\x00", b"\r", b"\n\n", b"\xef\xbb\xbf",
                 b"\x1b[2J", b",,,,", b"\"", b":", b"- ", b"*", b"&"]
HOSTILE_VALUES = [None, "abc", "", -1, 0, 1e308, -1e308, math.nan, math.inf, -math.inf, [], {}, [1, 2], {"a": 1},
                  10 ** 30, 10 ** 400, True, False, "x" * 10_000, 1.5, "EPSG:4326", "../../etc/passwd"]
TOKEN = re.compile(rb"-?\d+(\.\d+)?([eE][-+]?\d+)?|[A-Za-z_][A-Za-z0-9_.]*")


# ------------------------------------------------------------------------- mutators

def _flip_bits(data: bytes, rng: random.Random) -> bytes:
    if not data:
        return data
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        k = rng.randrange(len(b))
        b[k] ^= 1 << rng.randrange(8)
    return bytes(b)


def _truncate(data: bytes, rng: random.Random) -> bytes:
    return data[:rng.randrange(len(data) + 1)]


def _insert_bytes(data: bytes, rng: random.Random) -> bytes:
    k = rng.randrange(len(data) + 1)
    junk = rng.choice(HOSTILE_BYTES) if rng.random() < 0.7 else bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    return data[:k] + junk + data[k:]


def _lines(data: bytes) -> list[bytes]:
    return data.split(b"\n")


def _delete_line(data: bytes, rng: random.Random) -> bytes:
    lines = _lines(data)
    del lines[rng.randrange(len(lines))]
    return b"\n".join(lines)


def _duplicate_line(data: bytes, rng: random.Random) -> bytes:
    lines = _lines(data)
    k = rng.randrange(len(lines))
    lines.insert(rng.randrange(len(lines) + 1), lines[k])
    return b"\n".join(lines)


def _replace_token(data: bytes, rng: random.Random) -> bytes:
    tokens = list(TOKEN.finditer(data))
    if not tokens:
        return _insert_bytes(data, rng)
    m = rng.choice(tokens)
    value = rng.choice(HOSTILE_TEXT).encode("utf-8", "surrogatepass")
    return data[:m.start()] + value + data[m.end():]


def _insert_hostile_line(data: bytes, rng: random.Random) -> bytes:
    lines = _lines(data)
    keys = [m.group(1) for m in re.finditer(rb"^\s*([A-Za-z_][A-Za-z0-9_]*):", data, re.M)] or [b"field"]
    key = rng.choice(keys + [b"unknown_key", b"1", b"null", b"fxx", b"dist_coeffs"])
    value = rng.choice(HOSTILE_TEXT).encode("utf-8", "surrogatepass")
    line = key + b": " + value if rng.random() < 0.5 else b",".join([value] * rng.randint(1, 14))
    lines.insert(rng.randrange(len(lines) + 1), line)
    return b"\n".join(lines)


def _tree_paths(node: Any, prefix: tuple = (), out: list | None = None) -> list[tuple]:
    """Paths to the nodes of a parsed document (at most 2,000, at most 12 deep)."""
    out = [] if out is None else out
    out.append(prefix)
    if len(prefix) < 12 and len(out) < 2000:
        if isinstance(node, dict):
            for k, v in list(node.items())[:50]:
                _tree_paths(v, prefix + (k,), out)
        elif isinstance(node, list):
            for i, v in enumerate(node[:50]):
                _tree_paths(v, prefix + (i,), out)
    return out


def _edit_tree(tree: Any, rng: random.Random) -> Any:
    """One edit of a parsed YAML/JSON document: replace, delete or add a node."""
    tree = copy.deepcopy(tree)
    path = rng.choice(_tree_paths(tree))
    if not path:
        return rng.choice(HOSTILE_VALUES) if rng.random() < 0.2 else tree
    parent = tree
    for p in path[:-1]:
        parent = parent[p]
    last = path[-1]
    op = rng.random()
    if op < 0.6:
        parent[last] = copy.deepcopy(rng.choice(HOSTILE_VALUES))
    elif op < 0.8:
        del parent[last]
    elif isinstance(parent, dict):
        parent[rng.choice(["surprise", 1, None, "files", "dim", "grid"])] = copy.deepcopy(rng.choice(HOSTILE_VALUES))
    else:
        parent.append(copy.deepcopy(rng.choice(HOSTILE_VALUES)))
    return tree


def _structured(fmt: str) -> Callable[[bytes, random.Random], bytes]:
    def mutate(data: bytes, rng: random.Random) -> bytes:
        if b"*" in data and b"&" in data:  # aliases (maybe a bomb from an earlier mutation): bytes only
            return _replace_token(data, rng)
        try:
            tree = json.loads(data) if fmt == "json" else yaml.safe_load(data)
            tree = _edit_tree(tree, rng)
            text = json.dumps(tree, allow_nan=True) if fmt == "json" else yaml.safe_dump(tree, allow_unicode=True)
        except Exception:  # an earlier mutation broke the syntax: mutate bytes instead
            return _replace_token(data, rng)
        return text.encode("utf-8", "surrogatepass")
    return mutate


def _zero_run(data: bytes, rng: random.Random) -> bytes:
    if not data:
        return data
    k = rng.randrange(len(data))
    n = rng.randint(1, 256)
    return data[:k] + bytes(min(n, len(data) - k)) + data[k + n:]


def _move_chunk(data: bytes, rng: random.Random) -> bytes:
    if len(data) < 2:
        return data
    a = rng.randrange(len(data))
    b = min(len(data), a + rng.randint(1, 512))
    chunk = data[a:b]
    rest = data[:a] + data[b:]
    k = rng.randrange(len(rest) + 1)
    return rest[:k] + chunk * rng.randint(0, 2) + rest[k:]


TEXT_MUTATORS = [_flip_bits, _truncate, _insert_bytes, _delete_line, _duplicate_line, _replace_token,
                 _replace_token, _insert_hostile_line]
BINARY_MUTATORS = [_flip_bits, _flip_bits, _truncate, _insert_bytes, _zero_run, _move_chunk]


def mutate(data: bytes, rng: random.Random, mutators: list) -> bytes:
    for _ in range(rng.choice((1, 1, 2, 3))):
        data = rng.choice(mutators)(data, rng)
    return data


# -------------------------------------------------------------------------- loaders

def _numbers(obj: Any, where: str = ""):
    """(path, value) of every number inside dataclasses, lists and dicts."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _numbers(getattr(obj, f.name), f"{where}.{f.name}")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{where}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield where, obj


def _non_finite(obj: Any) -> str | None:
    for where, v in _numbers(obj):
        if isinstance(v, int) and abs(v) >= 2 ** 63 or isinstance(v, float) and not math.isfinite(v):
            return f"{where} = {v:.3g}"
    return None


def _check_nav(cfg) -> str | None:
    problem = _non_finite(cfg)
    if problem:
        return problem
    loc = cfg.localizer
    if loc.top_k < 1 or loc.top_k > 10_000 or loc.filter.gate_chi2 <= 0 or loc.fix_floor_m() <= 0:
        return "implausible localizer/filter setting"
    if cfg.max_rate_hz <= 0 or (cfg.initial_lat is not None and abs(cfg.initial_lat) > 90):
        return "implausible rate or prior"
    return None


def _check_camera(cam) -> str | None:
    problem = _non_finite(cam)
    if problem:
        return problem
    if not (cam.width > 0 and cam.height > 0 and cam.fx > 0 and cam.fy > 0):
        return "non-positive size or focal length"
    if len(cam.distortion) not in (4, 5, 8, 12, 14):
        return f"{len(cam.distortion)} distortion coefficients"
    return None


def _check_track(track) -> str | None:
    bounds = {"lat": 90.0, "lon": 180.0}
    for name, series in track.channels.items():
        v = series.values.tolist()
        if not all(math.isfinite(x) for x in v):
            return f"{name} holds non-finite values"
        if name in bounds and any(abs(x) > bounds[name] for x in v):
            return f"{name} out of range"
    return None


def _check_frames(result) -> str | None:
    ids, times = result
    if not all(math.isfinite(t) for t in times.tolist()) or (ids < 0).any():
        return "non-finite time or negative frame id"
    return None


def _check_cache(cache) -> str | None:
    try:
        if not (math.isfinite(cache.gsd_m) and cache.gsd_m > 0 and cache.dim >= 1 and cache.tile_px >= 1):
            return "implausible grid"
        return None
    finally:
        cache.close()


def _telemetry_seed() -> bytes:
    rows = ["time_s,lat,lon,alt_m,rel_alt_m,roll,pitch,yaw,vn,ve,vd,range_m"]
    for i in range(30):
        rows.append(f"{100 + 0.05 * i:.3f},{51.8 + 1e-5 * i:.9f},{4.97 + 2e-5 * i:.9f},{70 + 0.1 * i:.3f},"
                    f"{60 + 0.1 * i:.3f},{0.02 * math.sin(i):.6f},{-0.03:.6f},{1.2 + 0.01 * i:.6f},"
                    f"1.5,3.0,-0.1,{'' if i % 7 == 0 else f'{60 + 0.1 * i:.3f}'}")
    return ("\n".join(rows) + "\n").encode()


def _frames_seed() -> bytes:
    return ("frame,time_s\n" + "".join(f"{i},{100 + 0.5 * i:.6f}\n" for i in range(20))).encode()


def _camera_seed() -> bytes:
    return (b"width: 640\nheight: 480\nfx: 457.1\nfy: 457.9\ncx: 319.5\ncy: 239.5\n"
            b"distortion: [-0.12, 0.03, 0.0005, -0.0002, 0.0]\n"
            b"mount:\n  roll_deg: 0.0\n  pitch_deg: 2.0\n  yaw_deg: 0.0\nrms_reprojection_px: 0.31\n")


FLIGHT_YAML = (b"telemetry_log: flight.tlog\ntime_offset_s: -600.0\nmax_telemetry_gap_s: 1.0\n"
               b"map: [ortho.tif]\ndescription: a test flight\nsimulated: {seed: 3, speed_ms: 8.0}\n")


@dataclass
class Loader:
    name: str
    file_name: str
    seed: Callable[[Path], bytes]           # the file's path -> a valid file's bytes
    load: Callable[[Path], Any]             # path -> loaded object
    check: Callable[[Any], str | None]      # why a loaded object is implausible, or None
    mutators: list

    def path(self, workdir: Path) -> Path:
        return workdir / self.name / self.file_name


def _load_nav(path: Path):
    from ..nav.daemon import load_nav_config
    return load_nav_config(path)


def _load_camera(path: Path):
    from ..nav.camera_model import CameraModel
    return CameraModel.from_yaml(path)


def _load_telemetry(path: Path):
    from ..replay.logs import read_telemetry_csv
    return read_telemetry_csv(path)


def _load_frames(path: Path):
    from ..replay.flight import read_frames_csv
    return read_frames_csv(path)


def _load_flight_yaml(path: Path):
    from ..config import load_config
    from ..replay.flight import FlightConfig
    return load_config(path, FlightConfig)


def _check_flight_yaml(cfg) -> str | None:
    return _non_finite(cfg) or ("non-positive max_telemetry_gap_s" if cfg.max_telemetry_gap_s <= 0 else None)


def _load_log(path: Path):
    from ..replay.logs import read_telemetry_log
    return read_telemetry_log(path)


def _cache_seed(path: Path) -> bytes:
    from .cache import generate_cache

    folder = path.parent
    generate_cache(folder, n=24, dim=8, tile_size_m=60.0, stride_m=20.0, progress=False)
    return (folder / "meta.json").read_bytes()


def _load_cache(path: Path):
    from ..geo.cache import TileCache
    return TileCache.load(path.parent)


def _shared_log(name: str, keep_bytes: int) -> Callable[[Path], bytes]:
    def seed(_path: Path) -> bytes:
        path = log_folder / name
        if not path.is_file():
            raise FileNotFoundError(path)
        return path.read_bytes()[:keep_bytes]   # a prefix: the format table and some records
    return seed


LOADERS = {
    "telemetry_csv": Loader("telemetry_csv", "telemetry.csv", lambda _: _telemetry_seed(), _load_telemetry,
                            _check_track, TEXT_MUTATORS),
    "frames_csv": Loader("frames_csv", "frames.csv", lambda _: _frames_seed(), _load_frames, _check_frames,
                         TEXT_MUTATORS),
    "flight_yaml": Loader("flight_yaml", "flight.yaml", lambda _: FLIGHT_YAML, _load_flight_yaml,
                          _check_flight_yaml, TEXT_MUTATORS + [_structured("yaml")] * 3),
    "camera_yaml": Loader("camera_yaml", "camera.yaml", lambda _: _camera_seed(), _load_camera, _check_camera,
                          TEXT_MUTATORS + [_structured("yaml")] * 3),
    "config_yaml": Loader("config_yaml", "nav.yaml", lambda _: NAV_EXAMPLE.read_bytes(), _load_nav, _check_nav,
                          TEXT_MUTATORS + [_structured("yaml")] * 3),
    "cache_meta": Loader("cache_meta", "cache/meta.json", _cache_seed, _load_cache, _check_cache,
                         TEXT_MUTATORS + [_structured("json")] * 6),
    "tlog": Loader("tlog", "flight.tlog", _shared_log("uavlogviewer_vtol.tlog", 48 << 10), _load_log, _check_track,
                   BINARY_MUTATORS),
    "dataflash_bin": Loader("dataflash_bin", "flight.BIN", _shared_log("pymavlink_test.BIN", 64 << 10), _load_log,
                            _check_track, BINARY_MUTATORS),
    "ulog": Loader("ulog", "flight.ulg", _shared_log("pyulog_sample_log_small.ulg", 128 << 10), _load_log,
                   _check_track, BINARY_MUTATORS),
}


# -------------------------------------------------------------------------- running

class Hang(BaseException):
    """Raised by SIGALRM inside a loader that ran too long (BaseException: loaders catch Exception)."""


@contextlib.contextmanager
def time_limit(seconds: float):
    def on_alarm(signum, frame):
        raise Hang()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Outcome:
    kind: str
    detail: str = ""


@contextlib.contextmanager
def native_output_discarded(enabled: bool):
    """pymavlink's compiled log indexer prints every damaged header from C (fd 2), past
    any Python-level redirect: silence the file descriptors during binary cases."""
    if not enabled:
        yield
        return
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved + [devnull]:
            os.close(fd)


def run_case(loader: Loader, path: Path, data: bytes, timeout_s: float = 10.0) -> Outcome:
    """Write `data` to the loader's file and classify what loading it does."""
    path.write_bytes(data)
    try:
        with native_output_discarded(loader.mutators is BINARY_MUTATORS), time_limit(timeout_s):
            result = loader.load(path)
            problem = loader.check(result)
    except Hang:
        return Outcome("hang", f"over {timeout_s:g} s")
    except MemoryError:
        return Outcome("hang", "out of memory")
    except MeanNavError as exc:
        return Outcome("clean error", str(exc))
    except Exception as exc:
        return Outcome("crash", f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
    return Outcome("bad value", problem) if problem else Outcome("clean load")


def prepare(loader: Loader, workdir: Path) -> tuple[Path, bytes]:
    path = loader.path(workdir)
    path.parent.mkdir(parents=True, exist_ok=True)
    seed = loader.seed(path)
    return path, seed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cases", type=int, default=1000, help="mutations per loader")
    parser.add_argument("--loaders", nargs="*", default=list(LOADERS), choices=list(LOADERS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=10.0, help="a case running longer counts as a hang")
    parser.add_argument("--memory-gb", type=float, default=6.0, help="address-space limit (a blow-up is a hang)")
    parser.add_argument("--show", type=int, default=3, help="examples printed per loader and failing outcome")
    parser.add_argument("--json", type=Path, default=None, help="also write the counts and examples here")
    parser.add_argument("--logs", type=Path, default=SHARED_LOGS, help="folder of the .tlog/.BIN seed logs")


def run(args: argparse.Namespace) -> int:
    import logging

    from tqdm import tqdm

    global log_folder
    log_folder = args.logs
    logging.getLogger("mean_nav").setLevel(logging.ERROR)  # the readers' notes on dropped samples
    limit = int(args.memory_gb * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    counts: dict[str, Counter] = {}
    examples: dict[str, dict[str, list[str]]] = {}
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="mean-nav-fuzz-") as tmp:
        for name in args.loaders:
            loader = LOADERS[name]
            try:
                path, seed = prepare(loader, Path(tmp))
            except FileNotFoundError as exc:
                print(f"{name}: skipped, seed file {exc} is absent")
                continue
            clean = run_case(loader, path, seed, args.timeout_s)
            if clean.kind != "clean load":
                print(f"{name}: the unmutated seed does not load cleanly ({clean.kind}: {clean.detail})")
            rng = random.Random(f"{args.seed}:{name}")
            counts[name] = Counter()
            examples[name] = {}
            started = time.perf_counter()
            for _ in tqdm(range(args.cases), desc=f"fuzz {name}", unit="mutation", leave=False):
                outcome = run_case(loader, path, mutate(seed, rng, loader.mutators), args.timeout_s)
                counts[name][outcome.kind] += 1
                if outcome.kind not in ("clean load", "clean error"):
                    shown = examples[name].setdefault(outcome.kind, [])
                    if len(shown) < args.show:
                        shown.append(outcome.detail)
            seconds[name] = time.perf_counter() - started
    width = max(len(n) for n in counts) if counts else 10
    print(f"\n{'loader':<{width}}  " + "  ".join(f"{o:>11}" for o in OUTCOMES) + "  seconds")
    for name, c in counts.items():
        print(f"{name:<{width}}  " + "  ".join(f"{c[o]:>11}" for o in OUTCOMES) + f"  {seconds[name]:7.1f}")
    total = sum(counts.values(), Counter())
    print(f"{'total':<{width}}  " + "  ".join(f"{total[o]:>11}" for o in OUTCOMES))
    for name, by_kind in examples.items():
        for kind, shown in by_kind.items():
            for detail in shown:
                print(f"  {name} {kind}: {detail}")
    if args.json:
        args.json.write_text(json.dumps({"counts": {n: dict(c) for n, c in counts.items()}, "examples": examples,
                                         "seconds": seconds, "cases": args.cases, "seed": args.seed}, indent=2))
    return 0
