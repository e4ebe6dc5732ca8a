"""Do the learned indicators learn? LSQ steps after indicator training against their initial values.

limpq and seam score a layer by its learned LSQ steps (mpqc.sensitivity.indicators), trained with
LIMPQ's recipe for an iteration budget. The steps start from the weights' spread (and, for
activations, the float model's first batch), so an indicator that stays near its initial value
says nothing the weights did not. For each model, proxy (the transfer benchmark's full proxy and
its random 4%, seed as given) and iteration budget this script trains the indicators and reports:

* what the training did: iterations run, whether the convergence check stopped it (no step moved
  more than 1% over the last 10% of the budget) and at which iteration, the largest relative
  change of any step over each such window, wall and CPU seconds;
* how far the steps moved: learned / initial per kind and bit-width (min, median, max over layers),
  and Spearman's rho between the learned and the initial steps over layers, per bit-width and for
  the gap s_w(4) - s_w(8) that decides w4a8 against w8a8 in the ILP (IndicatorResult.step_summary);
* the policies the ILP picks at the transfer benchmark's three BitOps budgets, their metric on ONNX
  Runtime CPU, and how many layers differ from the policy of the untrained steps (budget 0).

    python benchmarks/indicator_steps.py --model mnist-cnn --iterations 0 300 1000 3000
    python benchmarks/indicator_steps.py --model efficientnet-lite0 --iterations 0 300 --proxies full 4pct

Writes benchmarks/results/indicator_steps_<model>.json unless --out says otherwise. Every number in
it is measured by this run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import onnx_ir as ir
import torch
from transfer import PROXIES, RESULTS, Evaluator, Sweeps  # (the same proxies, budgets and evaluation)

from mpqc.examples import load_example
from mpqc.files import write_atomically
from mpqc.passes.analysis import analyze
from mpqc.pipeline.options import BuildOptions
from mpqc.pipeline.search import sensitivity_context
from mpqc.sensitivity.defaults import INDICATOR_ITERATIONS
from mpqc.sensitivity.indicators import train_indicators
from mpqc.sensitivity.sharpness import SharpnessSettings
from mpqc.targets import load_target
from mpqc.versions import provenance


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, choices=sorted(PROXIES))
    parser.add_argument("--iterations", type=int, nargs="+", default=[0, INDICATOR_ITERATIONS],
                        help="iteration budgets; 0: the untrained initial steps")
    parser.add_argument("--proxies", nargs="+", default=["full"], choices=["full", "4pct", "other"])
    parser.add_argument("--full", type=int, help="size of the full proxy (as in benchmarks/transfer.py)")
    parser.add_argument("--method", choices=["seam", "limpq", "asga"], default="seam")
    parser.add_argument("--fixed-ends", action="store_true", help="hold the first and last layer at 8 bits (LIMPQ)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--out", help="output JSON (default benchmarks/results/indicator_steps_<model>.json)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    example = load_example(args.model)
    analysis = analyze(args.model)
    target = load_target("ort-cpu")
    sweeps = Sweeps(analysis, target, milliseconds=False)
    evaluate = Evaluator(analysis, target, example, runs=1)  # the metric only; latency is the transfer benchmark's
    candidates = {layer.name: sweeps.bitops_candidates[layer.name] for layer in analysis.layers}
    proxies = {p.name: p for p in PROXIES[args.model](args.seed, args.full)}
    options = BuildOptions(model=args.model, seed=args.seed)

    out = args.out or RESULTS / f"indicator_steps_{args.model}.json"
    record = {
        "benchmark": "indicator_steps",
        "model": args.model,
        "method": args.method,
        "fixed_ends": args.fixed_ends,
        "proxies": {name: {"description": proxies[name].description,
                           "samples": len(next(iter(proxies[name].feeds.values())))} for name in args.proxies},
        "seed": args.seed,
        "torch_threads": torch.get_num_threads(),
        "metric": evaluate.description,
        **provenance(),
        "complete": False,  # true once every run asked for is in; a run cut short keeps what it measured
        "results": [],
    }
    results, untrained = record["results"], {}
    for proxy_name in args.proxies:
        proxy = proxies[proxy_name]
        base = sensitivity_context(analysis, target, ir.to_proto(analysis.model), proxy.feeds, candidates, options,
                                   proxy.labels)
        for budget in sorted(args.iterations):
            context = dataclasses.replace(base, epochs=None, iterations=budget, fixed_ends=args.fixed_ends)
            load = os.getloadavg()
            wall, cpu = time.perf_counter(), time.process_time()
            result = train_indicators(context, regularize=args.method == "seam", gmpq=False,
                                      sharpness=SharpnessSettings() if args.method == "asga" else None)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            row = {"proxy": proxy_name, "samples": base.sample_count, "batch_size": base.batch_size, "iterations_budget": budget,
                   "iterations": result.optimizer_steps, "seconds": wall, "cpu_seconds": cpu,
                   "load_average_before": load[0], "load_average_after": os.getloadavg()[0],
                   "convergence": result.convergence.to_json(), "policies": []}
            if budget > 0:
                row["steps"] = result.step_summary()
            if result.sharpness is not None:
                row["sharpness"] = result.sharpness
            for point, bitops_budget in enumerate(sweeps.budgets["bitops"]):
                assignments, _ = sweeps.solve("bitops", bitops_budget, result.scores)
                measured = evaluate(assignments)
                policy = {"point": point, "budget": bitops_budget, **sweeps.describe(assignments),
                          "metric": measured["metric"], "kl_divergence": measured["kl_divergence"]}
                if budget == 0:
                    untrained[(proxy_name, point)] = assignments
                elif (proxy_name, point) in untrained:
                    policy["layers_unlike_untrained"] = sum(
                        assignments[n] != p for n, p in untrained[(proxy_name, point)].items())
                policy["assignments"] = assignments
                row["policies"].append(policy)
            results.append(row)
            _print(row)
            write_atomically(out, json.dumps(record, indent=1) + "\n")  # after every run: a long one may be cut short
    record["complete"] = True
    write_atomically(out, json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


def _print(row: dict) -> None:
    convergence = row["convergence"]
    text = (f"{row['proxy']:>5} budget {row['iterations_budget']:>5}: {row['iterations']} iterations, "
            f"converged {convergence['converged']} at {convergence['iteration']}, {row['seconds']:.0f} s; "
            + ", ".join(f"bitops@{p['point']} {p['metric']:.2f}" for p in row["policies"]))
    steps = row.get("steps")
    if steps:
        ratio = steps["weight"]["4"]["learned_over_initial"]
        text += (f"; w4 steps x{ratio['min']:.2f}-{ratio['max']:.2f}, rho w4 {steps['weight']['4']['spearman_with_initial']}"
                 f" w8 {steps['weight']['8']['spearman_with_initial']} gap {steps['weight_gap_spearman_with_initial']}")
    print(text, flush=True)


if __name__ == "__main__":
    sys.exit(main())
