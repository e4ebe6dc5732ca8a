"""`mpqc build` and `mpqc export`: model -> canonical ONNX -> layers -> policy -> calibration ->
QDQ model -> artifacts.

Each stage takes and returns plain data. Everything is written to a temporary folder beside
`--out` and renamed at the end, so a failed build leaves no half-written output.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import pathlib
import random
import time

import numpy as np
import onnx
import onnx_ir as ir

from mpqc import progress
from mpqc.backends.base import Backend, backend_for
from mpqc.backends.onnxruntime.runner import int8_saturation_note
from mpqc.bench.latency import MeasureSettings, first_batch, measure_latency
from mpqc.costmodel.policies import uniform_policies
from mpqc.data.feeds import feeds_sha256
from mpqc.data.proxy import proxy_feeds, proxy_labels
from mpqc.errors import MpqcError
from mpqc.files import check_output_folder, replace_folder
from mpqc.frontend.resolve import load_callable
from mpqc.lower.lowering import Lowering
from mpqc.passes.analysis import Analysis, analyze
from mpqc.pipeline.fidelity import fidelity_against_float
from mpqc.pipeline.measured import FRONT_METRIC, measure_points, prediction_check, undominated
from mpqc.pipeline.options import BuildOptions
from mpqc.policy import Policy, resolve_policy
from mpqc.report.html import render_html
from mpqc.report.markdown import render_report
from mpqc.report.record import BuildRecord
from mpqc.targets import Target, load_target
from mpqc.versions import machine, versions


def build(options: BuildOptions, out: pathlib.Path | None) -> BuildRecord:
    """Run the whole build; write the artifacts to `out` (if given) and return build.json's record."""
    if out is not None:
        check_out_dir(out)
    request = options  # as the user gave it: a --budget-speedup build derives budget_ms below
    if options.pareto is not None and not options.searches:
        raise MpqcError("--pareto sweeps a budget of the search: use it with --policy search")
    options.check_consistent()
    random.seed(options.seed)
    np.random.seed(options.seed)
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    target = load_target(options.target)
    backend = backend_for(target)
    with progress.stage(f"loading {options.model}"):
        analysis = analyze(options.model)
    timings["frontend_and_passes_s"] = time.perf_counter() - clock

    search = front = None
    extra_files: dict[str, bytes] = {}
    if options.searches:
        from mpqc.pipeline.search import prepare_search  # the search pulls in torch and scipy

        feeds, proxy_origin = proxy_feeds(options.proxy_source(), analysis.loaded)
        # Calibrated on first use: by the output method's scoring, else after the search (a budget no
        # policy meets fails before it); the build lowers through the same one.
        calibrated = functools.cache(lambda: _calibrated(analysis, target, feeds, options, timings))
        clock = time.perf_counter()
        speedup = None
        if options.budget_speedup is not None:
            speedup = _speedup_budget(options, backend, analysis, target, feeds)
            options = dataclasses.replace(options, budget_ms=speedup["budget_ms"])
        labels = proxy_labels(options.proxy_source(), analysis.loaded, len(next(iter(feeds.values()))))
        with progress.stage("scoring layers for the search"):
            problem = prepare_search(analysis, target, ir.to_proto(analysis.model), feeds, options, labels, calibrated)
        if options.pareto is not None:
            policy, search, front = problem.pareto(options.pareto)
        else:
            policy, search = problem.solve(options.budget_ms)
        if speedup is not None:
            search["budget_speedup"] = speedup
        timings["search_s"] = time.perf_counter() - clock
    else:
        policy = resolve_policy(options.policy, analysis.layers, analysis.ties, target, deployable_only=not options.evaluate_only)
        needs_data = any(not policy.precision_of(name).is_float for name in policy.as_dict)
        feeds, proxy_origin = (proxy_feeds(options.proxy_source(), analysis.loaded) if needs_data or options.proxy else ({}, None))
        calibrated = functools.cache(lambda: _calibrated(analysis, target, feeds, options, timings))
    lowering = calibrated()

    metric = load_callable(options.metric, "metric", "{name: number}") if options.metric else None
    # A --pareto build lowers a point of the front as it is: re-solving for the budget would leave the front.
    if (search is not None and options.budget_ms is not None and options.pareto is None and options.measure
            and backend.measures_latency):
        clock = time.perf_counter()
        with progress.stage(f"measuring the chosen policy against the {options.budget_ms:g} ms budget"):
            policy, search = _meet_latency_budget(problem, policy, search, lowering, analysis.loaded, feeds, options.budget_ms,
                                                  options.batch)
        timings["budget_verification_s"] = time.perf_counter() - clock
    if search is not None and options.measure and backend.measures_latency and (options.pareto or options.budget_ms):
        clock = time.perf_counter()
        with progress.stage("measuring the searched policies beside FP32 and the uniform ones"):
            policy, search, front = _measured_choice(problem, policy, search, front, lowering, analysis, feeds, options, metric)
        timings["measured_points_s"] = time.perf_counter() - clock
    if front is not None:
        extra_files = _pareto_files(front)

    clock = time.perf_counter()
    model_bytes = lowering.lower(policy)
    timings["lowering_s"] = time.perf_counter() - clock

    artifacts = {"model.qdq.onnx": hashlib.sha256(model_bytes).hexdigest()}
    artifacts |= {name: hashlib.sha256(data).hexdigest() for name, data in extra_files.items()}
    if backend.has_rules:
        _check_rules(backend, built_model_proto(model_bytes), target)
    engine_files, engine_section = backend.artifacts(model_bytes, target, policy, analysis.layers, options.batch, options.tables)
    artifacts |= {name: hashlib.sha256(data).hexdigest() for name, data in engine_files.items()}
    extra_files = extra_files | engine_files
    measured = not_measured = None
    if options.measure:
        with progress.stage("measuring fidelity and latency"):
            measured, not_measured, search = _measurements(options, backend, analysis, target, lowering, model_bytes, policy,
                                                           feeds, search, timings, metric)
    record = BuildRecord(
        model={"spec": options.model, "kind": analysis.loaded.kind, "float_sha256": analysis.loaded.sha256()},
        target={"name": target.name, "file_sha256": hashlib.sha256(target.path.read_bytes()).hexdigest()},
        policy={"source": policy.source, "counts": _counts(policy)},
        options=dataclasses.asdict(dataclasses.replace(options, budget_ms=request.budget_ms)),
        proxy={"origin": proxy_origin, "samples": len(next(iter(feeds.values()))) if feeds else 0,
               "sha256": feeds_sha256(feeds) if feeds else None},
        calibration={"method": options.calibration, "tensors": len(lowering.ranges), "bias_correction": options.bias_correction,
                     "ranges_cut_to_live_bounds": len(lowering.narrowed)},
        layers=_layer_rows(analysis, policy, target),
        ties=[list(group) for group in analysis.ties],
        artifacts=artifacts,
        artifact_bytes={"model.qdq.onnx": len(model_bytes)} | {name: len(data) for name, data in extra_files.items()},
        versions=versions(),
        machine=machine(),
        seed=options.seed,
        search=search,
        tensorrt_engine=engine_section,
        measured=measured,
        not_measured=not_measured,
        timings=timings,
    )
    if out is not None:
        _write_atomically(out, model_bytes, policy, record, extra_files)
    return record


