"""Indicator training under torchrun: two CPU processes over gloo agree with each other and with one
process at the same batch size; the sharding gives every rank equal batches that add up to the
single process's."""

import json
import os
import subprocess
import sys

import numpy as np
import onnx_ir as ir
import pytest

from mpqc.data.mnist import mnist_split
from mpqc.passes.analysis import analyze
from mpqc.sensitivity.context import SensitivityContext
from mpqc.sensitivity.distributed import shard_batches
from mpqc.sensitivity.indicators import train_indicators
from mpqc.targets import load_target

SAMPLES = 64


@pytest.mark.parametrize("samples", [64, 67])
def test_shards_split_the_single_process_batches(samples):
    for epoch in range(2):
        single = shard_batches(samples, 16, seed=3, epoch=epoch, rank=0, world_size=1)
        ranks = [shard_batches(samples, 16, seed=3, epoch=epoch, rank=r, world_size=2) for r in range(2)]
        assert len(ranks[0]) == len(ranks[1])
        assert all(len(a) == len(b) for a, b in zip(*ranks))  # equal work: no rank waits in an all-reduce
        for k, (a, b) in enumerate(zip(*ranks)):
            assert not set(a) & set(b)
            if samples % 2 == 0:
                np.testing.assert_array_equal(np.sort(np.concatenate([a, b])), single[k])
    assert shard_batches(64, 16, 3, 0, 0, 1)[0].tolist() != shard_batches(64, 16, 3, 1, 0, 1)[0].tolist()


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

    # One process over the same samples, batches and policies: the same steps up to rounding.
    single = train_indicators(_mnist_context(), regularize=True, gmpq=False)
    parallel = {(row["layer"], row["precision"]): row["score"] for row in rank0["scores"]}
    assert parallel.keys() == single.scores.keys()
    for key, score in single.scores.items():
        assert parallel[key] == pytest.approx(score, rel=1e-4, abs=1e-12), key


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
