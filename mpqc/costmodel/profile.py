"""`mpqc profile`: fill the target's latency table for a model, then fit its boundary terms.

Layer terms come from micro-models (one per distinct signature x deployable precision, reused
across models and runs). The table is not additive truth: changing precision between two layers
adds Quantize/Dequantize and layout work, and the ops between layers cost time too. Those are
fitted, by least squares, from a few whole-model measurements: one coefficient per kind of edge
(float->int8, int8->float, int8->int8; float->float is the reference) plus a fixed overhead.
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from mpqc.backends.ort_runner import OrtRunner
from mpqc.bench.latency import measure_latency
from mpqc.build import Analysis, BuildOptions, Lowering
from mpqc.costmodel.microbench import time_layer
from mpqc.costmodel.policies import random_policy, uniform_policies
from mpqc.costmodel.table import LatencyTable
from mpqc.errors import MpqcError
from mpqc.passes.layer_graph import layer_edges
from mpqc.passes.signatures import layer_signature
from mpqc.policy import Policy
from mpqc.precision import precision
from mpqc.search.ilp import LatencyModel
from mpqc.targets import Target

EDGE_KINDS = ((False, True), (True, False), (True, True))  # (producer int8, consumer int8); (False, False) is the reference


def model_key(analysis: Analysis, batch: int) -> str:
    return f"{analysis.loaded.sha256()}@b{batch}"


def profile_layers(analysis: Analysis, target: Target, table: LatencyTable, batch: int, force: bool = False, progress: bool = True) -> dict:
    """Measure every (signature, deployable precision) the table lacks; returns counts."""
    work = {}
    for layer in analysis.layers:
        signature = layer_signature(analysis.model, layer)
        for p in target.precisions_for(layer.op_type):
            work.setdefault((signature.key(), p.name), signature)
    todo = [(key, p, sig) for (key, p), sig in work.items() if force or table.lookup(key, p, batch) is None]
    for key, p, signature in tqdm(todo, desc="profiling layers", unit="layer", disable=not progress):
        table.record(key, p, batch, time_layer(signature, p, target, batch))
    return {"distinct": len(work), "measured": len(todo), "reused": len(work) - len(todo)}


def layer_terms(analysis: Analysis, target: Target, table: LatencyTable, batch: int) -> dict[tuple[str, str], float]:
    terms, missing = {}, []
    for layer in analysis.layers:
        key = layer_signature(analysis.model, layer).key()
        for p in target.precisions_for(layer.op_type):
            value = table.lookup(key, p.name, batch)
            if value is None:
                missing.append(f"{layer.name}@{p.name}")
            terms[(layer.name, p.name)] = value
    if missing:
        raise MpqcError(
            f"latency table '{table.path}' lacks {len(missing)} layer measurement(s) at batch {batch} "
            f"(e.g. {missing[0]}); run 'mpqc profile {analysis.loaded.spec} --target {target.name} --batch {batch}'"
        )
    return terms


def edge_counts(edges, policy: Policy) -> np.ndarray:
    kinds = {kind: 0 for kind in EDGE_KINDS}
    for producer, consumer in edges:
        kind = (precision(policy.as_dict[producer]).quantizes_activations, precision(policy.as_dict[consumer]).quantizes_activations)
        if kind in kinds:
            kinds[kind] += 1
    return np.array([kinds[k] for k in EDGE_KINDS], dtype=np.float64)


def measure_model(lowering: Lowering, policy: Policy, feeds: dict, runs: int) -> float:
    runner = OrtRunner(lowering.lower(policy), lowering.target)
    return measure_latency(runner, feeds, warmup=10, runs=runs).median_ms


def fit_boundaries(analysis, target, lowering, terms, feeds, policies: list[Policy], runs: int) -> dict:
    """Least squares for the edge-kind coefficients and the overhead from whole-model latencies."""
    edges = layer_edges(analysis.model, analysis.layers)
    rows, targets = [], []
    for policy in policies:
        measured = measure_model(lowering, policy, feeds, runs)
        additive = sum(terms[(name, p)] for name, p in policy.assignments)
        rows.append(np.concatenate([edge_counts(edges, policy), [1.0]]))
        targets.append(measured - additive)
    solution, *_ = np.linalg.lstsq(np.array(rows), np.array(targets), rcond=None)
    residual = np.array(rows) @ solution - np.array(targets)
    return {
        "boundary_ms": {f"{int(a)}{int(b)}": float(v) for (a, b), v in zip(EDGE_KINDS, solution[:3])},
        "overhead_ms": float(solution[3]),
        "fit_policies": [p.source for p in policies],
        "fit_rms_residual_ms": float(np.sqrt(np.mean(residual**2))),
    }


def fitting_policies(analysis: Analysis, target: Target, count: int, seed: int) -> list[Policy]:
    rng = np.random.default_rng(seed)
    return uniform_policies(analysis, target) + [random_policy(analysis, target, rng, f"fit-random-{i}") for i in range(count)]


def latency_model(analysis: Analysis, target: Target, table: LatencyTable, batch: int) -> LatencyModel:
    """The cost model the ILP uses; refuses a table that lacks this model's layers or fit."""
    terms = layer_terms(analysis, target, table, batch)
    fitted = table.models.get(model_key(analysis, batch))
    if fitted is None:
        raise MpqcError(
            f"latency table '{table.path}' has no boundary fit for this model at batch {batch}; "
            f"run 'mpqc profile {analysis.loaded.spec} --target {target.name} --batch {batch}'"
        )
    boundary = {(False, False): 0.0} | {(k[0] == "1", k[1] == "1"): v for k, v in fitted["boundary_ms"].items()}
    return LatencyModel(
        layer_ms=terms,
        edges=layer_edges(analysis.model, analysis.layers),
        boundary_ms=boundary,
        overhead_ms=fitted["overhead_ms"],
    )


def profile(analysis, target, table, feeds, batch: int, options: BuildOptions, fit_policies: int = 6, runs: int = 50,
            force: bool = False, progress: bool = True) -> dict:
    counts = profile_layers(analysis, target, table, batch, force, progress)
    table.save()
    key = model_key(analysis, batch)
    if force or key not in table.models:
        terms = layer_terms(analysis, target, table, batch)
        lowering = Lowering.prepare(analysis, target, feeds["calibration"], options)
        table.models[key] = fit_boundaries(analysis, target, lowering, terms, feeds["timing"],
                                           fitting_policies(analysis, target, fit_policies, options.seed), runs)
        table.save()
    return {"table": str(table.path), "layers": counts, "fit": table.models[key]}
