"""The sensitivity score cache and `--pareto`, on the tiny residual model."""

import json
import math

import pytest

from mpqc.cli import main
from mpqc.costmodel.policies import uniform_policies
from mpqc.passes.analysis import analyze
from mpqc.policy import Policy
from mpqc.search.problem import PARETO_NEAR_FULL, PARETO_POINTS
from mpqc.targets import load_target


def _json(capsys, *argv) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture()
def profiled(tinynet, tmp_path, capsys):
    """The tiny model with its latency table measured, and the options every search build here shares."""
    spec, proxy = tinynet
    common = ["--proxy", str(proxy), "--tables", str(tmp_path / "t")]
    _json(capsys, "profile", spec, *common, "--fit-policies", "2", "--force-fit")
    return spec, [*common, "--policy", "search", "--no-measure"]


def _search(capsys, spec, common, out, *extra) -> dict:
    return _json(capsys, "build", spec, *common, *extra, "--out", str(out))["build"]


def test_a_second_budget_reuses_the_scores_and_gives_the_uncached_policy(profiled, tmp_path, capsys):
    spec, common = profiled
    cache = ["--cache-dir", str(tmp_path / "cache")]
    first = _search(capsys, spec, common, tmp_path / "a", *cache, "--budget-bytes", "1e9")
    assert first["search"]["scores_cached"] is False
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1
    # tinynet holds 2944 weights (11776 bytes in fp32): 6000 bytes moves some layers off fp32, so the
    # scores decide something.
    tight = "6000"
    cached = _search(capsys, spec, common, tmp_path / "b", *cache, "--budget-bytes", tight)
    uncached = _search(capsys, spec, common, tmp_path / "c", "--no-cache", "--budget-bytes", tight)
    assert cached["search"]["scores_cached"] is True and uncached["search"]["scores_cached"] is False
    assert cached["policy"]["counts"] != {"fp32": 4}
    assert (tmp_path / "b" / "policy.json").read_text() == (tmp_path / "c" / "policy.json").read_text()
    assert cached["search"]["objective"] == uncached["search"]["objective"]


