"""PNG plots rendered from saved JSON; nothing is computed here but the drawing."""

from __future__ import annotations

import io
import pathlib

import matplotlib

matplotlib.use("Agg")  # headless: build steps have no display
import matplotlib.pyplot as plt  # noqa: E402


def validation_scatter(result: dict, path: pathlib.Path) -> None:
    rows = result["rows"]
    measured = [r["measured_ms"] for r in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4.5))
    low, high = min(measured) * 0.9, max(measured) * 1.1
    left.fill_between([low, high], [low * 0.9, high * 0.9], [low * 1.1, high * 1.1], color="0.9", label="±10%")
    left.plot([low, high], [low, high], color="0.5", lw=1)
    left.scatter(measured, [r["predicted_ms"] for r in rows], s=18, label="table + boundaries")
    left.scatter(measured, [r["additive_ms"] for r in rows], s=10, marker="x", label="table only")
    p = result["prediction"]
    left.set(xlabel="measured ms", ylabel="predicted ms",
             title=f"{result['model']} on {result['target']}: tau {p['kendall_tau']:.2f}, {p['within_10pct']:.0%} within ±10%")
    left.legend(loc="upper left")
    right.scatter(measured, [r["bitops"] / 1e9 for r in rows], s=18, color="C2")
    right.set(xlabel="measured ms", ylabel="GBitOps", title=f"BitOps: tau {result['bitops']['kendall_tau']:.2f}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def pareto_plot(front: dict, destination) -> None:
    """Summed loss against cost for each point of pareto.json; `destination` is a path or a binary file."""
    points = front["points"]
    costs, objectives = [p["cost"] for p in points], [p["objective"] for p in points]
    figure, axes = plt.subplots(figsize=(6, 4.5))
    axes.plot(costs, objectives, marker="o", drawstyle="steps-post", label="Pareto front")
    if front.get("built_point") is not None:
        built = points[front["built_point"]]
        axes.scatter([built["cost"]], [built["objective"]], s=90, facecolors="none", edgecolors="C3", zorder=3, label="built")
    axes.set(xlabel=f"predicted {front['resource']}", ylabel=f"summed {front['method']} loss",
             title=f"{front['model']} on {front['target']}: {len(points)} points")
    axes.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(destination, format="png", dpi=110)
    plt.close(figure)


_UNITS = {"ms": ("predicted latency", "ms", 1.0), "bitops": ("BitOps per sample", "GBitOps", 1e-9),
          "bytes": ("weight size", "MB", 1e-6)}
PRECISION_COLORS = {"fp32": "#9e9e9e", "fp16": "#bdbdbd", "w8a8": "#1f77b4", "w4a8": "#ff7f0e", "w4a16": "#2ca02c"}


def _png(figure) -> bytes:
    stream = io.BytesIO()
    figure.tight_layout()
    figure.savefig(stream, format="png", dpi=100)
    plt.close(figure)
    return stream.getvalue()


def front_figure(record: dict) -> bytes:
    """The searched front of a build record (predicted loss vs predicted cost), the uniform
    policies and the built point marked; with a latency front, the measured FP32 and built times too."""
    search = record["search"]
    pareto = search["pareto"]
    label, unit, factor = _UNITS[pareto["resource"]]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    front = pareto["front"]
    axes.plot([p["cost"] * factor for p in front], [p["objective"] for p in front], marker="o", drawstyle="steps-post",
              label="searched front (predicted)")
    for name, point in pareto["uniform"].items():
        if point["cost"] is not None:
            axes.scatter([point["cost"] * factor], [point["objective"]], marker="s", s=40,
                         color=PRECISION_COLORS.get(name, "k"), label=f"uniform {name} (predicted)", zorder=3)
    if pareto.get("built_point") is not None:
        built = front[pareto["built_point"]]
        axes.scatter([built["cost"] * factor], [built["objective"]], s=140, facecolors="none", edgecolors="C3", linewidths=2,
                     zorder=4, label="built point")
    measured = record.get("measured") or {}
    if pareto["resource"] == "ms" and "latency_built" in measured:
        axes.axvline(measured["latency_fp32"]["median_ms"], color="0.4", ls="--", lw=1, label="FP32, measured")
        axes.axvline(measured["latency_built"]["median_ms"], color="C3", ls=":", lw=1.5, label="built, measured")
    axes.set(xlabel=f"{label} ({unit})", ylabel=f"predicted loss: sum of {search['method']} scores (lower is better)",
             title=f"{record['model']['spec']} on {record['target']['name']}")
    axes.legend(fontsize=8, loc="upper right")
    return _png(figure)


def measured_points_figure(record: dict) -> bytes:
    """Every measured point of a search: measured latency against fidelity, FP32 and the uniform
    policies marked, the measured front drawn, the built point ringed, and each point's predicted
    latency as a hollow marker joined to its measurement."""
    summary = record["search"]["measured_points"]
    points = summary["points"]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    front = sorted((p for p in points if p["on_measured_front"]), key=lambda p: p["measured_ms"])
    axes.plot([p["measured_ms"] for p in front], [p["fidelity"] for p in front], color="C0", lw=1.5, drawstyle="steps-pre",
              label="measured front", zorder=2)
    for point in points:
        source, y = point["source"], point["fidelity"]
        if source == "fp32":
            style = {"marker": "*", "s": 120, "color": "k", "label": "FP32"}
        elif source.startswith("uniform:"):
            name = source.split(":", 1)[1]
            style = {"marker": "s", "s": 50, "color": PRECISION_COLORS.get(name, "k"), "label": f"uniform {name}"}
        else:
            style = {"marker": "o", "s": 30, "color": "C0", "label": "searched"}
        axes.scatter([point["measured_ms"]], [y], zorder=3, **style)
        if point["predicted_ms"] is not None:
            axes.plot([point["predicted_ms"], point["measured_ms"]], [y, y], color="0.6", lw=0.8, zorder=1)
            axes.scatter([point["predicted_ms"]], [y], marker=style["marker"], s=style["s"] * 0.6, facecolors="none",
                         edgecolors=style["color"], zorder=3)
    built = next(p for p in points if p["source"] == summary["built"])
    axes.scatter([built["measured_ms"]], [built["fidelity"]], s=200, facecolors="none", edgecolors="C3", linewidths=2,
                 zorder=4, label="built point")
    handles, labels = axes.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    unique["predicted (hollow)"] = plt.Line2D([], [], marker="o", ls="", markerfacecolor="none", markeredgecolor="0.4")
    axes.legend(unique.values(), unique.keys(), fontsize=8, loc="best")
    axes.set(xlabel="latency (ms): measured filled, predicted hollow", ylabel=f"fidelity: {summary['metric']} against FP32",
             title=f"{record['model']['spec']} on {record['target']['name']}: measured points")
    return _png(figure)


def layer_strip_figure(record: dict) -> bytes:
    """One bar per layer: its chosen precision as the colour, its share of the predicted layer time
    as the height where the search priced latency, its score as a second row."""
    layers = record["search"]["layers"]
    names = [layer["name"] for layer in layers]
    times = [layer["predicted_ms"] for layer in layers]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(max(7, 0.22 * len(layers)), 5), sharex=True)
    colors = [PRECISION_COLORS.get(layer["precision"], "k") for layer in layers]
    if all(t is not None for t in times):
        total = sum(times) or 1.0
        top.bar(range(len(layers)), [100 * t / total for t in times], color=colors)
        top.set_ylabel("share of predicted\nlayer time (%)")
    else:
        top.bar(range(len(layers)), [1] * len(layers), color=colors)
        top.set_ylabel("precision")
        top.set_yticks([])
    bottom.bar(range(len(layers)), [layer["loss"] for layer in layers], color=colors)
    bottom.set_ylabel(f"{record['search']['method']} score\nat the chosen precision")
    bottom.set_xticks(range(len(layers)), names, rotation=90, fontsize=7)
    handles = [plt.Rectangle((0, 0), 1, 1, color=PRECISION_COLORS.get(p, "k")) for p in sorted({layer["precision"] for layer in layers})]
    top.legend(handles, sorted({layer["precision"] for layer in layers}), fontsize=8, ncol=4, loc="upper right")
    return _png(figure)
