"""The Triton INT4 implicit-GEMM convolution against its torch reference: strides, padding, dilation,
groups, depthwise, NCHW and NHWC, W4A16 (fp32, fp16) and W4A8, K whole and split."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[gpu]'): no INT4 kernels to test")

from mpqc_kernels.int4_conv import DEPTHWISE_BLOCKS, conv_config, implicit_gemm_plan, int4_conv2d, reference_int4_conv2d  # noqa: E402
from mpqc_kernels.int4_layout import pack_int4  # noqa: E402

MODES = {"w4a16-fp32": 4e-6, "w4a16-fp16": 1e-3, "w4a8": 4e-6}  # as in test_int4_gemm


def make_case(batch, channels, size, out_channels, kernel, groups, mode, layout, seed, device, with_bias=True):
    gen = torch.Generator().manual_seed(seed)
    weight_shape = (out_channels, channels // groups, *kernel)
    q = torch.randint(-8, 8, weight_shape, generator=gen, dtype=torch.int8)
    scale = torch.rand(out_channels, generator=gen) * 0.05 + 1e-3
    bias = torch.randn(out_channels, generator=gen) if with_bias else None
    shape = (batch, channels, *size) if layout == "NCHW" else (batch, *size, channels)
    if mode == "w4a8":
        x, x_scale = torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8), 0.03
    else:
        x, x_scale = torch.randn(shape, generator=gen).to(torch.float16 if mode == "w4a16-fp16" else torch.float32), None
    to = (lambda t: t.to(device) if t is not None else None)
    return dict(x=to(x), packed_weight=to(pack_int4(q.reshape(out_channels, -1))), weight_scale=to(scale),
                weight_shape=weight_shape, bias=to(bias), x_scale=x_scale, groups=groups, layout=layout)


def output_fits(size, kernel, stride, pads, dilation) -> bool:
    return all(size[i] + pads[i] + pads[i + 2] - dilation * (kernel[i] - 1) - 1 >= 0 for i in range(2))


@settings(max_examples=80, deadline=None, derandomize=True)
@given(
    batch=st.integers(1, 2),
    groups=st.sampled_from([1, 1, 2, 3]),
    cg=st.integers(1, 6),
    og=st.integers(1, 20),
    size=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    kernel=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    stride=st.integers(1, 3),
    pads=st.tuples(*[st.integers(0, 2)] * 4),
    dilation=st.integers(1, 2),
    mode=st.sampled_from(sorted(MODES)),
    layout=st.sampled_from(["NCHW", "NHWC"]),
    split_k=st.sampled_from([None, None, 2, 3, 7]),
    seed=st.integers(0, 2**16),
)
def test_matches_reference(device, check_close, batch, groups, cg, og, size, kernel, stride, pads, dilation, mode, layout, split_k, seed):
    """split_k None is the automatic choice (K whole at these sizes); forced counts may exceed K's tiles."""
    assume(output_fits(size, kernel, stride, pads, dilation))
    args = make_case(batch, cg * groups, size, og * groups, kernel, groups, mode, layout, seed, device)
    conv = dict(stride=stride, padding=pads, dilation=dilation)
    actual = int4_conv2d(**args, **conv, split_k=split_k)
    check_close(f"conv {'split-K ' if split_k else ''}{mode} [{device}]", actual, reference_int4_conv2d, MODES[mode], **args, **conv)


@settings(max_examples=50, deadline=None, derandomize=True)
@given(
    batch=st.integers(1, 2),
    channels=st.integers(1, 40),  # past one 32-channel tile
    size=st.tuples(st.integers(2, 9), st.integers(2, 9)),
    kernel=st.sampled_from([3, 5]),
    stride=st.integers(1, 2),
    pads=st.tuples(*[st.integers(0, 2)] * 4),
    mode=st.sampled_from(sorted(MODES)),
    layout=st.sampled_from(["NCHW", "NHWC"]),
    seed=st.integers(0, 2**16),
)
def test_depthwise_matches_reference(device, check_close, batch, channels, size, kernel, stride, pads, mode, layout, seed):
    assume(output_fits(size, (kernel, kernel), stride, pads, 1))
    args = make_case(batch, channels, size, channels, (kernel, kernel), channels, mode, layout, seed, device)
    conv = dict(stride=stride, padding=pads)
    check_close(f"conv depthwise {mode} [{device}]", int4_conv2d(**args, **conv), reference_int4_conv2d, MODES[mode], **args, **conv)


