"""Render a build record as one self-contained HTML page: tables and PNG plots drawn from the record,
embedded as data URIs. Numbers are read from the record, never computed here."""

from __future__ import annotations

import base64
import html

from mpqc.report.record import BuildRecord

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; font-size: 0.9em; }
th { background: #f3f3f3; }
code { font-size: 0.85em; }
.missed { color: #b00020; font-weight: bold; }
.met { color: #1b7f3b; font-weight: bold; }
img { max-width: 100%; }
"""


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _table(header: list[str] | None, rows: list[list]) -> str:
    head = "" if header is None else "<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr></thead>"
    body = "".join("<tr>" + "".join(f"<td>{_fmt(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table>{head}<tbody>{body}</tbody></table>"


def _image(png: bytes, alt: str, element_id: str) -> str:
    data = base64.b64encode(png).decode()
    # onload marks the picture as decoded, so a browser test can tell a broken image from a drawn one.
    return f'<img id="{element_id}" alt="{html.escape(alt)}" src="data:image/png;base64,{data}" onload="this.dataset.loaded=\'yes\'">'


def render_html(build: BuildRecord) -> str:
    from mpqc.report.plots import (  # matplotlib only where a page is drawn
        front_figure,
        layer_strip_figure,
        measured_points_figure,
    )

    record = build.to_json()
    parts = [f"<h1>mpqc build: {html.escape(record['model']['spec'])} on {html.escape(record['target']['name'])}</h1>"]
    counts = ", ".join(f"{n} x {html.escape(p)}" for p, n in record["policy"]["counts"].items())
    sizes = record.get("artifact_bytes") or {}
    summary = [["policy", f"{record['policy']['source']}: {counts}"],
               ["calibration", f"{record['calibration']['method']} on {record['proxy']['samples']} samples from {record['proxy']['origin']}"],
               ["machine", f"{record['machine']['cpu']}, onnxruntime {record['versions']['onnxruntime']}"]]
    if "model.qdq.onnx" in sizes:
        summary.append(["model size", f"{sizes['model.qdq.onnx'] / 1e6:.2f} MB (model.qdq.onnx)"])
    parts.append('<section id="summary"><h2>Summary</h2>' + _table(None, summary) + "</section>")
    parts.append(_measured(record))
    if record.get("search"):
        parts.append(_search(record, front_figure, layer_strip_figure, measured_points_figure))
    rows = [[row["name"], row["op_type"], row["torch_module"] or "-", row["precision"], row["signature"]["key"]]
            for row in record["layers"]]
    parts.append('<section id="layers"><h2>Layers</h2>' + _table(["layer", "op", "torch module", "precision", "signature"], rows)
                 + "</section>")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>mpqc build: "
            f"{html.escape(record['model']['spec'])}</title><style>{_STYLE}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def _measured(record: dict) -> str:
    measured = record.get("measured")
    parts = []
    if record.get("not_measured"):
        parts.append(f"<p>Not measured: {html.escape(record['not_measured'])}</p>")
    if measured and "latency_built" in measured:
        fp32, built = measured["latency_fp32"], measured["latency_built"]
        rows = [[name, s["median_ms"], s["p90_ms"], s["p99_ms"], s["std_ms"], s["throughput_per_s"]] for name, s in
                (("fp32", fp32), ("built", built))]
        parts.append(f"<h2>Latency (measured: batch {built['batch']}, {built['threads']} threads, median of {built['runs']} runs)</h2>"
                     + _table(["model", "p50 ms", "p90 ms", "p99 ms", "std ms (noise)", "throughput /s"], rows)
                     + f"<p>Speed-up of the built model: {measured['speedup']:.2f}x</p>")
    if measured:
        runtime = f"<p>Run with {html.escape(measured['fidelity_runtime'])}.</p>" if "fidelity_runtime" in measured else ""
        parts.append("<h2>Fidelity vs FP32 (measured)</h2>" + runtime
                     + _table(["metric", "value"], [[k, v] for k, v in measured["fidelity"].items()]))
        if "int8_note" in measured:
            parts.append(f"<p>Note: {html.escape(measured['int8_note'])}</p>")
    return '<section id="measured">' + "".join(parts) + "</section>"


def _search(record: dict, front_figure, layer_strip_figure, measured_points_figure) -> str:
    search = record["search"]
    budgets = ", ".join(f"{name} {value:g}" for name, value in search["budgets"].items() if value is not None) or "none (Pareto sweep)"
    rows = [["method", _fmt(search["method"] + (" (scores from the cache)" if search.get("scores_cached") else ""))],
            ["budgets", _fmt(budgets)],
            ["predicted loss", _fmt(search["objective"])]]
    if search.get("predicted_ms") is not None:
        rows.append(["predicted latency (ms)", _fmt(search["predicted_ms"])])
    if "measured_ms" in search:
        verdict = "met" if search["budget_met"] else "missed"
        rows.append(["measured latency (ms)", f'{_fmt(search["measured_ms"])}: budget <span class="{verdict}">{verdict}</span>'])
    parts = ['<section id="search"><h2>Search</h2>',
             "<table><tbody>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in rows) + "</tbody></table>"]
    if search.get("verification_rounds"):
        parts.append("<h3>Latency verification rounds (the ILP's budget is tightened while the measured time is over)</h3>"
                     + _table(["round", "ILP budget ms", "predicted ms", "measured ms"],
                              [[i + 1, r["ilp_budget_ms"], r["predicted_ms"], r["measured_ms"]] for i, r in enumerate(search["verification_rounds"])])
                     + f"<p>Outcome: {html.escape(search.get('verification', ''))}</p>")
    if "pareto" in search and "front" in search["pareto"]:
        parts.append('<h3 id="front-title">Front</h3>' + _image(front_figure(record), "searched front", "front"))
    if search.get("measured_points"):
        summary = search["measured_points"]
        parts.append('<h3 id="measured-title">Measured points (FP32, uniform and searched policies, timed in the same rounds)</h3>'
                     + _image(measured_points_figure(record), "measured points", "measured-points")
                     + f"<p>Built: {html.escape(summary['built'])}, {html.escape(summary['why'])}.</p>"
                     + _table(["policy", "predicted ms", "measured ms", summary["metric"], "on the measured front"],
                              [[p["source"], p["predicted_ms"], p["measured_ms"], p["fidelity"], "yes" if p["on_measured_front"] else "no"]
                               for p in summary["points"]]))
        if summary.get("prediction_check", {}).get("note"):
            parts.append(f"<p>Note: {html.escape(summary['prediction_check']['note'])}.</p>")
    if search.get("layers"):
        parts.append('<h3 id="strip-title">Per-layer precision</h3>' + _image(layer_strip_figure(record), "per-layer strip", "layer-strip"))
    return "".join(parts) + "</section>"
