"""The comparison's pass/fail checks on one model's measured points (benchmarks/peers_ort_cpu.py).

Each check is computed from the points the harness measured, never typed in:

* every peer point is matched or beaten by an mpqc point: fidelity no lower than the peer's minus
  FIDELITY_TOLERANCE and speed-up no lower than the peer's times (1 - SPEED_TOLERANCE). Beside this
  ratio of medians, the same decision on the paired rounds: the median over the interleaved rounds of
  the peer's round median over the mpqc point's ("matched_paired"), with its range and how many
  rounds the mpqc point won; a load that changes between rounds moves both models of a round alike;
* mpqc's uniform w8a8 against ONNX Runtime's all-op-types model: at least as fast and more faithful;
* mpqc's front: every point at least as fast as FP32 (strictly, and within SPEED_TOLERANCE), and
  monotone (a slower point is never less faithful than a faster one). Where the harness kept each
  point's per-sample metric, every violation gets a paired bootstrap 95% interval of the fidelity
  difference (resampling the held-out samples, and their source photographs first where the samples
  are grouped by one). "monotone_within_resolution" counts only violations the measurements resolve
  on both axes: the faster point faster by more than SPEED_TOLERANCE and the interval below 0;
* at INC's fidelity (within FIDELITY_TOLERANCE) the fastest front point's speed-up over INC's.

Beside them, every point's paired speed-up: FP32's median over the point's in each interleaved
round, median and range over the rounds. On a machine whose load changes between rounds the ratio
of medians swings with which rounds were hit; the paired ratios show how far.

    python benchmarks/peers_criteria.py benchmarks/results/peers_ort_cpu.json

recomputes the peer checks and the paired speed-ups of a written result from its points and round
medians (the front's intervals need the per-sample metrics, which the result does not keep: they stay).
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np

from mpqc.files import write_atomically

FIDELITY_TOLERANCE = 0.005
SPEED_TOLERANCE = 0.03
PEERS = ("ort:all", "ort:conv-matmul", "inc:tuned")
INC_SPEEDUP_GOAL = 1.2


def criteria(points: list[dict], per_sample: dict[int, np.ndarray] | None = None, groups: np.ndarray | None = None,
             resamples: int = 2000, seed: int = 0) -> dict:
    """`points`: the model's points with "method", "fidelity" and "speedup_vs_fp32" (None where a
    method failed). `per_sample`: index into `points` -> the metric of each held-out sample, whose
    mean is the point's fidelity. `groups`: the source of each held-out sample, for clustered intervals."""
    measured = [(i, p) for i, p in enumerate(points) if _number(p.get("fidelity")) and _number(p.get("speedup_vs_fp32"))]
    mpqc = [(i, p) for i, p in measured if p["method"].startswith("mpqc:")]
    front = sorted(((i, p) for i, p in mpqc if p["method"] == "mpqc:front"), key=lambda ip: -ip[1]["speedup_vs_fp32"])
    result = {"fidelity_tolerance": FIDELITY_TOLERANCE, "speed_tolerance": SPEED_TOLERANCE,
              "peers": [_peer_check(p, mpqc) for _, p in measured if p["method"] in PEERS],
              "peers_without_a_point": sorted({p["method"] for p in points if p["method"] in PEERS}
                                              - {p["method"] for _, p in measured})}
    result["every_peer_matched"] = all(check["matched"] for check in result["peers"])
    result["every_peer_matched_paired"] = all(check.get("matched_paired", False) for check in result["peers"])
    result["paired_speedup_vs_fp32"] = paired_speedups(points)
    uniform = next((p for _, p in mpqc if p["method"] == "mpqc:uniform:w8a8"), None)
    ort_all = next((p for _, p in measured if p["method"] == "ort:all"), None)
    if uniform is not None and ort_all is not None:
        result["uniform_w8a8_vs_ort_all"] = {
            "speedup_ratio": uniform["speedup_vs_fp32"] / ort_all["speedup_vs_fp32"],
            "fidelity_difference": uniform["fidelity"] - ort_all["fidelity"],
            "met": uniform["speedup_vs_fp32"] >= ort_all["speedup_vs_fp32"] and uniform["fidelity"] > ort_all["fidelity"]}
    if front:
        slowest = min(p["speedup_vs_fp32"] for _, p in front)
        violations = [_violation(faster, slower, per_sample, groups, resamples, seed)
                      for faster, slower in zip(front, front[1:]) if slower[1]["fidelity"] < faster[1]["fidelity"]]
        result["front"] = {
            "points": len(front), "slowest_speedup": slowest, "at_least_fp32_speed": slowest >= 1.0,
            "at_least_fp32_speed_within_tolerance": slowest >= 1.0 - SPEED_TOLERANCE,
            "monotone": not violations,
            "monotone_within_resolution": not any(_resolved(v) for v in violations),
            "violations": violations}
    inc = next((p for _, p in measured if p["method"] == "inc:tuned"), None)
    if inc is not None and front:
        best = _fastest_as_faithful(front, inc["fidelity"])
        ratio = None if best is None else best["speedup_vs_fp32"] / inc["speedup_vs_fp32"]
        result["at_inc_fidelity"] = {"inc_fidelity": inc["fidelity"], "front_speedup": None if best is None else best["speedup_vs_fp32"],
                                     "ratio_to_inc": ratio, "goal": INC_SPEEDUP_GOAL,
                                     "met": ratio is not None and ratio >= INC_SPEEDUP_GOAL}
    return result