def test_a_corrupt_cache_file_is_scored_again_and_rewritten(profiled, tmp_path, capsys):
    spec, common = profiled
    cache = ["--cache-dir", str(tmp_path / "cache"), "--budget-bytes", "1e9"]
    _search(capsys, spec, common, tmp_path / "a", *cache)
    (path,) = (tmp_path / "cache").glob("*.json")
    good = path.read_text()
    for broken in (good[: len(good) // 2], '{"format": "mpqc.scores/2"}', "[]"):
        path.write_text(broken)
        assert _search(capsys, spec, common, tmp_path / "a", *cache)["search"]["scores_cached"] is False
        assert json.loads(path.read_text()) == json.loads(good)
    assert _search(capsys, spec, common, tmp_path / "a", *cache)["search"]["scores_cached"] is True


def test_no_cache_writes_nothing_and_the_default_folder_follows_xdg(profiled, tmp_path, capsys, monkeypatch):
    spec, common = profiled
    (tmp_path / "cache").mkdir()
    _search(capsys, spec, common, tmp_path / "a", "--cache-dir", str(tmp_path / "cache"), "--no-cache", "--budget-bytes", "1e9")
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    _search(capsys, spec, common, tmp_path / "a", "--budget-bytes", "1e9")
    assert len(list((tmp_path / "xdg" / "mpqc").glob("*.json"))) == 1


def _check_front(out, record, resource: str) -> list[dict]:
    assert {p.name for p in out.iterdir()} == {"model.qdq.onnx", "policy.json", "build.json", "report.md", "report.html", "pareto.json", "pareto.png"}
    front = json.loads((out / "pareto.json").read_text())
    budgets, points = front["budgets"], front["points"]
    assert front["resource"] == resource and points
    if len(budgets) == 1:
        # Where the least-loss policy is also the cheapest (a measured table in which fp32 runs fastest
        # on this tiny net), the sweep has one budget and the front that one policy.
        assert resource == "ms" and len(points) == 1 and points[0]["objective"] == 0
    else:
        assert len(budgets) == PARETO_POINTS + PARETO_NEAR_FULL
        # The near-full budgets halve the last even step's saving: the smallest saving is an eighth of it.
        step = (budgets[-1] - budgets[0]) / (PARETO_POINTS - 1)
        assert budgets == sorted(budgets) and abs((budgets[-1] - budgets[-2]) - step / 2 ** PARETO_NEAR_FULL) <= 1e-9 * max(1.0, abs(step))
    for before, after in zip(points, points[1:]):
        assert after["cost"] >= before["cost"] and after["objective"] <= before["objective"]
    for point in points:
        # Relative slack on |budget|: ms costs are measured against fp32 and can be negative.
        assert point["cost"] <= point["budget"] + 1e-6 * abs(point["budget"])
        assert sum(point["counts"].values()) == len(point["assignments"]) == 4
    # The build lowered the front's middle point, and the JSON says which.
    assert record["search"]["pareto"]["built_point"] == front["built_point"] == (len(points) - 1) // 2
    assert Policy.load(out / "policy.json") == points[front["built_point"]]["assignments"]
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    return points


def test_pareto_writes_a_monotone_front_beside_a_complete_build(profiled, tmp_path, capsys):
    spec, common = profiled
    cache = ["--cache-dir", str(tmp_path / "cache")]
    # Measured latency decides how many points the ms front has (on tinynet fp32 may well be fastest),
    # so only its shape is checked; weight bytes are exact, and there fp32 costs most and loses least.
    _check_front(tmp_path / "ms", _search(capsys, spec, common, tmp_path / "ms", *cache, "--pareto", "ms"), "ms")
    points = _check_front(tmp_path / "b", _search(capsys, spec, common, tmp_path / "b", *cache, "--pareto", "bytes"), "bytes")
    assert len(points) >= 2 and points[-1]["counts"] == {"fp32": 4} and points[0]["objective"] > 0


def test_pareto_refuses_a_budget_of_the_same_resource(profiled, tmp_path, capsys):
    spec, common = profiled
    assert main(["build", spec, *common, "--no-cache", "--pareto", "ms", "--budget-ms", "5", "--out", str(tmp_path / "x")]) == 2
    assert "drop --budget-ms" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def _measured_search(capsys, spec, common, out, *extra) -> tuple[dict, list[str]]:
    """A search build that measures (few runs: the checks here are on what is recorded, not on speed)."""
    measured = [option for option in common if option != "--no-measure"]
    return _search(capsys, spec, measured, out, *extra, "--method", "qerror", "--no-cache", "--runs", "3", "--warmup", "0"), measured


def _clearly_faster(a: dict, b: dict, margin: float) -> bool:
    """Faster in every one of at least five paired rounds, or beyond the noise margin and in so many
    rounds that equally fast models would win them less than 5% of the time (sign test)."""
    rounds = list(zip(a["round_medians_ms"], b["round_medians_ms"], strict=True))
    wins = sum(x < y for x, y in rounds)
    beyond = a["measured_ms"] * (1 + margin) < b["measured_ms"]
    if len(rounds) < 5:
        return beyond
    chance = sum(math.comb(len(rounds), k) for k in range(wins, len(rounds) + 1)) / 2 ** len(rounds)
    return wins == len(rounds) or (beyond and chance < 0.05)


def _beats(a: dict, b: dict, margin: float = 0.0) -> bool:
    return (a["fidelity"] >= b["fidelity"] and not _clearly_faster(b, a, margin)
            and (a["measured_ms"] < b["measured_ms"] or a["fidelity"] > b["fidelity"]))


def test_a_speedup_budget_is_the_measured_fp32_latency_over_the_speedup(profiled, tmp_path, capsys):
    spec, common = profiled
    record, measured = _measured_search(capsys, spec, common, tmp_path / "s", "--budget-speedup", "0.5")
    speedup = record["search"]["budget_speedup"]
    assert speedup["speedup"] == 0.5 and speedup["budget_ms"] == pytest.approx(speedup["fp32_measured_ms"] / 0.5)
    assert record["search"]["budgets"]["ms"] == speedup["budget_ms"] and "budget_met" in record["search"]
    assert record["options"]["budget_speedup"] == 0.5 and record["options"]["budget_ms"] is None  # the request as given
    for extra, message in ((["--budget-ms", "5"], "drop --budget-ms"), (["--no-measure"], "drop --no-measure")):
        assert main(["build", spec, *measured, "--budget-speedup", "1.2", *extra, "--out", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err
    assert main(["build", spec, "--proxy", common[1], "--budget-speedup", "1.2", "--out", str(tmp_path / "x")]) == 2
    assert "--budget-speedup only apply to --policy search" in capsys.readouterr().err


def test_a_measured_pareto_build_measures_every_point_and_builds_one_nothing_beats(profiled, tmp_path, capsys):
    spec, common = profiled
    record, _ = _measured_search(capsys, spec, common, tmp_path / "m", "--pareto", "ms")
    summary = record["search"]["measured_points"]
    sources = [p["source"] for p in summary["points"]]
    # FP32 and every uniform policy are measured beside the searched points, in the same rounds (a
    # front point that is a uniform policy is measured once, under its front name).
    assert sources[0] == "fp32" and any(s.startswith("front:") for s in sources)
    measured_layers = [p["layers"] for p in summary["points"]]
    assert all(u.as_dict in measured_layers for u in uniform_policies(analyze(spec), load_target("ort-cpu")))
    points = {p["source"]: p for p in summary["points"]}
    built = points[summary["built"]]
    # Built: a point of the measured front, or, where FP32 beats every policy, the most faithful policy.
    front_policies = [p for p in summary["points"] if p["on_measured_front"] and p["layers"] is not None]
    assert built in front_policies or (not front_policies and built["fidelity"] == max(p["fidelity"] for p in summary["points"]
                                                                                      if p["layers"] is not None))
    assert built["layers"] == Policy.load(tmp_path / "m" / "policy.json")
    margin = summary["latency_margin"]
    assert margin == min(summary["noise_floor"], 0.10)
    fp32 = points["fp32"]
    # A policy keeping every layer float is FP32 timed twice: never on the front, never beating FP32 off it.
    twins = [p for p in summary["points"] if p["layers"] is not None and set(p["layers"].values()) == {"fp32"}]
    assert all(not p["on_measured_front"] for p in twins) and fp32["on_measured_front"]
    judged = [p for p in summary["points"] if p not in twins]
    for point in judged:
        assert point["on_measured_front"] == (not any(_beats(other, point, margin) for other in judged if other is not point))
        if point["on_measured_front"] and point["fidelity"] < fp32["fidelity"]:  # clearly faster than FP32, or no reason to be there
            assert _clearly_faster(point, fp32, margin)
    front = json.loads((tmp_path / "m" / "pareto.json").read_text())
    assert front["measured"]["built"] == summary["built"]
    assert "Measured points" in (tmp_path / "m" / "report.md").read_text()
    assert 'id="measured-points"' in (tmp_path / "m" / "report.html").read_text()
    # The cost model's predictions are checked against these same measurements, and a misfit is said.
    check = summary["prediction_check"]
    predicted = [p for p in summary["points"] if p["predicted_ms"] is not None]
    assert check["points"] == len(predicted) >= 2
    errors = sorted(abs(p["predicted_ms"] - p["measured_ms"]) / p["measured_ms"] for p in predicted)
    assert check["max_relative_error"] == pytest.approx(errors[-1])
    misfit = check["median_relative_error"] > 0.10 or bool(check["predicted_below_fastest_uniform"])
    assert (check["note"] is not None) == misfit
    assert (f"Note: {check['note']}." in (tmp_path / "m" / "report.md").read_text()) == misfit


def test_a_budgeted_build_never_returns_a_policy_a_uniform_one_beats(profiled, tmp_path, capsys):
    spec, common = profiled
    # A loose budget (3.3x the FP32 time): on a tiny model the predicted times exceed the measured FP32 one.
    record, _ = _measured_search(capsys, spec, common, tmp_path / "b", "--budget-speedup", "0.3")
    summary = record["search"]["measured_points"]
    points = {p["source"]: p for p in summary["points"]}
    built = points[summary["built"]]
    for source, point in points.items():
        if source.startswith("uniform:") and source != summary["built"]:
            assert not _beats(point, built, summary["latency_margin"])
    assert built["layers"] == Policy.load(tmp_path / "b" / "policy.json")
    # A miss (as the measured points were timed) names the closest measured policy.
    assert ("closest measured policy" in summary["why"]) == (built["measured_ms"] > record["search"]["budgets"]["ms"])
