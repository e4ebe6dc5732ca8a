"""Does a policy searched on a small proxy dataset hold up on the real task? The transfer benchmark.

For one bundled model, every sensitivity method scores the layers on three proxies — the full
target training data (the reference), a random 4% of it, and a different dataset of the same 4%
size — for several seeds; the ILP then picks a policy at three budgets between all-INT4-able and
all-INT8 (BitOps), and at three latency budgets from the measured table (milliseconds, over the
precisions ONNX Runtime CPU deploys). Every policy is lowered after the same calibration (no
retraining), evaluated exactly on ONNX Runtime CPU (w4a8 convs too, which have no fast kernel) and
timed. Random-importance policies at the same budgets and the uniform policies are the baselines.

    python benchmarks/transfer.py --model mnist-cnn [--seeds 0 1 2] [--epochs 3] [--random 4]
    python benchmarks/transfer.py --model efficientnet-lite0 --full 256

Writes benchmarks/results/transfer_<model>.json (+ .png). Every number in it is measured by this run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import numpy as np
import onnx_ir as ir

from mpqc.backends.onnxruntime.runner import OrtRunner
from mpqc.bench.latency import first_batch, measure_latency
from mpqc.costmodel.fit import latency_model
from mpqc.costmodel.latency import bitops_and_size
from mpqc.costmodel.table import LatencyTable
from mpqc.files import write_atomically
from mpqc.lower.lowering import Lowering
from mpqc.passes.analysis import analyze
from mpqc.passes.signatures import layer_signature
from mpqc.pipeline.options import BuildOptions
from mpqc.pipeline.profile import profile
from mpqc.pipeline.search import sensitivity_context
from mpqc.policy import Policy
from mpqc.search.ilp import smallest, solve
from mpqc.sensitivity.methods import score_layers
from mpqc.targets import load_target
from mpqc.versions import provenance

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
METHODS = ("seam", "limpq", "hawq", "qerror")
FRACTIONS = (0.25, 0.5, 0.75)  # budgets at these points between the cheapest and the dearest policy
PROXY_FRACTION = 0.04
GOAL_POINTS = 0.3  # the proxy policy's metric may fall this many points below the full-data one


@dataclasses.dataclass
class Proxy:
    name: str
    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None
    description: str


def mnist_proxies(seed: int, full: int | None) -> list[Proxy]:
    from mpqc.data.mnist import digits_28x28, mnist_split

    images, labels = mnist_split("train")
    if full is not None:
        images, labels = images[:full], labels[:full]
    small = max(1, round(PROXY_FRACTION * len(images)))
    rng = np.random.default_rng((seed, 4))
    subset = np.sort(rng.choice(len(images), small, replace=False))
    digits, digit_labels = digits_28x28()
    other = np.sort(np.random.default_rng((seed, 28)).choice(len(digits), small, replace=False))
    return [
        Proxy("full", {"image": images}, labels, f"all {len(images)} MNIST training digits"),
        Proxy("4pct", {"image": images[subset]}, labels[subset], f"a random {small} of them"),
        Proxy("other", {"image": digits[other]}, digit_labels[other],
              f"{small} scikit-learn 8x8 digits re-rendered at 28x28 (another dataset)"),
    ]


def photo_proxies(seed: int, full: int | None) -> list[Proxy]:
    from mpqc.data.photos import photo_crops, sample_image_crops

    crops = photo_crops("proxy", full or 256)
    small = max(1, round(PROXY_FRACTION * len(crops)))
    subset = np.sort(np.random.default_rng((seed, 4)).choice(len(crops), small, replace=False))
    return [
        Proxy("full", {"image": crops}, None, f"{len(crops)} crops of the proxy photographs (skimage)"),
        Proxy("4pct", {"image": crops[subset]}, None, f"a random {small} of them"),
        Proxy("other", {"image": sample_image_crops(small, seed)}, None,
              f"{small} crops of scikit-learn's two sample photographs (another dataset)"),
    ]


PROXIES = {"mnist-cnn": mnist_proxies, "mnist-dsnet": mnist_proxies, "efficientnet-lite0": photo_proxies}


class Evaluator:
    """Lowers a policy after one shared calibration, scores it on the held-out set and times it."""

    def __init__(self, analysis, target, example, runs: int, heldout=None):
        """`heldout`: (feeds, labels, source of each sample) instead of the example's held-out set;
        results then also carry the metrics per source (for intervals clustered by source)."""
        self.lowering = Lowering.prepare(analysis, target, example.proxy_feeds(None))
        self.target, self.example, self.runs = target, example, runs
        self.eval_feeds, self.labels, self.sources = heldout if heldout is not None else (*example.eval_feeds(), None)
        self.reference = OrtRunner(self.lowering.float_model.SerializeToString(), target).run_batched(self.eval_feeds)
        self.timing_feeds = first_batch(self.eval_feeds, 1)
        self.seen: dict[tuple, dict] = {}

    @property
    def description(self) -> str:
        """What metric() measures."""
        return ("top-1 accuracy (%) on the MNIST test split" if self.labels is not None
                else "top-1 agreement with FP32 (%) on crops of the held-out photographs")

    def metric(self, outputs: np.ndarray) -> float:
        """Top-1 accuracy (%) where there are labels, else top-1 agreement with FP32 (%)."""
        return float(self._hits(outputs).mean())

    def _hits(self, outputs: np.ndarray) -> np.ndarray:
        truth = self.labels if self.labels is not None else self.reference.argmax(1)
        return 100.0 * (outputs.argmax(1) == truth)

    def kl_divergence(self, outputs: np.ndarray) -> float:
        """Mean KL(FP32 || quantized) of the softmax outputs, in nats: finer-grained than top-1."""
        return float(self._kl(outputs).mean())

    def _kl(self, outputs: np.ndarray) -> np.ndarray:
        def log_softmax(x):
            shifted = x - x.max(axis=1, keepdims=True)
            return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))

        reference, candidate = log_softmax(self.reference.astype(np.float64)), log_softmax(outputs.astype(np.float64))
        return (np.exp(reference) * (reference - candidate)).sum(axis=1)

    def by_source(self, outputs: np.ndarray) -> dict | None:
        """Per source of the held-out samples: their count, metric and KL divergence."""
        if self.sources is None:
            return None
        sources = np.asarray(self.sources)
        hits, kl = self._hits(outputs), self._kl(outputs)
        return {name: {"samples": int((sources == name).sum()), "metric": float(hits[sources == name].mean()),
                       "kl_divergence": float(kl[sources == name].mean())} for name in dict.fromkeys(self.sources)}

    def __call__(self, assignments: dict[str, str]) -> dict:
        key = tuple(sorted(assignments.items()))
        if key not in self.seen:
            policy = Policy(tuple(assignments.items()), "transfer")
            runner = OrtRunner(self.lowering.lower(policy), self.target)
            outputs = runner.run_batched(self.eval_feeds)
            latency = measure_latency(runner, self.timing_feeds, warmup=5, runs=self.runs)
            self.seen[key] = {"metric": self.metric(outputs), "kl_divergence": self.kl_divergence(outputs),
                              "measured_ms": latency.median_ms}
            if self.sources is not None:
                self.seen[key]["by_source"] = self.by_source(outputs)
        return self.seen[key]


class Sweeps:
    """The two budget sweeps over one model: BitOps over INT4/INT8, milliseconds over what ORT deploys."""

    def __init__(self, analysis, target, batch: int = 1, milliseconds: bool = True):
        layers = analysis.layers
        self.names = [layer.name for layer in layers]
        self.ties = analysis.ties
        self.bitops_candidates = {layer.name: ["w4a16", "w8a8"] if layer.op_type in ("Gemm", "MatMul") else ["w4a8", "w8a8"]
                                  for layer in layers}
        self.ms_candidates = {layer.name: [p.name for p in target.precisions_for(layer.op_type)] for layer in layers}
        self.bitops = {(layer.name, p): bitops_and_size(layer_signature(analysis.model, layer), p)[0]
                       for layer in layers for p in self.bitops_candidates[layer.name]}
        all_int8 = sum(self.bitops[(name, "w8a8")] for name in self.names)
        least_bitops = smallest(self.names, self.bitops_candidates, "bitops", bitops=self.bitops, ties=self.ties)
        self.budgets = {"bitops": [least_bitops + f * (all_int8 - least_bitops) for f in FRACTIONS]}
        self.latency = None  # milliseconds=False: BitOps only, no latency table needed
        if milliseconds:
            self.latency = latency_model(analysis, target, LatencyTable.for_target(target, None), batch)
            fastest = smallest(self.names, self.ms_candidates, "latency", latency=self.latency, ties=self.ties)
            all_fp32 = self.latency.predict({name: "fp32" for name in self.names})
            self.budgets["ms"] = [fastest + f * (all_fp32 - fastest) for f in FRACTIONS]

    def solve(self, resource: str, budget: float, loss: dict) -> tuple[dict[str, str], float]:
        if resource == "bitops":
            solution = solve(self.names, self.bitops_candidates, loss, bitops=self.bitops, bitops_budget=budget, ties=self.ties)
        else:
            solution = solve(self.names, self.ms_candidates, loss, latency=self.latency, latency_budget_ms=budget, ties=self.ties)
        return solution.assignments, solution.solve_seconds

    def describe(self, assignments: dict[str, str]) -> dict:
        bitops = sum(self.bitops.get((n, p), 0.0) for n, p in assignments.items()) if all(
            (n, p) in self.bitops for n, p in assignments.items()) else None
        predicted = self.latency.predict(assignments) if self.latency is not None and all(
            p in self.ms_candidates[n] for n, p in assignments.items()) else None
        counts: dict[str, int] = {}
        for p in assignments.values():
            counts[p] = counts.get(p, 0) + 1
        return {"bitops": bitops, "predicted_ms": predicted, "counts": dict(sorted(counts.items()))}

    def random_loss(self, resource: str, rng: np.random.Generator) -> dict:
        """A random importance per layer, priced like a sensitivity: losing bits costs that layer's importance."""
        loss = {}
        candidates = self.bitops_candidates if resource == "bitops" else self.ms_candidates
        for name in self.names:
            importance = float(rng.uniform(0.0, 1.0))
            for p in candidates[name]:
                loss[(name, p)] = {"fp32": 0.0, "w8a8": importance if resource == "ms" else 0.0}.get(p, 2 * importance)
        return loss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, choices=sorted(PROXIES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--epochs", type=int, default=3, help="indicator training epochs (seam, limpq), the same for every proxy")
    parser.add_argument("--full", type=int, help="size of the full proxy (default: all MNIST training digits; 256 photo crops)")
    parser.add_argument("--random", type=int, default=4, help="random-importance policies per budget and seed")
    parser.add_argument("--runs", type=int, default=50, help="timed runs per policy (batch 1)")
    parser.add_argument("--out", help="output JSON (default benchmarks/results/transfer_<model>.json)")
    parser.add_argument("--plot-only", action="store_true", help="re-render the PNG from an existing JSON; measure nothing")
    args = parser.parse_args()
    out = pathlib.Path(args.out) if args.out else RESULTS / f"transfer_{args.model}.json"
    if args.plot_only:
        plot(json.loads(out.read_text()), out.with_suffix(".png"))
        return 0

    from mpqc.examples import load_example

    example = load_example(args.model)
    analysis = analyze(args.model)
    target = load_target("ort-cpu")
    float_model = ir.to_proto(analysis.model)
    # The latency sweeps price policies from this machine's table: profile what it lacks first.
    feeds = {"calibration": example.proxy_feeds(None), "timing": first_batch(example.eval_feeds()[0], 1)}
    profile(analysis, target, LatencyTable.for_target(target), feeds, 1, progress=False)
    sweeps = Sweeps(analysis, target)
    evaluate = Evaluator(analysis, target, example, args.runs)
    score_candidates = {layer.name: sorted(set(sweeps.bitops_candidates[layer.name]) | set(sweeps.ms_candidates[layer.name]))
                        for layer in analysis.layers}

    rows, random_rows, proxies_described = [], [], {}
    for seed in args.seeds:
        for proxy in PROXIES[args.model](seed, args.full):
            proxies_described[proxy.name] = {"description": proxy.description, "samples": len(proxy.feeds["image"])}
            for method in args.methods:
                options = BuildOptions(model=args.model, seed=seed, epochs=args.epochs)
                context = sensitivity_context(analysis, target, float_model, proxy.feeds, score_candidates, options, proxy.labels)
                clock = time.perf_counter()
                scores = score_layers(method, context)
                scoring_s = time.perf_counter() - clock
                for resource, budgets in sweeps.budgets.items():
                    for point, budget in enumerate(budgets):
                        assignments, solve_s = sweeps.solve(resource, budget, scores)
                        row = {"method": method, "proxy": proxy.name, "seed": seed, "resource": resource, "point": point,
                               "budget": budget, "scoring_s": scoring_s, "ilp_s": solve_s, "search_s": scoring_s + solve_s,
                               **sweeps.describe(assignments), **evaluate(assignments), "assignments": assignments}
                        rows.append(row)
                print(f"seed {seed} {proxy.name:<5} {method:<6} scored in {scoring_s:7.1f} s: " + ", ".join(
                    f"{r['resource']}@{r['point']} {r['metric']:.2f}" for r in rows[-6:]), flush=True)
        rng = np.random.default_rng((seed, 99))
        for resource, budgets in sweeps.budgets.items():
            for point, budget in enumerate(budgets):
                for draw in range(args.random):
                    assignments, _ = sweeps.solve(resource, budget, sweeps.random_loss(resource, rng))
                    random_rows.append({"seed": seed, "draw": draw, "resource": resource, "point": point, "budget": budget,
                                        **sweeps.describe(assignments), **evaluate(assignments)})

    uniform = {}
    for name in ("fp32", "w8a8", "w4"):
        assignments = {n: ("w4a16" if "w4a16" in sweeps.bitops_candidates[n] else "w4a8") if name == "w4" else name
                       for n in sweeps.names}
        uniform[name] = {**sweeps.describe(assignments), **evaluate(assignments)}

    record = {
        "benchmark": "transfer",
        "model": args.model,
        "target": target.name,
        "metric": evaluate.description,
        "float_metric": evaluate.metric(evaluate.reference),
        **provenance(),
        "settings": {"seeds": args.seeds, "methods": args.methods, "epochs": args.epochs, "random_per_budget_and_seed": args.random,
                     "timed_runs": args.runs, "batch": 1, "proxies": proxies_described,
                     "calibration": "the example's default proxy samples, min-max, the same for every policy",
                     "candidates": {"bitops": "w4a8/w8a8 convs, w4a16/w8a8 linear layers",
                                    "ms": "what ort-cpu deploys: fp32/w8a8 convs, fp32/w8a8/w4a16 linear layers"},
                     "budget_fractions": FRACTIONS},
        "budgets": sweeps.budgets,
        "uniform": uniform,
        "summary": summarize(rows, random_rows, args.methods),
        "runs": rows,
        "random": random_rows,
    }
    write_atomically(out, json.dumps(record, indent=1) + "\n")
    plot(record, out.with_suffix(".png"))
    print(f"wrote {out}")
    return 0


def summarize(rows: list[dict], random_rows: list[dict], methods) -> list[dict]:
    """Per resource, budget point, method and proxy: the metric over seeds, the gap to the full-data
    policy, the search time against full data's, and how the policy compares with random ones."""
    summary = []
    for resource in ("bitops", "ms"):
        for point in range(len(FRACTIONS)):
            randoms = [r for r in random_rows if r["resource"] == resource and r["point"] == point]
            for method in methods:
                by_proxy = {proxy: [r for r in rows if r["resource"] == resource and r["point"] == point
                                    and r["method"] == method and r["proxy"] == proxy] for proxy in ("full", "4pct", "other")}
                full = by_proxy["full"]
                full_mean = float(np.mean([r["metric"] for r in full]))
                full_spread = float(np.ptp([r["metric"] for r in full]))
                for proxy, members in by_proxy.items():
                    metrics = [r["metric"] for r in members]
                    mean = float(np.mean(metrics))
                    measured = float(np.mean([r["measured_ms"] for r in members]))
                    # Random policies no slower than this one (5% timing slack): same or better latency.
                    comparable = [r["metric"] for r in randoms if r["measured_ms"] <= 1.05 * measured]
                    entry = {
                        "resource": resource, "point": point, "method": method, "proxy": proxy, "seeds": len(members),
                        "metric_mean": mean, "metric_min": min(metrics), "metric_max": max(metrics),
                        "metric_spread": float(np.ptp(metrics)),
                        "kl_divergence_mean": float(np.mean([r["kl_divergence"] for r in members])),
                        "random_kl_divergence_mean": float(np.mean([r["kl_divergence"] for r in randoms])) if randoms else None,
                        "measured_ms_mean": measured,
                        "search_s_mean": float(np.mean([r["search_s"] for r in members])),
                        "random_metric_mean": float(np.mean([r["metric"] for r in randoms])) if randoms else None,
                        "random_no_slower_metric_mean": float(np.mean(comparable)) if comparable else None,
                        "random_no_slower_count": len(comparable),
                    }
                    if proxy != "full":
                        gap = mean - full_mean
                        entry |= {
                            "gap_to_full_points": gap,
                            "full_seed_spread_points": full_spread,
                            "within_goal": bool(gap >= -GOAL_POINTS or -gap <= full_spread),
                            "search_time_ratio_full_over_proxy": float(np.mean([r["search_s"] for r in full])) / entry["search_s_mean"],
                        }
                    summary.append(entry)
    return summary


def plot(record: dict, path: pathlib.Path) -> None:
    """The metric (top row) and the KL divergence from FP32 (bottom row) at each budget point, one column
    per resource, one colour per method, one line style per proxy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"full": "-", "4pct": "--", "other": ":"}
    figure, axes = plt.subplots(2, 2, figsize=(12, 8), squeeze=False)
    rows = (("metric_mean", "random_metric_mean", record["metric"]),
            ("kl_divergence_mean", "random_kl_divergence_mean", "KL(FP32 || quantized), nats"))
    for row, (field, random_field, label) in enumerate(rows):
        for axis, resource in zip(axes[row], ("bitops", "ms")):
            entries = [e for e in record["summary"] if e["resource"] == resource]
            x = list(record["settings"]["budget_fractions"])
            for index, method in enumerate(record["settings"]["methods"]):
                for proxy, style in styles.items():
                    ys = [next(e[field] for e in entries if e["method"] == method and e["proxy"] == proxy and e["point"] == p)
                          for p in range(len(x))]
                    axis.plot(x, ys, style, color=f"C{index}", marker="o", label=f"{method} ({proxy})")
            randoms = [next(e[random_field] for e in entries if e["point"] == p) for p in range(len(x))]
            axis.plot(x, randoms, "-", color="grey", marker="x", label="random importance")
            axis.set_title(f"{record['model']}: budget in {resource}")
            axis.set_xlabel("budget (fraction of the way from cheapest to dearest)")
            axis.set_ylabel(label, fontsize=8)
    axes[0][1].legend(fontsize=6, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
