"""GMPQ's attribution imitation (Wang et al., ICCV 2021): the quantized model should look where the
float model looks.

Attribution is Grad-CAM at the last spatial feature map F (the output of the last convolution with
a 4-D output), for the class the float model predicts, so both maps explain the same decision:
A = ReLU(sum_c mean_hw(dy/dF_c) * F_c). The loss is
    aw * mean((normalize(A_fp ** p) - normalize(A_q)) ** 2),  aw = 40, p = 3,
with each map flattened and L2-normalised per sample, and the mean taken over samples and map
positions as GMPQ's reference code does (so with unit-norm maps the term is at most 2 * aw / (H*W),
about 1.6 at 7x7: the same order as the cross entropy, and aw = 40 is kept as given).

The quantized map's channel weights mean_hw(dy/dF_c) are taken as constants: its gradient flows
through F alone, which saves a double backward through the head on every pass.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

ATTRIBUTION_WEIGHT = 40.0
ATTRIBUTION_POWER = 3


def last_spatial_conv(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> nn.Module | None:
    """The convolution whose 4-D output comes last in a forward over `inputs`, or None."""
    order: list[nn.Module] = []

    def record(module, _args, output):
        if isinstance(output, torch.Tensor) and output.dim() == 4:
            order.append(module)

    convolutions = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    handles = [m.register_forward_hook(record) for m in convolutions]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return order[-1] if order else None


class OutputCapture:
    """Keeps the last output of a module (the Grad-CAM feature map) while attached."""

    def __init__(self, module: nn.Module):
        self.value: torch.Tensor | None = None
        self._handle = module.register_forward_hook(self._keep)

    def _keep(self, _module, _args, output):
        self.value = output

    def remove(self) -> None:
        self._handle.remove()


def grad_cam(logits: torch.Tensor, features: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(N, H, W) Grad-CAM maps of `classes` at `features` (N, C, H, W); keeps the graph for the loss."""
    score = logits.gather(1, classes[:, None]).sum()
    (gradient,) = torch.autograd.grad(score, features, retain_graph=True)
    channel_weights = gradient.mean(dim=(2, 3), keepdim=True)  # a plain tensor: no graph behind it
    return F.relu((channel_weights * features).sum(dim=1))


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    return F.normalize(maps.flatten(1), dim=1)


def attribution_loss(float_maps: torch.Tensor, quantized_maps: torch.Tensor,
                     weight: float = ATTRIBUTION_WEIGHT, power: int = ATTRIBUTION_POWER) -> torch.Tensor:
    """aw * mean((normalize(A_fp ** p) - normalize(A_q)) ** 2) over samples and positions."""
    target = normalize_maps(float_maps.pow(power))
    return weight * (target - normalize_maps(quantized_maps)).pow(2).mean()
