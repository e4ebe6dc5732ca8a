"""MODEL on the command line -> an ONNX model ready for the passes.

MODEL is a bundled example name, a path to an .onnx file, or `package.module:factory` where the
factory returns (torch module, example inputs).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import pathlib
import sys
import types

import onnx

from mpqc.errors import MpqcError
from mpqc.examples import EXAMPLES, load_example
from mpqc.frontend.messages import first_line
from mpqc.frontend.onnx_file import load_onnx_file, prepare
from mpqc.frontend.support import check_supported
from mpqc.interrupts import deferred_interrupts


@dataclasses.dataclass
class LoadedModel:
    spec: str
    kind: str  # "example" | "onnx" | "torch"
    model: onnx.ModelProto  # float model, opset >= 21, shapes inferred
    example: types.ModuleType | None  # the bundled example, which brings proxy/eval data
    # The float torch module the ONNX model was exported from (eval mode), for the trained
    # sensitivity methods; None for an .onnx file.
    module: object | None = None

    @property
    def input_names(self) -> list[str]:
        initializers = {i.name for i in self.model.graph.initializer}
        return [i.name for i in self.model.graph.input if i.name not in initializers]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.model.graph.output]

    def sha256(self) -> str:
        return hashlib.sha256(self.model.SerializeToString()).hexdigest()


def resolve_model(spec: str) -> LoadedModel:
    if spec in EXAMPLES:
        with deferred_interrupts():  # torch's import and exporter: see mpqc.interrupts
            example = load_example(spec)
            module, inputs = example.build_module()
            model = _export(module, inputs, example.INPUT_NAMES, example.OUTPUT_NAMES, spec)
        return LoadedModel(spec, "example", model, example, module)
    if spec.endswith(".onnx") or pathlib.Path(spec).is_file():
        model = load_onnx_file(spec)
        check_supported(model, spec)
        return LoadedModel(spec, "onnx", model, None)
    if ":" in spec:
        with deferred_interrupts():
            module, inputs = _call_factory(spec)
            names = tuple("input" if len(inputs) == 1 else f"input_{i}" for i in range(len(inputs)))
            model = _export(module, inputs, names, ("output",), spec)
        return LoadedModel(spec, "torch", model, None, module)
    raise MpqcError(
        f"model '{spec}' is not a bundled example ({', '.join(EXAMPLES)}), an existing .onnx file, "
        "or a package.module:factory"
    )


def _export(module, inputs, input_names, output_names, spec) -> onnx.ModelProto:
    from mpqc.frontend.torch_export import export_module  # torch is imported only when needed

    return prepare(export_module(module, tuple(inputs), tuple(input_names), tuple(output_names)), spec)


def load_callable(spec: str, what: str, returns: str):
    """The function `package.module:name` names (a module in the working directory too), or one
    MpqcError naming `what` it should be and what it `returns`."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise MpqcError(f"'{spec}' names no {what}: write package.module:{what}")
    if "" not in sys.path:
        sys.path.insert(0, "")  # let a build step name a module in its working directory
    try:
        found = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise MpqcError(f"cannot load {what} '{spec}': {exc}") from None
    except Exception as exc:  # the module itself fails on import
        raise MpqcError(f"cannot load {what} '{spec}': importing '{module_name}' raised {first_line(exc, with_type=True)}") from None
    if not callable(found):
        raise MpqcError(f"'{spec}' is a {type(found).__name__}, not a {what}: it must be a function that returns {returns}")
    return found


def _call_factory(spec: str):
    if not spec.partition(":")[0] or not spec.partition(":")[2]:
        raise MpqcError(f"model '{spec}' names no factory: write package.module:factory")
    factory = load_callable(spec, "factory", "(torch module, example inputs)")
    if not _takes_no_arguments(factory):
        raise MpqcError(f"factory '{spec}' needs arguments; mpqc calls it with none and expects (torch module, example inputs)")
    try:
        result = factory()
    except Exception as exc:
        raise MpqcError(f"factory '{spec}' raised {first_line(exc, with_type=True)}") from None
    if not (isinstance(result, tuple) and len(result) == 2):
        raise MpqcError(f"factory '{spec}' must return (torch module, example inputs), not {_kind(result)}")
    module, inputs = result
    import torch

    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if (not isinstance(module, torch.nn.Module) or not isinstance(inputs, (tuple, list)) or not inputs
            or not all(isinstance(t, torch.Tensor) for t in inputs)):
        raise MpqcError(f"factory '{spec}' must return (torch.nn.Module, tensor or tuple of tensors), "
                        f"not ({_kind(module)}, {_kind(inputs)})")
    return module, tuple(inputs)


def _takes_no_arguments(factory) -> bool:
    try:
        inspect.signature(factory).bind()
    except TypeError:
        return False
    except ValueError:  # no signature to read (some builtins): calling it will tell
        pass
    return True


def _kind(value) -> str:
    name = type(value).__name__
    return f"{name} of {len(value)} items" if isinstance(value, (tuple, list)) else name
