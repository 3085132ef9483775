"""The `mean-nav` command.

Each subcommand lives in its own module exposing `add_arguments(parser)` and
`run(args) -> int`. Modules are imported only when their subcommand runs, so the
flight-computer commands never import torch.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .errors import MeanNavError
from .huge_pages import reexec_with_huge_pages

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("mean_nav.demo", "end-to-end demo: world, model, cache, simulated flight, replay"),
    "model-info": ("mean_nav.model.info", "parameters per module and GMACs of the test-time graph"),
    "train": ("mean_nav.train", "train MEAN from a YAML config (torchrun for several GPUs)"),
    "evaluate": ("mean_nav.evaluate", "University-1652 / SUES-200 retrieval metrics"),
    "export": ("mean_nav.deploy.export", "checkpoint -> ONNX deploy graph, checked against PyTorch"),
    "export-features": ("mean_nav.deploy.export_features", "XFeat + LighterGlue -> ONNX (learned local features), checked against PyTorch"),
    "quantize": ("mean_nav.deploy.quantize", "ONNX -> INT8 (TensorRT Q/DQ and CPU) and FP16 ONNX"),
    "cache": ("mean_nav.geo.cache_cli", "build, inspect and search satellite-tile embedding caches"),
    "calibrate-camera": ("mean_nav.nav.calibrate", "chessboard images -> camera YAML"),
    "run": ("mean_nav.nav.daemon", "onboard daemon: camera -> localizer -> MAVLink"),
    "simulate-flight": ("mean_nav.replay.simulate", "render a flight folder from a GeoTIFF orthophoto"),
    "replay": ("mean_nav.replay.runner", "replay a recorded flight through the localizer and score it"),
    "flight": ("mean_nav.replay.photos", "flight folders: import-photos (geotagged drone photos -> flight folder)"),
    "bench": ("mean_nav.bench", "benchmarks: inference backends, tile cache (mean_nav/bench/)"),
}


def _usage() -> str:
    lines = ["usage: mean-nav <command> [options]", "", "commands:"]
    width = max(map(len, COMMANDS))
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `mean-nav <command> --help` for a command's options."]
    return "\n".join(lines)


# libraries that log their own progress at INFO (font cache scans, GDAL drivers, ...)
THIRD_PARTY_LOGGERS = ("matplotlib", "PIL", "rasterio", "fiona", "urllib3", "onnx", "onnxruntime", "torch",
                       "numexpr", "h5py", "asyncio", "faiss")


def configure_logging(verbose: bool = False, quiet: bool = False) -> None:
    """mean-nav's own messages at INFO (DEBUG with -v, WARNING with -q); everyone else's at
    WARNING, so a run shows the user's progress and nothing from the libraries' internals."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("mean_nav").setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # a real command line (not a call from Python): start over on huge pages where that helps
        reexec_with_huge_pages()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"mean-nav {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mean-nav: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"mean-nav {name}", description=help_)
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument("-v", "--verbose", action="store_true", help="debug messages from mean-nav")
    loudness.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors (progress bars stay)")
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    configure_logging(args.verbose, args.quiet)
    try:
        return int(module.run(args) or 0)
    except MeanNavError as exc:
        print(f"mean-nav {name}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"mean-nav {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
