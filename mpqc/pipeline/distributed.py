"""`torchrun ... -m mpqc.pipeline.distributed`: limpq/seam indicator training across processes.

    torchrun --standalone --nproc-per-node 2 -m mpqc.pipeline.distributed mnist-cnn \\
        --method seam --samples 512 --iterations 300 --out scores.json

(`python -m torch.distributed.run` is the same launcher.) Without torchrun (WORLD_SIZE unset or 1)
the same command trains in one process. Rank 0 writes the scores, the raw learned steps and the
wall time to --out; --per-rank also has every other rank write OUT.rank<r>.json. How the work is
split over the ranks is told in mpqc.sensitivity.distributed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

import onnx_ir as ir
from torch import distributed as dist

from mpqc.data.proxy import proxy_feeds, proxy_labels
from mpqc.passes.analysis import analyze
from mpqc.pipeline.options import BuildOptions
from mpqc.pipeline.search import candidates_of, sensitivity_context
from mpqc.sensitivity.distributed import process_group
from mpqc.targets import load_target


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from mpqc.sensitivity.indicators import train_indicators  # torch-heavy: after argument errors
    from mpqc.sensitivity.sharpness import SharpnessSettings

    rank, world_size = process_group()
    context = build_context(args)
    result = train_indicators(context, regularize=args.method == "seam", gmpq=args.gmpq,
                              sharpness=SharpnessSettings() if args.method == "asga" else None)
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
    analysis = analyze(args.model)
    target = load_target(args.target)
    options = BuildOptions(model=args.model, proxy=args.proxy, proxy_limit=args.samples, seed=args.seed,
                           iterations=args.iterations, epochs=args.epochs, gmpq=args.gmpq, fixed_ends=args.fixed_ends,
                           evaluate_only=args.evaluate_only)
    feeds, _ = proxy_feeds(options.proxy_source(), analysis.loaded)
    candidates = candidates_of(analysis, target, args.evaluate_only)
    labels = proxy_labels(options.proxy_source(), analysis.loaded, len(next(iter(feeds.values()))))
    context = sensitivity_context(analysis, target, ir.to_proto(analysis.model), feeds, candidates, options, labels)
    return dataclasses.replace(context, batch_size=args.batch_size)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mpqc.pipeline.distributed",
        description="Train limpq/seam/asga importance indicators (under torchrun: data-parallel over processes).",
    )
    parser.add_argument("model", help="bundled example, or package.module:factory")
    parser.add_argument("--method", choices=("seam", "limpq", "asga"), default="seam")
    parser.add_argument("--target", default="ort-cpu")
    parser.add_argument("--proxy", help=".npz of proxy inputs keyed by input name (bundled examples bring their own)")
    parser.add_argument("--samples", type=int, help="use the first N proxy samples")
    parser.add_argument("--iterations", type=int, help="training iterations (default: as mpqc build)")
    parser.add_argument("--epochs", type=int, help="passes over the proxy data instead of --iterations")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per step over all processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gmpq", action="store_true", help="add the Grad-CAM attribution-imitation term")
    parser.add_argument("--fixed-ends", action="store_true", help="hold the first and the last layer at 8 bits (LIMPQ)")
    parser.add_argument("--evaluate-only", action="store_true", help="also score precisions the target cannot deploy")
    parser.add_argument("--out", required=True, help="JSON file for rank 0's result")
    parser.add_argument("--per-rank", action="store_true", help="every other rank writes OUT.rank<r>.json too")
    return parser


if __name__ == "__main__":
    sys.exit(main())
