"""`mpqc` end to end: the commands a build step runs, their JSON, determinism and bad input."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from mpqc.backends.onnxruntime.runner import int8_saturation_note
from mpqc.cli import main
from mpqc.targets import load_target


def _run_json(capsys, *argv) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_build_the_mnist_example_on_ort_cpu(tmp_path, capsys):
    out = tmp_path / "build"
    result = _run_json(capsys, "build", "mnist-cnn", "--target", "ort-cpu", "--out", str(out), "--runs", "5", "--warmup", "1")
    record = result["build"]
    assert {p.name for p in out.iterdir()} == {"model.qdq.onnx", "policy.json", "build.json", "report.md", "report.html"}
    assert json.loads((out / "build.json").read_text()) == record
    fidelity = record["measured"]["fidelity"]
    assert fidelity["reference_accuracy"] >= 0.985
    # Without VNNI, ONNX Runtime's INT8 kernels saturate: 0.5 points were measured there (the build says so).
    saturating = int8_saturation_note(load_target("ort-cpu")) is not None
    assert ("int8_note" in record["measured"]) == saturating
    assert fidelity["accuracy_drop"] <= (1.0 if saturating else 0.5)  # points
    assert record["measured"]["latency_built"]["runs"] == 5
    assert set(record["policy"]["counts"]) == {"w8a8"}
    assert [row["torch_module"] for row in record["layers"]][:2] == ["stem.conv", "block1.conv1"]
    assert "| built |" in (out / "report.md").read_text()


def test_same_inputs_give_the_same_bytes_and_export_reproduces_the_build(tinynet, tmp_path, capsys):
    spec, proxy = tinynet
    common = ["--proxy", str(proxy), "--no-measure"]
    _run_json(capsys, "build", spec, "--out", str(tmp_path / "a"), "--policy", "uniform:w8a8", *common)
    _run_json(capsys, "build", spec, "--out", str(tmp_path / "b"), "--policy", "uniform:w8a8", *common)
    _run_json(capsys, "export", spec, "--out", str(tmp_path / "c"), "--policy", str(tmp_path / "a" / "policy.json"), *common)
    for name in ("model.qdq.onnx", "policy.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "model.qdq.onnx").read_bytes() == (tmp_path / "c" / "model.qdq.onnx").read_bytes()


def test_bench_and_inspect(tinynet, tmp_path, capsys):
    spec, proxy = tinynet
    _run_json(capsys, "build", spec, "--out", str(tmp_path / "a"), "--proxy", str(proxy), "--no-measure")
    bench = _run_json(capsys, "bench", str(tmp_path / "a" / "model.qdq.onnx"), "--runs", "5", "--batch", "4")
    latency = bench["latency"]
    assert latency["batch"] == 4 and latency["threads"] == 2
    assert 0 < latency["min_ms"] <= latency["median_ms"] <= latency["p90_ms"] <= latency["p99_ms"]
    inspect = _run_json(capsys, "inspect", spec)
    assert [row["name"] for row in inspect["layers"]] == ["conv1", "conv2", "down", "fc"]
    assert inspect["ties"] == [["conv1", "down"]]


def test_the_installed_command_prints_a_summary(tinynet, tmp_path):
    spec, proxy = tinynet
    done = subprocess.run(
        [sys.executable, "-m", "mpqc.cli", "build", spec, "--proxy", str(proxy), "--out", str(tmp_path / "o"), "--runs", "3"],
        capture_output=True, text=True, check=True,
    )
    assert "latency (batch 1" in done.stdout and "fidelity vs fp32" in done.stdout


def _onnx_without_layers(path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)


def _bad_inputs(tmp_path, proxy):
    x = np.load(proxy)["input"]
    np.savez(tmp_path / "nan.npz", input=np.where(np.arange(x.size).reshape(x.shape) == 7, np.nan, x).astype(np.float32))
    np.savez(tmp_path / "empty.npz", input=x[:0])
    np.savez(tmp_path / "shape.npz", input=x[:, :, :8, :8])
    np.savez(tmp_path / "name.npz", pixels=x)
    (tmp_path / "corrupt.onnx").write_bytes(b"\x08\x07not really a model" * 10)
    _onnx_without_layers(tmp_path / "relu.onnx")
    (tmp_path / "ghost.json").write_text(json.dumps({"layers": {"conv9": "w8a8"}}))
    (tmp_path / "split.json").write_text(json.dumps({"layers": {"conv1": "w8a8", "down": "fp32"}}))
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "notes.txt").write_text("keep me")


BAD = [
    (["build", "missing.onnx"], "does not exist"),
    (["build", "corrupt.onnx"], "not a readable ONNX model"),
    (["build", "relu.onnx"], "no quantizable layers"),
    (["build", "tinynet:make", "--proxy", "nan.npz"], "NaN"),
    (["build", "tinynet:make", "--proxy", "empty.npz"], "empty"),
    (["build", "tinynet:make", "--proxy", "shape.npz"], "the model wants Nx3x16x16"),
    (["build", "tinynet:make", "--proxy", "name.npz"], "lacks input(s) input"),
    (["build", "tinynet:make", "--proxy", "missing.npz"], "does not exist"),
    (["build", "tinynet:make"], "needs proxy data"),
    (["build", "tinynet:make", "--proxy", "proxy.npz", "--target", "tpu-v9"], "unknown target 'tpu-v9'"),
    (["build", "tinynet:make", "--proxy", "proxy.npz", "--policy", "uniform:w3a3"], "unknown precision 'w3a3'"),
    (["build", "tinynet:make", "--proxy", "proxy.npz", "--policy", "ghost.json"], "not in the model: conv9"),
    (["build", "tinynet:make", "--proxy", "proxy.npz", "--policy", "split.json"], "must have one precision"),
    (["build", "nomodule:make"], "cannot load factory"),
]


@pytest.mark.parametrize(("argv", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_input_is_one_clear_line_and_writes_nothing(tinynet, tmp_path, capsys, argv, message):
    _, proxy = tinynet
    _bad_inputs(tmp_path, proxy)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main([*argv, "--out", "result"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mpqc: error: ") and message in err and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no --out folder, no staging left behind


def test_an_occupied_out_folder_is_never_replaced(tinynet, tmp_path, capsys):
    spec, proxy = tinynet
    _bad_inputs(tmp_path, proxy)
    assert main(["build", spec, "--proxy", str(proxy), "--out", "occupied"]) == 2
    assert "not an mpqc build folder" in capsys.readouterr().err
    assert (tmp_path / "occupied" / "notes.txt").read_text() == "keep me"


def test_tensorrt_targets_are_checked_against_tensorrt_rules_and_not_timed(tmp_path, capsys):
    from mpqc.targets import find_target_file

    trt = str(find_target_file("trt-a100"))
    record = _run_json(capsys, "build", "mnist-cnn", "--target", trt, "--out", str(tmp_path / "a"))["build"]
    # Fidelity is the QDQ model's numerics, run by ONNX Runtime; latency needs the engine.
    assert "latency_built" not in record["measured"] and "tensorrt" in record["not_measured"]
    assert record["measured"]["fidelity"]["accuracy_drop"] <= 0.01
    assert "Fidelity vs FP32" in (tmp_path / "a" / "report.md").read_text()
    # trt-a100's float type is float16: every float initializer of the model is FLOAT16.
    model = onnx.load(tmp_path / "a" / "model.qdq.onnx")
    floats = {init.data_type for init in model.graph.initializer} - {onnx.TensorProto.INT8, onnx.TensorProto.INT4, onnx.TensorProto.INT64}
    assert floats == {onnx.TensorProto.FLOAT16}
    # Per-channel INT4 on a Gemm is an ONNX Runtime study format, not a TensorRT one: refused.
    assert main(["build", "mnist-cnn", "--target", trt, "--policy", "uniform:w4a8", "--evaluate-only", "--out", str(tmp_path / "b")]) == 2
    assert "breaks 1 TensorRT rule" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_check_lints_any_qdq_model_against_tensorrts_rules(tmp_path, capsys):
    """`mpqc check` on a model from elsewhere: exit 0 when it follows the rules, 1 with every violation
    named when it does not, 2 for what is not a model or not a TensorRT target."""
    model = onnx.load(_tiny_qdq_model(tmp_path))
    good = tmp_path / "good.onnx"
    onnx.save(model, good)
    assert main(["check", str(good), "--target", "trt-orin"]) == 0
    assert "follows TensorRT's explicit-quantization rules for target trt-orin" in capsys.readouterr().out

    zero = next(i for i in model.graph.initializer if i.name == "x.zero")
    zero.CopyFrom(onnx.numpy_helper.from_array(np.array(3, np.int8), "x.zero"))  # asymmetric: TensorRT refuses it
    bad = tmp_path / "bad.onnx"
    onnx.save(model, bad)
    assert main(["check", str(bad), "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["target"] == "trt-a100" and {v["rule"] for v in result["violations"]} == {"zero-point"}
    assert len(result["violations"]) == 2  # the Q and the DQ that share it

    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    assert main(["check", str(tmp_path / "junk.onnx")]) == 2
    assert capsys.readouterr().err.startswith("mpqc: error: ")
    assert main(["check", str(good), "--target", "ort-cpu"]) == 2
    assert "check takes a TensorRT target" in capsys.readouterr().err


def _tiny_qdq_model(tmp_path) -> str:
    """x -> Q -> DQ -> Conv <- DQ(INT8 per-channel weight): symmetric, as TensorRT wants it."""
    from onnx import numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "x.scale"), numpy_helper.from_array(np.array(0, np.int8), "x.zero"),
             numpy_helper.from_array(rng.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8), "w.q"),
             numpy_helper.from_array(np.full(4, 0.01, np.float32), "w.scale"), numpy_helper.from_array(np.zeros(4, np.int8), "w.zero")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x.scale", "x.zero"], ["x.q"], name="conv.input.q"),
             helper.make_node("DequantizeLinear", ["x.q", "x.scale", "x.zero"], ["x.dq"], name="conv.input.dq0"),
             helper.make_node("DequantizeLinear", ["w.q", "w.scale", "w.zero"], ["w.dq"], axis=0, name="conv.weight.dq"),
             helper.make_node("Conv", ["x.dq", "w.dq"], ["y"], name="conv")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], inits)
    path = tmp_path / "template.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)
    return str(path)


@pytest.mark.parametrize("method", ["minmax", "mse", "percentile"])
def test_a_model_that_overflows_on_its_proxy_is_one_error_for_every_calibration(tmp_path, capsys, method):
    huge = onnx.numpy_helper.from_array(np.full((4, 4), 1e38, np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="first"), helper.make_node("MatMul", ["h", "w"], ["y"], name="second")],
        "overflow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [huge])
    model = tmp_path / "overflow.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model)
    proxy = tmp_path / "proxy.npz"
    np.savez(proxy, x=np.ones((1, 4), np.float32))
    out = tmp_path / "out"
    code = main(["build", str(model), "--target", "ort-cpu", "--policy", "uniform:w8a8", "--proxy", str(proxy),
                 "--calibration", method, "--out", str(out), "--no-measure"])
    assert code == 2
    assert capsys.readouterr().err.strip() == "mpqc: error: calibration produced non-finite ranges: the model overflows on the proxy data"
    assert not out.exists()
