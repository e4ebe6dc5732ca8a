"""TensorRT plugin `mpqc::Int4Conv`: a W4A8 convolution run by kernels.int4_conv.int4_conv2d.

TensorRT has no INT4 convolution, so mpqc's TensorRT backend rewrites every w4a8 Conv of a lowered
model into one ONNX node `Int4Conv` (mpqc.backends.int4_conv_plugin_graph) that TensorRT's ONNX
parser maps to this plugin: an ONNX node whose op type is the plugin's name and whose string
attribute `plugin_namespace` names its namespace becomes that plugin.

The plugin is a TensorRT 10 "quickly deployable" Python plugin (`tensorrt.plugin`): a register
function describes the output (shape from the conv attributes, FP32), an impl function runs the
Triton kernel on the device tensors TensorRT hands it, on TensorRT's stream. Python plugins were
chosen over classic IPluginV3 classes because they are stateless and serialize their attributes
into the engine themselves; the cost is that running such an engine needs this module (and
Python, torch with CUDA and Triton) in the process, registered before the engine is deserialized.

Interface of the node and the plugin (one input, one output):
- input 0: the INT8 activation, NCHW: the output of the activation's QuantizeLinear. The plugin
  takes the integers themselves, as TensorRT recommends for plugins in explicitly quantized
  networks (Q -> plugin), so no DequantizeLinear runs before it and the kernel's exact int32
  accumulation sees the very integers the Q produced.
- output 0: NCHW, (x_scale * weight_scale[o]) * sum(x * w) + bias[o], as DQ + Conv computes; FP16
  when the model's float type is FLOAT16 (float16_output = 1), else FP32.
- attributes, all 1-D arrays or scalars because those are what Python plugins accept:
  weight_shape int32 (O, C/group, KH, KW); packed_weight int8, the ONNX INT4 packing of each output
  channel's row of K = C/group * KH * KW values (kernels.int4_layout; int8 because Python plugins
  take no uint8 arrays, same bytes); weight_scale float32 (O,); bias float32 (O,); strides int32
  (2,); pads int32 (4,) in ONNX order (top, left, bottom, right); dilations int32 (2,); group int;
  x_scale float, the activation's per-tensor scale; float16_output int, 0 or 1.

Everything but `register()` is plain Python/torch and is tested without TensorRT.

This module deliberately has no `from __future__ import annotations`: tensorrt.plugin reads the
register function's annotations as types, and postponed (string) annotations would break that.
"""

import dataclasses
import weakref

import numpy as np
import torch

from mpqc_kernels.int4_layout import packed_length

PLUGIN_NAMESPACE = "mpqc"
PLUGIN_NAME = "Int4Conv"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
# Attribute name -> numpy dtype for array attributes (None: a Python scalar), in the order the
# register and impl functions declare them.
ATTRIBUTES = {
    "weight_shape": np.int32,
    "packed_weight": np.int8,
    "weight_scale": np.float32,
    "bias": np.float32,
    "strides": np.int32,
    "pads": np.int32,
    "dilations": np.int32,
    "group": None,
    "x_scale": None,
    "float16_output": None,
}


