"""`mpqc search validate`: a method's predicted loss against the fidelity random policies measure."""

import json

from mpqc.cli import main


def test_search_validate_ranks_random_policies_and_places_the_methods_policy(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "v"
    assert main(["search", "validate", "mnist-cnn", "--method", "qerror", "--method", "hawq", "--policies", "12",
                 "--bootstrap", "50", "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)["validation"]
    result = json.loads((out / "search_validation.json").read_text())
    assert printed["random_policies"] == result["random_policies"] == 12 and len(result["rows"]) == 12
    assert set(result["methods"]) == {"qerror", "hawq"}
    fidelities = [row["fidelity"] for row in result["rows"]]
    assert all(0 <= f <= 1 for f in fidelities) and len(set(fidelities)) > 1  # the policies differ, measurably
    for method in result["methods"].values():
        low, high = method["kendall_tau_interval"]
        assert -1 <= low <= high <= 1 and -1 <= method["kendall_tau_loss_vs_error"] <= 1
        assert len(method["predicted_loss"]) == 12 and [b["quartile"] for b in method["at_budgets"]] == [25, 50, 75]
        for budget in method["at_budgets"]:
            assert 0 <= budget["percentile_among_random"] <= 100 and budget["random_policies_within_budget"] >= 1
            assert budget["percentile_interval"][0] <= budget["percentile_interval"][1]


def test_search_validate_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep me")
    assert main(["search", "validate", "mnist-cnn", "--method", "qerror", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("mpqc: error:")
    assert (tmp_path / "mine.txt").read_text() == "keep me"



def test_a_method_that_cannot_score_the_model_is_recorded_and_the_others_run(tinynet_onnx, tmp_path, capsys):
    model, proxy = tinynet_onnx
    out = tmp_path / "v"
    assert main(["search", "validate", model, "--proxy", proxy, "--method", "limpq", "--method", "qerror",
                 "--policies", "6", "--bootstrap", "20", "--no-cache", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "search_validation.json").read_text())
    assert "--method limpq trains on the torch model" in result["methods"]["limpq"]["refused"]
    assert "limpq: refused: mpqc: error:" not in printed and "limpq: refused: " in printed
    assert -1 <= result["methods"]["qerror"]["kendall_tau_loss_vs_error"] <= 1


def test_every_method_refused_is_one_line_and_writes_nothing(tinynet_onnx, tmp_path, capsys):
    model, proxy = tinynet_onnx
    out = tmp_path / "v"
    assert main(["search", "validate", model, "--proxy", proxy, "--method", "seam", "--policies", "4",
                 "--no-cache", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mpqc: error:") and err.count("\n") == 1 and "--method output" in err
    assert not out.exists()


def test_training_flags_with_only_methods_that_train_nothing_are_one_line_before_any_work(tmp_path, capsys):
    out = tmp_path / "v"
    assert main(["search", "validate", "mnist-cnn", "--method", "output", "--method", "qerror", "--fixed-ends",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mpqc: error: --fixed-ends set how indicators train, and the methods are 'output', 'qerror'")
    assert err.count("\n") == 1 and not out.exists()
