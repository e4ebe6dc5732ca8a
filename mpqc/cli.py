"""The `mpqc` command: argument parsing and printing; the drivers in mpqc.pipeline do the work."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import signal
import sys

from mpqc.errors import MpqcError


def _build_options(args, policy: str):
    from mpqc.pipeline.options import BuildOptions

    return BuildOptions(
        model=args.model,
        target=args.target,
        policy=policy,
        proxy=args.proxy,
        proxy_limit=args.proxy_limit,
        calibration=args.calibration,
        percentile=args.percentile,
        seed=args.seed,
        evaluate_only=args.evaluate_only,
        bias_correction=not args.no_bias_correction,
        method=args.method,
        iterations=args.iterations,
        epochs=args.epochs,
        gmpq=args.gmpq,
        fixed_ends=args.fixed_ends,
        seam_terms=None if args.seam_terms is None else tuple(args.seam_terms),
        budget_ms=args.budget_ms,
        budget_speedup=args.budget_speedup,
        budget_bitops=args.budget_bitops,
        budget_bytes=args.budget_bytes,
        tables=args.tables,
        pareto=getattr(args, "pareto", None),  # build only: export never searches
        cache_dir=args.cache_dir,
        use_cache=not args.no_cache,
        measure=not args.no_measure,
        metric=args.metric,
        batch=args.batch,
        runs=args.runs,
        warmup=args.warmup,
    )


def _summary(record: dict, out: pathlib.Path) -> str:
    lines = [f"built {record['model']['spec']} for {record['target']['name']} -> {out}",
             "  policy: " + ", ".join(f"{n} x {p}" for p, n in record["policy"]["counts"].items())]
    search = record.get("search")
    if search and search["budgets"]["ms"] is not None and search.get("predicted_ms") is not None:
        verdict = {True: "met", False: "MISSED", None: "not measured"}[search.get("budget_met")]
        why = f" ({search['verification']})" if search.get("budget_met") is False and "verification" in search else ""
        lines.append(f"  latency budget {search['budgets']['ms']:.3f} ms: predicted {search['predicted_ms']:.3f} ms, {verdict}{why}")
    measured = record.get("measured")
    if record.get("not_measured"):
        lines.append(f"  not measured: {record['not_measured']}")
    if measured and "latency_built" in measured:
        fp32, built = measured["latency_fp32"], measured["latency_built"]
        lines.append(
            f"  latency (batch {built['batch']}, {built['threads']} threads, median of {built['runs']}): "
            f"fp32 {fp32['median_ms']:.3f} ms, built {built['median_ms']:.3f} ms ({measured['speedup']:.2f}x)"
        )
    if measured:
        shown = {k: v for k, v in measured["fidelity"].items() if isinstance(v, float)}
        lines.append("  fidelity vs fp32: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))
        if "int8_note" in measured:
            lines.append(f"  note: {measured['int8_note']}")
    cost_note = ((search or {}).get("measured_points") or {}).get("prediction_check", {}).get("note")
    if cost_note:
        lines.append(f"  note: {cost_note}")
    lines.append(f"  artifacts: {out / 'model.qdq.onnx'}, {out / 'policy.json'}, {out / 'build.json'}, {out / 'report.md'}, "
                 f"{out / 'report.html'}")
    engine = record.get("tensorrt_engine")
    if engine is not None:
        lines.append(f"  tensorrt engine: {out / 'model.engine'}, {len(engine['precisions']['findings'])} precision finding(s) in build.json"
                     if engine["engine_built"] else f"  no tensorrt engine built: {engine['reason']}")
    if search and "pareto" in search:
        front = search["pareto"]
        lines.append(f"  pareto front ({front['resource']}, {front['points']} points, built point {front['built_point']}): "
                     f"{out / 'pareto.json'}, {out / 'pareto.png'}")
    return "\n".join(lines)


def cmd_build(args) -> dict:
    from mpqc.pipeline.build import build

    out = pathlib.Path(args.out)
    record = build(_build_options(args, args.policy), out).to_json()
    return {"out": str(out), "build": record, "_text": _summary(record, out)}


def cmd_export(args) -> dict:
    """The build of a saved policy: nothing is searched, so the search's flags are refused."""
    options = _build_options(args, args.policy)
    if options.searches:
        raise MpqcError("export lowers a saved policy and never searches: pass --policy DIR/policy.json "
                        "(or use mpqc build --policy search)")
    given = options.search_only_flags_given()
    if given:
        raise MpqcError(f"export lowers a saved policy and never searches: drop {', '.join(given)} "
                        "(or use mpqc build --policy search)")
    return cmd_build(args)


