"""Hostile and unusual-but-valid ONNX files: each loads with its layers found, or is refused in one line."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mpqc.cli import main
from mpqc.passes.pipeline import canonicalize


def _tensor(name, shape, seed=0):
    return numpy_helper.from_array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), name)


def _conv_model(opset=21, weight=None, bias=None, input_shape=("N", 3, 8, 8)) -> onnx.ModelProto:
    """x -> Conv(3x3, pad 1) -> y, with its weight and bias as initializers."""
    weight = _tensor("w", (4, 3, 3, 3)) if weight is None else weight
    bias = _tensor("b", (4,), 1) if bias is None else bias
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1], auto_pad="NOTSET")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [input_shape[0], weight.dims[0], *input_shape[2:]])],
        [weight, bias],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _save(model, path) -> str:
    onnx.save(model, path)
    return str(path)


def _refused(capsys, argv, *fragments) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mpqc: error: ") and "\n" not in err, err
    for fragment in fragments:
        assert fragment in err
    return err


def _layers(capsys, path) -> list[str]:
    assert main(["inspect", path, "--json"]) == 0
    return [row["name"] for row in json.loads(capsys.readouterr().out)["layers"]]


# -- 1. damaged files -------------------------------------------------------------------------


def _with_bytes_replaced(model, old: bytes, new: bytes) -> bytes:
    data = model.SerializeToString()
    assert old in data and len(old) == len(new)  # same length: the protobuf framing stays valid
    return data.replace(old, new, 1)


@pytest.mark.parametrize(("marker", "field"), [
    (b"conv", "graph.node[0].name"),
    (b"batch", "graph.input[0].type.tensor_type.shape.dim[0].dim_param"),
    (b"NOTSET", "graph.node[0].attribute[0].s"),
])
@pytest.mark.parametrize("command", ["inspect", "check"])
def test_text_that_is_not_utf8_is_one_line(tmp_path, capsys, marker, field, command):
    model = _conv_model(input_shape=("batch", 3, 8, 8))
    path = tmp_path / "flipped.onnx"
    path.write_bytes(_with_bytes_replaced(model, marker, marker[:-1] + b"\xff"))
    argv = [command, str(path)] + (["--target", "trt-a100"] if command == "check" else [])
    _refused(capsys, argv, "is damaged", field, "not UTF-8")


def test_random_damage_loads_or_is_one_line(tmp_path, capsys):
    """Flipped bits and stray bytes anywhere: a model that still parses and checks may load, else one line."""
    data = _conv_model(input_shape=("batch", 3, 8, 8)).SerializeToString()
    rng = np.random.default_rng(0)
    for trial in range(150):
        damaged = bytearray(data)
        for position in rng.integers(0, len(data), size=rng.integers(1, 4)):
            damaged[position] ^= 1 << int(rng.integers(0, 8))
        path = tmp_path / f"damaged{trial}.onnx"
        path.write_bytes(bytes(damaged))
        assert main(["inspect", str(path)]) in (0, 2)
        err = capsys.readouterr().err.strip()
        assert err == "" or (err.startswith("mpqc: error: ") and "\n" not in err), err


def test_truncated_files_are_one_line(tmp_path, capsys):
    data = _conv_model().SerializeToString()
    for cut in (1, len(data) // 4, len(data) // 2, len(data) - 1):
        path = tmp_path / f"cut{cut}.onnx"
        path.write_bytes(data[:cut])
        _refused(capsys, ["inspect", str(path)], str(path))


# -- 2. unusual but valid models --------------------------------------------------------------


def _no_inputs():
    model = _conv_model()
    del model.graph.input[:]
    model.graph.node.insert(0, helper.make_node("Constant", [], ["x"], value=_tensor("x", (1, 3, 8, 8))))
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 1
    return model


def _no_outputs():
    model = _conv_model()
    del model.graph.output[:]
    return model


def _scalar_input():
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "s"], ["xs"]), helper.make_node("MatMul", ["xs", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]), helper.make_tensor_value_info("s", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], [_tensor("w", (4, 5))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _custom_domain():
    model = _conv_model()
    model.graph.node.append(helper.make_node("Mystery", ["y"], ["z"], domain="com.example", name="mystery"))
    model.graph.output[0].name = "z"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    return model


def _two_default_opsets():
    model = _conv_model(opset=17)
    model.opset_import.append(helper.make_opsetid("", 21))
    return model


REFUSED = [
    (_no_inputs, "has no graph inputs"),
    (_no_outputs, "has no graph outputs"),
    (_scalar_input, "input 's' of"),
    (lambda: _conv_model(opset=30), "uses opset 30, newer than the newest this onnx"),
    (_custom_domain, "op 'Mystery' of domain 'com.example'"),
    (_two_default_opsets, "several opsets (17, 21)"),
    (lambda: _conv_model(input_shape=("N", 3, 10**12, 8)), "Nx3x1000000000000x8"),
    (lambda: _conv_model(input_shape=("N", 3, 0, 8)), "Nx3x0x8: a zero dimension"),
]


@pytest.mark.parametrize(("make", "message"), REFUSED, ids=[m for _, m in REFUSED])
def test_valid_models_mpqc_cannot_build_are_refused_with_the_reason(tmp_path, capsys, make, message):
    _refused(capsys, ["inspect", _save(make(), tmp_path / "m.onnx")], message)


def test_a_huge_declared_input_is_refused_before_anything_allocates(tmp_path, capsys):
    path = _save(_conv_model(input_shape=(1, 3, 10**12, 8)), tmp_path / "huge.onnx")
    _refused(capsys, ["bench", path, "--runs", "1"], "elements per sample")  # synthetic feeds would be 24 TB


def _repeated_opset():
    model = _conv_model()
    model.opset_import.append(helper.make_opsetid("", 21))
    return model


def _with_empty_layer():
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w0"], ["e"], name="empty"), helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5]), helper.make_tensor_value_info("e", TensorProto.FLOAT, ["N", 0])],
        [_tensor("w", (4, 5)), numpy_helper.from_array(np.zeros((4, 0), np.float32), "w0")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


HANDLED = [
    (_repeated_opset, ["conv"], "repeated opset import"),
    (_with_empty_layer, ["mm"], "zero-size weight stays float"),
    (lambda: _conv_model(input_shape=(-1, 3, 8, 8)), ["conv"], "batch -1 as old exporters wrote it"),
]


@pytest.mark.parametrize(("make", "layers"), [h[:2] for h in HANDLED], ids=[h[2] for h in HANDLED])
def test_valid_models_load_with_their_layers(tmp_path, capsys, make, layers):
    assert _layers(capsys, _save(make(), tmp_path / "m.onnx")) == layers


def _ir3_model():
    """Opset 7 / IR 3, as old exporters wrote it: every initializer is also listed as a graph input."""
    model = _conv_model(opset=7)
    model.ir_version = 3
    model.graph.input.extend([helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3, 3, 3]),
                              helper.make_tensor_value_info("b", TensorProto.FLOAT, [4])])
    return model


def test_an_ir3_model_with_initializers_as_inputs_builds(tmp_path, capsys):
    path = _save(_ir3_model(), tmp_path / "old.onnx")
    np.savez(tmp_path / "proxy.npz", x=np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32))
    out = tmp_path / "out"
    assert main(["build", path, "--proxy", str(tmp_path / "proxy.npz"), "--no-measure", "--out", str(out)]) == 0
    built = onnx.load(out / "model.qdq.onnx")
    onnx.checker.check_model(built)
    assert built.ir_version >= 4 and [i.name for i in built.graph.input] == ["x"]


# -- 3. non-finite weights --------------------------------------------------------------------


def _with(array_name, values):
    def make():
        weight = _tensor("w", (4, 3, 3, 3))
        bias = _tensor("b", (4,), 1)
        if array_name == "w":
            w = numpy_helper.to_array(weight).copy()
            w[1, 0, 0, 0] = values
            weight = numpy_helper.from_array(w, "w")
        else:
            bias = numpy_helper.from_array(np.array([0.0, values, 0.0, 0.0], np.float32), "b")
        return _conv_model(weight=weight, bias=bias)
    return make


def _batchnorm_with_negative_variance():
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
         helper.make_node("BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["y"], name="bn")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 2, 2])],
        [_tensor("w", (4, 3, 3, 3)), _tensor("scale", (4,)), _tensor("shift", (4,)), _tensor("mean", (4,)),
         numpy_helper.from_array(np.array([1.0, -1.0, 1.0, 1.0], np.float32), "var")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


NON_FINITE = [
    (_with("w", np.nan), "NaN or infinite values in its weight 'w'"),
    (_with("b", np.inf), "NaN or infinite values in its bias 'b'"),
    (_batchnorm_with_negative_variance, "negative values in its variance 'var'"),
]


@pytest.mark.parametrize(("make", "message"), NON_FINITE, ids=[m for _, m in NON_FINITE])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, capsys, make, message):
    _refused(capsys, ["inspect", _save(make(), tmp_path / "m.onnx")], message)


# -- 4. weights in Constant nodes -------------------------------------------------------------


def _constant_weights(weight=None) -> onnx.ModelProto:
    """As paddle2onnx writes it: every weight a Constant node, no initializers."""
    weight = _tensor("w", (4, 3, 3, 3)) if weight is None else weight
    nodes = [
        helper.make_node("Constant", [], ["w"], value=weight),
        helper.make_node("Constant", [], ["b"], value=_tensor("b", (4,), 1)),
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
        helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(np.array([-1, 16], np.int64))),
        helper.make_node("Reshape", ["c", "shape"], ["f"]),
        helper.make_node("Constant", [], ["fw"], value=_tensor("fw", (16, 2), 2)),
        helper.make_node("MatMul", ["f", "fw"], ["y"], name="fc"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_weights_in_constant_nodes_are_layers_and_build(tmp_path, capsys):
    path = _save(_constant_weights(), tmp_path / "paddle.onnx")
    assert _layers(capsys, path) == ["conv", "fc"]
    np.savez(tmp_path / "proxy.npz", x=np.random.default_rng(0).standard_normal((8, 3, 4, 4)).astype(np.float32))
    out = tmp_path / "out"
    assert main(["build", path, "--proxy", str(tmp_path / "proxy.npz"), "--no-measure", "--out", str(out)]) == 0
    capsys.readouterr()
    built = onnx.load(out / "model.qdq.onnx")
    producers = {o: n for n in built.graph.node for o in n.output}
    layers = [n for n in built.graph.node if n.op_type in ("Conv", "MatMul")]
    assert [n.name for n in layers] == ["conv", "fc"]
    assert all(producers[n.input[1]].op_type == "DequantizeLinear" for n in layers)  # quantized weights


def test_a_nan_weight_in_a_constant_node_is_refused(tmp_path, capsys):
    w = np.ones((4, 3, 3, 3), np.float32)
    w[0, 0, 0, 0] = np.nan
    _refused(capsys, ["inspect", _save(_constant_weights(numpy_helper.from_array(w, "w")), tmp_path / "m.onnx")],
             "NaN or infinite values in its weight 'w'")


def test_models_whose_layers_hold_initializers_keep_their_constant_nodes():
    model = _conv_model()
    model.graph.node.append(helper.make_node("Constant", [], ["offset"], value=_tensor("offset", (1, 4, 8, 8))))
    model.graph.node.append(helper.make_node("Add", ["y", "offset"], ["z"]))
    model.graph.output[0].name = "z"
    canonical = canonicalize(model)
    assert [n.op_type for n in canonical.graph] == ["Conv", "Constant", "Add"]
    assert set(canonical.graph.initializers) == {"w", "b"}


def _weights_behind_casts() -> onnx.ModelProto:
    """A float16-stored conv weight read through Cast, a bias through Identity, a MatMul weight
    through Identity(Cast(...))."""
    half = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float16), "w16")
    fc = numpy_helper.from_array(np.random.default_rng(2).standard_normal((16, 2)).astype(np.float16), "fw16")
    nodes = [
        helper.make_node("Cast", ["w16"], ["w"], to=TensorProto.FLOAT),
        helper.make_node("Identity", ["b0"], ["b"]),
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
        helper.make_node("Reshape", ["c", "shape"], ["f"]),
        helper.make_node("Cast", ["fw16"], ["fw32"], to=TensorProto.FLOAT),
        helper.make_node("Identity", ["fw32"], ["fw"]),
        helper.make_node("MatMul", ["f", "fw"], ["y"], name="fc"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
                              [half, fc, _tensor("b0", (4,), 1), numpy_helper.from_array(np.array([-1, 16], np.int64), "shape")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_weights_behind_cast_and_identity_are_layers_and_keep_their_values(tmp_path, capsys):
    model = _weights_behind_casts()
    path = _save(model, tmp_path / "half.onnx")
    assert _layers(capsys, path) == ["conv", "fc"]
    canonical = canonicalize(model)
    assert not [n for n in canonical.graph if n.op_type in ("Cast", "Identity")]  # nothing reads them any more
    conv = next(n for n in canonical.graph if n.op_type == "Conv")
    np.testing.assert_array_equal(conv.inputs[1].const_value.numpy(),
                                  numpy_helper.to_array(model.graph.initializer[0]).astype(np.float32))
    np.savez(tmp_path / "proxy.npz", x=np.random.default_rng(0).standard_normal((8, 3, 4, 4)).astype(np.float32))
    assert main(["build", path, "--proxy", str(tmp_path / "proxy.npz"), "--no-measure", "--out", str(tmp_path / "out")]) == 0


def test_a_weight_behind_a_cast_to_an_integer_is_not_a_layer(capsys, tmp_path):
    model = _weights_behind_casts()
    model.graph.node[0].attribute[0].i = TensorProto.INT32
    model.graph.node.insert(1, helper.make_node("Cast", ["w"], ["wf"], to=TensorProto.FLOAT))
    model.graph.node[3].input[1] = "wf"
    assert _layers(capsys, _save(model, tmp_path / "m.onnx")) == ["fc"]


def test_dimensions_written_as_minus_one_are_open(tmp_path, capsys):
    model = _conv_model(input_shape=(1, 3, -1, -1))
    path = _save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "proxy.npz", x=np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32))
    out = tmp_path / "out"
    assert main(["build", path, "--proxy", str(tmp_path / "proxy.npz"), "--no-measure", "--out", str(out)]) == 0
    dims = onnx.load(out / "model.qdq.onnx").graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[:2]] == [1, 3] and [d.dim_param for d in dims[2:]] == ["x_dim2", "x_dim3"]


# -- 5. external data -------------------------------------------------------------------------


def _external(tmp_path, location_for_w=None) -> str:
    path = tmp_path / "m.onnx"
    onnx.save(_conv_model(), path, save_as_external_data=True, all_tensors_to_one_file=True, location="m.data", size_threshold=0)
    if location_for_w is not None:
        model = onnx.load(path, load_external_data=False)
        weight = next(t for t in model.graph.initializer if t.name == "w")
        next(e for e in weight.external_data if e.key == "location").value = location_for_w
        onnx.save(model, path)
    return str(path)


def test_external_data_beside_the_model_loads(tmp_path, capsys):
    assert _layers(capsys, _external(tmp_path)) == ["conv"]


@pytest.mark.parametrize(("location", "message"), [
    ("gone.data", "keeps its data in 'gone.data', which does not exist in"),
    ("../m.data", "keeps its data at '../m.data', outside the model's folder"),
    ("/etc/hostname", "keeps its data at '/etc/hostname', outside the model's folder"),
])
def test_external_data_errors_say_what_is_wrong(tmp_path, capsys, location, message):
    folder = tmp_path / "model"
    folder.mkdir()
    path = _external(folder, location)
    (tmp_path / "m.data").write_bytes((folder / "m.data").read_bytes())  # what '../m.data' would read
    _refused(capsys, ["inspect", path], "tensor 'w'", message)


@pytest.mark.parametrize("external", [False, True], ids=["one file", "with external data"])
def test_models_over_protobufs_limit_are_refused(tmp_path, capsys, monkeypatch, external):
    from mpqc.frontend import onnx_file

    path = _external(tmp_path) if external else _save(_conv_model(), tmp_path / "m.onnx")
    monkeypatch.setattr(onnx_file, "PROTOBUF_LIMIT", 300)  # the real 2 GiB would take the disk
    _refused(capsys, ["inspect", path], "2 GiB or more")


def test_a_weight_whose_dims_were_damaged_is_one_line(tmp_path, capsys):
    """A flipped bit in a dim leaves data that no longer fills the shape; the ONNX checker lets it through."""
    from onnx import TensorProto, helper, numpy_helper

    from mpqc.cli import main

    weight = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    weight.dims[1] = 2  # 108 values for a 4x2x3x3 shape
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), tmp_path / "m.onnx")
    assert main(["inspect", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mpqc: error: ") and "tensor 'w' holds another number of values" in err and err.count("\n") == 1
