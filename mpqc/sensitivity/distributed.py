"""Indicator training (limpq, seam) across processes: DistributedDataParallel on CPU over gloo.

Under torchrun (the entry point is mpqc.pipeline.distributed) every process trains the same
indicators on its shard of the proxy data; these are the pieces indicator training uses for it.

How the work is split, so that N processes follow the trajectory of one process at the same batch
size: every epoch has one seeded permutation of the proxy samples, and rank r takes every
world_size-th sample of it starting at r, in batches of batch_size / world_size. The union of
the ranks' k-th batches is then the one process's k-th batch, and DDP's gradient average over
ranks is that batch's mean gradient. The random mixed policy of a step is seeded from (seed,
step), so every rank trains the same policy. Parameters start equal (DDP broadcasts rank 0's)
and receive the same averaged gradients, so every rank ends with the same steps; rank 0's are
the result, and each rank reports how far its own had drifted from them (zero in practice).
"""

from __future__ import annotations

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


def shard_batches(sample_count: int, batch_size: int, seed: int, epoch: int, rank: int, world_size: int) -> list[np.ndarray]:
    """This rank's batches (sample indices) for one epoch: every world_size-th sample of the epoch's
    seeded permutation, in batches of batch_size / world_size.

    A tail of fewer than world_size samples is dropped so every rank runs the same number of equal
    batches (a rank with one batch more would wait forever in DDP's all-reduce).
    """
    order = np.random.default_rng([seed, epoch]).permutation(sample_count)
    order = order[: len(order) - len(order) % world_size]
    local = order[rank::world_size]
    size = max(1, batch_size // world_size)
    return [np.sort(local[start:start + size]) for start in range(0, len(local), size)]


def data_parallel(model: nn.Module, world_size: int) -> nn.Module:
    """The model as trained by this process: wrapped in DDP when there are several processes.

    Each training pass is backpropagated on its own, so only one pass's activations are held at a
    time (EfficientNet-Lite0 at 224x224 needs that), and DDP reduces the gradients once per pass:
    autograd first adds the pass's gradient to the already-averaged gradient of the earlier passes
    (equal on every rank), so the average DDP writes back is that sum plus this pass's average.
    Every pass leaves the step sizes of the other bit-widths unused, hence find_unused_parameters.
    BatchNorm is frozen in eval mode, so its buffers need no broadcasting.
    """
    if world_size <= 1:
        return model
    parameters = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    # Newer torch renamed the option (and deprecates the old name); older torch only has the old one.
    no_buffer_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in parameters else {"broadcast_buffers": False}
    return nn.parallel.DistributedDataParallel(model, find_unused_parameters=True, **no_buffer_sync)


def adopt_rank_zero(values: torch.Tensor, world_size: int) -> tuple[torch.Tensor, float]:
    """(rank 0's values, this rank's largest relative difference from them)."""
    if world_size <= 1:
        return values, 0.0
    reference = values.clone()
    dist.broadcast(reference, src=0)
    drift = float(((values - reference).abs() / reference.abs().clamp(min=1e-30)).max()) if values.numel() else 0.0
    return reference, drift
