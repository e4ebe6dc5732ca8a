"""A scored search problem: loss and costs per layer x precision, solved under budgets.

Scoring is the slow part and depends on no budget, so a problem is solved as often as a budget
needs adjusting (the latency loop of a build) or swept (the Pareto front).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mpqc.costmodel.latency import LatencyModel
from mpqc.errors import MpqcError
from mpqc.policy import Policy
from mpqc.search.ilp import Solution, pareto, smallest, solve

# --pareto's resource names (the Budgets fields) -> the ILP's resource, its budget argument and
# Solution's cost field.
PARETO_RESOURCES = {
    "ms": ("latency", "latency_budget_ms", "latency_ms"),
    "bitops": ("bitops", "bitops_budget", "bitops"),
    "bytes": ("size", "size_budget", "size_bytes"),
}
PARETO_POINTS = 12
# Budgets between the evenly spread ones' last step and the least-loss end: a step there saves
# 1/2, 1/4, 1/8 of an even step. The near-FP32 end is where a few layers of small saving (a
# classifier alone) keep almost all the fidelity; an even step is larger than such a saving.
PARETO_NEAR_FULL = 3


@dataclasses.dataclass(frozen=True)
class Budgets:
    ms: float | None = None  # predicted latency on the target, from its measured table
    bitops: float | None = None
    bytes: float | None = None

    @property
    def any(self) -> bool:
        return any(value is not None for value in dataclasses.astuple(self))


@dataclasses.dataclass(frozen=True)
class SearchProblem:
    """Everything but the latency budget actually solved for: scored once, solved many times."""

    layers: list
    ties: list
    candidates: dict[str, list[str]]
    loss: dict
    latency: LatencyModel | None
    bitops: dict
    size_bytes: dict
    budgets: Budgets
    method: str  # the sensitivity method used (the user may leave it to mpqc)
    scores_cached: bool  # the loss came from the score cache rather than from scoring now
    model: str  # the model spec and target name, for pareto.json
    target: str
    scoring: dict = dataclasses.field(default_factory=dict)  # the method's record of its scores (Scored.details)

    def _constraints(self, latency_budget_ms: float | None) -> dict:
        return dict(
            latency=self.latency, latency_budget_ms=latency_budget_ms,
            bitops=self.bitops, bitops_budget=self.budgets.bitops,
            size_bytes=self.size_bytes, size_budget=self.budgets.bytes,
            ties=self.ties,
        )

    def _names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def _policy(self, solution: Solution) -> Policy:
        return Policy(tuple((layer.name, solution.assignments[layer.name]) for layer in self.layers), f"search:{self.method}")

    def _record(self, solution: Solution, latency_budget_ms: float | None) -> dict:
        return {
            "method": self.method,
            "budgets": dataclasses.asdict(self.budgets),
            "ilp_latency_budget_ms": latency_budget_ms,
            "objective": solution.objective,
            "predicted_ms": solution.latency_ms,
            "solve_seconds": solution.solve_seconds,
            "scores_cached": self.scores_cached,
            "scoring": self.scoring,
            # Per layer, what the report shows beside the chosen precision: its score and its
            # predicted time (the table's layer term; edges and overhead are not any one layer's).
            "layers": [{"name": name, "precision": p, "loss": float(self.loss[(name, p)]),
                        "predicted_ms": None if self.latency is None else float(self.latency.layer_ms[(name, p)])}
                       for name, p in solution.assignments.items()],
        }

    def describe(self, policy: Policy, latency_budget_ms: float | None) -> dict:
        """The search record of a policy chosen otherwise than by one solve (a measured point)."""
        chosen = policy.as_dict
        solution = Solution(
            assignments={layer.name: chosen[layer.name] for layer in self.layers},
            objective=float(sum(self.loss[item] for item in chosen.items())),
            latency_ms=None if self.latency is None else self.latency.predict(chosen),
            bitops=float(sum(self.bitops[item] for item in chosen.items())),
            size_bytes=float(sum(self.size_bytes[item] for item in chosen.items())),
            solve_seconds=0.0,
        )
        return self._record(solution, latency_budget_ms)

    def predicted_ms(self, policy: Policy) -> float | None:
        return None if self.latency is None else self.latency.predict(policy.as_dict)

    def uniform_points(self, resource: str) -> dict[str, dict]:
        """Each precision applied wherever a layer can take it (fp32 elsewhere): its predicted cost
        of `resource` and its summed loss, for marking beside a front."""
        cost_field = PARETO_RESOURCES[resource][2]
        points = {}
        for name in sorted({p for names in self.candidates.values() for p in names}):
            chosen = {layer.name: name if name in self.candidates[layer.name] else "fp32" for layer in self.layers}
            costs = {"latency_ms": lambda: self.latency.predict(chosen) if self.latency is not None else None,
                     "bitops": lambda: sum(self.bitops[item] for item in chosen.items()),
                     "size_bytes": lambda: sum(self.size_bytes[item] for item in chosen.items())}
            points[name] = {"cost": costs[cost_field](), "objective": float(sum(self.loss[item] for item in chosen.items()))}
        return points

    def solve(self, latency_budget_ms: float | None) -> tuple[Policy, dict]:
        solution = solve(self._names(), self.candidates, self.loss, **self._constraints(latency_budget_ms))
        return self._policy(solution), self._record(solution, latency_budget_ms)

    def pareto(self, resource: str) -> tuple[Policy, dict, dict]:
        """Loss against one resource: the front over PARETO_POINTS budgets evenly spread from the
        least that resource can cost to what the least-loss policy costs (beyond it nothing improves),
        and PARETO_NEAR_FULL budgets halving the saving of the last even step towards that end.

        Returns the policy of the front's middle point with its search record, and pareto.json's content.
        """
        ilp_resource, budget_argument, cost_field = PARETO_RESOURCES[resource]
        constraints = self._constraints(self.budgets.ms)  # the other budgets hold at every point
        del constraints[budget_argument]  # swept here instead
        names = self._names()
        low = smallest(names, self.candidates, ilp_resource, **constraints)
        high = getattr(solve(names, self.candidates, self.loss, **constraints), cost_field)
        budgets = _sweep(low, max(low, high))
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
        policy, record = self._policy(front[middle]), self._record(front[middle], self.budgets.ms)
        record["pareto"] = {"resource": resource, "points": len(points), "built_point": middle, "budget": points[middle]["budget"],
                            "front": [{k: point[k] for k in ("budget", "cost", "objective", "counts")} for point in points],
                            "uniform": self.uniform_points(resource)}
        document = {
            "format": "mpqc.pareto/1",
            "model": self.model,
            "target": self.target,
            "method": self.method,
            "resource": resource,
            "other_budgets": {r: getattr(self.budgets, r) for r in PARETO_RESOURCES if r != resource},
            "budgets": budgets,
            "built_point": middle,
            "points": points,
        }
        return policy, record, document


def _sweep(low: float, high: float) -> list[float]:
    """The swept budgets, ascending: PARETO_POINTS evenly from low to high, then PARETO_NEAR_FULL
    between the last two, each saving half of the previous one's saving against high."""
    even = np.linspace(low, high, PARETO_POINTS)
    step = (high - low) / (PARETO_POINTS - 1)
    near = [high - step / 2 ** k for k in range(1, PARETO_NEAR_FULL + 1)] if step > 0 else []
    return sorted({float(b) for b in even} | {float(b) for b in near})