# EfficientNet-Lite0's conv kinds at reduced sizes: stem (TF "same" stride 2, pads bottom/right
# only), depthwise 3x3 and 5x5 (stride 1 and 2), pointwise expand/project; plus a depthwise conv
# with channel multiplier 2, which takes the implicit-GEMM path.
LITE0_KINDS = {
    "stem 3x3 s2": (3, 16, 32, (3, 3), 1, 2, (0, 0, 1, 1)),
    "depthwise 3x3 s1": (24, 10, 24, (3, 3), 24, 1, (1, 1, 1, 1)),
    "depthwise 5x5 s2": (24, 11, 24, (5, 5), 24, 2, (1, 1, 2, 2)),
    "pointwise 1x1": (40, 7, 96, (1, 1), 1, 1, (0, 0, 0, 0)),
    "depthwise x2 3x3": (8, 6, 16, (3, 3), 8, 1, (1, 1, 1, 1)),
}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("kind", sorted(LITE0_KINDS))
def test_efficientnet_conv_kinds(device, check_close, kind, layout, mode):
    channels, size, out_channels, kernel, groups, stride, pads = LITE0_KINDS[kind]
    args = make_case(2, channels, (size, size), out_channels, kernel, groups, mode, layout, 11, device)
    conv = dict(stride=stride, padding=pads)
    check_close(f"conv {mode} [{device}]", int4_conv2d(**args, **conv), reference_int4_conv2d, MODES[mode], **args, **conv)


# EfficientNet-Lite0's last pointwise convs at batch 1: 49 pixels, so few output tiles that K is split.
LITE0_SPLIT = {"project 1152->192 @7": (1152, 7, 192), "head 320->1280 @7": (320, 7, 1280)}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("kind", sorted(LITE0_SPLIT))
def test_efficientnet_batch1_pointwise_is_split(device, check_close, kind, mode):
    channels, size, out_channels = LITE0_SPLIT[kind]
    args = make_case(1, channels, (size, size), out_channels, (1, 1), 1, mode, "NHWC", 3, device)
    assert implicit_gemm_plan(args["x"], size * size, out_channels, 1, channels)[-1] > 1
    actual = int4_conv2d(**args)
    check_close(f"conv split-K {mode} [{device}]", actual, reference_int4_conv2d, MODES[mode], **args)
    assert torch.equal(int4_conv2d(**args), actual)  # the slices are added in slice order: the same bits every run
    if mode == "w4a8":  # exact int32 sums: bit for bit the unsplit result
        assert torch.equal(int4_conv2d(**args, split_k=1), actual)


def test_larger_tiles_do_not_split():
    """Batch 64 at 7x7 (3136 pixels) fills an H100's or H200's 132 SMs with output tiles alone."""
    x = torch.zeros(64, 7, 7, 1152, dtype=torch.float16)
    assert implicit_gemm_plan(x, 64 * 49, 192, 1, 1152)[-1] == 1


