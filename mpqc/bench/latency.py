"""Latency of one model on one runner: warm-up, many timed runs, percentiles."""

from __future__ import annotations

import dataclasses
import time

import numpy as np


@dataclasses.dataclass(frozen=True)
class MeasureSettings:
    batch: int = 1  # samples per timed run
    runs: int = 100
    warmup: int = 10


@dataclasses.dataclass(frozen=True)
class LatencyStats:
    batch: int
    threads: int
    warmup: int
    runs: int
    median_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    throughput_per_s: float  # samples per second at the median

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def measure_latency(runner, feeds: dict[str, np.ndarray], warmup: int = 10, runs: int = 100) -> LatencyStats:
    """Time `runner.run(feeds)`; the feeds hold exactly one batch."""
    for _ in range(warmup):
        runner.run(feeds)
    times = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        runner.run(feeds)
        times[i] = time.perf_counter() - start
    times_ms = times * 1e3
    batch = len(next(iter(feeds.values())))
    median = float(np.median(times_ms))
    return LatencyStats(
        batch=batch,
        threads=runner.threads,
        warmup=warmup,
        runs=runs,
        median_ms=median,
        p90_ms=float(np.percentile(times_ms, 90)),
        p99_ms=float(np.percentile(times_ms, 99)),
        mean_ms=float(times_ms.mean()),
        std_ms=float(times_ms.std()),
        min_ms=float(times_ms.min()),
        throughput_per_s=batch * 1e3 / median,
    )


def first_batch(feeds: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """`batch` samples from the feeds (repeated if there are fewer), for timing."""
    count = len(next(iter(feeds.values())))
    index = np.arange(batch) % count
    return {name: np.ascontiguousarray(array[index]) for name, array in feeds.items()}
