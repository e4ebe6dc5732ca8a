"""hawq sensitivity: its Hutchinson traces against exact Hessians on a tiny MLP, its scores on the
bundled mnist-cnn, and its errors."""

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from mpqc.data.mnist import mnist_split
from mpqc.data.proxy import proxy_feeds
from mpqc.errors import MpqcError
from mpqc.lower import numerics
from mpqc.passes.analysis import analyze
from mpqc.passes.layers import Layer
from mpqc.pipeline.options import BuildOptions
from mpqc.precision import W4A8, W4A16
from mpqc.sensitivity.context import SensitivityContext
from mpqc.sensitivity.hawq import (
    DEFAULT_ITERATIONS,
    RunningTrace,
    average_hessian_traces,
    hawq_result,
    hawq_scores,
    hessian_traces,
    weight_quantization_error,
)
from mpqc.sensitivity.methods import score_layers
from mpqc.targets import load_target


@pytest.fixture(scope="module")
def mnist():
    analysis = analyze("mnist-cnn")
    feeds, _ = proxy_feeds(BuildOptions(model="mnist-cnn").proxy_source(), analysis.loaded)
    target = load_target("ort-cpu")
    candidates = {
        layer.name: [p.name for p in target.precisions_for(layer.op_type, deployable_only=False)] for layer in analysis.layers
    }
    # The proxy is the first digits of the train split, so its labels are the split's first labels.
    labels = mnist_split("train")[1][: len(feeds["image"])]
    return SensitivityContext(
        float_model=ir.to_proto(analysis.model),
        layers=analysis.layers,
        candidates=candidates,
        target=target,
        feeds=feeds,
        input_names=tuple(analysis.loaded.input_names),
        module=analysis.loaded.module,
        labels=labels,
    )


@pytest.fixture(scope="module")
def result(mnist):
    return hawq_result(mnist)


@pytest.fixture(scope="module")
def scores(result):
    return result.scores


def test_scores_cover_every_candidate_and_order_by_weight_bits(mnist, scores):
    assert set(scores) == {(name, p) for name, ps in mnist.candidates.items() for p in ps}
    for name, ps in mnist.candidates.items():
        assert scores[(name, "fp32")] == 0.0
        quantized = {p: scores[(name, p)] for p in ps if p != "fp32"}
        assert all(np.isfinite(v) and v > 0 for v in quantized.values()), (name, quantized)
        assert quantized["w4a8"] > quantized["w8a8"], name
    assert scores[("fc", "w4a16")] > scores[("fc", "w8a8")]


def test_scoring_leaves_the_module_as_it_was(mnist, scores):
    module, fresh = mnist.module, analyze("mnist-cnn").loaded.module
    assert not module.training
    fresh_parameters = dict(fresh.named_parameters())
    for name, parameter in module.named_parameters():
        assert parameter.requires_grad == fresh_parameters[name].requires_grad, name
        assert parameter.grad is None, name
    fresh_state = fresh.state_dict()
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, fresh_state[name]), name


def test_registry_runs_hawq_and_repeats_it_exactly(mnist, scores):
    assert score_layers("hawq", mnist) == scores


def test_seed_decides_the_random_probes(mnist):
    small = dict(samples=16, iterations=2)
    first = hawq_scores(mnist, **small).scores
    assert hawq_scores(mnist, **small).scores == first
    assert hawq_scores(dataclasses.replace(mnist, seed=1), **small).scores != first


def test_labels_of_other_classes_fall_back_to_output_mse(mnist):
    small = dict(samples=16, iterations=2)
    traces = average_hessian_traces(dataclasses.replace(mnist, labels_match_model=False), **small)
    assert set(traces) == set(mnist.candidates)
    assert traces == average_hessian_traces(mnist, loss="mse", **small)
    assert traces != average_hessian_traces(mnist, **small)


def test_onnx_only_model_is_refused_in_one_line(mnist):
    with pytest.raises(MpqcError, match="--method hawq .*onnx file") as info:
        hawq_scores(dataclasses.replace(mnist, module=None))
    assert "\n" not in str(info.value)


# Tiny models whose full Hessians torch computes exactly in milliseconds.
TINY_SAMPLES = 10


