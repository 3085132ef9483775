#!/usr/bin/env python3
"""Build a TensorRT engine for a MEAN deploy ONNX on the target device (TensorRT 10.3 .. 11).

    python3 engines/build_engine.py runs/export/model.int8-qdq.onnx --max-batch 8

ONNX (FP32, FP16 or Q/DQ INT8, from `mean-nav export` / `mean-nav quantize`) -> a
serialized engine `<model_hash>.<onnx_sha256[:12]>.trt<ver>.<gpu>.<precision>.engine` plus
its sidecar JSON (model hash, source ONNX sha256, preprocessing, TensorRT version, GPU,
compute capability, precision, input shape, sha256 of the engine). Precision comes from the ONNX itself: the network is built
strongly typed (the only mode TensorRT 11 has), so FP16/INT8 are whatever the graph's
types and Q/DQ nodes say; no builder precision flags, no calibrator.

The new engine is checked against onnxruntime on sample images (cosine >= 0.99 per
descriptor) and its latency printed; a failing engine is deleted. The equivalent
`trtexec` command is printed too (saving to `<engine>.trtexec.engine`, so running it
never replaces the checked engine). Without TensorRT or a CUDA device this stops with
a clear message. Importable: `build_engine(onnx_path, ...) -> BuildResult`.

The learned local features (`xfeat.onnx`, `lighterglue.onnx` from `mean-nav export-features`)
build the same way, FP16 (converted here; `build_feature_engine`):

    python3 engines/build_engine.py models/xfeat.onnx --keypoints 1024 --max-image-px 1024
    python3 engines/build_engine.py models/lighterglue.onnx --max-points 2048

named `<kind>-<weights sha256[:12]>[-k<K>].<onnx_sha256[:12]>.trt<ver>.<gpu>.fp16.engine`
with a JSON sidecar, and kept only when keypoints, descriptors and matches agree with
onnxruntime FP32 on image pairs (mean_nav/deploy/feature_engines.py). The localizer runs on
them through `refine.feature_backend` (mean_nav/deploy/feature_backends.py).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

try:
    from mean_nav.errors import MeanNavError
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mean_nav.errors import MeanNavError

from mean_nav.deploy.backends import OnnxRuntimeEmbedder, read_onnx_info
from mean_nav.deploy.images import cosine_per_row, load_images
from mean_nav.deploy.tensorrt_backend import (EngineSidecar, TensorRTEmbedder, engine_file_name, import_tensorrt,
                                              open_cuda, sanitize_gpu_name, sha256_file, sidecar_path)

log = logging.getLogger("build_engine")

ENGINE_MIN_COSINE = 0.99


@dataclass
class BuildResult:
    engine: Path
    sidecar: Path
    min_cosine: float
    mean_cosine: float
    latency_ms_p50: float
    trtexec: str
    build_seconds: float


def input_shapes(info, max_batch: int, opt_batch: int) -> tuple[tuple, tuple, tuple]:
    """(min, opt, max) shapes of the image input for batch 1..max_batch."""
    s = info.preprocessing.img_size
    per_image = (s, s, 3) if info.input_layout == "uint8_nhwc" else (3, s, s)
    return (1, *per_image), (opt_batch, *per_image), (max_batch, *per_image)


def trtexec_engine_path(engine_path: Path) -> Path:
    """Where the printed trtexec line saves: beside the checked engine, never over it."""
    return engine_path.with_name(engine_path.name[:-len(".engine")] + ".trtexec.engine")


def trtexec_command(onnx_path: Path, engine_path: Path, input_name: str, shapes, workspace_mib: int,
                    timing_cache: Path | None) -> str:
    """The trtexec line building the same engine as `build_engine` (saved to `trtexec_engine_path`)."""
    fmt = lambda shape: "x".join(str(v) for v in shape)  # noqa: E731
    cmd = [
        "trtexec", f"--onnx={onnx_path}", "--stronglyTyped",
        f"--minShapes={input_name}:{fmt(shapes[0])}", f"--optShapes={input_name}:{fmt(shapes[1])}",
        f"--maxShapes={input_name}:{fmt(shapes[2])}", f"--memPoolSize=workspace:{workspace_mib}M",
        f"--saveEngine={trtexec_engine_path(engine_path)}",
    ]
    if timing_cache:
        cmd.append(f"--timingCacheFile={timing_cache}")
    return " ".join(cmd)


def parse_failure_hint(onnx_path: Path, info) -> str:
    """What to do when TensorRT's ONNX parser refuses a MEAN deploy graph."""
    if info.precision == "int8-qdq":
        try:
            from mean_nav.deploy.quantize import explicit_quantization_problems

            problems = explicit_quantization_problems(onnx_path)
        except ImportError:  # no onnx on the device: the rules cannot be read here
            problems = []
        if problems:
            return ("the Q/DQ graph breaks TensorRT's explicit-quantization rules: " + "; ".join(problems[:3])
                    + "; re-quantize it with this mean-nav (`mean-nav quantize`)")
        return "re-quantize with `mean-nav quantize` from the FP32 export, or build the FP16/FP32 ONNX"
    return "re-export with `mean-nav export` (opset 17), or report the TensorRT version and the parser error"


