"""2-D convolution with packed INT4 weights as an implicit GEMM in Triton; and a plain torch reference.

The weight (O, C/groups, KH, KW) is stored as the GEMM matrix it is: each output channel's row of
K = C/groups * KH * KW values in ONNX order (c, kh, kw), packed by kernels.int4_layout, so the
packed tensor is `pack_int4(q.reshape(O, -1))`, shape (O, ceil(K / 2)). Scales are per output
channel, shape (O,), symmetric (zero point 0): the format of mpqc's w4a8 convolutions.

The implicit GEMM never materialises im2col: the M axis is the output pixels (batch, oh, ow), the
N axis the output channels of one group, and each K tile gathers its (c, kh, kw) input taps
straight from the input, reading zeros for padding. Any input strides work, so NCHW and NHWC
(channels-last) are the same kernel. Where the output tiles leave most SMs idle (the 7x7 and
14x14 pointwise convs of EfficientNet-Lite0 at batch 1: 49 or 196 pixels, K up to 1152) K is split
as in the GEMM (kernels.split_k), in the same launch. A depthwise convolution (one input and one
output channel per group) has nothing to reduce across channels, so it gets a direct kernel instead
of a GEMM with 15/16 of every tile wasted.

Activation modes as in kernels.int4_gemm: W4A16 (float16/float32 input, float32 accumulation) and
W4A8 (int8 input with a per-tensor scale, exact int32 accumulation; the depthwise kernel sums in
float32, which is exact for its few taps). Padding with zeros is exact in both, because the int8
zero point is 0.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from mpqc_kernels.int4_gemm import FLOAT_INPUTS, epilogue, int4_dot, load_int4_tile
from mpqc_kernels.int4_layout import packed_length, unpack_int4
from mpqc_kernels.split_k import add_up_slices, check_split_k, choose_split_k, k_slices, multiprocessors, split_k_buffers

LAYOUTS = ("NCHW", "NHWC")
DEPTHWISE_BLOCKS = (64, 32)  # (pixels, channels) per program of the depthwise kernel
# int8 x INT4 products are at most 128 * 8 = 2^10 in size, so float32 (24-bit significand) adds up
# to 2^14 of them exactly: the depthwise kernel's W4A8 sums are the int32 ones, bit for bit.
EXACT_FLOAT_TAPS = 2**14


@triton.jit
def _int4_conv_kernel(
    x_ptr, w_ptr, scale_ptr, bias_ptr, y_ptr, workspace_ptr, counter_ptr,
    P, H, W, OH, OW, CG, OG, KG, k_per_split,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_yn, stride_yc, stride_yh, stride_yw, stride_wo,
    SH, SW, PT, PL, DH, DW, x_scale,
    KH: tl.constexpr, KW: tl.constexpr, INT8_X: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """Program (pid_m, pid_n, group * SPLIT_K + k_slice): one output tile of one group, over one K slice."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    group = tl.program_id(2) // SPLIT_K
    k_slice = tl.program_id(2) % SPLIT_K
    offs_p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    p_mask = offs_p < P
    batch = offs_p // (OH * OW)
    oh = (offs_p % (OH * OW)) // OW
    ow = offs_p % OW
    offs_o = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_mask = offs_o < OG
    channels = group * OG + offs_o
    ih0 = oh * SH - PT
    iw0 = ow * SW - PL
    n_bytes = (KG + 1) // 2
    if INT8_X:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = k_slice * k_per_split  # a multiple of BLOCK_K: slices start on a byte of the packed rows
    for k0 in range(k_start, tl.minimum(KG, k_start + k_per_split), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        c = offs_k // (KH * KW)
        r = (offs_k % (KH * KW)) // KW
        s = offs_k % KW
        ih = ih0[:, None] + (r * DH)[None, :]
        iw = iw0[:, None] + (s * DW)[None, :]
        inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_mask = p_mask[:, None] & (offs_k < KG)[None, :] & inside
        x_offsets = batch[:, None] * stride_xn + (group * CG + c)[None, :] * stride_xc + ih * stride_xh + iw * stride_xw
        x = tl.load(x_ptr + x_offsets, mask=x_mask, other=0)
        w = load_int4_tile(w_ptr, channels, o_mask, k0, stride_wo, n_bytes, BLOCK_K)
        acc += int4_dot(x, w)
    if SPLIT_K == 1:
        finishes = True
    else:
        tile = (group * tl.num_programs(0) + pid_m) * tl.num_programs(1) + pid_n
        acc, finishes = add_up_slices(acc, workspace_ptr, counter_ptr, tile, k_slice, SPLIT_K, BLOCK_M, BLOCK_N)
    if finishes:
        y = epilogue(acc, scale_ptr, 1, bias_ptr, channels, o_mask, x_scale, True, INT8_X, HAS_BIAS)
        y_offsets = (batch * stride_yn + oh * stride_yh + ow * stride_yw)[:, None] + channels[None, :] * stride_yc
        tl.store(y_ptr + y_offsets, y.to(y_ptr.dtype.element_ty), mask=p_mask[:, None] & o_mask[None, :])


@triton.jit
def _int4_depthwise_kernel(
    x_ptr, w_ptr, scale_ptr, bias_ptr, y_ptr,
    P, C, H, W, OH, OW,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_yn, stride_yc, stride_yh, stride_yw, stride_wo,
    SH, SW, PT, PL, DH, DW, x_scale,
    KH: tl.constexpr, KW: tl.constexpr, INT8_X: tl.constexpr, HAS_BIAS: tl.constexpr, INT_ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """INT_ACC: sum int8 inputs in int32; off, they sum in float32, exact up to EXACT_FLOAT_TAPS taps
    and on NVIDIA GPUs at twice the rate of 32-bit integer multiply-adds."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    p_mask = offs_p < P
    batch = offs_p // (OH * OW)
    oh = (offs_p % (OH * OW)) // OW
    ow = offs_p % OW
    channels = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = channels < C
    if INT_ACC:
        acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    # Taps are unrolled: each one is a known nibble of every channel's packed row.
    for r in tl.static_range(KH):
        for s in tl.static_range(KW):
            packed = tl.load(w_ptr + channels * stride_wo + (r * KW + s) // 2, mask=c_mask, other=0)
            if (r * KW + s) % 2 == 0:
                w = (packed << 4) >> 4
            else:
                w = packed >> 4
            ih = oh * SH - PT + r * DH
            iw = ow * SW - PL + s * DW
            inside = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_offsets = (batch * stride_xn + ih * stride_xh + iw * stride_xw)[:, None] + channels[None, :] * stride_xc
            x = tl.load(x_ptr + x_offsets, mask=inside[:, None] & c_mask[None, :], other=0)
            if INT_ACC:
                acc += x.to(tl.int32) * w.to(tl.int32)[None, :]
            else:
                acc += x.to(tl.float32) * w.to(tl.float32)[None, :]
    y = epilogue(acc, scale_ptr, 1, bias_ptr, channels, c_mask, x_scale, True, INT8_X, HAS_BIAS)
    y_offsets = (batch * stride_yn + oh * stride_yh + ow * stride_yw)[:, None] + channels[None, :] * stride_yc
    tl.store(y_ptr + y_offsets, y.to(y_ptr.dtype.element_ty), mask=p_mask[:, None] & c_mask[None, :])


def int4_conv2d(
    x: torch.Tensor,
    packed_weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_shape: tuple[int, int, int, int],
    *,
    bias: torch.Tensor | None = None,
    x_scale: float | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    layout: str = "NCHW",
    out_dtype: torch.dtype | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """Conv2d of x with the INT4 weight of shape `weight_shape` = (O, C/groups, KH, KW).

    x: (N, C, H, W) for layout "NCHW" or (N, H, W, C) for "NHWC"; float16/float32 (W4A16) or int8
    with `x_scale` (W4A8). The output has the same layout. padding: an int, (pad_h, pad_w), or
    ONNX-style (top, left, bottom, right), as the TensorFlow-"same" stride-2 convs of
    EfficientNet-Lite0 need. out_dtype: defaults to x's dtype for float inputs, float32 for int8.
    split_k: K slices of the implicit GEMM, summed in the launch; None lets implicit_gemm_plan choose.
    Depthwise convolutions have no K to split and ignore it.
    """
    check_split_k(split_k)
    geometry = _geometry(x, packed_weight, weight_scale, weight_shape, bias, x_scale, stride, padding, dilation, groups, layout)
    out_dtype = out_dtype or (torch.float32 if x.dtype == torch.int8 else x.dtype)
    batch, _, height, width = geometry.input_shape
    out_channels, cg, kh, kw = weight_shape
    oh, ow = geometry.output_hw
    xv = _as_nchw(x, layout)
    y = torch.empty(_in_layout((batch, out_channels, oh, ow), layout), dtype=out_dtype, device=x.device)
    yv = _as_nchw(y, layout)
    pixels = batch * oh * ow
    if y.numel() == 0:
        return y
    weight = packed_weight.view(torch.int8)  # int8 so that >> sign-extends in the kernel
    scale = weight_scale.to(torch.float32).contiguous()
    bias_arg = bias.to(torch.float32).contiguous() if bias is not None else scale
    int8_x = x.dtype == torch.int8
    common = (
        *xv.stride(), *yv.stride(), weight.stride(0),
        *geometry.stride, *geometry.pad_top_left, *geometry.dilation,
        float(x_scale) if x_scale is not None else 1.0,
    )
    if geometry.depthwise:
        block_m, block_c = DEPTHWISE_BLOCKS
        grid = (triton.cdiv(pixels, block_m), triton.cdiv(out_channels, block_c))
        _int4_depthwise_kernel[grid](
            xv, weight, scale, bias_arg, yv, pixels, out_channels, height, width, oh, ow, *common,
            KH=kh, KW=kw, INT8_X=int8_x, HAS_BIAS=bias is not None, INT_ACC=int8_x and kh * kw > EXACT_FLOAT_TAPS,
            BLOCK_M=block_m, BLOCK_C=block_c, num_warps=4,
        )
        return y
    og, kg = out_channels // groups, cg * kh * kw
    block_m, block_n, block_k, warps, auto_split_k = implicit_gemm_plan(x, pixels, out_channels, groups, kg)
    split_k, k_per_split = k_slices(kg, block_k, split_k or auto_split_k)
    grid = (triton.cdiv(pixels, block_m), triton.cdiv(og, block_n), groups * split_k)
    workspace, counters = split_k_buffers(grid[0] * grid[1] * groups, split_k, block_m, block_n, int8_x, y)
    _int4_conv_kernel[grid](
        xv, weight, scale, bias_arg, yv, workspace, counters, pixels, height, width, oh, ow, cg, og, kg, k_per_split, *common,
        KH=kh, KW=kw, INT8_X=int8_x, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        SPLIT_K=split_k, num_warps=warps,
    )
    return y


def implicit_gemm_plan(x: torch.Tensor, pixels: int, out_channels: int, groups: int, kg: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, SPLIT_K) of the implicit GEMM of input x.

    pixels: output pixels (batch * OH * OW); kg: the GEMM's K, (C / groups) * KH * KW. SPLIT_K is
    kernels.split_k.choose_split_k's rule on the conv's sizes, for x's GPU.
    """
    og = out_channels // groups
    block_m, block_n, block_k, warps = conv_config(pixels, og, kg, x.dtype == torch.int8)
    tiles = triton.cdiv(pixels, block_m) * triton.cdiv(og, block_n) * groups
    reads = x.numel() * x.element_size() + out_channels * packed_length(kg)
    split_k = choose_split_k(tiles=tiles, block_m=block_m, block_n=block_n, block_k=block_k, k=kg, reads=reads,
                             outputs=pixels * out_channels, multiprocessors=multiprocessors(x.device))
    return block_m, block_n, block_k, warps, split_k


def conv_config(pixels: int, og: int, kg: int, int8_x: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) for the implicit GEMM: tiles no larger than needed.

    On NVIDIA GPUs tl.dot wants K tiles of at least 16 for 16/32-bit inputs and 32 for int8.
    """
    block_n = 16 if og <= 16 else 32 if og <= 32 else 64
    block_k = max(16 if kg <= 16 else 32 if kg <= 32 else 64, 32 if int8_x else 16)
    block_m = 128 if pixels >= 4096 else 64 if pixels >= 64 else 32
    if not int8_x:
        # On an H100 (Triton 3.6) float tiles of fewer than 64 rows with a 16-wide K tile summed
        # wrongly (up to 100% error, found by tests/kernels on the GPU); 64 rows were right in every
        # configuration tried, so float inputs never get fewer.
        block_m = max(block_m, 64)
    return block_m, block_n, block_k, 8 if block_m == 128 and block_n == 64 else 4


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """The checked shapes and hyper-parameters of one convolution."""

    input_shape: tuple[int, int, int, int]  # N, C, H, W
    output_hw: tuple[int, int]
    stride: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    dilation: tuple[int, int]
    depthwise: bool  # one input and one output channel per group

    @property
    def pad_top_left(self) -> tuple[int, int]:
        return self.pads[0], self.pads[1]


def _pair(value, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair


def _pads(padding) -> tuple[int, int, int, int]:
    """(top, left, bottom, right), ONNX's order."""
    if isinstance(padding, int):
        return (padding,) * 4
    padding = tuple(padding)
    if len(padding) == 2:
        return (padding[0], padding[1], padding[0], padding[1])
    if len(padding) == 4:
        return padding
    raise ValueError(f"padding must be an int, (pad_h, pad_w) or (top, left, bottom, right), got {padding!r}")


def _geometry(x, packed_weight, weight_scale, weight_shape, bias, x_scale, stride, padding, dilation, groups, layout) -> _Geometry:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if x.dtype not in (*FLOAT_INPUTS, torch.int8):
        raise TypeError(f"x must be float16, float32 (W4A16) or int8 (W4A8), got {x.dtype}")
    if (x.dtype == torch.int8) != (x_scale is not None):
        raise ValueError("an int8 x (W4A8) needs x_scale, its per-tensor scale; a float x takes none")
    if x.dim() != 4 or len(weight_shape) != 4:
        raise ValueError(f"need a 4-D input and a 4-D weight shape, got {tuple(x.shape)} and {tuple(weight_shape)}")
    batch, channels, height, width = _as_nchw(x, layout).shape
    out_channels, cg, kh, kw = weight_shape
    if groups < 1 or channels % groups or out_channels % groups or channels // groups != cg:
        raise ValueError(f"{channels} input channels in {groups} groups do not match weight shape {tuple(weight_shape)}")
    if packed_weight.dtype not in (torch.uint8, torch.int8) or tuple(packed_weight.shape) != (out_channels, packed_length(cg * kh * kw)):
        raise ValueError(
            f"packed_weight must be uint8 of shape ({out_channels}, {packed_length(cg * kh * kw)}) for weight shape "
            f"{tuple(weight_shape)}, got {packed_weight.dtype} {tuple(packed_weight.shape)}"
        )
    if packed_weight.stride(-1) != 1:
        raise ValueError("packed_weight rows must be contiguous")
    if tuple(weight_scale.shape) != (out_channels,):
        raise ValueError(f"weight_scale must be per output channel, shape ({out_channels},), got {tuple(weight_scale.shape)}")
    if bias is not None and tuple(bias.shape) != (out_channels,):
        raise ValueError(f"bias must have shape ({out_channels},), got {tuple(bias.shape)}")
    for name, tensor in (("packed_weight", packed_weight), ("weight_scale", weight_scale), ("bias", bias)):
        if tensor is not None and tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}")
    stride, dilation, pads = _pair(stride, "stride"), _pair(dilation, "dilation"), _pads(padding)
    if min(stride) < 1 or min(dilation) < 1 or min(pads) < 0:
        raise ValueError(f"stride and dilation must be >= 1 and padding >= 0, got {stride}, {dilation}, {pads}")
    oh = (height + pads[0] + pads[2] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (width + pads[1] + pads[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"the kernel {kh}x{kw} (dilation {dilation}) does not fit the padded {height}x{width} input")
    depthwise = groups == channels == out_channels
    return _Geometry((batch, channels, height, width), (oh, ow), stride, pads, dilation, depthwise)


def _as_nchw(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    """A logical NCHW view (no copy): the kernels take any strides."""
    return tensor if layout == "NCHW" else tensor.permute(0, 3, 1, 2)


def _in_layout(nchw_shape: tuple[int, int, int, int], layout: str) -> tuple[int, ...]:
    n, c, h, w = nchw_shape
    return nchw_shape if layout == "NCHW" else (n, h, w, c)


def reference_int4_conv2d(
    x: torch.Tensor,
    packed_weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_shape: tuple[int, int, int, int],
    *,
    bias: torch.Tensor | None = None,
    x_scale: float | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    layout: str = "NCHW",
    out_dtype: torch.dtype | None = None,
    absolute: bool = False,
) -> torch.Tensor:
    """int4_conv2d in plain torch: unpack, dequantize, F.conv2d in float64, then cast.

    absolute: sum |x| |w| + |bias| instead, in float64 (as reference_int4_gemm's).
    """
    geometry = _geometry(x, packed_weight, weight_scale, weight_shape, bias, x_scale, stride, padding, dilation, groups, layout)
    out_dtype = out_dtype or (torch.float32 if x.dtype == torch.int8 else x.dtype)
    out_channels, cg, kh, kw = weight_shape
    q = unpack_int4(packed_weight, cg * kh * kw).reshape(weight_shape).to(torch.float64)
    weight = q * weight_scale.to(torch.float64).reshape(-1, 1, 1, 1)
    xf = _as_nchw(x, layout).to(torch.float64) * (x_scale if x_scale is not None else 1.0)
    top, left, bottom, right = geometry.pads
    xf = torch.nn.functional.pad(xf, (left, right, top, bottom))
    bias = bias.to(torch.float64) if bias is not None else None
    if absolute:
        xf, weight, bias = xf.abs(), weight.abs(), (bias.abs() if bias is not None else None)
    y = torch.nn.functional.conv2d(xf, weight, bias, stride=geometry.stride, dilation=geometry.dilation, groups=groups)
    if layout == "NHWC":
        y = y.permute(0, 2, 3, 1)
    return (y if absolute else y.to(out_dtype)).contiguous()