def _measurements(options: BuildOptions, backend: Backend, analysis: Analysis, target: Target, lowering: Lowering,
                  model_bytes: bytes, policy: Policy, feeds, search: dict | None, timings: dict,
                  metric=None) -> tuple[dict, str | None, dict | None]:
    """build.json's measured section, what was not measured, and the search record with the
    measured latency against its budget."""
    float_bytes = lowering.float_model.SerializeToString()
    if not backend.measures_latency:
        evaluation = backend.numerics_target(target)
        runners = (backend_for(evaluation).load(float_bytes, evaluation), backend_for(evaluation).load(model_bytes, evaluation))
        measured = {"fidelity": fidelity_against_float(*runners, analysis.loaded, feeds, timings, metric)[0],
                    "fidelity_runtime": "ONNX Runtime CPU (exact INT8 kernels), running the QDQ model's numerics"}
        not_measured = (f"latency: target '{target.name}' runs on {target.backend}; "
                        "mpqc times ONNX Runtime targets only (time the engine with `mpqc profile` on the device)")
        return measured, not_measured, search
    measured = _measure(options.measure_settings(), backend, analysis.loaded, target, float_bytes, model_bytes, feeds, timings,
                        metric)
    note = int8_saturation_note(target) if any(policy.precision_of(name).weight_bits == 8 for name, _ in policy.assignments) else None
    if note is not None:
        measured["int8_note"] = note
    if options.budget_ms is not None:
        measured_ms = measured["latency_built"]["median_ms"]
        search = search | {"measured_ms": measured_ms, "budget_met": measured_ms <= options.budget_ms}
    return measured, None, search


def _speedup_budget(options: BuildOptions, backend: Backend, analysis: Analysis, target: Target, feeds) -> dict:
    """The latency budget of --budget-speedup: the FP32 model's latency, measured here now on the
    batch the build times, over the speed-up asked for."""
    if not backend.measures_latency:
        raise MpqcError(f"--budget-speedup needs the FP32 latency on the target, and mpqc does not time target "
                        f"'{target.name}' ({target.backend}); give --budget-ms from `mpqc profile` on the device")
    loaded = analysis.loaded
    timing = _timing_batch(loaded, feeds, options.batch)
    runner = backend.load(ir.to_proto(analysis.model).SerializeToString(), target)
    fp32_ms = measure_latency(runner, timing, warmup=10, runs=50).median_ms
    return {"speedup": options.budget_speedup, "fp32_measured_ms": fp32_ms, "budget_ms": fp32_ms / options.budget_speedup}


