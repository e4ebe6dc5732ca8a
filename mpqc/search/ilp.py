"""Precision assignment as a 0/1 integer linear program, solved by HiGHS through scipy.optimize.milp.

One binary x[l,p] per layer and allowed precision, exactly one of them set per layer. The objective
is the summed sensitivity of the chosen precisions; every budget that is given (latency, BitOps,
model size) is one linear constraint, so several can hold at once (HAWQ-V3 and LIMPQ solve the same
program with one budget).

Latency is not a plain sum over layers: a cost model also charges each producer -> consumer edge
by whether each side quantizes its activations (a Q/DQ pair, a layout change). With a_l = sum of
x[l,p] over the activation-quantizing p, an edge costs
    b_ff + (b_tf - b_ff) a_u + (b_ft - b_ff) a_v + (b_tt - b_tf - b_ft + b_ff) a_u a_v
(b_xy: producer quantizes x, consumer quantizes y), and the product a_u a_v is linearised by a
binary z_uv with z <= a_u, z <= a_v, z >= a_u + a_v - 1, which pins z to the product exactly.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from mpqc.costmodel.latency import LatencyModel, quantizes_activations
from mpqc.errors import MpqcError
from mpqc.policy import Policy
from mpqc.precision import precision

RESOURCES = ("latency", "bitops", "size")
_UNITS = {"latency": "ms", "bitops": "BitOps", "size": "bytes"}
_BUDGET_ARGS = {"latency": "latency_budget_ms", "bitops": "bitops_budget", "size": "size_budget"}

# HiGHS stops once the incumbent is within an absolute gap of 1e-6 of its bound, and scipy does not
# let us lower that. Scaling the largest loss to 1e6 makes the gap 1e-12 of it, and leaves room for
# a tie-break step (1e-3 per candidate rank) far above the gap yet below any loss difference that
# matters: 100 layers x rank 2 add at most 2e-7 of the largest loss.
_LOSS_SCALE = 1e6
_TIE_STEP = 1e-3


@dataclasses.dataclass(frozen=True)
class Solution:
    assignments: dict[str, str]  # layer -> precision, in layer order
    objective: float  # summed loss of the assignments
    latency_ms: float | None  # predicted by the LatencyModel, when one was given
    bitops: float | None
    size_bytes: float | None
    solve_seconds: float

    def policy(self, source: str = "ilp") -> Policy:
        return Policy(tuple(self.assignments.items()), source)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class BudgetInfeasible(MpqcError):
    """No policy meets the budgets. `smallest[resource]` is the least that resource can cost."""

    def __init__(self, message: str, smallest: dict[str, float], given_others: dict[str, bool]):
        super().__init__(message)
        self.smallest = smallest  # under the other budgets where given_others[resource], else alone
        self.given_others = given_others


def solve(
    layers: Sequence[str],
    candidates: Mapping[str, Sequence[str]],
    loss: Mapping[tuple[str, str], float],
    *,
    latency: LatencyModel | None = None,
    latency_budget_ms: float | None = None,
    bitops: Mapping[tuple[str, str], float] | None = None,
    bitops_budget: float | None = None,
    size_bytes: Mapping[tuple[str, str], float] | None = None,
    size_budget: float | None = None,
    ties: Sequence[Sequence[str]] = (),
    fixed: Mapping[str, str] | None = None,
) -> Solution:
    """The policy of least summed loss within every given budget; raises BudgetInfeasible if none is."""
    clock = time.perf_counter()
    tables = {"latency": latency, "bitops": bitops, "size": size_bytes}
    budgets = _given_budgets(tables, {"latency": latency_budget_ms, "bitops": bitops_budget, "size": size_budget})
    program, forms = _setup(layers, candidates, ties, fixed, tables, list(budgets))
    _check_covers(program, "loss", loss)
    x = program.run(program.loss_objective(loss), [(forms[r], budgets[r]) for r in budgets])
    if x is None:
        raise _infeasible(program, tables, forms, budgets)
    chosen = program.decode(x)
    return Solution(
        assignments=chosen,
        objective=float(sum(loss[item] for item in chosen.items())),
        latency_ms=_cost("latency", latency, chosen),
        bitops=_cost("bitops", bitops, chosen),
        size_bytes=_cost("size", size_bytes, chosen),
        solve_seconds=time.perf_counter() - clock,
    )


def smallest(
    layers: Sequence[str],
    candidates: Mapping[str, Sequence[str]],
    resource: str,
    *,
    latency: LatencyModel | None = None,
    latency_budget_ms: float | None = None,
    bitops: Mapping[tuple[str, str], float] | None = None,
    bitops_budget: float | None = None,
    size_bytes: Mapping[tuple[str, str], float] | None = None,
    size_budget: float | None = None,
    ties: Sequence[Sequence[str]] = (),
    fixed: Mapping[str, str] | None = None,
) -> float:
    """The least `resource` can cost under the ties, pins and the other given budgets.

    The low end of a budget sweep (the fastest policy's latency, say); raises BudgetInfeasible when
    the other budgets cannot all be met.
    """
    if resource not in RESOURCES:
        raise ValueError(f"resource must be one of {', '.join(RESOURCES)}, not '{resource}'")
    tables = {"latency": latency, "bitops": bitops, "size": size_bytes}
    if tables[resource] is None:
        raise ValueError(f"the smallest {resource} needs its cost table")
    budgets = _given_budgets(tables, {"latency": latency_budget_ms, "bitops": bitops_budget, "size": size_budget})
    budgets.pop(resource, None)
    program, forms = _setup(layers, candidates, ties, fixed, tables, [resource, *budgets])
    least = program.minimum(resource, tables, forms, budgets, list(budgets))
    if least is None:
        raise _infeasible(program, tables, forms, budgets)
    return least


def _setup(layers, candidates, ties, fixed, tables: dict, resources: list[str]):
    """The program and the linear cost form of every resource it constrains or minimises."""
    coupled = tables["latency"] if "latency" in resources else None
    program = _Program(layers, candidates, ties, fixed or {}, coupled)
    for resource in resources:
        program.check_table(resource, tables[resource])
    return program, {resource: program.form(resource, tables[resource]) for resource in resources}


def pareto(
    layers: Sequence[str],
    candidates: Mapping[str, Sequence[str]],
    loss: Mapping[tuple[str, str], float],
    *,
    resource: str,
    budgets: Sequence[float],
    **constraints,
) -> list[Solution]:
    """Solve for each budget of one resource (ascending) and keep the Pareto front.

    Infeasible budgets are skipped. A larger budget's solution is kept only if it lowers the loss;
    it then also costs more than every kept one, so the front is monotone in both.
    """
    if resource not in RESOURCES:
        raise ValueError(f"resource must be one of {', '.join(RESOURCES)}, not '{resource}'")
    if _BUDGET_ARGS[resource] in constraints:
        raise ValueError(f"pass the {resource} budgets as `budgets`, not {_BUDGET_ARGS[resource]}")
    front: list[Solution] = []
    for budget in sorted(budgets):
        try:
            found = solve(layers, candidates, loss, **constraints, **{_BUDGET_ARGS[resource]: budget})
        except BudgetInfeasible:
            continue
        if not front or found.objective < front[-1].objective - 1e-9 * max(1.0, abs(front[-1].objective)):
            front.append(found)
    return front


def _cost(resource: str, table, chosen: dict[str, str]) -> float | None:
    """What a policy costs, evaluated directly (not read back from the solver's rounded sums)."""
    if table is None:
        return None
    if resource == "latency":
        return table.predict(chosen)
    return float(sum(table[item] for item in chosen.items()))


def _given_budgets(tables: dict, budgets: dict) -> dict[str, float]:
    given = {}
    for resource in RESOURCES:
        if budgets[resource] is None:
            continue
        if tables[resource] is None:
            raise ValueError(f"a {resource} budget needs its cost table ({_BUDGET_ARGS[resource]} given without it)")
        if not np.isfinite(budgets[resource]):
            raise MpqcError(f"the {resource} budget must be a finite number, not {budgets[resource]}")
        given[resource] = float(budgets[resource])
    return given


def _check_covers(program: _Program, what: str, table: Mapping[tuple[str, str], float]) -> None:
    missing = [item for item in program.columns if item not in table]
    if missing:
        raise ValueError(f"{what} has no value for {len(missing)} (layer, precision) pair(s), e.g. {missing[0]}")
    bad = [item for item in program.columns if not np.isfinite(table[item])]
    if bad:
        raise ValueError(f"{what} is not finite for {bad[0]}")


class _Program:
    """The variables and fixed rows of the MILP: one-hot choice, ties, pins and the z_uv links."""

    def __init__(self, layers, candidates, ties, fixed, latency: LatencyModel | None):
        self.layers = tuple(layers)
        if not self.layers:
            raise ValueError("no layers to assign precisions to")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError("layer names must be unique")
        self.candidates = {layer: tuple(candidates.get(layer, ())) for layer in self.layers}
        for layer, options in self.candidates.items():
            if not options or len(set(options)) != len(options):
                raise ValueError(f"layer '{layer}' needs a non-empty list of distinct candidate precisions")
            for name in options:
                precision(name)  # an unknown name is a user error with the list of known ones
        self.columns = [(layer, p) for layer in self.layers for p in self.candidates[layer]]
        self.index = {item: i for i, item in enumerate(self.columns)}
        self.rank = np.array([self.candidates[layer].index(p) for layer, p in self.columns], dtype=float)
        self.rows: list[tuple[dict[int, float], float, float]] = []
        for layer in self.layers:
            self.rows.append(({self.index[(layer, p)]: 1.0 for p in self.candidates[layer]}, 1.0, 1.0))
        self.lower = np.zeros(len(self.columns))
        self.upper = np.ones(len(self.columns))
        self._tie(ties, fixed)
        self._pin(fixed)
        self.z_index: dict[tuple[str, str], int] = {}
        if latency is not None:
            self._link_edges(latency)

    @property
    def size(self) -> int:
        return len(self.lower)

    def _tie(self, ties, fixed) -> None:
        """Tied layers take one precision: equal x per common candidate, the others forbidden."""
        for group in _merge_groups(ties, self.layers):
            common = [p for p in self.candidates[group[0]] if all(p in self.candidates[m] for m in group)]
            if not common:
                raise MpqcError(f"tied layers {', '.join(group)} have no candidate precision in common")
            pinned = sorted({fixed[m] for m in group if m in fixed})
            if len(pinned) > 1:
                raise MpqcError(f"tied layers {', '.join(group)} are pinned to different precisions: {', '.join(pinned)}")
            if pinned and pinned[0] not in common:
                raise MpqcError(
                    f"tied layers {', '.join(group)} are pinned to {pinned[0]}, which not all of them allow "
                    f"(common: {', '.join(common)})"
                )
            for member in group:
                for p in self.candidates[member]:
                    if p not in common:
                        self.upper[self.index[(member, p)]] = 0.0
            for member in group[1:]:
                for p in common:
                    self.rows.append(({self.index[(member, p)]: 1.0, self.index[(group[0], p)]: -1.0}, 0.0, 0.0))

    def _pin(self, fixed: Mapping[str, str]) -> None:
        for layer, p in fixed.items():
            if layer not in self.candidates:
                raise ValueError(f"pinned layer '{layer}' is not among the layers")
            if p not in self.candidates[layer]:
                raise MpqcError(
                    f"layer '{layer}' is pinned to {p}, which is not among its candidates "
                    f"({', '.join(self.candidates[layer])})"
                )
            self.lower[self.index[(layer, p)]] = 1.0

    def _link_edges(self, latency: LatencyModel) -> None:
        """One z column per distinct edge whose cost depends on both ends at once."""
        for producer, consumer in latency.edges:
            if _interaction(latency, (producer, consumer)) == 0.0:
                continue
            for layer in (producer, consumer):
                if layer not in self.candidates:
                    raise ValueError(f"latency edge ({producer}, {consumer}) names '{layer}', which is not a layer")
            if (producer, consumer) in self.z_index:
                continue
            z = len(self.columns) + len(self.z_index)
            self.z_index[(producer, consumer)] = z
            a_u, a_v = self._activation_terms(producer), self._activation_terms(consumer)
            self.rows.append(({z: 1.0} | _scaled(a_u, -1.0), -np.inf, 0.0))  # z <= a_u
            self.rows.append(({z: 1.0} | _scaled(a_v, -1.0), -np.inf, 0.0))  # z <= a_v
            both = _scaled(a_u, -1.0)
            for i, v in a_v.items():
                both[i] = both.get(i, 0.0) - v  # a self-edge adds its terms twice: z >= 2 a_u - 1
            self.rows.append((both | {z: 1.0}, -1.0, np.inf))  # z >= a_u + a_v - 1
        self.lower = np.concatenate([self.lower, np.zeros(len(self.z_index))])
        self.upper = np.concatenate([self.upper, np.ones(len(self.z_index))])

    def _activation_terms(self, layer: str) -> dict[int, float]:
        """a_l as {column: 1} over the layer's activation-quantizing candidates."""
        return {self.index[(layer, p)]: 1.0 for p in self.candidates[layer] if quantizes_activations(p)}

    def check_table(self, resource: str, table) -> None:
        if resource == "latency":
            _check_covers(self, "the latency model's layer_ms", table.layer_ms)
            for producer, consumer in table.edges:
                if producer not in self.candidates or consumer not in self.candidates:
                    raise ValueError(f"latency edge ({producer}, {consumer}) names a layer that is not among the layers")
        else:
            _check_covers(self, f"the {resource} table", table)

    def form(self, resource: str, table) -> tuple[np.ndarray, float]:
        """The resource's cost as (coefficients over all columns, constant)."""
        coef = np.zeros(self.size)
        if resource != "latency":
            coef[: len(self.columns)] = [table[item] for item in self.columns]
            return coef, 0.0
        coef[: len(self.columns)] = [table.layer_ms[item] for item in self.columns]
        constant = float(table.overhead_ms)
        for producer, consumer in table.edges:
            ff, ft, tf, tt = (
                table.boundary(u, v, (producer, consumer)) for u, v in ((False, False), (False, True), (True, False), (True, True))
            )
            constant += ff
            for i in self._activation_terms(producer):
                coef[i] += tf - ff
            for i in self._activation_terms(consumer):
                coef[i] += ft - ff
            if (producer, consumer) in self.z_index:
                coef[self.z_index[(producer, consumer)]] += tt - tf - ft + ff
        return coef, constant

    def loss_objective(self, loss: Mapping[tuple[str, str], float]) -> np.ndarray:
        values = np.array([loss[item] for item in self.columns], dtype=float)
        largest = float(np.abs(values).max()) or 1.0
        objective = np.zeros(self.size)
        # The rank term makes the optimum unique: among equal losses the earlier candidate wins.
        objective[: len(self.columns)] = values / largest * _LOSS_SCALE + self.rank * _TIE_STEP
        return objective

    def run(self, objective: np.ndarray, limits: list[tuple[tuple[np.ndarray, float], float]]) -> np.ndarray | None:
        """Solve; None when infeasible. `limits`: ((coef, constant), budget) meaning coef.x + constant <= budget."""
        rows = list(self.rows)
        for (coef, constant), budget in limits:
            # Rows are scaled to a largest coefficient of 1 so HiGHS's tolerances mean the same for ms and BitOps.
            scale = float(np.abs(coef).max()) or 1.0
            rows.append(({i: c / scale for i, c in enumerate(coef) if c != 0.0}, -np.inf, (budget - constant) / scale))
        triplets = [(r, c, v) for r, (entries, _, _) in enumerate(rows) for c, v in entries.items()]
        r_index, c_index, values = zip(*triplets)
        matrix = sparse.csr_matrix((values, (r_index, c_index)), shape=(len(rows), self.size))
        result = milp(
            objective,
            integrality=np.ones(self.size),
            bounds=Bounds(self.lower, self.upper),
            constraints=LinearConstraint(matrix, [r[1] for r in rows], [r[2] for r in rows]),
            options={"mip_rel_gap": 0.0},
        )
        if result.status == 2:
            return None
        if result.status != 0 or result.x is None:
            raise MpqcError(f"the precision ILP did not reach an optimum: {result.message}")
        return result.x

    def decode(self, x: np.ndarray) -> dict[str, str]:
        chosen = {}
        for (layer, p), i in self.index.items():
            if x[i] > 0.5:
                chosen[layer] = p
        return {layer: chosen[layer] for layer in self.layers}

    def minimum(self, resource: str, tables: dict, forms: dict, budgets: dict, others: Sequence[str]) -> float | None:
        """The least `resource` can cost under the budgets of `others`; None if those cannot all be met."""
        coef = forms[resource][0]
        # Scaled like the loss objective, so HiGHS's absolute gap is negligible here too.
        x = self.run(coef / (float(np.abs(coef).max()) or 1.0) * _LOSS_SCALE, [(forms[r], budgets[r]) for r in others])
        if x is None:
            return None
        return _cost(resource, tables[resource], self.decode(x))


def _merge_groups(ties: Sequence[Sequence[str]], layers: tuple[str, ...]) -> list[list[str]]:
    """Overlapping tie groups are one group; members in layer order, so the program is deterministic."""
    order = {layer: i for i, layer in enumerate(layers)}
    parent: dict[str, str] = {}

    def root(name: str) -> str:
        while parent.setdefault(name, name) != name:
            name = parent[name]
        return name

    for group in ties:
        for name in group:
            if name not in order:
                raise ValueError(f"tied layer '{name}' is not among the layers")
        for name in group[1:]:
            parent[root(name)] = root(group[0])
    merged: dict[str, list[str]] = {}
    for name in sorted(parent, key=order.__getitem__):
        merged.setdefault(root(name), []).append(name)
    return [members for members in merged.values() if len(members) > 1]


def _interaction(latency: LatencyModel, edge: tuple[str, str]) -> float:
    b = latency.boundary
    return b(True, True, edge) - b(True, False, edge) - b(False, True, edge) + b(False, False, edge)


def _scaled(terms: dict[int, float], factor: float) -> dict[int, float]:
    return {i: v * factor for i, v in terms.items()}


def _fmt(resource: str, value: float) -> str:
    return f"{value:.6g} {_UNITS[resource]}"


def _infeasible(program: _Program, tables: dict, forms: dict, budgets: dict[str, float]) -> BudgetInfeasible:
    """Name, for each budget, the least its resource can cost under the other budgets (or alone)."""
    smallest, given_others, clauses = {}, {}, []
    for resource, budget in budgets.items():
        others = [r for r in budgets if r != resource]
        least = program.minimum(resource, tables, forms, budgets, others)
        given_others[resource] = least is not None
        if least is None:
            least = program.minimum(resource, tables, forms, budgets, [])
        smallest[resource] = least
        head = f"{resource} budget {_fmt(resource, budget)}"
        if not others:
            clauses.append(f"{head} is infeasible: the smallest reachable is {_fmt(resource, least)} (the cheapest policy the candidates, ties and pins allow)")
        elif given_others[resource]:
            clauses.append(f"{head} is infeasible under the other budgets: the smallest reachable there is {_fmt(resource, least)}")
        else:
            clauses.append(f"{head}: the other budgets cannot all be met; alone its smallest reachable is {_fmt(resource, least)}")
    return BudgetInfeasible("; ".join(clauses), smallest, given_others)
