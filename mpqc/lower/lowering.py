"""A model calibrated once, lowered to a QDQ model for any number of policies."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir

from mpqc.calibrate.ranges import calibrate, channel_means
from mpqc.errors import MpqcError
from mpqc.lower.float16 import to_float16
from mpqc.lower.live_ranges import clamp_range, live_bounds
from mpqc.lower.qdq import lower, mean_tensors, plan_activation_quantizers, values_by_name
from mpqc.passes.analysis import Analysis
from mpqc.policy import Policy
from mpqc.targets import Target


@dataclasses.dataclass(frozen=True)
class CalibrationSettings:
    method: str = "minmax"  # "minmax", "mse" or "percentile" (mpqc.calibrate.ranges)
    percentile: float = 99.99
    bias_correction: bool = True  # correct biases for the mean error of the rounded weights


@dataclasses.dataclass(frozen=True)
class Lowering:
    """Calibrated once, lowers any number of policies (profiling and validation lower dozens).

    Ranges and channel means are per tensor, so measuring every tensor any policy could quantize
    gives each policy exactly the numbers a build of that policy alone would use.
    """

    analysis: Analysis
    target: Target
    float_model: onnx.ModelProto
    ranges: dict[str, tuple[float, float]]
    input_means: dict[str, np.ndarray]
    # Tensors whose calibrated range was cut to the part their readers can tell apart (live_ranges).
    narrowed: tuple[str, ...] = ()

    @classmethod
    def prepare(cls, analysis: Analysis, target: Target, feeds: dict[str, np.ndarray],
                calibration: CalibrationSettings = CalibrationSettings()) -> "Lowering":
        float_model = ir.to_proto(analysis.model)
        everything = Policy(tuple((layer.name, "w8a8") for layer in analysis.layers), "all sites")
        tensors = [site.value for site in plan_activation_quantizers(analysis.model, analysis.layers, everything, target)]
        corrected = mean_tensors(analysis.layers, everything) if calibration.bias_correction else {}
        if not feeds:
            return cls(analysis, target, float_model, {}, {})
        ranges = calibrate(float_model, tensors, feeds, calibration.method, calibration.percentile, grid=target.activation_type)
        if not all(np.isfinite(v).all() for v in ranges.values()):
            raise MpqcError("calibration produced non-finite ranges: the model overflows on the proxy data")
        calibrated, ranges = ranges, _cut_to_live_bounds(analysis.model.graph, ranges)
        means = channel_means(float_model, corrected, feeds)
        input_means = {layer.name: means[layer.activation] for layer in analysis.layers if layer.activation in means}
        narrowed = tuple(name for name in ranges if ranges[name] != calibrated[name])
        return cls(analysis, target, float_model, ranges, input_means, narrowed)

    def lower(self, policy: Policy) -> bytes:
        model = ir.from_proto(self.float_model)  # lowering rewrites in place: start from the float model
        sites = plan_activation_quantizers(model, self.analysis.layers, policy, self.target)
        built = ir.to_proto(lower(model, self.analysis.layers, policy, self.target, sites, self.ranges, self.input_means))
        if self.target.float_type == "float16":
            built = to_float16(built)
        onnx.checker.check_model(built)
        return built.SerializeToString(deterministic=True)


def _cut_to_live_bounds(graph: ir.Graph, ranges: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    values = values_by_name(graph)
    return {name: clamp_range(*span, live_bounds(values[name])) if name in values else span for name, span in ranges.items()}
