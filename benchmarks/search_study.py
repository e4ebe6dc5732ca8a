"""Can the methods be told apart? Policies searched on three proxies, several seeds and budgets.

For one bundled model, every method variant scores the layers on three proxies (the transfer
benchmark's: the full training data, a random 4% of it, another dataset of the same size), for
each seed; the ILP picks a policy at three BitOps budgets between all-INT4 and all-INT8
(w4a8/w8a8 convs, w4a16/w8a8 linear layers); each policy is lowered after one shared calibration
and its metric measured on the held-out set (top-1 accuracy where there are labels, else top-1
agreement with FP32, and the KL divergence of its softmax from FP32's). efficientnet-lite0 is
measured on 96 crops of each of five held-out photographs (mpqc.data.photos.heldout_study_crops),
and its intervals also resample the photographs. Variants:

* output (the default method), qerror, hawq, limpq, seam, asga: the methods as `mpqc build
  --method` runs them (trained methods for --iterations iterations, the default budget);
* limpq+gmpq: limpq with GMPQ's attribution term;
* initial-steps: limpq's indicators before any training (budget 0): what the weights alone say;
* random: random per-layer importances priced like a sensitivity (--random draws per seed and budget).

seam is limpq plus SEAM's two terms, so "seam without its terms" is limpq itself, trained from
the same seed on the same batches: the seam-vs-limpq comparison below is the terms' ablation.

Reported (`summary`): per variant, proxy and budget the metric over seeds (mean, min, max); for
the 4% and other-dataset proxies the gap to the full proxy's mean against the full proxy's seed
spread; paired differences (same seed, proxy and budget) of every variant against random and
against qerror with bootstrap 95% intervals; each variant's 4% and other-dataset policies against
its full-proxy ones (same seed and budget); the seam-vs-limpq ablation (paired difference and
how many policies are identical); each variant's scoring wall time, and for trained variants the
iterations run and whether the convergence check stopped them.

    python benchmarks/search_study.py --model mnist-dsnet [--seeds 0 1 2] [--variants qerror limpq ...] [--update]

--update keeps the runs of the other variants in an existing result (same model and seeds).

Writes benchmarks/results/search_study_<model>.json after every scored variant ("complete": false
until every run asked for is in). Every number in it is measured by this run, or with --update by
the earlier run that wrote it (every run records its date and the load average before it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time

import numpy as np
import onnx_ir as ir
from transfer import PROXIES, RESULTS, Evaluator, Sweeps  # (the same proxies, budgets and evaluation)

from mpqc.data.photos import heldout_study_crops
from mpqc.examples import load_example
from mpqc.files import write_atomically
from mpqc.passes.analysis import analyze
from mpqc.pipeline.options import BuildOptions
from mpqc.pipeline.search import sensitivity_context
from mpqc.sensitivity.defaults import INDICATOR_ITERATIONS
from mpqc.sensitivity.methods import scored_layers
from mpqc.targets import load_target
from mpqc.versions import provenance

# variant -> (method, BuildOptions fields it changes)
VARIANTS = {
    "output": ("output", {}),  # the default method
    "qerror": ("qerror", {}),
    "initial-steps": ("limpq", {"iterations": 0}),
    "limpq": ("limpq", {}),
    "seam": ("seam", {}),
    "asga": ("asga", {}),
    "limpq+gmpq": ("limpq", {"gmpq": True}),
    "hawq": ("hawq", {}),  # last: Hutchinson to tolerance on a small proxy is the slowest here
}
PROXY_NAMES = ("full", "4pct", "other")
BOOTSTRAP = 2000
HELDOUT_PER_PHOTO = 96  # efficientnet-lite0: crops of each of the five held-out photographs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, choices=sorted(PROXIES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--iterations", type=int, default=INDICATOR_ITERATIONS, help="indicator training iterations")
    parser.add_argument("--full", type=int, help="size of the full proxy (as in benchmarks/transfer.py)")
    parser.add_argument("--random", type=int, default=4, help="random-importance policies per budget and seed")
    parser.add_argument("--heldout-per-photo", type=int, default=HELDOUT_PER_PHOTO,
                        help="efficientnet-lite0: held-out crops per photograph (five photographs)")
    parser.add_argument("--update", action="store_true",
                        help="keep the other variants' runs of an existing --out (same model and seeds) and add these")
    parser.add_argument("--out", help="output JSON (default benchmarks/results/search_study_<model>.json)")
    args = parser.parse_args()
    out = pathlib.Path(args.out) if args.out else RESULTS / f"search_study_{args.model}.json"

    example = load_example(args.model)
    analysis = analyze(args.model)
    target = load_target("ort-cpu")
    sweeps = Sweeps(analysis, target, milliseconds=False)
    heldout = None
    if args.model == "efficientnet-lite0":  # more crops of more photographs than the example's 128 of 4
        crops, sources = heldout_study_crops(args.heldout_per_photo)
        heldout = ({example.INPUT_NAMES[0]: crops}, None, sources)
    evaluate = Evaluator(analysis, target, example, runs=1, heldout=heldout)  # the metric only: nothing here is timed
    float_model = ir.to_proto(analysis.model)
    candidates = {layer.name: sweeps.bitops_candidates[layer.name] for layer in analysis.layers}
    budgets = sweeps.budgets["bitops"]

    record = {
        "benchmark": "search_study",
        "model": args.model,
        "target": target.name,
        "metric": evaluate.description,
        "float_metric": evaluate.metric(evaluate.reference),
        **provenance(),
        "settings": {"seeds": args.seeds, "variants": {v: VARIANTS[v][0] + "".join(f" {k}={x}" for k, x in VARIANTS[v][1].items())
                                                       for v in args.variants},
                     "iterations": args.iterations, "random_per_budget_and_seed": args.random,
                     "candidates": "w4a8/w8a8 convs, w4a16/w8a8 linear layers", "budgets_bitops": budgets,
                     "calibration": "the example's default proxy samples, the same for every policy"},
        "uniform": {},
        "complete": False,
        "runs": [],
        "random": [],
    }
    if heldout is not None:
        record["heldout"] = {"samples": len(heldout[2]), "sources": {name: heldout[2].count(name) for name in dict.fromkeys(heldout[2])},
                             "description": "crops of skimage's chelsea, rocket, stereo_motorcycle, retina and matplotlib's "
                                            "grace_hopper.jpg (mpqc.data.photos.heldout_study_crops)"}
    if args.update and out.exists():
        earlier = json.loads(out.read_text())
        if earlier["model"] != args.model or earlier["settings"]["seeds"] != args.seeds:
            raise SystemExit(f"--update: {out} is of another model or seeds")
        record["runs"] = [r for r in earlier["runs"] if r["variant"] not in args.variants]
        record["settings"]["variants"] = earlier["settings"]["variants"] | record["settings"]["variants"]
    studied = [v for v in VARIANTS if v in record["settings"]["variants"]]
    for name in ("w8a8", "w4"):
        assignments = {n: ("w4a16" if "w4a16" in candidates[n] else "w4a8") if name == "w4" else name for n in sweeps.names}
        record["uniform"][name] = {**sweeps.describe(assignments), **_measured(evaluate(assignments))}

    proxies_described = {}
    for seed in args.seeds:
        for proxy in PROXIES[args.model](seed, args.full):
            proxies_described[proxy.name] = {"description": proxy.description, "samples": len(next(iter(proxy.feeds.values())))}
            for variant in args.variants:
                method, changes = VARIANTS[variant]
                options = dataclasses.replace(BuildOptions(model=args.model, seed=seed, iterations=args.iterations), **changes)
                context = sensitivity_context(analysis, target, float_model, proxy.feeds, candidates, options, proxy.labels)
                load = os.getloadavg()[0]
                clock = time.perf_counter()
                scored = scored_layers(method, context)
                scoring_s = time.perf_counter() - clock
                convergence = scored.details.get("convergence") or {}
                for point, budget in enumerate(budgets):
                    assignments, _ = sweeps.solve("bitops", budget, scored.scores)
                    record["runs"].append({
                        "variant": variant, "proxy": proxy.name, "seed": seed, "point": point, "budget": budget,
                        "scoring_s": scoring_s, "load_average_before": load, "date": time.strftime("%Y-%m-%d %H:%M"),
                        "iterations": scored.details.get("iterations"), "converged": convergence.get("converged"),
                        "spearman_with_initial": _step_correlations(scored.details),
                        **sweeps.describe(assignments), **_measured(evaluate(assignments)), "assignments": assignments})
                print(f"seed {seed} {proxy.name:<5} {variant:<13} {scoring_s:7.1f} s: "
                      + ", ".join(f"{r['metric']:.1f}" for r in record["runs"][-len(budgets):]), flush=True)
                record["settings"]["proxies"] = proxies_described
                record["summary"] = summarize(record["runs"], record["random"], studied, len(budgets))
                write_atomically(out, json.dumps(record, indent=1) + "\n")
        rng = np.random.default_rng((seed, 99))
        for point, budget in enumerate(budgets):
            for draw in range(args.random):
                assignments, _ = sweeps.solve("bitops", budget, sweeps.random_loss("bitops", rng))
                record["random"].append({"seed": seed, "draw": draw, "point": point, "budget": budget,
                                         **sweeps.describe(assignments), **_measured(evaluate(assignments))})
    record["summary"] = summarize(record["runs"], record["random"], studied, len(budgets))
    record["complete"] = True
    write_atomically(out, json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: v for k, v in record["summary"].items() if k != "cells"}, indent=1))
    print(f"wrote {out}")
    return 0


def _step_correlations(details: dict) -> dict | None:
    """A trained variant's Spearman correlations between learned and initial steps (per kind and
    bit-width, and for the weight step gaps): how much the training changed the indicators' order."""
    steps = details.get("steps")
    if not steps:
        return None
    found = {f"{kind} {bits}": row["spearman_with_initial"] for kind in ("weight", "activation")
             for bits, row in steps.get(kind, {}).items()}
    return found | {f"weight gap {pair}": rho for pair, rho in steps.get("weight_gap_spearman_with_initial", {}).items()}


