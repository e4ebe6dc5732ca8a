"""PNG plots rendered from saved JSON; nothing is computed here but the drawing."""

from __future__ import annotations

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
    built = points[front["built_point"]]
    axes.scatter([built["cost"]], [built["objective"]], s=90, facecolors="none", edgecolors="C3", zorder=3, label="built")
    axes.set(xlabel=f"predicted {front['resource']}", ylabel=f"summed {front['method']} loss",
             title=f"{front['model']} on {front['target']}: {len(points)} points")
    axes.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(destination, format="png", dpi=110)
    plt.close(figure)
