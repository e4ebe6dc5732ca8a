"""ASGA's sharpness-aware, gradient-aligned update of the indicator-training parameters.

ASGA (Ma et al., ICML 2025) searches on a small proxy with three additions to the search loss's
optimisation: sharpness-aware minimisation (the gradient is taken at theta_p = theta + e, the
worst point of a neighbourhood of radius rho), an alignment of the clean and perturbed gradients,
and an adaptive radius. Its code is not public, so each part follows the published method it
names:

* Perturbation (ASAM, Kwon et al., ICML 2021, the "adaptive" sharpness): e = rho * T^2 g / ||T g||
  with T = |theta| + eta element-wise (eta = 0.01 as ASAM), and T = |s| for an LSQ step s. A plain
  SAM step of fixed norm would move a 1e-3 step by many times its value; scaled by T no element
  moves by more than rho times its own size, and a step stays positive (rho < 1).
* Alignment (GSAM, Zhuang et al., ICLR 2022): the update direction is g_p - alpha * g_perp, with
  g_p the perturbed gradient and g_perp the part of the clean gradient orthogonal to it: descending
  the perturbed loss while shrinking the surrogate gap h = L(theta_p) - L(theta) without working
  against g_p.
* Radius (GSAM's rule): rho follows the learning rate, rho_t = rho_min + (rho_max - rho_min) *
  (lr_t - lr_min) / (lr_max - lr_min): wide while the steps move fast, narrow once they settle.

The perturbed pass does not update BatchNorm's running statistics (they are put back), as SAM's
implementations do: the neighbourhood is probed, not trained on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

ETA = 0.01  # ASAM's offset of T = |theta| + eta (not for LSQ steps, which are scale-only)


@dataclasses.dataclass(frozen=True)
class SharpnessSettings:
    rho_max: float = 0.5  # ASAM's radius for SGD on CIFAR-10
    rho_min: float = 0.05
    alpha: float = 0.1  # GSAM's weight of the orthogonal ascent

    def radius(self, lr: float, lr_max: float, lr_min: float) -> float:
        if lr_max <= lr_min:
            return self.rho_max
        return self.rho_min + (self.rho_max - self.rho_min) * (lr - lr_min) / (lr_max - lr_min)

    def to_json(self) -> dict:
        return {"rho_max": self.rho_max, "rho_min": self.rho_min, "alpha": self.alpha, "eta": ETA}


@dataclasses.dataclass(frozen=True)
class SharpnessStep:
    """What one iteration's perturbation saw."""

    radius: float
    clean_loss: float
    perturbed_loss: float
    gradient_cosine: float  # between the clean and the perturbed gradient

    @property
    def gap(self) -> float:
        return self.perturbed_loss - self.clean_loss


def align_gradients(parameters: Sequence[nn.Parameter], scale_only: set[int], model: nn.Module,
                    clean_loss: float, perturbed_backward: Callable[[], float], radius: float,
                    settings: SharpnessSettings) -> SharpnessStep:
    """Replaces the clean gradients in `parameters`' .grad by ASGA's update direction.

    `perturbed_backward` recomputes the same losses and backpropagates them (into zeroed .grad) and
    returns their sum; `scale_only` holds the ids of the LSQ steps. Parameters without a gradient
    stay without one."""
    live = [p for p in parameters if p.grad is not None]
    clean = [p.grad.detach().clone() for p in live]
    scales = [p.detach().abs() if id(p) in scale_only else p.detach().abs() + ETA for p in live]
    norm = torch.sqrt(sum(((t * g).double() ** 2).sum() for t, g in zip(scales, clean)))
    if not torch.isfinite(norm) or norm == 0:
        return SharpnessStep(radius, clean_loss, clean_loss, 1.0)
    moves = [(radius * t * t * g / norm).to(g.dtype) for t, g in zip(scales, clean)]
    statistics = _batchnorm_statistics(model)
    originals = [p.detach().clone() for p in live]  # put back exactly: theta + e - e is not theta in floats
    with torch.no_grad():
        for p, e in zip(live, moves):
            p.add_(e)
    for p in live:
        p.grad = None
    try:
        perturbed_loss = perturbed_backward()
    finally:
        with torch.no_grad():
            for p, original in zip(live, originals):
                p.copy_(original)
            for buffer, saved in statistics:
                buffer.copy_(saved)
    perturbed = [p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in live]
    dot = sum((g * gp).double().sum() for g, gp in zip(clean, perturbed))
    perturbed_norm2 = sum((gp.double() ** 2).sum() for gp in perturbed)
    clean_norm2 = sum((g.double() ** 2).sum() for g in clean)
    along = dot / perturbed_norm2 if perturbed_norm2 > 0 else torch.zeros((), dtype=torch.float64)
    for p, g, gp in zip(live, clean, perturbed):
        orthogonal = g - along.to(g.dtype) * gp
        p.grad = gp - settings.alpha * orthogonal
    cosine = float(dot / torch.sqrt(clean_norm2 * perturbed_norm2)) if perturbed_norm2 > 0 else 0.0
    return SharpnessStep(radius, clean_loss, perturbed_loss, cosine)


def _batchnorm_statistics(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(buffer, copy) of every BatchNorm running statistic, to put back after the perturbed pass."""
    saved = []
    for module in model.modules():
        if isinstance(module, _BatchNorm) and module.track_running_stats:
            for buffer in (module.running_mean, module.running_var, module.num_batches_tracked):
                if buffer is not None:
                    saved.append((buffer, buffer.detach().clone()))
    return saved


def summarize(steps: Sequence[SharpnessStep], settings: SharpnessSettings) -> dict:
    """The settings, and the surrogate gap and gradient cosine over the first and the last tenth of the run."""
    window = max(1, len(steps) // 10)

    def mean(values):
        return float(sum(values) / len(values)) if values else None

    parts = {"first": steps[:window], "last": steps[-window:]} if steps else {}
    return settings.to_json() | {
        "iterations": len(steps),
        "surrogate_gap": {name: mean([s.gap for s in part]) for name, part in parts.items()},
        "gradient_cosine": {name: mean([s.gradient_cosine for s in part]) for name, part in parts.items()},
        "radius": {name: mean([s.radius for s in part]) for name, part in parts.items()},
    }
