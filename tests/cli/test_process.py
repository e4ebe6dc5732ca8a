"""How the command behaves as a process: usage errors, ranges, Ctrl-C, a closed pipe, outputs that
must not be touched, and models whose input sizes are left open."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mpqc.cli import main


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("mpqc: error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("argv", [
    ["build", "m", "--out", "o", "--seed", "-1"],
    ["build", "m", "--out", "o", "--runs", "0"],
    ["build", "m", "--out", "o", "--runs", "-1"],
    ["build", "m", "--out", "o", "--runs", "1e22"],
    ["build", "m", "--out", "o", "--runs", str(2**31)],
    ["build", "m", "--out", "o", "--warmup", "-5"],
    ["build", "m", "--out", "o", "--batch", "0"],
    ["build", "m", "--out", "o", "--batch", "100000000"],
    ["build", "m", "--out", "o", "--proxy-limit", "0"],
    ["build", "m", "--out", "o", "--percentile", "-1"],
    ["build", "m", "--out", "o", "--percentile", "1e308"],
    ["build", "m", "--out", "o", "--percentile", "nan"],
    ["build", "m", "--out", "o", "--budget-ms", "-3"],
    ["build", "m", "--out", "o", "--budget-ms", "inf"],
    ["costmodel", "validate", "m", "--out", "o", "--policies", "0"],
    ["costmodel", "validate", "m", "--out", "o", "--noise-repeats", "-5"],
    ["profile", "m", "--shape", "input:0x3"],
    ["profile", "m", "--shape", "3x3"],
    ["build"],
    ["frobnicate"],
    [],
])
def test_usage_errors_and_out_of_range_numbers_are_one_line_with_status_2(tmp_path, capsys, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    _one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_help_shows_the_defaults(capsys):
    assert main(["build", "--help"]) == 0
    assert "(default: 100)" in capsys.readouterr().out


def _factory(tmp_path, body: str) -> str:
    (tmp_path / "hostile.py").write_text("import torch\n\ndef make():\n" + "".join(f"    {line}\n" for line in body.splitlines()))
    return "hostile:make"


@pytest.mark.parametrize("body", [
    "raise KeyboardInterrupt",
    "try:\n    raise KeyboardInterrupt\nexcept KeyboardInterrupt:\n    raise RuntimeError('export interrupted')",
])
def test_ctrl_c_is_one_line_and_status_130_even_when_a_library_wraps_it(tmp_path, capsys, monkeypatch, body):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["build", _factory(tmp_path, body), "--out", "o"]) == 130
    assert capsys.readouterr().err == "mpqc: interrupted\n"
    assert not (tmp_path / "o").exists()


def test_a_bug_is_one_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("mpqc.passes.analysis.analyze", lambda spec: 1 / 0)  # inspect's analysis, broken
    assert main(["inspect", "mnist-cnn"]) == 70
    err = capsys.readouterr().err
    assert err.startswith("mpqc: internal error: ZeroDivisionError") and err.count("\n") == 1


def test_a_reader_that_leaves_early_gets_no_traceback(tinynet):
    spec, _ = tinynet
    done = subprocess.run(f"{sys.executable} -m mpqc.cli inspect {spec} | head -c 1", shell=True, capture_output=True,
                          text=True, timeout=300)
    assert done.stderr == "" and len(done.stdout) == 1


def test_validate_never_replaces_a_folder_of_something_else_and_checks_before_measuring(tinynet, tmp_path, capsys):
    spec, proxy = tinynet
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    (tmp_path / "file").write_text("a file")
    for out in ("mine", "file", "file/under"):
        started = time.perf_counter()
        assert main(["costmodel", "validate", spec, "--proxy", str(proxy), "--out", out]) == 2
        assert time.perf_counter() - started < 30  # refused up front, not after the measurements
        _one_error_line(capsys)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert (tmp_path / "file").read_text() == "a file"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging folder


@pytest.mark.parametrize("out", ["file/under", "x" * 300])
def test_a_build_output_that_cannot_be_written_is_refused_before_the_build(tinynet, tmp_path, capsys, out):
    spec, proxy = tinynet
    (tmp_path / "file").write_text("a file")
    assert main(["build", spec, "--proxy", str(proxy), "--out", out]) == 2
    _one_error_line(capsys)
    assert (tmp_path / "file").read_text() == "a file"


def _dynamic_conv(path):
    """A conv model exported with dynamic height and width."""
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["y"], ["z"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 8, "h", "w"])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)


def test_a_model_with_symbolic_sizes_is_profiled_at_the_shape_given(tmp_path, capsys):
    _dynamic_conv(tmp_path / "dynamic.onnx")
    tables = str(tmp_path / "tables")
    base = ["profile", str(tmp_path / "dynamic.onnx"), "--tables", tables, "--fit-policies", "1", "--force-fit", "--json"]
    assert main(base) == 2
    assert "--shape NAME:DIMS" in _one_error_line(capsys)
    assert main([*base, "--shape", "x:1x3x12x12"]) == 0
    table = json.loads(capsys.readouterr().out)["table"]
    assert any("x3x12x12" in key for key in json.loads(open(table).read())["entries"])
    np.savez(tmp_path / "proxy.npz", x=np.zeros((4, 3, 10, 10), np.float32))
    assert main([*base, "--proxy", str(tmp_path / "proxy.npz")]) == 0
    assert any("x3x10x10" in key for key in json.loads(open(table).read())["entries"])


def test_interrupted_builds_leave_no_output_or_a_whole_one(tinynet, tmp_path):
    """SIGINT at spread-out moments of a build: each run ends in the one line or in a complete build."""
    spec, proxy = tinynet
    delays = np.random.default_rng(7).uniform(0.5, 6.0, size=3)
    for i, delay in enumerate(delays):
        out = tmp_path / f"o{i}"
        process = subprocess.Popen([sys.executable, "-m", "mpqc.cli", "build", spec, "--proxy", str(proxy), "--runs", "50",
                                    "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=300)
        if process.returncode == 130:  # nothing written, or (a signal after the final rename) all of it
            assert err.endswith("mpqc: interrupted\n") and "Traceback" not in err
            assert not out.exists() or {"model.qdq.onnx", "build.json"} <= {p.name for p in out.iterdir()}
        else:  # it finished before the signal
            assert process.returncode == 0, f"exit {process.returncode} after a Ctrl-C at {delay:.2f} s: {err[-2000:]}"
            assert {"model.qdq.onnx", "build.json"} <= {p.name for p in out.iterdir()}
        assert not [p for p in os.listdir(tmp_path) if p.startswith(f".o{i}")]
