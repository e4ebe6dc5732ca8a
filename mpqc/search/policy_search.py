"""`--policy search`: score each layer x precision on the proxy data, then let the ILP choose
under the budgets given (milliseconds from the measured table, BitOps, bytes)."""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
from typing import TYPE_CHECKING

import numpy as np

from mpqc.data.feeds import feeds_sha256
from mpqc.errors import MpqcError
from mpqc.passes.signatures import layer_signature
from mpqc.policy import Policy
from mpqc.search import cache
from mpqc.search.ilp import LatencyModel, Solution, bitops_and_size, pareto, smallest, solve
from mpqc.sensitivity.context import SensitivityContext
from mpqc.sensitivity.methods import DEFAULT_METHOD, check_method, score_layers
from mpqc.targets import Target

if TYPE_CHECKING:
    from mpqc.build import BuildOptions

# --pareto's resource names -> the ILP's resource, its budget argument, BuildOptions' budget field
# and Solution's cost field.
PARETO_RESOURCES = {
    "ms": ("latency", "latency_budget_ms", "budget_ms", "latency_ms"),
    "bitops": ("bitops", "bitops_budget", "budget_bitops", "bitops"),
    "bytes": ("size", "size_budget", "budget_bytes", "size_bytes"),
}
PARETO_POINTS = 12


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
    method: str  # the sensitivity method used (the options may leave it to mpqc)
    scores_cached: bool  # the loss came from the score cache rather than from scoring now

    def _constraints(self, latency_budget_ms: float | None) -> dict:
        o = self.options
        return dict(
            latency=self.latency, latency_budget_ms=latency_budget_ms,
            bitops=self.bitops, bitops_budget=o.budget_bitops,
            size_bytes=self.size_bytes, size_budget=o.budget_bytes,
            ties=self.ties,
        )

    def _names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def _policy(self, solution: Solution) -> Policy:
        return Policy(tuple((layer.name, solution.assignments[layer.name]) for layer in self.layers), f"search:{self.method}")

    def _record(self, solution: Solution, latency_budget_ms: float | None) -> dict:
        o = self.options
        return {
            "method": self.method,
            "budgets": {"ms": o.budget_ms, "bitops": o.budget_bitops, "bytes": o.budget_bytes},
            "ilp_latency_budget_ms": latency_budget_ms,
            "objective": solution.objective,
            "predicted_ms": solution.latency_ms,
            "solve_seconds": solution.solve_seconds,
            "scores_cached": self.scores_cached,
        }

    def solve(self, latency_budget_ms: float | None) -> tuple[Policy, dict]:
        solution = solve(self._names(), self.candidates, self.loss, **self._constraints(latency_budget_ms))
        return self._policy(solution), self._record(solution, latency_budget_ms)

    def pareto(self, resource: str) -> tuple[Policy, dict, dict]:
        """Loss against one resource: the front over PARETO_POINTS budgets evenly spread from the
        least that resource can cost to what the least-loss policy costs (beyond it nothing improves).

        Returns the policy of the front's middle point with its search record, and pareto.json's content.
        """
        ilp_resource, budget_argument, budget_field, cost_field = PARETO_RESOURCES[resource]
        constraints = self._constraints(self.options.budget_ms)  # the other budgets hold at every point
        del constraints[budget_argument]  # swept here instead
        names = self._names()
        low = smallest(names, self.candidates, ilp_resource, **constraints)
        high = getattr(solve(names, self.candidates, self.loss, **constraints), cost_field)
        budgets = [float(b) for b in np.linspace(low, max(low, high), PARETO_POINTS)]
        front = pareto(names, self.candidates, self.loss, resource=ilp_resource, budgets=budgets, **constraints)
        if not front:  # only when the solver rejects even the least cost it reported, within its tolerance
            raise MpqcError(f"no {resource} budget between {low:.6g} and {high:.6g} was feasible for the Pareto front")
        points = []
        for solution in front:
            cost = getattr(solution, cost_field)
            counts: dict[str, int] = {}
            for name in solution.assignments.values():
                counts[name] = counts.get(name, 0) + 1
            points.append({
                # The least swept budget this point fits (with the solver's feasibility tolerance).
                "budget": next((b for b in budgets if cost <= b + 1e-6 * abs(b)), budgets[-1]),
                "counts": dict(sorted(counts.items())),
                "objective": solution.objective,
                "cost": cost,
                "assignments": solution.assignments,
            })
        middle = (len(front) - 1) // 2
        policy, record = self._policy(front[middle]), self._record(front[middle], self.options.budget_ms)
        record["pareto"] = {"resource": resource, "points": len(points), "built_point": middle, "budget": points[middle]["budget"]}
        document = {
            "format": "mpqc.pareto/1",
            "model": self.options.model,
            "target": self.options.target,
            "method": self.method,
            "resource": resource,
            "other_budgets": {r: getattr(self.options, f) for r, (_, _, f, _) in PARETO_RESOURCES.items() if f != budget_field},
            "budgets": budgets,
            "built_point": middle,
            "points": points,
        }
        return policy, record, document


