"""What the passes know about a model: its canonical graph, quantizable layers and tie groups.

Build, export, inspect, profiling and validation all start from one `Analysis`.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from mpqc.errors import MpqcError
from mpqc.frontend.resolve import LoadedModel, resolve_model
from mpqc.frontend.shapes import sizes_from_data, with_input_shapes
from mpqc.frontend.torch_export import module_map
from mpqc.passes.layers import Layer, find_layers
from mpqc.passes.pipeline import canonicalize
from mpqc.passes.signatures import layer_signature
from mpqc.passes.ties import tie_groups
from mpqc.targets import Target


@dataclasses.dataclass(frozen=True)
class Analysis:
    loaded: LoadedModel
    model: ir.Model
    layers: list[Layer]
    ties: list[tuple[str, ...]]

    def describe_layers(self, target: Target) -> list[dict]:
        modules = module_map(self.loaded.model)
        rows = []
        for layer in self.layers:
            rows.append(
                {
                    "name": layer.name,
                    "op_type": layer.op_type,
                    "torch_module": modules.get(layer.name),
                    "signature": layer_signature(self.model, layer).to_json(),
                    "deploy": [p.name for p in target.precisions_for(layer.op_type)],
                    "evaluate": [p.name for p in target.precisions_for(layer.op_type, deployable_only=False)],
                }
            )
        return rows


def analyze(spec: str) -> Analysis:
    return analyze_loaded(resolve_model(spec))


def analyze_loaded(loaded: LoadedModel) -> Analysis:
    spec = loaded.spec
    model = canonicalize(loaded.model)
    layers = find_layers(model)
    if not layers:
        raise MpqcError(f"model '{spec}' has no quantizable layers (Conv, Gemm or MatMul with a constant weight)")
    return Analysis(loaded, model, layers, tie_groups(layers))


def at_data_sizes(analysis: Analysis, arrays: dict) -> Analysis:
    """The analysis with the sizes the model leaves open (besides the batch) fixed from `arrays`:
    latency is measured and keyed at real sizes, so `mpqc profile` and a latency search on the same
    data see the same layers. The model itself stays open; only its costs are looked up this way."""
    fixed = sizes_from_data(analysis.loaded.model, arrays)
    if not fixed:
        return analysis
    loaded = dataclasses.replace(analysis.loaded, model=with_input_shapes(analysis.loaded.model, fixed, analysis.loaded.spec))
    sized = analyze_loaded(loaded)
    if [layer.name for layer in sized.layers] != [layer.name for layer in analysis.layers]:
        sizes = ", ".join(f"{name}: " + "x".join(map(str, shape)) for name, shape in fixed.items())
        raise MpqcError(f"'{analysis.loaded.spec}' has other layers once its open input sizes are fixed from the data "
                        f"({sizes}); export it with fixed sizes and build that")
    return sized
