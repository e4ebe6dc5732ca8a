"""FLOAT16 lowering for targets whose float_type is float16 (TensorRT's): types, numerics, bytes."""

import hashlib
import json
import pathlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from mpqc.backends.onnxruntime.runner import OrtRunner, disabled_passes, numerics_target
from mpqc.backends.tensorrt.rules import check_tensorrt_conformance
from mpqc.errors import MpqcError
from mpqc.pipeline.build import build
from mpqc.pipeline.options import BuildOptions
from mpqc.targets import load_target

TARGETS = pathlib.Path(__file__).resolve().parents[2] / "targets"
MIXED = {"conv1": "w8a8", "conv2": "w8a8", "down": "w8a8", "fc": "w4a16"}


def _build(tmp_path, tinynet, target: pathlib.Path, name: str) -> onnx.ModelProto:
    spec, proxy = tinynet
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"layers": MIXED}))
    out = tmp_path / name
    build(BuildOptions(model=spec, proxy=str(proxy), policy=str(policy), target=str(target), measure=False), out)
    return onnx.load(out / "model.qdq.onnx")


def _float32_copy(tmp_path) -> pathlib.Path:
    """trt-a100 with float_type float32: the same lowering in FLOAT."""
    text = (TARGETS / "trt-a100.toml").read_text()
    assert 'float_type = "float16"' in text
    path = tmp_path / "trt-a100-float32.toml"
    path.write_text(text.replace('float_type = "float16"', 'float_type = "float32"'))
    return path


def test_every_float_tensor_is_float16_and_the_model_computes_what_the_float32_lowering_does(tmp_path, tinynet):
    half = _build(tmp_path, tinynet, TARGETS / "trt-a100.toml", "half")
    single = _build(tmp_path, tinynet, _float32_copy(tmp_path), "single")
    float_types = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}
    assert {i.data_type for i in half.graph.initializer} & float_types == {TensorProto.FLOAT16}
    assert {i.data_type for i in single.graph.initializer} & float_types == {TensorProto.FLOAT}
    # Users feed and read FLOAT: the conversion Casts at the edges.
    for model in (half, single):
        assert [v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)] == [TensorProto.FLOAT] * 2
    assert check_tensorrt_conformance(half, int4_conv_plugin=True) == []
    # Same quantized integers: the conversion only changes float types.
    integers = {i.name: numpy_helper.to_array(i) for i in single.graph.initializer if i.data_type in (TensorProto.INT8, TensorProto.INT4)}
    assert integers and all(np.array_equal(numpy_helper.to_array(i), integers[i.name])
                            for i in half.graph.initializer if i.name in integers)

    x = np.load(tinynet[1])["input"]
    reference = OrtRunner(single.SerializeToString(), numerics_target()).run({"input": x})[0]
    candidate = OrtRunner(half.SerializeToString(), numerics_target()).run({"input": x})[0]
    # FLOAT16 rounding moves a few activations across a quantization step; nothing more.
    sqnr = 10 * np.log10((reference**2).sum() / ((reference - candidate) ** 2).sum())
    assert sqnr > 30, sqnr


def test_same_inputs_give_the_same_float16_bytes(tmp_path, tinynet):
    first = _build(tmp_path, tinynet, TARGETS / "trt-a100.toml", "first")
    second = _build(tmp_path, tinynet, TARGETS / "trt-a100.toml", "second")
    digest = [hashlib.sha256(m.SerializeToString(deterministic=True)).hexdigest() for m in (first, second)]
    assert digest[0] == digest[1]


def test_only_float16_models_turn_off_onnx_runtimes_bias_quantization(tmp_path, tinynet):
    """ONNX Runtime's WeightBiasQuantization divides biases by x_scale * w_scale in the model's float
    type, which overflows FLOAT16 (tests/examples: EfficientNet-Lite0's fidelity); FLOAT models
    keep the pass, which ONNX Runtime's integer conv fusion depends on."""
    half = _build(tmp_path, tinynet, TARGETS / "trt-a100.toml", "half").SerializeToString()
    single = _build(tmp_path, tinynet, _float32_copy(tmp_path), "single").SerializeToString()
    assert disabled_passes(half) == ["WeightBiasQuantization"]
    assert disabled_passes(single) == [] and disabled_passes(b"not a model") == []


def test_a_target_with_an_unknown_float_type_is_refused(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text((TARGETS / "trt-a100.toml").read_text().replace('float_type = "float16"', 'float_type = "bfloat16"'))
    with pytest.raises(MpqcError, match="float_type must be float32 or float16"):
        load_target(str(path))