def _measured(result: dict) -> dict:
    return {key: result[key] for key in ("metric", "kl_divergence", "by_source") if key in result}


def _interval(values: np.ndarray, seed: int = 0) -> list[float] | None:
    """Bootstrap 95% interval of the mean."""
    if len(values) < 2:
        return None
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (BOOTSTRAP, len(values)))].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def _paired(rows: dict, a: str, b, key: str = "metric") -> dict | None:
    """a - b over the cells (seed, proxy, point) both have; b is a variant or a dict of cell -> result."""
    other = b if isinstance(b, dict) else {tuple(cell): r for (v, *cell), r in rows.items() if v == b}
    return _differences([(r, other[tuple(cell)]) for (v, *cell), r in rows.items() if v == a and tuple(cell) in other], key)


def _differences(pairs: list[tuple[dict, dict]], key: str) -> dict | None:
    """Mean of x - y over the pairs of results, with its bootstrap interval over the pairs, and where
    the results carry metrics per held-out source, an interval that also resamples the sources."""
    if not pairs:
        return None
    diffs = np.array([x[key] - y[key] for x, y in pairs])
    found = {"cells": len(diffs), "mean": float(diffs.mean()), "interval": _interval(diffs), "wins": int((diffs > 0).sum()),
             "losses": int((diffs < 0).sum())}
    if all("by_source" in x and "by_source" in y for x, y in pairs):
        found["interval_clustered_by_source"] = _clustered_interval(pairs, key)
    return found


