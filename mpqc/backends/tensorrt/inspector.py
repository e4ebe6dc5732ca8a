"""What precision each layer of a TensorRT engine runs in, and where that differs from the policy.

Reads the engine inspector's JSON (an engine built with ProfilingVerbosity.DETAILED):

    {"Layers": [{"Name": "...", "LayerType": "CaskConvolution",
                 "Inputs": [{"Name": "...", "Format/Datatype": "Row major linear Int8", ...}],
                 "Outputs": [...], "Weights": {"Type": "Int8", "Count": 4608},
                 "TacticName": "...", "Metadata": "[ONNX Layer: block1.conv1]..."}, ...],
     "Bindings": [...]}

An engine layer is often several ONNX nodes fused. TensorRT names a fused layer after its nodes
joined with " + " (e.g. "block1.conv1.input.dq0 + block1.conv1.weight.dq + block1.conv1 + relu_1"),
and TensorRT 10's ONNX parser also records each node as "[ONNX Layer: name]" in the layer's
Metadata. Both are read; the metadata wins when present. A Myelin region is named
"{ForeignNode[first...last]}" and hides the nodes between its ends.

mpqc names every layer's node after the layer (and its Q/DQ nodes "<layer>.input.q",
"<layer>.weight.dq", ...), so an mpqc layer is found by its node name among an engine layer's nodes.

Plain Python: tested without TensorRT; only `layer_precisions(engine)` on a real engine needs it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Mapping

_ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]]*)\]")
_FOREIGN = re.compile(r"^\{ForeignNode\[(.*)\]\}$")
_TYPES = {"fp32": "FP32", "float": "FP32", "fp16": "FP16", "half": "FP16", "bf16": "BF16", "fp8": "FP8", "fp4": "FP4",
          "int8": "INT8", "int4": "INT4", "int32": "INT32", "int64": "INT64", "uint8": "UINT8", "bool": "BOOL"}
_TYPE_WORD = re.compile(r"\b(" + "|".join(_TYPES) + r")\b", re.IGNORECASE)
FLOAT_TYPES = ("FP32", "FP16", "BF16")


@dataclasses.dataclass(frozen=True)
class EngineLayer:
    """One layer of a built engine, as the inspector describes it."""

    name: str
    layer_type: str
    nodes: tuple[str, ...]  # the ONNX nodes fused into it (metadata, else the " + "-joined name)
    input_types: tuple[str | None, ...]  # "INT8", "FP32", ... per input; None where not reported
    output_types: tuple[str | None, ...]
    weight_type: str | None  # the type of constant weights the layer holds, where reported
    tactic: str | None

    @property
    def is_plugin(self) -> bool:
        return "plugin" in self.layer_type.lower()

    @property
    def compute_type(self) -> str | None:
        """The type of the activation input: INT8 for an INT8 kernel, FP32/FP16 for a float one."""
        first = self.input_types[0] if self.input_types else None
        return first or self.weight_type

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"is_plugin": self.is_plugin}


@dataclasses.dataclass(frozen=True)
class LayerPrecision:
    """How one mpqc layer runs in the engine against what its policy asked for."""

    layer: str
    asked: str
    runs: str  # "INT8", "FP32", "INT4 conv plugin", "FP32 with INT4 weights", "not found", ...
    engine_layers: tuple[str, ...]
    ok: bool
    message: str  # the finding in one sentence ("" when ok)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def parse_datatype(text: str | None) -> str | None:
    """The data type named in an inspector "Format/Datatype" string ("Row major linear Int8" -> "INT8")."""
    if not text:
        return None
    match = _TYPE_WORD.search(text)
    return _TYPES[match.group(1).lower()] if match else None


def fused_nodes(name: str, metadata: str | None = None) -> tuple[str, ...]:
    """The ONNX node names behind an engine layer."""
    if metadata:
        found = tuple(node.strip() for node in _ONNX_LAYER.findall(metadata) if node.strip())
        if found:
            return found
    foreign = _FOREIGN.match(name.strip())
    if foreign:
        return tuple(part for part in foreign.group(1).split("...") if part)  # only its two ends are known
    return tuple(part.strip() for part in name.split(" + ") if part.strip())


def parse_engine_information(information: str | Mapping) -> dict[str, EngineLayer]:
    """Engine layer name -> EngineLayer, from the inspector's JSON (text or parsed)."""
    data = json.loads(information) if isinstance(information, (str, bytes)) else information
    layers = {}
    for entry in data.get("Layers", []):
        if isinstance(entry, str):  # built without DETAILED verbosity: names only
            layers[entry] = EngineLayer(entry, "unknown", fused_nodes(entry), (), (), None, None)
            continue
        name = entry.get("Name", "")
        weights = entry.get("Weights")
        layers[name] = EngineLayer(
            name=name,
            layer_type=str(entry.get("LayerType", entry.get("ParameterType", "unknown"))),
            nodes=fused_nodes(name, entry.get("Metadata")),
            input_types=tuple(parse_datatype(_datatype_text(t)) for t in entry.get("Inputs", [])),
            output_types=tuple(parse_datatype(_datatype_text(t)) for t in entry.get("Outputs", [])),
            weight_type=parse_datatype(weights.get("Type")) if isinstance(weights, Mapping) else None,
            tactic=entry.get("TacticName"),
        )
    return layers


