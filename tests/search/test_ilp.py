"""The precision ILP against brute-force enumeration of every policy on small random problems.

Costs and losses are multiples of 1/4, so every sum is exact in floating point: a budget that a
policy meets exactly must count as met, and one it misses misses by at least 1/4.
"""

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpqc.costmodel.latency import LatencyModel, bitops_and_size
from mpqc.errors import MpqcError
from mpqc.passes.signatures import Signature
from mpqc.search.ilp import BudgetInfeasible, pareto, smallest, solve

POOL = ("fp32", "w8a8", "w4a8", "w4a16")  # w4a16 and fp32 keep activations float
QUANTIZES = {"fp32": False, "w8a8": True, "w4a8": True, "w4a16": False}
quarters = st.integers(0, 24).map(lambda v: v / 4)


@st.composite
def problems(draw):
    n = draw(st.integers(1, 6))
    layers = [f"l{i}" for i in range(n)]
    candidates = {layer: draw(st.lists(st.sampled_from(POOL), min_size=1, max_size=3, unique=True)) for layer in layers}
    pairs = [(layer, p) for layer in layers for p in candidates[layer]]
    loss = {pair: draw(quarters) for pair in pairs}
    edges = tuple(draw(st.lists(st.tuples(st.sampled_from(layers), st.sampled_from(layers)), max_size=8)))
    kinds = list(itertools.product((False, True), repeat=2))
    latency = LatencyModel(
        layer_ms={pair: draw(quarters) for pair in pairs},
        edges=edges,
        boundary_ms={key: draw(st.integers(0, 8)) / 4 for key in kinds},
        overhead_ms=draw(quarters),
        # Some edges carry costs of their own on top of the per-kind ones.
        edge_ms={edge: {kind: draw(st.integers(0, 8)) / 4 for kind in draw(st.lists(st.sampled_from(kinds), unique=True))}
                 for edge in draw(st.lists(st.sampled_from(edges), unique=True)) if edges} if edges else {},
    )
    tables = {"latency": latency, "bitops": {pair: draw(quarters) for pair in pairs}, "size": {pair: draw(quarters) for pair in pairs}}
    ties = draw(st.lists(st.lists(st.sampled_from(layers), min_size=2, max_size=3, unique=True), max_size=2)) if n > 1 else []
    fixed = {}
    for layer in draw(st.lists(st.sampled_from(layers), max_size=2, unique=True)):
        # Mostly an allowed precision; sometimes one the layer does not allow (a user error).
        fixed[layer] = draw(st.sampled_from(candidates[layer] * 4 + list(POOL)))
    # Any subset of the three budgets, drawn as a bit mask.
    mask = draw(st.integers(0, 7))
    resources = [r for bit, r in enumerate(("latency", "bitops", "size")) if mask >> bit & 1]
    valid = _valid_policies(layers, candidates, ties, fixed)
    budgets = {}
    for resource in resources:
        spent = [_cost(tables, resource, policy) for policy in valid] or [0.0]
        # From a little below the cheapest to the dearest policy: infeasible, tight and loose budgets.
        budgets[resource] = draw(st.integers(int(min(spent) * 4) - 3, int(max(spent) * 4))) / 4
    return layers, candidates, loss, tables, budgets, ties, fixed, valid


def _valid_policies(layers, candidates, ties, fixed):
    """Every policy that honours the ties and the pinned layers."""
    out = []
    for combo in itertools.product(*(candidates[layer] for layer in layers)):
        policy = dict(zip(layers, combo))
        if all(policy[layer] == p for layer, p in fixed.items()) and all(len({policy[m] for m in group}) == 1 for group in ties):
            out.append(policy)
    return out


def _cost(tables, resource, policy):
    if resource == "latency":
        return tables["latency"].predict(policy)
    return sum(tables[resource][item] for item in policy.items())


def _meets(tables, budgets, policy, resources):
    return all(_cost(tables, r, policy) <= budgets[r] for r in resources)


def _kwargs(tables, budgets, ties, fixed):
    kwargs = {"latency": tables["latency"], "bitops": tables["bitops"], "size_bytes": tables["size"], "ties": ties, "fixed": fixed}
    names = {"latency": "latency_budget_ms", "bitops": "bitops_budget", "size": "size_budget"}
    return kwargs | {names[r]: b for r, b in budgets.items()}


