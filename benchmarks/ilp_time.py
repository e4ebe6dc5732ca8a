"""Time of the precision ILP on a seeded random problem the size of a mid-sized network.

100 layers x 3 precisions (fp32, w8a8, w4a8), a chain of producer -> consumer edges plus a skip
edge every fourth layer (residual blocks), boundary costs on every edge, and a latency budget at
HAWQ-V3's interpolation points between the fastest and the all-fp32 latency. Each budget is
solved `--repeats` times; the median is the number we quote.

    python benchmarks/ilp_time.py [--layers 100] [--repeats 20] [--out benchmarks/results/ilp_time.json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import numpy as np

from mpqc.costmodel.latency import LatencyModel
from mpqc.files import write_atomically
from mpqc.search.ilp import smallest, solve
from mpqc.versions import provenance

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
PRECISIONS = ("fp32", "w8a8", "w4a8")
LAMBDAS = (0.25, 0.5, 0.75)  # budget = fastest + lambda * (all fp32 - fastest)


def problem(layers: int, seed: int):
    rng = np.random.default_rng(seed)
    names = [f"layer{i}" for i in range(layers)]
    candidates = {name: list(PRECISIONS) for name in names}
    loss, layer_ms = {}, {}
    for name in names:
        # Sensitivities span decades across layers, w4 roughly 10-20x w8 (as qerror scores do).
        w8 = float(rng.lognormal(-7.0, 1.5))
        loss |= {(name, "fp32"): 0.0, (name, "w8a8"): w8, (name, "w4a8"): w8 * float(rng.uniform(10, 20))}
        # INT8 is not always faster (depthwise convs on ORT CPU are slower): speed-ups from 0.6x to 2x.
        fp32 = float(rng.uniform(0.02, 1.0))
        w8_ms = fp32 / float(rng.uniform(0.6, 2.0))
        layer_ms |= {(name, "fp32"): fp32, (name, "w8a8"): w8_ms, (name, "w4a8"): w8_ms * float(rng.uniform(0.7, 1.1))}
    edges = [(names[i], names[i + 1]) for i in range(layers - 1)]
    edges += [(names[i], names[i + 2]) for i in range(0, layers - 2, 4)]
    latency = LatencyModel(
        layer_ms=layer_ms,
        edges=tuple(edges),
        boundary_ms={(False, False): 0.0, (True, False): 0.02, (False, True): 0.03, (True, True): 0.005},
        overhead_ms=0.3,
    )
    return names, candidates, loss, latency


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "ilp_time.json"))
    args = parser.parse_args()

    names, candidates, loss, latency = problem(args.layers, args.seed)
    all_fp32 = latency.predict({name: "fp32" for name in names})
    # The fastest policy is an ILP of its own: boundary costs couple neighbouring layers.
    fastest = smallest(names, candidates, "latency", latency=latency)
    rows = []
    for lam in LAMBDAS:
        budget = fastest + lam * (all_fp32 - fastest)
        times, found = [], None
        for _ in range(args.repeats):
            start = time.perf_counter()
            found = solve(names, candidates, loss, latency=latency, latency_budget_ms=budget)
            times.append(time.perf_counter() - start)
        rows.append({
            "lambda": lam,
            "budget_ms": budget,
            "predicted_ms": found.latency_ms,
            "objective": found.objective,
            "counts": {p: list(found.assignments.values()).count(p) for p in PRECISIONS},
            "median_ms": statistics.median(times) * 1e3,
            "min_ms": min(times) * 1e3,
            "max_ms": max(times) * 1e3,
        })
        print(f"lambda {lam:.2f}  budget {budget:7.3f} ms  median solve {rows[-1]['median_ms']:7.2f} ms  {rows[-1]['counts']}")
    result = {
        "benchmark": "ilp_time",
        "problem": {
            "layers": args.layers,
            "precisions": list(PRECISIONS),
            "edges": len(latency.edges),
            "seed": args.seed,
            "all_fp32_ms": all_fp32,
            "fastest_ms": fastest,
        },
        "repeats": args.repeats,
        "median_ms_at_lambda_0.5": next(r["median_ms"] for r in rows if r["lambda"] == 0.5),
        "rows": rows,
        **provenance(),
    }
    out = write_atomically(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
