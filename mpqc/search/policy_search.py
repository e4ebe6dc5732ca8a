"""`--policy search`: score each layer x precision on the proxy data, then let the ILP choose
under the budgets given (milliseconds from the measured table, BitOps, bytes)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from mpqc.errors import MpqcError
from mpqc.passes.signatures import layer_signature
from mpqc.policy import Policy
from mpqc.search.ilp import LatencyModel, bitops_and_size, solve
from mpqc.sensitivity.qerror import qerror_scores
from mpqc.targets import Target

if TYPE_CHECKING:
    from mpqc.build import BuildOptions

METHODS = ("qerror",)


@dataclasses.dataclass
class SearchProblem:
    """Everything but the budgets: scored once, solved as often as a budget needs adjusting."""

    layers: list
    ties: list
    candidates: dict[str, list[str]]
    loss: dict
    latency: LatencyModel | None
    bitops: dict
    size_bytes: dict
    options: "BuildOptions"

    def solve(self, latency_budget_ms: float | None) -> tuple[Policy, dict]:
        o = self.options
        solution = solve(
            [layer.name for layer in self.layers], self.candidates, self.loss,
            latency=self.latency, latency_budget_ms=latency_budget_ms,
            bitops=self.bitops, bitops_budget=o.budget_bitops,
            size_bytes=self.size_bytes, size_budget=o.budget_bytes,
            ties=self.ties,
        )
        policy = Policy(tuple((layer.name, solution.assignments[layer.name]) for layer in self.layers), f"search:{o.method}")
        return policy, {
            "method": o.method,
            "budgets": {"ms": o.budget_ms, "bitops": o.budget_bitops, "bytes": o.budget_bytes},
            "ilp_latency_budget_ms": latency_budget_ms,
            "objective": solution.objective,
            "predicted_ms": solution.latency_ms,
            "solve_seconds": solution.solve_seconds,
        }


def prepare_search(analysis, target: Target, float_model, feeds, options: "BuildOptions") -> SearchProblem:
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
    costs = {
        (layer.name, p): bitops_and_size(layer_signature(analysis.model, layer), p)
        for layer in layers for p in candidates[layer.name]
    }
    return SearchProblem(
        layers=layers, ties=analysis.ties, candidates=candidates,
        loss=qerror_scores(float_model, layers, candidates, feeds, target),
        latency=latency,
        bitops={k: v[0] for k, v in costs.items()},
        size_bytes={k: v[1] for k, v in costs.items()},
        options=options,
    )