def _rank(candidates, policy):
    return sum(candidates[layer].index(p) for layer, p in policy.items())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_matches_brute_force(problem):
    layers, candidates, loss, tables, budgets, ties, fixed, valid = problem
    kwargs = _kwargs(tables, budgets, ties, fixed)
    if not valid:  # the ties and pins contradict each other or the candidates
        with pytest.raises(MpqcError):
            solve(layers, candidates, loss, **kwargs)
        return
    feasible = [policy for policy in valid if _meets(tables, budgets, policy, budgets)]
    if not feasible:
        with pytest.raises(BudgetInfeasible) as caught:
            solve(layers, candidates, loss, **kwargs)
        for resource in budgets:
            others = [r for r in budgets if r != resource]
            within = [p for p in valid if _meets(tables, budgets, p, others)]
            assert caught.value.given_others[resource] == bool(within)
            expected = min(_cost(tables, resource, p) for p in (within or valid))
            assert caught.value.smallest[resource] == pytest.approx(expected, abs=1e-9)
            assert f"{expected:.6g}" in str(caught.value)
        assert "\n" not in str(caught.value)
        return

    found = solve(layers, candidates, loss, **kwargs)
    policy = found.assignments
    assert list(policy) == layers
    assert policy in valid  # ties and pins respected
    assert _meets(tables, budgets, policy, budgets)
    best = min(sum(loss[item] for item in p.items()) for p in feasible)
    assert found.objective == pytest.approx(best, abs=1e-9)
    assert found.objective == pytest.approx(sum(loss[item] for item in policy.items()), abs=1e-12)
    # Among equally good policies the one preferring earlier candidates wins, every time.
    optimal = [p for p in feasible if sum(loss[item] for item in p.items()) == best]
    assert _rank(candidates, policy) == min(_rank(candidates, p) for p in optimal)
    assert solve(layers, candidates, loss, **kwargs).assignments == policy
    assert found.latency_ms == pytest.approx(tables["latency"].predict(policy))
    assert found.bitops == pytest.approx(_cost(tables, "bitops", policy))
    assert found.size_bytes == pytest.approx(_cost(tables, "size", policy))
    for resource in ("latency", "bitops", "size"):
        others = [r for r in budgets if r != resource]
        least = min(_cost(tables, resource, p) for p in valid if _meets(tables, budgets, p, others))
        assert smallest(layers, candidates, resource, **kwargs) == pytest.approx(least, abs=1e-9)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.sampled_from(["latency", "bitops", "size"]))
def test_pareto_front_is_monotone_and_optimal(problem, resource):
    layers, candidates, loss, tables, _, ties, fixed, valid = problem
    if not valid:
        return
    kwargs = _kwargs(tables, {}, ties, fixed)
    spent = sorted({_cost(tables, resource, p) for p in valid})
    budgets = [spent[0] - 0.25] + spent  # the first is infeasible and skipped
    front = pareto(layers, candidates, loss, resource=resource, budgets=budgets[::-1], **kwargs)
    assert front
    used = [_cost(tables, resource, s.assignments) for s in front]
    objectives = [s.objective for s in front]
    assert all(a < b for a, b in zip(used, used[1:]))
    assert all(a > b for a, b in zip(objectives, objectives[1:]))
    for budget in budgets[1:]:
        best = min(sum(loss[i] for i in p.items()) for p in valid if _cost(tables, resource, p) <= budget)
        reachable = [s.objective for s, u in zip(front, used) if u <= budget]
        assert reachable[-1] == pytest.approx(best, abs=1e-9)


def _three_layers():
    layers = ["a", "b", "c"]
    candidates = {layer: ["fp32", "w8a8", "w4a16"] for layer in layers}
    weight = {"fp32": 0.0, "w8a8": 1.0, "w4a16": 2.0}
    loss = {(layer, p): weight[p] * (i + 1) for i, layer in enumerate(layers) for p in candidates[layer]}
    speed = {"fp32": 3.0, "w8a8": 1.0, "w4a16": 2.0}
    latency = LatencyModel(
        {(layer, p): speed[p] for layer in layers for p in candidates[layer]},
        edges=(("a", "b"), ("b", "c")),
        boundary_ms={(True, False): 0.5, (False, True): 0.75, (True, True): 0.25},
        overhead_ms=1.0,
    )
    return layers, candidates, loss, latency


def test_latency_model_predict_by_hand():
    _, _, _, latency = _three_layers()
    # layers 1 + 3 + 2, edges a->b (int8 -> float: 0.5) and b->c (float -> float: 0), overhead 1
    assert latency.predict({"a": "w8a8", "b": "fp32", "c": "w4a16"}) == pytest.approx(7.5)
    # all int8: 3 x 1, two int8 -> int8 edges of 0.25, overhead 1
    assert latency.predict({"a": "w8a8", "b": "w8a8", "c": "w8a8"}) == pytest.approx(4.5)