def test_reference_is_a_float_conv(device):
    """The reference equals torch's own conv of the dequantized weight: no shared unpacking to hide behind."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randint(-8, 8, (6, 2, 3, 3), generator=gen, dtype=torch.int8)
    scale = torch.rand(6, generator=gen) + 0.5
    x = torch.randn(1, 4, 7, 7, generator=gen)
    expected = torch.nn.functional.conv2d(x.double(), q.double() * scale.double().reshape(-1, 1, 1, 1), stride=2, padding=1, groups=2)
    packed = pack_int4(q.reshape(6, -1))
    args = dict(stride=2, padding=1, groups=2)
    for fn in (reference_int4_conv2d, int4_conv2d):
        y = fn(x.to(device), packed.to(device), scale.to(device), (6, 2, 3, 3), **args)
        torch.testing.assert_close(y.cpu().double(), expected, rtol=1e-5, atol=1e-5)


def test_layouts_agree(device):
    """NHWC is NCHW with its axes moved, for inputs and outputs alike."""
    args = make_case(2, 6, (8, 7), 9, (3, 3), 3, "w4a8", "NCHW", 2, device)
    y_nchw = int4_conv2d(**args, stride=2, padding=1)
    nhwc = args | {"x": args["x"].permute(0, 2, 3, 1).contiguous(), "layout": "NHWC"}
    y_nhwc = int4_conv2d(**nhwc, stride=2, padding=1)
    assert y_nhwc.shape == (2, 4, 4, 9)
    assert torch.equal(y_nhwc.permute(0, 3, 1, 2), y_nchw)


@pytest.mark.parametrize(
    "change, error",
    [
        ({"x_scale": None}, "needs x_scale"),
        ({"groups": 4}, "do not match weight shape"),
        ({"weight_scale": torch.ones(8, 2)}, "per output channel"),
        ({"packed_weight": torch.zeros(8, 9, dtype=torch.uint8)}, "packed_weight must be uint8 of shape"),
        ({"layout": "CHWN"}, "layout must be one of"),
        ({"split_k": 0}, "split_k must be"),
    ],
)
def test_rejects_inconsistent_arguments(change, error):
    args = make_case(1, 6, (5, 5), 8, (3, 3), 2, "w4a8", "NCHW", 1, "cpu") | change
    with pytest.raises(ValueError, match=error):
        int4_conv2d(**args)


def test_kernel_larger_than_input_is_refused():
    args = make_case(1, 2, (2, 2), 2, (5, 5), 1, "w4a16-fp32", "NCHW", 1, "cpu")
    with pytest.raises(ValueError, match="does not fit"):
        int4_conv2d(**args)


def test_compiles_for_gpus_without_one(compile_for_gpu):
    """Launch configurations of EfficientNet-Lite0's convs compile to cubins for sm_80 (A100) and sm_87
    (Jetson Orin). The interpreter does not enforce GPU constraints such as tl.dot's minimum K tile
    (32 for int8, which a 1x1 conv over 16 channels would otherwise miss): this does, without a GPU."""
    common = ["stride_xn", "stride_xc", "stride_xh", "stride_xw", "stride_yn", "stride_yc", "stride_yh", "stride_yw",
              "stride_wo", "SH", "SW", "PT", "PL", "DH", "DW"]
    general = ["x_ptr", "w_ptr", "scale_ptr", "bias_ptr", "y_ptr", "workspace_ptr", "counter_ptr",
               "P", "H", "W", "OH", "OW", "CG", "OG", "KG", "k_per_split", *common, "x_scale"]
    depthwise = ["x_ptr", "w_ptr", "scale_ptr", "bias_ptr", "y_ptr", "P", "C", "H", "W", "OH", "OW", *common, "x_scale"]
    jobs = []
    for x_type, y_type, arch in (("*fp16", "*fp16", 80), ("*fp32", "*fp32", 87), ("*i8", "*fp16", 87)):
        int8_x = x_type == "*i8"

        def job(kernel, names, pointers, constexprs, warps=4):
            types = [x_type, "*i8", "*fp32", "*fp32", y_type, *pointers] + ["i32"] * (len(names) - 6 - len(pointers)) + ["fp32"]
            return {"kernel": f"kernels.int4_conv:{kernel}", "signature": dict(zip(names, types)),
                    "constexprs": dict(INT8_X=int8_x, HAS_BIAS=True, **constexprs), "arch": arch, "num_warps": warps}

        # The 1x1 16->96 conv at 112x112 (K = 16, large tiles), the 3x3 stem at batch 1 (K = 27), and
        # the split 1x1 1152->192 conv at 7x7 (int32 or float partial sums).
        for pixels, og, kg, k, split_k in ((12544, 96, 16, 1, 1), (12544, 32, 27, 3, 1), (49, 192, 1152, 1, 18)):
            block_m, block_n, block_k, warps = conv_config(pixels, og, kg, int8_x)
            pointers = (y_type, y_type) if split_k == 1 else ("*i32" if int8_x else "*fp32", "*i32")
            jobs.append(job("_int4_conv_kernel", general, pointers,
                            dict(KH=k, KW=k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k), warps))
        block_m, block_c = DEPTHWISE_BLOCKS
        jobs.append(job("_int4_depthwise_kernel", depthwise, (), dict(KH=5, KW=5, INT_ACC=False, BLOCK_M=block_m, BLOCK_C=block_c)))
    compiled = compile_for_gpu(jobs)  # asserts each cubin exists and fits the GPU's shared memory
    assert len(compiled) == len(jobs)
