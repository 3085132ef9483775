"""Tile-cache build on a Ray cluster (`mean-nav cache build ... --ray [ADDRESS]`, the `[ray]` extra).

Ray only decides where blocks run: each block is one Ray task calling the very
`BlockJob.build` the local build calls, and the driver assembles the cache exactly as the
local build does (`build_cache` with a `RayBlockRunner`), so the output is the same file
for file (meta.json's creation time aside).

- Embedder: loaded once per worker process and kept for its later tasks (workers are
  reused: `max_calls=0`), from the model path every node sees (or the shipped copy).
- GPUs: when the cluster has GPUs each task asks for `gpus_per_task` (default 1) of one
  and the embedder picks TensorRT/CUDA there as `load_embedder` does; CPU-only otherwise.
- Fault tolerance: a worker that dies (killed, out of memory, node lost) loses only the
  block it was running; Ray runs that task again (`max_retries`). Block files are written
  to a temp name and renamed, so a block file that exists is complete; a rerun after a
  driver crash skips the finished blocks (`build_cache`'s resume).
- Storage: by default maps, model and output folder are paths every worker sees (NFS,
  a shared disk). `ship=True` is for clusters without one: the driver puts the model and
  the maps into Ray's object store, each worker copies what its block needs to a local
  scratch folder once, builds the block there and sends the block's files back; the
  driver writes them into the output folder (map part first, block file last).
"""
from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

from ..errors import MeanNavError
from .cache import MAPS_DIR, WORK, BlockJob
from .tiles import Block, maps_overlapping

log = logging.getLogger(__name__)

MAX_RETRIES = 3            # Ray re-runs of a block whose worker died
IN_FLIGHT_PER_SLOT = 2     # tasks queued per worker slot: workers never wait, results never pile up


def import_ray():
    try:
        import ray
    except ImportError:
        raise MeanNavError("--ray needs Ray: `pip install 'mean-nav[ray]'` on the driver and every worker") from None
    return ray


@dataclass(frozen=True)
class ModelSpec:
    """How a worker loads the embedder: `load_embedder(path, backend, threads)`."""

    path: str
    backend: str = "auto"
    threads: int | None = None


# ----------------------------------------------------------------------------- worker side

_worker_embedders: dict = {}     # ModelSpec -> Embedder, per worker process


def _embedder_for(spec: ModelSpec):
    if spec not in _worker_embedders:
        from ..deploy.backends import load_embedder

        _worker_embedders[spec] = load_embedder(spec.path, backend=spec.backend, threads=spec.threads)
    return _worker_embedders[spec]


def _scratch(root: str | None) -> Path:
    """This node's folder for shipped inputs (shared by its workers) and per-process outputs."""
    path = Path(root) if root else Path(tempfile.gettempdir()) / f"mean-nav-ray-{os.getuid()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _materialize(scratch: Path, name: str, digest: str, ref) -> Path:
    """A shipped file as a local path, fetched from the object store once per node."""
    ray = import_ray()
    local = scratch / "inputs" / digest / name
    if not local.is_file():
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f"{name}.tmp-{os.getpid()}")
        tmp.write_bytes(ray.get(ref))
        os.replace(tmp, local)
    return local


def _run_block(job: BlockJob, block: Block, spec: ModelSpec, shipped: dict | None) -> dict:
    """One block on a worker: the local build's `BlockJob.build`, timed."""
    started = time.perf_counter()
    files = None
    if shipped is None:
        tiles = job.build(block, _embedder_for(spec))
        model_hash = _embedder_for(spec).model_hash
    else:
        scratch = _scratch(shipped["scratch"])
        spec = replace(spec, path=str(_materialize(scratch, *shipped["model"])))
        # only the maps this block touches travel to this node
        col0, row0, width, height = block.read_window(job.grid)
        needed = set(maps_overlapping(job.maps, job.map_bounds, job.grid, col0, row0, width, height))
        keep = [k for k, m in enumerate(job.maps) if m in needed]
        out = scratch / f"out-{os.getpid()}"
        (out / WORK).mkdir(parents=True, exist_ok=True)
        (out / MAPS_DIR).mkdir(parents=True, exist_ok=True)
        local_job = replace(job, maps=tuple(_materialize(scratch, *shipped["maps"][k]) for k in keep),
                            map_bounds=tuple(job.map_bounds[k] for k in keep), out=out)
        embedder = _embedder_for(spec)
        tiles = local_job.build(block, embedder)
        model_hash = embedder.model_hash
        files = {}
        for path in local_job.output_files(block):
            if path.is_file():
                files[str(path.relative_to(out))] = path.read_bytes()
                path.unlink()
    return {"tiles": tiles, "seconds": time.perf_counter() - started, "model_hash": model_hash,
            "worker": f"{socket.gethostname()}:{os.getpid()}", "files": files}


# ----------------------------------------------------------------------------- driver side


