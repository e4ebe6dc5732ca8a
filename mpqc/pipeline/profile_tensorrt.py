"""`mpqc profile --target trt-*`: latency tables measured in TensorRT engines.

ONNX Runtime tables time one micro-model per layer signature (mpqc.pipeline.profile). On
TensorRT a layer's cost depends on what it is fused with, so layer terms come from whole-model
engines instead: one engine per uniform policy (every layer at precision p where the target
deploys it, else fp32), timed per layer by TensorRT's IProfiler. Each engine layer's time goes to
the mpqc layer whose node (or own Q/DQ and bias nodes) it holds; layers sharing a signature get
the median. Per-layer times add up to more than an engine's latency (the profiler synchronises
around every layer), so the boundary terms and overhead are fitted, as for ONNX Runtime, to
end-to-end latencies of uniform and random mixed policies: the overhead comes out negative when
the profiler's per-layer times overstate the whole.

The table has the same format as ONNX Runtime's and the same ILP reads it; its fingerprint names
the GPU, compute capability and TensorRT version instead of the CPU and ONNX Runtime version.
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from mpqc.backends.base import backend_for
from mpqc.backends.tensorrt import BACKEND as TENSORRT
from mpqc.backends.tensorrt.engine import (
    TensorRTRunner,
    batch_range,
    build_engine,
    prepare_for_tensorrt,
    require_tensorrt,
    timing_cache_path,
)
from mpqc.backends.tensorrt.inspector import attribute_layer_times, layer_precisions
from mpqc.costmodel.fit import fit_boundaries, fitting_policies, layer_terms, model_key
from mpqc.costmodel.policies import uniform_policies
from mpqc.costmodel.table import LatencyTable
from mpqc.errors import MpqcError
from mpqc.lower.lowering import CalibrationSettings, Lowering
from mpqc.passes.analysis import Analysis
from mpqc.passes.signatures import layer_signature
from mpqc.policy import Policy
from mpqc.targets import Target


class _Engines:
    """Lowers, builds and runs one engine per policy; remembers each policy's end-to-end latency."""

    def __init__(self, lowering: Lowering, target: Target, batch: int, tables, timing: dict, runs: int):
        self.lowering, self.target, self.batch, self.timing, self.runs = lowering, target, batch, timing, runs
        self.cache = timing_cache_path(target, tables)
        self.latency_ms: dict[tuple, float] = {}

    def runner(self, policy: Policy) -> TensorRTRunner:
        model, _ = prepare_for_tensorrt(self.lowering.lower(policy), self.target)
        engine = build_engine(model, self.target, timing_cache_path=self.cache, batch=batch_range(self.target, self.batch))
        return TensorRTRunner(engine)

    def measure(self, policy: Policy, runner: TensorRTRunner | None = None) -> float:
        key = policy.assignments
        if key not in self.latency_ms:
            own = runner is None
            runner = runner or self.runner(policy)
            try:
                self.latency_ms[key] = runner.latency(self.timing, warmup=10, runs=self.runs).median_ms
            finally:
                if own:
                    runner.close()
        return self.latency_ms[key]


def profile_layers_trt(analysis: Analysis, target: Target, table: LatencyTable, engines: _Engines, batch: int,
                       layer_runs: int, force: bool = False, progress: bool = True) -> None:
    """Fill the table's (signature, precision) entries from per-layer times of uniform-policy engines."""
    signatures = {layer.name: layer_signature(analysis.model, layer).key() for layer in analysis.layers}
    work = {(signatures[layer.name], p.name) for layer in analysis.layers for p in target.precisions_for(layer.op_type)}
    todo = {key for key in work if force or table.lookup(*key, batch) is None}
    names = [layer.name for layer in analysis.layers]
    # fp32 first: its engine measures every layer's float term.
    policies = sorted(uniform_policies(analysis, target), key=lambda p: p.source != "uniform:fp32")
    for policy in tqdm(policies, desc="profiling engines", unit="engine", disable=not progress):
        wanted = {(signatures[name], precision) for name, precision in policy.assignments} & todo
        if not wanted:
            continue
        runner = engines.runner(policy)
        try:
            times = runner.layer_times(engines.timing, layer_runs)
            per_layer, _ = attribute_layer_times(times, layer_precisions(runner.engine), names)
            engines.measure(policy, runner)
        finally:
            runner.close()
        samples: dict[tuple[str, str], list[float]] = {}
        for name, precision in policy.assignments:
            samples.setdefault((signatures[name], precision), []).append(per_layer[name])
        for key in sorted(wanted):
            values = samples[key]
            table.record(*key, batch, {"median_ms": float(np.median(values)), "runs": layer_runs, "layers": len(values),
                                       "source": f"TensorRT IProfiler, {policy.source} engine"})
            todo.discard(key)


def profile_trt(analysis: Analysis, target: Target, feeds: dict, batch: int,
                calibration: CalibrationSettings = CalibrationSettings(), seed: int = 0, *, tables=None,
                fit_policies: int = 12, runs: int = 50, layer_runs: int = 20, force: bool = False, progress: bool = True,
                force_fit: bool = False) -> dict:
    """Measure the TensorRT latency table of `analysis` on this GPU and fit its boundary terms.

    feeds: {"calibration": arrays to calibrate the lowering, "timing": one batch to time}.
    Returns the same summary as mpqc.pipeline.profile.profile.
    """
    if backend_for(target) is not TENSORRT:
        raise MpqcError(f"target '{target.name}' runs on {target.backend}; profile_trt times TensorRT targets")
    plugin = target.plugins.int4_conv and any(
        "w4a8" in [p.name for p in target.precisions_for(layer.op_type)] for layer in analysis.layers if layer.op_type == "Conv")
    require_tensorrt(needs_plugin=plugin)
    table = LatencyTable.for_target(target, tables)
    lowering = Lowering.prepare(analysis, target, feeds["calibration"], calibration)
    engines = _Engines(lowering, target, batch, tables, feeds["timing"], runs)
    signatures = {(layer_signature(analysis.model, layer).key(), p.name)
                  for layer in analysis.layers for p in target.precisions_for(layer.op_type)}
    measured = sum(1 for key in signatures if force or table.lookup(*key, batch) is None)
    profile_layers_trt(analysis, target, table, engines, batch, layer_runs, force, progress)
    table.save()
    key = model_key(analysis, batch)
    if force or force_fit or key not in table.models:
        terms = layer_terms(analysis, target, table, batch)
        # The boundary fit of the ONNX Runtime tables, on end-to-end engine latencies.
        policies = fitting_policies(analysis, target, fit_policies, seed)
        table.models[key] = fit_boundaries(analysis, target, terms, policies, batch, [engines.measure(p) for p in policies],
                                           force=force_fit)
        table.save()
    return {"table": str(table.path), "layers": {"distinct": len(signatures), "measured": measured,
                                                 "reused": len(signatures) - measured}, "fit": table.models[key]}