def _timing_batch(loaded, feeds, batch: int) -> dict[str, np.ndarray]:
    """The batch a build times policies on: from the example's held-out set, else the proxy data."""
    return first_batch(loaded.example.eval_feeds()[0] if loaded.example is not None else feeds, batch)


def _calibrated(analysis, target, feeds, options: BuildOptions, timings: dict[str, float]) -> Lowering:
    clock = time.perf_counter()
    with progress.stage("calibrating"):
        lowering = Lowering.prepare(analysis, target, feeds, options.calibration_settings())
    timings["calibration_s"] = time.perf_counter() - clock
    return lowering


def _pareto_files(front: dict) -> dict[str, bytes]:
    """pareto.json and its plot, which is drawn from the JSON alone so it can be redrawn from the file."""
    from mpqc.report.plots import pareto_plot  # matplotlib only where a plot is drawn

    picture = io.BytesIO()
    pareto_plot(front, picture)
    return {"pareto.json": (json.dumps(front, indent=2) + "\n").encode(), "pareto.png": picture.getvalue()}


_BUDGET_ROUNDS = 4


def _meet_latency_budget(problem, policy, search, lowering, loaded, feeds, budget_ms: float, batch: int):
    """Measure the chosen policy; while it runs slower than the budget, tighten the ILP's budget
    by the measured overshoot and solve again. The cost model is validated on random policies, but
    an optimizer seeks out exactly the policies it underestimates, so the build checks for real."""
    timing = _timing_batch(loaded, feeds, batch)
    backend = backend_for(lowering.target)
    ilp_budget, rounds = budget_ms, []
    outcome = f"still over the budget after {_BUDGET_ROUNDS} rounds"
    for _ in range(_BUDGET_ROUNDS):
        runner = backend.load(lowering.lower(policy), lowering.target)
        measured = measure_latency(runner, timing, warmup=10, runs=50).median_ms
        rounds.append({"ilp_budget_ms": ilp_budget, "predicted_ms": search["predicted_ms"], "measured_ms": measured})
        if measured <= budget_ms:
            outcome = "met"
            break
        ilp_budget *= budget_ms / measured
        try:
            policy, search = problem.solve(ilp_budget)
        except MpqcError as exc:  # no tighter policy exists: keep the last one and report the miss
            outcome = (f"measured {measured:.3f} ms; no policy is predicted under the tightened budget "
                       f"{ilp_budget:.3f} ms ({exc})")
            break
    search["verification_rounds"] = rounds
    search["verification"] = outcome
    return policy, search


# The latency margin of the measured front's dominance: the noise floor, capped so that a noisy
# machine cannot empty the front down to FP32 (such a machine is flagged by profile and validate).
MAX_MARGIN = 0.10


