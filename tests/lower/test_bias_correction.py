"""output_shift against the mean output difference of real torch layers."""

import numpy as np
import pytest
import torch

from mpqc.lower import numerics
from mpqc.lower.bias_correction import output_shift
from mpqc.passes.layers import Layer


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_conv_shift_matches_torch(groups):
    torch.manual_seed(0)
    weight = torch.randn(8, 8 // groups, 3, 3)
    # Spatially constant samples: every window then sees the channel's overall mean exactly.
    x = (torch.randn(64, 8, 1, 1) + torch.linspace(-2, 3, 8).view(1, 8, 1, 1)).expand(64, 8, 6, 6)
    q, scales = numerics.quantize_weight(weight.numpy(), 4, 0)
    dequantized = q * numerics.expand_scales(scales, tuple(weight.shape), 0, None)
    layer = Layer("c", "Conv", "x", "w", "y", tuple(weight.shape), 0, 1)
    # Without padding every output sees the full window, so the identity is exact.
    measured = (torch.nn.functional.conv2d(x, torch.from_numpy(dequantized).float(), groups=groups)
                - torch.nn.functional.conv2d(x, weight, groups=groups)).mean(dim=(0, 2, 3))
    mean = x.mean(dim=(0, 2, 3)).numpy()
    np.testing.assert_allclose(output_shift(layer, weight.numpy(), dequantized, mean, groups), measured.numpy(), atol=1e-4)


@pytest.mark.parametrize("channel_axis", [0, 1])
def test_linear_shift_matches_matmul(channel_axis):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((16, 12)).astype(np.float32)  # (N, K) if channel_axis == 0 else (K, N)
    q, scales = numerics.quantize_weight(weight, 4, channel_axis)
    dequantized = q * numerics.expand_scales(scales, weight.shape, channel_axis, None)
    x = rng.standard_normal((256, weight.shape[1 - channel_axis])) + 1.5
    as_kn = (lambda w: w.T) if channel_axis == 0 else (lambda w: w)
    measured = (x @ as_kn(dequantized) - x @ as_kn(weight)).mean(axis=0)
    layer = Layer("l", "Gemm" if channel_axis == 0 else "MatMul", "x", "w", "y", weight.shape, channel_axis, 1 - channel_axis)
    np.testing.assert_allclose(output_shift(layer, weight, dequantized, x.mean(axis=0)), measured, atol=1e-6)
