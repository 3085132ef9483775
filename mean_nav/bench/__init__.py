"""`mean-nav bench <what>`: every benchmark of the project, one module per subject.

Each module here exposes `add_arguments(parser)` and `run(args) -> int` and is imported
only when its benchmark runs (the flight computer never imports torch for `bench cache`).
Benchmarks print numbers measured side by side in one run; they are not timed tests.
"""
from __future__ import annotations

import argparse
import importlib

# name -> (module, one-line help). Add a benchmark by adding its module and a line here.
BENCHMARKS: dict[str, tuple[str, str]] = {
    "backends": ("mean_nav.bench.backends", "latency, throughput and GEMM efficiency per backend and precision"),
    "cache": ("mean_nav.bench.cache", "tile cache build and search benchmark"),
    "features": ("mean_nav.bench.features", "local features (SIFT, ORB, XFeat+MNN, XFeat+LighterGlue): quality and speed"),
    "field": ("mean_nav.bench.field", "field stress suite: simulated flights that break localizers, one table"),
    "fuzz": ("mean_nav.bench.fuzz", "random mutations of every input file, counted by outcome (crash, hang...)"),
    "mutation": ("mean_nav.bench.mutation", "mutation testing: kill rate of the tests on the safety-critical modules"),
    "ray": ("mean_nav.bench.ray", "cache build on a local Ray cluster (1 and N workers) against the local build"),
    "localizer": ("mean_nav.bench.localizer", "per-stage and capture-to-send latency, stored vs in-flight map features"),
}


def print_and_save_json(results: dict, json_path=None) -> None:
    """Print a benchmark's results as JSON and, when asked, write them to a file (atomically)."""
    import json
    import os
    from pathlib import Path

    text = json.dumps(results, indent=2)
    print(text)
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text + "\n", encoding="utf-8")
        os.replace(tmp, path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True, metavar="{" + ",".join(BENCHMARKS) + "}")
    for name, (module_name, help_) in BENCHMARKS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        importlib.import_module(module_name).add_arguments(p)


def run(args: argparse.Namespace) -> int:
    module_name, _ = BENCHMARKS[args.bench]
    return int(importlib.import_module(module_name).run(args) or 0)