def _peer_check(peer: dict, mpqc: list[tuple[int, dict]]) -> dict:
    """The fastest mpqc point at least as faithful as the peer (within the tolerance), and whether it
    is also at least as fast (within the tolerance)."""
    best = _fastest_as_faithful(mpqc, peer["fidelity"])
    check = {"peer": peer["method"], "fidelity": peer["fidelity"], "speedup": peer["speedup_vs_fp32"], "matched": False,
             "by": None}
    if best is not None:
        check["by"] = {"method": best["method"], "fidelity": best["fidelity"], "speedup": best["speedup_vs_fp32"],
                       "speedup_ratio": best["speedup_vs_fp32"] / peer["speedup_vs_fp32"]}
        check["matched"] = best["speedup_vs_fp32"] >= peer["speedup_vs_fp32"] * (1 - SPEED_TOLERANCE)
        paired = _paired_ratios(peer, best)
        if paired is not None:
            check["by"]["paired_speed_ratio"] = {"median": float(np.median(paired)), "min": float(paired.min()),
                                                 "max": float(paired.max()), "rounds": len(paired),
                                                 "rounds_faster": int((paired > 1).sum())}
            check["matched_paired"] = float(np.median(paired)) >= 1 - SPEED_TOLERANCE
    return check


def _paired_ratios(slow: dict, fast: dict) -> np.ndarray | None:
    """Per interleaved round, `slow`'s round median over `fast`'s (None without equal round medians)."""
    a, b = slow.get("round_medians_ms"), fast.get("round_medians_ms")
    if not a or not b or len(a) != len(b):
        return None
    return np.asarray(a, dtype=np.float64) / np.asarray(b, dtype=np.float64)


def _fastest_as_faithful(candidates: list[tuple[int, dict]], fidelity: float) -> dict | None:
    """The fastest of (index, point) `candidates` whose fidelity is at least `fidelity` less the tolerance."""
    faithful = [p for _, p in candidates if p["fidelity"] >= fidelity - FIDELITY_TOLERANCE]
    return max(faithful, key=lambda p: p["speedup_vs_fp32"], default=None)


def _violation(faster, slower, per_sample, groups, resamples, seed) -> dict:
    (i, fast), (j, slow) = faster, slower
    violation = {"faster": {"index": i, "speedup": fast["speedup_vs_fp32"], "fidelity": fast["fidelity"]},
                 "slower": {"index": j, "speedup": slow["speedup_vs_fp32"], "fidelity": slow["fidelity"]},
                 "difference": slow["fidelity"] - fast["fidelity"], "interval": None}
    if per_sample is not None and i in per_sample and j in per_sample:
        violation["interval"] = paired_interval(per_sample[j] - per_sample[i], groups, resamples, seed)
    return violation


def _resolved(violation: dict) -> bool:
    """Whether a violation stands out of both measurements' noise (no interval: nothing says it does not)."""
    faster_by = violation["faster"]["speedup"] / violation["slower"]["speedup"] - 1
    interval = violation["interval"]
    return faster_by > SPEED_TOLERANCE and (interval is None or interval[1] < 0)


def paired_interval(differences: np.ndarray, groups: np.ndarray | None = None, resamples: int = 2000,
                    seed: int = 0) -> list[float]:
    """Bootstrap 95% interval of the mean per-sample difference: samples resampled within groups
    resampled first (photographs, then crops), or samples alone where there are no groups."""
    differences = np.asarray(differences, dtype=np.float64)
    rng = np.random.default_rng(seed)
    if groups is None:
        members = [np.arange(len(differences))]
        draw_groups = False
    else:
        groups = np.asarray(groups)
        members = [np.flatnonzero(groups == g) for g in dict.fromkeys(groups.tolist())]
        draw_groups = len(members) > 1
    means = np.empty(resamples)
    for r in range(resamples):
        chosen = rng.integers(len(members), size=len(members)) if draw_groups else range(len(members))
        picked = [rng.choice(members[g], size=len(members[g])) for g in chosen]
        means[r] = differences[np.concatenate(picked)].mean()
    low, high = np.percentile(means, [2.5, 97.5])
    return [float(low), float(high)]


def paired_speedups(points: list[dict]) -> list[dict | None]:
    """Per point (in order): FP32's round median over the point's in each round, as median, min and
    max over the rounds; None for a point without round medians (or before FP32 has any)."""
    fp32 = next((p for p in points if p.get("method") == "fp32"), {})
    paired = []
    for point in points:
        ratios = _paired_ratios(fp32, point)
        paired.append(None if ratios is None else {"method": point["method"], "median": float(np.median(ratios)),
                                                   "min": float(ratios.min()), "max": float(ratios.max())})
    return paired


def refresh_from_points(path: pathlib.Path) -> None:
    """Recomputes every model's peer checks and paired speed-ups in a written result from its points."""
    result = json.loads(path.read_text())
    for model in result["models"].values():
        fresh = criteria(model["points"])
        kept = model.setdefault("criteria", {})
        for key in ("peers", "peers_without_a_point", "every_peer_matched", "every_peer_matched_paired", "paired_speedup_vs_fp32"):
            kept[key] = fresh[key]
    write_atomically(path, json.dumps(result, indent=1, allow_nan=False) + "\n")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value))


if __name__ == "__main__":
    for argument in sys.argv[1:]:
        refresh_from_points(pathlib.Path(argument))