def cmd_report(args) -> dict:
    """Re-render a build's report.md and report.html from its build.json."""
    from mpqc.files import write_atomically
    from mpqc.report.html import render_html
    from mpqc.report.markdown import render_report
    from mpqc.report.record import BuildRecord

    folder = pathlib.Path(args.build)
    record = BuildRecord.load(folder / "build.json")
    write_atomically(folder / "report.md", render_report(record))
    write_atomically(folder / "report.html", render_html(record))
    return {"out": str(folder), "reports": [str(folder / "report.md"), str(folder / "report.html")],
            "_text": f"rendered {folder / 'report.md'}, {folder / 'report.html'}"}


def cmd_bench(args) -> dict:
    from mpqc.backends.base import backend_for
    from mpqc.bench.inputs import synthetic_feeds
    from mpqc.bench.latency import first_batch, measure_latency
    from mpqc.data.feeds import check_feeds, load_npz
    from mpqc.frontend.onnx_file import load_onnx_file
    from mpqc.targets import load_target

    target = load_target(args.target)
    if not pathlib.Path(args.model).is_file() and not args.model.endswith(".onnx"):
        raise MpqcError(f"bench times an .onnx file, and '{args.model}' is none; build it first "
                        f"(mpqc build {args.model} --out DIR) and bench DIR/model.qdq.onnx")
    model = load_onnx_file(args.model)
    if args.data:
        feeds = first_batch(check_feeds(load_npz(args.data), model, args.data), args.batch)
    else:
        feeds = synthetic_feeds(model, args.batch)
    stats = measure_latency(backend_for(target).load(model.SerializeToString(), target), feeds, args.warmup, args.runs)
    result = {"model": args.model, "target": target.name, "latency": stats.to_json()}
    result["_text"] = (
        f"{args.model} on {target.name} (batch {stats.batch}, {stats.threads} threads, {stats.runs} runs): "
        f"p50 {stats.median_ms:.3f} ms, p90 {stats.p90_ms:.3f} ms, p99 {stats.p99_ms:.3f} ms, "
        f"{stats.throughput_per_s:.1f} samples/s"
    )
    return result


def cmd_inspect(args) -> dict:
    from mpqc.passes.analysis import analyze
    from mpqc.targets import load_target

    target = load_target(args.target)
    analysis = analyze(args.model)
    rows = analysis.describe_layers(target)
    lines = [f"{args.model}: {len(rows)} quantizable layers, {len(analysis.ties)} tie groups (target {target.name})"]
    for row in rows:
        module = f" <- {row['torch_module']}" if row["torch_module"] else ""
        lines.append(f"  {row['name']:<40} {row['op_type']:<6} {row['signature']['key']}  deploy: {'/'.join(row['deploy'])}{module}")
    for group in analysis.ties:
        lines.append(f"  tied: {', '.join(group)}")
    return {"model": args.model, "target": target.name, "layers": rows, "ties": [list(g) for g in analysis.ties], "_text": "\n".join(lines)}


