"""Models as exporters ship them: a batch dimension fixed at 1, image sizes left open. Calibration and
evaluation run them one sample at a time, and a latency search prices them at the proxy's sizes,
the sizes `mpqc profile` measured them at."""

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mpqc.cli import main


def _detector_like(folder):
    """Two convs, input 1x3xHxW with H and W open (a text detector's shape), and 12 proxy images."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.3, (1, 8, 3, 3)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
         helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
         helper.make_node("Sigmoid", ["c2"], ["y"], name="sigmoid")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, "h", "w"])], [w1, w2])
    model = folder / "det.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), model)
    proxy = folder / "det.npz"
    np.savez(proxy, x=rng.uniform(0, 1, (12, 3, 32, 32)).astype(np.float32))
    return str(model), str(proxy)


def test_a_model_with_its_batch_fixed_at_one_calibrates_and_measures_sample_by_sample(tmp_path, capsys):
    model, proxy = _detector_like(tmp_path)
    assert main(["build", model, "--proxy", proxy, "--policy", "uniform:w8a8", "--runs", "2", "--warmup", "0",
                 "--out", str(tmp_path / "o"), "--json"]) == 0
    fidelity = json.loads(capsys.readouterr().out)["build"]["measured"]["fidelity"]
    assert 0.9 < fidelity["cosine_mean"] <= 1.0
    built = onnx.load(tmp_path / "o" / "model.qdq.onnx")
    dims = built.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == [1, 3, "h", "w"]  # the model stays open


def test_a_latency_search_on_open_sizes_finds_the_table_profile_wrote_at_the_proxys_sizes(tmp_path, capsys):
    model, proxy = _detector_like(tmp_path)
    tables = str(tmp_path / "tables")
    # --force-fit: a two-layer model's boundary fit is refused on a noisy machine; the table is what is tested.
    assert main(["profile", model, "--proxy", proxy, "--target", "ort-cpu", "--tables", tables, "--force-fit"]) == 0
    capsys.readouterr()
    assert main(["build", model, "--proxy", proxy, "--policy", "search", "--method", "qerror", "--budget-ms", "1000",
                 "--tables", tables, "--no-measure", "--out", str(tmp_path / "o"), "--json"]) == 0
    search = json.loads(capsys.readouterr().out)["build"]["search"]
    assert search["predicted_ms"] > 0
