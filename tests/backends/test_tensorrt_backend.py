"""The TensorRT backend: what runs without TensorRT here, and what needs TensorRT and a GPU.

Runs everywhere: inspector-JSON parsing and the policy comparison, per-layer time attribution,
the one-line errors when TensorRT or cuda-python is missing (through the API and the CLI), and a
TensorRT-target build that succeeds without TensorRT and says no engine was built.

Needs TensorRT + GPU (marked and skipped with the reason elsewhere): building an engine from a
lowered mnist-cnn with w8a8 / w4a8 (plugin) convs and a w4a16 fc, running it against ONNX Runtime,
its precision report and per-layer profiler times.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import onnx
import pytest

from mpqc.backends.tensorrt import engine as trt_backend
from mpqc.backends.tensorrt.inspector import (
    attribute_layer_times,
    compare_with_policy,
    engine_float_type,
    fused_nodes,
    layer_precisions,
    parse_datatype,
    precision_report,
)
from mpqc.backends.tensorrt.int4_conv_plugin_graph import rewrite_int4_convs
from mpqc.cli import main
from mpqc.errors import MpqcError
from mpqc.targets import Plugins

# An engine inspector report in the format TensorRT documents for ProfilingVerbosity.DETAILED
# (get_engine_information(LayerInformationFormat.JSON)), written by hand for mnist-cnn with the
# tests' mixed policy. It is NOT captured from a real engine: layer types, format strings and
# the metadata separator follow the documentation and may differ in detail from a given release.
INSPECTOR_JSON = {
    "Layers": [
        {"Name": "stem.conv.input.q", "LayerType": "Scale",
         "Inputs": [{"Name": "image", "Location": "Device", "Dimensions": [1, 1, 28, 28], "Format/Datatype": "Row major linear FP32"}],
         "Outputs": [{"Name": "stem.conv.input.quantized", "Format/Datatype": "Row major linear Int8"}],
         "TacticName": "", "Metadata": "[ONNX Layer: stem.conv.input.q]"},
        {"Name": "stem.conv.input.dq0 + stem.conv.weight.dq + stem.conv + node_relu", "LayerType": "CaskConvolution",
         "Inputs": [{"Name": "stem.conv.input.quantized", "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}],
         "Outputs": [{"Name": "relu", "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}],
         "Weights": {"Type": "Int8", "Count": 144}, "Bias": {"Type": "Float", "Count": 16},
         "TacticName": "sm80_xmma_fprop_implicit_gemm_interleaved_i8i8_i8i32_f32", "TacticValue": "0x0000000000000001",
         "Metadata": "[ONNX Layer: stem.conv.input.dq0]\x1f[ONNX Layer: stem.conv.weight.dq]\x1f[ONNX Layer: stem.conv]\x1f[ONNX Layer: node_relu]"},
        {"Name": "block1.conv1", "LayerType": "PluginV3",
         "Inputs": [{"Name": "block1.conv1.input.quantized", "Format/Datatype": "Row major linear Int8"}],
         "Outputs": [{"Name": "getitem_3", "Format/Datatype": "Row major linear FP32"}],
         "TacticName": "", "Metadata": "[ONNX Layer: block1.conv1]"},
        {"Name": "block1.shortcut.conv", "LayerType": "PluginV3",
         "Inputs": [{"Name": "block1.conv1.input.quantized", "Format/Datatype": "Row major linear Int8"}],
         "Outputs": [{"Name": "getitem_9", "Format/Datatype": "Row major linear FP32"}], "Metadata": "[ONNX Layer: block1.shortcut.conv]"},
        # Asked for w8a8, but this engine runs it in float: the finding the report exists for.
        {"Name": "block1.conv2.weight.dq + block1.conv2", "LayerType": "CaskConvolution",
         "Inputs": [{"Name": "block1.conv2.input.dequantized0", "Format/Datatype": "Row major linear FP32"}],
         "Outputs": [{"Name": "getitem_6", "Format/Datatype": "Row major linear FP32"}], "Weights": {"Type": "Float", "Count": 9216}},
        {"Name": "block1.conv2.input.q + block1.conv2.input.dq0", "LayerType": "PointWiseV2",
         "Inputs": [{"Name": "relu_1", "Format/Datatype": "Row major linear FP32"}],
         "Outputs": [{"Name": "block1.conv2.input.dequantized0", "Format/Datatype": "Row major linear FP32"}]},
        {"Name": "Reformatting CopyNode for Input Tensor 0 to block2.conv1", "LayerType": "Reformat",
         "Inputs": [{"Name": "relu_2", "Format/Datatype": "Row major linear Int8"}],
         "Outputs": [{"Name": "relu_2 copy", "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}]},
        {"Name": "block2.conv1.input.dq0 + block2.conv1.weight.dq + block2.conv1 + node_relu_3", "LayerType": "CaskConvolution",
         "Inputs": [{"Name": "relu_2 copy", "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}],
         "Outputs": [{"Name": "relu_3", "Format/Datatype": "Row major linear FP32"}], "Weights": {"Type": "Int8", "Count": 18432}},
        {"Name": "block2.conv2", "LayerType": "PluginV3",
         "Inputs": [{"Name": "block2.conv2.input.quantized", "Format/Datatype": "Row major linear Int8"}],
         "Outputs": [{"Name": "getitem_15", "Format/Datatype": "Row major linear FP32"}]},
        {"Name": "block2.shortcut.conv", "LayerType": "CaskConvolution",
         "Inputs": [{"Name": "relu_2", "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}],
         "Outputs": [{"Name": "getitem_18", "Format/Datatype": "Row major linear FP32"}], "Weights": {"Type": "Half", "Count": 2048}},
        # block3.conv1 (w4a8) is missing: it went into the Myelin region below, which names only its ends.
        {"Name": "{ForeignNode[block3.conv1.input.q...block3.conv2]}", "LayerType": "Myelin",
         "Inputs": [{"Name": "relu_4", "Format/Datatype": "Row major linear FP32"}],
         "Outputs": [{"Name": "getitem_24", "Format/Datatype": "Row major linear FP32"}]},
        {"Name": "fc.weight.dq + fc + fc.bias", "LayerType": "Myelin",
         "Inputs": [{"Name": "flatten", "Format/Datatype": "Row major linear FP32"}],
         "Outputs": [{"Name": "logits", "Format/Datatype": "Row major linear FP32"}],
         "Metadata": "[ONNX Layer: fc.weight.dq]\x1f[ONNX Layer: fc]\x1f[ONNX Layer: fc.bias]"},
    ],
    "Bindings": ["image", "logits"],
}

MIXED = {"stem.conv": "w8a8", "block1.conv1": "w4a8", "block1.conv2": "w8a8", "block1.shortcut.conv": "w4a8",
         "block2.conv1": "w8a8", "block2.conv2": "w4a8", "block2.shortcut.conv": "fp32", "block3.conv1": "w4a8",
         "block3.conv2": "w8a8", "fc": "w4a16"}


def test_format_strings_name_their_data_type():
    assert parse_datatype("Row major linear FP32") == "FP32"
    assert parse_datatype("Thirty-two wide channel vectorized row major Int8 format") == "INT8"
    assert parse_datatype("Channel major FP16 format where channel % 8 == 0") == "FP16"
    assert parse_datatype("Row major linear BF16") == "BF16"
    assert parse_datatype("Half") == "FP16" and parse_datatype("Float") == "FP32" and parse_datatype("Int4") == "INT4"
    assert parse_datatype("Row major linear") is None and parse_datatype(None) is None


def test_fused_layer_names_and_metadata_give_the_onnx_nodes():
    assert fused_nodes("a.q + a + relu") == ("a.q", "a", "relu")
    assert fused_nodes("a + b", "[ONNX Layer: a]\x1f[ONNX Layer: b]\x1f[ONNX Layer: c]") == ("a", "b", "c")  # metadata wins
    assert fused_nodes("a + b", "") == ("a", "b")
    assert fused_nodes("{ForeignNode[first...last]}") == ("first", "last")
    assert fused_nodes("Reformatting CopyNode for Input Tensor 0 to a") == ("Reformatting CopyNode for Input Tensor 0 to a",)


def test_the_inspector_report_says_what_each_engine_layer_runs():
    layers = layer_precisions(json.dumps(INSPECTOR_JSON))
    assert len(layers) == len(INSPECTOR_JSON["Layers"])
    stem = layers["stem.conv.input.dq0 + stem.conv.weight.dq + stem.conv + node_relu"]
    assert (stem.compute_type, stem.weight_type, stem.is_plugin) == ("INT8", "INT8", False)
    assert stem.nodes == ("stem.conv.input.dq0", "stem.conv.weight.dq", "stem.conv", "node_relu")
    assert layers["block1.conv1"].is_plugin and layers["block1.conv1"].output_types == ("FP32",)
    assert layers["block2.shortcut.conv"].compute_type == "FP16"
    # Built without DETAILED verbosity the inspector lists names only: still parsed.
    names_only = layer_precisions({"Layers": ["a + b", "c"]})
    assert names_only["a + b"].nodes == ("a", "b") and names_only["c"].compute_type is None


def test_the_policy_comparison_finds_the_layers_that_do_not_run_as_asked():
    findings = compare_with_policy(layer_precisions(INSPECTOR_JSON), MIXED, list(MIXED))
    by_layer = {finding.layer: finding for finding in findings}
    assert sorted(by_layer) == ["block1.conv2", "block2.shortcut.conv", "block3.conv1", "block3.conv2"]
    assert by_layer["block1.conv2"].message == (
        "layer 'block1.conv2' asked for w8a8 but runs FP32 (engine layer 'block1.conv2.weight.dq + block1.conv2')")
    assert by_layer["block2.shortcut.conv"].runs == "FP16"  # fp32 asked; a strongly typed engine should not do this
    # The Myelin region names only its ends: its end node is found but its precision is hidden; its inner one is not found.
    assert by_layer["block3.conv2"].runs == "unknown (inside a Myelin region)"
    assert by_layer["block3.conv1"].runs == "not found" and "ForeignNode" in by_layer["block3.conv1"].message

    report = precision_report(layer_precisions(INSPECTOR_JSON), MIXED, list(MIXED))
    assert report["layers"]["block1.conv1"] == {"asked": "w4a8", "runs": "INT4 conv plugin", "engine_layers": ["block1.conv1"], "ok": True}
    assert report["layers"]["fc"]["runs"] == "FP32 with INT4 weights" and report["layers"]["fc"]["ok"]
    assert report["layers"]["stem.conv"]["ok"] and report["layers"]["block2.conv1"]["runs"] == "INT8"
    assert report["plugin_layers"] == ["block1.conv1", "block1.shortcut.conv", "block2.conv2"]
    assert len(report["findings"]) == 4


def test_float_layers_must_run_in_the_models_float_type():
    layers = layer_precisions(INSPECTOR_JSON)
    # block2.shortcut.conv asked for fp32 (float) and runs FP16: right for a FLOAT16 model, wrong for a FLOAT one.
    assert "block2.shortcut.conv" in {f.layer for f in compare_with_policy(layers, MIXED, list(MIXED), "FP32")}
    assert "block2.shortcut.conv" not in {f.layer for f in compare_with_policy(layers, MIXED, list(MIXED), "FP16")}
    assert engine_float_type(trt_backend_target()) == "FP16"
    assert engine_float_type(dataclasses.replace(trt_backend_target(), float_type="float32")) == "FP32"


def test_a_w4a8_conv_outside_the_plugin_and_an_unfused_int4_weight_are_findings():
    info = {"Layers": [
        {"Name": "c.input.dq0 + c.weight.dq + c", "LayerType": "CaskConvolution",
         "Inputs": [{"Format/Datatype": "Row major linear Int8"}], "Outputs": [{"Format/Datatype": "Row major linear FP32"}]},
        {"Name": "fc.weight.dq", "LayerType": "Dequantize", "Inputs": [{"Format/Datatype": "Row major linear Int4"}],
         "Outputs": [{"Format/Datatype": "Row major linear FP32"}]},
        {"Name": "fc", "LayerType": "CaskGemm", "Inputs": [{"Format/Datatype": "Row major linear FP32"}],
         "Outputs": [{"Format/Datatype": "Row major linear FP32"}]},
    ]}
    findings = {f.layer: f for f in compare_with_policy(layer_precisions(info), {"c": "w4a8", "fc": "w4a16"}, ["c", "fc"])}
    assert "must run through mpqc's INT4 conv plugin" in findings["c"].message and findings["c"].runs == "INT8"
    assert findings["fc"].runs == "FP32 with weights dequantized by a separate layer"


def test_per_layer_times_go_to_the_layer_whose_nodes_the_engine_layer_holds():
    layers = layer_precisions(INSPECTOR_JSON)
    times = {name: 1.0 for name in layers}
    per_layer, unattributed = attribute_layer_times(times, layers, list(MIXED))
    # The stem's own input Q counts for the stem; block1.conv2's separate Q/DQ layer counts for it.
    assert per_layer["stem.conv"] == 2.0 and per_layer["block1.conv2"] == 2.0
    assert per_layer["block1.conv1"] == 1.0 and per_layer["fc"] == 1.0
    # The Myelin region holds block3.conv1's Q and block3.conv2: block3.conv2 takes it.
    assert per_layer["block3.conv2"] == 1.0 and per_layer["block3.conv1"] == 0.0
    assert unattributed == 1.0  # the reformat
    assert sum(per_layer.values()) + unattributed == pytest.approx(sum(times.values()))


# --- without TensorRT ------------------------------------------------------------------------------


@pytest.fixture()
def without_tensorrt(monkeypatch):
    """Make `import tensorrt` fail even where it is installed (None in sys.modules blocks an import)."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


