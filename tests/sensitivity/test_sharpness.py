"""asga's sharpness-aware, gradient-aligned update (perturbation, GSAM's alignment, the radius rule)
on a small module with known gradients; asga's training on mnist-cnn is in test_indicators."""

import pytest
import torch
from torch import nn

from mpqc.sensitivity.sharpness import ETA, SharpnessSettings, align_gradients


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)
        self.step = nn.Parameter(torch.tensor(0.002))  # an LSQ-like step: scale-only in the perturbation

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        return ((self.bn(self.linear(x)) * self.step * 100).pow(2)).mean() + (self.linear.weight ** 4).sum()


def _gradients(model: Small, x: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model.loss(x).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def test_the_update_is_the_perturbed_gradient_minus_alpha_times_the_clean_ones_orthogonal_part():
    model = Small().train()
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    parameters = list(model.parameters())
    before = [p.detach().clone() for p in parameters]
    statistics = (model.bn.running_mean.clone(), model.bn.running_var.clone(), model.bn.num_batches_tracked.clone())
    settings = SharpnessSettings(rho_max=0.3, rho_min=0.03, alpha=0.25)
    clean = _gradients(model, x)
    clean_loss = float(model.loss(x).detach())
    # The point the update's gradient must be taken at, by hand: e = rho * T^2 g / ||T g||.
    scales = [p.detach().abs() if p is model.step else p.detach().abs() + ETA for p in parameters]
    norm = torch.sqrt(sum(((t * g) ** 2).sum() for t, g in zip(scales, clean)))
    moves = [0.3 * t * t * g / norm for t, g in zip(scales, clean)]
    assert all(bool((e.abs() <= 0.3 * t + 1e-12).all()) for e, t in zip(moves, scales))  # no element moves past rho*T
    with torch.no_grad():
        for p, e in zip(parameters, moves):
            p.add_(e)
    expected_perturbed = _gradients(model, x)
    with torch.no_grad():
        for p, b in zip(parameters, before):
            p.copy_(b)
        model.bn.running_mean.copy_(statistics[0]), model.bn.running_var.copy_(statistics[1])
        model.bn.num_batches_tracked.copy_(statistics[2])

    model.zero_grad(set_to_none=True)
    model.loss(x).backward()
    statistics_after_clean = (model.bn.running_mean.clone(), model.bn.running_var.clone())

    def perturbed_backward() -> float:
        loss = model.loss(x)
        loss.backward()
        return float(loss.detach())

    step = align_gradients(parameters, {id(model.step)}, model, clean_loss, perturbed_backward, 0.3, settings)

    flat = torch.cat([g.flatten() for g in clean])
    flat_perturbed = torch.cat([g.flatten() for g in expected_perturbed])
    orthogonal = flat - (flat @ flat_perturbed) / (flat_perturbed @ flat_perturbed) * flat_perturbed
    expected = flat_perturbed - 0.25 * orthogonal
    assert torch.allclose(torch.cat([p.grad.flatten() for p in parameters]), expected, rtol=1e-5, atol=1e-7)
    assert abs(float(orthogonal @ flat_perturbed)) < 1e-5 * float(flat_perturbed @ flat_perturbed)
    # The parameters are back where they were, and the probe left BatchNorm's statistics alone.
    assert all(torch.equal(p.detach(), b) for p, b in zip(parameters, before))
    assert torch.equal(model.bn.running_mean, statistics_after_clean[0])
    assert torch.equal(model.bn.running_var, statistics_after_clean[1])
    assert step.gap > 0  # sharpness: the loss rises towards the worst neighbour
    assert step.gradient_cosine == pytest.approx(float(flat @ flat_perturbed / (flat.norm() * flat_perturbed.norm())), rel=1e-5)


def test_the_radius_follows_the_learning_rate_from_rho_max_to_rho_min():
    settings = SharpnessSettings(rho_max=0.5, rho_min=0.05)
    assert settings.radius(0.01, 0.01, 1e-5) == pytest.approx(0.5)
    assert settings.radius(1e-5, 0.01, 1e-5) == pytest.approx(0.05)
    assert settings.radius(0.005, 0.01, 0.0) == pytest.approx(0.275)
