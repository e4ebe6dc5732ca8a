"""The `mpqc` command: argument parsing and printing; the drivers in mpqc.pipeline do the work."""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
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
        epochs=args.epochs,
        gmpq=args.gmpq,
        budget_ms=args.budget_ms,
        budget_bitops=args.budget_bitops,
        budget_bytes=args.budget_bytes,
        tables=args.tables,
        pareto=getattr(args, "pareto", None),  # build only: export never searches
        cache_dir=args.cache_dir,
        use_cache=not args.no_cache,
        measure=not args.no_measure,
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
        lines.append(f"  latency budget {search['budgets']['ms']:.3f} ms: predicted {search['predicted_ms']:.3f} ms, {verdict}")
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
    lines.append(f"  artifacts: {out / 'model.qdq.onnx'}, {out / 'policy.json'}, {out / 'build.json'}, {out / 'report.md'}")
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
    """Re-render a build's report.md from its build.json."""
    from mpqc.files import write_atomically
    from mpqc.report.markdown import render_report
    from mpqc.report.record import BuildRecord

    folder = pathlib.Path(args.build)
    record = BuildRecord.load(folder / "build.json")
    write_atomically(folder / "report.md", render_report(record))
    return {"out": str(folder), "report": str(folder / "report.md"), "_text": f"rendered {folder / 'report.md'}"}


def cmd_bench(args) -> dict:
    from mpqc.backends.base import backend_for
    from mpqc.bench.inputs import synthetic_feeds
    from mpqc.bench.latency import first_batch, measure_latency
    from mpqc.data.feeds import check_feeds, load_npz
    from mpqc.frontend.onnx_file import load_onnx_file
    from mpqc.targets import load_target

    target = load_target(args.target)
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
    else:
        text = [f"{args.model} follows TensorRT's explicit-quantization rules for target {target.name}"]
    return {"model": args.model, "target": target.name, "int4_conv_plugin": plugin,
            "violations": [dataclasses.asdict(v) for v in violations], "_text": "\n".join(text),
            "_exit": 1 if violations else 0}


def cmd_profile(args) -> dict:
    from mpqc.pipeline.profile import profile_target

    target, result = profile_target(args.model, args.target, args.proxy, args.batch, args.tables,
                                    fit_policies=args.fit_policies, force=args.force, progress=not args.json)
    counts, fit = result["layers"], result["fit"]
    result["_text"] = (
        f"profiled {args.model} on {target.name} ({target.backend}, batch {args.batch}): {counts['distinct']} layer measurements, "
        f"{counts['measured']} new, {counts['reused']} reused\n"
        f"  boundary ms per edge (float->int8, int8->float, int8->int8): "
        f"{fit['boundary_ms']['01']:.4f}, {fit['boundary_ms']['10']:.4f}, {fit['boundary_ms']['11']:.4f}; "
        f"overhead {fit['overhead_ms']:.3f} ms; fit rms residual {fit['fit_rms_residual_ms']:.3f} ms\n"
        f"  table: {result['table']}"
    )
    return result


def cmd_validate(args) -> dict:
    from mpqc.pipeline.validate import validate_to_folder

    out = pathlib.Path(args.out).resolve()
    result = validate_to_folder(args.model, args.target, args.proxy, args.batch, args.tables, out, policies=args.policies,
                                runs=args.runs, noise_repeats=args.noise_repeats)
    p, b = result["prediction"], result["bitops"]
    text = (
        f"{args.model} on {result['target']}, batch {args.batch}, {result['policies']} policies: "
        f"{p['within_10pct']:.0%} within ±10% ({p['within_5pct']:.0%} within ±5%), Kendall tau {p['kendall_tau']:.3f}, "
        f"Spearman {p['spearman_rho']:.3f}; BitOps tau {b['kendall_tau']:.3f}; "
        f"noise floor (range of repeated medians) {result['noise_floor']['max_relative_range']:.1%}, "
        f"repeat-measurement tau {result['noise_floor']['repeat_agreement']['kendall_tau']:.3f}\n"
        f"  {out / 'validation.json'}, {out / 'validation.png'}"
    )
    return {"out": str(out), "validation": {k: v for k, v in result.items() if k != "rows"}, "_text": text}


