"""`mpqc costmodel validate`: how well the cost model predicts measured end-to-end latency.

Random mixed policies (drawn with another seed than the fit) plus the uniform ones are lowered,
measured, and compared with the prediction. The same rank statistics are computed for BitOps, the
proxy other tools use, and for the purely additive table (no boundary terms), side by side. Every
policy is timed in the same interleaved rounds; the noise floor is how much one policy's round
medians disagree: no predictor can be judged more finely than that, and a machine noisier than
the fit allows is flagged in the result, never reported as a verdict on the cost model.
"""

from __future__ import annotations

import json
import pathlib
import time

import numpy as np
from scipy import stats

from mpqc import progress
from mpqc.backends.base import backend_for
from mpqc.bench.latency import measure_interleaved
from mpqc.costmodel.fit import TOO_NOISY, latency_model, model_key
from mpqc.costmodel.latency import bitops_and_size
from mpqc.costmodel.policies import random_policy, uniform_policies
from mpqc.costmodel.table import LatencyTable
from mpqc.files import check_output_folder, replace_folder
from mpqc.lower.lowering import CalibrationSettings, Lowering
from mpqc.passes.analysis import Analysis
from mpqc.passes.signatures import layer_signature
from mpqc.pipeline.profile import costmodel_inputs
from mpqc.targets import Target


def _agreement(predicted: np.ndarray, measured: np.ndarray) -> dict:
    relative = (predicted - measured) / measured
    return {
        "within_5pct": float(np.mean(np.abs(relative) <= 0.05)),
        "within_10pct": float(np.mean(np.abs(relative) <= 0.10)),
        "mean_abs_rel_error": float(np.mean(np.abs(relative))),
        "kendall_tau": float(stats.kendalltau(predicted, measured).statistic),
        "spearman_rho": float(stats.spearmanr(predicted, measured).statistic),
    }


def _ranks_only(proxy: np.ndarray, measured: np.ndarray) -> dict:
    return {
        "kendall_tau": float(stats.kendalltau(proxy, measured).statistic),
        "spearman_rho": float(stats.spearmanr(proxy, measured).statistic),
    }


def validate(
    analysis: Analysis, target: Target, table: LatencyTable, calibration_feeds, timing_feeds, batch: int,
    calibration: CalibrationSettings = CalibrationSettings(), policies: int = 30, runs: int = 50, noise_repeats: int = 5, seed: int = 1000,
) -> dict:
    started = time.perf_counter()
    model = latency_model(analysis, target, table, batch)
    lowering = Lowering.prepare(analysis, target, calibration_feeds, calibration)
    backend = backend_for(target)
    rng = np.random.default_rng(seed)
    candidates = uniform_policies(analysis, target) + [random_policy(analysis, target, rng, f"random-{i}") for i in range(policies)]
    signatures = {layer.name: layer_signature(analysis.model, layer) for layer in analysis.layers}

    runners = [backend.load(lowering.lower(policy), target) for policy in progress.bar(candidates, "lowering policies", unit="policy")]
    # Interleaved rounds: load that comes and goes hits every policy alike; at least noise_repeats rounds.
    with progress.counter("timing policies", unit="round") as advance:
        times = measure_interleaved(runners, timing_feeds, runs=runs, min_rounds=max(noise_repeats, 2), on_round=lambda _: advance())
    rounds = np.array(times.round_medians_ms)
    rows = []
    for policy, measured_ms, policy_rounds in zip(candidates, times.medians_ms, rounds):
        chosen = policy.as_dict
        rows.append({
            "policy": policy.source,
            "layers": chosen,
            "measured_ms": float(measured_ms),
            "round_medians_ms": policy_rounds.tolist(),
            # Two independent halves of the rounds: how well the measurement predicts itself is
            # the ceiling any predictor can reach on this machine.
            "measured_even_rounds_ms": float(np.median(policy_rounds[0::2])),
            "measured_odd_rounds_ms": float(np.median(policy_rounds[1::2])),
            "predicted_ms": model.predict(chosen),
            "additive_ms": sum(model.layer_ms[(name, p)] for name, p in chosen.items()),
            "bitops": sum(bitops_and_size(signatures[name], p)[0] for name, p in chosen.items()),
        })
    measured = np.array([r["measured_ms"] for r in rows])
    spreads = {r["policy"]: float((max(r["round_medians_ms"]) - min(r["round_medians_ms"])) / r["measured_ms"]) for r in rows}
    noise = {
        "rounds": int(rounds.shape[1]),
        "stable": times.stable,
        "noise_floor": times.noise_floor,
        "noise_floor_definition": "median over policies of |median(even rounds) - median(odd rounds)| / median",
        "median_round_spread": times.round_spread,
        "per_policy_relative_range": spreads,
        "max_relative_range": max(spreads.values()),
        "repeat_agreement": _agreement(np.array([r["measured_odd_rounds_ms"] for r in rows]),
                                       np.array([r["measured_even_rounds_ms"] for r in rows])),
    }
    fastest_uniform = min(r["measured_ms"] for r in rows if r["policy"].startswith("uniform:"))
    # A policy predicted faster than the fastest uniform one ran (beyond the noise) is a cost-model bug to look at.
    below = [r["policy"] for r in rows if r["predicted_ms"] < fastest_uniform * (1 - max(times.noise_floor, 0.05))]
    problems = []
    if times.noise_floor > TOO_NOISY:
        problems.append(f"the machine was too noisy: the medians of even and odd rounds differ by {times.noise_floor:.0%} (over {TOO_NOISY:.0%}); "
                        "these numbers judge the machine, not the cost model")
    if below:
        problems.append(f"{len(below)} predictions fall below the fastest uniform policy's measured {fastest_uniform:.3f} ms")
    return {
        "format": "mpqc.costmodel_validation/2",
        "model": analysis.loaded.spec,
        "target": target.name,
        "batch": batch,
        "policies": len(rows),
        "runs_per_measurement": runs,
        "table": str(table.path.name),
        "fit": table.models.get(model_key(analysis, batch)),
        "prediction": _agreement(np.array([r["predicted_ms"] for r in rows]), measured),
        "additive_table_only": _agreement(np.array([r["additive_ms"] for r in rows]), measured),
        "bitops": _ranks_only(np.array([r["bitops"] for r in rows], dtype=np.float64), measured),
        "noise_floor": noise,
        "predicted_below_fastest_uniform": below,
        "flagged": problems,
        "rows": rows,
        "wall_s": time.perf_counter() - started,
    }


def validate_to_folder(model: str, target_name: str, proxy: str | None, batch: int, tables: str | None,
                       out: pathlib.Path, shapes=None, **settings) -> dict:
    """`mpqc costmodel validate`: validate() on the model's own data, written to `out`
    (validation.json and validation.png, through a staging folder renamed at the end). An `out`
    that holds anything but an earlier validation is refused before any measurement."""
    from mpqc.report.plots import validation_scatter  # matplotlib only where a plot is drawn

    check_output_folder(out, "validation.json", "mpqc costmodel validate")
    analysis, target, table, feeds = costmodel_inputs(model, target_name, proxy, batch, tables, shapes)
    result = validate(analysis, target, table, feeds["calibration"], feeds["timing"], batch, **settings)

    def fill(staging: pathlib.Path) -> None:
        (staging / "validation.json").write_text(json.dumps(result, indent=2) + "\n")
        validation_scatter(result, staging / "validation.png")

    replace_folder(out, fill)
    return result
