"""Make every float tensor of a lowered QDQ model FLOAT16, keeping FLOAT graph inputs and outputs.

TensorRT builds a strongly typed network from the model: each layer runs in exactly the types the
model states. A FLOAT model would run every layer the policy keeps float in FP32, which no GPU
deployment wants; with FLOAT16 tensors (and FLOAT16 Q/DQ scales, which TensorRT takes) the float
layers run in FP16 and w4a16 layers read FP16 activations, as their name says.

The conversion itself is onnxruntime's float16 converter (ops it knows to lack FLOAT16 kernels
keep FLOAT behind Casts); this module puts its nodes back in topological order, which the ONNX
checker requires and the converter does not keep (it appends the input Casts at the end).

Calibration, bias correction and every range are computed on the FLOAT model before this runs,
so the integers of the quantized weights are those of the FLOAT32 lowering.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A FLOAT16 copy of `model` whose graph inputs and outputs stay FLOAT (Casts at the edges)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16  # onnxruntime's converter

    converted = convert_float_to_float16(onnx.ModelProto.FromString(model.SerializeToString()), keep_io_types=True)
    ir_model = ir.from_proto(converted)
    ir_model.graph.sort()
    return ir.to_proto(ir_model)