def _clustered_interval(pairs: list[tuple[dict, dict]], key: str, seed: int = 0) -> list[float] | None:
    """Bootstrap 95% interval of the mean difference, drawing the held-out sources (photographs) and
    the cells with replacement: crops of one photograph are not independent samples."""
    if len(pairs) < 2:
        return None
    sources = list(pairs[0][0]["by_source"])
    samples = np.array([pairs[0][0]["by_source"][name]["samples"] for name in sources], dtype=np.float64)
    per_source = np.array([[x["by_source"][name][key] - y["by_source"][name][key] for name in sources] for x, y in pairs])
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(len(sources), np.full(len(sources), 1 / len(sources)), size=BOOTSTRAP) * samples
    cells = rng.integers(0, len(pairs), (BOOTSTRAP, len(pairs)))
    means = ((per_source[cells] * weights[:, None, :]).sum(-1) / weights.sum(-1)[:, None]).mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def _mean_result(results: list[dict]) -> dict:
    """The mean of several policies' results (random draws), per source too where they have them."""
    mean = {key: float(np.mean([r[key] for r in results])) for key in ("metric", "kl_divergence")}
    if all("by_source" in r for r in results):
        mean["by_source"] = {name: {"samples": row["samples"],
                                    **{key: float(np.mean([r["by_source"][name][key] for r in results]))
                                       for key in ("metric", "kl_divergence")}}
                             for name, row in results[0]["by_source"].items()}
    return mean


