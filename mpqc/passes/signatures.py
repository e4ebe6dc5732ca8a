"""Layer signatures: what determines a layer's cost on a runtime (op, shapes, kernel, stride, groups).

Signatures key the measured latency tables, so two layers with equal signatures are measured once.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from mpqc.passes.layers import Layer


@dataclasses.dataclass(frozen=True)
class Signature:
    op_type: str
    input_shape: tuple[int | str, ...]  # symbolic dims (the batch) stay as names
    weight_shape: tuple[int, ...]
    output_shape: tuple[int | str, ...]
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    groups: int = 1

    @property
    def is_depthwise(self) -> bool:
        return self.op_type == "Conv" and self.groups > 1 and self.weight_shape[1] == 1

    def key(self) -> str:
        """A stable text key for JSON tables."""
        parts = [self.op_type, _dims(self.input_shape), "w" + _dims(self.weight_shape), "o" + _dims(self.output_shape)]
        if self.op_type == "Conv":
            parts += ["k" + _dims(self.kernel), "s" + _dims(self.strides), "p" + _dims(self.pads), "d" + _dims(self.dilations), f"g{self.groups}"]
        return "|".join(parts)

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"key": self.key(), "depthwise": self.is_depthwise}


def _dims(shape) -> str:
    return "x".join(str(d) for d in shape)


def _shape(value: ir.Value) -> tuple[int | str, ...]:
    if value.shape is None:
        return ()
    return tuple(d if isinstance(d, int) else str(d) for d in value.shape)


def layer_signature(model: ir.Model, layer: Layer) -> Signature:
    node = next(n for n in model.graph if n.name == layer.name)
    input_shape, output_shape = _shape(node.inputs[0]), _shape(node.outputs[0])
    if layer.op_type != "Conv":
        return Signature(layer.op_type, input_shape, layer.weight_shape, output_shape)
    spatial = len(layer.weight_shape) - 2
    attrs = node.attributes
    pads = tuple(attrs.get_ints("pads", [0] * 2 * spatial))
    if attrs.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        pads = ("same",)  # resolved by the runtime from the input size, which is in the signature
    return Signature(
        op_type="Conv",
        input_shape=input_shape,
        weight_shape=layer.weight_shape,
        output_shape=output_shape,
        kernel=tuple(layer.weight_shape[2:]),
        strides=tuple(attrs.get_ints("strides", [1] * spatial)),
        pads=pads,
        dilations=tuple(attrs.get_ints("dilations", [1] * spatial)),
        groups=attrs.get_int("group", 1),
    )
