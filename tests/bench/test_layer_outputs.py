"""Layer-wise errors: intermediate tensors read out as extra outputs, and their SQNR and cosine
against the reference, on a two-layer model whose candidate error is known exactly."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mpqc.backends.base import backend_for
from mpqc.bench.layer_outputs import Probed, batches, tensor_errors, with_outputs
from mpqc.errors import MpqcError
from mpqc.targets import load_target

RNG = np.random.default_rng(0)
W1, W2 = RNG.standard_normal((4, 6)).astype(np.float32), RNG.standard_normal((6, 3)).astype(np.float32)


def _model(scale: float) -> onnx.ModelProto:
    """x -> MatMul(W1 x scale) -> h -> Relu -> r -> MatMul(W2) -> y: every tensor after x is `scale` times the reference's."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
                              [numpy_helper.from_array(W1 * np.float32(scale), "w1"), numpy_helper.from_array(W2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _probed(scale: float, names: list[str]) -> Probed:
    target = load_target("ort-cpu")
    data, outputs = with_outputs(_model(scale), names, "the model")
    return Probed(backend_for(target).load(data, target), outputs)


def test_a_uniformly_scaled_candidate_has_the_known_error_on_every_tensor():
    names = ["h", "r", "y"]
    reference, candidate = _probed(1.0, names), _probed(1.01, names)
    assert reference.outputs == ("y", "h", "r")  # the model's own output first, then the added ones
    x = RNG.standard_normal((40, 4)).astype(np.float32)
    feeds = {"x": x[(x @ W1 > 0).any(1)][:20]}  # no sample whose ReLU output is all zeros (those agree exactly)
    target = load_target("ort-cpu")
    unprobed = backend_for(target).load(_model(1.01).SerializeToString(), target)
    errors, effect = tensor_errors(reference, candidate, batches(feeds, 8), names, unprobed=unprobed.run)
    for name in names:  # noise = 0.01 x signal everywhere: 40 dB, cosine 1, relative error 0.01
        assert errors[name]["sqnr_db"] == pytest.approx(40.0, abs=1e-3)
        assert errors[name]["cosine_mean"] == pytest.approx(1.0, abs=1e-6)
        assert errors[name]["relative_l2_error"] == pytest.approx(0.01, rel=1e-3)
    assert effect["sqnr_db"] > 100  # reading out h and r leaves y as it was


def test_the_reference_against_itself_has_no_error_and_batches_cover_every_sample():
    names = ["h"]
    feeds = {"x": RNG.standard_normal((19, 4)).astype(np.float32)}
    assert sum(len(batch["x"]) for batch in batches(feeds, 8)) == 19
    errors, effect = tensor_errors(_probed(1.0, names), _probed(1.0, names), batches(feeds, 8), names)
    assert errors["h"]["sqnr_db"] == float("inf") and errors["h"]["cosine_mean"] == pytest.approx(1.0)
    assert effect is None


def test_a_tensor_the_model_does_not_have_is_one_error():
    with pytest.raises(MpqcError, match="has no tensor 'nope'; it was not built from this model"):
        with_outputs(_model(1.0), ["h", "nope"], "the model")