def test_missing_tensorrt_is_one_clear_error(without_tensorrt):
    assert trt_backend.tensorrt_unavailable_reason() == trt_backend.MISSING_TENSORRT
    for call in (trt_backend.require_tensorrt, lambda: trt_backend.TensorRTRunner(b""),
                 lambda: trt_backend.build_engine(b"", trt_backend_target())):
        with pytest.raises(MpqcError) as raised:
            call()
        assert str(raised.value) == "TensorRT is not installed: install mpqc[tensorrt] on the machine with the GPU"


def test_missing_cuda_python_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "cuda", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    with pytest.raises(MpqcError, match=r"^cuda-python is not installed: install mpqc\[tensorrt\]"):
        trt_backend.import_cudart()


def trt_backend_target():
    from mpqc.targets import load_target

    return load_target("trt-orin")


def test_profile_on_a_tensorrt_target_without_tensorrt_is_one_line(without_tensorrt, capsys):
    assert main(["profile", "mnist-cnn", "--target", "trt-orin"]) == 2
    err = capsys.readouterr().err
    assert err == "mpqc: error: TensorRT is not installed: install mpqc[tensorrt] on the machine with the GPU\n"


def test_a_tensorrt_build_without_tensorrt_succeeds_and_says_no_engine_was_built(without_tensorrt, tmp_path, capsys):
    out = tmp_path / "build"
    assert main(["build", "mnist-cnn", "--target", "trt-orin", "--policy", "uniform:w8a8", "--out", str(out)]) == 0
    assert "no tensorrt engine built: TensorRT is not installed" in capsys.readouterr().out
    record = json.loads((out / "build.json").read_text())
    assert record["tensorrt_engine"] == {"engine_built": False, "reason": trt_backend.MISSING_TENSORRT}
    assert {p.name for p in out.iterdir()} == {"model.qdq.onnx", "policy.json", "build.json", "report.md", "report.html"}
    assert "model.engine" not in record["artifacts"]


