"""Indicator training under torchrun: two CPU processes over gloo agree with each other and with one
process at the same batch size (BatchNorm in train mode included, its statistics summed over the
ranks); the sampler gives every rank equal batches that add up to the single process's, for any
number of iterations, cycling through a proxy smaller than the budget's batches."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import onnx_ir as ir
import pytest
import torch
from torch import nn

from mpqc.data.mnist import mnist_split
from mpqc.passes.analysis import analyze
from mpqc.sensitivity import distributed
from mpqc.sensitivity.batchnorm import make_switchable
from mpqc.sensitivity.context import SensitivityContext
from mpqc.sensitivity.distributed import iteration_batches
from mpqc.sensitivity.indicators import train_indicators
from mpqc.targets import load_target

SAMPLES = 64


@pytest.mark.parametrize("samples", [64, 67, 20])
def test_rank_batches_split_the_single_process_batches(samples):
    iterations = 7  # several passes over 20 samples, part of one over 67
    single = iteration_batches(samples, 16, seed=3, iterations=iterations, rank=0, world_size=1)
    ranks = [iteration_batches(samples, 16, seed=3, iterations=iterations, rank=r, world_size=2) for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == iterations
    assert all(len(batch) == 16 for batch in single)  # every batch full, a cycle's end joined to the next's start
    for k, (a, b) in enumerate(zip(*ranks)):
        assert len(a) == len(b) == 8  # equal work: no rank waits in an all-reduce
        np.testing.assert_array_equal(np.sort(np.concatenate([a, b])), single[k])
    # Cycling through seeded permutations: no sample is drawn twice more often than another.
    counts = np.bincount(np.concatenate(single), minlength=samples)
    assert counts.max() - counts.min() <= 1
    assert iteration_batches(samples, 16, 4, iterations, 0, 1)[0].tolist() != single[0].tolist()
    assert iteration_batches(samples, 16, 3, 0, 0, 1) == []


def test_torchrun_ranks_train_the_same_indicators_as_one_process(tmp_path):
    out = tmp_path / "scores.json"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "mpqc.pipeline.distributed", "mnist-cnn", "--method", "seam", "--samples", str(SAMPLES),
        "--epochs", "1", "--batch-size", "32", "--evaluate-only", "--out", str(out), "--per-rank",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    rank0, rank1 = json.loads(out.read_text()), json.loads((tmp_path / "scores.rank1.json").read_text())
    assert (rank0["rank"], rank1["rank"], rank0["world_size"]) == (0, 1, 2)
    assert rank0["rank_divergence"] == 0.0 and rank1["rank_divergence"] == 0.0  # DDP kept the steps equal
    assert rank0["scores"] == rank1["scores"] and rank0["weight_steps"] == rank1["weight_steps"]
    assert rank0["optimizer_steps"] == SAMPLES // 32

    # One process over the same samples, batches and policies: the same steps up to rounding. Float32
    # summation order (the gradient all-reduce, BatchNorm's statistics over two ranks) moves an element
    # across a rounding level here and there; train-mode BatchNorm and SGD on the small 8-bit steps
    # carry that further than a frozen network would, as far as a change of thread count does in
    # one process. (Normalising each rank by its own half batch moves them past this tolerance;
    # test_batch_norm_statistics_span_the_ranks checks the statistics themselves.)
    single = train_indicators(_mnist_context(), regularize=True, gmpq=False)
    parallel = {(row["layer"], row["precision"]): row["score"] for row in rank0["scores"]}
    assert parallel.keys() == single.scores.keys()
    for key, score in single.scores.items():
        assert parallel[key] == pytest.approx(score, rel=1e-3, abs=1e-12), key


BATCH_NORM_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    sys.path.insert(0, sys.argv[2])
    from test_distributed import batch_norm_gradients
    from mpqc.sensitivity import distributed

    rank, world_size = distributed.process_group()
    result = batch_norm_gradients(rank, world_size)
    if rank == 0:
        json.dump(result, open(sys.argv[1], "w"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # as mpqc's own torchrun entry point ends: a gloo group left open can abort at exit
    """
)


def batch_norm_gradients(rank: int, world_size: int) -> dict:
    """Gradients and running statistics after one train-mode step of a conv-BN net on this rank's
    share (every world_size-th sample) of one fixed batch of 8."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3), nn.BatchNorm2d(2),
                          nn.Flatten(), nn.Linear(32, 3))
    make_switchable(model, [8, 4], [], world_size)
    model.train()
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 3 + 1
    y = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(2))
    parallel = distributed.data_parallel(model, world_size)
    nn.functional.cross_entropy(parallel(x[rank::world_size]), y[rank::world_size]).backward()
    values = {name: p.grad.tolist() for name, p in model.named_parameters() if p.grad is not None}
    values.update({name: b.tolist() for name, b in model.named_buffers() if b.is_floating_point()})
    return values


def test_batch_norm_statistics_span_the_ranks(tmp_path):
    out = tmp_path / "bn.json"
    (tmp_path / "bn_ranks.py").write_text(BATCH_NORM_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(tmp_path / "bn_ranks.py"), str(out), os.path.dirname(__file__)]
    run = subprocess.run(command, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    parallel, single = json.loads(out.read_text()), batch_norm_gradients(0, 1)
    assert parallel.keys() == single.keys() and any("copies.shared.running_var" in k for k in single)
    for name, value in single.items():
        np.testing.assert_allclose(parallel[name], value, rtol=1e-4, atol=1e-6, err_msg=name)


def _mnist_context() -> SensitivityContext:
    """What the entry point builds for mnist-cnn: the example's proxy (the first train digits), no labels."""
    analysis = analyze("mnist-cnn")
    target = load_target("ort-cpu")
    candidates = {
        layer.name: [p.name for p in target.precisions_for(layer.op_type, deployable_only=False)] for layer in analysis.layers
    }
    return SensitivityContext(
        float_model=ir.to_proto(analysis.model),
        layers=analysis.layers,
        candidates=candidates,
        target=target,
        feeds={"image": mnist_split("train")[0][:SAMPLES]},
        input_names=tuple(analysis.loaded.input_names),
        module=analysis.loaded.module,
        epochs=1,
        batch_size=32,
    )
