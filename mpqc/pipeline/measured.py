"""Measured points: policies lowered, timed in interleaved rounds beside FP32, scored on held-out data.

A searched front is a prediction. What a build returns is chosen among measured points, and a
point that another measured point beats on both latency (unless it is clearly faster) and fidelity is dropped: the uniform
policies and FP32 are always measured beside the searched ones, so a build never returns a
mixed policy that a uniform one beats.
"""

from __future__ import annotations

import dataclasses

from mpqc import progress
from mpqc.backends.base import backend_for
from mpqc.bench.latency import first_batch, measure_interleaved
from mpqc.lower.lowering import Lowering
from mpqc.pipeline.fidelity import evaluation_data, fidelity_of
from mpqc.policy import Policy

# The fidelity number points are compared on: present for every output, continuous, higher is better.
FRONT_METRIC = "cosine_mean"
# The fewest interleaved rounds in which being faster in every one counts as clearly faster: by chance
# alone, two equally fast models come out one way in all of 5 rounds one time in 32.
PAIRED_ROUNDS = 5


@dataclasses.dataclass(frozen=True)
class MeasuredPoint:
    source: str  # "fp32", "uniform:w8a8", "search:qerror", "front:3", ...
    policy: Policy | None  # None for the FP32 model itself
    predicted_ms: float | None
    median_ms: float  # median of the round medians
    round_medians_ms: tuple[float, ...]
    fidelity: float  # FRONT_METRIC
    fidelity_all: dict

    def beats(self, other: "MeasuredPoint", margin: float = 0.0) -> bool:
        """At least as faithful, not clearly slower (`clearly_faster`), and strictly better in one of
        the two. A point that is not clearly faster than another buys nothing with the fidelity it
        gives up."""
        return (self.fidelity >= other.fidelity and not other.clearly_faster(self, margin)
                and (self.median_ms < other.median_ms or self.fidelity > other.fidelity))

    def clearly_faster(self, other: "MeasuredPoint", margin: float = 0.0) -> bool:
        """Faster by more than `margin` (relative: the noise floor of the measurement), or faster in
        every one of at least PAIRED_ROUNDS interleaved rounds both were timed in. The rounds pair the
        two under the same machine load, so a small, steady gain (a classifier alone in INT8) shows
        there even where a loaded machine blurs the medians by more than the gain."""
        if self.median_ms * (1 + margin) < other.median_ms:
            return True
        mine, theirs = self.round_medians_ms, other.round_medians_ms
        return len(mine) == len(theirs) >= PAIRED_ROUNDS and all(a < b for a, b in zip(mine, theirs))

    def to_json(self) -> dict:
        return {"source": self.source, "predicted_ms": self.predicted_ms, "measured_ms": self.median_ms,
                "round_medians_ms": list(self.round_medians_ms), "fidelity": self.fidelity,
                "fidelity_metric": FRONT_METRIC, "fidelity_all": self.fidelity_all,
                "layers": None if self.policy is None else self.policy.as_dict}


def measure_points(lowering: Lowering, loaded, feeds, candidates: list[tuple[str, Policy, float | None]], batch: int,
                   metric=None) -> tuple[list[MeasuredPoint], float]:
    """FP32 first, then each (source, policy, predicted ms) of `candidates`, all timed in the same
    rounds; and the noise floor of those rounds (mpqc.bench.latency.InterleavedTimes.noise_floor)."""
    target = lowering.target
    backend = backend_for(target)
    eval_feeds, labels, data = evaluation_data(loaded, feeds)
    timing = first_batch(eval_feeds, batch)
    float_runner = backend.load(lowering.float_model.SerializeToString(), target)
    reference = float_runner.run_batched(eval_feeds)
    runners, fidelities = [float_runner], [fidelity_of(reference, reference, loaded, labels, data, metric)]
    for _, policy, _ in progress.bar(candidates, "measuring candidate policies", unit="policy"):
        runner = backend.load(lowering.lower(policy), target)
        runners.append(runner)
        fidelities.append(fidelity_of(reference, runner.run_batched(eval_feeds), loaded, labels, data, metric))
    times = measure_interleaved(runners, timing, min_rounds=PAIRED_ROUNDS)  # enough rounds to pair (clearly_faster)
    sources = [("fp32", None, None)] + list(candidates)
    return [
        MeasuredPoint(source, policy, predicted, float(median), rounds, float(fidelity[FRONT_METRIC]), fidelity)
        for (source, policy, predicted), median, rounds, fidelity in zip(sources, times.medians_ms, times.round_medians_ms, fidelities)
    ], times.noise_floor


def undominated(points: list[MeasuredPoint], margin: float = 0.0) -> list[MeasuredPoint]:
    """The measured front: every point no other measured point beats, fastest first. A point stays
    only where it is clearly faster than every more faithful one (by more than the `margin` the
    measurement can blur, or in every paired round), so it stays on the front when measured again
    (FP32 is the most faithful point: anything kept is clearly faster than it)."""
    kept = [p for p in points if not any(other.beats(p, margin) for other in points if other is not p)]
    return sorted(kept, key=lambda p: (p.median_ms, -p.fidelity))