def summarize(runs: list[dict], randoms: list[dict], variants, points: int) -> dict:
    rows = {(r["variant"], r["seed"], r["proxy"], r["point"]): r for r in runs}
    random_mean = {}
    for r in randoms:
        random_mean.setdefault((r["seed"], r["point"]), []).append(r)
    cells = []
    for variant in variants:
        for point in range(points):
            full = [r["metric"] for (v, s, p, pt), r in rows.items() if v == variant and p == "full" and pt == point]
            for proxy in PROXY_NAMES:
                members = [r for (v, s, p, pt), r in rows.items() if v == variant and p == proxy and pt == point]
                if not members:
                    continue
                metrics = [r["metric"] for r in members]
                cell = {"variant": variant, "proxy": proxy, "point": point, "seeds": len(members),
                        "metric_mean": float(np.mean(metrics)), "metric_min": min(metrics), "metric_max": max(metrics),
                        "kl_divergence_mean": float(np.mean([r["kl_divergence"] for r in members]))}
                if proxy != "full" and full:
                    gap = cell["metric_mean"] - float(np.mean(full))
                    spread = float(np.ptp(full))
                    cell |= {"gap_to_full_points": gap, "full_seed_spread_points": spread,
                             "within_full_seed_spread": bool(abs(gap) <= spread)}
                cells.append(cell)
    # Random policies are drawn per seed and budget, not per proxy: every proxy's cell pairs with that mean.
    random_by_cell = {(s, p, pt): _mean_result(random_mean[(s, pt)]) for (_, s, p, pt) in rows if (s, pt) in random_mean}
    versus, proxy_gaps = {}, {}
    for variant in variants:
        versus[variant] = {"minus_random": _paired(rows, variant, random_by_cell),
                           "minus_random_kl": _paired(rows, variant, random_by_cell, "kl_divergence"),
                           "minus_qerror": _paired(rows, variant, "qerror") if variant != "qerror" and "qerror" in variants else None}
        # The same seed and budget searched on a small or another proxy against the full one.
        proxy_gaps[variant] = {proxy: {key: _differences([(r, rows[(variant, s, "full", pt)]) for (v, s, p, pt), r in rows.items()
                                                          if v == variant and p == proxy and (variant, s, "full", pt) in rows], key)
                                       for key in ("metric", "kl_divergence")}
                               for proxy in PROXY_NAMES[1:]}
    ablation = None
    if "seam" in variants and "limpq" in variants:
        same = [rows[("seam", *cell)]["assignments"] == r["assignments"]
                for (v, *cell), r in rows.items() if v == "limpq" and ("seam", *cell) in rows]
        ablation = {"seam_minus_limpq": _paired(rows, "seam", "limpq"), "identical_policies": int(sum(same)),
                    "policies": len(same)}
    cost = {}
    for variant in variants:
        members = [r for (v, s, p, pt), r in rows.items() if v == variant and pt == 0]
        if members:
            cost[variant] = {"scoring_s_mean": float(np.mean([r["scoring_s"] for r in members])),
                             "scoring_s_max": float(max(r["scoring_s"] for r in members)),
                             "iterations": [r["iterations"] for r in members],
                             "converged": [r["converged"] for r in members],
                             "spearman_with_initial": [r.get("spearman_with_initial") for r in members]}
    return {"cells": cells, "paired_differences_points": versus, "proxy_minus_full": proxy_gaps,
            "seam_terms_ablation": ablation, "cost": cost,
            "random_metric_mean": float(np.mean([r["metric"] for r in randoms])) if randoms else None}


if __name__ == "__main__":
    sys.exit(main())
