"""Does the boundary fit fail because the machine is noisy, or because its structure is wrong?

`mpqc profile` fits its boundary terms (mpqc.costmodel.fit) to the median of round medians of
the uniform policies and 12 random mixed ones, and refuses the fit when its residual exceeds the
noise floor. On a shared machine both numbers are large, and the refusal alone cannot say which
one is at fault. This script times the same fitting policies as `mpqc profile` (same seed, same
lowering) in interleaved rounds, keeps every single run, and for several statistics of those runs
reports

- the noise floor: the median over policies of |statistic(even rounds) - statistic(odd rounds)| /
  statistic(all rounds), as mpqc.bench.latency.InterleavedTimes.noise_floor defines it;
- the relative RMS residual of the boundary fit made on that statistic (fit_boundaries, forced).

Interference on a shared machine only adds time, so low quantiles shed most of it: if the fit's
residual stays far above a low quantile's noise floor, the fit's terms cannot describe the model's
latency on this CPU, and more rounds will not help.

    python benchmarks/latency_estimators.py [--model efficientnet-lite0] [--rounds 12]

Writes benchmarks/results/latency_estimators_<model>.json. It needs the model's layers in the
latency table (run `mpqc profile MODEL --target ort-cpu` first, or benchmarks/costmodel.py).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

from mpqc.backends.base import backend_for
from mpqc.bench.latency import first_batch
from mpqc.costmodel.fit import EDGE_KINDS, edge_counts, fit_boundaries, fitting_policies, layer_terms
from mpqc.costmodel.table import LatencyTable
from mpqc.data.proxy import proxy_feeds
from mpqc.files import write_atomically
from mpqc.lower.lowering import Lowering
from mpqc.passes.analysis import analyze
from mpqc.passes.layer_graph import layer_edges
from mpqc.pipeline.options import BuildOptions
from mpqc.targets import load_target
from mpqc.versions import provenance

RESULTS = pathlib.Path(__file__).resolve().parent / "results"

# name -> statistic of an array [..., round, run] over its last two axes
STATISTICS = {
    "median_of_round_medians": lambda x: np.median(np.median(x, axis=-1), axis=-1),  # what mpqc profile fits on
    "median_of_round_p10": lambda x: np.median(np.percentile(x, 10, axis=-1), axis=-1),
    "p10_of_all_runs": lambda x: np.percentile(x.reshape(*x.shape[:-2], -1), 10, axis=-1),
    "min_of_all_runs": lambda x: np.min(x.reshape(*x.shape[:-2], -1), axis=-1),
}


def time_rounds(runners, feeds, rounds: int, runs: int, warmup: int) -> np.ndarray:
    """[runner, round, run] milliseconds; each round times every runner, starting one further along."""
    times = np.zeros((len(runners), rounds, runs))
    for r in range(rounds):
        for i in [(r + k) % len(runners) for k in range(len(runners))]:
            for _ in range(warmup):
                runners[i].run(feeds)
            for k in range(runs):
                start = time.perf_counter()
                runners[i].run(feeds)
                times[i, r, k] = (time.perf_counter() - start) * 1e3
    return times


def boundaries(edges, policy) -> int:
    """Edges whose two layers disagree on quantizing activations (where Q/DQ and layout changes go)."""
    counts = dict(zip(EDGE_KINDS, edge_counts(edges, policy)))
    return int(counts[(False, True)] + counts[(True, False)])


def run(model: str, rounds: int, runs: int, warmup: int, fit_policies: int, seed: int) -> dict:
    target = load_target("ort-cpu")
    analysis = analyze(model)
    options = BuildOptions(model=model)
    calibration, _ = proxy_feeds(options.proxy_source(), analysis.loaded)
    timing = first_batch(analysis.loaded.example.eval_feeds()[0], 1)
    table = LatencyTable.for_target(target)
    terms = layer_terms(analysis, target, table, 1)
    lowering = Lowering.prepare(analysis, target, calibration, options.calibration_settings())
    policies = fitting_policies(analysis, target, fit_policies, seed)
    backend = backend_for(target)
    runners = [backend.load(lowering.lower(policy), target) for policy in policies]
    started = time.perf_counter()
    times = time_rounds(runners, timing, rounds, runs, warmup)
    edges = layer_edges(analysis.model, analysis.layers)
    statistics = {}
    for name, statistic in STATISTICS.items():
        whole, even, odd = statistic(times), statistic(times[:, 0::2]), statistic(times[:, 1::2])
        noise = float(np.median(np.abs(even - odd) / whole))
        fit = fit_boundaries(analysis, target, terms, policies, 1, whole, noise, force=True)
        statistics[name] = {"noise_floor": noise, "fit_rms_relative_residual": fit["fit_rms_relative_residual"],
                            "fit_refused_because": fit["forced"] or None, "ms": [float(v) for v in whole]}
        print(f"{model} {name}: noise floor {noise:.1%}, fit residual {fit['fit_rms_relative_residual']:.1%}", flush=True)
    fp32 = [p.source for p in policies].index("uniform:fp32")
    return {
        "format": "mpqc.latency_estimators/1",
        "model": model,
        "target": target.name,
        "batch": 1,
        "rounds": rounds,
        "runs_per_round": runs,
        "warmup_per_round": warmup,
        "policies": [{"source": p.source, "boundaries": boundaries(edges, p),
                      "counts": {k: list(p.as_dict.values()).count(k) for k in sorted(set(p.as_dict.values()))}}
                     for p in policies],
        "edges": len(edges),
        "statistics": statistics,
        "slowest_over_fp32": {name: float(max(s["ms"]) / s["ms"][fp32]) for name, s in statistics.items()},
        "timing_s": time.perf_counter() - started,
    } | provenance()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--fit-policies", type=int, default=12, help="random policies beside the uniform ones (as mpqc profile)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = run(args.model, args.rounds, args.runs, args.warmup, args.fit_policies, args.seed)
    write_atomically(RESULTS / f"latency_estimators_{args.model}.json", json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
