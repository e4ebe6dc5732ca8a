"""`mpqc costmodel validate`: how well the cost model predicts measured end-to-end latency.

Random mixed policies (drawn with another seed than the fit) plus the uniform ones are lowered,
measured, and compared with the prediction. The same rank statistics are computed for BitOps, the
proxy other tools use, and for the purely additive table (no boundary terms), side by side. The
noise floor is how much repeated measurements of one and the same model disagree: no predictor can
be judged more finely than that.
"""

from __future__ import annotations

import json
import pathlib
import time

import numpy as np
from scipy import stats

from mpqc import progress
from mpqc.backends.base import backend_for
from mpqc.bench.latency import measure_latency
from mpqc.costmodel.fit import latency_model
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

    rows = []
    for policy in progress.bar(candidates, "measuring policies", unit="policy"):
        runner = backend.load(lowering.lower(policy), target)
        measured = measure_latency(runner, timing_feeds, warmup=10, runs=runs)
        chosen = policy.as_dict
        rows.append({
            "policy": policy.source,
            "layers": chosen,
            "measured_ms": measured.median_ms,
            "measured_p90_ms": measured.p90_ms,
            "predicted_ms": model.predict(chosen),
            "additive_ms": sum(model.layer_ms[(name, p)] for name, p in chosen.items()),
            "bitops": sum(bitops_and_size(signatures[name], p)[0] for name, p in chosen.items()),
        })
    measured = np.array([r["measured_ms"] for r in rows])
    # A second, independent measurement of every policy: how well the measurement predicts itself
    # is the ceiling any predictor can reach on this machine.
    for policy, row in progress.bar(zip(candidates, rows), "measuring them again", total=len(rows), unit="policy"):
        runner = backend.load(lowering.lower(policy), target)
        row["measured_again_ms"] = measure_latency(runner, timing_feeds, warmup=10, runs=runs).median_ms
    noise = _noise_floor(lowering, candidates[: min(2, len(candidates))], timing_feeds, runs, noise_repeats)
    noise["repeat_agreement"] = _agreement(np.array([r["measured_again_ms"] for r in rows]), measured)
    return {
        "format": "mpqc.costmodel_validation/1",
        "model": analysis.loaded.spec,
        "target": target.name,
        "batch": batch,
        "policies": len(rows),
        "runs_per_measurement": runs,
        "table": str(table.path.name),
        "fit": table.models.get(f"{analysis.loaded.sha256()}@b{batch}"),
        "prediction": _agreement(np.array([r["predicted_ms"] for r in rows]), measured),
        "additive_table_only": _agreement(np.array([r["additive_ms"] for r in rows]), measured),
        "bitops": _ranks_only(np.array([r["bitops"] for r in rows], dtype=np.float64), measured),
        "noise_floor": noise,
        "rows": rows,
        "wall_s": time.perf_counter() - started,
    }


def _noise_floor(lowering: Lowering, policies, feeds, runs: int, repeats: int) -> dict:
    """Each policy measured `repeats` times, each time in a fresh session, as validation measures."""
    spreads = {}
    for policy in policies:
        model_bytes = lowering.lower(policy)
        medians = np.array([
            measure_latency(backend_for(lowering.target).load(model_bytes, lowering.target), feeds, warmup=10, runs=runs).median_ms
            for _ in range(repeats)
        ])
        spreads[policy.source] = {
            "medians_ms": medians.tolist(),
            "relative_std": float(medians.std() / np.median(medians)),
            "relative_range": float((medians.max() - medians.min()) / np.median(medians)),
        }
    return {
        "repeats": repeats,
        "per_policy": spreads,
        "max_relative_range": max(s["relative_range"] for s in spreads.values()),
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