def cmd_check(args) -> dict:
    """TensorRT's explicit-quantization rules on any QDQ model, without TensorRT: exit 1 on a violation."""
    from mpqc.backends.base import backend_for
    from mpqc.frontend.onnx_file import check_valid, read_onnx_file
    from mpqc.targets import load_target

    target = load_target(args.target)
    backend = backend_for(target)
    if not backend.has_rules:
        raise MpqcError(f"target '{target.name}' runs on {target.backend}; check takes a TensorRT target (trt-a100, trt-orin)")
    model = read_onnx_file(args.model)
    check_valid(model, args.model)
    plugin = target.plugins.int4_conv
    violations = backend.violations(model, target)
    if violations:
        text = [f"{args.model} breaks {len(violations)} TensorRT rule(s) for target {target.name}:"]
        text += [f"  {violation}" for violation in violations]
        built_for = _built_for(pathlib.Path(args.model))
        if built_for is not None and built_for != target.name:
            text.append(f"hint: this model was built for target '{built_for}', whose lowering is not TensorRT's; "
                        f"check the model of `mpqc build MODEL --target {target.name}` instead")
    else:
        text = [f"{args.model} follows TensorRT's explicit-quantization rules for target {target.name}"]
    return {"model": args.model, "target": target.name, "int4_conv_plugin": plugin,
            "violations": [dataclasses.asdict(v) for v in violations], "_text": "\n".join(text),
            "_exit": 1 if violations else 0}