@dataclasses.dataclass(frozen=True)
class Int4ConvSpec:
    """The geometry and activation scale of one Int4Conv, checked."""

    weight_shape: tuple[int, int, int, int]  # O, C/group, KH, KW
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right (ONNX order)
    dilations: tuple[int, int]
    group: int
    x_scale: float
    float16_output: bool = False  # the output's type: FP16 in a FLOAT16 model, else FP32

    @classmethod
    def from_attributes(cls, weight_shape, strides, pads, dilations, group, x_scale,
                        float16_output=0) -> "Int4ConvSpec":
        """From the plugin's (or the ONNX node's) attribute values; raises ValueError on nonsense."""
        weight_shape, strides = _ints(weight_shape, 4, "weight_shape"), _ints(strides, 2, "strides")
        pads, dilations = _ints(pads, 4, "pads"), _ints(dilations, 2, "dilations")
        group, x_scale = int(np.asarray(group).reshape(-1)[0]), float(np.asarray(x_scale).reshape(-1)[0])
        if min(weight_shape) < 1 or min(strides) < 1 or min(dilations) < 1 or min(pads) < 0:
            raise ValueError(f"Int4Conv: need positive weight dims, strides and dilations and pads >= 0, got "
                             f"weight_shape {weight_shape}, strides {strides}, dilations {dilations}, pads {pads}")
        if group < 1 or weight_shape[0] % group:
            raise ValueError(f"Int4Conv: group {group} does not divide the {weight_shape[0]} output channels")
        if not np.isfinite(x_scale) or x_scale <= 0:
            raise ValueError(f"Int4Conv: x_scale must be a positive finite number, got {x_scale}")
        return cls(weight_shape, strides, pads, dilations, group, x_scale, bool(np.asarray(float16_output).reshape(-1)[0]))

    @property
    def output_dtype(self) -> torch.dtype:
        return torch.float16 if self.float16_output else torch.float32

    @property
    def out_channels(self) -> int:
        return self.weight_shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight_shape[1] * self.group

    @property
    def reduction(self) -> int:
        """K: INT4 values per output channel."""
        _, cg, kh, kw = self.weight_shape
        return cg * kh * kw

    def check_weights(self, packed_weight, weight_scale, bias) -> None:
        """The array attributes must have the sizes the geometry implies."""
        expected = {"packed_weight": self.out_channels * packed_length(self.reduction),
                    "weight_scale": self.out_channels, "bias": self.out_channels}
        for name, array in (("packed_weight", packed_weight), ("weight_scale", weight_scale), ("bias", bias)):
            size = int(np.prod(tuple(array.shape)))
            if size != expected[name]:
                raise ValueError(f"Int4Conv: {name} holds {size} values; weight_shape {self.weight_shape} needs {expected[name]}")


def conv_output_size(size, kernel: int, stride: int, pad_begin: int, pad_end: int, dilation: int):
    """floor((size + pads - dilation * (kernel - 1) - 1) / stride) + 1, for an int or a TensorRT
    shape expression alike: `size` stays the left operand of +, - and // with int right operands,
    the only forms tensorrt.plugin.ShapeExpr implements."""
    offset = pad_begin + pad_end - dilation * (kernel - 1) - 1
    shifted = size + offset if offset >= 0 else size - (-offset)
    return shifted // stride + 1


def output_shape(input_shape, spec: Int4ConvSpec) -> tuple:
    """(N, O, OH, OW) of an NCHW input (ints or shape expressions)."""
    if len(input_shape) != 4:
        raise ValueError(f"Int4Conv takes a 4-D NCHW input, got rank {len(input_shape)}")
    batch, _, height, width = input_shape
    _, _, kh, kw = spec.weight_shape
    (sh, sw), (top, left, bottom, right), (dh, dw) = spec.strides, spec.pads, spec.dilations
    return (batch, spec.out_channels,
            conv_output_size(height, kh, sh, top, bottom, dh), conv_output_size(width, kw, sw, left, right, dw))


def run_int4_conv(x: torch.Tensor, packed_weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor,
                  spec: Int4ConvSpec, conv=None) -> torch.Tensor:
    """The plugin's computation on torch tensors: int8 NCHW x -> float32 (or float16) NCHW.

    packed_weight: the 1-D int8 (or uint8) attribute; conv: the kernel to call, by default the
    Triton kernel kernels.int4_conv.int4_conv2d; tests pass its torch reference instead.
    """
    if conv is None:
        from mpqc_kernels.int4_conv import int4_conv2d as conv  # Triton: imported only where it runs
    if x.dtype != torch.int8:
        raise TypeError(f"Int4Conv takes the INT8 output of a QuantizeLinear, got {x.dtype}")
    if x.dim() != 4 or x.shape[1] != spec.in_channels:
        raise ValueError(f"Int4Conv: input shape {tuple(x.shape)} does not match weight_shape {spec.weight_shape} x group {spec.group}")
    packed = packed_weight.reshape(spec.out_channels, packed_length(spec.reduction))
    return conv(x, packed, weight_scale, spec.weight_shape, bias=bias, x_scale=spec.x_scale, stride=spec.strides,
                padding=spec.pads, dilation=spec.dilations, groups=spec.group, out_dtype=spec.output_dtype)


