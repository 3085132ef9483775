"""`mean-nav bench backends`: inference backends and precisions.

`mean-nav bench backends MODEL...` measures, per backend and precision: latency p50/p95
at batch 1 (frame-paced: each call after a pause, as a daemon's frames arrive), images/s
at batch 1 and N back to back, and the backbone's multiply-accumulates per second (the
network alone, on preprocessed input) as a fraction of this machine's float32 GEMM rate
(numpy and torch sgemm, measured in the same run, also back to back). The fraction says how
well a backend uses the CPU whatever its clock: ~1.0 means it runs the network as fast as
one big matrix multiply. Preprocessing shows as the gap between `hot ms` and `net ms`.

An FP32 ONNX brings its quantized siblings (`<stem>.int8-qdq.onnx`, `.int8-cpu.onnx`,
`.fp16.onnx`) along unless --no-siblings. Output: a table, and JSON with --json.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .. import huge_pages
from ..errors import MeanNavError

log = logging.getLogger(__name__)

VARIANT_SUFFIXES = ("int8-qdq", "int8-cpu", "fp16")


# ----------------------------------------------------------------------------- MACs of a graph


# op type -> (index of the activation input, index of the weight input); quantized forms included
_COMPUTE_OPS = {
    "Conv": (0, 1), "ConvInteger": (0, 1), "QLinearConv": (0, 3),
    "MatMul": (0, 1), "MatMulInteger": (0, 1), "QLinearMatMul": (0, 3), "DynamicQuantizeMatMul": (0, 1),
    "Gemm": (0, 1),
}


def onnx_macs_per_image(path: str | Path) -> int | None:
    """Multiply-accumulates of the Conv/MatMul/Gemm nodes (float or quantized) for one image.

    Shapes come from onnxruntime's symbolic shape inference at batch 1 (it folds the
    Shape->Pad arithmetic of TF-style SAME padding that plain ONNX inference cannot).
    None if the graph's shapes cannot be resolved or onnx is not installed.
    """
    try:
        import onnx
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    except ImportError:
        return None
    model = onnx.load(str(path))
    initializers = {t.name: list(t.dims) for t in model.graph.initializer}
    inp = [i for i in model.graph.input if i.name not in initializers][0]
    dims = inp.type.tensor_type.shape.dim
    if dims and not dims[0].dim_value:
        dims[0].ClearField("dim_param")
        dims[0].dim_value = 1
    try:
        model = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception as exc:  # unusual graphs: report no MAC count rather than fail the benchmark
        log.debug("shape inference failed for %s: %s", path, exc)
        return None
    shapes = dict(initializers)
    for vi in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input):
        d = vi.type.tensor_type.shape.dim
        if d and all(x.dim_value > 0 for x in d):
            shapes[vi.name] = [x.dim_value for x in d]
    total = 0
    for node in model.graph.node:
        if node.op_type not in _COMPUTE_OPS:
            continue
        ia, iw = _COMPUTE_OPS[node.op_type]
        out, a, w = shapes.get(node.output[0]), shapes.get(node.input[ia]), shapes.get(node.input[iw])
        if out is None or w is None or a is None:
            return None
        if "Conv" in node.op_type:
            total += int(np.prod(out)) * int(np.prod(w[1:]))    # W [Cout, Cin/groups, kh, kw]
        elif node.op_type == "Gemm" and any(at.name == "transA" and at.i for at in node.attribute):
            total += int(np.prod(out)) * a[0]
        else:
            total += int(np.prod(out)) * a[-1]
    return total


# ----------------------------------------------------------------------------- timing


@dataclass
class BackendResult:
    model: str
    backend: str
    precision: str
    model_hash: str
    img_size: int
    providers: list = field(default_factory=list)
    latency_ms_p50: float = float("nan")
    latency_ms_p95: float = float("nan")
    latency_ms_best: float = float("nan")
    hot_latency_ms_best: float = float("nan")  # batch 1, back-to-back runs
    batch: int = 1
    run_batch: int | None = None               # images per network call within a batch (None: all)
    images_per_s: float = float("nan")         # from the median batch time
    images_per_s_best: float = float("nan")    # from the best batch time
    # the network alone on prepared (normalised) input, back to back: what the GEMM fractions use
    net_latency_ms_best: float = float("nan")  # batch 1
    net_batch_s_best: float = float("nan")     # batch N
    macs_per_image: int | None = None
    gemm_fraction_batch1: float | None = None
    gemm_fraction_batchN: float | None = None
    # the same fraction on process CPU time (all threads) instead of wall time: insensitive to
    # other processes taking turns on the cores, so it is the number to trust on a shared machine
    gemm_fraction_batchN_cpu_time: float | None = None
    batch_cpu_s_best: float = float("nan")     # process CPU seconds of the network's best batch


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _timed_cpu(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds over all threads) of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def expand_models(paths: list[str], siblings: bool) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise MeanNavError(f"{p}: model file not found")
        out.append(p)
        if siblings and p.suffix == ".onnx" and not any(p.name.endswith(f".{s}.onnx") for s in VARIANT_SUFFIXES):
            stem = p.name[:-len(".onnx")]
            stem = stem[:-len(".fp32")] if stem.endswith(".fp32") else stem
            out += [p.with_name(f"{stem}.{s}.onnx") for s in VARIANT_SUFFIXES if p.with_name(f"{stem}.{s}.onnx").is_file()]
    seen, unique = set(), []
    for p in out:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique


def bench_backends(models: list[Path], backend: str = "auto", batch: int = 8, repeats: int = 20,
                   threads: int | None = None, gemm_size: int = 1024) -> tuple[list[BackendResult], dict]:
    """Time every model and the machine's GEMM rate, in two phases.

    1. Frame-paced latency at batch 1: round-robin over the models, each call after a pause
       (`settle`) as a daemon's frames arrive, so cores and thread pools start idle: p50/p95/best.
    2. Throughput, model by model: back-to-back runs at batch 1 and at batch N (after a pause
       and a warm-up), end to end and of the network alone, then a block of back-to-back
       GEMMs in the child process. The GEMM fractions compare the network's hot best-of
       times with the hot GEMM: both sides measured the same way (interference only ever
       adds time, so best-of is the consistent estimate of what the hardware does).
    End to end = each backend's `_embed_batch`: preprocessing to the graph's input included,
    image decoding and resizing not. The network alone = its `_infer` on a prepared input.
    """
    from ..deploy.backends import load_embedder

    threads = threads or os.cpu_count() or 1
    embedders = [load_embedder(p, backend=backend, threads=threads) for p in models]
    rng = np.random.default_rng(0)
    inputs = []
    for emb in embedders:
        size = emb.preprocessing.img_size
        one = rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8)
        many = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
        for _ in range(2):  # warm-up: allocations, kernel selection, engine lazy init
            emb._embed_batch(one)
        emb._embed_batch(many)
        inputs.append((one, many))
    gemm = _GemmProbe(threads, gemm_size)
    single: list[list[float]] = [[] for _ in embedders]
    hot_single: list[list[float]] = [[] for _ in embedders]
    batched: list[list[float]] = [[] for _ in embedders]
    net_single: list[list[float]] = [[] for _ in embedders]
    net_batched: list[list[float]] = [[] for _ in embedders]
    net_batched_cpu: list[list[float]] = [[] for _ in embedders]
    batch_repeats = max(3, repeats // 4)
    try:
        for _ in tqdm(range(repeats), desc="frame-paced batch 1", unit="round", leave=False):
            for i, emb in enumerate(embedders):
                settle()
                single[i].append(_timed(lambda: emb._embed_batch(inputs[i][0])))
        for i, emb in enumerate(tqdm(embedders, desc="throughput", unit="model", leave=False)):
            one, many = inputs[i]
            settle()
            emb._embed_batch(one)
            hot_single[i] = [_timed(lambda: emb._embed_batch(one)) for _ in range(repeats)]
            x_one = emb._prepare(one)
            net_single[i] = [_timed(lambda: emb._infer(x_one)) for _ in range(repeats)]
            emb._embed_batch(many)
            batched[i] = [_timed(lambda: emb._embed_batch(many)) for _ in range(batch_repeats)]
            x_many = emb._prepare(many)
            for _ in range(batch_repeats):
                wall, cpu = _timed_cpu(lambda: emb._infer(x_many))
                net_batched[i].append(wall)
                net_batched_cpu[i].append(cpu)
            gemm.sample()
    finally:
        gemm.close()
        for emb in embedders:
            emb.close()
    gemm_report = gemm.report()
    rate = gemm_report["best_macs_per_s"]
    macs_by_hash: dict[str, int] = {}
    results = []
    cpu_rate = gemm_report["best_macs_per_cpu_s"]
    for path, emb, lat, hot, bt, n1, nb, nc in zip(models, embedders, single, hot_single, batched, net_single,
                                                   net_batched, net_batched_cpu):
        if path.suffix == ".onnx" and emb.model_hash not in macs_by_hash:
            # the network's work does not depend on the precision: count it once per model
            macs = onnx_macs_per_image(path)
            if macs:
                macs_by_hash[emb.model_hash] = macs
        results.append(BackendResult(
            str(path), emb.name, emb.precision, emb.model_hash, emb.preprocessing.img_size,
            providers=list(getattr(emb, "providers", [])), latency_ms_p50=1000 * float(np.percentile(lat, 50)),
            latency_ms_p95=1000 * float(np.percentile(lat, 95)), latency_ms_best=1000 * float(np.min(lat)),
            hot_latency_ms_best=1000 * float(np.min(hot)), batch=batch, run_batch=getattr(emb, "run_batch", None),
            images_per_s=batch / float(np.median(bt)), images_per_s_best=batch / float(np.min(bt)),
            net_latency_ms_best=1000 * float(np.min(n1)), net_batch_s_best=float(np.min(nb)),
            batch_cpu_s_best=float(np.min(nc))))
    for r in results:
        r.macs_per_image = macs_by_hash.get(r.model_hash)
        if r.macs_per_image:
            r.gemm_fraction_batch1 = r.macs_per_image / (r.net_latency_ms_best / 1000) / rate
            r.gemm_fraction_batchN = r.macs_per_image * r.batch / r.net_batch_s_best / rate
            r.gemm_fraction_batchN_cpu_time = r.macs_per_image * r.batch / r.batch_cpu_s_best / cpu_rate
    return results, gemm_report


# Thread pools keep spinning for a while after a call returns (onnxruntime's for tens of
# milliseconds, OpenBLAS's for ~0.1 s) and steal the cores from whatever runs next: measured
# here, Lite0 took 25-45 ms right after a numpy GEMM instead of 12. So every timed call is
# preceded by a short pause, and the GEMM runs in its own process with OpenBLAS told to
# park its threads at once.
SETTLE_S = 0.05
GEMM_BLOCK = 5


def settle() -> None:
    time.sleep(SETTLE_S)


class _GemmProbe:
    """float32 n^3 GEMM with numpy's BLAS and torch (if installed) in a child process,
    sampled between model runs; `close()` stops the child."""

    def __init__(self, threads: int, n: int):
        import multiprocessing

        self.n = n
        self.best: dict[str, float] = {}
        self.best_cpu: dict[str, float] = {}
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        saved = os.environ.get("OPENBLAS_THREAD_TIMEOUT")
        os.environ["OPENBLAS_THREAD_TIMEOUT"] = "4"  # 2^4 cycles of spinning (the minimum) before sleeping
        try:
            self.proc = ctx.Process(target=_gemm_worker, args=(child, threads, n), daemon=True)
            self.proc.start()
        finally:
            if saved is None:
                os.environ.pop("OPENBLAS_THREAD_TIMEOUT", None)
            else:
                os.environ["OPENBLAS_THREAD_TIMEOUT"] = saved
        child.close()
        for _ in range(3):
            self.sample()

    def sample(self) -> None:
        settle()
        self.conn.send("sample")
        for name, (wall, cpu) in self.conn.recv().items():
            self.best[name] = min(self.best.get(name, float("inf")), wall)
            self.best_cpu[name] = min(self.best_cpu.get(name, float("inf")), cpu)

    def close(self) -> None:
        if self.proc.is_alive():
            self.conn.send("stop")
            self.proc.join(timeout=10)
        self.conn.close()

    def report(self) -> dict:
        rates = {k: self.n ** 3 / v for k, v in self.best.items()}
        best = max(rates, key=rates.get)
        cpu_rates = {k: self.n ** 3 / v for k, v in self.best_cpu.items()}
        return {"size": self.n, "macs_per_s": rates, "best": best, "best_macs_per_s": rates[best],
                "macs_per_cpu_s": cpu_rates, "best_macs_per_cpu_s": max(cpu_rates.values())}


def _gemm_worker(conn, threads: int, n: int) -> None:
    """Child process: answer each "sample" with {library: (wall s, process CPU s)}, the best of
    GEMM_BLOCK back-to-back GEMMs."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), dtype=np.float32)  # preallocated: a fresh 4+ MB result would page-fault on every call
    fns = {"numpy": lambda: np.matmul(a, b, out=out)}
    try:
        import torch
    except ImportError:
        pass
    else:
        torch.set_num_threads(threads)
        ta, tb, tout = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(out)
        fns["torch"] = lambda: torch.mm(ta, tb, out=tout)
    for fn in fns.values():  # warm-up
        fn()
    while conn.recv() == "sample":  # a block of back-to-back GEMMs, as the models run in phase 2
        conn.send({name: min(_timed_cpu(fn) for _ in range(GEMM_BLOCK)) for name, fn in fns.items()})