def _timing_cache(config, path: Path):
    """The builder's timing cache, from `path` when TensorRT accepts it, else a fresh one.

    A cache from another TensorRT/GPU or a damaged file is rejected (set_timing_cache
    returns False); the build then starts from an empty cache instead of failing after it.
    """
    data = path.read_bytes() if path.is_file() else b""
    try:
        cache = config.create_timing_cache(data) if data else None
    except Exception:  # some versions raise on bytes they cannot read rather than returning None
        cache = None
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return cache
    if data:
        log.warning("%s: TensorRT rejected this timing cache (another TensorRT version or GPU, or damaged); "
                    "building with a fresh one that replaces it", path)
    cache = config.create_timing_cache(b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def _save_timing_cache(config, path: Path) -> None:
    cache = config.get_timing_cache()
    if cache is None:       # nothing to keep: never worth failing a finished build over
        log.warning("TensorRT returned no timing cache; %s not updated", path)
        return
    _write_atomic(path, bytes(cache.serialize()))


def _device_and_paths(out_dir, timing_cache):
    """(tensorrt module, GPU name, compute capability, output folder, timing cache path); MeanNavError
    without TensorRT or a CUDA device."""
    trt = import_tensorrt()
    cuda = open_cuda()
    try:
        gpu, cc = cuda.device_info()
    finally:
        cuda.close()
    out_dir = Path(out_dir) if out_dir else Path(__file__).resolve().parent
    out_dir.mkdir(parents=True, exist_ok=True)
    timing_cache = Path(timing_cache) if timing_cache else out_dir / f"trt{trt.__version__}.{sanitize_gpu_name(gpu)}.timing_cache"
    return trt, gpu, cc, out_dir, timing_cache


def _parse(trt, path: Path, source: Path, hint):
    """(builder, network, parser) of a strongly typed network parsed from `path`; MeanNavError naming
    `source` with hint() when TensorRT cannot parse it."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_strongly_typed_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise MeanNavError(f"{source}: TensorRT cannot parse the ONNX ({errors}); {hint()}")
    return builder, network, parser


def _build_serialized(builder, network, config, timing_cache: Path, onnx_path: Path, try_instead: str):
    """(serialized engine, seconds it took); the timing cache saved. MeanNavError when the build fails."""
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if serialized is None:
        raise MeanNavError(f"{onnx_path}: TensorRT engine build failed (see the log above); try a larger {try_instead}")
    _save_timing_cache(config, timing_cache)
    return serialized, seconds


def _strongly_typed_flags(trt) -> int:
    flags = 0
    for name in ("STRONGLY_TYPED",):  # required on 10.x for Q/DQ + FP16 graphs, the default on 11.x
        flag = getattr(trt.NetworkDefinitionCreationFlag, name, None)
        if flag is not None:
            flags |= 1 << int(flag)
    return flags


def build_engine(onnx_path: str | Path, out_dir: str | Path | None = None, max_batch: int = 8,
                 opt_batch: int | None = None, workspace_mib: int = 1024, timing_cache: str | Path | None = None,
                 images: str | None = None, check_count: int = 16, verify: bool = True,
                 min_cosine: float = ENGINE_MIN_COSINE) -> BuildResult:
    onnx_path = Path(onnx_path)
    info = read_onnx_info(onnx_path)  # refuses files without mean_nav metadata
    if info.precision == "int8-cpu":
        raise MeanNavError(f"{onnx_path}: the int8-cpu variant uses onnxruntime CPU operators TensorRT cannot build; "
                           "use the .int8-qdq.onnx file for TensorRT")
    if max_batch < 1:
        raise MeanNavError("--max-batch must be at least 1")
    opt_batch = min(opt_batch or max_batch, max_batch)
    trt, gpu, cc, out_dir, timing_cache = _device_and_paths(out_dir, timing_cache)
    onnx_sha256 = sha256_file(onnx_path)
    engine_path = out_dir / engine_file_name(info.model_hash, onnx_sha256, trt.__version__, gpu, info.precision)

    builder, network, parser = _parse(trt, onnx_path, onnx_path, lambda: parse_failure_hint(onnx_path, info))
    if network.num_inputs != 1:
        raise MeanNavError(f"{onnx_path}: expected one image input, found {network.num_inputs}")
    input_name = network.get_input(0).name
    shapes = input_shapes(info, max_batch, opt_batch)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    _timing_cache(config, timing_cache)
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, *shapes)
    config.add_optimization_profile(profile)

    print(f"building {engine_path.name} from {onnx_path} ({info.precision}, batch 1..{max_batch}, "
          f"TensorRT {trt.__version__}, {gpu} sm{cc}) ...", flush=True)
    serialized, build_seconds = _build_serialized(builder, network, config, timing_cache, onnx_path,
                                                  "--workspace-mib or the FP32/FP16 ONNX")

    # engine and sidecar appear together and only after the check passes
    tmp_dir = Path(tempfile.mkdtemp(dir=out_dir, prefix=".build-"))
    try:
        tmp_engine = tmp_dir / engine_path.name
        tmp_engine.write_bytes(bytes(serialized))
        sidecar = EngineSidecar(
            model_hash=info.model_hash, backbone=info.backbone, embed_dim=info.embed_dim,
            preprocessing=info.preprocessing.to_json(), precision=info.precision, input_layout=info.input_layout,
            tensorrt_version=trt.__version__, gpu_name=gpu, compute_capability=cc, input_name=input_name,
            input_shape=list(shapes[1]), max_batch=max_batch, engine_sha256=sha256_file(tmp_engine),
            source_onnx=str(onnx_path), source_onnx_sha256=onnx_sha256,
            built_utc=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        sidecar.save(sidecar_path(tmp_engine))
        cos_min = cos_mean = float("nan")
        latency = float("nan")
        if verify:
            sample = load_images(images, check_count, info.preprocessing.img_size, seed=7)
            reference = OnnxRuntimeEmbedder(onnx_path, providers=["CPUExecutionProvider"]).embed(sample)
            emb = TensorRTEmbedder(tmp_engine, expect=info, source_onnx_sha256=onnx_sha256)
            try:
                got = emb.embed(sample, batch_size=max_batch)
                cos = cosine_per_row(reference, got)
                cos_min, cos_mean = float(cos.min()), float(cos.mean())
                latency = _latency_ms(emb)
            finally:
                emb.close()
            if cos_min < min_cosine:
                raise MeanNavError(f"{engine_path.name}: engine disagrees with onnxruntime (cosine min {cos_min:.4f} < "
                                   f"{min_cosine}); not kept. Try the FP16 or FP32 ONNX")
        _publish(tmp_engine, engine_path)
    finally:
        for p in tmp_dir.iterdir():
            p.unlink()
        tmp_dir.rmdir()
    return BuildResult(engine_path, sidecar_path(engine_path), cos_min, cos_mean, latency,
                       trtexec_command(onnx_path, engine_path, input_name, shapes, workspace_mib, timing_cache),
                       build_seconds)


@dataclass
class FeatureBuildResult:
    engine: Path
    sidecar: Path
    check: str
    latency_ms_p50: float
    build_seconds: float


def _feature_profile(kind: str, keypoints: int, opt_image_px: int, max_image_px: int, opt_points: int,
                     max_points: int) -> dict[str, tuple[tuple, tuple, tuple]]:
    """(min, opt, max) shape per input of a feature graph."""
    if kind == "xfeat":
        # a fixed K needs at least K pixels; sides are multiples of 32
        side = max(64, -(-int(np.ceil(np.sqrt(keypoints))) // 32) * 32)
        if not side <= opt_image_px <= max_image_px:
            raise MeanNavError(f"--opt-image-px / --max-image-px: need {side} <= opt <= max for {keypoints} keypoints")
        return {"image": ((1, 1, side, side), (1, 1, opt_image_px, opt_image_px), (1, 1, max_image_px, max_image_px))}
    if not 1 <= opt_points <= max_points:
        raise MeanNavError("--opt-points / --max-points: need 1 <= opt <= max")
    shapes = {}
    for i in "01":
        shapes[f"keypoints{i}"] = ((1, 1, 2), (1, opt_points, 2), (1, max_points, 2))
        shapes[f"descriptors{i}"] = ((1, 1, 64), (1, opt_points, 64), (1, max_points, 64))
        shapes[f"size{i}"] = ((1, 2), (1, 2), (1, 2))
    return shapes


def build_feature_engine(onnx_path: str | Path, out_dir: str | Path | None = None, keypoints: int = 1024,
                         opt_image_px: int = 512, max_image_px: int = 1024, opt_points: int = 1024,
                         max_points: int = 2048, workspace_mib: int = 1024, timing_cache: str | Path | None = None,
                         images: str | None = None, check_count: int = 4, verify: bool = True) -> FeatureBuildResult:
    """An FP16 engine of xfeat.onnx or lighterglue.onnx, checked against onnxruntime FP32."""
    import json

    from mean_nav.deploy.export_features import check_pairs
    from mean_nav.deploy.feature_engines import (FeatureEngine, compare_features, engine_key, feature_kind,
                                                 onnxruntime_runner, prepare_fp16)

    onnx_path = Path(onnx_path)
    kind = feature_kind(onnx_path)
    if kind not in ("xfeat", "lighterglue"):
        raise MeanNavError(f"{onnx_path}: not an XFeat or LighterGlue graph from `mean-nav export-features`")
    shapes = _feature_profile(kind, keypoints, opt_image_px, max_image_px, opt_points, max_points)
    xfeat_onnx = onnx_path if kind == "xfeat" else onnx_path.with_name("xfeat.onnx")
    if verify and not xfeat_onnx.is_file():
        raise MeanNavError(f"{xfeat_onnx}: the check of a LighterGlue engine matches XFeat keypoints; keep the "
                           "export's xfeat.onnx beside it (or pass --no-verify)")
    trt, gpu, cc, out_dir, timing_cache = _device_and_paths(out_dir, timing_cache)
    onnx_sha256 = sha256_file(onnx_path)
    tmp_dir = Path(tempfile.mkdtemp(dir=out_dir, prefix=".build-"))
    try:
        prepared = tmp_dir / f"{kind}.fp16.onnx"
        meta = prepare_fp16(onnx_path, prepared, keypoints if kind == "xfeat" else None)
        engine_path = out_dir / engine_file_name(engine_key(meta), onnx_sha256, trt.__version__, gpu, "fp16")
        builder, network, parser = _parse(trt, prepared, onnx_path, lambda: "report the TensorRT version and the error")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
        _timing_cache(config, timing_cache)
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
        print(f"building {engine_path.name} from {onnx_path} (fp16, TensorRT {trt.__version__}, {gpu} sm{cc}) ...",
              flush=True)
        serialized, build_seconds = _build_serialized(builder, network, config, timing_cache, onnx_path,
                                                      "--workspace-mib or smaller --max-image-px / --max-points")
        tmp_engine = tmp_dir / engine_path.name
        tmp_engine.write_bytes(bytes(serialized))
        sidecar = {**meta, "precision": "fp16", "tensorrt_version": trt.__version__, "gpu_name": gpu,
                   "compute_capability": cc, "profile": {k: [list(v) for v in s] for k, s in shapes.items()},
                   "engine_sha256": sha256_file(tmp_engine), "source_onnx": str(onnx_path),
                   "source_onnx_sha256": onnx_sha256,
                   "built_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        sidecar_path(tmp_engine).write_text(json.dumps(sidecar, indent=1))
        check, latency = "not checked (--no-verify)", float("nan")
        if verify:
            size = min(320, opt_image_px if kind == "xfeat" else 320)
            pairs = check_pairs(load_images(images, check_count, size + 64, seed=7), size)
            engine = FeatureEngine(tmp_engine, source_onnx_sha256=onnx_sha256)
            try:
                ref_x = onnxruntime_runner(xfeat_onnx)
                ref_g = onnxruntime_runner(onnx_path) if kind == "lighterglue" else None
                k = keypoints if kind == "xfeat" else 1024
                result = compare_features(ref_x, ref_g, engine if kind == "xfeat" else None,
                                          engine if kind == "lighterglue" else None, pairs, k)
                feeds = {"image": np.zeros((1, 1, size, size), np.float32)} if kind == "xfeat" else None
                latency = _feature_latency_ms(engine, feeds) if feeds else float("nan")
            finally:
                engine.close()
            check = result.summary()
            if not result.ok():
                raise MeanNavError(f"{engine_path.name}: engine disagrees with onnxruntime ({check}); not kept")
        _publish(tmp_engine, engine_path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return FeatureBuildResult(engine_path, sidecar_path(engine_path), check, latency, build_seconds)


def _feature_latency_ms(engine, feeds: dict, repeats: int = 20) -> float:
    for _ in range(3):
        engine(feeds)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine(feeds)
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def _latency_ms(emb, repeats: int = 50) -> float:
    s = emb.preprocessing.img_size
    one = np.random.default_rng(0).integers(0, 256, (1, s, s, 3), dtype=np.uint8)
    for _ in range(5):
        emb._embed_batch(one)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        emb._embed_batch(one)
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def _publish(tmp_engine: Path, engine_path: Path) -> None:
    """A checked engine and its sidecar into place (sidecar first: an engine never lacks one)."""
    os.replace(sidecar_path(tmp_engine), sidecar_path(engine_path))
    os.replace(tmp_engine, engine_path)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("onnx", help="MEAN deploy ONNX (fp32, fp16 or int8-qdq), or xfeat.onnx / lighterglue.onnx")
    p.add_argument("-o", "--out-dir", help="where the engine goes (default: this engines/ folder)")
    p.add_argument("--max-batch", type=int, default=8, help="largest batch of the optimization profile (default 8)")
    p.add_argument("--opt-batch", type=int, default=None, help="batch TensorRT tunes for (default: --max-batch)")
    p.add_argument("--workspace-mib", type=int, default=1024, help="builder workspace limit in MiB (default 1024)")
    p.add_argument("--timing-cache", help="timing cache file (default: engines/trt<ver>.<gpu>.timing_cache)")
    p.add_argument("--images", help="check images: folder, list file or GeoTIFF (default: procedural images)")
    p.add_argument("--check-count", type=int, default=16)
    p.add_argument("--min-cosine", type=float, default=ENGINE_MIN_COSINE,
                   help=f"per-descriptor cosine vs onnxruntime an engine must reach to be kept (default {ENGINE_MIN_COSINE})")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    features = p.add_argument_group("xfeat.onnx / lighterglue.onnx (from `mean-nav export-features`)")
    features.add_argument("--keypoints", type=int, default=1024, help="XFeat: the engine's fixed keypoint count")
    features.add_argument("--opt-image-px", type=int, default=512, help="XFeat: image side TensorRT tunes for")
    features.add_argument("--max-image-px", type=int, default=1024, help="XFeat: largest image side (multiple of 32)")
    features.add_argument("--opt-points", type=int, default=1024, help="LighterGlue: keypoints per image tuned for")
    features.add_argument("--max-points", type=int, default=2048, help="LighterGlue: most keypoints per image")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="build_engine: %(message)s")
    if Path(args.onnx).is_file():
        from mean_nav.deploy.feature_engines import feature_kind

        if feature_kind(args.onnx) in ("xfeat", "lighterglue"):
            return _main_features(args)
    try:
        r = build_engine(args.onnx, args.out_dir, args.max_batch, args.opt_batch, args.workspace_mib,
                         args.timing_cache, args.images, args.check_count, verify=not args.no_verify,
                         min_cosine=args.min_cosine)
    except MeanNavError as exc:
        print(f"build_engine: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {r.engine} (+ {r.sidecar.name}) in {r.build_seconds:.0f} s")
    if not args.no_verify:
        print(f"check vs onnxruntime: cosine min {r.min_cosine:.5f} mean {r.mean_cosine:.5f}; "
              f"latency batch 1: {r.latency_ms_p50:.2f} ms")
    print(f"equivalent trtexec command:\n  {r.trtexec}")
    return 0


def _main_features(args) -> int:
    try:
        r = build_feature_engine(args.onnx, args.out_dir, args.keypoints, args.opt_image_px, args.max_image_px,
                                 args.opt_points, args.max_points, args.workspace_mib, args.timing_cache,
                                 args.images, min(args.check_count, 8), verify=not args.no_verify)
    except MeanNavError as exc:
        print(f"build_engine: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {r.engine} (+ {r.sidecar.name}) in {r.build_seconds:.0f} s")
    print(f"check vs onnxruntime: {r.check}; latency {r.latency_ms_p50:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
