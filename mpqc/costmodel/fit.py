"""The cost model of one model on one target: layer terms from its latency table, boundary terms
fitted to whole-model measurements (mpqc.pipeline.profile measures both).

Layer terms come from micro-models (one per distinct signature x deployable precision, reused
across models and runs), net of the runtime's per-call cost. The table is not additive truth:
changing precision between two layers adds Quantize/Dequantize and layout work, and the ops
between layers cost time too. Those are fitted from whole-model measurements with the signs the
physics gives them (scipy's bounded least squares): per edge kind a cost per edge and per million
elements crossing it, plus a fixed overhead, all >= 0, except that an INT8 -> INT8 edge can only
save time (<= 0): it removes the DQ and the Q that its two micro-models each carried. A fit the
measurements do not support is refused, never written.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import lsq_linear

from mpqc.costmodel.latency import LatencyModel
from mpqc.costmodel.policies import random_policy, uniform_policies
from mpqc.costmodel.table import LatencyTable
from mpqc.errors import MpqcError
from mpqc.lower.qdq import through_clamps
from mpqc.passes.analysis import Analysis
from mpqc.passes.layer_graph import layer_edges
from mpqc.passes.signatures import layer_signature
from mpqc.policy import Policy
from mpqc.precision import precision
from mpqc.targets import Target

EDGE_KINDS = ((False, False), (False, True), (True, False), (True, True))  # (producer int8, consumer int8)
SAVING_KINDS = ((True, True),)  # fitted <= 0; every other term >= 0
# A fit is written only if its RMS residual, relative to the measured latency, is within the
# measurements' own noise floor or within this, whichever is larger (the cost model is judged at +-10%).
FIT_TOLERANCE = 0.05
# Round-to-round spread of repeated medians above which a machine is too noisy to fit on.
TOO_NOISY = 0.10
# In the model key: fits of an earlier form (unconstrained, before INT8 regions) are not reused.
FIT_FORMAT = "fit2"
# Table entries for a layer whose output nobody quantizes: ONNX Runtime then cannot fuse it.
FLOAT_OUTPUT = "~float-out"


def model_key(analysis: Analysis, batch: int) -> str:
    return f"{analysis.loaded.sha256()}@b{batch}@{FIT_FORMAT}"


def layer_terms(analysis: Analysis, target: Target, table: LatencyTable, batch: int) -> dict[tuple[str, str], float]:
    """(layer, precision) -> ms, plus (layer, precision~float-out) for layers that quantize activations."""
    terms, missing = {}, []
    for layer in analysis.layers:
        key = layer_signature(analysis.model, layer).key()
        for p in target.precisions_for(layer.op_type):
            names = [p.name] + ([p.name + FLOAT_OUTPUT] if p.quantizes_activations and target.quantize_layer_outputs else [])
            for name in names:
                value = table.lookup(key, name, batch)
                if value is None:
                    missing.append(f"{layer.name}@{name}")
                terms[(layer.name, name)] = value
    if missing:
        raise MpqcError(
            f"latency table '{table.path}' lacks {len(missing)} layer measurement(s) at batch {batch} "
            f"(e.g. {missing[0]}); run 'mpqc profile {analysis.loaded.spec} --target {target.name} --batch {batch}'"
        )
    return terms


def unfused_penalties(analysis: Analysis, target: Target, terms, edges) -> dict:
    """Per-edge cost of an INT8 producer whose every reader is a layer that stays float.

    The lowering gives such a producer no output quantizer (a float layer between a DQ and a Q
    would be quantized by the runtime itself), so ONNX Runtime runs it as dequantize + float op.
    With k layer readers the penalty is split over the k edges (exact for the usual k = 1).
    """
    if not target.quantize_layer_outputs:
        return {}
    layer_names = {layer.name for layer in analysis.layers}
    nodes = {node.name: node for node in analysis.model.graph}
    consumers: dict[str, list[str]] = {}
    for producer, consumer in edges:
        consumers.setdefault(producer, []).append(consumer)
    penalties = {}
    for layer in analysis.layers:
        end = through_clamps(nodes[layer.name].outputs[0])
        readers = [user.name for user, _ in end.uses()]
        if not readers or not all(name in layer_names for name in readers) or end.is_graph_output():
            continue  # some reader is not a layer: the output quantizer stays, the kernel stays fused
        share = len(consumers.get(layer.name, ())) or 1
        for p in target.precisions_for(layer.op_type):
            if p.quantizes_activations:
                extra = (terms[(layer.name, p.name + FLOAT_OUTPUT)] - terms[(layer.name, p.name)]) / share
                for consumer in consumers.get(layer.name, ()):
                    penalties.setdefault((layer.name, consumer), {})[(True, False)] = extra
    return penalties


def edge_counts(edges, policy: Policy) -> np.ndarray:
    kinds = {kind: 0 for kind in EDGE_KINDS}
    for producer, consumer in edges:
        kind = (precision(policy.as_dict[producer]).quantizes_activations, precision(policy.as_dict[consumer]).quantizes_activations)
        if kind in kinds:
            kinds[kind] += 1
    return np.array([kinds[k] for k in EDGE_KINDS], dtype=np.float64)


def edge_elements(analysis: Analysis, batch: int) -> dict[str, float]:
    """Millions of elements each layer's output carries across its edges (Q/DQ and layout work scale with it)."""
    sizes = {}
    for layer in analysis.layers:
        count = 1
        for d in layer_signature(analysis.model, layer).output_shape:
            count *= d if isinstance(d, int) else batch
        sizes[layer.name] = count / 1e6
    return sizes


