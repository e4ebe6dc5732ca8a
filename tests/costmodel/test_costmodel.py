"""Latency tables, profiling with reuse, the fitted predictor and validation, on a tiny real model."""

import json

import pytest

from mpqc.cli import main
from mpqc.costmodel.table import LatencyTable
from mpqc.errors import MpqcError
from mpqc.passes.analysis import analyze
from mpqc.passes.layer_graph import layer_edges
from mpqc.targets import load_target


def _json(capsys, *argv) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_layer_edges_follow_the_graph_through_non_layer_ops(tinynet):
    spec, _ = tinynet
    analysis = analyze(spec)
    assert layer_edges(analysis.model, analysis.layers) == (("conv1", "conv2"), ("conv2", "fc"), ("down", "fc"))


def test_profile_measures_once_then_reuses(tinynet, tmp_path, capsys):
    spec, proxy = tinynet
    args = ["profile", spec, "--proxy", str(proxy), "--tables", str(tmp_path / "tables"), "--fit-policies", "3",
            # a model this small runs in microseconds: its repeated medians spread more than a fit
            # is allowed on (the refusal itself is tested in test_fit.py)
            "--force-fit"]
    first = _json(capsys, *args)
    # conv1, conv2, down, fc have distinct signatures; ort-cpu deploys 2, 2, 2 and 3 precisions, and
    # each w8a8 layer is also timed with a float output (unfused), as when its reader stays float.
    assert first["layers"] == {"distinct": 13, "measured": 13, "reused": 0}
    assert set(first["fit"]["boundary_ms"]) == {"00", "01", "10", "11"}
    second = _json(capsys, *args)
    assert second["layers"] == {"distinct": 13, "measured": 0, "reused": 13}
    table = json.loads(next((tmp_path / "tables").glob("*.json")).read_text())
    assert table["fingerprint"]["runtime"].startswith("onnxruntime ")
    # Each layer term is the micro-model's time less the runtime's per-call cost (its frame).
    assert all(entry["raw_median_ms"] > 0 and entry["runs"] >= 25 for entry in table["entries"].values())
    assert all(entry["median_ms"] == max(entry["raw_median_ms"] - entry["frame_ms"], 0.0) for entry in table["entries"].values())


@pytest.mark.parametrize("field, other", [("cpu", "some other CPU"), ("int8_features", ["avx2", "avx512_vnni"])])
def test_a_table_from_another_machine_is_refused(tinynet, tmp_path, capsys, field, other):
    """Also one of the same model name whose INT8 features differ (virtual machines hide some)."""
    spec, proxy = tinynet
    _json(capsys, "profile", spec, "--proxy", str(proxy), "--tables", str(tmp_path), "--fit-policies", "2", "--force-fit")
    path = next(tmp_path.glob("*.json"))
    data = json.loads(path.read_text())
    assert field in data["fingerprint"]
    data["fingerprint"][field] = other
    path.write_text(json.dumps(data))
    with pytest.raises(MpqcError, match="another machine, GPU or runtime"):
        LatencyTable.for_target(load_target("ort-cpu"), tmp_path)


def test_a_missing_measurement_says_to_profile(tinynet, tmp_path, capsys):
    spec, proxy = tinynet
    _json(capsys, "profile", spec, "--proxy", str(proxy), "--tables", str(tmp_path), "--fit-policies", "2", "--force-fit")
    path = next(tmp_path.glob("*.json"))
    data = json.loads(path.read_text())
    data["entries"] = {k: v for k, v in data["entries"].items() if not k.startswith("Gemm")}
    path.write_text(json.dumps(data))
    assert main(["costmodel", "validate", spec, "--proxy", str(proxy), "--tables", str(tmp_path), "--out", str(tmp_path / "v")]) == 2
    err = capsys.readouterr().err
    assert "lacks 4 layer measurement(s)" in err and "run 'mpqc profile" in err


def test_validate_reports_prediction_bitops_and_noise_floor(tinynet, tmp_path, capsys):
    spec, proxy = tinynet
    common = ["--proxy", str(proxy), "--tables", str(tmp_path / "t")]
    _json(capsys, "profile", spec, *common, "--fit-policies", "3", "--force-fit")
    result = _json(capsys, "costmodel", "validate", spec, *common, "--policies", "4", "--runs", "10",
                   "--noise-repeats", "2", "--out", str(tmp_path / "v"))["validation"]
    assert result["policies"] == 3 + 4  # the uniform fp32, w4a16, w8a8 policies plus the random ones
    for block in ("prediction", "additive_table_only"):
        assert 0 <= result[block]["within_5pct"] <= result[block]["within_10pct"] <= 1
        assert -1 <= result[block]["kendall_tau"] <= 1
    assert -1 <= result["bitops"]["kendall_tau"] <= 1
    noise = result["noise_floor"]
    assert noise["rounds"] >= 2 and noise["max_relative_range"] >= noise["noise_floor"] >= 0
    # A microsecond model on a shared machine is noisy: the result says so rather than judging the model.
    assert all(isinstance(problem, str) for problem in result["flagged"])
    rows = json.loads((tmp_path / "v" / "validation.json").read_text())["rows"]
    assert len(rows) == 7 and all(r["measured_ms"] > 0 and r["predicted_ms"] > 0 for r in rows)
    assert (tmp_path / "v" / "validation.png").read_bytes()[:4] == b"\x89PNG"


def test_build_with_a_latency_budget_searches_and_reports_it(tinynet, tmp_path, capsys):
    spec, proxy = tinynet
    common = ["--proxy", str(proxy), "--tables", str(tmp_path / "t")]
    _json(capsys, "profile", spec, *common, "--fit-policies", "3", "--force-fit")
    fastest = _json(capsys, "build", spec, *common, "--policy", "search", "--budget-ms", "1000", "--out", str(tmp_path / "a"),
                    "--runs", "5")["build"]
    search = fastest["search"]
    assert search["method"] == "output" and search["budgets"]["ms"] == 1000  # the default method
    # A generous budget leaves every layer at its least lossy precision: fp32.
    assert fastest["policy"]["counts"] == {"fp32": 4}
    assert search["predicted_ms"] > 0 and search["budget_met"] in (True, False)
    assert main(["build", spec, *common, "--policy", "search", "--budget-ms", "0.000001", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "infeasible" in err and "smallest reachable" in err
    assert not (tmp_path / "b").exists()


def test_search_without_a_budget_is_refused(tinynet, tmp_path, capsys):
    spec, proxy = tinynet
    assert main(["build", spec, "--proxy", str(proxy), "--policy", "search", "--out", str(tmp_path / "c")]) == 2
    assert "needs a budget" in capsys.readouterr().err
