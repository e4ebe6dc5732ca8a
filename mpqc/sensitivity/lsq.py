"""LSQ fake quantizers (Esser et al., "Learned Step Size Quantization", ICLR 2020) and the switch that
puts them on a model's layers for indicator training.

A quantizer computes round(clamp(x / s, qmin, qmax)) * s with a learnable step s. Rounding passes the
gradient straight through; the gradient of s is the LSQ one, scaled by g = 1 / sqrt(numel * qmax)
so that steps learn at the pace of the weights. Starting steps follow LIMPQ's reference code: a
weight's from its spread, max(|mean - 3 std|, |mean + 3 std|) / 2^(b-1) (the range that holds
nearly all of a bell-shaped weight, split into the 2^(b-1) levels of one sign); an activation's is
LSQ's 2 * mean(|x|) / sqrt(qmax).

Integer ranges: signed tensors use the narrow symmetric range [-(2^(b-1) - 1), 2^(b-1) - 1] that
the lowering uses for weights (mpqc.lower.numerics); non-negative activations (post-ReLU) use
[0, 2^b - 1]. Weights get one step per layer per bit-width, as in LIMPQ, even where the lowering
quantizes per channel: the step is an importance indicator here, not the deployed scale.

Each layer gets a `LayerQuantizers` with one weight quantizer per candidate weight bit-width and
one activation quantizer per candidate activation bit-width; its `setting` (w_bits, a_bits), None
meaning float, picks which ones the next forward uses. `attach_quantizers` installs them on a
(copied) module: the weight through a parametrization, the input through a forward pre-hook, so
modules with their own forward (padding convs, for one) keep it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize


class LsqFakeQuantize(torch.autograd.Function):
    """round(clamp(x / s, qmin, qmax)) * s with the LSQ gradients, in few passes over x.

    d/dx: 1 where qmin <= x/s <= qmax (straight-through rounding), else 0.
    d/ds: g * (round(x/s) - x/s) inside the range, g * qmin or g * qmax outside it, summed as
    (<grad, y> - <grad_x, x>) / s with y the output (levels times s): no per-element select and no
    division pass, at a relative error of about 1e-4 on tens of millions of elements (float32 dot
    products), far below the gradient's sampling noise. Written out rather than composed from
    straight-through tricks, which made autograd run about twice the elementwise passes; on a CPU
    those passes cost as much as the convolutions. Saves x (usually kept by the ReLU before it
    anyway) and y (kept by the layer after it, which needs its input for its weight gradient).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int, grad_scale: float) -> torch.Tensor:
        y = (x / step).clamp_(qmin, qmax).round_().mul_(step)
        ctx.save_for_backward(x, step, y)
        ctx.qmin, ctx.qmax, ctx.grad_scale = qmin, qmax, grad_scale
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, step, y = ctx.saved_tensors
        s = float(step)
        grad_x = torch.where(x.clamp(ctx.qmin * s, ctx.qmax * s) == x, grad, 0.0)
        grad_step = None
        if ctx.needs_input_grad[1]:
            # sum(grad * levels) - sum(grad_x * x/s): round(x/s) - x/s inside the range, the level outside.
            grad_step = ((_dot(grad, y) - _dot(grad_x, x)) * (ctx.grad_scale / s)).reshape(step.shape)
        return grad_x if ctx.needs_input_grad[0] else None, grad_step, None, None, None


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<a, b> over every element, without copying tensors laid out alike (channels-last ones too)."""
    if a.stride() == b.stride():
        return torch.vdot(_flat_view(a), _flat_view(b))
    return torch.vdot(a.reshape(-1), b.reshape(-1))


def _flat_view(t: torch.Tensor) -> torch.Tensor:
    """The elements of `t` as one vector in memory order (a view where the layout allows one)."""
    if t.is_contiguous():
        return t.view(-1)
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(-1)
    return t.reshape(-1)


def lsq_fake_quantize(x: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int, grad_scale: float) -> torch.Tensor:
    return LsqFakeQuantize.apply(x, step, qmin, qmax, grad_scale)


class LsqQuantizer(nn.Module):
    """One bit-width's learnable step for one tensor (a layer's weight, or a layer's input)."""

    def __init__(self, bits: int, signed: bool, per_sample: bool):
        super().__init__()
        self.bits = bits
        self.signed = signed
        self.qmax = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
        self.qmin = -self.qmax if signed else 0
        # Activations count the features of one sample in g (as LSQ does), weights the whole tensor.
        self.per_sample = per_sample
        self.step = nn.Parameter(torch.ones(()))
        self.initial_step = 1.0

    @classmethod
    def for_weight(cls, bits: int) -> "LsqQuantizer":
        return cls(bits, signed=True, per_sample=False)

    @classmethod
    def for_activation(cls, bits: int, signed: bool) -> "LsqQuantizer":
        return cls(bits, signed=signed, per_sample=True)

    def initialize(self, mean_abs: float) -> None:
        """The LSQ initial step from the tensor's mean absolute value (activations)."""
        self.set_initial(2.0 * mean_abs / math.sqrt(self.qmax))

    def initialize_from_spread(self, mean: float, std: float) -> None:
        """LIMPQ's initial weight step: the larger end of mean -+ 3 std over 2^(b-1)."""
        self.set_initial(max(abs(mean - 3.0 * std), abs(mean + 3.0 * std)) / 2 ** (self.bits - 1))

    def set_initial(self, value: float) -> None:
        self.initial_step = max(value, 1e-8)
        with torch.no_grad():
            self.step.fill_(self.initial_step)

    def keep_positive(self, fraction: float) -> None:
        """Project the step back to at least `fraction` of its initial value after an optimizer step.

        A large step learning rate can carry a step through zero; a step at or below zero quantizes
        nothing meaningful, and as an indicator it would read as the cheapest layer of all.
        """
        with torch.no_grad():
            self.step.clamp_(min=fraction * self.initial_step)

    def grad_scale(self, x: torch.Tensor) -> float:
        numel = x[0].numel() if self.per_sample and x.dim() > 1 else x.numel()
        return 1.0 / math.sqrt(numel * self.qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lsq_fake_quantize(x, self.step, self.qmin, self.qmax, self.grad_scale(x))


class InputStatistics:
    """What the float model feeds a layer: RMS and sign over every sample, mean |x| of the first batch."""

    def __init__(self):
        self.sum_squares = 0.0
        self.count = 0
        self.minimum = math.inf
        self.first_mean_abs: float | None = None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach()
        self.sum_squares += float(torch.linalg.vector_norm(x, dtype=torch.float64)) ** 2
        self.count += x.numel()
        self.minimum = min(self.minimum, float(x.min()))
        if self.first_mean_abs is None:
            self.first_mean_abs = float(x.abs().mean())

    @property
    def rms(self) -> float:
        return math.sqrt(self.sum_squares / max(self.count, 1))

    @property
    def non_negative(self) -> bool:
        return self.minimum >= 0.0


class LayerQuantizers(nn.Module):
    """A layer's quantizers per bit-width, and the (w_bits, a_bits) its next forward uses."""

    def __init__(self, name: str, weight_bits: Sequence[int], activation_bits: Sequence[int]):
        super().__init__()
        self.name = name
        self.weight = nn.ModuleDict({str(b): LsqQuantizer.for_weight(b) for b in sorted(weight_bits)})
        # Activation signedness is known only once the float inputs were seen: see initialize().
        self.activation_bits = tuple(sorted(activation_bits))
        self.activation = nn.ModuleDict()
        self.setting: tuple[int | None, int | None] = (None, None)
        self.statistics: InputStatistics | None = None  # collecting while set

    def initialize(self, weight: torch.Tensor, inputs: InputStatistics) -> None:
        """Initial steps: weights from the float weight's spread, activations from the first float batch."""
        values = weight.detach().double()
        mean, std = float(values.mean()), float(values.std()) if values.numel() > 1 else 0.0
        for quantizer in self.weight.values():
            quantizer.initialize_from_spread(mean, std)
        signed = not inputs.non_negative
        self.activation = nn.ModuleDict({str(b): LsqQuantizer.for_activation(b, signed) for b in self.activation_bits})
        for quantizer in self.activation.values():
            quantizer.initialize(inputs.first_mean_abs or 0.0)

    def quantize_weight(self, weight: torch.Tensor) -> torch.Tensor:
        bits = self.setting[0]
        return weight if bits is None else self.weight[str(bits)](weight)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.statistics is not None:
            self.statistics.add(x)
        bits = self.setting[1]
        return x if bits is None else self.activation[str(bits)](x)

    def every_quantizer(self) -> list[LsqQuantizer]:
        """The layer's weight quantizers, then its activation quantizers."""
        return [*self.weight.values(), *self.activation.values()]

    def steps(self) -> tuple[dict[int, float], dict[int, float]]:
        """(weight bits -> step, activation bits -> step) as plain floats."""
        return ({int(b): q.step.item() for b, q in self.weight.items()},
                {int(b): q.step.item() for b, q in self.activation.items()})


class SwitchedWeight(nn.Module):
    """Weight parametrization of one torch module: quantizes with the quantizers of the current call.

    A module called several times per forward (shared weights) serves several layers ("x", "x#1"):
    each call has its own LayerQuantizers, picked in call order by the forward pre-hook.
    """

    def __init__(self, calls: Sequence[LayerQuantizers]):
        super().__init__()
        self.calls = nn.ModuleList(calls)
        self.next_call = 0
        self.active = 0

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.calls[self.active].quantize_weight(weight)

    def begin_call(self) -> LayerQuantizers:
        self.active = self.next_call % len(self.calls)
        self.next_call += 1
        return self.calls[self.active]


def attach_quantizers(
    model: nn.Module,
    layer_modules: Mapping[str, str],
    weight_bits: Mapping[str, Sequence[int]],
    activation_bits: Mapping[str, Sequence[int]],
) -> dict[str, LayerQuantizers]:
    """Installs quantizers on `model` in place (pass a copy). layer_modules: layer -> module name.

    Layers of one module must be listed as "name", "name#1", ... in call order, as mpqc's exporter
    names them. Returns layer name -> its LayerQuantizers.
    """
    by_module: dict[str, list[str]] = {}
    for layer, owner in layer_modules.items():
        by_module.setdefault(owner, []).append(layer)
    switches: list[SwitchedWeight] = []
    quantizers: dict[str, LayerQuantizers] = {}
    for owner, layers in by_module.items():
        layers.sort(key=_call_index)
        calls = [LayerQuantizers(layer, weight_bits[layer], activation_bits[layer]) for layer in layers]
        quantizers.update({q.name: q for q in calls})
        module = model.get_submodule(owner)
        switch = SwitchedWeight(calls)
        parametrize.register_parametrization(module, "weight", switch, unsafe=True)
        module.register_forward_pre_hook(_quantize_input_hook(switch))
        switches.append(switch)

    def restart_calls(_module, _args):
        for switch in switches:
            switch.next_call = 0

    model.register_forward_pre_hook(restart_calls)
    return quantizers


def quantized_weight_parameter(model: nn.Module, owner: str) -> nn.Parameter:
    """The float weight a parametrized module trains (what `module.weight` is computed from)."""
    return model.get_submodule(owner).parametrizations.weight.original


def _quantize_input_hook(switch: SwitchedWeight):
    def hook(_module, args):
        quantizers = switch.begin_call()
        return (quantizers.quantize_input(args[0]), *args[1:])

    return hook


def _call_index(layer: str) -> int:
    _, _, index = layer.partition("#")
    return int(index) if index else 0
