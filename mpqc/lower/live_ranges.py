"""The part of an activation's range that its readers can tell apart.

A layer output read only through an increasing affine chain (Mul, Add, Sub or Div by scalar
constants) into a clamp has a dead zone: below the clamp's lower bound (and above its upper one)
every value gives the readers the same result. Quantizing the tensor over its calibrated range
would spend grid steps there. PP-LCNetV3-style blocks show it: conv -> x * a + b -> hard-swish,
where hard-swish is 0 for every input below -3, so a conv output calibrated at [-44, 39] only
needs [-2, 39] and its INT8 step halves.

The bounds are exact, not a clipping heuristic: the float model computes the same outputs when the
tensor is clamped to them. Clamps recognised: Relu, Clip with constant bounds, HardSigmoid,
HardSwish, and the hard-swish that exporters decompose as x * Clip(x + 3, 0, 6) (/ 6).
"""

from __future__ import annotations

import math

import onnx_ir as ir

from mpqc.passes.constants import DEFAULT_DOMAIN, clip_limits, scalar

Bounds = tuple[float, float]
UNBOUNDED: Bounds = (-math.inf, math.inf)


def live_bounds(value: ir.Value) -> Bounds:
    """(low, high) outside which no reader of `value` sees a difference; UNBOUNDED when unknown."""
    scale, offset = 1.0, 0.0  # the chain so far computes scale * value + offset
    while not value.is_graph_output():
        uses = list(value.uses())
        clamp = _hard_swish_lower_bound(value, uses)
        if clamp is not None:
            return _pull_back((clamp, math.inf), scale, offset)
        if len(uses) != 1:
            break
        node = uses[0][0]
        if node.domain not in DEFAULT_DOMAIN:
            break
        clamp = _clamp_bounds(node)
        if clamp is not None:
            return _pull_back(clamp, scale, offset)
        step = _affine_step(node, uses[0][1])
        if step is None:
            break
        scale, offset = scale * step[0], offset * step[0] + step[1]
        value = node.outputs[0]
    return UNBOUNDED


def clamp_range(low: float, high: float, bounds: Bounds) -> Bounds:
    """The calibrated (low, high) cut to `bounds`; unchanged when they would leave nothing."""
    cut_low, cut_high = max(low, bounds[0]), min(high, bounds[1])
    return (cut_low, cut_high) if cut_low < cut_high else (low, high)


def _pull_back(bounds: Bounds, scale: float, offset: float) -> Bounds:
    if not (math.isfinite(scale) and math.isfinite(offset) and scale > 0):
        return UNBOUNDED  # a chain of huge constants overflowed: claim nothing
    return ((bounds[0] - offset) / scale, (bounds[1] - offset) / scale)


def _affine_step(node: ir.Node, index: int) -> tuple[float, float] | None:
    """(scale, offset) of an increasing scalar affine op on input `index`, else None."""
    if len(node.inputs) != 2 or node.op_type not in ("Mul", "Add", "Sub", "Div"):
        return None
    constant = scalar(node.inputs[1 - index])
    if constant is None:
        return None
    if node.op_type == "Add":
        return 1.0, constant
    if node.op_type == "Sub":
        return (1.0, -constant) if index == 0 else None  # c - x decreases
    if node.op_type == "Mul":
        return (constant, 0.0) if constant > 0 else None
    return (1.0 / constant, 0.0) if index == 0 and constant > 0 else None


def _clamp_bounds(node: ir.Node) -> Bounds | None:
    if node.op_type == "Relu":
        return (0.0, math.inf)
    if node.op_type == "HardSwish":
        return (-3.0, math.inf)
    if node.op_type == "HardSigmoid":
        alpha = node.attributes.get_float("alpha", 0.2)
        beta = node.attributes.get_float("beta", 0.5)
        return ((0.0 - beta) / alpha, (1.0 - beta) / alpha) if alpha > 0 else None
    if node.op_type == "Clip":
        low, high = clip_limits(node)
        return None if low is None and high is None else (-math.inf if low is None else low, math.inf if high is None else high)
    return None


def _hard_swish_lower_bound(value: ir.Value, uses) -> float | None:
    """-3 when `value` is read only as x * Clip(x + 3, 0, 6): exported hard-swish is 0 below -3."""
    if len(uses) != 2:
        return None
    adds = [node for node, index in uses if node.op_type == "Add" and node.domain in DEFAULT_DOMAIN
            and scalar(node.inputs[1 - index]) == 3.0]
    muls = [node for node, _ in uses if node.op_type == "Mul" and node.domain in DEFAULT_DOMAIN]
    if len(adds) != 1 or len(muls) != 1:
        return None
    shifted = adds[0].outputs[0]
    clip_uses = list(shifted.uses())
    if shifted.is_graph_output() or len(clip_uses) != 1 or clip_uses[0][0].op_type != "Clip":
        return None
    clip = clip_uses[0][0]
    if clip.domain not in DEFAULT_DOMAIN or clip_limits(clip) != (0.0, 6.0) or clip.outputs[0].is_graph_output():
        return None
    gate = list(clip.outputs[0].uses())
    if len(gate) != 1 or gate[0][0] is not muls[0]:
        return None
    return -3.0
