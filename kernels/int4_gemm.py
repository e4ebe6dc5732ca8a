"""Y = X @ dequant(W)^T (+ bias) with packed INT4 weights, in Triton; and a plain torch reference.

Weights are (N, K) INT4 packed along K (kernels.int4_layout: (N, ceil(K / 2)) bytes, first value
in the low nibble), the "out_features x in_features" layout of torch.nn.Linear and of a Gemm with
transB=1. A lowered ONNX MatMul stores its weight as (K, N); transpose it before packing.

Scales are per output channel, shape (N,), or block-wise along K, shape (N, ceil(K / block_size))
with block_size in {32, 64, 128}; the last block may be short. Zero points are 0 (mpqc and
TensorRT only use symmetric INT4).

Two activation modes:
- W4A16: X is float16 or float32. The INT4 values are exact in either type, so each K tile is an
  X x W_int dot product accumulated in float32, scaled afterwards (per channel at the end, or
  per block as each tile is added).
- W4A8: X is int8 with one per-tensor scale (symmetric, zero point 0). Tiles are int8 x int8 dots
  accumulated in int32, exact; the float scales are applied once at the end (per channel) or once
  per block.

Split-K: when M and N give too few output tiles to fill the GPU (batch-1 GEMV, MiniLM's 128-token
linears), K is cut into slices summed in the same launch (kernels.split_k; split_k_config chooses).
Split results are the same bits on every run; float ones differ from the unsplit kernel's only in
the order of the sum, and per-channel W4A8 (exact int32 sums) not at all.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mpqc_kernels.int4_layout import packed_length, unpack_int4
from mpqc_kernels.split_k import add_up_slices, check_split_k, choose_split_k, k_slices, multiprocessors, split_k_buffers

BLOCK_SIZES = (32, 64, 128)
FLOAT_INPUTS = (torch.float16, torch.float32)


@triton.jit
def load_int4_tile(w_ptr, rows, row_mask, k0, stride_row, n_bytes, BLOCK_K: tl.constexpr):
    """Rows `rows` of a packed INT4 matrix, columns k0 .. k0 + BLOCK_K - 1, as int8 in [-8, 7].

    k0 is even (a multiple of BLOCK_K), so the tile starts on a byte boundary: BLOCK_K / 2 bytes,
    each split into its two nibbles. Bytes past the row's end read as 0 and so do their values.
    """
    cols = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    mask = row_mask[:, None] & (cols < n_bytes)[None, :]
    packed = tl.load(w_ptr + rows[:, None] * stride_row + cols[None, :], mask=mask, other=0)
    # On int8, << 4 then >> 4 (arithmetic) sign-extends the low nibble; >> 4 alone the high one.
    low = (packed << 4) >> 4
    high = packed >> 4
    # interleave puts low[j] at column 2j and high[j] at 2j + 1: the unpacked order.
    return tl.interleave(low, high)


@triton.jit
def int4_dot(x, w):
    """x (BLOCK_M, BLOCK_K) times the INT4 tile w (BLOCK_N, BLOCK_K) transposed: int32 for int8 x, else float32."""
    # The dtype tests are resolved at compile time; a single return keeps one path per specialization.
    if x.dtype == tl.int8:
        part = tl.dot(x, tl.trans(w))  # int8 x int8 -> exact int32
    elif x.dtype == tl.float32:
        part = tl.dot(x, tl.trans(w.to(tl.float32)), input_precision="ieee")  # no silent TF32 rounding
    else:
        part = tl.dot(x, tl.trans(w.to(x.dtype)), out_dtype=tl.float32)
    return part


@triton.jit
def epilogue(acc, scale_ptr, stride_s, bias_ptr, channels, channel_mask, x_scale,
             PER_CHANNEL: tl.constexpr, INT8_X: tl.constexpr, HAS_BIAS: tl.constexpr):
    """float32 (rows, channels) result: the accumulator times its remaining scales, plus the bias."""
    y = acc.to(tl.float32)
    if PER_CHANNEL:
        y = y * tl.load(scale_ptr + channels * stride_s, mask=channel_mask, other=0.0)[None, :]
    if INT8_X:
        y = y * x_scale
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + channels, mask=channel_mask, other=0.0)[None, :]
    return y


@triton.jit
def _int4_gemm_kernel(
    x_ptr, w_ptr, scale_ptr, bias_ptr, y_ptr, workspace_ptr, counter_ptr,
    M, N, K, k_per_split,
    stride_xm, stride_xk, stride_wn, stride_sn, stride_sb, stride_ym, stride_yn,
    x_scale,
    INT8_X: tl.constexpr, BLOCKWISE: tl.constexpr, SCALE_BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """Program (pid_m, pid_n, pid_k): one output tile, summed over K slice pid_k.

    SPLIT_K > 1: the slices of a tile meet in kernels.split_k.add_up_slices, and the last to
    arrive finishes the tile; workspace_ptr and counter_ptr are unused when SPLIT_K == 1.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    n_bytes = (K + 1) // 2
    # Per-channel W4A8 keeps an exact int32 sum over all of K; every other mode sums scaled floats.
    if INT8_X and not BLOCKWISE:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # k_per_split is a multiple of BLOCK_K: slices start on a tile, so on a byte and in one scale block.
    k_start = pid_k * k_per_split
    for k0 in range(k_start, tl.minimum(K, k_start + k_per_split), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_mask = m_mask[:, None] & (offs_k < K)[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=x_mask, other=0)
        w = load_int4_tile(w_ptr, offs_n, n_mask, k0, stride_wn, n_bytes, BLOCK_K)
        part = int4_dot(x, w)
        if BLOCKWISE:
            # BLOCK_K divides SCALE_BLOCK, so the whole tile lies in one scale block.
            scale = tl.load(scale_ptr + offs_n * stride_sn + (k0 // SCALE_BLOCK) * stride_sb, mask=n_mask, other=0.0)
            acc += part.to(tl.float32) * scale[None, :]
        else:
            acc += part
    if SPLIT_K == 1:
        finishes = True
    else:
        acc, finishes = add_up_slices(acc, workspace_ptr, counter_ptr, pid_m * tl.num_programs(1) + pid_n, pid_k,
                                      SPLIT_K, BLOCK_M, BLOCK_N)
    if finishes:
        y = epilogue(acc, scale_ptr, stride_sn, bias_ptr, offs_n, n_mask, x_scale, not BLOCKWISE, INT8_X, HAS_BIAS)
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def int4_gemm(
    x: torch.Tensor,
    packed_weight: torch.Tensor,
    weight_scale: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    x_scale: float | None = None,
    block_size: int | None = None,
    out_dtype: torch.dtype | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """X (..., K) @ dequant(W)^T (+ bias) -> (..., N).

    x: float16/float32 (W4A16) or int8 with `x_scale` (W4A8). packed_weight: (N, ceil(K / 2)) uint8.
    weight_scale: (N,) per channel, or (N, ceil(K / block_size)) with `block_size`.
    out_dtype: defaults to x's dtype for float inputs and float32 for int8 inputs.
    split_k: K slices summed in the launch (kernels.split_k); None lets split_k_config choose.
    """
    n, k = _check_gemm_args(x, packed_weight, weight_scale, bias, x_scale, block_size)
    check_split_k(split_k)
    out_dtype = out_dtype or (torch.float32 if x.dtype == torch.int8 else x.dtype)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m == 0 or n == 0:
        return torch.empty((*lead, n), dtype=out_dtype, device=x.device)
    weight = packed_weight.view(torch.int8)  # int8 so that >> sign-extends in the kernel
    scale = weight_scale.to(torch.float32).reshape(n, -1)
    bias_arg = bias.to(torch.float32).contiguous() if bias is not None else scale
    block_m, block_n, block_k, warps = gemm_config(m, n, block_size)
    if split_k is None:
        split_k = split_k_config(m, n, k, block_size, multiprocessors(x.device))
    split_k, k_per_split = k_slices(k, block_k, split_k)
    int8_x, blockwise = x.dtype == torch.int8, block_size is not None
    y = torch.empty((m, n), dtype=out_dtype, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split_k)
    workspace, counters = split_k_buffers(grid[0] * grid[1], split_k, block_m, block_n, int8_x and not blockwise, y)
    _int4_gemm_kernel[grid](
        x2, weight, scale, bias_arg, y, workspace, counters,
        m, n, k, k_per_split,
        x2.stride(0), x2.stride(1), weight.stride(0), scale.stride(0), scale.stride(1), y.stride(0), y.stride(1),
        float(x_scale) if x_scale is not None else 1.0,
        INT8_X=int8_x, BLOCKWISE=blockwise, SCALE_BLOCK=block_size or 1,
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, num_warps=warps,
    )
    return y.reshape(*lead, n)


def gemm_config(m: int, n: int, block_size: int | None) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps): fixed heuristics, no autotuning, so runs are reproducible.

    Small M (decode, batch 1) gets a 16-row tile and is bound by the weight bytes; large M gets
    square 128 tiles. BLOCK_K is capped by the scale block so a K tile never straddles two scales,
    and stays >= 32, the smallest K tile tl.dot takes for int8 on NVIDIA GPUs.
    """
    if m <= 16:
        # Narrow column tiles: at batch 1 a 64-wide tile left most of an H100's 132 SMs idle.
        block_m, block_n, warps = 16, 16 if n <= 4096 else 32, 4
    elif m <= 64:
        block_m, block_n, warps = 32 if m <= 32 else 64, 64, 4
    else:
        block_m, block_n, warps = 128, 128 if n >= 128 else 64, 8
    block_k = min(64, block_size or 64)
    return block_m, block_n, block_k, warps


def split_k_config(m: int, n: int, k: int, block_size: int | None, multiprocessors: int) -> int:
    """SPLIT_K for int4_gemm on a GPU with this many SMs (kernels.split_k.choose_split_k's rule)."""
    block_m, block_n, block_k, _ = gemm_config(m, n, block_size)
    return choose_split_k(tiles=triton.cdiv(m, block_m) * triton.cdiv(n, block_n), block_m=block_m, block_n=block_n,
                          block_k=block_k, k=k, reads=m * k + n * k // 2,  # activations (a byte or more each), packed weights
                          outputs=m * n, multiprocessors=multiprocessors)


def _check_gemm_args(x, packed_weight, weight_scale, bias, x_scale, block_size) -> tuple[int, int]:
    if x.dtype not in (*FLOAT_INPUTS, torch.int8):
        raise TypeError(f"x must be float16, float32 (W4A16) or int8 (W4A8), got {x.dtype}")
    if (x.dtype == torch.int8) != (x_scale is not None):
        raise ValueError("an int8 x (W4A8) needs x_scale, its per-tensor scale; a float x takes none")
    if packed_weight.dtype not in (torch.uint8, torch.int8) or packed_weight.dim() != 2:
        raise TypeError(f"packed_weight must be a 2-D uint8 tensor (N, ceil(K/2)), got {packed_weight.dtype} {tuple(packed_weight.shape)}")
    if packed_weight.stride(-1) != 1:
        raise ValueError("packed_weight rows must be contiguous")
    n, k = packed_weight.shape[0], x.shape[-1]
    if packed_weight.shape[1] != packed_length(k):
        raise ValueError(f"x has K={k}, which packs into {packed_length(k)} bytes per row, but packed_weight has {packed_weight.shape[1]}")
    _check_scales(weight_scale, n, k, block_size)
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    for name, tensor in (("packed_weight", packed_weight), ("weight_scale", weight_scale), ("bias", bias)):
        if tensor is not None and tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}")
    return n, k


def _check_scales(weight_scale: torch.Tensor, n: int, k: int, block_size: int | None) -> None:
    if block_size is None:
        if tuple(weight_scale.shape) != (n,):
            raise ValueError(f"per-channel weight_scale must have shape ({n},), got {tuple(weight_scale.shape)}")
        return
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size}")
    blocks = -(-k // block_size)
    if tuple(weight_scale.shape) != (n, blocks):
        raise ValueError(f"block-wise weight_scale must have shape ({n}, {blocks}) for K={k}, block {block_size}; got {tuple(weight_scale.shape)}")


def dequantize_weight(packed_weight: torch.Tensor, weight_scale: torch.Tensor, k: int, block_size: int | None) -> torch.Tensor:
    """(N, K) float64 weight: the unpacked integers times their (expanded) scales."""
    q = unpack_int4(packed_weight, k).to(torch.float64)
    scale = weight_scale.to(torch.float64)
    if block_size is None:
        return q * scale.reshape(-1, 1)
    return q * scale.repeat_interleave(block_size, dim=1)[:, :k]


def reference_int4_gemm(
    x: torch.Tensor,
    packed_weight: torch.Tensor,
    weight_scale: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    x_scale: float | None = None,
    block_size: int | None = None,
    out_dtype: torch.dtype | None = None,
    absolute: bool = False,
) -> torch.Tensor:
    """int4_gemm in plain torch: unpack, dequantize and multiply in float64, then cast.

    absolute: sum |x| |w| + |bias| instead, in float64: the size of the terms each output adds up,
    which bounds the rounding error of any float summation of them.
    """
    _check_gemm_args(x, packed_weight, weight_scale, bias, x_scale, block_size)
    out_dtype = out_dtype or (torch.float32 if x.dtype == torch.int8 else x.dtype)
    weight = dequantize_weight(packed_weight, weight_scale, x.shape[-1], block_size)
    xf = x.to(torch.float64) * (x_scale if x_scale is not None else 1.0)
    bias = bias.to(torch.float64) if bias is not None else None
    if absolute:
        xf, weight, bias = xf.abs(), weight.abs(), (bias.abs() if bias is not None else None)
    y = xf @ weight.T
    if bias is not None:
        y = y + bias
    return y if absolute else y.to(out_dtype)
