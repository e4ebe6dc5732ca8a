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
    lines += _search_lines(record.get("search"))
    lines += ["## Layers", "", "| layer | op | torch module | precision | signature |", "|---|---|---|---|---|"]
    for row in record["layers"]:
        lines.append(
            f"| {row['name']} | {row['op_type']} | {row['torch_module'] or '-'} | {row['precision']} | `{_cell(row['signature']['key'])}` |"
        )
    if record["ties"]:
        lines += ["", "## Tie groups (one precision each)", ""]
        lines += [f"- {', '.join(group)}" for group in record["ties"]]
    return "\n".join(lines) + "\n"


def _search_lines(search: dict | None) -> list[str]:
    if not search:
        return []
    budgets = ", ".join(f"{name} {value:g}" for name, value in search["budgets"].items() if value is not None) or "none (Pareto sweep)"
    lines = ["## Search", "", f"- method: {search['method']}" + (" (scores from the cache)" if search.get("scores_cached") else ""),
             f"- budgets: {budgets}", f"- predicted loss: {_fmt(search['objective'])}"]
    lines += _scoring_lines(search.get("scoring") or {})
    if search.get("predicted_ms") is not None:
        lines.append(f"- predicted latency: {search['predicted_ms']:.3f} ms")
    if "measured_ms" in search:
        lines.append(f"- measured latency: {search['measured_ms']:.3f} ms, budget {'met' if search['budget_met'] else 'MISSED'}")
    if search.get("verification"):
        lines.append(f"- budget verification: {search['verification']}")
    summary = search.get("measured_points")
    if summary:
        lines += ["", f"Measured points (timed in the same rounds; fidelity is {summary['metric']} against FP32). "
                      f"Built: {summary['built']}, {summary['why']}.", "",
                  "| policy | predicted ms | measured ms | fidelity | on the measured front |", "|---|---|---|---|---|"]
        for point in summary["points"]:
            predicted = "-" if point["predicted_ms"] is None else f"{point['predicted_ms']:.3f}"
            lines.append(f"| {point['source']} | {predicted} | {point['measured_ms']:.3f} | {point['fidelity']:.4f} | "
                         f"{'yes' if point['on_measured_front'] else 'no'} |")
        if summary.get("prediction_check", {}).get("note"):
            lines += ["", f"Note: {summary['prediction_check']['note']}."]
    return lines + [""]


def _scoring_lines(scoring: dict) -> list[str]:
    """How the scores were got: a trained method's iterations and how far its steps moved (asga: its
    surrogate gap), HAWQ's Hutchinson iterations."""
    lines = []
    convergence = scoring.get("convergence")
    if "iterations" in scoring:
        stopped = (f"converged at iteration {convergence['iteration']}" if convergence and convergence["converged"]
                   else "not converged")
        budget = f" of a budget of {convergence['budget']}" if convergence else ""
        lines.append(f"- indicator training: {scoring['iterations']} iterations{budget}, {stopped}")
        for kind, per_bits in scoring.get("steps", {}).items():
            if not kind.endswith("_with_initial"):
                for bits, row in per_bits.items():
                    rho = row.get("spearman_with_initial")
                    ratio = row["learned_over_initial"]
                    lines.append(f"  - {kind} steps at {bits} bits: learned / initial {ratio['min']:.2f}-{ratio['max']:.2f} "
                                 f"(median {ratio['median']:.2f}), Spearman with the initial order "
                                 + ("-" if rho is None else f"{rho:.2f}"))
        for pair, rho in scoring.get("steps", {}).get("weight_gap_spearman_with_initial", {}).items():
            lines.append(f"  - weight step gap {pair} bits (what decides between them): Spearman with the initial order "
                         + ("-" if rho is None else f"{rho:.2f}"))
    sharpness = scoring.get("sharpness")
    if sharpness and sharpness.get("iterations"):
        gap, cosine = sharpness["surrogate_gap"], sharpness["gradient_cosine"]
        lines.append(f"  - sharpness (asga, radius {sharpness['rho_max']:g} to {sharpness['rho_min']:g}, alpha {sharpness['alpha']:g}): "
                     f"surrogate gap {gap['first']:.4g} in the first tenth of training, {gap['last']:.4g} in the last; "
                     f"clean/perturbed gradient cosine {cosine['first']:.3f} then {cosine['last']:.3f}")
    hutchinson = scoring.get("hutchinson")
    if hutchinson and hutchinson.get("estimates"):
        lines.append(f"- Hutchinson iterations: median {hutchinson['iterations_median']:g}, at most {hutchinson['iterations_max']} "
                     f"(limit {hutchinson['max_iterations']}, tolerance {hutchinson['tolerance']:g}); "
                     f"{hutchinson['estimates_within_tolerance']} of {hutchinson['estimates']} estimates within the tolerance")
    return lines
