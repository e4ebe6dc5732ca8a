"""`mpqc search validate`: does a method's predicted loss rank real policies? The accuracy twin of
`mpqc costmodel validate`.

Random policies (each tie group draws one precision) are lowered from one calibration and their
fidelity is measured on held-out data, once, for every method asked. Each method then scores the
layers on the proxy data; its predicted loss of a policy is the ILP objective (the sum of its
per-layer scores). Reported per method: Kendall tau between predicted loss and measured error
(1 - cosine against FP32), with a bootstrap interval over the random policies, and at three
BitOps budgets (the quartiles of the random policies' BitOps) the fidelity of the policy the ILP
picks and its percentile among the random policies that fit the same budget.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from collections.abc import Callable

import numpy as np
import onnx_ir as ir
from scipy import stats

from mpqc import progress
from mpqc.backends.base import backend_for
from mpqc.costmodel.policies import random_policy
from mpqc.data.proxy import proxy_feeds, proxy_labels
from mpqc.errors import MpqcError
from mpqc.files import check_output_folder, replace_folder
from mpqc.lower.lowering import Lowering
from mpqc.passes.analysis import analyze
from mpqc.pipeline.fidelity import evaluation_data, fidelity_of
from mpqc.pipeline.measured import FRONT_METRIC
from mpqc.pipeline.options import BuildOptions
from mpqc.pipeline.search import prepare_search
from mpqc.search.problem import Budgets
from mpqc.targets import load_target

_QUARTILES = (25, 50, 75)


def _fidelity(lowering: Lowering, policy, loaded, eval_feeds, reference, labels, data) -> dict:
    runner = backend_for(lowering.target).load(lowering.lower(policy), lowering.target)
    return fidelity_of(reference, runner.run_batched(eval_feeds), loaded, labels, data)


def _bootstrap(values: np.ndarray, statistic, rounds: int, seed: int) -> list[float]:
    """The 2.5th and 97.5th percentiles of `statistic` over resamples of the random policies."""
    rng = np.random.default_rng(seed)
    draws = [statistic(rng.integers(0, len(values), len(values))) for _ in range(rounds)]
    draws = [d for d in draws if np.isfinite(d)]
    return [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))] if draws else [float("nan")] * 2


def validate_search(options: BuildOptions, methods: list[str], policies: int = 100, bootstrap: int = 1000,
                    after_method: Callable[[dict], None] | None = None) -> dict:
    """`options` gives model, target, proxy, seed and the scoring settings; its method is ignored.
    A method that cannot score this model (limpq on a model that is not a classifier, say) is
    recorded with the reason and the others still run. `after_method` gets the result so far after
    each method: a long run keeps what it measured."""
    started = time.perf_counter()
    target = load_target(options.target)
    with progress.stage(f"loading {options.model}"):
        analysis = analyze(options.model)
    feeds, origin = proxy_feeds(options.proxy_source(), analysis.loaded)
    labels_proxy = proxy_labels(options.proxy_source(), analysis.loaded, len(next(iter(feeds.values()))))
    with progress.stage("calibrating"):
        lowering = Lowering.prepare(analysis, target, feeds, options.calibration_settings())
    eval_feeds, labels, data = evaluation_data(analysis.loaded, feeds)
    float_runner = backend_for(target).load(lowering.float_model.SerializeToString(), target)
    reference = float_runner.run_batched(eval_feeds)

    # Scored once with zero loss for BitOps per policy (no table needed: the budgets are BitOps).
    base = dataclasses.replace(options, policy="search", budget_ms=None, budget_bitops=1e300, budget_bytes=None, pareto=None)
    rng = np.random.default_rng(options.seed + 1000)
    randoms = [random_policy(analysis, target, rng, f"random-{i}") for i in range(policies)]
    rows = []
    for policy in progress.bar(randoms, "measuring random policies", unit="policy"):
        fidelity = _fidelity(lowering, policy, analysis.loaded, eval_feeds, reference, labels, data)
        rows.append({"policy": policy.source, "layers": policy.as_dict, "fidelity": fidelity[FRONT_METRIC], "fidelity_all": fidelity})
    measured = np.array([r["fidelity"] for r in rows])
    error = 1.0 - measured

    results = {}
    result = {
        "format": "mpqc.search_validation/1",
        "model": options.model,
        "target": target.name,
        "proxy": {"origin": origin, "samples": len(next(iter(feeds.values())))},
        "fidelity_data": {"data": data, "samples": len(reference), "metric": FRONT_METRIC, "error": f"1 - {FRONT_METRIC}"},
        "random_policies": len(rows),
        "seed": options.seed,
        "methods": results,
        "rows": rows,
    }
    for method in methods:
        clock = time.perf_counter()
        try:
            with progress.stage(f"scoring layers with {method}"):
                problem = prepare_search(analysis, target, ir.to_proto(analysis.model), feeds,
                                         dataclasses.replace(base, method=method), labels_proxy, lambda: lowering)
        except MpqcError as exc:
            results[method] = {"refused": str(exc), "scoring_s": time.perf_counter() - clock}
            if after_method is not None:
                after_method(result | {"wall_s": time.perf_counter() - started})
            continue
        scoring_s = time.perf_counter() - clock
        predicted = np.array([sum(problem.loss[item] for item in r["layers"].items()) for r in rows])
        bitops = np.array([sum(problem.bitops[item] for item in r["layers"].items()) for r in rows])
        tau = float(stats.kendalltau(predicted, error).statistic)
        at_budgets = []
        for quartile in _QUARTILES:
            budget = float(np.percentile(bitops, quartile))
            try:
                policy, _ = dataclasses.replace(problem, budgets=Budgets(bitops=budget)).solve(None)
            except MpqcError as exc:
                at_budgets.append({"quartile": quartile, "bitops_budget": budget, "error": str(exc)})
                continue
            fidelity = _fidelity(lowering, policy, analysis.loaded, eval_feeds, reference, labels, data)
            feasible = bitops <= budget * (1 + 1e-9)
            percentile = float(100 * np.mean(measured[feasible] <= fidelity[FRONT_METRIC]))
            at_budgets.append({
                "quartile": quartile, "bitops_budget": budget, "fidelity": fidelity[FRONT_METRIC], "fidelity_all": fidelity,
                "random_policies_within_budget": int(feasible.sum()), "percentile_among_random": percentile,
                "percentile_interval": _bootstrap(measured[feasible], lambda idx, f=fidelity[FRONT_METRIC], m=measured[feasible]:
                                                  float(100 * np.mean(m[idx] <= f)), bootstrap, options.seed),
                "layers": policy.as_dict,
            })
        results[method] = {
            "scoring_s": scoring_s,
            "scores_cached": problem.scores_cached,
            "kendall_tau_loss_vs_error": tau,
            "kendall_tau_interval": _bootstrap(error, lambda idx: float(stats.kendalltau(predicted[idx], error[idx]).statistic),
                                               bootstrap, options.seed),
            "spearman_loss_vs_error": float(stats.spearmanr(predicted, error).statistic),
            "at_budgets": at_budgets,
            "predicted_loss": predicted.tolist(),
            "scoring": problem.scoring,
        }
        if after_method is not None:
            after_method(result | {"wall_s": time.perf_counter() - started})
    return result | {"wall_s": time.perf_counter() - started}


def validate_search_to_folder(options: BuildOptions, methods: list[str], out: pathlib.Path, **settings) -> dict:
    """validate_search written to `out`/search_validation.json through a staging folder; an `out`
    holding anything but an earlier validation is refused before any work."""
    check_output_folder(out, "search_validation.json", "mpqc search validate")
    options.check_training_flags(methods)
    result = validate_search(options, methods, **settings)
    refused = [r["refused"] for r in result["methods"].values() if "refused" in r]
    if len(refused) == len(result["methods"]):
        raise MpqcError(refused[0] if len(refused) == 1 else "; ".join(f"{m}: {r['refused']}" for m, r in result["methods"].items()))
    replace_folder(out, lambda staging: (staging / "search_validation.json").write_text(json.dumps(result, indent=2) + "\n"))
    return result
