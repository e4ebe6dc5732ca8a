"""torch.nn.Module + example input -> ONNX (opset 21), with each quantizable node named after its torch module.

The search works on torch modules and the lowering on ONNX nodes, so the mapping must be exact: a
node takes the name of the module that owns its weight. The exporter keeps parameter names as
initializer names for Conv/Gemm; for MatMul it pre-transposes the weight into an anonymous constant,
so there we read the module scope the exporter records on each node.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import logging
import warnings

import onnx
import torch

from mpqc.errors import MpqcError
from mpqc.frontend.messages import first_line

OPSET = 21
WEIGHTED_OPS = {"Conv": 1, "Gemm": 1, "MatMul": 1}  # op type -> index of the weight input
MODULE_MAP_KEY = "mpqc.torch_modules"  # model metadata: ONNX node name -> torch module name
_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
_STACK_KEY = "pkg.torch.onnx.stack_trace"
_LAYER_TYPES = (torch.nn.modules.conv._ConvNd, torch.nn.Linear)


def export_module(
    module: torch.nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    input_names: tuple[str, ...],
    output_names: tuple[str, ...],
) -> onnx.ModelProto:
    """Export with a dynamic batch axis; return the model with layer nodes renamed to module names."""
    module = module.eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    dynamic_shapes = tuple({0: batch} for _ in example_inputs)
    with _quiet_exporter():
        try:
            program = torch.onnx.export(
                module,
                tuple(example_inputs),
                dynamo=True,
                opset_version=OPSET,
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_shapes=dynamic_shapes,
                verbose=False,
            )
        except Exception as exc:  # the exporter raises many types; the user needs the first line
            raise MpqcError(f"torch could not export the module to ONNX: {first_line(exc)}") from None
    model = program.model_proto
    _name_layers_after_modules(model, module)
    _drop_stack_traces(model)
    return model


def _drop_stack_traces(model: onnx.ModelProto) -> None:
    """The exporter records each node's Python stack, with the paths of the files on this machine:
    without them the float model's hash, which keys latency-table fits and the score cache, is the
    same wherever mpqc is installed."""
    for node in [*model.graph.node, *(n for f in model.functions for n in f.node)]:
        kept = [p for p in node.metadata_props if p.key != _STACK_KEY]
        if len(kept) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(kept)


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter prints progress lines and warnings; a build step's output should stay ours."""
    logger = logging.getLogger("torch.onnx")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(previous)


def _name_layers_after_modules(model: onnx.ModelProto, module: torch.nn.Module) -> None:
    modules = dict(module.named_modules())
    param_owner = {f"{name}.weight": name for name, m in modules.items() if isinstance(m, _LAYER_TYPES)}
    constants = {init.name: init for init in model.graph.initializer}
    mapping: dict[str, str] = {}
    used: dict[str, int] = {}
    for node in model.graph.node:
        index = WEIGHTED_OPS.get(node.op_type)
        if index is None or len(node.input) <= index or node.input[index] not in constants:
            continue
        owner = param_owner.get(node.input[index]) or _owner_from_scopes(node, modules)
        if owner is None:
            continue  # a constant used directly in forward(): the layer keeps its ONNX name
        if modules[owner].weight.numel() != _numel(constants[node.input[index]]):
            raise MpqcError(
                f"ONNX node '{node.name}' ({node.op_type}) maps to torch module '{owner}' but their weight "
                "sizes differ; the export is not what mpqc expects"
            )
        count = used.get(owner, 0)
        used[owner] = count + 1
        # A module called twice (shared weights) gives two nodes; the second is owner#1.
        node.name = owner if count == 0 else f"{owner}#{count}"
        mapping[node.name] = owner
    entry = model.metadata_props.add()
    entry.key = MODULE_MAP_KEY
    entry.value = json.dumps(mapping, sort_keys=True)


def _owner_from_scopes(node: onnx.NodeProto, modules: dict[str, torch.nn.Module]) -> str | None:
    """The deepest scope on the node that names a weight-bearing module."""
    props = {p.key: p.value for p in node.metadata_props}
    if _SCOPES_KEY not in props:
        return None
    for scope in reversed(ast.literal_eval(props[_SCOPES_KEY])):
        candidate = modules.get(scope)
        if isinstance(candidate, _LAYER_TYPES):
            return scope
    return None


def _numel(tensor: onnx.TensorProto) -> int:
    count = 1
    for dim in tensor.dims:
        count *= dim
    return count


def module_map(model: onnx.ModelProto) -> dict[str, str]:
    for entry in model.metadata_props:
        if entry.key == MODULE_MAP_KEY:
            return json.loads(entry.value)
    return {}