def _built_for(model: pathlib.Path) -> str | None:
    """The target an mpqc build folder's model was built for, from the build.json beside it."""
    try:
        return json.loads((model.parent / "build.json").read_text())["target"]["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not an mpqc build folder: no hint


def cmd_profile(args) -> dict:
    from mpqc.pipeline.profile import profile_target
    from mpqc.progress import shown as progress_shown

    target, result = profile_target(args.model, args.target, args.proxy, args.batch, args.tables,
                                    shapes=dict(args.shape), fit_policies=args.fit_policies, force=args.force,
                                    progress=progress_shown(), force_fit=args.force_fit)
    counts, fit = result["layers"], result["fit"]
    result["_text"] = (
        f"profiled {args.model} on {target.name} ({target.backend}, batch {args.batch}): {counts['distinct']} layer measurements, "
        f"{counts['measured']} new, {counts['reused']} reused\n"
        f"  boundary ms per edge (float->float, float->int8, int8->float, int8->int8): "
        + ", ".join(f"{fit['boundary_ms'].get(kind, 0.0):.4f}" for kind in ("00", "01", "10", "11"))
        + f"; overhead {fit['overhead_ms']:.3f} ms; fit rms residual {fit['fit_rms_residual_ms']:.3f} ms"
        + (f" ({fit['fit_rms_relative_residual']:.1%}, noise floor {fit['noise_floor']:.1%})" if fit.get("noise_floor") is not None else "")
        + (f"\n  WRITTEN WITH --force-fit: {fit['forced']}" if fit.get("forced") else "") + "\n"
        f"  table: {result['table']}"
    )
    return result


def cmd_validate(args) -> dict:
    from mpqc.pipeline.validate import validate_to_folder

    out = pathlib.Path(args.out).resolve()
    result = validate_to_folder(args.model, args.target, args.proxy, args.batch, args.tables, out, dict(args.shape),
                                policies=args.policies,
                                runs=args.runs, noise_repeats=args.noise_repeats)
    p, b = result["prediction"], result["bitops"]
    text = (
        f"{args.model} on {result['target']}, batch {args.batch}, {result['policies']} policies: "
        f"{p['within_10pct']:.0%} within ±10% ({p['within_5pct']:.0%} within ±5%), Kendall tau {p['kendall_tau']:.3f}, "
        f"Spearman {p['spearman_rho']:.3f}; BitOps tau {b['kendall_tau']:.3f}; "
        f"noise floor (even vs odd rounds' medians) {result['noise_floor']['noise_floor']:.1%} over "
        f"{result['noise_floor']['rounds']} interleaved rounds, "
        f"repeat-measurement tau {result['noise_floor']['repeat_agreement']['kendall_tau']:.3f}\n"
        + "".join(f"  FLAGGED: {problem}\n" for problem in result["flagged"])
        + f"  {out / 'validation.json'}, {out / 'validation.png'}"
    )
    return {"out": str(out), "validation": {k: v for k, v in result.items() if k != "rows"}, "_text": text}


def cmd_search_validate(args) -> dict:
    from mpqc.pipeline.options import BuildOptions
    from mpqc.pipeline.search_validate import validate_search_to_folder

    out = pathlib.Path(args.out).resolve()
    options = BuildOptions(model=args.model, target=args.target, policy="search", proxy=args.proxy, proxy_limit=args.proxy_limit,
                           seed=args.seed, iterations=args.iterations, epochs=args.epochs, gmpq=args.gmpq,
                           fixed_ends=args.fixed_ends,
                           cache_dir=args.cache_dir, use_cache=not args.no_cache)
    result = validate_search_to_folder(options, list(dict.fromkeys(args.method)), out, policies=args.policies,
                                       bootstrap=args.bootstrap)
    lines = [f"{args.model} on {result['target']}: {result['random_policies']} random policies, fidelity "
             f"{result['fidelity_data']['metric']} on {result['fidelity_data']['samples']} samples ({result['fidelity_data']['data']})"]
    for method, r in result["methods"].items():
        if "refused" in r:
            lines.append(f"  {method}: refused: {r['refused']}")
            continue
        low, high = r["kendall_tau_interval"]
        budgets = ", ".join(f"p{b['quartile']} BitOps: {b['percentile_among_random']:.0f}th percentile" if "percentile_among_random" in b
                            else f"p{b['quartile']} BitOps: {b['error']}" for b in r["at_budgets"])
        lines.append(f"  {method}: Kendall tau (loss vs error) {r['kendall_tau_loss_vs_error']:.3f} [{low:.3f}, {high:.3f}]; "
                     f"{budgets}; scoring {r['scoring_s']:.1f} s")
    lines.append(f"  {out / 'search_validation.json'}")
    return {"out": str(out), "validation": {k: v for k, v in result.items() if k != "rows"}, "_text": "\n".join(lines)}


def cmd_compare(args) -> dict:
    """Each quantized layer's output against FP32, worst first; --keep-float K: what keeping the worst K float gains."""
    from mpqc.pipeline.compare import compare
    from mpqc.report.comparison import render_comparison

    result = compare(pathlib.Path(args.build), args.proxy, args.keep_float)
    return result | {"_text": render_comparison(result)}


def _add_build_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="bundled example name, model.onnx, or package.module:factory")
    parser.add_argument("--target", default="ort-cpu", help="target name or .toml path (default: ort-cpu)")
    parser.add_argument("--out", required=True, help="output folder (written atomically)")
    parser.add_argument("--proxy", help="proxy data .npz keyed by input name (bundled examples bring their own)")
    parser.add_argument("--proxy-limit", type=_int_range(1, 10**9), help="use only the first N proxy samples")
    parser.add_argument("--calibration", default="minmax", choices=["minmax", "mse", "percentile"],
                        help="activation ranges: minmax (the default), mse (least expected 8-bit error) or percentile")
    parser.add_argument("--percentile", type=_float_range(50.0, 100.0), default=99.99,
                        help="--calibration percentile: the activation percentile kept, in [50, 100]")
    parser.add_argument("--seed", type=_int_range(0, 2**32 - 1), default=0)
    parser.add_argument("--evaluate-only", action="store_true", help="allow precisions the target can evaluate but not deploy")
    parser.add_argument("--no-bias-correction", action="store_true", help="keep biases as trained (default: correct the mean error of rounded weights)")
    from mpqc.sensitivity.defaults import INDICATOR_ITERATIONS
    from mpqc.sensitivity.methods import METHODS

    parser.add_argument("--method", choices=list(METHODS),
                        help="sensitivity for --policy search (default: output)")
    parser.add_argument("--iterations", type=_int_range(0, 1_000_000),
                        help=f"indicator training iterations (seam, limpq, asga; default {INDICATOR_ITERATIONS}, whatever the proxy's size)")
    parser.add_argument("--epochs", type=_int_range(0, 10_000), help="indicator training passes over the proxy data instead of --iterations")
    parser.add_argument("--gmpq", action="store_true", help="add GMPQ's attribution-imitation term to indicator training")
    parser.add_argument("--fixed-ends", action="store_true",
                        help="limpq, seam, asga: hold the first and the last layer at their 8-bit precision, as LIMPQ does")
    parser.add_argument("--seam-terms", nargs=3, type=_float_range(0.0, 1e6), metavar=("MARGIN", "COMPACTNESS", "MARGIN_WEIGHT"),
                        help="seam's margin (nats) and the weights of its compactness and margin-softmax terms "
                             "(default 1 1 1; MARGIN 0 0 trains without them, limpq's loss)")
    parser.add_argument("--budget-ms", type=_float_range(0.0, 1e9, low_open=True), help="latency budget on the target, from its measured table")
    parser.add_argument("--budget-speedup", type=_float_range(0.0, 1000.0, low_open=True),
                        help="latency budget as a speed-up over the FP32 model measured on this machine (e.g. 1.3)")
    parser.add_argument("--budget-bitops", type=_float_range(0.0, 1e30, low_open=True), help="BitOps budget (MACs x weight bits x activation bits)")
    parser.add_argument("--budget-bytes", type=_float_range(0.0, 1e15, low_open=True), help="weight size budget in bytes")
    parser.add_argument("--tables", help="folder of latency tables, read and written "
                             "(default: $MPQC_TABLES/TARGET or ~/.cache/mpqc/tables/TARGET, and tables shipped beside the target file)")
    parser.add_argument("--no-measure", action="store_true", help="skip latency and fidelity measurement")
    parser.add_argument("--metric", metavar="MODULE:FUNCTION",
                        help="your own fidelity evaluator: FUNCTION(reference, candidate, labels) -> {name: number}, "
                             "on the first output of the FP32 and the built model")
    parser.add_argument("--cache-dir", help="sensitivity score cache for --policy search (default: $XDG_CACHE_HOME/mpqc or ~/.cache/mpqc)")
    parser.add_argument("--no-cache", action="store_true", help="score layers afresh and write nothing to the cache")
    _add_timing_arguments(parser)


