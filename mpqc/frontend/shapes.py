"""Concrete input shapes for a model whose inputs have symbolic dimensions (besides the batch).

Profiling times layers at their real sizes, so a model exported with dynamic height and width needs
them fixed: from `--shape NAME:1x3x224x224` or from the shapes of its `--proxy` arrays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import onnx

from mpqc.errors import MpqcError
from mpqc.frontend.support import MAX_INPUT_ELEMENTS


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """'name:1x3x224x224' -> ('name', (1, 3, 224, 224))."""
    name, colon, dims = text.rpartition(":")
    try:
        shape = tuple(int(d) for d in dims.split("x"))
    except ValueError:
        shape = ()
    if not colon or not name or not shape or any(d < 1 for d in shape):
        raise MpqcError(f"--shape '{text}' is not NAME:DIMS with positive dims, e.g. input:1x3x224x224")
    return name, shape


def with_input_shapes(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]], origin: str) -> onnx.ModelProto:
    """The model with every listed input's dimensions after the first (the batch) fixed, shapes
    inferred again from them."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    initializers = {i.name for i in fixed.graph.initializer}
    inputs = {i.name: i for i in fixed.graph.input if i.name not in initializers}
    unknown = sorted(set(shapes) - set(inputs))
    if unknown:
        raise MpqcError(f"--shape names input(s) {', '.join(unknown)}, but '{origin}' has {', '.join(inputs) or 'no inputs'}")
    for name, shape in shapes.items():
        dims = inputs[name].type.tensor_type.shape.dim
        if len(dims) != len(shape):
            raise MpqcError(f"input '{name}' of '{origin}' has {len(dims)} dimensions, the shape given has {len(shape)}")
        elements = 1
        for d in shape:
            elements *= d
        if elements > MAX_INPUT_ELEMENTS:
            raise MpqcError(f"the shape given for input '{name}' has {elements} elements; more than {MAX_INPUT_ELEMENTS} is refused")
        for axis, (dim, value) in enumerate(zip(dims, shape)):
            if axis == 0:
                continue  # the batch stays the model's own: --batch sets it
            if dim.HasField("dim_value") and dim.dim_value != value:
                raise MpqcError(f"input '{name}' of '{origin}' has dimension {axis} = {dim.dim_value}, not {value}")
            dim.Clear()
            dim.dim_value = value
    del fixed.graph.value_info[:]  # inferred for the symbolic shapes: infer them anew
    try:
        return onnx.shape_inference.infer_shapes(fixed, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0]
        raise MpqcError(f"shape inference failed on '{origin}' with the shapes given: {first}") from None


def sizes_from_data(model: onnx.ModelProto, arrays: Mapping) -> dict[str, tuple[int, ...]]:
    """The shapes of `arrays` for the inputs whose sizes the model leaves open (besides the batch)."""
    open_inputs = symbolic_inputs(model)
    return {name: tuple(array.shape) for name, array in arrays.items() if name in open_inputs}


def fixed_batch(inputs) -> int | None:
    """The batch an ONNX Runtime session's inputs (`get_inputs()`) fix, or None where it is open:
    a model exported with its batch fixed (often at 1) takes that many samples per run."""
    fixed = [i.shape[0] for i in inputs if i.shape and isinstance(i.shape[0], int)]
    return min(fixed) if fixed else None


def symbolic_inputs(model: onnx.ModelProto) -> set[str]:
    """Inputs with a symbolic dimension besides the first (the batch)."""
    initializers = {i.name for i in model.graph.initializer}
    return {i.name for i in model.graph.input if i.name not in initializers
            and any(not d.HasField("dim_value") for d in list(i.type.tensor_type.shape.dim)[1:])}
