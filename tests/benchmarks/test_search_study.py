"""benchmarks/search_study.py's summary: paired differences, the proxies' gaps, seam's ablation."""

import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # search_study imports its sibling transfer.py
    try:
        import search_study

        yield search_study
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
        sys.modules.pop("search_study", None)
        sys.modules.pop("transfer", None)


def run(variant, seed, proxy, point, metric, policy="a"):
    return {"variant": variant, "seed": seed, "proxy": proxy, "point": point, "metric": metric, "kl_divergence": 100 - metric,
            "scoring_s": 1.0, "iterations": 3, "converged": True, "assignments": {"conv": policy}}


def test_paired_differences_gaps_and_the_ablation(study):
    runs = []
    for seed in (0, 1):
        for proxy, shift in (("full", 0.0), ("4pct", -1.0), ("other", -5.0)):
            for point in (0, 1):
                runs.append(run("qerror", seed, proxy, point, 90.0 + seed + shift))
                runs.append(run("limpq", seed, proxy, point, 91.0 + seed + shift))
                runs.append(run("seam", seed, proxy, point, 91.0 + seed + shift, policy="a" if point == 0 else "b"))
    randoms = [{"seed": s, "draw": d, "point": p, "metric": 85.0 + d, "kl_divergence": 15.0 - d}
               for s in (0, 1) for p in (0, 1) for d in (0, 1)]
    summary = study.summarize(runs, randoms, ["qerror", "limpq", "seam"], 2)

    versus = summary["paired_differences_points"]["limpq"]
    assert versus["minus_qerror"]["mean"] == pytest.approx(1.0) and versus["minus_qerror"]["cells"] == 12
    assert versus["minus_qerror"]["wins"] == 12 and versus["minus_qerror"]["interval"] == pytest.approx([1.0, 1.0])
    # Random policies pair by seed and budget: their mean there is 85.5.
    assert versus["minus_random"]["cells"] == 12
    assert versus["minus_random"]["mean"] == pytest.approx(sum(91.0 + s + sh - 85.5 for s in (0, 1) for sh in (0, -1, -5)) / 6)
    assert summary["paired_differences_points"]["qerror"]["minus_qerror"] is None

    cells = {(c["variant"], c["proxy"], c["point"]): c for c in summary["cells"]}
    assert cells[("limpq", "full", 0)]["metric_mean"] == pytest.approx(91.5)
    # The 4% proxy is 1 point off with a seed spread of 1 on the full proxy; the other dataset 5 points off.
    assert cells[("limpq", "4pct", 0)]["gap_to_full_points"] == pytest.approx(-1.0)
    assert cells[("limpq", "4pct", 0)]["within_full_seed_spread"] is True
    assert cells[("limpq", "other", 0)]["within_full_seed_spread"] is False

    ablation = summary["seam_terms_ablation"]
    assert ablation["identical_policies"] == 6 and ablation["policies"] == 12
    assert ablation["seam_minus_limpq"]["mean"] == 0.0
    assert summary["cost"]["limpq"]["iterations"] == [3] * 6
    # Each variant's small and other-dataset proxies against its full proxy, same seed and budget.
    gaps = summary["proxy_minus_full"]["limpq"]
    assert gaps["4pct"]["metric"]["mean"] == pytest.approx(-1.0) and gaps["4pct"]["metric"]["cells"] == 4
    assert gaps["other"]["metric"]["mean"] == pytest.approx(-5.0) and gaps["other"]["kl_divergence"]["mean"] == pytest.approx(5.0)
    assert "interval_clustered_by_source" not in gaps["4pct"]["metric"]  # no per-source metrics here


def test_intervals_clustered_by_source_widen_with_the_photographs(study):
    """Two photographs of 10 and 30 crops; one variant is 2 points better on the first only: pooled
    +0.5 in every cell, so the cells alone say [0.5, 0.5], while drawing photographs spans 0 to 2."""
    def result(metric_a, metric_b):
        by_source = {"a": {"samples": 10, "metric": metric_a, "kl_divergence": 0.0},
                     "b": {"samples": 30, "metric": metric_b, "kl_divergence": 0.0}}
        return {"metric": (10 * metric_a + 30 * metric_b) / 40, "kl_divergence": 0.0, "by_source": by_source}

    pairs = [(result(92.0, 90.0), result(90.0, 90.0)) for _ in range(6)]
    found = study._differences(pairs, "metric")
    assert found["mean"] == pytest.approx(0.5) and found["interval"] == pytest.approx([0.5, 0.5])
    low, high = found["interval_clustered_by_source"]
    assert low == pytest.approx(0.0) and high == pytest.approx(2.0)