def layer_precisions(engine_or_information) -> dict[str, EngineLayer]:
    """Engine layer name -> precision information, from a TensorRT ICudaEngine or its inspector JSON."""
    if hasattr(engine_or_information, "create_engine_inspector"):
        return parse_engine_information(engine_information(engine_or_information))
    return parse_engine_information(engine_or_information)


def engine_information(engine) -> str:
    """The engine inspector's JSON: every layer with its types, tactic and fused ONNX nodes."""
    import tensorrt  # an engine exists, so TensorRT is installed

    return engine.create_engine_inspector().get_engine_information(tensorrt.LayerInformationFormat.JSON)


def compare_with_policy(layer_info: Mapping[str, EngineLayer], policy, layers, float_type: str = "FP32") -> list[LayerPrecision]:
    """Every mpqc layer whose engine layer does not run the precision the policy asked for.

    This answers "which layers stayed FP32?": e.g. "layer 'fc' asked for w8a8 but runs FP32".
    policy: an mpqc Policy or a mapping layer -> precision name; layers: mpqc Layers or names;
    float_type: what the policy's float ("fp32") layers run in, the model's float type: "FP32", or
    "FP16" for a target whose float_type is float16.
    """
    return [row for row in precision_rows(layer_info, policy, layers, float_type) if not row.ok]


def engine_float_type(target) -> str:
    """The engine type a target's float layers run in: "FP16" or "FP32"."""
    return "FP16" if target.float_type == "float16" else "FP32"


def precision_rows(layer_info: Mapping[str, EngineLayer], policy, layers, float_type: str = "FP32") -> list[LayerPrecision]:
    """One LayerPrecision per mpqc layer, in the order of `layers`."""
    asked = dict(policy.as_dict) if hasattr(policy, "as_dict") else dict(policy)
    has_foreign = any(_FOREIGN.match(name.strip()) for name in layer_info)
    rows = []
    for name in (getattr(layer, "name", layer) for layer in layers):
        precision = asked.get(name, "fp32")
        found = [layer for layer in layer_info.values() if name in layer.nodes]
        if not found:
            where = " (it may sit inside a Myelin ForeignNode region, whose inner nodes the engine does not name)" if has_foreign else ""
            rows.append(LayerPrecision(name, precision, "not found", (), False,
                                       f"layer '{name}' asked for {precision} but no engine layer names it{where}"))
            continue
        rows.append(_judge(name, precision, found, layer_info, float_type))
    return rows


def precision_report(layer_info: Mapping[str, EngineLayer], policy, layers, float_type: str = "FP32") -> dict:
    """The engine's precision per mpqc layer and the findings, for build.json."""
    rows = precision_rows(layer_info, policy, layers, float_type)
    return {
        "layers": {row.layer: {"asked": row.asked, "runs": row.runs, "engine_layers": list(row.engine_layers), "ok": row.ok}
                   for row in rows},
        "findings": [row.message for row in rows if not row.ok],
        "engine_layers": len(layer_info),
        "plugin_layers": sorted(name for name, layer in layer_info.items() if layer.is_plugin),
    }