def test_infeasible_latency_message_names_the_fastest():
    layers, candidates, loss, latency = _three_layers()
    with pytest.raises(MpqcError) as caught:
        solve(layers, candidates, loss, latency=latency, latency_budget_ms=4.0)
    assert str(caught.value).startswith("latency budget 4 ms is infeasible: the smallest reachable is 4.5 ms")


def test_several_budgets_bind_together():
    layers, candidates, loss, latency = _three_layers()
    size = {(layer, p): {"fp32": 4.0, "w8a8": 1.0, "w4a16": 0.5}[p] for layer in layers for p in candidates[layer]}
    # Latency alone would keep c at fp32 (loss 3); the size budget then forces c down to w8a8 as well.
    alone = solve(layers, candidates, loss, latency=latency, latency_budget_ms=6.75)
    assert alone.assignments == {"a": "w8a8", "b": "w8a8", "c": "fp32"}
    both = solve(layers, candidates, loss, latency=latency, latency_budget_ms=6.75, size_bytes=size, size_budget=3.0)
    assert both.assignments == {"a": "w8a8", "b": "w8a8", "c": "w8a8"}
    assert both.size_bytes == 3.0 and both.latency_ms <= 6.75
    with pytest.raises(BudgetInfeasible) as caught:
        solve(layers, candidates, loss, latency=latency, latency_budget_ms=5.0, size_bytes=size, size_budget=2.0)
    # Only all-w8a8 (4.5 ms, 3 bytes) is within 5 ms; within 2 bytes the fastest is a=w8a8, b=c=w4a16 (6.5 ms).
    assert caught.value.smallest == {"latency": pytest.approx(6.5), "size": pytest.approx(3.0)}
    assert caught.value.given_others == {"latency": True, "size": True}


def test_equal_losses_keep_the_first_candidate_and_pins_hold():
    layers, candidates, _, latency = _three_layers()
    zero = {(layer, p): 0.0 for layer in layers for p in candidates[layer]}
    assert set(solve(layers, candidates, zero).assignments.values()) == {"fp32"}
    pinned = solve(layers, candidates, zero, fixed={"b": "w4a16"}, ties=[("b", "c")])
    assert pinned.assignments == {"a": "fp32", "b": "w4a16", "c": "w4a16"}


def test_user_errors_are_one_line_mpqc_errors():
    layers, candidates, loss, _ = _three_layers()
    with pytest.raises(MpqcError, match="pinned to w4a8, which is not among its candidates"):
        solve(layers, candidates, loss, fixed={"a": "w4a8"})
    with pytest.raises(MpqcError, match="no candidate precision in common"):
        solve(layers, candidates | {"c": ["w4a8"]}, loss | {("c", "w4a8"): 1.0}, ties=[("a", "c")])
    with pytest.raises(ValueError, match="no value"):
        solve(layers, candidates, {k: v for k, v in loss.items() if k[0] != "c"})


def test_bitops_and_size_by_hand():
    conv = Signature("Conv", ("batch", 16, 28, 28), (32, 16, 3, 3), ("batch", 32, 14, 14), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1)
    macs = 32 * 16 * 9 * 14 * 14
    assert bitops_and_size(conv, "w8a8") == (macs * 64, 32 * 16 * 9)
    assert bitops_and_size(conv, "fp32") == (macs * 1024, 32 * 16 * 9 * 4)
    depthwise = Signature("Conv", ("batch", 32, 14, 14), (32, 1, 3, 3), ("batch", 32, 14, 14), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 32)
    assert bitops_and_size(depthwise, "w4a8") == (32 * 9 * 14 * 14 * 32, 32 * 9 / 2)
    matmul = Signature("MatMul", ("batch", "sequence", 384), (384, 1536), ("batch", "sequence", 1536))
    assert bitops_and_size(matmul, "w4a16") == (384 * 1536 * 64, 384 * 1536 / 2)
    assert bitops_and_size(matmul, "w4a16", {"sequence": 128})[0] == 128 * 384 * 1536 * 64
    gemm = Signature("Gemm", ("batch", 1280), (1000, 1280), ("batch", 1000))
    assert bitops_and_size(gemm, "w8a8") == (1280 * 1000 * 64, 1280 * 1000)
