"""`mpqc compare BUILD_DIR`: each quantized layer's output in the built model against FP32, worst
first, and (with --keep-float K) what keeping the worst K layers float gains the whole model.

The build folder says everything needed: build.json names the model and the build's options,
policy.json the policy, model.qdq.onnx is the model compared. The float model is loaded again from
the model spec (in the folder the build ran in) and must hash to what the build recorded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import pathlib

import onnx
import onnx_ir as ir

from mpqc import progress
from mpqc.backends.base import backend_for, runtime_target
from mpqc.bench.layer_outputs import Probed, batches, tensor_errors, with_outputs
from mpqc.data.feeds import feeds_sha256
from mpqc.data.proxy import ProxySource, proxy_feeds
from mpqc.errors import MpqcError
from mpqc.frontend.resolve import load_callable
from mpqc.lower.lowering import Lowering
from mpqc.lower.qdq import through_clamps
from mpqc.passes.analysis import Analysis, analyze
from mpqc.pipeline.fidelity import fidelity_against_float
from mpqc.pipeline.options import BuildOptions
from mpqc.policy import Policy, resolve_policy
from mpqc.precision import precision
from mpqc.report.record import BuildRecord
from mpqc.targets import Target, load_target

BATCH = 8  # samples per run: every probed tensor of a batch is held at once, in both models


@dataclasses.dataclass(frozen=True)
class _Build:
    folder: pathlib.Path
    record: BuildRecord
    options: BuildOptions
    model_bytes: bytes


def compare(folder: pathlib.Path, proxy: str | None = None, keep_float: int | None = None) -> dict:
    """Per-layer errors of the build in `folder`, worst first; with `keep_float`, the model's
    fidelity with each of the worst `keep_float` layers kept float, and with all of them."""
    build = _load_build(folder)
    options = build.options
    target = load_target(options.target)
    saved = Policy.load(folder / "policy.json")
    count = sum(not precision(name).is_float for name in saved.values())
    if keep_float is not None and keep_float > count:
        raise MpqcError(f"--keep-float {keep_float} asks for more layers than the {count} the build quantizes; give at most {count}")
    with progress.stage(f"loading {options.model}"):
        analysis = _analysis(build)
    policy = resolve_policy(str(folder / "policy.json"), analysis.layers, analysis.ties, target,
                            deployable_only=not options.evaluate_only)
    quantized = [layer for layer in analysis.layers if not policy.precision_of(layer.name).is_float]
    runtime = runtime_target(target)
    feeds, data = _comparison_feeds(proxy, analysis, options)
    rows, probe_effect = _layer_rows(analysis, policy, quantized, runtime, build, feeds)
    result = {"build": str(folder), "model": options.model, "target": target.name,
              "data": data, "samples": len(next(iter(feeds.values()))), "quantized_layers": len(quantized),
              "layers": rows, "probe_effect": probe_effect}
    if keep_float is not None:
        worst = [row["name"] for row in rows[:keep_float]]
        result["keep_float"] = _keep_float(build, analysis, target, runtime, policy, worst)
    return result


def _load_build(folder: pathlib.Path) -> _Build:
    """The record, options and model of a build folder; anything missing or inconsistent is one line."""
    if not folder.is_dir():
        raise MpqcError(f"'{folder}' is not a folder; point at a folder written by mpqc build")
    record = BuildRecord.load(folder / "build.json")
    fields = {field.name for field in dataclasses.fields(BuildOptions)}
    given = record.options if isinstance(record.options, dict) else {}
    if not isinstance(given.get("model"), str) or not isinstance(record.artifacts, dict):
        raise MpqcError(f"'{folder / 'build.json'}' records no model or artifacts; rebuild it with mpqc build")
    try:
        options = BuildOptions(**{name: value for name, value in given.items() if name in fields})
    except TypeError as exc:
        raise MpqcError(f"'{folder / 'build.json'}' has options this mpqc cannot read ({exc}); rebuild it with mpqc build") from None
    path = folder / "model.qdq.onnx"
    try:
        model_bytes = path.read_bytes()
    except FileNotFoundError:
        raise MpqcError(f"'{path}' does not exist; point at a complete build folder or rebuild it") from None
    except OSError as exc:
        raise MpqcError(f"'{path}' cannot be read ({exc.strerror or exc}); check its permissions") from None
    if hashlib.sha256(model_bytes).hexdigest() != record.artifacts.get("model.qdq.onnx"):
        raise MpqcError(f"'{path}' is not the model its build.json records (sha256 differs); rebuild the folder")
    return _Build(folder, record, options, model_bytes)


def _analysis(build: _Build) -> Analysis:
    spec = build.options.model
    try:
        analysis = analyze(spec)
    except MpqcError as exc:
        raise MpqcError(f"the model of {build.folder}, '{spec}', cannot be loaded here ({exc}); "
                        "run mpqc compare where the build ran") from None
    if analysis.loaded.sha256() != build.record.model.get("float_sha256"):
        raise MpqcError(f"model '{spec}' is not the one {build.folder} was built from (its float ONNX differs); "
                        "compare where the build ran, or rebuild")
    return analysis


def _comparison_feeds(proxy: str | None, analysis: Analysis, options: BuildOptions):
    loaded = analysis.loaded
    if proxy is not None:
        return proxy_feeds(ProxySource(proxy), loaded)[0], f"--proxy {proxy}"
    if loaded.example is not None:
        return loaded.example.eval_feeds()[0], "held-out eval set of the example"
    feeds, origin = proxy_feeds(options.proxy_source(), loaded)
    return feeds, f"the build's proxy data ({origin})"


def _layer_rows(analysis: Analysis, policy: Policy, quantized, runtime: Target, build: _Build, feeds) -> tuple[list[dict], dict]:
    """One row per quantized layer, worst output SQNR first, and the probing's effect on the built model's output."""
    inputs = {value.name for value in analysis.model.graph.inputs}
    values = {value.name: value for node in analysis.model.graph for value in node.outputs}
    # What a layer hands on: its output after a following lone ReLU/Clip, where the lowering puts
    # its output quantizer. Before the clamp, values it cuts off may be far off and never matter:
    # ONNX Runtime's INT32 bias of EfficientNet-Lite0's stem saturates in channels ReLU6 zeroes.
    ends = {layer.name: through_clamps(values[layer.output]).name for layer in quantized}
    outputs = list(ends.values())
    names = list(dict.fromkeys(outputs + [layer.activation for layer in quantized if layer.activation not in inputs]))
    backend = backend_for(runtime)
    float_bytes, float_outputs = with_outputs(ir.to_proto(analysis.model), names, "the float model")
    built = onnx.load_model_from_string(build.model_bytes)
    built_bytes, built_outputs = with_outputs(built, names, str(build.folder / "model.qdq.onnx"))
    reference = Probed(backend.load(float_bytes, runtime), float_outputs)
    candidate = Probed(backend.load(built_bytes, runtime), built_outputs)
    deployed = backend.load(build.model_bytes, runtime)
    count = len(next(iter(feeds.values())))
    batched = progress.bar(batches(feeds, BATCH), "comparing layer outputs", total=math.ceil(count / BATCH), unit="batch")
    errors, probe_effect = tensor_errors(reference, candidate, batched, names, unprobed=deployed.run)
    rows = []
    for layer in quantized:
        row = {"name": layer.name, "op_type": layer.op_type, "precision": policy.as_dict[layer.name], "output": ends[layer.name]}
        row |= errors[ends[layer.name]]
        row["input_sqnr_db"] = None if layer.activation in inputs else errors[layer.activation]["sqnr_db"]
        rows.append(row)
    rows.sort(key=lambda row: (row["sqnr_db"], row["cosine_mean"]))
    return rows, probe_effect


def _keep_float(build: _Build, analysis: Analysis, target: Target, runtime: Target, policy: Policy, worst: list[str]) -> dict:
    """Fidelity of the build's policy, then with each of `worst` kept float (with its tie group), then all of them."""
    options, record = build.options, build.record
    feeds, origin = proxy_feeds(options.proxy_source(), analysis.loaded)
    if record.proxy.get("sha256") not in (None, feeds_sha256(feeds)):
        raise MpqcError(f"the build's proxy data ({origin}) is not what {build.folder} was calibrated on (sha256 differs); "
                        "compare where the build ran, with the same files")
    with progress.stage("calibrating"):
        lowering = Lowering.prepare(analysis, target, feeds, options.calibration_settings())
    metric = load_callable(options.metric, "metric", "{name: number}") if options.metric else None
    backend = backend_for(runtime)
    float_runner = backend.load(lowering.float_model.SerializeToString(), runtime)

    def fidelity(model_bytes: bytes) -> dict:
        return fidelity_against_float(float_runner, backend.load(model_bytes, runtime), analysis.loaded, feeds, {}, metric)[0]

    groups = {name: group for group in analysis.ties for name in group}
    trials = [[name] for name in worst] + ([worst] if len(worst) > 1 else [])
    relowered = lowering.lower(policy)
    # The changes are against the same lowering of the unchanged policy: where this mpqc lowers it
    # differently from the one that built the folder, the built model is measured beside it.
    reproduced = hashlib.sha256(relowered).hexdigest() == record.artifacts["model.qdq.onnx"]
    before = fidelity(relowered)
    rows = []
    for requested in progress.bar(trials, "lowering with layers kept float", unit="policy"):
        kept = {name for layer in requested for name in groups.get(layer, (layer,))}
        changed = Policy(tuple((name, "fp32" if name in kept else value) for name, value in policy.assignments),
                         f"{policy.source}, {len(kept)} layer(s) kept fp32")
        after = fidelity(lowering.lower(changed))
        rows.append({"requested": requested, "fp32_layers": [name for name, _ in policy.assignments if name in kept],
                     "fidelity": after, "change": _change(before, after)})
    return {"calibration": {"data": origin, "method": options.calibration, "bias_correction": options.bias_correction},
            "relowered_matches_build": reproduced, "before": before,
            "built": before if reproduced else fidelity(build.model_bytes), "trials": rows}


def _change(before: dict, after: dict) -> dict[str, float]:
    return {key: after[key] - value for key, value in before.items()
            if isinstance(value, float) and isinstance(after.get(key), float)}
