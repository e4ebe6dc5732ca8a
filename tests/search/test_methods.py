"""`mpqc build --policy search --method ...` end to end on the bundled mnist-cnn: every method scores,
the ILP spends the BitOps budget, and a method that needs a torch module refuses an .onnx file."""

import json

import pytest

from mpqc.cli import main
from mpqc.sensitivity.methods import TRAINED_METHODS

# mnist-cnn costs 598,138,880 BitOps at w8a8 everywhere and half that at INT4: the middle forces a mix.
MIDDLE_BITOPS = "450e6"


def _build(capsys, tmp_path, *extra) -> tuple[int, dict | str]:
    trained = any(a == "--method" and b in TRAINED_METHODS for a, b in zip(extra, extra[1:]))
    argv = ["build", "mnist-cnn", "--policy", "search", "--evaluate-only", "--no-measure", "--no-cache",
            "--proxy-limit", "64", *(["--epochs", "1"] if trained else []), "--budget-bitops", MIDDLE_BITOPS,
            "--out", str(tmp_path / "out"), *extra]
    code = main([*argv, "--json"])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out)["build"] if code == 0 else captured.err)


@pytest.mark.parametrize("method", ["seam", "limpq", "asga", "hawq", "qerror", "output"])
def test_each_method_builds_a_mixed_policy_within_the_budget(method, tmp_path, capsys):
    code, record = _build(capsys, tmp_path, "--method", method)
    assert code == 0
    assert record["search"]["method"] == method
    assert record["policy"]["source"] == f"search:{method}"
    counts = record["policy"]["counts"]
    assert counts.get("w4a8", 0) > 0 and counts.get("w8a8", 0) > 0, counts
    policy = json.loads((tmp_path / "out" / "policy.json").read_text())["layers"]
    assert set(policy) == {row["name"] for row in record["layers"]}
    hutchinson = record["search"]["scoring"].get("hutchinson")
    if method == "hawq":  # how many Hutchinson iterations the traces took, against the limit
        assert 1 <= hutchinson["iterations_median"] <= hutchinson["iterations_max"] <= hutchinson["max_iterations"]
        assert 0 <= hutchinson["estimates_within_tolerance"] <= hutchinson["estimates"]


def test_output_is_the_default_method(tmp_path, capsys):
    code, record = _build(capsys, tmp_path)
    assert code == 0 and record["search"]["method"] == "output"


def test_the_same_seed_gives_the_same_policy(tmp_path, capsys):
    _, first = _build(capsys, tmp_path / "a", "--method", "limpq", "--seed", "3")
    _, second = _build(capsys, tmp_path / "b", "--method", "limpq", "--seed", "3")
    assert (tmp_path / "a" / "out" / "policy.json").read_bytes() == (tmp_path / "b" / "out" / "policy.json").read_bytes()
    assert (tmp_path / "a" / "out" / "model.qdq.onnx").read_bytes() == (tmp_path / "b" / "out" / "model.qdq.onnx").read_bytes()



def test_a_trained_method_on_an_onnx_file_says_what_to_do(tinynet_onnx, tmp_path, capsys):
    model, proxy = tinynet_onnx
    code = main(["build", model, "--proxy", proxy, "--policy", "search", "--method", "seam", "--budget-bytes", "1e9",
                 "--no-measure", "--no-cache", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "--method seam trains on the torch model" in err and "--method output" in err
    assert err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_an_onnx_file_defaults_to_output(tinynet_onnx, tmp_path, capsys):
    model, proxy = tinynet_onnx
    assert main(["build", model, "--proxy", proxy, "--policy", "search", "--budget-bytes", "6000", "--no-measure",
                 "--no-cache", "--out", str(tmp_path / "out"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["build"]["search"]["method"] == "output"


def test_a_trained_method_records_its_iterations_convergence_and_step_movement(tmp_path, capsys):
    argv = ["build", "mnist-cnn", "--policy", "search", "--evaluate-only", "--no-measure", "--proxy-limit", "64",
            "--budget-bitops", MIDDLE_BITOPS, "--method", "limpq", "--iterations", "12", "--cache-dir", str(tmp_path / "cache")]
    assert main([*argv, "--out", str(tmp_path / "a"), "--json"]) == 0
    scoring = json.loads(capsys.readouterr().out)["build"]["search"]["scoring"]
    assert 0 < scoring["iterations"] <= 12 and scoring["convergence"]["budget"] == 12  # an iteration budget, not epochs
    weight_steps = scoring["steps"]["weight"]
    assert {"4", "8"} <= set(weight_steps)
    for row in weight_steps.values():
        ratio = row["learned_over_initial"]
        assert 0 < ratio["min"] <= ratio["median"] <= ratio["max"] and row["layers"] > 0
    assert "- indicator training: " in (tmp_path / "a" / "report.md").read_text()
    # A rebuild from the cache shows the same record of how the scores were got.
    assert main([*argv, "--out", str(tmp_path / "b"), "--json"]) == 0
    search = json.loads(capsys.readouterr().out)["build"]["search"]
    assert search["scores_cached"] and search["scoring"] == scoring


def test_iterations_and_epochs_together_are_one_line(tmp_path, capsys):
    code, err = _build(capsys, tmp_path, "--method", "limpq", "--iterations", "5")
    assert code == 2 and "--iterations and --epochs both set how long indicators train" in err


def test_seam_terms_need_the_seam_method_and_are_recorded(tmp_path, capsys):
    code, err = _build(capsys, tmp_path, "--method", "limpq", "--seam-terms", "1", "0", "0")
    assert code == 2 and "--seam-terms sets SEAM's terms, and the method is 'limpq'" in err and err.count("\n") == 1
    code, err = _build(capsys, tmp_path, "--method", "seam", "--seam-terms", "1", "-1", "0")
    assert code == 2 and "outside" in err
    code, record = _build(capsys, tmp_path, "--method", "seam", "--seam-terms", "0.5", "2", "0")
    assert code == 0
    assert record["search"]["scoring"]["seam_terms"] == {"margin": 0.5, "compactness_weight": 2.0, "margin_weight": 0.0}


def test_fixed_ends_hold_the_first_and_last_layer_at_8_bits(tmp_path, capsys):
    code, record = _build(capsys, tmp_path, "--method", "limpq", "--fixed-ends")
    assert code == 0
    held = record["search"]["scoring"]["held_layers"]
    policy = json.loads((tmp_path / "out" / "policy.json").read_text())["layers"]
    assert held == [record["layers"][0]["name"], record["layers"][-1]["name"]]
    assert all(policy[layer].startswith("w8") for layer in held), {layer: policy[layer] for layer in held}
    assert "w4a8" in policy.values()  # the budget is still spent on the layers in between


@pytest.mark.parametrize("flags", [["--fixed-ends"], ["--method", "qerror", "--iterations", "50"], ["--method", "hawq", "--gmpq"]],
                         ids=["default-output", "qerror", "hawq"])
def test_training_flags_on_a_method_that_trains_nothing_are_one_line(flags, tmp_path, capsys):
    code, err = _build(capsys, tmp_path, *flags)
    assert code == 2 and err.startswith("mpqc: error: ") and err.count("\n") == 1
    assert "which trains none" in err and "--method seam or limpq or asga" in err
    assert not (tmp_path / "out").exists()
