"""Reading constant operands of elementwise ops: what passes and the lowering recognise patterns by."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

DEFAULT_DOMAIN = ("", "ai.onnx")


def scalar(value: ir.Value | None) -> float | None:
    """The value of a scalar (or one-element) floating constant input, else None."""
    if value is None or value.const_value is None:
        return None
    array = value.const_value.numpy()
    if array.size != 1 or not np.issubdtype(array.dtype, np.floating):
        return None
    number = float(array.reshape(()))
    return number if math.isfinite(number) else None


def clip_limits(node: ir.Node) -> tuple[float | None, float | None]:
    """A Clip's constant (min, max); None for an absent bound or one computed at run time."""
    if "min" in node.attributes or "max" in node.attributes:  # opset < 11
        return node.attributes.get_float("min", None), node.attributes.get_float("max", None)
    limits = list(node.inputs[1:3]) + [None] * (3 - len(node.inputs))
    return tuple(None if limit is None else scalar(limit) for limit in limits[:2])
