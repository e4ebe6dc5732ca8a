"""Render a build record as a Markdown report. Numbers are read from the record, never computed here."""

from __future__ import annotations

from mpqc.report.record import BuildRecord


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _cell(text: str) -> str:
    """A table cell's text: GitHub-flavoured Markdown ends a cell at any unescaped |, inside code too."""
    return text.replace("|", "\\|")


def render_report(build: BuildRecord) -> str:
    record = build.to_json()
    lines = [
        f"# mpqc build: {record['model']['spec']} on {record['target']['name']}",
        "",
        f"- policy: `{record['policy']['source']}` — "
        + ", ".join(f"{n} x {p}" for p, n in record["policy"]["counts"].items()),
        f"- calibration: {record['calibration']['method']} on {record['proxy']['samples']} samples from `{record['proxy']['origin']}`",
        f"- onnxruntime {record['versions']['onnxruntime']}, {record['machine']['cpu']}",
        "",
    ]
    measured = record.get("measured")
    if record.get("not_measured"):
        lines += [f"Not measured: {record['not_measured']}", ""]
    if measured and "latency_built" in measured:  # absent for a build for another runtime: numerics only
        fp32, built = measured["latency_fp32"], measured["latency_built"]
        lines += [
            f"## Latency (batch {built['batch']}, {built['threads']} threads, median of {built['runs']} runs)",
            "",
            "| model | p50 ms | p90 ms | p99 ms | throughput /s |",
            "|---|---|---|---|---|",
        ]
        for name, stats in (("fp32", fp32), ("built", built)):
            lines.append(
                f"| {name} | {stats['median_ms']:.3f} | {stats['p90_ms']:.3f} | {stats['p99_ms']:.3f} | {stats['throughput_per_s']:.1f} |"
            )
        lines += ["", f"Speed-up of the built model: {measured['speedup']:.2f}x", ""]
    if measured:
        lines += ["## Fidelity vs FP32", ""]
        if "fidelity_runtime" in measured:
            lines += [f"Run with {measured['fidelity_runtime']}.", ""]
        lines += [f"- {key}: {_fmt(value)}" for key, value in measured["fidelity"].items()]
        lines.append("")
    lines += ["## Layers", "", "| layer | op | torch module | precision | signature |", "|---|---|---|---|---|"]
    for row in record["layers"]:
        lines.append(
            f"| {row['name']} | {row['op_type']} | {row['torch_module'] or '-'} | {row['precision']} | `{_cell(row['signature']['key'])}` |"
        )
    if record["ties"]:
        lines += ["", "## Tie groups (one precision each)", ""]
        lines += [f"- {', '.join(group)}" for group in record["ties"]]
    return "\n".join(lines) + "\n"
