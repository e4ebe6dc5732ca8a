"""Indicator training (limpq, seam) across processes: DistributedDataParallel on CPU over gloo.

Under torchrun (the entry point is mpqc.pipeline.distributed) every process trains the same
indicators on its shard of the proxy data; these are the pieces indicator training uses for it.

How the work is split, so that N processes follow the trajectory of one process at the same batch
size: the proxy samples are read as one stream of seeded permutations, one after the other, and
iteration k takes the k-th run of `batch_size` samples of that stream (a batch may join the end of
one permutation to the start of the next, so a proxy smaller than the iteration budget's worth of
batches is cycled through, and every batch is full). Rank r takes every world_size-th sample of
the batch starting at r; DDP's gradient average over ranks is then the whole batch's mean
gradient. BatchNorm layers, in train mode, normalise with the whole batch's statistics, summed
over the ranks by a differentiable all-reduce (torch's SyncBatchNorm runs on GPUs only), so they
see what one process would see. The random mixed policy of an iteration is seeded from (seed,
iteration), so every rank trains the same policy. Parameters start equal (DDP broadcasts rank
0's) and receive the same averaged gradients, so every rank ends with the same steps; rank 0's
are the result, and each rank reports how far its own had drifted from them (zero in practice).
"""

from __future__ import annotations

import functools
import inspect
import os

import numpy as np
import torch
from torch import distributed as dist
from torch import nn


def process_group() -> tuple[int, int]:
    """(rank, world size); joins the gloo process group when launched by torchrun with WORLD_SIZE > 1."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def batch_samples(sample_count: int, batch_size: int, world_size: int) -> int:
    """Samples per iteration over all ranks: batch_size, at most the proxy's size, a multiple of world_size."""
    size = min(batch_size, sample_count)
    return max(world_size, size - size % world_size)


def iteration_batches(sample_count: int, batch_size: int, seed: int, iterations: int, rank: int,
                      world_size: int) -> list[np.ndarray]:
    """This rank's sample indices for each of `iterations` iterations (see the module docstring).

    Every rank gets the same number of equal batches (a rank with one batch more would wait forever
    in DDP's all-reduce), and the union of the ranks' k-th batches is one process's k-th batch.
    """
    if iterations <= 0:
        return []
    size = batch_samples(sample_count, batch_size, world_size)
    needed = iterations * size
    stream = np.concatenate([np.random.default_rng([seed, cycle]).permutation(sample_count)
                             for cycle in range(-(-needed // sample_count))])
    return [np.sort(stream[k * size:(k + 1) * size][rank::world_size]) for k in range(iterations)]


def data_parallel(model: nn.Module, world_size: int) -> nn.Module:
    """The model as trained by this process: wrapped in DDP when there are several processes.

    Each training pass is backpropagated on its own, so only one pass's activations are held at a
    time (EfficientNet-Lite0 at 224x224 needs that), and DDP reduces the gradients once per pass:
    autograd first adds the pass's gradient to the already-averaged gradient of the earlier passes
    (equal on every rank), so the average DDP writes back is that sum plus this pass's average.
    Every pass leaves the step sizes of the other bit-widths (and their BatchNorm copies) unused,
    hence find_unused_parameters. BatchNorm's running statistics come from the whole batch on every
    rank (see synced_moments), so its buffers need no broadcasting.
    """
    if world_size <= 1:
        return model
    parameters = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    # Newer torch renamed the option (and deprecates the old name); older torch only has the old one.
    no_buffer_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in parameters else {"broadcast_buffers": False}
    return nn.parallel.DistributedDataParallel(model, find_unused_parameters=True, **no_buffer_sync)


@functools.cache
def _statistics_group():
    """A process group of its own for BatchNorm's all-reduces, which run inside forward and backward,
    so they never queue up between DDP's gradient all-reduces on the default group."""
    return dist.new_group(backend="gloo")


def synced_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(mean, biased variance, sample count) per channel (axis 1) over every rank's batch, with
    gradients flowing back to every rank's input. Two passes (mean, then the squared deviations)
    rather than E[x^2] - E[x]^2, which loses digits where the mean is large against the spread."""
    from torch.distributed.nn.functional import all_reduce

    group = _statistics_group()
    dims = [d for d in range(x.dim()) if d != 1]
    count = x.numel() // x.shape[1] * dist.get_world_size()
    mean = all_reduce(x.sum(dims), group=group) / count
    shape = [1, -1] + [1] * (x.dim() - 2)
    variance = all_reduce((x - mean.reshape(shape)).pow(2).sum(dims), group=group) / count
    return mean, variance, count


def any_rank(flag: bool, world_size: int) -> bool:
    """True when `flag` is true on some rank (every rank gets the same answer)."""
    if world_size <= 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def adopt_rank_zero(values: torch.Tensor, world_size: int) -> tuple[torch.Tensor, float]:
    """(rank 0's values, this rank's largest relative difference from them)."""
    if world_size <= 1:
        return values, 0.0
    reference = values.clone()
    dist.broadcast(reference, src=0)
    drift = float(((values - reference).abs() / reference.abs().clamp(min=1e-30)).max()) if values.numel() else 0.0
    return reference, drift