def format_table(results: list[BackendResult], gemm: dict, threads: int, memory: dict) -> str:
    head = ("model", "backend", "precision", "p50 ms", "p95 ms", "best ms", "hot ms", "net ms", "img/s @N", "GMAC/img",
            "GEMM% b1", "GEMM% bN", "GEMM% bN cpu", "x FP32")
    fp32: dict[str, BackendResult] = {}
    for r in results:
        if r.precision == "fp32":
            fp32.setdefault(r.model_hash, r)
    rows = [head]
    for r in results:
        base = fp32.get(r.model_hash)
        rows.append((Path(r.model).name, r.backend, r.precision, f"{r.latency_ms_p50:.1f}", f"{r.latency_ms_p95:.1f}",
                     f"{r.latency_ms_best:.1f}", f"{r.hot_latency_ms_best:.1f}", f"{r.net_latency_ms_best:.1f}",
                     f"{r.images_per_s:.1f} @{r.batch}" + (f"/{r.run_batch}" if r.run_batch else ""),
                     f"{r.macs_per_image / 1e9:.2f}" if r.macs_per_image else "-",
                     f"{100 * r.gemm_fraction_batch1:.0f}%" if r.gemm_fraction_batch1 else "-",
                     f"{100 * r.gemm_fraction_batchN:.0f}%" if r.gemm_fraction_batchN else "-",
                     f"{100 * r.gemm_fraction_batchN_cpu_time:.0f}%" if r.gemm_fraction_batchN_cpu_time else "-",
                     f"{r.images_per_s_best / base.images_per_s_best:.2f}" if base else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    rates = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in gemm["macs_per_s"].items())
    lines.append(f"float32 GEMM {gemm['size']}^3 on this machine: {rates} GMAC/s (best: {gemm['best']}); "
                 f"{threads} thread(s); malloc on huge pages: {'yes' if memory['malloc_huge_pages'] else 'no'} "
                 f"(THP mode {memory['thp_mode']}). p50/p95/best: batch 1, each call after a "
                 f"{1000 * SETTLE_S:.0f} ms pause (frame-paced); hot ms: batch 1 back to back; net ms: the same for the network alone on "
                 f"preprocessed input; @N/1: batches of N run one image per call (onnxruntime's CPU kernels "
                 f"run float graphs faster so). GEMM% = backbone MACs/s of the network alone over that rate (hot "
                 f"best-of times on both sides) and x FP32 = images/s at batch N over the same model's FP32; "
                 f"'cpu' = the same on process CPU time (GEMM {max(gemm['macs_per_cpu_s'].values()) / 1e9:.1f} GMAC "
                 f"per CPU-second), robust when other processes share the cores")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="+", help="ONNX files, TensorRT engines or checkpoints (.pt)")
    p.add_argument("--backend", default="auto", choices=("auto", "onnxruntime", "tensorrt", "torch"))
    p.add_argument("--batch", type=int, default=8, help="batch size for throughput (default 8)")
    p.add_argument("--repeats", type=int, default=20, help="timed batch-1 runs per model (default 20)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--no-siblings", action="store_true", help="do not add <stem>.int8-*/fp16 ONNX siblings")
    p.add_argument("--json", help="write the results as JSON to this file")


def run(args: argparse.Namespace) -> int:
    if args.batch < 1 or args.repeats < 1:
        raise MeanNavError("--batch and --repeats must be at least 1")
    threads = args.threads or os.cpu_count() or 1
    models = expand_models(args.models, siblings=not args.no_siblings)
    results, gemm = bench_backends(models, args.backend, args.batch, args.repeats, threads)
    memory = huge_pages.status()
    print(format_table(results, gemm, threads, memory))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        data = {"threads": threads, "memory": memory, "gemm": gemm, "results": [asdict(r) for r in results]}
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, out)
        print(f"wrote {out}")
    return 0
