"""HAWQ-V3 sensitivity: average Hessian trace times the squared weight quantization error.

score(layer, p) = T_l * ||W_l - Q_p(W_l)||^2, where T_l is the trace of the loss Hessian with
respect to the layer's weight divided by the weight's number of parameters, estimated with
Hutchinson's method (E[v^T H v] = tr H for Rademacher v) from Hessian-vector products by double
backward. No training: one forward and one backward per batch, then one extra backward per
Hutchinson iteration, shared by every layer. fp32 scores 0.

Iterations follow PyHessian's trace(maxIter=100, tol=1e-3), which HAWQ-V3 uses: probes are drawn
until the running mean of v^T H v changes by less than tol relative to its previous value
(|m_i - m_(i-1)| / (|m_(i-1)| + 1e-6) < tol, with m_0 = 0), at most maxIter of them. Each layer
stops on its own estimate, as per-layer PyHessian runs would (one Hessian-vector product still
serves every layer that is still going); the iterations each layer took, per batch, are recorded.

The loss is the cross entropy against the training labels when the model is a classifier of those
labels; otherwise (embeddings, or labels of other classes) it is the MSE between the output and
the float model's own output. That MSE is zero with a zero gradient at the float weights, but its
Hessian there is the Gauss-Newton matrix 2 J^T J / n, which is what measures how much a weight
perturbation moves the output.

Both the Hessian and the quantization error are taken on the torch module's weight (BatchNorm not
folded in), quantized with the lowering's own numerics: per output channel, or block-wise along the
reduction axis for INT4 weight-only.

HAWQ sees weights only: precisions with the same weight format score the same, so w8a8 and w4a8
differ by their weight bits alone and activation quantization adds nothing to any score.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from mpqc import progress
from mpqc.errors import MpqcError
from mpqc.passes.layers import Layer
from mpqc.precision import Precision, precision
from mpqc.sensitivity.context import SensitivityContext
from mpqc.sensitivity.methods import Scored
from mpqc.sensitivity.qerror import quantized_weight

DEFAULT_SAMPLES = 64
DEFAULT_ITERATIONS = 100  # PyHessian's maxIter
DEFAULT_TOLERANCE = 1e-3  # PyHessian's tol; 0 runs every iteration
LOSSES = ("auto", "cross_entropy", "mse")


@dataclasses.dataclass
class HessianTraces:
    """Per-layer average Hessian traces and how the Hutchinson estimate of each got there."""

    traces: dict[str, float]  # layer -> tr(d2 loss / dW2) / W.numel()
    iterations: dict[str, list[int]]  # layer -> Hutchinson iterations it took, per batch
    converged: dict[str, list[bool]]  # layer -> whether its estimate met the tolerance, per batch
    max_iterations: int
    tolerance: float

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class HawqResult:
    scores: dict[tuple[str, str], float]
    hessian: HessianTraces

    def to_json(self) -> dict:
        return {"scores": [{"layer": layer, "precision": p, "score": s} for (layer, p), s in self.scores.items()],
                **self.hessian.to_json()}


def hawq_scores(context: SensitivityContext, **options) -> Scored:
    """(layer, precision) -> average Hessian trace x squared weight quantization error; fp32 scores 0,
    with how many Hutchinson iterations the traces took. `options`: hessian_traces' (samples,
    iterations, tolerance, loss)."""
    result = hawq_result(context, **options)
    hessian = result.hessian
    counts = [n for per_batch in hessian.iterations.values() for n in per_batch]
    met = [ok for per_batch in hessian.converged.values() for ok in per_batch]
    return Scored(result.scores, {"hutchinson": {
        "tolerance": hessian.tolerance, "max_iterations": hessian.max_iterations,
        "iterations_median": float(np.median(counts)) if counts else None, "iterations_max": max(counts, default=None),
        "estimates": len(met), "estimates_within_tolerance": int(sum(met))}})


def hawq_result(context: SensitivityContext, **options) -> HawqResult:
    """The scores with the traces behind them and the Hutchinson iterations each took."""
    context.require_module("hawq")
    hessian = hessian_traces(context, **options)
    traces = hessian.traces
    modules = context.layer_modules()
    calls = _calls_per_weight(modules)
    block_size = context.target.int4_block_size
    scores: dict[tuple[str, str], float] = {}
    for layer in context.layers:
        names = context.candidates.get(layer.name, ())
        if not names:
            continue
        weight = modules[layer.name].weight
        # A weight used by several layers (a module called twice) is quantized once, and such layers
        # are tied to one precision: split its score so the tied group adds up to it once.
        share = traces.get(layer.name, 0.0) / calls[id(weight)]
        for name in names:
            error = weight_quantization_error(modules[layer.name], layer, precision(name), block_size)
            scores[(layer.name, name)] = share * error
    return HawqResult(scores, hessian)


def average_hessian_traces(context: SensitivityContext, **options) -> dict[str, float]:
    """Layer name -> Hutchinson estimate of tr(d2 loss / dW2) / W.numel(), for layers with a quantized
    candidate. `options`: hessian_traces'."""
    return hessian_traces(context, **options).traces


