"""The split-K pieces both INT4 kernels share: the in-launch sum of slices, its counters, and the slicing rule."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[gpu]'): no INT4 kernels to test")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from mpqc_kernels.split_k import add_up_slices, choose_split_k, k_slices, split_k_buffers  # noqa: E402


@triton.jit
def _sum_tiles_kernel(parts_ptr, y_ptr, workspace_ptr, counter_ptr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (tile, slice) hands parts[tile, slice] to add_up_slices; the finishing program stores y[tile]."""
    tile = tl.program_id(0)
    k_slice = tl.program_id(1)
    offsets = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    part = tl.load(parts_ptr + (tile * SPLIT_K + k_slice) * BLOCK_M * BLOCK_N + offsets)
    total, last = add_up_slices(part, workspace_ptr, counter_ptr, tile, k_slice, SPLIT_K, BLOCK_M, BLOCK_N)
    if last:
        tl.store(y_ptr + tile * BLOCK_M * BLOCK_N + offsets, total)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int32])
def test_add_up_slices_sums_in_slice_order_and_resets_its_counters(device, dtype):
    tiles, split_k, block_m, block_n = 3, 5, 16, 16
    gen = torch.Generator().manual_seed(0)
    shape = (tiles, split_k, block_m, block_n)
    if dtype == torch.float32:
        # Magnitudes 1e8 apart: a float sum in any other order than 0, 1, 2, ... rounds differently.
        parts = torch.randn(shape, generator=gen) * torch.logspace(-8, 8, split_k).reshape(1, -1, 1, 1)
    else:
        parts = torch.randint(-2**20, 2**20, shape, generator=gen, dtype=torch.int32)
    parts = parts.to(device)
    y = torch.empty((tiles, block_m, block_n), dtype=dtype, device=device)
    workspace, counters = split_k_buffers(tiles, split_k, block_m, block_n, dtype == torch.int32, y)
    expected = parts[:, 0].clone()
    for s in range(1, split_k):
        expected += parts[:, s]
    for _ in range(2):  # the same counters twice: the first launch must leave them at zero
        y.fill_(-1)
        _sum_tiles_kernel[(tiles, split_k)](parts, y, workspace, counters, SPLIT_K=split_k, BLOCK_M=block_m, BLOCK_N=block_n)
        assert torch.equal(y, expected)
        assert not counters[:tiles].any()


@given(k=st.integers(1, 5000), block_k=st.sampled_from([32, 64]), split=st.integers(1, 64))
def test_k_slices_cover_k_in_whole_tiles(k, block_k, split):
    slices, per_split = k_slices(k, block_k, split)
    assert per_split % block_k == 0 and 1 <= slices <= split
    assert (slices - 1) * per_split < k <= slices * per_split  # no empty slice, none missing


def test_choose_split_k_fills_idle_sms_within_its_caps():
    common = dict(block_m=16, block_n=16, block_k=64, multiprocessors=132)
    # Enough tiles already, or too short a K loop: whole.
    assert choose_split_k(tiles=132, k=4096, reads=10**7, outputs=132 * 256, **common) == 1
    assert choose_split_k(tiles=4, k=256, reads=10**6, outputs=4 * 256, **common) == 1
    # One tile with a long K: one slice per K tile at most.
    assert choose_split_k(tiles=1, k=4096, reads=10**7, outputs=256, **common) == 64
    # Many outputs for few bytes read: the partial-sum traffic cap binds.
    assert choose_split_k(tiles=4, k=4096, reads=4096, outputs=4096, **common) == 4
