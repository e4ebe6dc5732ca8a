"""`--policy search`: score each layer x precision on the proxy data, then let the ILP choose
under the budgets given (milliseconds from the measured table, BitOps, bytes)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mpqc.errors import MpqcError
from mpqc.passes.signatures import layer_signature
from mpqc.policy import Policy
from mpqc.search.ilp import bitops_and_size, solve
from mpqc.sensitivity.qerror import qerror_scores
from mpqc.targets import Target

if TYPE_CHECKING:
    from mpqc.build import BuildOptions

METHODS = ("qerror",)


def search_policy(analysis, target: Target, float_model, feeds, options: BuildOptions) -> tuple[Policy, dict]:
    if options.method not in METHODS:
        raise MpqcError(f"unknown search method '{options.method}': use one of {', '.join(METHODS)}")
    if options.budget_ms is None and options.budget_bitops is None and options.budget_bytes is None:
        raise MpqcError("--policy search needs a budget: --budget-ms, --budget-bitops or --budget-bytes")
    layers = analysis.layers
    candidates = {
        layer.name: [p.name for p in target.precisions_for(layer.op_type, deployable_only=not options.evaluate_only)]
        for layer in layers
    }
    latency = None
    if options.budget_ms is not None:
        from mpqc.costmodel.profile import latency_model
        from mpqc.costmodel.table import LatencyTable

        latency = latency_model(analysis, target, LatencyTable.for_target(target, options.tables), options.batch)
    loss = qerror_scores(float_model, layers, candidates, feeds, target)
    costs = {
        (layer.name, p): bitops_and_size(layer_signature(analysis.model, layer), p)
        for layer in layers for p in candidates[layer.name]
    }
    solution = solve(
        [layer.name for layer in layers], candidates, loss,
        latency=latency, latency_budget_ms=options.budget_ms,
        bitops={k: v[0] for k, v in costs.items()}, bitops_budget=options.budget_bitops,
        size_bytes={k: v[1] for k, v in costs.items()}, size_budget=options.budget_bytes,
        ties=analysis.ties,
    )
    policy = Policy(tuple((layer.name, solution.assignments[layer.name]) for layer in layers), f"search:{options.method}")
    info = {
        "method": options.method,
        "budgets": {"ms": options.budget_ms, "bitops": options.budget_bitops, "bytes": options.budget_bytes},
        "objective": solution.objective,
        "predicted_ms": latency.predict(solution.assignments) if latency is not None else None,
        "solve_seconds": solution.solve_seconds,
    }
    return policy, info
