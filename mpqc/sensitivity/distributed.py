"""Indicator training (limpq, seam) across processes: DistributedDataParallel on CPU over gloo.

Run under torchrun, every process trains the same indicators on its shard of the proxy data:

    torchrun --standalone --nproc-per-node 2 -m mpqc.sensitivity.distributed mnist-cnn \\
        --method seam --samples 512 --epochs 3 --out scores.json

(`python -m torch.distributed.run` is the same launcher.) Without torchrun (WORLD_SIZE unset or 1)
the same command trains in one process. Rank 0 writes the scores, the raw learned steps and the
wall time to --out; --per-rank also has every other rank write OUT.rank<r>.json.

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

import argparse
import inspect
import json
import os
import pathlib
import sys

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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from mpqc.sensitivity.indicators import train_indicators  # torch-heavy: after argument errors

    rank, world_size = process_group()
    context = build_context(args)
    result = train_indicators(context, regularize=args.method == "seam", gmpq=args.gmpq)
    record = {"method": args.method, "model": args.model, "rank": rank, "world_size": world_size, **result.to_json()}
    out = pathlib.Path(args.out)
    if rank == 0:
        out.write_text(json.dumps(record, indent=1))
    elif args.per_rank:
        out.with_name(f"{out.stem}.rank{rank}.json").write_text(json.dumps(record, indent=1))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


def build_context(args: argparse.Namespace):
    """The context `mpqc build --policy search` would score, from this entry point's arguments."""
    import dataclasses

    import onnx_ir as ir

    from mpqc.build import BuildOptions, analyze, proxy_feeds, proxy_labels
    from mpqc.search.policy_search import sensitivity_context
    from mpqc.targets import load_target

    analysis = analyze(args.model)
    target = load_target(args.target)
    options = BuildOptions(model=args.model, proxy=args.proxy, proxy_limit=args.samples, seed=args.seed,
                           epochs=args.epochs, gmpq=args.gmpq, evaluate_only=args.evaluate_only)
    feeds, _ = proxy_feeds(options, analysis.loaded)
    candidates = {
        layer.name: [p.name for p in target.precisions_for(layer.op_type, deployable_only=not args.evaluate_only)]
        for layer in analysis.layers
    }
    labels = proxy_labels(options, analysis.loaded, len(next(iter(feeds.values()))))
    context = sensitivity_context(analysis, target, ir.to_proto(analysis.model), feeds, candidates, options, labels)
    return dataclasses.replace(context, batch_size=args.batch_size)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mpqc.sensitivity.distributed",
        description="Train limpq/seam importance indicators (under torchrun: data-parallel over processes).",
    )
    parser.add_argument("model", help="bundled example, or package.module:factory")
    parser.add_argument("--method", choices=("seam", "limpq"), default="seam")
    parser.add_argument("--target", default="ort-cpu")
    parser.add_argument("--proxy", help=".npz of proxy inputs keyed by input name (bundled examples bring their own)")
    parser.add_argument("--samples", type=int, help="use the first N proxy samples")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32, help="samples per step over all processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gmpq", action="store_true", help="add the Grad-CAM attribution-imitation term")
    parser.add_argument("--evaluate-only", action="store_true", help="also score precisions the target cannot deploy")
    parser.add_argument("--out", required=True, help="JSON file for rank 0's result")
    parser.add_argument("--per-rank", action="store_true", help="every other rank writes OUT.rank<r>.json too")
    return parser


if __name__ == "__main__":
    sys.exit(main())
