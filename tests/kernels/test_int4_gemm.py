"""The Triton INT4 GEMM against its torch reference: W4A16 (fp32, fp16) and W4A8, per-channel and block-wise,
with K in one piece and split into slices summed in the same launch (split-K)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[gpu]'): no INT4 kernels to test")

from mpqc_kernels.int4_gemm import gemm_config, int4_gemm, reference_int4_gemm, split_k_config  # noqa: E402
from mpqc_kernels.int4_layout import pack_int4  # noqa: E402

# Error allowed per activation mode, as a fraction of sum |x| |w| + |bias| per output. int8 inputs
# sum exactly and fp32 ones in fp32: ~1e-7 seen, and 4e-6 is 67 roundings (2^-24 each) deep, the
# worst case of the tile-by-tile sums here. An fp16 output is rounded to 11 significant bits (4.9e-4).
MODES = {"w4a16-fp32": 4e-6, "w4a16-fp16": 1e-3, "w4a8": 4e-6}


def make_case(m, n, k, mode, block, with_bias, seed, device):
    gen = torch.Generator().manual_seed(seed)
    # The full INT4 range, -8 included, though mpqc's quantizer stops at -7: the kernel must not care.
    q = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    blocks = 1 if block is None else -(-k // block)
    scale = torch.rand((n, blocks), generator=gen) * 0.05 + 1e-3
    scale = scale[:, 0] if block is None else scale
    bias = torch.randn(n, generator=gen) if with_bias else None
    if mode == "w4a8":
        x, x_scale = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8), 0.02
    else:
        x, x_scale = torch.randn((m, k), generator=gen).to(torch.float16 if mode == "w4a16-fp16" else torch.float32), None
    to = (lambda t: t.to(device) if t is not None else None)
    return dict(x=to(x), packed_weight=to(pack_int4(q)), weight_scale=to(scale), bias=to(bias), x_scale=x_scale, block_size=block)


def label(mode, block, device, split=False):
    return f"gemm {'split-K ' if split else ''}{mode} {'per-channel' if block is None else f'block {block}'} [{device}]"


# The same examples every run: CI must not depend on which examples hypothesis happens to draw.
@settings(max_examples=100, deadline=None, derandomize=True)
@given(
    m=st.integers(1, 40),
    n=st.integers(1, 48),
    k=st.integers(1, 600),
    mode=st.sampled_from(sorted(MODES)),
    block=st.sampled_from([None, 32, 64, 128]),
    with_bias=st.booleans(),
    split_k=st.sampled_from([None, None, 2, 3, 5, 16]),
    seed=st.integers(0, 2**16),
)
def test_matches_reference(device, check_close, m, n, k, mode, block, with_bias, split_k, seed):
    """split_k None is the automatic choice (K whole at these sizes); forced counts may exceed K's tiles."""
    args = make_case(m, n, k, mode, block, with_bias, seed, device)
    actual = int4_gemm(**args, split_k=split_k)
    check_close(label(mode, block, device, split=split_k is not None), actual, reference_int4_gemm, MODES[mode], **args)


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("block", [None, 32, 64, 128])
def test_every_mode_and_granularity(device, check_close, mode, block):
    """Each combination at least once, with K spanning several scale blocks and an odd tail."""
    args = make_case(19, 40, 2 * 128 + 37, mode, block, True, 7, device)
    check_close(label(mode, block, device), int4_gemm(**args), reference_int4_gemm, MODES[mode], **args)


def test_hand_computed(device):
    """Known bytes, known answer: independent of the reference's unpacking."""
    # W = [[1, -8, 3], [7, 0, -1]] packed by hand: bytes (1 | -8 << 4), (3 | 0 << 4), (7 | 0), (0xF from -1).
    packed = torch.tensor([[0x81, 0x03], [0x07, 0x0F]], dtype=torch.uint8, device=device)
    scale = torch.tensor([0.5, 2.0], device=device)
    x = torch.tensor([[2.0, 1.0, 1.0]], device=device)
    y = int4_gemm(x, packed, scale, bias=torch.tensor([1.0, 0.0], device=device))
    # row 0: (2 - 8 + 3) * 0.5 + 1 = -0.5; row 1: (14 + 0 - 1) * 2 = 26
    assert y.cpu().tolist() == [[-0.5, 26.0]]
    y8 = int4_gemm(torch.tensor([[4, 2, -2]], dtype=torch.int8, device=device), packed, scale, x_scale=0.25)
    # int32 sums: 4 - 16 - 6 = -18 and 28 + 0 + 2 = 30, times 0.25 and the channel scale.
    assert y8.cpu().tolist() == [[-2.25, 15.0]]


