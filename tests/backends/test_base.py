"""The backend registry: every target's backend is found by name and keeps the runner contract."""

import dataclasses

import numpy as np
import pytest

from mpqc.backends.base import BACKENDS, Runner, backend_for
from mpqc.errors import MpqcError
from mpqc.targets import load_target


@pytest.mark.parametrize("name", ["ort-cpu", "trt-a100", "trt-orin"])
def test_every_bundled_target_finds_its_backend(name):
    target = load_target(name)
    backend = backend_for(target)
    assert backend.name == target.backend and target.backend in BACKENDS
    # Where mpqc does not time the runtime itself, it still computes the numbers of its models.
    assert backend.measures_latency or backend_for(backend.numerics_target(target)).measures_latency


def test_an_unknown_backend_is_one_clear_error():
    target = dataclasses.replace(load_target("ort-cpu"), backend="tpu")
    with pytest.raises(MpqcError, match="names backend 'tpu'; mpqc knows onnxruntime, tensorrt"):
        backend_for(target)


def test_the_onnxruntime_runner_runs_in_batches_through_the_base_runner(tinynet):
    import onnx

    from mpqc.passes.analysis import analyze

    spec, proxy = tinynet
    target = load_target("ort-cpu")
    model = onnx.load_model_from_string(analyze(spec).loaded.model.SerializeToString())
    runner = backend_for(target).load(model.SerializeToString(), target)
    assert isinstance(runner, Runner) and runner.threads == 2
    feeds = {"input": np.load(proxy)["input"][:5]}
    whole = runner.run(feeds)[0]
    np.testing.assert_allclose(runner.run_batched(feeds, batch_size=2), whole, rtol=1e-5, atol=1e-6)
    assert runner.latency({"input": feeds["input"][:1]}, warmup=1, runs=3).runs == 3