def _tiny_context(module: nn.Module, x: np.ndarray, cross_entropy: bool, seed: int = 0) -> SensitivityContext:
    """Every Linear of `module` is a layer; batches of 4, 4 and 2, which the estimate must weight by size."""
    linears = [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    shapes = {name: tuple(module.get_submodule(name).weight.shape) for name in linears}
    layers = [Layer(name, "Gemm", "x", f"{name}.weight", "y", shapes[name], 0, 1) for name in linears]
    return SensitivityContext(
        float_model=onnx.ModelProto(),
        layers=layers,
        candidates={name: ["fp32", "w8a8", "w4a8"] for name in linears},
        target=load_target("ort-cpu"),
        feeds={"x": x},
        input_names=("x",),
        module=module.eval(),
        labels=np.random.default_rng(1).integers(0, 3, len(x)),
        labels_match_model=cross_entropy,
        seed=seed,
        batch_size=4,
    )


def _mlp_context(cross_entropy: bool, seed: int = 0) -> SensitivityContext:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    x = np.random.default_rng(0).standard_normal((TINY_SAMPLES, 3)).astype(np.float32)
    return _tiny_context(module, x, cross_entropy, seed)


def _weight_hessian(context: SensitivityContext, indices: np.ndarray) -> tuple[torch.Tensor, list[slice]]:
    """Hessian of the mean loss over `indices` w.r.t. all layer weights as one matrix, and each weight's slice of it."""
    module = context.module
    params = dict(module.named_parameters())
    names = [layer.weight for layer in context.layers]
    x = torch.from_numpy(context.feeds["x"][indices])
    labels = torch.from_numpy(context.labels[indices])
    reference = module(x).detach()

    def loss(*weights):
        output = functional_call(module, params | dict(zip(names, weights)), (x,))
        return F.cross_entropy(output, labels) if context.labels_match_model else F.mse_loss(output, reference)

    blocks = torch.autograd.functional.hessian(loss, tuple(params[n].detach() for n in names))
    sizes = [params[n].numel() for n in names]
    rows = [torch.cat([blocks[i][j].reshape(sizes[i], sizes[j]) for j in range(len(names))], dim=1) for i in range(len(names))]
    ends = np.cumsum(sizes)
    return torch.cat(rows).double(), [slice(end - size, end) for end, size in zip(ends, sizes)]


def _exact_average_traces(context: SensitivityContext) -> dict[str, float]:
    hessian, blocks = _weight_hessian(context, np.arange(TINY_SAMPLES))
    return {
        layer.name: float(torch.diagonal(hessian[block, block]).sum()) / (block.stop - block.start)
        for layer, block in zip(context.layers, blocks)
    }


def _probe_variance(hessian: torch.Tensor, block: slice) -> float:
    """Variance of one Rademacher probe v_l . (H v)_l: every off-diagonal entry in the block's rows adds noise."""
    inside = hessian[block, block].pow(2).sum() - torch.diagonal(hessian[block, block]).pow(2).sum()
    across = hessian[block].pow(2).sum() - hessian[block, block].pow(2).sum()
    return float(2 * inside + across)


def _estimate_std(context: SensitivityContext, iterations: int) -> dict[str, float]:
    """Standard deviation of the Hutchinson estimate: independent probes per batch, batches weighted by size."""
    variance = dict.fromkeys((layer.name for layer in context.layers), 0.0)
    for indices, _ in context.batches(np.random.default_rng(context.seed), indices=np.arange(TINY_SAMPLES)):
        hessian, blocks = _weight_hessian(context, indices)
        weight = len(indices) / TINY_SAMPLES
        for layer, block in zip(context.layers, blocks):
            variance[layer.name] += weight**2 * _probe_variance(hessian, block) / iterations / (block.stop - block.start) ** 2
    return {name: float(np.sqrt(v)) for name, v in variance.items()}


def test_trace_is_exact_when_the_hessian_is_diagonal():
    # One Linear on scaled one-hot inputs under the output MSE: H = 2/(N out) I (x) X^T X is diagonal,
    # so a single probe gives the trace exactly, and only normalisation and batch weighting can be wrong.
    rng = np.random.default_rng(0)
    x = np.zeros((TINY_SAMPLES, 6), dtype=np.float32)
    x[np.arange(TINY_SAMPLES), np.arange(TINY_SAMPLES) % 6] = rng.uniform(0.5, 2.0, TINY_SAMPLES)
    torch.manual_seed(0)
    context = _tiny_context(nn.Sequential(nn.Linear(6, 3)), x, cross_entropy=False)
    exact = _exact_average_traces(context)
    assert average_hessian_traces(context, iterations=1) == pytest.approx(exact, rel=1e-5)
    # Every probe gives the same number, so the running mean stops changing at the second probe.
    record = hessian_traces(context)
    assert record.traces == pytest.approx(exact, rel=1e-5)
    assert record.iterations == {"0": [2, 2, 2]} and record.converged == {"0": [True, True, True]}


@pytest.mark.parametrize("cross_entropy", [True, False], ids=["cross-entropy", "output-mse"])
def test_hutchinson_trace_matches_the_exact_hessian(cross_entropy):
    iterations = 3000
    context = _mlp_context(cross_entropy)
    exact = _exact_average_traces(context)
    std = _estimate_std(context, iterations)
    estimate = average_hessian_traces(context, iterations=iterations, tolerance=0.0)  # every probe: a known variance
    assert set(estimate) == set(exact) == {"0", "2"}
    for layer, value in exact.items():
        assert value > 0 and std[layer] < 0.05 * value, (layer, value, std[layer])  # the check below has teeth
        assert abs(estimate[layer] - value) < 4 * std[layer], (layer, estimate[layer], value, std[layer])


def test_tiny_scores_are_trace_times_squared_weight_error():
    context = _mlp_context(True)
    traces = average_hessian_traces(context, iterations=8)
    scores = hawq_scores(context, iterations=8).scores
    modules = context.layer_modules()
    for layer in context.layers:
        weight = modules[layer.name].weight.detach().numpy()
        q, scales = numerics.quantize_weight(weight, 4, 0)
        error = float(np.sum((weight - q * scales[:, None]) ** 2))
        assert scores[(layer.name, "w4a8")] == pytest.approx(traces[layer.name] * error, rel=1e-6)
        assert scores[(layer.name, "fp32")] == 0.0
    assert all(p.requires_grad for p in context.module.parameters())  # a fresh nn.Module's flags, restored


def test_torch_linear_blocks_run_along_its_input_axis():
    torch.manual_seed(0)
    linear = nn.Linear(128, 4)
    layer = Layer("fc", "MatMul", "x", "w", "y", (128, 4), 1, 0)  # the ONNX MatMul weight is (K, N)
    weight = linear.weight.detach().numpy()
    q, scales = numerics.quantize_weight(weight, 4, 0, 1, 64)
    expected = float(np.sum((weight - q * numerics.expand_scales(scales, weight.shape, 1, 64)) ** 2))
    assert weight_quantization_error(linear, layer, W4A16, 64) == pytest.approx(expected, rel=1e-6)
    assert weight_quantization_error(linear, layer, W4A16, 64) < weight_quantization_error(linear, layer, W4A8, 64)


def test_running_trace_stops_as_pyhessian_does():
    steady = RunningTrace(limit=100, tolerance=1e-3)
    for probe in (4.0, 4.0):
        steady.add(probe)
    assert steady.done and steady.converged and steady.iterations == 2 and steady.value == 4.0
    # Running means 2, 3, 2.667, 2.5: relative changes 1/2, 1/9, 1/16, each above 0.05, so it goes on.
    noisy = RunningTrace(limit=100, tolerance=0.05)
    for probe in (2.0, 4.0, 2.0, 2.0):
        assert not noisy.done
        noisy.add(probe)
    noisy.add(2.5)  # mean 2.5 again: no change
    assert noisy.converged and noisy.iterations == 5 and noisy.value == pytest.approx(2.5)
    capped = RunningTrace(limit=3, tolerance=0.0)
    for probe in (1.0, 5.0, 1.0):
        capped.add(probe)
    assert capped.done and not capped.converged and capped.iterations == 3


def test_hutchinson_iterations_are_recorded_and_bounded(mnist, result):
    record = result.hessian
    assert set(record.iterations) == set(record.converged) == set(mnist.candidates)
    for layer, counts in record.iterations.items():
        assert len(counts) == 2  # two batches of 32
        assert all(2 <= n <= DEFAULT_ITERATIONS for n in counts), (layer, counts)
        # A layer that stopped before the limit stopped because its estimate met the tolerance.
        assert all(done for n, done in zip(counts, record.converged[layer]) if n < DEFAULT_ITERATIONS), layer
    assert record.to_json()["max_iterations"] == DEFAULT_ITERATIONS and record.tolerance == 1e-3
    assert result.to_json()["iterations"] == record.iterations
    # No tolerance: every layer takes every iteration.
    fixed = hessian_traces(mnist, samples=32, iterations=5, tolerance=0.0)
    assert all(counts == [5] for counts in fixed.iterations.values())
    assert not any(any(flags) for flags in fixed.converged.values())
