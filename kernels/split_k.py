"""Split-K in one launch, shared by the INT4 GEMM and the INT4 convolution.

When the output tiles alone leave most SMs idle (batch-1 GEMV, MiniLM's 128-token linears, the
7x7 and 14x14 pointwise convs of EfficientNet-Lite0 at batch 1), K is cut into SPLIT_K slices of
whole BLOCK_K tiles and each (tile, slice) pair is one program, so more weight loads are in flight.

The slices meet in the same launch. Each program writes its partial sum to a workspace, then
counts itself in on its tile's counter; the program that arrives last adds the partials in slice
order, finishes the tile (scales, bias, store) and puts the counter back to zero. A split product
is therefore one kernel launch (no zeroing before, no finishing kernel after), and its result is
the same bits on every run: the order of the sum is fixed by the slice numbers, not by which slice
finished first. Against the unsplit kernel, float results differ only by that summation order;
int32 sums (per-channel W4A8) are exact and equal bit for bit.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# choose_split_k: programs per SM worth launching, and how many times the bytes the kernel must read
# it may write again as partial sums. Those stay in L2 (the workspace is small), far cheaper than
# DRAM reads, so 16 still lets MiniLM's 128-row linears split K finely.
PROGRAMS_PER_SM = 8
PARTIAL_TRAFFIC = 16
# Splitting costs a workspace round trip and an atomic per program. On an H200 a 16 x 16 tile over
# K = 384 ran 4.0 us whole and 4.4-5.0 us split, over K = 1280 9.8 us whole and 5.9 us split (with
# a three-launch split that zeroed and finished separately). So only programs whose K loop has at
# least this many multiply-adds (16 x 16 outputs, K = 512) are split.
MIN_SPLIT_MACS = 16 * 16 * 512
INTERPRETER_MULTIPROCESSORS = 132  # an H100's or H200's


@triton.jit
def add_up_slices(acc, workspace_ptr, counter_ptr, tile, k_slice,
                  SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(total, last): park this slice's (BLOCK_M, BLOCK_N) partial sum of output tile `tile`.

    last is true in exactly one program per tile, the one that arrived last; its total is the sum
    of all SPLIT_K partials in slice order, and it must finish the tile. Elsewhere total is zeros.
    """
    tile_size = BLOCK_M * BLOCK_N
    offsets = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    partials = workspace_ptr + tile.to(tl.int64) * (SPLIT_K * tile_size)
    tl.store(partials + k_slice * tile_size + offsets, acc)
    # Every thread's share of the partial is written before one thread's atomic says it is
    # (release); the last program's reads come after its atomic (acquire), straight from L2 (.cg),
    # past any stale line in its SM's L1.
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel", scope="gpu")
    last = arrived == SPLIT_K - 1
    total = tl.zeros_like(acc)
    if last:
        for s in range(0, SPLIT_K):
            total += tl.load(partials + s * tile_size + offsets, cache_modifier=".cg")
        tl.atomic_xchg(counter_ptr + tile, 0, sem="relaxed")  # ready for the next launch
    return total, last


def check_split_k(split_k) -> None:
    """The kernels' split_k argument: None (let them choose) or a positive int."""
    if split_k is not None and (not isinstance(split_k, int) or split_k < 1):
        raise ValueError(f"split_k must be a positive int or None, got {split_k!r}")


def k_slices(k: int, block_k: int, split_k: int) -> tuple[int, int]:
    """(slices, k_per_split): split_k slices of whole BLOCK_K tiles, fewer where some would be empty."""
    tiles = triton.cdiv(k, block_k)
    per_split = triton.cdiv(tiles, min(split_k, tiles))
    return triton.cdiv(tiles, per_split), per_split * block_k


def choose_split_k(*, tiles: int, block_m: int, block_n: int, block_k: int, k: int, reads: int, outputs: int,
                   multiprocessors: int) -> int:
    """SPLIT_K for a product with `tiles` output tiles: 1 unless those tiles leave SMs idle.

    A program's K loop waits on a DRAM load per tile, so with few tiles the GPU sits mostly idle:
    splitting K puts more loads in flight at once. Capped at PROGRAMS_PER_SM programs per SM (more
    only queue), and so that the partial sums (4 bytes per output per slice) stay within
    PARTIAL_TRAFFIC times the `reads` bytes the kernel must read anyway. Short K loops (under
    MIN_SPLIT_MACS per program) stay whole: splitting them costs more than it hides.
    """
    if tiles >= multiprocessors or k * block_m * block_n < MIN_SPLIT_MACS:
        return 1
    split = min(triton.cdiv(k, block_k), triton.cdiv(PROGRAMS_PER_SM * multiprocessors, tiles),
                max(1, PARTIAL_TRAFFIC * reads // (4 * outputs)))
    return k_slices(k, block_k, split)[0]


def split_k_buffers(tiles: int, split_k: int, block_m: int, block_n: int, int_acc: bool,
                    output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(workspace, counters) for a launch writing `output`: room for every partial, and one zeroed
    counter per tile. Unsplit (split_k 1) the kernel reads neither, and both are `output` itself.

    On a GPU the counters are kept per device and stream and reused: every launch leaves them at
    zero, so they are cleared once rather than by an extra launch per call (launches on one stream
    run one after another, so they never share a counter at the same time). Under the interpreter
    they are made afresh, so a kernel stopped halfway (an exception) cannot leave a count behind.
    """
    if split_k == 1:
        return output, output
    device = output.device
    workspace = torch.empty(tiles * split_k * block_m * block_n, dtype=torch.int32 if int_acc else torch.float32, device=device)
    if device.type != "cuda":
        return workspace, torch.zeros(tiles, dtype=torch.int32, device=device)
    return workspace, _cuda_counters(device.index if device.index is not None else torch.cuda.current_device(),
                                     torch.cuda.current_stream(device).cuda_stream, tiles)


_COUNTERS: dict[tuple[int, int], torch.Tensor] = {}


def _cuda_counters(index: int, stream: int, tiles: int) -> torch.Tensor:
    counters = _COUNTERS.get((index, stream))
    if counters is None or counters.numel() < tiles:
        # Grown in powers of two so a run of growing shapes reallocates a few times, not each call.
        counters = torch.zeros(1 << max(tiles - 1, 1).bit_length(), dtype=torch.int32, device=torch.device("cuda", index))
        _COUNTERS[(index, stream)] = counters
    return counters


def multiprocessors(device: torch.device) -> int:
    """SMs of a tensor's GPU; CPU tensors (Triton's interpreter) plan as for an H100, so tests see the GPU's choices."""
    if device.type != "cuda":
        return INTERPRETER_MULTIPROCESSORS
    return _cuda_multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