def test_leading_dims_and_strides(device, check_close):
    """A (batch, seq, K) activation and a transposed (non-contiguous) one give the reference's answer."""
    args = make_case(2 * 5, 24, 96, "w4a16-fp32", 32, True, 3, device)
    x3 = args["x"].reshape(2, 5, 96)
    y = int4_gemm(**(args | {"x": x3}))
    assert y.shape == (2, 5, 24)
    check_close(label("w4a16-fp32", 32, device), y, reference_int4_gemm, MODES["w4a16-fp32"], **(args | {"x": x3}))
    xt = args["x"].T.contiguous().T  # same values, column-major storage
    assert not xt.is_contiguous()
    check_close(label("w4a16-fp32", 32, device), int4_gemm(**(args | {"x": xt})), reference_int4_gemm, MODES["w4a16-fp32"], **args)


def test_out_dtype(device):
    args = make_case(4, 8, 64, "w4a8", None, False, 1, device)
    assert int4_gemm(**args).dtype == torch.float32
    y16 = int4_gemm(**args, out_dtype=torch.float16)
    assert y16.dtype == torch.float16
    assert torch.allclose(y16.float(), reference_int4_gemm(**args), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    "change, error",
    [
        ({"x_scale": None}, "needs x_scale"),
        ({"block_size": 16}, "block_size must be one of"),
        ({"weight_scale": torch.ones(8, 3)}, "block-wise weight_scale must have shape"),
        ({"packed_weight": torch.zeros(8, 31, dtype=torch.uint8)}, "packs into 32 bytes"),
        ({"bias": torch.zeros(7)}, "bias must have shape"),
    ],
)
def test_rejects_inconsistent_arguments(change, error):
    args = make_case(4, 8, 64, "w4a8", 32, True, 1, "cpu") | change
    with pytest.raises(ValueError, match=error):
        int4_gemm(**args)


def test_compiles_for_gpus_without_one(compile_for_gpu):
    """Launch configurations compile to cubins for sm_80 (A100), the largest tiles also for sm_90 (H100).

    The interpreter checks numerics, not GPU constraints such as tl.dot's minimum tile sizes: this
    does, without a GPU. Per activation type: the smallest tiles (batch-1 decode, per channel) and
    the largest (MiniLM at batch 64, blocks of 32, the smallest K tile); then the split-K path
    (float and int32 partial sums, the counters' atomics) for sm_90, where it is meant to run.
    """
    names = ["x_ptr", "w_ptr", "scale_ptr", "bias_ptr", "y_ptr", "workspace_ptr", "counter_ptr", "M", "N", "K", "k_per_split",
             "stride_xm", "stride_xk", "stride_wn", "stride_sn", "stride_sb", "stride_ym", "stride_yn", "x_scale"]
    jobs = []

    def gemm_job(x_type, y_type, m, n, block, arch, split_k):
        block_m, block_n, block_k, warps = gemm_config(m, n, block)
        int_acc = x_type == "*i8" and block is None
        workspace = (y_type, y_type) if split_k == 1 else ("*i32" if int_acc else "*fp32", "*i32")
        types = [x_type, "*i8", "*fp32", "*fp32", y_type, *workspace] + ["i32"] * 11 + ["fp32"]
        constexprs = dict(INT8_X=x_type == "*i8", BLOCKWISE=block is not None, SCALE_BLOCK=block or 1, HAS_BIAS=True,
                          BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k)
        return {"kernel": "kernels.int4_gemm:_int4_gemm_kernel", "signature": dict(zip(names, types)),
                "constexprs": constexprs, "arch": arch, "num_warps": warps}

    for x_type, y_type in (("*fp16", "*fp16"), ("*fp32", "*fp32"), ("*i8", "*fp16")):
        for m, n, block, archs in ((1, 1000, None, (80,)), (8192, 1536, 32, (80, 90) if x_type == "*fp16" else (80,))):
            jobs += [gemm_job(x_type, y_type, m, n, block, arch, 1) for arch in archs]
    # Split-K: float partials (fp16 x, per channel; int8 x, block-wise) and int32 ones (int8 x, per channel).
    jobs += [gemm_job("*fp16", "*fp16", 1, 384, None, 90, 8), gemm_job("*i8", "*fp32", 1, 384, 64, 90, 8),
             gemm_job("*i8", "*fp16", 128, 384, None, 90, 8)]
    compiled = compile_for_gpu(jobs)  # asserts each cubin exists and fits the GPU's shared memory
    assert len(compiled) == len(jobs)


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("block", [None, 32, 64, 128])
def test_split_k_every_mode_and_granularity(device, check_close, mode, block):
    """Batch-1 GEMV with K over several scale blocks and an odd tail, split in 3, and fp16 output from fp32 sums."""
    args = make_case(1, 40, 4 * 128 + 37, mode, block, True, 11, device)
    check_close(label(mode, block, device, split=True), int4_gemm(**args, split_k=3), reference_int4_gemm, MODES[mode], **args)
    y16 = int4_gemm(**args, split_k=3, out_dtype=torch.float16)
    check_close(label(f"{mode}>fp16", block, device, split=True), y16, reference_int4_gemm, MODES["w4a16-fp16"],
                **args, out_dtype=torch.float16)