# Device copies of the weight attributes, one per (attribute array, device). TensorRT keeps the
# plugin's attribute arrays alive as long as the plugin, so the arrays' identity is a safe key;
# a finalizer drops the copy when the array goes.
_DEVICE_COPIES: dict[tuple[int, str], torch.Tensor] = {}


def device_copy(array: np.ndarray, device: torch.device) -> torch.Tensor:
    key = (id(array), str(device))
    tensor = _DEVICE_COPIES.get(key)
    if tensor is None:
        tensor = torch.from_numpy(np.ascontiguousarray(array)).to(device)
        _DEVICE_COPIES[key] = tensor
        weakref.finalize(array, _DEVICE_COPIES.pop, key, None)
    return tensor


def _ints(values, length: int, name: str) -> tuple[int, ...]:
    flat = np.asarray(values).reshape(-1)
    if flat.size != length:
        raise ValueError(f"Int4Conv: {name} needs {length} values, got {flat.tolist()}")
    return tuple(int(v) for v in flat)


_REGISTERED = False


def register() -> None:
    """Register mpqc::Int4Conv with TensorRT (idempotent). Call before parsing a model that holds
    Int4Conv nodes and before deserializing an engine built from one."""
    global _REGISTERED
    if _REGISTERED:
        return
    _define_plugin()
    _REGISTERED = True


def _define_plugin() -> None:
    # Imported here: everything above must work on machines without TensorRT.
    from typing import Tuple

    import numpy.typing as npt
    import tensorrt as trt
    import tensorrt.plugin as trtp

    @trtp.register(PLUGIN_ID)
    def describe_int4_conv(
        x: trtp.TensorDesc,
        weight_shape: npt.NDArray[np.int32],
        packed_weight: npt.NDArray[np.int8],
        weight_scale: npt.NDArray[np.float32],
        bias: npt.NDArray[np.float32],
        strides: npt.NDArray[np.int32],
        pads: npt.NDArray[np.int32],
        dilations: npt.NDArray[np.int32],
        group: int,
        x_scale: float,
        float16_output: int,
    ) -> trtp.TensorDesc:
        spec = Int4ConvSpec.from_attributes(weight_shape, strides, pads, dilations, group, x_scale, float16_output)
        shape = output_shape(tuple(x.shape_expr[i] for i in range(4)), spec)
        return trtp.from_shape_expr(shape, dtype=trt.float16 if spec.float16_output else trt.float32)

    @trtp.impl(PLUGIN_ID)
    def run_int4_conv_plugin(
        x: trtp.Tensor,
        weight_shape: npt.NDArray[np.int32],
        packed_weight: npt.NDArray[np.int8],
        weight_scale: npt.NDArray[np.float32],
        bias: npt.NDArray[np.float32],
        strides: npt.NDArray[np.int32],
        pads: npt.NDArray[np.int32],
        dilations: npt.NDArray[np.int32],
        group: int,
        x_scale: float,
        float16_output: int,
        outputs: Tuple[trtp.Tensor],
        stream: int,
    ) -> None:
        spec = Int4ConvSpec.from_attributes(weight_shape, strides, pads, dilations, group, x_scale, float16_output)
        # Triton launches on torch's current stream: make it TensorRT's.
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            x_tensor = torch.as_tensor(x, device="cuda")
            device = x_tensor.device
            y = run_int4_conv(x_tensor, device_copy(packed_weight, device), device_copy(weight_scale, device),
                              device_copy(bias, device), spec)
            # int4_conv2d allocates its output; one device copy into TensorRT's buffer.
            torch.as_tensor(outputs[0], device="cuda").copy_(y)