def test_a_batch_range_must_be_ordered():
    assert trt_backend.batch_range(trt_backend_target(), 4) == trt_backend.BatchRange(1, 4, 32)
    with pytest.raises(MpqcError, match="1 <= min <= opt <= max"):
        trt_backend.BatchRange(1, 8, 4)


def test_targets_without_the_plugin_keep_their_int4_convs(lowered_mnist):

    model_bytes, *_ = lowered_mnist
    no_plugin = dataclasses.replace(trt_backend_target(), plugins=Plugins())
    assert trt_backend.prepare_for_tensorrt(model_bytes, no_plugin) == (model_bytes, [])
    rewritten, names = trt_backend.prepare_for_tensorrt(model_bytes, trt_backend_target())
    assert len(names) == 4 and rewritten != model_bytes


# --- with a GPU (cuda-python only) and with TensorRT ----------------------------------------------


@pytest.mark.gpu
def test_device_buffers_round_trip_through_cuda_python():
    pytest.importorskip("cuda.bindings", reason="cuda-python is not installed: engines run only on a GPU machine with mpqc[tensorrt]")
    cudart = trt_backend.import_cudart()
    count = cudart.cudaGetDeviceCount()
    if int(count[0]) != 0 or count[1] == 0:
        pytest.skip("no CUDA GPU here")
    buffer = trt_backend._DeviceBuffer(cudart)
    stream = trt_backend._check(cudart.cudaStreamCreate(), "create a stream")
    data = np.arange(1000, dtype=np.float32)
    back = np.empty_like(data)
    pointer = buffer.ensure(data.nbytes)
    assert buffer.ensure(16) == pointer  # large enough: no new allocation
    trt_backend._check(cudart.cudaMemcpyAsync(pointer, data.ctypes.data, data.nbytes,
                                              cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream), "copy in")
    trt_backend._check(cudart.cudaMemcpyAsync(back.ctypes.data, pointer, data.nbytes,
                                              cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream), "copy out")
    trt_backend._check(cudart.cudaStreamSynchronize(stream), "synchronize")
    buffer.free()
    cudart.cudaStreamDestroy(stream)
    np.testing.assert_array_equal(back, data)


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_an_engine_of_the_mixed_mnist_model_runs_like_onnx_runtime_and_reports_its_precisions(lowered_mnist, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed: engines are built and run only on a GPU machine with mpqc[tensorrt]")
    from mpqc.backends.onnxruntime.runner import OrtRunner, numerics_target

    model_bytes, policy, analysis, images = lowered_mnist
    target = trt_backend_target()
    plugin_model, rewritten = rewrite_int4_convs(onnx.ModelProto.FromString(model_bytes))
    assert len(rewritten) == 4
    cache = tmp_path / "timing.cache"
    engine = trt_backend.build_engine(plugin_model.SerializeToString(), target, timing_cache_path=cache,
                                      batch=trt_backend.BatchRange(1, 16, 32))
    assert cache.is_file() and cache.stat().st_size > 0
    reference = OrtRunner(model_bytes, numerics_target()).run({"image": images})[0]
    with trt_backend.TensorRTRunner(engine) as runner:
        [logits] = runner.run({"image": images})
        assert logits.shape == reference.shape
        # Same integers, different float summation order (and INT8 rounding ties): close, same digits.
        assert np.abs(logits - reference).max() <= 0.05 * np.abs(reference).max()
        assert (logits.argmax(1) == reference.argmax(1)).mean() >= 0.95
        layers = runner.layer_precisions()
        report = precision_report(layers, policy, analysis.layers, engine_float_type(target))
        for name, precision in policy.assignments:
            row = report["layers"][name]
            if precision == "w8a8":
                assert row["runs"] == "INT8", row
            if precision == "w4a8":
                assert row["runs"] == "INT4 conv plugin", row
            if precision == "fp32":  # the model is FLOAT16: its float layers run FP16
                assert row["runs"] == "FP16", row
        times = runner.layer_times({"image": images[:1]}, runs=5)
        assert times and all(ms >= 0 for ms in times.values())
        per_layer, _ = attribute_layer_times(times, layers, [layer.name for layer in analysis.layers])
        assert per_layer["block1.conv1"] > 0
        stats = runner.latency({"image": images[:1]}, warmup=2, runs=5)
        assert stats.median_ms > 0
    print(json.dumps(report["findings"], indent=1))  # the engine's own answer to "which layers stayed FP32?"


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_a_tensorrt_build_writes_the_engine_and_its_precision_report(tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed: engines are built only on a GPU machine with mpqc[tensorrt]")
    out = tmp_path / "build"
    assert main(["build", "mnist-cnn", "--target", "trt-orin", "--policy", "uniform:w8a8", "--out", str(out),
                 "--tables", str(tmp_path / "tables")]) == 0
    record = json.loads((out / "build.json").read_text())
    assert record["tensorrt_engine"]["engine_built"] and (out / "model.engine").is_file()
    assert "model.engine" in record["artifacts"]
    rows = record["tensorrt_engine"]["precisions"]["layers"]
    assert all(rows[name]["runs"] == "INT8" for name in rows if name != "fc"), rows  # every conv; the Gemm as TensorRT chooses


class _FakeRunner:
    """Stands in for TensorRTRunner where TensorRT is absent: one "engine layer" per ONNX node of
    the model it is given, each taking 0.01 ms (0.02 ms for an Int4Conv); whole runs take 80% of the sum."""

    def __init__(self, model_bytes: bytes):
        nodes = onnx.ModelProto.FromString(model_bytes).graph.node
        self.engine = {"Layers": [{"Name": n.name, "LayerType": "PluginV3" if n.op_type == "Int4Conv" else n.op_type} for n in nodes]}
        self.times = {n.name: 0.02 if n.op_type == "Int4Conv" else 0.01 for n in nodes}

    def layer_times(self, feeds, runs):
        return dict(self.times)

    def latency(self, feeds, warmup, runs):
        from types import SimpleNamespace

        return SimpleNamespace(median_ms=0.8 * sum(self.times.values()))

    def close(self):
        pass


def test_profiling_fills_a_gpu_fingerprinted_table_from_per_layer_engine_times(monkeypatch, tmp_path):
    """The profile's glue (lowering, rewrite, attribution, table, fit) with TensorRT replaced by _FakeRunner."""
    from mpqc.costmodel.fit import latency_model
    from mpqc.costmodel.table import LatencyTable
    from mpqc.passes.analysis import analyze
    from mpqc.pipeline import profile_tensorrt as tensorrt_profile
    from mpqc.pipeline.options import BuildOptions

    fingerprint = {"gpu": "test GPU", "compute_capability": "8.7", "runtime": "tensorrt 0.0"}
    monkeypatch.setattr(tensorrt_profile, "require_tensorrt", lambda needs_plugin=False: None)
    monkeypatch.setattr(trt_backend, "device_fingerprint", lambda: fingerprint)
    monkeypatch.setattr(tensorrt_profile, "build_engine", lambda model, target, **kwargs: model)
    monkeypatch.setattr(tensorrt_profile, "TensorRTRunner", _FakeRunner)
    analysis, target = analyze("mnist-cnn"), trt_backend_target()
    options = BuildOptions(model="mnist-cnn", target="trt-orin")
    images = analysis.loaded.example.eval_feeds()[0]["image"]
    feeds = {"calibration": {"image": images[:32]}, "timing": {"image": images[:1]}}
    first = tensorrt_profile.profile_trt(analysis, target, feeds, 1, options.calibration_settings(), options.seed, tables=tmp_path, fit_policies=2, runs=1, progress=False)
    table = LatencyTable.for_target(target, tmp_path)
    assert table.fingerprint["gpu"] == "test GPU" and first["table"] == str(table.path)
    assert first["layers"]["measured"] == first["layers"]["distinct"] > 0 and first["layers"]["reused"] == 0
    entries = table.entries.values()
    assert all(entry["source"].startswith("TensorRT IProfiler, uniform:") for entry in entries)
    # An INT4 conv: its Int4Conv (0.02) plus its own input Q (0.01), except the 1x1 shortcut, whose
    # input Q it shares with block1.conv1 and is named after (and counted for) block1.conv1.
    w4a8 = {key: round(e["median_ms"], 6) for key, e in table.entries.items() if "@w4a8@" in key}
    assert sorted(set(w4a8.values())) == [0.02, 0.03]
    assert [key for key, ms in w4a8.items() if ms == 0.02] == [key for key in w4a8 if "|k1x1|" in key]
    assert all(e["median_ms"] == pytest.approx(0.01) for key, e in table.entries.items() if "@fp32@" in key and "Conv" in key)
    model = latency_model(analysis, target, table, 1)  # the ILP can read it
    assert model.predict({layer.name: "fp32" for layer in analysis.layers}) > 0
    again = tensorrt_profile.profile_trt(analysis, target, feeds, 1, options.calibration_settings(), options.seed, tables=tmp_path, fit_policies=2, runs=1, progress=False)
    assert again["layers"]["measured"] == 0 and again["layers"]["reused"] == first["layers"]["distinct"]


def test_tensorrt_latency_tables_are_kept_per_gpu_and_another_gpus_table_is_refused(monkeypatch, tmp_path):
    from mpqc.costmodel.table import LatencyTable

    target = trt_backend_target()
    gpu = {"gpu": "GPU A", "compute_capability": "8.7", "runtime": "tensorrt 0.0"}
    monkeypatch.setattr(trt_backend, "device_fingerprint", lambda: gpu)
    first = LatencyTable.for_target(target, tmp_path)
    assert first.fingerprint == {"target": "trt-orin", **gpu, "builder_optimization_level": 3, "float_type": "float16"}
    # Float layers timed in FP32 are not the FP16 ones: a float32 lowering keeps a table of its own.
    as_float32 = LatencyTable.for_target(dataclasses.replace(target, float_type="float32"), tmp_path)
    assert as_float32.path != first.path
    first.save()
    gpu = {**gpu, "gpu": "GPU B"}
    second = LatencyTable.for_target(target, tmp_path)
    assert second.path != first.path and second.entries == {}
    second.path.write_text(first.path.read_text())  # a table copied over from GPU A
    with pytest.raises(MpqcError, match="measured on another machine, GPU or runtime; run 'mpqc profile' here$"):
        LatencyTable.for_target(target, tmp_path)


def test_a_millisecond_search_for_a_tensorrt_target_without_tensorrt_is_one_line(without_tensorrt, tmp_path, capsys):
    out = tmp_path / "build"
    assert main(["build", "mnist-cnn", "--target", "trt-orin", "--policy", "search", "--budget-ms", "1",
                 "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"mpqc: error: {trt_backend.MISSING_TENSORRT}\n"
    assert not out.exists()
