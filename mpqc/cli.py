"""The `mpqc` command: build, export, bench, inspect."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from mpqc.errors import MpqcError


def _build_options(args, policy: str):
    from mpqc.build import BuildOptions

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
        measure=not args.no_measure,
        batch=args.batch,
        runs=args.runs,
        warmup=args.warmup,
    )


def _summary(record: dict, out: pathlib.Path) -> str:
    lines = [f"built {record['model']['spec']} for {record['target']['name']} -> {out}",
             "  policy: " + ", ".join(f"{n} x {p}" for p, n in record["policy"]["counts"].items())]
    measured = record.get("measured")
    if measured:
        fp32, built = measured["latency_fp32"], measured["latency_built"]
        lines.append(
            f"  latency (batch {built['batch']}, {built['threads']} threads, median of {built['runs']}): "
            f"fp32 {fp32['median_ms']:.3f} ms, built {built['median_ms']:.3f} ms ({measured['speedup']:.2f}x)"
        )
        shown = {k: v for k, v in measured["fidelity"].items() if isinstance(v, float)}
        lines.append("  fidelity vs fp32: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))
    lines.append(f"  artifacts: {out / 'model.qdq.onnx'}, {out / 'policy.json'}, {out / 'build.json'}, {out / 'report.md'}")
    return "\n".join(lines)


def cmd_build(args) -> dict:
    from mpqc.build import build

    out = pathlib.Path(args.out)
    record = build(_build_options(args, args.policy), out)
    return {"out": str(out), "build": record, "_text": _summary(record, out)}


def cmd_export(args) -> dict:
    from mpqc.build import build

    out = pathlib.Path(args.out)
    record = build(_build_options(args, args.policy), out)
    return {"out": str(out), "build": record, "_text": _summary(record, out)}


def cmd_bench(args) -> dict:
    from mpqc.backends.ort_runner import OrtRunner
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
    stats = measure_latency(OrtRunner(model.SerializeToString(), target), feeds, args.warmup, args.runs)
    result = {"model": args.model, "target": target.name, "latency": stats.to_json()}
    result["_text"] = (
        f"{args.model} on {target.name} (batch {stats.batch}, {stats.threads} threads, {stats.runs} runs): "
        f"p50 {stats.median_ms:.3f} ms, p90 {stats.p90_ms:.3f} ms, p99 {stats.p99_ms:.3f} ms, "
        f"{stats.throughput_per_s:.1f} samples/s"
    )
    return result


def cmd_inspect(args) -> dict:
    from mpqc.build import analyze
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
    parser.add_argument("--no-measure", action="store_true", help="skip latency and fidelity measurement")
    _add_timing_arguments(parser)


def _add_timing_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mpqc", description="mixed-precision quantization compiler")
    sub = parser.add_subparsers(dest="command", required=True)

    build = sub.add_parser("build", help="choose a policy, lower it, write and measure the artifacts")
    _add_build_arguments(build)
    build.add_argument("--policy", default="uniform:w8a8", help="uniform:<precision> or policy.json")
    build.set_defaults(handler=cmd_build)

    export = sub.add_parser("export", help="lower a saved policy without searching (same bytes as the build)")
    _add_build_arguments(export)
    export.add_argument("--policy", required=True, help="policy.json from an earlier build")
    export.set_defaults(handler=cmd_export)

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

    for command in (build, export, bench, inspect):
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
    text = result.pop("_text")
    print(json.dumps(result, indent=None if args.json else 2) if args.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
