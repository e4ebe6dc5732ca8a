"""The bundled ``mnist-dsnet`` example: a narrow depthwise-separable CNN trained on real MNIST digits.

Where ``mnist-cnn`` keeps its accuracy at every policy (INT4 weights included), this network is
small and depthwise like the mobile networks mixed precision is for, so the precision of a layer
shows in the accuracy: a search that picks the wrong layers for 4 bits loses points on it.

Architecture (28x28 grayscale input, 10 logits)::

    stem    conv3x3(1->4) BN ReLU                                  -> 4x28x28
    block1  dw3x3(4, s2) BN ReLU, pw1x1(4->8) BN ReLU              -> 8x14x14
    block2  dw3x3(8, s2) BN ReLU, pw1x1(8->16) BN ReLU             -> 16x7x7
    block3  dw3x3(16) BN ReLU, pw1x1(16->16) BN ReLU               -> 16x7x7
    global average pool -> fc Linear(16->10)

The widths are small on purpose (1,018 parameters): at twice these widths uniform INT4 weights
cost 2.8 accuracy points; at these, about 6 (95.2% at w8a8, 89.1% at w4a8 with exact INT8 kernels),
so which layers get 4 bits shows in the accuracy.

Weights come from ``python -m mpqc.examples.train_mnist_cnn --model mnist-dsnet`` (the same recipe
and splits as mnist-cnn) and live in ``weights/mnist_dsnet.safetensors``, the training record in
``weights/mnist_dsnet.json``. Data and fidelity are mnist-cnn's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mpqc.examples.mnist_cnn import (  # noqa: F401  (the example interface: same data, same metric)
    CLASSIFIER,
    INPUT_NAMES,
    OUTPUT_NAMES,
    eval_feeds,
    fidelity,
    load_weights,
    proxy_feeds,
    proxy_labels,
)

NAME = "mnist-dsnet"
WEIGHTS_PATH = Path(__file__).resolve().parent / "weights" / "mnist_dsnet.safetensors"
RECORD_PATH = WEIGHTS_PATH.with_suffix(".json")


class SeparableBlock(nn.Module):
    """Depthwise 3x3 conv, BN, ReLU, then pointwise 1x1 conv, BN, ReLU (MobileNet-V1's block)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.dw = nn.Conv2d(in_ch, in_ch, 3, stride=stride, padding=1, groups=in_ch, bias=False)
        self.dw_bn = nn.BatchNorm2d(in_ch)
        self.dw_relu = nn.ReLU()
        self.pw = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.pw_bn = nn.BatchNorm2d(out_ch)
        self.pw_relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw_relu(self.pw_bn(self.pw(self.dw_relu(self.dw_bn(self.dw(x))))))


class MnistDSNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(4)
        self.stem_relu = nn.ReLU()
        self.block1 = SeparableBlock(4, 8, stride=2)
        self.block2 = SeparableBlock(8, 16, stride=2)
        self.block3 = SeparableBlock(16, 16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.stem_relu(self.stem_bn(self.stem(image)))
        x = self.block3(self.block2(self.block1(x)))
        return self.fc(x.mean(dim=(2, 3)))


def build_module() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Eval-mode model with the committed trained weights, plus an example input (1,1,28,28) float32."""
    model = MnistDSNet()
    load_weights(model, WEIGHTS_PATH)
    model.eval()
    return model, (torch.from_numpy(proxy_feeds(1)["image"]),)
