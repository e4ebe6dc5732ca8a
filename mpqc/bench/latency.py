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


@dataclasses.dataclass(frozen=True)
class InterleavedTimes:
    """Per runner, the median of each round: every round times each runner in turn, so load that
    comes and goes on a shared machine hits all of them alike instead of whichever ran then."""

    round_medians_ms: tuple[tuple[float, ...], ...]  # [runner][round]
    stable: bool  # no runner's median of rounds moved by more than the tolerance in the last round

    @property
    def medians_ms(self) -> np.ndarray:
        return np.array([float(np.median(rounds)) for rounds in self.round_medians_ms])

    @property
    def noise_floor(self) -> float:
        """How far the number a predictor is judged on (a runner's median of rounds) moves when it
        is measured again: the median over runners of |median(even rounds) - median(odd rounds)| /
        median(all rounds). One slow round on a shared machine moves it little, a machine whose
        speed wanders moves it a lot. No latency predictor can be judged more finely."""
        splits = [abs(float(np.median(r[0::2])) - float(np.median(r[1::2]))) / float(np.median(r))
                  for r in self.round_medians_ms if len(r) >= 2 and np.median(r) > 0]
        return float(np.median(splits)) if splits else 0.0

    @property
    def round_spread(self) -> float:
        """The median over runners of (max - min) / median of its round medians: how much one round says."""
        spreads = [(max(r) - min(r)) / float(np.median(r)) for r in self.round_medians_ms if np.median(r) > 0]
        return float(np.median(spreads)) if spreads else 0.0


def measure_interleaved(runners, feeds: dict[str, np.ndarray], runs: int = 30, warmup: int = 5,
                        min_rounds: int = 3, max_rounds: int = 9, tolerance: float = 0.01, on_round=None) -> InterleavedTimes:
    """Rounds of (warm-up, `runs` timed runs) over every runner until the medians of rounds are stable."""
    rounds: list[list[float]] = [[] for _ in runners]
    previous = None
    stable = False
    for done in range(1, max_rounds + 1):
        for runner, times in zip(runners, rounds):
            times.append(measure_latency(runner, feeds, warmup=warmup, runs=runs).median_ms)
        current = np.array([np.median(times) for times in rounds])
        if on_round is not None:
            on_round(done)
        if previous is not None and done >= min_rounds:
            stable = bool(np.all(np.abs(current - previous) <= tolerance * np.maximum(previous, 1e-9)))
            if stable:
                break
        previous = current
    return InterleavedTimes(tuple(tuple(times) for times in rounds), stable)