def _measured_choice(problem, policy, search, front, lowering, analysis, feeds, options, metric):
    """Measure the searched policies (each point of a front, or the budgeted choice) beside FP32 and
    every uniform policy, and return what to build: a front's middle measured point, or the budgeted
    choice unless a uniform policy beats it on both measured latency and fidelity."""
    if front is not None:
        searched = [(f"front:{i}", Policy(tuple(point["assignments"].items()), policy.source), problem.predicted_ms(
            Policy(tuple(point["assignments"].items())))) for i, point in enumerate(front["points"])]
    else:
        searched = [("searched", policy, problem.predicted_ms(policy))]
    uniforms = [(u.source, u, problem.predicted_ms(u)) for u in uniform_policies(analysis, lowering.target)]
    candidates, seen = [], set()
    for source, candidate, predicted in searched + uniforms:
        if candidate.assignments not in seen:  # a front point that is a uniform policy is measured once
            seen.add(candidate.assignments)
            candidates.append((source, candidate, predicted))
    points, noise_floor = measure_points(lowering, analysis.loaded, feeds, candidates, options.batch, metric)
    margin = min(noise_floor, MAX_MARGIN)
    # A policy that keeps every layer float is the FP32 model timed twice: it is left out of the
    # front, so that noise cannot let it beat, and drop, the reference every point is judged against.
    twins = [p for p in points[1:] if all(p.policy.precision_of(name).is_float for name in p.policy.as_dict)]
    kept = undominated([p for p in points if p not in twins], margin)
    summary = {"metric": FRONT_METRIC, "noise_floor": noise_floor, "latency_margin": margin,
               "points": [p.to_json() | {"on_measured_front": p in kept} for p in points],
               "prediction_check": prediction_check(points, margin)}
    if front is not None:
        deployable = [p for p in kept if p.policy is not None]
        # Where the FP32 model itself beats every lowered policy (a tiny model), build the most
        # faithful policy, the all-fp32 one, whatever name it was measured under.
        chosen = (deployable[(len(deployable) - 1) // 2] if deployable else twins[0] if twins else
                  max((p for p in points if p.policy is not None), key=lambda p: (p.fidelity, -p.median_ms)))
        why = (f"the middle of the {len(kept)} measured points no other measured point beats on latency (each is faster "
               f"than every more faithful one beyond the {margin:.1%} noise floor or in every paired round) and {FRONT_METRIC}")
    else:
        chosen = next(p for p in points if p.source == "searched")
        better = [p for p in points if p.source.startswith("uniform:") and p.beats(chosen, margin)]
        why = "the searched policy: no uniform policy beats it on both measured latency and " + FRONT_METRIC
        if better:
            best = max(better, key=lambda p: (p.fidelity, -p.median_ms))
            why = (f"{best.source}: it beats the searched policy on measured latency ({best.median_ms:.3f} vs "
                   f"{chosen.median_ms:.3f} ms) and {FRONT_METRIC} ({best.fidelity:.4f} vs {chosen.fidelity:.4f})")
            chosen = best
        if options.budget_ms is not None and chosen.median_ms > options.budget_ms:
            fastest = min((p for p in points if p.policy is not None), key=lambda p: p.median_ms)
            why += (f"; the {options.budget_ms:g} ms budget is not met: the closest measured policy is {fastest.source} "
                    f"at {fastest.median_ms:.3f} ms ({FRONT_METRIC} {fastest.fidelity:.4f})")
    summary["built"], summary["why"] = chosen.source, why
    record = problem.describe(chosen.policy, options.budget_ms) | {
        key: search[key] for key in ("verification", "verification_rounds", "budget_speedup") if key in search}
    if "pareto" in search:
        pareto = search["pareto"]
        index = int(chosen.source.split(":")[1]) if chosen.source.startswith("front:") else None
        record["pareto"] = pareto | {"built_point": index, "budget": None if index is None else pareto["front"][index]["budget"]}
    record["measured_points"] = summary
    if front is not None:
        front = front | {"built_point": record["pareto"]["built_point"], "measured": summary}
    source = policy.source if chosen.source.startswith(("front:", "searched")) else chosen.source
    return Policy(chosen.policy.assignments, source), record, front


def built_model_proto(model_bytes: bytes) -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.ParseFromString(model_bytes)
    return model


def _check_rules(backend: Backend, model: onnx.ModelProto, target: Target) -> None:
    """A model for a target whose runtime has Q/DQ rules must meet them, or it is not written."""
    violations = backend.violations(model, target)
    if violations:
        first = violations[0]
        raise MpqcError(
            f"the model breaks {len(violations)} TensorRT rule(s) for target '{target.name}', first: {first.message}"
        )


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


def _measure(settings: MeasureSettings, backend: Backend, loaded, target, float_bytes: bytes, model_bytes: bytes, feeds,
             timings, metric=None) -> dict:
    float_runner, built_runner = backend.load(float_bytes, target), backend.load(model_bytes, target)
    fidelity, timing_feeds = fidelity_against_float(float_runner, built_runner, loaded, feeds, timings, metric)
    clock = time.perf_counter()
    batch = first_batch(timing_feeds, settings.batch)
    fp32 = measure_latency(float_runner, batch, settings.warmup, settings.runs)
    built = measure_latency(built_runner, batch, settings.warmup, settings.runs)
    timings["latency_s"] = time.perf_counter() - clock
    return {
        "latency_fp32": fp32.to_json(),
        "latency_built": built.to_json(),
        "speedup": fp32.median_ms / built.median_ms,
        "fidelity": fidelity,
    }


def check_out_dir(out: pathlib.Path) -> None:
    """Replace an earlier build, never a folder of something else."""
    check_output_folder(out, "build.json", "mpqc build")


def _write_atomically(out: pathlib.Path, model_bytes: bytes, policy: Policy, record: BuildRecord,
                      extra_files: dict[str, bytes] | None = None) -> None:
    """The artifacts of every build (model, policy, record, both reports), plus `extra_files` (name -> content) when a build has more."""
    check_out_dir(out.resolve())

    def fill(staging: pathlib.Path) -> None:
        (staging / "model.qdq.onnx").write_bytes(model_bytes)
        policy.save(staging / "policy.json")
        record.save(staging / "build.json")
        (staging / "report.md").write_text(render_report(record))
        (staging / "report.html").write_text(render_html(record))
        for name, data in (extra_files or {}).items():
            (staging / name).write_bytes(data)

    replace_folder(out, fill)