def attribute_layer_times(times_ms: Mapping[str, float], layer_info: Mapping[str, EngineLayer],
                          layer_names: Iterable[str]) -> tuple[dict[str, float], float]:
    """Per-engine-layer times (IProfiler) -> per-mpqc-layer times, plus the time no layer claims.

    An engine layer belongs to an mpqc layer when it holds that layer's node, or only nodes the
    lowering named after the layer ("<layer>.input.q", "<layer>.bias", ...: its own Q/DQ and bias).
    A layer fused from several mpqc layers is split evenly among them. Reformatting, pooling,
    residual adds and Q/DQ shared between layers stay unattributed.
    """
    names = sorted(set(layer_names), key=len, reverse=True)  # longest prefix first
    per_layer = {name: 0.0 for name in names}
    unattributed = 0.0
    for engine_name, ms in times_ms.items():
        info = layer_info.get(engine_name)
        nodes = info.nodes if info is not None else fused_nodes(engine_name)
        owners = sorted({name for name in names if name in nodes})
        if not owners:
            prefixes = {next((n for n in names if node.startswith(n + ".")), None) for node in nodes}
            owners = sorted(prefixes) if nodes and None not in prefixes else []
        if not owners:
            unattributed += ms
            continue
        for owner in owners:
            per_layer[owner] += ms / len(owners)
    return per_layer, unattributed


def _judge(name: str, precision: str, found: list[EngineLayer], layer_info: Mapping[str, EngineLayer],
           float_type: str) -> LayerPrecision:
    layer = found[0]
    engine_layers = tuple(layer.name for layer in found)
    compute = layer.compute_type
    if _FOREIGN.match(layer.name.strip()):
        return LayerPrecision(name, precision, "unknown (inside a Myelin region)", engine_layers, False,
                              f"layer '{name}' asked for {precision} but its precision is hidden inside Myelin region '{layer.name}'")
    if layer.is_plugin:
        runs = "INT4 conv plugin"
    elif precision == "w4a16" and compute in FLOAT_TYPES:
        runs = _int4_weight_state(name, layer, layer_info, compute)
    else:
        runs = compute or "unknown"
    expected = {
        # Another float type than the model's is a precision nobody asked for (a strongly typed
        # engine should never pick one).
        "fp32": lambda: not layer.is_plugin and compute == float_type,
        "w8a8": lambda: not layer.is_plugin and compute == "INT8",
        "w4a8": lambda: layer.is_plugin,
        "w4a16": lambda: runs.endswith("with INT4 weights"),
    }.get(precision, lambda: False)
    if expected():
        return LayerPrecision(name, precision, runs, engine_layers, True, "")
    hint = {
        "w4a8": "; w4a8 convolutions must run through mpqc's INT4 conv plugin",
        "w4a16": "; TensorRT did not fuse the INT4 weight's dequantization into the GEMM",
    }.get(precision, "")
    return LayerPrecision(name, precision, runs, engine_layers, False,
                          f"layer '{name}' asked for {precision} but runs {runs} (engine layer '{layer.name}'){hint}")


def _int4_weight_state(name: str, layer: EngineLayer, layer_info: Mapping[str, EngineLayer], compute: str) -> str:
    """A w4a16 layer runs float activations against INT4 weights when the weight's DQ is fused
    into the GEMM (or the inspector reports INT4 weights); a DQ left as its own layer means the
    weights are expanded to float before the GEMM."""
    if layer.weight_type == "INT4" or f"{name}.weight.dq" in layer.nodes:
        return f"{compute} with INT4 weights"
    separate = any(f"{name}.weight.dq" in other.nodes for other in layer_info.values() if other is not layer)
    return f"{compute} with weights dequantized by a separate layer" if separate else compute


def _datatype_text(tensor) -> str | None:
    return tensor.get("Format/Datatype") if isinstance(tensor, Mapping) else None
