"""The drivers' contract: options that contradict each other are one clear line before any work,
and a build's report is rendered from its record alone."""

import dataclasses
import json
import re

import pytest

from mpqc.cli import main
from mpqc.pipeline.build import build
from mpqc.pipeline.options import SEARCH_ONLY, BuildOptions
from mpqc.report.markdown import render_report
from mpqc.report.record import BuildRecord


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("mpqc: error: ") and "\n" not in err
    return err


@pytest.mark.parametrize("flags", [["--budget-ms", "5"], ["--budget-bitops", "1e9"], ["--method", "qerror"],
                                   ["--budget-bytes", "1e4", "--gmpq"]])
def test_search_flags_on_a_uniform_build_are_one_line_before_any_work(tinynet, tmp_path, capsys, flags):
    spec, proxy = tinynet
    assert main(["build", spec, "--proxy", str(proxy), "--policy", "uniform:w8a8", *flags, "--out", "o"]) == 2
    err = _one_error_line(capsys)
    assert flags[0] in err and "--policy search" in err
    assert not (tmp_path / "o").exists()


def test_export_refuses_search_flags_and_a_search_policy(tinynet, tmp_path, capsys):
    spec, proxy = tinynet
    assert main(["build", spec, "--proxy", str(proxy), "--no-measure", "--out", "a"]) == 0
    capsys.readouterr()
    policy = str(tmp_path / "a" / "policy.json")
    assert main(["export", spec, "--proxy", str(proxy), "--policy", policy, "--budget-ms", "5", "--out", "b"]) == 2
    assert "--budget-ms" in _one_error_line(capsys)
    assert main(["export", spec, "--proxy", str(proxy), "--policy", "search", "--budget-ms", "5", "--out", "b"]) == 2
    assert "never searches" in _one_error_line(capsys)
    assert not (tmp_path / "b").exists()


def test_every_search_only_option_is_known_to_build_options():
    fields = {field.name for field in dataclasses.fields(BuildOptions)}
    assert set(SEARCH_ONLY) <= fields
    assert BuildOptions(model="m", policy="search", budget_ms=5).search_only_flags_given() == ["--budget-ms"]
    BuildOptions(model="m", policy="search", budget_ms=5).check_consistent()  # a search may take them all


@pytest.mark.parametrize("target", ["ort-cpu", "trt-a100"])
def test_mpqc_report_re_renders_the_builds_own_report_byte_for_byte(tinynet, tmp_path, capsys, target):
    spec, proxy = tinynet
    assert main(["build", spec, "--proxy", str(proxy), "--target", target, "--runs", "3", "--warmup", "1", "--out", "o"]) == 0
    capsys.readouterr()
    built = {name: (tmp_path / "o" / name).read_bytes() for name in ("report.md", "report.html")}
    for name in built:
        (tmp_path / "o" / name).unlink()
    assert main(["report", "o"]) == 0
    assert {name: (tmp_path / "o" / name).read_bytes() for name in built} == built
    built = built["report.md"]
    assert ("## Latency" in built.decode()) == (target == "ort-cpu")  # both renderings were exercised


def test_a_build_record_saves_and_loads_unchanged(tinynet, tmp_path):
    spec, proxy = tinynet
    record = build(BuildOptions(model=spec, proxy=str(proxy), measure=False), None)
    record.save(tmp_path / "build.json")
    written = json.loads((tmp_path / "build.json").read_text())
    loaded = BuildRecord.load(tmp_path / "build.json")
    assert loaded.to_json() == written == json.loads(json.dumps(record.to_json()))  # tuples come back as lists
    assert list(written)[:2] == ["format", "model"]
    assert render_report(loaded) == render_report(record)


@pytest.mark.parametrize(("content", "message"), [
    (None, "does not exist"),
    (b"{\"format\": \"mpqc.build/1\"", "cannot be read as JSON"),
    (b"\xff\xfe not utf-8", "cannot be read as JSON"),
    (b"[1, 2]", "is not an mpqc build record"),
    (b"{\"format\": \"mpqc.build/1\", \"model\": {}}", "missing"),
])
def test_report_on_a_folder_that_is_no_build_is_one_line(tmp_path, capsys, content, message):
    (tmp_path / "d").mkdir()
    if content is not None:
        (tmp_path / "d" / "build.json").write_bytes(content)
    assert main(["report", str(tmp_path / "d")]) == 2
    assert message in _one_error_line(capsys)
    assert not (tmp_path / "d" / "report.md").exists()


def test_an_infeasible_budget_is_refused_before_any_layer_is_scored(tinynet, tmp_path, capsys, monkeypatch):
    spec, proxy = tinynet

    def never(method, context):
        raise AssertionError("scored although the budget cannot be met")

    monkeypatch.setattr("mpqc.pipeline.search.scored_layers", never)
    assert main(["build", spec, "--proxy", str(proxy), "--policy", "search", "--budget-bitops", "1", "--no-cache",
                 "--out", "o"]) == 2
    assert "bitops budget 1 BitOps is infeasible: the smallest reachable is" in _one_error_line(capsys)


