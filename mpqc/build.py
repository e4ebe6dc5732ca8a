"""`mpqc build`: model -> canonical ONNX -> layers -> policy -> calibration -> QDQ model -> artifacts.

Each stage takes and returns plain data. Everything is written to a temporary folder beside
`--out` and renamed at the end, so a failed build leaves no half-written output.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import pathlib
import random
import shutil
import tempfile
import time

import numpy as np
import onnx
import onnx_ir as ir

from mpqc.backends.ort_runner import OrtRunner, int8_saturation_note, numerics_target
from mpqc.bench.fidelity import output_agreement
from mpqc.bench.latency import first_batch, measure_latency
from mpqc.calibrate.ranges import calibrate, channel_means
from mpqc.data.feeds import check_feeds, feeds_sha256, load_npz
from mpqc.errors import MpqcError
from mpqc.frontend.resolve import LoadedModel, resolve_model
from mpqc.frontend.torch_export import module_map
from mpqc.lower.float16 import to_float16
from mpqc.lower.qdq import lower, mean_tensors, plan_activation_quantizers
from mpqc.passes.layers import Layer, find_layers
from mpqc.passes.pipeline import canonicalize
from mpqc.passes.signatures import layer_signature
from mpqc.passes.ties import tie_groups
from mpqc.policy import Policy, resolve_policy
from mpqc.report.markdown import render_report
from mpqc.targets import Target, load_target
from mpqc.versions import machine, versions


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    model: str
    target: str = "ort-cpu"
    policy: str = "uniform:w8a8"
    proxy: str | None = None  # .npz keyed by input name; bundled examples bring their own
    proxy_limit: int | None = None
    calibration: str = "minmax"
    percentile: float = 99.99
    seed: int = 0
    evaluate_only: bool = False  # allow precisions the target can only evaluate, not deploy
    bias_correction: bool = True
    # --policy search: the ILP chooses per layer under these budgets (any combination).
    method: str | None = None  # sensitivity method; None: seam for torch classifiers, else qerror
    epochs: int = 3  # indicator training passes over the proxy data (limpq, seam)
    gmpq: bool = False  # add the attribution-imitation term to indicator training
    budget_ms: float | None = None
    budget_bitops: float | None = None
    budget_bytes: float | None = None
    tables: str | None = None  # folder of latency tables (default: beside the target file)
    pareto: str | None = None  # "ms", "bitops" or "bytes": also write the loss-vs-cost front of that resource
    cache_dir: str | None = None  # sensitivity score cache (default: $XDG_CACHE_HOME/mpqc or ~/.cache/mpqc)
    use_cache: bool = True
    measure: bool = True  # time FP32 vs built and compute fidelity
    batch: int = 1
    runs: int = 100
    warmup: int = 10


@dataclasses.dataclass
class Analysis:
    """What the passes know about a model: used by build, export and inspect alike."""

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


def proxy_feeds(options: BuildOptions, loaded: LoadedModel) -> tuple[dict[str, np.ndarray], str]:
    if options.proxy is not None:
        feeds, origin = load_npz(options.proxy), options.proxy
    elif loaded.example is not None:
        feeds, origin = loaded.example.proxy_feeds(options.proxy_limit), f"example:{loaded.spec}"
    else:
        raise MpqcError("this model needs proxy data for calibration: pass --proxy DATA.npz (arrays keyed by input name)")
    feeds = check_feeds(feeds, loaded.model, origin)
    if options.proxy_limit is not None:
        feeds = {name: array[: options.proxy_limit] for name, array in feeds.items()}
    return feeds, origin


def proxy_labels(options: BuildOptions, loaded: LoadedModel, count: int) -> np.ndarray | None:
    """Labels for the trained sensitivity methods: a "labels" array in --proxy's .npz, or the bundled
    example's own; None lets them label samples with the float model's predictions."""
    if options.proxy is not None:
        labels = load_npz(options.proxy, only="labels").get("labels")
    elif loaded.example is not None and hasattr(loaded.example, "proxy_labels"):
        labels = loaded.example.proxy_labels(count)
    else:
        return None
    if labels is None:
        return None
    labels = np.asarray(labels)
    if labels.shape != (count,) or not np.issubdtype(labels.dtype, np.integer) or (labels < 0).any():
        raise MpqcError(f"proxy labels must be {count} non-negative integers (one per sample), got {labels.dtype} {labels.shape}")
    return labels.astype(np.int64)


@dataclasses.dataclass
class Lowering:
    """Calibrated once, lowers any number of policies (profiling and validation lower dozens).

    Ranges and channel means are per tensor, so measuring every tensor any policy could quantize
    gives each policy exactly the numbers a build of that policy alone would use.
    """

    analysis: Analysis
    target: Target
    float_model: onnx.ModelProto
    ranges: dict[str, tuple[float, float]]
    input_means: dict[str, np.ndarray]

    @classmethod
    def prepare(cls, analysis: Analysis, target: Target, feeds: dict[str, np.ndarray], options: BuildOptions) -> "Lowering":
        float_model = ir.to_proto(analysis.model)
        everything = Policy(tuple((layer.name, "w8a8") for layer in analysis.layers), "all sites")
        tensors = [site.value for site in plan_activation_quantizers(analysis.model, analysis.layers, everything, target)]
        corrected = mean_tensors(analysis.layers, everything) if options.bias_correction else {}
        if not feeds:
            return cls(analysis, target, float_model, {}, {})
        ranges = calibrate(float_model, tensors, feeds, options.calibration, options.percentile)
        if not all(np.isfinite(v).all() for v in ranges.values()):
            raise MpqcError("calibration produced non-finite ranges: the model overflows on the proxy data")
        means = channel_means(float_model, corrected, feeds)
        input_means = {layer.name: means[layer.activation] for layer in analysis.layers if layer.activation in means}
        return cls(analysis, target, float_model, ranges, input_means)

    def lower(self, policy: Policy) -> bytes:
        model = ir.from_proto(self.float_model)  # lowering rewrites in place: start from the float model
        sites = plan_activation_quantizers(model, self.analysis.layers, policy, self.target)
        built = ir.to_proto(lower(model, self.analysis.layers, policy, self.target, sites, self.ranges, self.input_means))
        if self.target.float_type == "float16":
            built = to_float16(built)
        onnx.checker.check_model(built)
        return built.SerializeToString(deterministic=True)


def build(options: BuildOptions, out: pathlib.Path | None) -> dict:
    """Run the whole build; write the artifacts to `out` (if given) and return build.json's content."""
    if out is not None:
        check_out_dir(out)
    if options.pareto is not None and options.policy != "search":
        raise MpqcError("--pareto sweeps a budget of the search: use it with --policy search")
    random.seed(options.seed)
    np.random.seed(options.seed)
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    target = load_target(options.target)
    analysis = analyze(options.model)
    timings["frontend_and_passes_s"] = time.perf_counter() - clock

    search = None
    extra_files: dict[str, bytes] = {}
    if options.policy == "search":
        from mpqc.search.policy_search import prepare_search  # the search pulls in torch and scipy

        feeds, proxy_origin = proxy_feeds(options, analysis.loaded)
        clock = time.perf_counter()
        labels = proxy_labels(options, analysis.loaded, len(next(iter(feeds.values()))))
        problem = prepare_search(analysis, target, ir.to_proto(analysis.model), feeds, options, labels)
        if options.pareto is not None:
            policy, search, front = problem.pareto(options.pareto)
            extra_files = _pareto_files(front)
        else:
            policy, search = problem.solve(options.budget_ms)
        timings["search_s"] = time.perf_counter() - clock
    else:
        policy = resolve_policy(options.policy, analysis.layers, analysis.ties, target, deployable_only=not options.evaluate_only)
        needs_data = any(not policy.precision_of(name).is_float for name in policy.as_dict)
        feeds, proxy_origin = (proxy_feeds(options, analysis.loaded) if needs_data or options.proxy else ({}, None))

    clock = time.perf_counter()
    lowering = Lowering.prepare(analysis, target, feeds, options)
    timings["calibration_s"] = time.perf_counter() - clock

    # A --pareto build lowers a point of the front as it is: re-solving for the budget would leave the front.
    if (search is not None and options.budget_ms is not None and options.pareto is None and options.measure
            and target.backend == "onnxruntime"):
        clock = time.perf_counter()
        policy, search = _meet_latency_budget(problem, policy, search, lowering, analysis.loaded, feeds, options)
        timings["budget_verification_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    model_bytes = lowering.lower(policy)
    timings["lowering_s"] = time.perf_counter() - clock
    float_model = lowering.float_model

    record = {
        "format": "mpqc.build/1",
        "model": {"spec": options.model, "kind": analysis.loaded.kind, "float_sha256": analysis.loaded.sha256()},
        "target": {"name": target.name, "file_sha256": hashlib.sha256(target.path.read_bytes()).hexdigest()},
        "policy": {"source": policy.source, "counts": _counts(policy)},
        "options": dataclasses.asdict(options),
        "proxy": {"origin": proxy_origin, "samples": len(next(iter(feeds.values()))) if feeds else 0,
                  "sha256": feeds_sha256(feeds) if feeds else None},
        "calibration": {"method": options.calibration, "tensors": len(lowering.ranges), "bias_correction": options.bias_correction},
        "layers": _layer_rows(analysis, policy, target),
        "ties": [list(group) for group in analysis.ties],
        "artifacts": {"model.qdq.onnx": hashlib.sha256(model_bytes).hexdigest()}
        | {name: hashlib.sha256(data).hexdigest() for name, data in extra_files.items()},
        "versions": versions(),
        "machine": machine(),
        "seed": options.seed,
    }
    if search is not None:
        record["search"] = search
    if target.backend == "tensorrt":
        _check_tensorrt(built_model_proto(model_bytes), target)
        extra_files = extra_files | _tensorrt_engine(model_bytes, target, policy, analysis, options, record)
    if options.measure and target.backend != "onnxruntime":
        evaluation = numerics_target()
        runners = (OrtRunner(float_model.SerializeToString(), evaluation), OrtRunner(model_bytes, evaluation))
        record["measured"] = {"fidelity": fidelity_against_float(*runners, analysis.loaded, feeds, timings)[0],
                              "fidelity_runtime": "ONNX Runtime CPU (exact INT8 kernels), running the QDQ model's numerics"}
        record["not_measured"] = (f"latency: target '{target.name}' runs on {target.backend}; "
                                  "mpqc times ONNX Runtime targets only (time the engine with `mpqc profile` on the device)")
    elif options.measure:
        record["measured"] = _measure(options, analysis.loaded, target, float_model, model_bytes, feeds, timings)
        note = int8_saturation_note(target) if any(policy.precision_of(name).weight_bits == 8 for name, _ in policy.assignments) else None
        if note is not None:
            record["measured"]["int8_note"] = note
        if options.budget_ms is not None:
            record["search"]["measured_ms"] = record["measured"]["latency_built"]["median_ms"]
            record["search"]["budget_met"] = record["search"]["measured_ms"] <= options.budget_ms
    record["timings"] = timings
    if out is not None:
        _write_atomically(out, model_bytes, policy, record, extra_files)
    return record


def _pareto_files(front: dict) -> dict[str, bytes]:
    """pareto.json and its plot, which is drawn from the JSON alone so it can be redrawn from the file."""
    from mpqc.report.plots import pareto_plot  # matplotlib only where a plot is drawn

    picture = io.BytesIO()
    pareto_plot(front, picture)
    return {"pareto.json": (json.dumps(front, indent=2) + "\n").encode(), "pareto.png": picture.getvalue()}


_BUDGET_ROUNDS = 4


def _meet_latency_budget(problem, policy, search, lowering, loaded, feeds, options):
    """Measure the chosen policy; while it runs slower than the budget, tighten the ILP's budget
    by the measured overshoot and solve again. The cost model is validated on random policies, but
    an optimizer seeks out exactly the policies it underestimates, so the build checks for real."""
    timing = first_batch(loaded.example.eval_feeds()[0] if loaded.example is not None else feeds, options.batch)
    ilp_budget, rounds = options.budget_ms, []
    for _ in range(_BUDGET_ROUNDS):
        runner = OrtRunner(lowering.lower(policy), lowering.target)
        measured = measure_latency(runner, timing, warmup=10, runs=50).median_ms
        rounds.append({"ilp_budget_ms": ilp_budget, "predicted_ms": search["predicted_ms"], "measured_ms": measured})
        if measured <= options.budget_ms:
            break
        ilp_budget *= options.budget_ms / measured
        try:
            policy, search = problem.solve(ilp_budget)
        except MpqcError:
            break  # no tighter policy exists: keep the last one and report the miss
    search["verification_rounds"] = rounds
    return policy, search


def built_model_proto(model_bytes: bytes) -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.ParseFromString(model_bytes)
    return model


def _check_tensorrt(model: onnx.ModelProto, target: Target) -> None:
    """A model for a TensorRT target must meet its explicit-quantization rules, or it is not written."""
    from mpqc.backends.tensorrt_rules import check_tensorrt_conformance

    violations = check_tensorrt_conformance(model, bool(target.plugins.get("int4_conv", False)))
    if violations:
        first = violations[0]
        raise MpqcError(
            f"the model breaks {len(violations)} TensorRT rule(s) for target '{target.name}', first: {first.message}"
        )


def _tensorrt_engine(model_bytes: bytes, target: Target, policy: Policy, analysis: Analysis, options: BuildOptions,
                     record: dict) -> dict[str, bytes]:
    """model.engine and its precision report where TensorRT runs; elsewhere build.json says why none was built."""
    from mpqc.backends.tensorrt import engine_artifacts

    files, record["tensorrt_engine"] = engine_artifacts(model_bytes, target, policy, analysis.layers, options.batch, options.tables)
    record["artifacts"] |= {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    return files


def _counts(policy: Policy) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, name in policy.assignments:
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def _layer_rows(analysis: Analysis, policy: Policy, target: Target) -> list[dict]:
    rows = analysis.describe_layers(target)
    for row in rows:
        row["precision"] = policy.as_dict[row["name"]]
    return rows


def _measure(options, loaded, target, float_model, model_bytes, feeds, timings) -> dict:
    float_runner, built_runner = OrtRunner(float_model.SerializeToString(), target), OrtRunner(model_bytes, target)
    fidelity, timing_feeds = fidelity_against_float(float_runner, built_runner, loaded, feeds, timings)
    clock = time.perf_counter()
    batch = first_batch(timing_feeds, options.batch)
    fp32 = measure_latency(float_runner, batch, options.warmup, options.runs)
    built = measure_latency(built_runner, batch, options.warmup, options.runs)
    timings["latency_s"] = time.perf_counter() - clock
    return {
        "latency_fp32": fp32.to_json(),
        "latency_built": built.to_json(),
        "speedup": fp32.median_ms / built.median_ms,
        "fidelity": fidelity,
    }


def fidelity_against_float(float_runner, built_runner, loaded, feeds, timings) -> tuple[dict, dict[str, np.ndarray]]:
    """Agreement of the built model with the float one, and the feeds it was measured on: the
    example's held-out set where the model is a bundled example, else the proxy set. `timings`
    gets fidelity_s."""
    clock = time.perf_counter()
    if loaded.example is not None:
        eval_feeds, labels = loaded.example.eval_feeds()
        reference = float_runner.run_batched(eval_feeds)
        candidate = built_runner.run_batched(eval_feeds)
        fidelity = {"data": "held-out eval set of the example", "samples": len(reference)}
        fidelity |= loaded.example.fidelity(reference, candidate, labels)
        fidelity |= output_agreement(reference, candidate)
        timing_feeds = eval_feeds
    else:
        if not feeds:
            raise MpqcError("measuring needs input data: pass --proxy DATA.npz or --no-measure")
        reference, candidate = float_runner.run_batched(feeds), built_runner.run_batched(feeds)
        fidelity = {"data": "proxy set (no held-out set for this model)", "samples": len(reference)}
        fidelity |= output_agreement(reference, candidate)
        timing_feeds = feeds
    timings["fidelity_s"] = time.perf_counter() - clock
    return fidelity, timing_feeds


def check_out_dir(out: pathlib.Path) -> None:
    """Replace an earlier build, never a folder of something else."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "build.json").is_file())):
        raise MpqcError(f"--out '{out}' exists and is not an mpqc build folder; choose a new or empty folder")


def _write_atomically(out: pathlib.Path, model_bytes: bytes, policy: Policy, record: dict,
                      extra_files: dict[str, bytes] | None = None) -> None:
    """The four artifacts of every build, plus `extra_files` (name -> content) when a build has more."""
    out = out.resolve()
    check_out_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (staging / "model.qdq.onnx").write_bytes(model_bytes)
        policy.save(staging / "policy.json")
        (staging / "build.json").write_text(json.dumps(record, indent=2) + "\n")
        (staging / "report.md").write_text(render_report(record))
        for name, data in (extra_files or {}).items():
            (staging / name).write_bytes(data)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