class RayBlockRunner:
    """`build_cache(..., runner=RayBlockRunner(...))`: the blocks run as Ray tasks.

    `address`: a running cluster ("auto", "ray://head:10001", "head:6379"); None: connect
    to the cluster in $RAY_ADDRESS, or start a local one when it is unset. A cluster this
    runner started is shut down when the build ends; one it joined is left running.
    """

    def __init__(self, model: ModelSpec, model_hash: str, address: str | None = None, ship: bool = False,
                 gpus_per_task: float | None = None, cpus_per_task: float = 1.0, max_retries: int = MAX_RETRIES,
                 scratch: str | None = None):
        """`ship`: send model and maps through the object store (no shared storage); `scratch`:
        the workers' local folder for them (default $TMPDIR/mean-nav-ray-<uid> on each node)."""
        self.model = model
        self.model_hash = model_hash
        self.address = address
        self.ship = ship
        self.scratch = scratch
        self.gpus_per_task = gpus_per_task
        self.cpus_per_task = cpus_per_task
        self.max_retries = max_retries
        self.per_worker: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0.0])   # blocks, tiles, seconds
        self.started = self.finished = 0.0

    def _connect(self, ray) -> bool:
        """Join or start the cluster; True if this runner started (and so stops) it."""
        if ray.is_initialized():
            return False
        address = self.address or os.environ.get("RAY_ADDRESS") or None
        kwargs = dict(include_dashboard=False, configure_logging=False)
        try:
            ray.init(address=address, **kwargs)
        except ConnectionError as exc:
            raise MeanNavError(f"--ray {address}: no Ray cluster there ({exc}); start one with `ray start --head` "
                               "or pass its address") from None
        return True

    def _ship(self, ray, job: BlockJob) -> dict:
        from .cache import sha256_file

        def put(path: Path) -> tuple[str, str, object]:
            return path.name, sha256_file(path), ray.put(path.read_bytes())

        return {"model": put(Path(self.model.path)), "maps": [put(Path(m)) for m in job.maps],
                "scratch": self.scratch}

    def run(self, job: BlockJob, blocks: Sequence[Block]) -> Iterator[tuple[Block, int]]:
        """Yield (block, tiles) as blocks finish, in completion order."""
        ray = import_ray()
        started_here = self._connect(ray)
        try:
            yield from self._run(ray, job, list(blocks))
        finally:
            if started_here:
                ray.shutdown()

    def _run(self, ray, job: BlockJob, blocks: list[Block]) -> Iterator[tuple[Block, int]]:
        resources = ray.cluster_resources()
        gpus = self.gpus_per_task if self.gpus_per_task is not None else (1.0 if resources.get("GPU", 0) >= 1 else 0.0)
        # max_calls=0: workers live on, so each loads the embedder once (GPU tasks default to 1 call)
        task = ray.remote(max_calls=0)(_run_block).options(num_cpus=self.cpus_per_task, num_gpus=gpus,
                                                          max_retries=self.max_retries, name="mean_nav_cache_block")
        slots = max(1, int(resources.get("CPU", 1) // self.cpus_per_task))
        if gpus:
            slots = min(slots, max(1, int(resources.get("GPU", 0) // gpus)))
        window = slots * IN_FLIGHT_PER_SLOT
        shipped = self._ship(ray, job) if self.ship and blocks else None
        job_ref = ray.put(job)
        log.info("ray: %d blocks on %d worker slots (%s)%s", len(blocks), slots,
                 f"{gpus:g} GPU per task" if gpus else "CPU", ", inputs shipped through the object store" if shipped else "")
        todo, in_flight = list(reversed(blocks)), {}
        self.started = time.perf_counter()
        try:
            while todo or in_flight:
                while todo and len(in_flight) < window:
                    block = todo.pop()
                    in_flight[task.remote(job_ref, block, self.model, shipped)] = block
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                block = in_flight.pop(ready[0])
                result = self._result(ray, ready[0], block)
                if result["files"] is not None:
                    self._write_shipped(job, block, result["files"])
                stats = self.per_worker[result["worker"]]
                stats[0] += 1
                stats[1] += result["tiles"]
                stats[2] += result["seconds"]
                yield block, result["tiles"]
        finally:
            self.finished = time.perf_counter()
            for ref in in_flight:     # interrupted: nothing of this build keeps running
                ray.cancel(ref, force=True)

    def _result(self, ray, ref, block: Block) -> dict:
        try:
            result = ray.get(ref)
        except MeanNavError as exc:   # Ray re-raises a task's exception as a subclass of its type
            raise MeanNavError(f"block {block.index}: {getattr(exc, 'cause', exc)}") from None
        except ray.exceptions.RayError as exc:
            raise MeanNavError(f"block {block.index} failed on the Ray cluster after {self.max_retries} retries "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0]}); rerun the same command: "
                               "finished blocks are kept") from None
        if result["model_hash"] != self.model_hash:
            raise MeanNavError(f"block {block.index}: worker {result['worker']} loaded model "
                               f"{result['model_hash']} from {self.model.path}, the driver has {self.model_hash}; "
                               "every node must see the same model file")
        return result

    @staticmethod
    def _write_shipped(job: BlockJob, block: Block, files: dict[str, bytes]) -> None:
        """A block's files sent back by a worker: map part first, block file (the 'done' mark) last."""
        block_name = str(job.block_file(block).relative_to(job.out))
        for name in sorted(files, key=lambda n: n == block_name):
            dest = job.out / name
            tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
            tmp.write_bytes(files[name])
            os.replace(tmp, dest)

    def summary(self) -> str:
        """Per-worker throughput, for the build's final log line."""
        if not self.per_worker:
            return ""
        wall = max(self.finished - self.started, 1e-9)
        parts = [f"{name} {tiles / max(seconds, 1e-9):.1f} tiles/s ({blocks} blocks)"
                 for name, (blocks, tiles, seconds) in sorted(self.per_worker.items())]
        return f"; ray: {len(self.per_worker)} workers, {wall:.1f} s: " + ", ".join(parts)