def _add_timing_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=_int_range(1, MAX_BATCH), default=1, help="samples per timed run")
    parser.add_argument("--runs", type=_int_range(1, MAX_RUNS), default=100, help="timed runs")
    parser.add_argument("--warmup", type=_int_range(0, MAX_RUNS), default=10, help="untimed runs first")


def _add_costmodel_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="bundled example name, model.onnx, or package.module:factory")
    parser.add_argument("--target", default="ort-cpu")
    parser.add_argument("--batch", type=_int_range(1, MAX_BATCH), default=1)
    parser.add_argument("--proxy", help="calibration data .npz (default: the example's, or synthetic); "
                                         "its arrays also fix an input's symbolic dimensions")
    parser.add_argument("--shape", action="append", type=_shape, default=[], metavar="NAME:DIMS",
                        help="fix a symbolic input's dimensions, e.g. input:1x3x224x224 (the first stays the batch)")
    parser.add_argument("--tables", help="folder of latency tables, read and written "
                             "(default: $MPQC_TABLES/TARGET or ~/.cache/mpqc/tables/TARGET, and tables shipped beside the target file)")


# Bounds of the timing options: more runs or a larger batch than this is a typo, not a measurement,
# and would hang or allocate without end.
MAX_RUNS = 100_000
MAX_BATCH = 4096