def resolve_method(options: "BuildOptions", module, classifier: bool) -> str:
    """The method asked for, else DEFAULT_METHOD (seam) for a torch classifier; qerror where there is
    no torch module (an .onnx file) or the output is not class scores (an embedding model)."""
    if options.method is not None:
        check_method(options.method)
        return options.method
    return DEFAULT_METHOD if module is not None and classifier else "qerror"


def prepare_search(analysis, target: Target, float_model, feeds, options: "BuildOptions",
                   labels: np.ndarray | None = None) -> SearchProblem:
    method = resolve_method(options, analysis.loaded.module, getattr(analysis.loaded.example, "CLASSIFIER", True))
    if options.pareto is not None:
        if options.pareto not in PARETO_RESOURCES:
            raise MpqcError(f"unknown --pareto resource '{options.pareto}': use one of {', '.join(PARETO_RESOURCES)}")
        field = PARETO_RESOURCES[options.pareto][2]
        if getattr(options, field) is not None:
            raise MpqcError(f"--pareto {options.pareto} sweeps that budget itself: drop --{field.replace('_', '-')}")
    elif options.budget_ms is None and options.budget_bitops is None and options.budget_bytes is None:
        raise MpqcError("--policy search needs a budget: --budget-ms, --budget-bitops or --budget-bytes (or --pareto)")
    layers = analysis.layers
    candidates = {
        layer.name: [p.name for p in target.precisions_for(layer.op_type, deployable_only=not options.evaluate_only)]
        for layer in layers
    }
    latency = None
    if options.budget_ms is not None or options.pareto == "ms":
        from mpqc.costmodel.profile import latency_model
        from mpqc.costmodel.table import LatencyTable

        latency = latency_model(analysis, target, LatencyTable.for_target(target, options.tables), options.batch)
    costs = {
        (layer.name, p): bitops_and_size(layer_signature(analysis.model, layer), p)
        for layer in layers for p in candidates[layer.name]
    }
    context = sensitivity_context(analysis, target, float_model, feeds, candidates, options, labels)
    loss, cached = _scores(analysis, context, method, options)
    return SearchProblem(
        layers=layers, ties=analysis.ties, candidates=candidates,
        loss=loss,
        scores_cached=cached,
        latency=latency,
        bitops={k: v[0] for k, v in costs.items()},
        size_bytes={k: v[1] for k, v in costs.items()},
        options=options,
        method=method,
    )


def sensitivity_context(analysis, target: Target, float_model, feeds, candidates, options: "BuildOptions",
                        labels: np.ndarray | None) -> SensitivityContext:
    loaded = analysis.loaded
    example = loaded.example
    return SensitivityContext(
        float_model=float_model, layers=analysis.layers, candidates=candidates, target=target, feeds=feeds,
        input_names=tuple(loaded.input_names), module=loaded.module, labels=labels,
        # Bundled examples say what their output is; other models are taken for classifiers.
        classifier=getattr(example, "CLASSIFIER", True),
        seed=options.seed, epochs=options.epochs, gmpq=options.gmpq,
    )


def _scores(analysis, context: SensitivityContext, method: str, options: "BuildOptions") -> tuple[dict, bool]:
    """The sensitivity scores, from the cache when an earlier build scored the same inputs."""
    if not options.use_cache:
        return score_layers(method, context), False
    folder = pathlib.Path(options.cache_dir) if options.cache_dir is not None else cache.default_dir()
    settings = {
        "labels_sha256": None if context.labels is None else hashlib.sha256(np.ascontiguousarray(context.labels)).hexdigest(),
        "epochs": context.epochs, "batch_size": context.batch_size, "gmpq": context.gmpq, "classifier": context.classifier,
        "step_lr": context.step_lr,
    }
    key = cache.score_key(analysis.loaded.sha256(), feeds_sha256(context.feeds), method, options.seed, context.target,
                          context.candidates, settings)
    scores = cache.load_scores(folder, key, context.candidates)
    if scores is not None:
        return scores, True
    scores = score_layers(method, context)
    cache.save_scores(folder, key, scores)
    return scores, False