def test_split_k_adds_the_bias_once(device):
    """Zero weights: every slice's partial sum is 0, so the output is the bias itself, not split_k times it."""
    k, n = 256, 24
    packed = torch.zeros(n, k // 2, dtype=torch.uint8, device=device)
    bias = torch.linspace(-3.0, 3.0, n, device=device)
    x = torch.randn(2, k, device=device)
    y = int4_gemm(x, packed, torch.ones(n, device=device), bias=bias, split_k=4)
    assert torch.equal(y, bias.expand(2, n))


@pytest.mark.parametrize("mode", sorted(MODES))
def test_split_k_gives_the_same_bits_every_run(device, mode):
    """The slices are added in slice order, not in the order they finish: a GPU's scheduling cannot change the result."""
    args = make_case(1, 64, 1024, mode, 64 if mode == "w4a8" else None, True, 9, device)
    first = int4_gemm(**args, split_k=16)
    for _ in range(2):
        assert torch.equal(int4_gemm(**args, split_k=16), first)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_split_k_w4a8_per_channel_is_exact(device, out_dtype):
    """Per-channel W4A8 sums int32 slices exactly and scales the total once: bit for bit the unsplit result."""
    args = make_case(3, 40, 1000, "w4a8", None, True, 5, device)
    whole = int4_gemm(**args, out_dtype=out_dtype, split_k=1)
    for split_k in (2, 5, 16):
        assert torch.equal(int4_gemm(**args, out_dtype=out_dtype, split_k=split_k), whole)


def test_split_k_config():
    """Split only where the output tiles leave an H100's or H200's 132 SMs idle, in whole K tiles."""
    for block in (None, 32, 64, 128):
        # MiniLM at batch 64 (8192 rows) already has enough tiles.
        assert split_k_config(8192, 384, 1536, block, 132) == 1
        assert split_k_config(8192, 1536, 384, block, 132) == 1
        # GEMV with a long K loop: MiniLM's FFN output linear and EfficientNet-Lite0's classifier at batch 1.
        for n, k in ((384, 1536), (1000, 1280)):
            split = split_k_config(1, n, k, block, 132)
            assert 1 < split <= -(-k // gemm_config(1, n, block)[2])
        # GEMV with K = 384: 6 K tiles of 16 x 16 outputs ran faster whole than split on an H200.
        assert split_k_config(1, 1536, 384, block, 132) == 1
        # 128 rows, batch 1 of MiniLM's 128 tokens: 3 or 12 tiles of 128 x 128, each step a large one.
        assert split_k_config(128, 384, 1536, block, 132) > 1
        assert split_k_config(128, 1536, 384, block, 132) > 1
    assert split_k_config(1, 384, 64, None, 132) == 1  # one K tile: nothing to split


@pytest.mark.parametrize("split_k", [0, -2, 2.0])
def test_rejects_bad_split_k(split_k):
    args = make_case(1, 8, 64, "w4a16-fp32", None, False, 1, "cpu")
    with pytest.raises(ValueError, match="split_k must be"):
        int4_gemm(**args, split_k=split_k)
