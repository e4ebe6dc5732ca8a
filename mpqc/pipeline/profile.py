"""`mpqc profile`: fill the target's latency table for a model, then fit its boundary terms.

On ONNX Runtime each layer signature is timed as a micro-model (mpqc.costmodel.microbench); on
TensorRT whole engines are profiled layer by layer (mpqc.pipeline.profile_tensorrt). Either way the
boundary terms are fitted to end-to-end measurements of uniform and random mixed policies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from tqdm import tqdm

from mpqc.backends.base import backend_for
from mpqc.bench.inputs import synthetic_feeds
from mpqc.bench.latency import first_batch, measure_interleaved
from mpqc.costmodel.fit import FLOAT_OUTPUT, fit_boundaries, fitting_policies, layer_terms, model_key
from mpqc.costmodel.microbench import time_layer
from mpqc.costmodel.table import LatencyTable, entry_key
from mpqc.data.proxy import ProxySource, proxy_feeds
from mpqc.errors import MpqcError
from mpqc.frontend.resolve import resolve_model
from mpqc.frontend.shapes import sizes_from_data, with_input_shapes
from mpqc.lower.lowering import CalibrationSettings, Lowering
from mpqc.passes.analysis import Analysis, analyze_loaded
from mpqc.passes.signatures import layer_signature
from mpqc.progress import stage as progress_stage
from mpqc.targets import Target, load_target

_SHAPE_HINT = "pass its shape with --shape NAME:DIMS (e.g. input:1x3x224x224) or real inputs with --proxy DATA.npz"


def costmodel_inputs(model: str, target_name: str, proxy: str | None, batch: int, tables: str | None,
                     shapes: Mapping[str, tuple[int, ...]] | None = None):
    """Analysis, target, table and the two data sets profiling and validation need:
    {"calibration": samples to calibrate the lowering, "timing": one batch to time}.

    Symbolic input dimensions besides the batch are fixed from `shapes`, else from the proxy arrays.
    """
    target = load_target(target_name)
    with progress_stage(f"loading {model}"):
        loaded = resolve_model(model)
    proxied = proxy is not None or loaded.example is not None
    calibration = proxy_feeds(ProxySource(proxy), loaded)[0] if proxied else None
    fixed = dict(shapes or {})
    if proxy is not None:  # only where the model leaves a size open: a model's own shapes key its table
        fixed = sizes_from_data(loaded.model, calibration) | fixed
    if fixed:
        loaded = dataclasses.replace(loaded, model=with_input_shapes(loaded.model, fixed, model))
    analysis = analyze_loaded(loaded)
    _require_concrete_layers(analysis)
    if calibration is None:  # ranges change numbers, not speed: a fixed-seed synthetic batch is enough to time
        calibration = synthetic_feeds(analysis.loaded.model, 8, hint=_SHAPE_HINT)
    if analysis.loaded.example is not None:
        timing = first_batch(analysis.loaded.example.eval_feeds()[0], batch)
    elif proxy is not None:
        timing = first_batch(calibration, batch)
    else:
        timing = synthetic_feeds(analysis.loaded.model, batch, hint=_SHAPE_HINT)
    return analysis, target, LatencyTable.for_target(target, tables), {"calibration": calibration, "timing": timing}


def _require_concrete_layers(analysis: Analysis) -> None:
    """A latency table is measured at real sizes: every layer dimension but the batch must be known."""
    for layer in analysis.layers:
        signature = layer_signature(analysis.model, layer)
        for what, shape in (("input", signature.input_shape), ("output", signature.output_shape)):
            if any(isinstance(d, str) for d in shape[1:]):
                raise MpqcError(f"layer '{layer.name}' has a symbolic {what} dimension ({'x'.join(map(str, shape))}); "
                                + _SHAPE_HINT)


def profile_layers(analysis: Analysis, target: Target, table: LatencyTable, batch: int, force: bool = False, progress: bool = True) -> dict:
    """Measure every (signature, deployable precision) the table lacks; returns counts."""
    work = {}
    for layer in analysis.layers:
        signature = layer_signature(analysis.model, layer)
        for p in target.precisions_for(layer.op_type):
            work.setdefault((signature.key(), p.name), signature)
            if p.quantizes_activations and target.quantize_layer_outputs:
                work.setdefault((signature.key(), p.name + FLOAT_OUTPUT), signature)
    # An entry without its frame time predates taking the per-call cost off: measured again.
    todo = [(key, p, sig) for (key, p), sig in work.items()
            if force or "frame_ms" not in table.entries.get(entry_key(key, p, batch), {})]
    for key, p, signature in tqdm(todo, desc="profiling layers", unit="layer", disable=not progress):
        name, _, variant = p.partition("~")
        table.record(key, p, batch, time_layer(signature, name, target, batch, output_read=not variant))
    return {"distinct": len(work), "measured": len(todo), "reused": len(work) - len(todo)}


def profile(analysis, target, table, feeds, batch: int, calibration: CalibrationSettings = CalibrationSettings(),
            seed: int = 0, fit_policies: int = 12, runs: int = 30, force: bool = False, progress: bool = True,
            force_fit: bool = False) -> dict:
    """feeds: {"calibration": arrays to calibrate the lowering, "timing": one batch to time}.

    The fit's policies are timed in interleaved rounds until their medians are stable; the spread
    of their round medians is the noise floor the fit is judged against (mpqc.costmodel.fit).
    """
    counts = profile_layers(analysis, target, table, batch, force, progress)
    table.save()
    key = model_key(analysis, batch)
    if force or force_fit or key not in table.models:
        terms = layer_terms(analysis, target, table, batch)
        lowering = Lowering.prepare(analysis, target, feeds["calibration"], calibration)
        policies = fitting_policies(analysis, target, fit_policies, seed)
        backend = backend_for(target)
        runners = [backend.load(lowering.lower(policy), target)
                   for policy in tqdm(policies, desc="lowering fit policies", unit="policy", disable=not progress)]
        with tqdm(desc="timing fit policies (interleaved rounds)", unit="round", disable=not progress) as rounds:
            times = measure_interleaved(runners, feeds["timing"], runs=runs, on_round=lambda _: rounds.update())
        table.models[key] = fit_boundaries(analysis, target, terms, policies, batch, times.medians_ms,
                                           times.noise_floor, force=force_fit) | {"fit_rounds": len(times.round_medians_ms[0]),
                                                                                "fit_rounds_stable": times.stable}
        table.save()
    return {"table": str(table.path), "layers": counts, "fit": table.models[key]}


def profile_target(model: str, target_name: str, proxy: str | None, batch: int, tables: str | None, *,
                   shapes: Mapping[str, tuple[int, ...]] | None = None, fit_policies: int = 12, force: bool = False,
                   progress: bool = True, force_fit: bool = False) -> tuple[Target, dict]:
    """`mpqc profile`: the profiler of the target's backend, on the model's own data."""
    target = load_target(target_name)
    profiler = PROFILERS[backend_for(target).name]
    return target, profiler(model, target_name, proxy, batch, tables, shapes=shapes, fit_policies=fit_policies,
                            force=force, progress=progress, force_fit=force_fit)


def _profile_onnxruntime(model, target_name, proxy, batch, tables, *, shapes, fit_policies, force, progress, force_fit) -> dict:
    analysis, target, table, feeds = costmodel_inputs(model, target_name, proxy, batch, tables, shapes)
    return profile(analysis, target, table, feeds, batch, fit_policies=fit_policies, force=force, progress=progress,
                   force_fit=force_fit)


def _profile_tensorrt(model, target_name, proxy, batch, tables, *, shapes, fit_policies, force, progress, force_fit) -> dict:
    from mpqc.pipeline import profile_tensorrt

    profile_tensorrt.require_tensorrt()  # one clear line before any lowering when TensorRT is missing
    analysis, target, _, feeds = costmodel_inputs(model, target_name, proxy, batch, tables, shapes)
    return profile_tensorrt.profile_trt(analysis, target, feeds, batch, tables=tables, fit_policies=fit_policies,
                                        force=force, progress=progress, force_fit=force_fit)


# backend name -> its profiler.
PROFILERS = {"onnxruntime": _profile_onnxruntime, "tensorrt": _profile_tensorrt}
