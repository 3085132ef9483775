"""Per-stage wall times of one localizer frame (rectify, embed, query features, ...).

The localizer resets them at each frame; `mean-nav bench localizer` and the frame log read
them, so the time a user sees is split where it is spent.
"""
from __future__ import annotations

import time
from contextlib import contextmanager


class StageTimes:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    def reset(self) -> None:
        self.seconds = {}

    @contextmanager
    def __call__(self, stage: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started


class TimedEmbedder:
    """An embedder whose `embed` calls count as the "embed" stage; everything else passes through."""

    def __init__(self, embedder, stages: StageTimes):
        self._embedder, self._stages = embedder, stages

    def embed(self, *args, **kwargs):
        with self._stages("embed"):
            return self._embedder.embed(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._embedder, name)