def edge_features(edges, elements: dict[str, float], policy: Policy) -> np.ndarray:
    """Per edge kind: how many edges, and how many million elements cross them."""
    counts, sizes = edge_counts(edges, policy), np.zeros(len(EDGE_KINDS))
    for producer, consumer in edges:
        kind = (precision(policy.as_dict[producer]).quantizes_activations, precision(policy.as_dict[consumer]).quantizes_activations)
        if kind in EDGE_KINDS:
            sizes[EDGE_KINDS.index(kind)] += elements[producer]
    return np.concatenate([counts, sizes])


def fit_boundaries(analysis, target, terms, policies: list[Policy], batch: int, measured_ms,
                   noise_floor: float | None = None, force: bool = False) -> dict:
    """Edge-kind coefficients and the overhead from whole-model latencies (`measured_ms`, one per
    policy, end to end on the target's runtime: an ONNX Runtime session, a TensorRT engine).

    `noise_floor` is how far a median of rounds moves when measured again (InterleavedTimes.noise_floor; None: not measured). Refused with one
    line, unless `force`, when the machine is too noisy or the fit does not explain the measurements.
    """
    edges = layer_edges(analysis.model, analysis.layers)
    elements = edge_elements(analysis, batch)
    specific = LatencyModel(terms, edges, {}, 0.0, unfused_penalties(analysis, target, terms, edges))
    measured = np.asarray(measured_ms, dtype=np.float64)
    rows = np.array([np.concatenate([edge_features(edges, elements, policy), [1.0]]) for policy in policies])
    targets = measured - np.array([specific.predict(policy.as_dict) for policy in policies])
    saving = [kind in SAVING_KINDS for kind in EDGE_KINDS] * 2 + [False]
    lower = np.where(saving, -np.inf, 0.0)
    upper = np.where(saving, 0.0, np.inf)
    solution = lsq_linear(rows, targets, bounds=(lower, upper), method="bvls").x
    residual = rows @ solution - targets
    relative_rms = float(np.sqrt(np.mean((residual / measured) ** 2)))
    kinds = [f"{int(a)}{int(b)}" for a, b in EDGE_KINDS]
    fit = {
        "boundary_ms": dict(zip(kinds, map(float, solution[:4]))),
        "boundary_ms_per_million_elements": dict(zip(kinds, map(float, solution[4:8]))),
        "overhead_ms": float(solution[8]),
        "fit_policies": [p.source for p in policies],
        "fit_measured_ms": [float(m) for m in measured],
        "fit_rms_residual_ms": float(np.sqrt(np.mean(residual**2))),
        "fit_rms_relative_residual": relative_rms,
        "noise_floor": noise_floor,
        "forced": False,
    }
    problem = _unsupported(relative_rms, noise_floor)
    if problem is not None:
        if not force:
            raise MpqcError(f"{problem}; the fit was not written (layer measurements are kept). "
                              "Profile again on a quiet machine, or pass --force-fit to write it anyway")
        fit["forced"] = problem
    return fit


def _unsupported(relative_rms: float, noise_floor: float | None) -> str | None:
    if noise_floor is not None and noise_floor > TOO_NOISY:
        return (f"this machine is too noisy to fit a latency model: the medians of even and odd rounds of one model differ by "
                f"{noise_floor:.0%} (more than {TOO_NOISY:.0%})")
    tolerance = max(noise_floor or 0.0, FIT_TOLERANCE)
    if relative_rms > tolerance:
        return (f"the boundary fit does not explain the measurements: its RMS residual is {relative_rms:.1%} of the "
                f"measured latency, above the {tolerance:.1%} allowed (the noise floor {noise_floor or 0:.1%} or "
                f"{FIT_TOLERANCE:.0%}, whichever is larger)")
    return None


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
    def kind(key: str) -> tuple[bool, bool]:
        return key[0] == "1", key[1] == "1"

    edges = layer_edges(analysis.model, analysis.layers)
    elements = edge_elements(analysis, batch)
    per_edge = unfused_penalties(analysis, target, terms, edges)
    for producer, consumer in edges:  # the size-proportional part of each boundary
        costs = per_edge.setdefault((producer, consumer), {})
        for key, per_million in fitted["boundary_ms_per_million_elements"].items():
            costs[kind(key)] = costs.get(kind(key), 0.0) + per_million * elements[producer]
    return LatencyModel(
        layer_ms=terms,
        edges=edges,
        boundary_ms={(False, False): 0.0} | {kind(k): v for k, v in fitted["boundary_ms"].items()},
        overhead_ms=fitted["overhead_ms"],
        edge_ms=per_edge,
    )
