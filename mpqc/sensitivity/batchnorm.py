"""Switchable BatchNorm for indicator training: one BatchNorm copy per bit-width, as LIMPQ trains.

A network quantized at 4 bits produces other activation statistics than at 8 bits; with one shared
BatchNorm, every uniform and mixed pass of an iteration would pull its statistics and affine
parameters towards its own (LIMPQ's reference code, after slimmable networks, keeps one copy per
bit-width). Here every BatchNorm of the torch module (the module the ONNX model was exported from,
BatchNorm not yet folded) is replaced, in the training copy only, by a SwitchableBatchNorm holding
copies of the original keyed by the weight bit-width of the layer that ran last before it (the
conv it normalises: "w8", "w4"), "fp32" where that layer runs float in the pass, and one "shared" copy after
a layer whose precision never switches (a layer without quantized candidates, or an end held at a
fixed bit-width): the reference keeps a single BatchNorm behind its fixed first conv.

In train mode a copy normalises with the batch's statistics and updates its own running ones;
under torchrun the statistics are the whole batch's over every rank (distributed.synced_moments).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mpqc.sensitivity import distributed
from mpqc.sensitivity.lsq import SwitchedWeight

SHARED = "shared"
FLOAT = "fp32"  # (a ModuleDict key: "float" is a Module method)


class ProducerTracker:
    """Which BatchNorm copy the next BatchNorm uses: set by a pre-hook on every weight layer."""

    def __init__(self, fixed_layers: Iterable[str]):
        self.fixed = frozenset(fixed_layers)
        self.key = SHARED

    def hook_for(self, module: nn.Module):
        switch = _switch_of(module)

        def hook(_module, _args):
            if switch is None:
                self.key = SHARED
                return
            # Runs after the quantizers' own pre-hook, which picked this call's quantizers.
            quantizers = switch.calls[switch.active]
            bits = quantizers.setting[0]
            self.key = SHARED if quantizers.name in self.fixed else (FLOAT if bits is None else f"w{bits}")

        return hook


class SwitchableBatchNorm(nn.Module):
    """Copies of one BatchNorm, one per key; the tracker's key picks the copy each call uses."""

    def __init__(self, original: _BatchNorm, keys: Iterable[str], tracker: ProducerTracker, world_size: int):
        super().__init__()
        self.copies = nn.ModuleDict({key: copy.deepcopy(original) for key in keys})
        self.tracker = tracker
        self.world_size = world_size
        self.train(original.training)  # a new module starts in train mode; keep the model's mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.copies[self.tracker.key]
        if not (bn.training and self.world_size > 1):
            return bn(x)
        return _synced_batch_norm(bn, x)


def make_switchable(model: nn.Module, weight_bits: Iterable[int], fixed_layers: Iterable[str],
                    world_size: int) -> int:
    """Replaces every BatchNorm of `model` (in place: pass a copy) by a SwitchableBatchNorm; returns
    how many were replaced. Weight layers get the tracker's pre-hook after the quantizers' own."""
    tracker = ProducerTracker(fixed_layers)
    keys = [SHARED, FLOAT, *(f"w{b}" for b in sorted(set(weight_bits), reverse=True))]
    for module in model.modules():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            module.register_forward_pre_hook(tracker.hook_for(module))
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _BatchNorm):
                setattr(parent, name, SwitchableBatchNorm(child, keys, tracker, world_size))
                replaced += 1
    return replaced


def _switch_of(module: nn.Module) -> SwitchedWeight | None:
    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is None or "weight" not in parametrizations:
        return None
    found = [p for p in parametrizations.weight if isinstance(p, SwitchedWeight)]
    return found[0] if found else None


def _synced_batch_norm(bn: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Train-mode batch norm with the statistics of every rank's batch (the module's own formula)."""
    mean, variance, count = distributed.synced_moments(x)
    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            unbiased = variance.detach() * count / max(count - 1, 1)
            bn.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
            bn.running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
    shape = [1, -1] + [1] * (x.dim() - 2)
    y = (x - mean.reshape(shape)) * torch.rsqrt(variance.reshape(shape) + bn.eps)
    if bn.affine:
        y = y * bn.weight.reshape(shape) + bn.bias.reshape(shape)
    return y