def _add_build_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="bundled example name, model.onnx, or package.module:factory")
    parser.add_argument("--target", default="ort-cpu", help="target name or .toml path (default: ort-cpu)")
    parser.add_argument("--out", required=True, help="output folder (written atomically)")
    parser.add_argument("--proxy", help="proxy data .npz keyed by input name (bundled examples bring their own)")
    parser.add_argument("--proxy-limit", type=int, help="use only the first N proxy samples")
    parser.add_argument("--calibration", default="minmax", choices=["minmax", "percentile"])
    parser.add_argument("--percentile", type=float, default=99.99)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--evaluate-only", action="store_true", help="allow precisions the target can evaluate but not deploy")
    parser.add_argument("--no-bias-correction", action="store_true", help="keep biases as trained (default: correct the mean error of rounded weights)")
    from mpqc.sensitivity.methods import METHODS

    parser.add_argument("--method", choices=list(METHODS),
                        help="sensitivity for --policy search (default: seam for torch classifiers, else qerror)")
    parser.add_argument("--epochs", type=int, default=3, help="indicator training passes over the proxy data (seam, limpq)")
    parser.add_argument("--gmpq", action="store_true", help="add GMPQ's attribution-imitation term to indicator training")
    parser.add_argument("--budget-ms", type=float, help="latency budget on the target, from its measured table")
    parser.add_argument("--budget-bitops", type=float, help="BitOps budget (MACs x weight bits x activation bits)")
    parser.add_argument("--budget-bytes", type=float, help="weight size budget in bytes")
    parser.add_argument("--tables", help="folder of latency tables (default: beside the target file)")
    parser.add_argument("--no-measure", action="store_true", help="skip latency and fidelity measurement")
    parser.add_argument("--cache-dir", help="sensitivity score cache for --policy search (default: $XDG_CACHE_HOME/mpqc or ~/.cache/mpqc)")
    parser.add_argument("--no-cache", action="store_true", help="score layers afresh and write nothing to the cache")
    _add_timing_arguments(parser)


def _add_timing_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)


def _add_costmodel_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="bundled example name, model.onnx, or package.module:factory")
    parser.add_argument("--target", default="ort-cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--proxy", help="calibration data .npz (default: the example's, or synthetic)")
    parser.add_argument("--tables", help="folder of latency tables (default: beside the target file)")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mpqc", description="mixed-precision quantization compiler")
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
    profile.add_argument("--fit-policies", type=int, default=12, help="random policies measured to fit boundary terms")
    profile.set_defaults(handler=cmd_profile)

    check = sub.add_parser("check", help="check a QDQ model against TensorRT's explicit-quantization rules (no TensorRT needed)")
    check.add_argument("model", help="model .onnx")
    check.add_argument("--target", default="trt-a100", help="a TensorRT target: its INT4 conv plugin makes INT4 Conv weights legal")
    check.set_defaults(handler=cmd_check)

    report = sub.add_parser("report", help="re-render a build's report.md from its build.json")
    report.add_argument("build", metavar="DIR", help="a folder written by mpqc build or export")
    report.set_defaults(handler=cmd_report)

    costmodel = sub.add_parser("costmodel", help="cost-model tools").add_subparsers(dest="costmodel_command", required=True)
    validate = costmodel.add_parser("validate", help="predicted vs measured latency over random policies")
    _add_costmodel_arguments(validate)
    validate.add_argument("--policies", type=int, default=30)
    validate.add_argument("--runs", type=int, default=50)
    validate.add_argument("--noise-repeats", type=int, default=5)
    validate.add_argument("--out", required=True, help="folder for validation.json and validation.png")
    validate.set_defaults(handler=cmd_validate)

    for command in (build, export, bench, inspect, check, profile, report, validate):
        command.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        result = args.handler(args)
    except MpqcError as exc:
        if getattr(args, "json", False):
            print(json.dumps({"error": str(exc)}))
        print(f"mpqc: error: {exc}", file=sys.stderr)
        return exc.exit_code
    text, status = result.pop("_text"), result.pop("_exit", 0)
    print(json.dumps(result, indent=None if args.json else 2) if args.json else text)
    return status


if __name__ == "__main__":
    sys.exit(main())
