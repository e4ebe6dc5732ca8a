"""Do the learned indicators learn? LSQ steps after indicator training against their initial values.

limpq and seam score a layer by its learned LSQ steps (mpqc.sensitivity.indicators). The steps
start at LSQ's initial value, 2 * mean|x| / sqrt(qmax), which depends on the weights alone (and,
for activations, on the proxy data's first batch). For each model and each number of training
epochs this script trains seam's indicators on the full proxy (the transfer benchmark's "full"
proxy, seed 0) and reports:

* how far each weight step moved: learned / initial, per bit-width (min, median, max over layers);
* the Spearman rank correlation, over layers, between the learned s_w(4) - s_w(8) (what decides
  w4a8 against w8a8 in the ILP) and the same difference of the initial steps;
* the policies the ILP picks at the transfer benchmark's three BitOps budgets, and their metric on
  ONNX Runtime CPU, for the learned steps and for the untrained initial steps (epochs 0).

    python benchmarks/indicator_steps.py --model efficientnet-lite0 --epochs 0 3 12
    python benchmarks/indicator_steps.py --model efficientnet-lite0 --epochs 0 3 --step-lrs 0.01 0.1 0.3 \
        --seed 1 --out benchmarks/results/indicator_steps_efficientnet-lite0_step-lr_seed1.json

--step-lrs trains each epoch count at each step learning rate (relative to the initial step, as
mpqc.sensitivity.indicators.STEP_LR): larger rates let the steps move further from their initial
values in the same few optimizer steps. Writes benchmarks/results/indicator_steps_<model>.json
unless --out says otherwise. Every number in it is measured by this run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import numpy as np
import onnx_ir as ir
from scipy.stats import spearmanr
from transfer import PROXIES, RESULTS, Evaluator, Sweeps  # (the same proxies, budgets and evaluation)

from mpqc.examples import load_example
from mpqc.files import write_atomically
from mpqc.passes.analysis import analyze
from mpqc.pipeline.options import BuildOptions
from mpqc.pipeline.search import sensitivity_context
from mpqc.sensitivity.indicators import STEP_LR, train_indicators
from mpqc.targets import load_target
from mpqc.versions import provenance


def step_movement(initial: dict, learned: dict) -> dict:
    """learned / initial weight step per bit-width, summarised over layers."""
    summary = {}
    for bits in sorted({b for steps in learned.values() for b in steps}):
        ratios = [learned[layer][bits] / initial[layer][bits] for layer in learned if bits in learned[layer]]
        summary[str(bits)] = {"min": float(np.min(ratios)), "median": float(np.median(ratios)), "max": float(np.max(ratios))}
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, choices=sorted(PROXIES))
    parser.add_argument("--epochs", type=int, nargs="+", default=[0, 3, 12], help="0: the untrained initial steps")
    parser.add_argument("--full", type=int, help="size of the full proxy (as in benchmarks/transfer.py)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step-lrs", type=float, nargs="+", default=[STEP_LR],
                        help=f"step learning rates, relative to each step's initial value, to train with (default {STEP_LR})")
    parser.add_argument("--out", help="output JSON (default benchmarks/results/indicator_steps_<model>.json)")
    args = parser.parse_args()

    example = load_example(args.model)
    analysis = analyze(args.model)
    target = load_target("ort-cpu")
    sweeps = Sweeps(analysis, target, milliseconds=False)
    evaluate = Evaluator(analysis, target, example, runs=1)  # the metric only; latency is the transfer benchmark's
    candidates = {layer.name: sweeps.bitops_candidates[layer.name] for layer in analysis.layers}
    full = next(p for p in PROXIES[args.model](args.seed, args.full) if p.name == "full")
    options = BuildOptions(model=args.model, seed=args.seed)
    base = sensitivity_context(analysis, target, ir.to_proto(analysis.model), full.feeds, candidates, options, full.labels)

    results, initial = [], None
    runs = [(epochs, step_lr) for epochs in sorted(args.epochs) for step_lr in (args.step_lrs if epochs else [None])]
    for epochs, step_lr in runs:
        clock = time.perf_counter()
        result = train_indicators(dataclasses.replace(base, epochs=epochs, step_lr=step_lr), regularize=True, gmpq=False)
        seconds = time.perf_counter() - clock
        if epochs == 0:
            initial = result.weight_steps
        row = {"epochs": epochs, "step_lr": step_lr, "optimizer_steps": result.optimizer_steps, "seconds": seconds, "policies": []}
        if initial is not None and epochs > 0:
            layers = sorted(result.weight_steps)
            learned_gap = [result.weight_steps[layer][4] - result.weight_steps[layer][8] for layer in layers]
            initial_gap = [initial[layer][4] - initial[layer][8] for layer in layers]
            row["weight_step_learned_over_initial"] = step_movement(initial, result.weight_steps)
            row["spearman_gap_learned_vs_initial"] = float(spearmanr(learned_gap, initial_gap).statistic)
        for point, budget in enumerate(sweeps.budgets["bitops"]):
            assignments, _ = sweeps.solve("bitops", budget, result.scores)
            measured = evaluate(assignments)
            row["policies"].append({"point": point, "budget": budget, **sweeps.describe(assignments),
                                    "metric": measured["metric"], "kl_divergence": measured["kl_divergence"],
                                    "assignments": assignments})
        results.append(row)
        print(f"epochs {epochs:>3} step lr {step_lr}: {seconds:6.1f} s, " + ", ".join(
            f"bitops@{p['point']} {p['metric']:.2f}" for p in row["policies"])
            + (f", spearman vs initial {row['spearman_gap_learned_vs_initial']:.3f}, 4-bit steps x"
               + "{min:.2f}-{max:.2f}".format(**row["weight_step_learned_over_initial"]["4"])
               if "spearman_gap_learned_vs_initial" in row else ""),
            flush=True)

    record = {
        "benchmark": "indicator_steps",
        "model": args.model,
        "method": "seam",
        "proxy": {"description": full.description, "samples": len(next(iter(full.feeds.values())))},
        "seed": args.seed,
        "metric": "top-1 accuracy (%) on the MNIST test split" if evaluate.labels is not None
        else "top-1 agreement with FP32 (%) on crops of the held-out photographs",
        **provenance(),
        "results": results,
    }
    out = write_atomically(args.out or RESULTS / f"indicator_steps_{args.model}.json", json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