def hessian_traces(
    context: SensitivityContext,
    *,
    samples: int = DEFAULT_SAMPLES,
    iterations: int = DEFAULT_ITERATIONS,
    tolerance: float = DEFAULT_TOLERANCE,
    loss: str = "auto",
) -> HessianTraces:
    """The traces of average_hessian_traces and the iterations behind them. The loss is the mean over
    the first `samples` proxy samples; all randomness comes from context.seed. `iterations` is the
    most Hutchinson probes per batch; a layer stops earlier once its estimate is stable to `tolerance`."""
    if loss not in LOSSES:
        raise MpqcError(f"unknown hawq loss '{loss}': use one of {', '.join(LOSSES)}")
    if samples < 1 or iterations < 1:
        raise MpqcError(f"hawq needs at least one sample and one iteration, got {samples} and {iterations}")
    if not tolerance >= 0:
        raise MpqcError(f"hawq's tolerance must be at least 0, got {tolerance}")
    module = context.require_module("hawq")
    modules = context.layer_modules()
    scored = [layer.name for layer in context.layers if _has_quantized_candidate(context.candidates.get(layer.name))]
    for name in scored:
        _torch_weight_axes(modules[name], name)  # an unsupported layer fails before the costly part
    weights = _unique_weights(modules[name] for name in scored)
    if not weights:
        return HessianTraces({}, {}, {}, iterations, tolerance)

    count = min(samples, context.sample_count)
    objective = _Objective.choose(context, loss)
    generator = torch.Generator().manual_seed(context.seed)
    sums = [0.0] * len(weights)
    taken: list[list[int]] = [[] for _ in weights]
    settled: list[list[bool]] = [[] for _ in weights]
    with _gradients_for(module, weights), torch.inference_mode(False), torch.enable_grad():
        batches = context.batches(np.random.default_rng(context.seed), indices=np.arange(count))
        for indices, inputs in progress.bar(batches, "hawq Hessian traces", total=-(-count // context.batch_size), unit="batch"):
            estimates = _batch_traces(module, inputs, objective, indices, weights, iterations, tolerance, generator)
            for i, estimate in enumerate(estimates):
                # Batch means weighted by batch size: the trace of the mean loss over all `count` samples.
                sums[i] += estimate.value * len(indices) / count
                taken[i].append(estimate.iterations)
                settled[i].append(estimate.converged)

    index = {id(w): i for i, w in enumerate(weights)}
    by_weight = {id(w): total / w.numel() for w, total in zip(weights, sums)}
    # Hutchinson's estimate is unbiased but noisy, and the cross-entropy Hessian away from a minimum
    # may be indefinite: a negative estimate means "flat", and scores must not reward quantization.
    traces = {name: max(by_weight[id(modules[name].weight)], 0.0) for name in scored}
    return HessianTraces(traces, {name: taken[index[id(modules[name].weight)]] for name in scored},
                         {name: settled[index[id(modules[name].weight)]] for name in scored}, iterations, tolerance)


class RunningTrace:
    """PyHessian's stopping rule for one layer's Hutchinson estimate: stop once the running mean of
    the probes changed by less than `tolerance` relative to its previous value (or at `limit`)."""

    def __init__(self, limit: int, tolerance: float):
        self.limit, self.tolerance = limit, tolerance
        self.total, self.iterations = 0.0, 0
        self.converged = False

    @property
    def value(self) -> float:
        return self.total / self.iterations if self.iterations else 0.0

    @property
    def done(self) -> bool:
        return self.converged or self.iterations >= self.limit

    def add(self, probe: float) -> None:
        previous = self.value
        self.total += probe
        self.iterations += 1
        self.converged = abs(self.value - previous) / (abs(previous) + 1e-6) < self.tolerance


def weight_quantization_error(module: nn.Module, layer: Layer, p: Precision, block_size: int) -> float:
    """||W - Q_p(W)||^2 of the torch module's weight, quantized as the lowering quantizes weights."""
    if p.is_float:
        return 0.0
    weight = module.weight.detach().cpu().numpy().astype(np.float32)
    axes = _torch_weight_axes(module, layer.name)
    # The ONNX layer's axes describe the ONNX weight (a MatMul's is (K, N)); the torch weight has its own.
    torch_layer = dataclasses.replace(
        layer, weight_shape=tuple(weight.shape), channel_axis=axes[0], reduction_axis=axes[1]
    )
    difference = weight.astype(np.float64) - quantized_weight(weight, torch_layer, p, block_size)
    return float(np.sum(difference * difference))


def _torch_weight_axes(module: nn.Module, name: str) -> tuple[int, int]:
    """(output channel axis, reduction axis) of a torch layer's weight: Linear (out, in), Conv (O, I/g, k...)."""
    if isinstance(module, nn.Linear) or (isinstance(module, nn.modules.conv._ConvNd) and not module.transposed):
        return 0, 1
    raise MpqcError(
        f"layer '{name}' is computed by a torch {type(module).__name__}, and hawq knows the weight layout of "
        "Linear and Conv modules only: use --method qerror"
    )


def _has_quantized_candidate(names: Sequence[str] | None) -> bool:
    return any(not precision(name).is_float for name in names or ())


def _unique_weights(modules) -> list[nn.Parameter]:
    """Each layer's weight parameter once, in layer order (a module called twice has one weight)."""
    found: dict[int, nn.Parameter] = {}
    for module in modules:
        found.setdefault(id(module.weight), module.weight)
    return list(found.values())


def _calls_per_weight(modules: dict[str, nn.Module]) -> dict[int, int]:
    calls: dict[int, int] = {}
    for module in modules.values():
        calls[id(module.weight)] = calls.get(id(module.weight), 0) + 1
    return calls


@contextlib.contextmanager
def _gradients_for(module: nn.Module, weights: list[nn.Parameter]) -> Iterator[None]:
    """Within the block only `weights` require gradients (less graph to build); every flag is restored after."""
    saved = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def _batch_traces(
    module: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    objective: "_Objective",
    indices: np.ndarray,
    weights: list[nn.Parameter],
    iterations: int,
    tolerance: float,
    generator: torch.Generator,
) -> list[RunningTrace]:
    """Hutchinson estimate of each weight's Hessian trace of this batch's mean loss, probed until stable."""
    value = objective(_model_output(module(*inputs)), indices)
    if not torch.isfinite(value):
        raise MpqcError(f"hawq: the loss on the proxy data is {float(value)}: the float model's outputs are not finite")
    try:
        gradients = torch.autograd.grad(value, weights, create_graph=True)
    except RuntimeError as exc:
        raise MpqcError(f"hawq could not differentiate this model: {str(exc).splitlines()[0]}") from None
    estimates = [RunningTrace(iterations, tolerance) for _ in weights]
    while not all(estimate.done for estimate in estimates):
        # Every weight draws its probe each round (one Hessian-vector product serves them all), so a
        # layer's probes do not depend on when the others stop.
        vectors = [_rademacher(w, generator) for w in weights]
        products = _hessian_vector_products(gradients, weights, vectors)
        for estimate, v, hv in zip(estimates, vectors, products):
            if not estimate.done:
                estimate.add(float(torch.sum(v * hv)))
    if not all(np.isfinite([estimate.value for estimate in estimates])):
        raise MpqcError("hawq: the Hessian trace estimate is not finite: the loss curvature overflows float32")
    return estimates


def _hessian_vector_products(gradients, weights, vectors) -> list[torch.Tensor]:
    try:
        products = torch.autograd.grad(gradients, weights, grad_outputs=vectors, retain_graph=True, allow_unused=True)
    except RuntimeError as exc:
        reason = str(exc).splitlines()[0]
        raise MpqcError(f"hawq needs second derivatives, and torch cannot take them for this model: {reason}") from None
    # A weight the loss is linear in (no curvature) has no second-order graph: its H v is zero.
    return [torch.zeros_like(w) if hv is None else hv for w, hv in zip(weights, products)]


def _rademacher(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    signs = torch.randint(0, 2, like.shape, generator=generator, dtype=like.dtype)
    return signs.mul_(2).sub_(1).to(like.device)


def _model_output(output) -> torch.Tensor:
    """The tensor the loss is taken on: the output, or the first output of a tuple or dict."""
    if isinstance(output, dict):
        output = next(iter(output.values()), None)
    elif isinstance(output, (tuple, list)):
        output = output[0] if output else None
    if not isinstance(output, torch.Tensor) or not output.is_floating_point():
        raise MpqcError("hawq needs a model whose (first) output is a float tensor")
    return output


class _Objective:
    """The loss at the float weights: cross entropy against labels, or MSE against the output itself."""

    def __init__(self, labels: np.ndarray | None):
        self.labels = None if labels is None else torch.from_numpy(np.asarray(labels, dtype=np.int64))

    @classmethod
    def choose(cls, context: SensitivityContext, loss: str) -> "_Objective":
        if loss == "mse":
            return cls(None)
        classes = _class_count(context)
        if classes is None or not context.classifier or not context.labels_match_model:
            if loss == "cross_entropy":
                raise MpqcError("hawq's cross_entropy loss needs a classifier (output (N, classes)) and labels of its classes")
            return cls(None)
        labels = context.training_labels()
        if labels.min() < 0 or labels.max() >= classes:
            if loss == "cross_entropy":
                raise MpqcError(
                    f"hawq: the labels run from {labels.min()} to {labels.max()}, outside the model's {classes} classes"
                )
            return cls(None)
        return cls(labels)

    def __call__(self, output: torch.Tensor, indices: np.ndarray) -> torch.Tensor:
        if self.labels is not None:
            return F.cross_entropy(output, self.labels[torch.from_numpy(indices)])
        # The target is the output itself, detached: the loss and its gradient are zero at the float
        # weights, while double backward still yields the Gauss-Newton curvature.
        return F.mse_loss(output, output.detach())


def _class_count(context: SensitivityContext) -> int | None:
    """Number of classes when the model's output is (N, classes); None for any other shape."""
    inputs = tuple(torch.from_numpy(np.ascontiguousarray(context.feeds[n][:1])) for n in context.input_names)
    with torch.no_grad():
        output = _model_output(context.require_module("hawq")(*inputs))
    return int(output.shape[1]) if output.dim() == 2 else None