class _Parser(argparse.ArgumentParser):
    """argparse with mpqc's error form: one line, `mpqc: error: ...`, status 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        command = self.prog.removeprefix("mpqc").strip()
        self.exit(2, f"mpqc: error: {command + ': ' if command else ''}{message}; see '{self.prog} --help'\n")


def _int_range(low: int, high: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside {low}..{high}")
        return value

    return parse


def _float_range(low: float, high: float, low_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
        if not (low < value if low_open else low <= value) or not value <= high:  # NaN fails both
            raise argparse.ArgumentTypeError(f"{text} is outside {'(' if low_open else '['}{low:g}, {high:g}]")
        return value

    return parse


def _shape(text: str) -> tuple[str, tuple[int, ...]]:
    from mpqc.frontend.shapes import parse_shape

    try:
        return parse_shape(text)
    except MpqcError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mpqc", description="mixed-precision quantization compiler")
    sub = parser.add_subparsers(dest="command", required=True)

    build = sub.add_parser("build", help="choose a policy, lower it, write and measure the artifacts")
    _add_build_arguments(build)
    build.add_argument("--policy", default="uniform:w8a8", help="uniform:<precision>, policy.json, or search (with a --budget-*)")
    build.add_argument("--pareto", choices=["ms", "bitops", "bytes"],
                       help="with --policy search: also write pareto.json/.png, loss vs this resource, and build the front's middle point")
    build.set_defaults(handler=cmd_build)

    export = sub.add_parser("export", help="lower a saved policy without searching (same bytes as the build)")
    _add_build_arguments(export)
    export.add_argument("--policy", required=True, help="policy.json from an earlier build")
    export.set_defaults(handler=cmd_export)  # the same build, with a policy file instead of a search

    bench = sub.add_parser("bench", help="latency percentiles and throughput of an ONNX model on a target")
    bench.add_argument("model", help="model .onnx")
    bench.add_argument("--target", default="ort-cpu")
    bench.add_argument("--data", help="inputs .npz (default: fixed-seed synthetic inputs)")
    _add_timing_arguments(bench)
    bench.set_defaults(handler=cmd_bench)

    inspect = sub.add_parser("inspect", help="list quantizable layers, signatures and tie groups")
    inspect.add_argument("model")
    inspect.add_argument("--target", default="ort-cpu")
    inspect.set_defaults(handler=cmd_inspect)

    profile = sub.add_parser("profile", help="measure per-layer latency tables for a model on a target")
    _add_costmodel_arguments(profile)
    profile.add_argument("--force", action="store_true", help="measure again what the table already has")
    profile.add_argument("--fit-policies", type=_int_range(0, 1000), default=12, help="random policies measured to fit boundary terms")
    profile.add_argument("--force-fit", action="store_true",
                         help="fit again, and write the fit even when the measurements do not support it (a noisy machine)")
    profile.set_defaults(handler=cmd_profile)

    check = sub.add_parser("check", help="check a QDQ model against TensorRT's explicit-quantization rules (no TensorRT needed)")
    check.add_argument("model", help="model .onnx")
    check.add_argument("--target", default="trt-a100", help="a TensorRT target: its INT4 conv plugin makes INT4 Conv weights legal")
    check.set_defaults(handler=cmd_check)

    report = sub.add_parser("report", help="re-render a build's report.md from its build.json")
    report.add_argument("build", metavar="DIR", help="a folder written by mpqc build or export")
    report.set_defaults(handler=cmd_report)

    compare = sub.add_parser("compare", help="each quantized layer's output against FP32, worst first (Polygraphy-style)")
    compare.add_argument("build", metavar="BUILD_DIR", help="a folder written by mpqc build or export")
    compare.add_argument("--proxy", help="inputs .npz to compare layers on (default: the example's held-out set, "
                                         "else the build's proxy data)")
    compare.add_argument("--keep-float", type=_int_range(1, 10_000), metavar="K",
                         help="lower the policy with each of the worst K layers kept fp32, then all K, and measure the fidelity gained")
    compare.set_defaults(handler=cmd_compare)

    costmodel = sub.add_parser("costmodel", help="cost-model tools").add_subparsers(dest="costmodel_command", required=True)
    validate = costmodel.add_parser("validate", help="predicted vs measured latency over random policies")
    _add_costmodel_arguments(validate)
    validate.add_argument("--policies", type=_int_range(1, 10_000), default=30, help="random mixed policies measured")
    validate.add_argument("--runs", type=_int_range(1, MAX_RUNS), default=50, help="timed runs per measurement")
    validate.add_argument("--noise-repeats", type=_int_range(2, 100), default=5, help="repeated measurements for the noise floor")
    validate.add_argument("--out", required=True, help="folder for validation.json and validation.png")
    validate.set_defaults(handler=cmd_validate)

    search = sub.add_parser("search", help="search tools").add_subparsers(dest="search_command", required=True)
    search_validate = search.add_parser("validate", help="a method's predicted loss against measured fidelity over random policies")
    search_validate.add_argument("model", help="bundled example name, model.onnx, or package.module:factory")
    search_validate.add_argument("--target", default="ort-cpu")
    search_validate.add_argument("--out", required=True, help="folder for search_validation.json")
    search_validate.add_argument("--proxy", help="proxy data .npz keyed by input name (bundled examples bring their own)")
    search_validate.add_argument("--proxy-limit", type=_int_range(1, 10**9), help="use only the first N proxy samples")
    from mpqc.sensitivity.defaults import INDICATOR_ITERATIONS
    from mpqc.sensitivity.methods import METHODS

    search_validate.add_argument("--method", action="append", choices=list(METHODS), required=True,
                                 help="a method to validate; repeat it to validate several on the same random policies")
    search_validate.add_argument("--policies", type=_int_range(2, 100_000), default=100, help="random policies measured")
    search_validate.add_argument("--bootstrap", type=_int_range(10, 100_000), default=1000, help="bootstrap resamples for the intervals")
    search_validate.add_argument("--seed", type=_int_range(0, 2**32 - 1), default=0)
    search_validate.add_argument("--iterations", type=_int_range(0, 1_000_000),
                                 help=f"indicator training iterations (seam, limpq, asga; default {INDICATOR_ITERATIONS})")
    search_validate.add_argument("--epochs", type=_int_range(0, 10_000), help="indicator training passes instead of --iterations")
    search_validate.add_argument("--gmpq", action="store_true", help="add GMPQ's attribution-imitation term to indicator training")
    search_validate.add_argument("--fixed-ends", action="store_true",
                                 help="limpq, seam, asga: hold the first and the last layer at their 8-bit precision, as LIMPQ does")
    search_validate.add_argument("--cache-dir", help="sensitivity score cache (default: $XDG_CACHE_HOME/mpqc or ~/.cache/mpqc)")
    search_validate.add_argument("--no-cache", action="store_true", help="score layers afresh and write nothing to the cache")
    search_validate.set_defaults(handler=cmd_search_validate)

    for command in (build, export, bench, inspect, check, profile, report, compare, validate, search_validate):
        command.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        return _run(argv)
    except KeyboardInterrupt:
        return _interrupted()
    except BrokenPipeError:
        return _reader_left()


def _run(argv: list[str] | None) -> int:
    try:
        args = make_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse printed as one line
        return exc.code if isinstance(exc.code, int) else 2
    from mpqc import progress

    progress.set_quiet(getattr(args, "json", False))  # JSON output stays the only thing printed
    try:
        result = args.handler(args)
    except MpqcError as exc:
        if _interrupted_inside(exc):  # a library turned Ctrl-C into an error of its own
            return _interrupted()
        if getattr(args, "json", False):
            print(json.dumps({"error": str(exc)}))
        print(f"mpqc: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (KeyboardInterrupt, BrokenPipeError):
        raise
    except Exception as exc:  # a bug, not a user error: one line, and the traceback where asked for
        if _interrupted_inside(exc):
            return _interrupted()
        if os.environ.get("MPQC_DEBUG"):
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"mpqc: internal error: {type(exc).__name__}: {message}; rerun with MPQC_DEBUG=1 for the traceback "
              "and report it", file=sys.stderr)
        return 70  # EX_SOFTWARE
    text, status = result.pop("_text"), result.pop("_exit", 0)
    print(json.dumps(result, indent=None if args.json else 2) if args.json else text)
    sys.stdout.flush()  # a closed pipe shows here, inside main, not at interpreter exit
    return status


def _interrupted_inside(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _interrupted() -> int:
    print("mpqc: interrupted", file=sys.stderr)
    return 130


def _reader_left() -> int:
    """The reader of stdout went away (`mpqc inspect m.onnx | head -1`): stop quietly."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # Python's own flush at exit must not fail again
    return 0


def entry() -> None:
    """The `mpqc` command: main(), then exit with its status."""
    status = main()
    # Everything is written: a Ctrl-C from here on has nothing left to stop. Python would still
    # turn one seen during the run (a library may re-arm it) or during interpreter shutdown into a
    # death by SIGINT; leaving at once keeps the status main() chose.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a reader that left: nothing to flush to
    os._exit(status)


if __name__ == "__main__":
    entry()