def test_the_layer_table_keeps_every_signature_cell_whole(tinynet, tmp_path, capsys):
    spec, proxy = tinynet
    assert main(["build", spec, "--proxy", str(proxy), "--no-measure", "--out", "o"]) == 0
    rows = [line for line in (tmp_path / "o" / "report.md").read_text().splitlines() if line.startswith("| conv1 |")]
    # Five cells: a GitHub-flavoured Markdown table splits a row at every | not escaped, code spans included.
    assert len(rows) == 1 and len(re.split(r"(?<!\\)\|", rows[0])) == 7


def test_bench_on_a_model_name_says_to_build_it_first(capsys):
    assert main(["bench", "efficientnet-lite0"]) == 2
    assert "bench DIR/model.qdq.onnx" in _one_error_line(capsys)


def _unquantized_conv_model(path):
    """A conv whose output is mostly zeros (a probability map of a few hot pixels after a ReLU)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.zeros((2, 3, 3, 3), np.float32)
    weight[0, 0, 1, 1] = 0.613
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["y"], name="relu")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2, 8, 8])], [numpy_helper.from_array(weight, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)
    inputs = np.zeros((16, 3, 8, 8), np.float32)
    inputs[::4, 0, 2, 2:6] = np.random.default_rng(0).uniform(0.1, 1.0, (4, 4))  # three of four samples give an all-zero output
    np.savez(path.with_suffix(".npz"), x=inputs)


def test_fidelity_is_sound_on_mostly_zero_outputs_and_exact_for_an_unquantized_lowering(tmp_path, capsys):
    _unquantized_conv_model(tmp_path / "m.onnx")
    common = ["build", str(tmp_path / "m.onnx"), "--proxy", str(tmp_path / "m.npz"), "--runs", "2", "--warmup", "0", "--json"]
    assert main([*common, "--policy", "uniform:fp32", "--out", str(tmp_path / "fp32")]) == 0
    same = json.loads(capsys.readouterr().out)["build"]["measured"]["fidelity"]
    assert same["cosine_mean"] == 1.0 and same["sqnr_db"] == float("inf") and same["relative_l2_error"] == 0.0
    assert main([*common, "--out", str(tmp_path / "w8a8")]) == 0
    quantized = json.loads(capsys.readouterr().out)["build"]["measured"]["fidelity"]
    assert 0.9 < quantized["cosine_mean"] <= 1.0 and 0 <= quantized["relative_l2_error"] < 0.2
    assert 20 < quantized["sqnr_db"] < 200


def test_a_users_own_metric_joins_the_fidelity_and_its_failures_are_one_line(tinynet, tmp_path, capsys):
    spec, proxy = tinynet
    (tmp_path / "mymetrics.py").write_text(
        "import numpy as np\n"
        "def top1(reference, candidate, labels):\n"
        "    return {'my_top1': float(np.mean(reference.argmax(1) == candidate.argmax(1)))}\n"
        "def broken(reference, candidate, labels):\n"
        "    raise ValueError('no labels here')\n"
        "def wrong(reference, candidate, labels):\n"
        "    return [1.0]\n")
    common = ["build", spec, "--proxy", str(proxy), "--runs", "2", "--warmup", "0"]
    assert main([*common, "--metric", "mymetrics:top1", "--out", "o", "--json"]) == 0
    fidelity = json.loads(capsys.readouterr().out)["build"]["measured"]["fidelity"]
    assert 0.0 <= fidelity["my_top1"] <= 1.0 and "cosine_mean" in fidelity
    for name, message in (("broken", "raised ValueError: no labels here"), ("wrong", "must return a dict"),
                          ("absent", "cannot load metric")):
        assert main([*common, "--metric", f"mymetrics:{name}", "--out", f"o-{name}"]) == 2
        assert message in _one_error_line(capsys)
        assert not (tmp_path / f"o-{name}").exists()


def test_check_on_a_build_for_another_target_says_which_model_to_check(tinynet, tmp_path, capsys):
    spec, proxy = tinynet
    assert main(["build", spec, "--proxy", str(proxy), "--no-measure", "--out", "cpu"]) == 0
    capsys.readouterr()
    assert main(["check", "cpu/model.qdq.onnx", "--target", "trt-a100"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("hint: this model was built for target 'ort-cpu'") and "--target trt-a100" in lines[-1]
    assert main(["build", spec, "--proxy", str(proxy), "--no-measure", "--target", "trt-a100", "--out", "gpu"]) == 0
    capsys.readouterr()
    assert main(["check", "gpu/model.qdq.onnx", "--target", "trt-a100"]) == 0
    assert "hint" not in capsys.readouterr().out


def test_a_search_build_with_the_output_method_calibrates_once(tinynet, monkeypatch):
    """The output method lowers its probe policies through the build's own calibration, not one of its own."""
    from mpqc.lower.lowering import Lowering

    spec, proxy = tinynet
    calls = []
    prepare = Lowering.prepare.__func__

    def counted(cls, *args, **kwargs):
        calls.append(args[2] if len(args) > 2 else kwargs.get("feeds"))
        return prepare(cls, *args, **kwargs)

    monkeypatch.setattr(Lowering, "prepare", classmethod(counted))
    record = build(BuildOptions(model=spec, proxy=str(proxy), policy="search", method="output", budget_bitops=1e300,
                                measure=False, use_cache=False), None).to_json()
    assert record["search"]["scoring"]["lowered_policies"] > 1  # the probes ran
    assert len(calls) == 1
