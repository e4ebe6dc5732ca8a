"""Measured points: policies lowered, timed in interleaved rounds beside FP32, scored on held-out data.

A searched front is a prediction. What a build returns is chosen among measured points, and a
point that another measured point beats on both latency (unless it is clearly faster) and fidelity is dropped: the uniform
policies and FP32 are always measured beside the searched ones, so a build never returns a
mixed policy that a uniform one beats.
"""

from __future__ import annotations

import dataclasses
import statistics

from scipy import stats

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
# Where rounds pair, a median gain beyond the noise margin counts only if the faster point also wins
# so many rounds that two equally fast models would do so less often than this (one-sided sign
# test): on a VM whose load moves between rounds, a few lucky rounds can carry a median by 14%.
SIGN_TEST_LEVEL = 0.05
# The cost model's median error on a build's own measured points past which its front is not to be
# trusted (mpqc costmodel validate asks 95% of policies within this).
PREDICTION_TOLERANCE = 0.10


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
        """Faster in every one of at least PAIRED_ROUNDS interleaved rounds both were timed in, or
        faster by more than `margin` (relative: the noise floor of the measurement) and, where the
        rounds pair, in significantly many of them (SIGN_TEST_LEVEL). The rounds pair the two under
        the same machine load, so a small, steady gain (a classifier alone in INT8) shows there even
        where a loaded machine blurs the medians by more than the gain, and a median gain that the
        rounds do not back is noise."""
        beyond_margin = self.median_ms * (1 + margin) < other.median_ms
        mine, theirs = self.round_medians_ms, other.round_medians_ms
        if not len(mine) == len(theirs) >= PAIRED_ROUNDS:
            return beyond_margin
        wins = sum(a < b for a, b in zip(mine, theirs))
        if wins == len(mine):
            return True
        return beyond_margin and float(stats.binom.sf(wins - 1, len(mine), 0.5)) < SIGN_TEST_LEVEL

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


def prediction_check(points: list[MeasuredPoint], margin: float) -> dict:
    """The cost model's predictions beside this build's own measurements of the same policies: how
    far off they are, whether they rank the points as measured, and which predictions fall below the
    fastest uniform policy's measured time (a cost model that does so is wrong, not optimistic).
    `note` says so in one line where the front's choice of layers rests on predictions that the
    measurements do not support; None where they do."""
    predicted = [p for p in points if p.predicted_ms is not None]
    uniforms = [p for p in predicted if p.source.startswith("uniform:")]
    if len(predicted) < 2 or not uniforms:
        return {"points": len(predicted), "note": None}
    errors = [abs(p.predicted_ms - p.median_ms) / p.median_ms for p in predicted]
    tau = stats.kendalltau([p.predicted_ms for p in predicted], [p.median_ms for p in predicted]).statistic
    fastest = min(uniforms, key=lambda p: p.median_ms)
    below = [p.source for p in predicted if p.predicted_ms < fastest.median_ms * (1 - max(margin, 0.05))]
    check = {"points": len(predicted), "median_relative_error": statistics.median(errors), "max_relative_error": max(errors),
             "kendall_tau": None if tau != tau else float(tau),  # NaN where every prediction ties
             "fastest_uniform": fastest.source, "fastest_uniform_measured_ms": fastest.median_ms,
             "predicted_below_fastest_uniform": below}
    problems = []
    if check["median_relative_error"] > PREDICTION_TOLERANCE:
        problems.append(f"its predictions are off by {check['median_relative_error']:.0%} (median) on the {len(predicted)} "
                        "policies this build measured")
    if below:
        problems.append(f"it predicts {len(below)} of them faster than {fastest.source}, the fastest uniform policy, "
                        f"measured at {fastest.median_ms:.3f} ms")
    check["note"] = (None if not problems else "the cost model does not fit this machine now: " + "; ".join(problems)
                     + ", so the searched layers may not be the fastest for their fidelity (every point above was "
                     "measured); profile again on a quiet machine and check with mpqc costmodel validate")
    return check
