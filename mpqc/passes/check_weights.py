"""Refuse NaN and Inf where quantization reads them: layer weights and biases, and the BatchNorm
parameters folded into them. A non-finite weight has no scale to quantize with, and a model built
from one carries NaN on (the bias correction spreads it); the user's tensor is the one to name.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from mpqc.errors import MpqcError

LAYER_OPS = ("Conv", "Gemm", "MatMul")
_ROLES = {op: ("weight", "bias") for op in LAYER_OPS} | {"BatchNormalization": ("scale", "shift", "mean", "variance")}


class CheckWeightsPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        for node in model.graph:
            if node.domain in ("", "ai.onnx") and node.op_type in _ROLES:
                check_finite(node)
        return ir.passes.PassResult(model, False)


def check_finite(node: ir.Node) -> None:
    """Each constant float input of `node` in a named role (weight, bias, BatchNorm parameters)."""
    for role, value in zip(_ROLES[node.op_type], node.inputs[1:]):
        tensor = value.const_value if value is not None else None
        if tensor is None or not tensor.dtype.is_floating_point():
            continue
        array = tensor.numpy()
        if not np.isfinite(array).all():
            raise MpqcError(f"{node.op_type} '{node.name}' has NaN or infinite values in its {role} '{value.name}'; "
                            "fix the model's weights (retrain or re-export)")
        if role == "variance" and (array < 0).any():
            raise MpqcError(f"BatchNormalization '{node.name}' has negative values in its variance '{value.name}'; "
                            "fix the model's weights (retrain or re-export)")
