"""The boundary fit: physical signs, and refusal when the measurements do not support it."""

import numpy as np
import pytest

from mpqc.costmodel.fit import EDGE_KINDS, edge_elements, edge_features, fit_boundaries, fitting_policies, unfused_penalties
from mpqc.costmodel.latency import LatencyModel
from mpqc.errors import MpqcError
from mpqc.passes.analysis import analyze
from mpqc.passes.layer_graph import layer_edges
from mpqc.targets import load_target


@pytest.fixture()
def problem(tinynet):
    spec, _ = tinynet
    analysis = analyze(spec)
    target = load_target("ort-cpu")
    # Layer terms as a table would hold them: each precision its own time, unfused outputs dearer.
    terms = {}
    for i, layer in enumerate(analysis.layers):
        for p in target.precisions_for(layer.op_type):
            terms[(layer.name, p.name)] = 0.1 + 0.01 * i + (0.0 if p.is_float else -0.03)
            if p.quantizes_activations:
                terms[(layer.name, p.name + "~float-out")] = terms[(layer.name, p.name)] + 0.02
    policies = fitting_policies(analysis, target, 12, seed=0)
    return analysis, target, terms, policies


def _measurements(analysis, target, terms, policies, coefficients):
    """What a machine whose boundaries cost exactly `coefficients` would measure."""
    edges = layer_edges(analysis.model, analysis.layers)
    elements = edge_elements(analysis, 1)
    specific = LatencyModel(terms, edges, {}, 0.0, unfused_penalties(analysis, target, terms, edges))
    return np.array([specific.predict(p.as_dict) + np.concatenate([edge_features(edges, elements, p), [1.0]]) @ coefficients
                     for p in policies])


def test_a_fit_recovers_physical_boundaries_and_keeps_their_signs(problem):
    analysis, target, terms, policies = problem
    # float->int8 and int8->float edges cost, int8->int8 edges save, plus an overhead.
    truth = np.array([0.0, 0.02, 0.015, -0.01, 0.0, 0.0, 0.0, 0.0, 0.05])
    measured = _measurements(analysis, target, terms, policies, truth)
    fit = fit_boundaries(analysis, target, terms, policies, 1, measured, noise_floor=0.01)
    assert fit["fit_rms_relative_residual"] < 1e-6 and fit["forced"] is False
    kinds = [f"{int(a)}{int(b)}" for a, b in EDGE_KINDS]
    for kind in kinds:
        sign = -1 if kind == "11" else 1
        assert sign * fit["boundary_ms"][kind] >= 0 and sign * fit["boundary_ms_per_million_elements"][kind] >= 0
    assert fit["overhead_ms"] >= 0


def test_a_noisy_machine_is_refused_unless_forced(problem):
    analysis, target, terms, policies = problem
    measured = _measurements(analysis, target, terms, policies, np.array([0, 0.02, 0.015, -0.01, 0, 0, 0, 0, 0.05]))
    with pytest.raises(MpqcError, match="too noisy to fit a latency model: the medians of even and odd rounds of one model differ by 40%"):
        fit_boundaries(analysis, target, terms, policies, 1, measured, noise_floor=0.4)
    forced = fit_boundaries(analysis, target, terms, policies, 1, measured, noise_floor=0.4, force=True)
    assert "too noisy" in forced["forced"]


def test_a_fit_the_measurements_contradict_is_refused(problem):
    analysis, target, terms, policies = problem
    # Every model measured at half its layer terms' sum: no non-negative overhead or float-side edge
    # can explain an all-fp32 model running faster than its own layers.
    measured = _measurements(analysis, target, terms, policies, np.zeros(9)) * 0.5
    with pytest.raises(MpqcError, match="does not explain the measurements.*--force-fit"):
        fit_boundaries(analysis, target, terms, policies, 1, measured, noise_floor=0.01)
