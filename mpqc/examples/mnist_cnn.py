"""The bundled ``mnist-cnn`` example: a small residual CNN trained on real MNIST digits.

Architecture (147,066 parameters, 28x28 grayscale input, 10 logits)::

    stem    conv3x3(1->16) BN ReLU                                        -> 16x28x28
    block1  conv3x3(16->32, s2) BN ReLU conv3x3 BN
            + shortcut conv1x1(16->32, s2) BN, add, ReLU                  -> 32x14x14
    block2  conv3x3(32->64, s2) BN ReLU conv3x3 BN
            + shortcut conv1x1(32->64, s2) BN, add, ReLU                  -> 64x7x7
    block3  conv3x3(64->64) BN ReLU conv3x3 BN + identity, add, ReLU      -> 64x7x7
    global average pool -> fc Linear(64->10)

Weights are produced by ``python -m mpqc.examples.train_mnist_cnn`` and live in
``weights/mnist_cnn.safetensors`` next to this file; the training record is in
``weights/mnist_cnn.json``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from mpqc.data.mnist import mnist_split

NAME = "mnist-cnn"
INPUT_NAMES = ("image",)
OUTPUT_NAMES = ("logits",)
CLASSIFIER = True  # the output is class scores: trained sensitivity methods fit its classes

WEIGHTS_PATH = Path(__file__).resolve().parent / "weights" / "mnist_cnn.safetensors"
RECORD_PATH = WEIGHTS_PATH.with_suffix(".json")

DEFAULT_PROXY_LIMIT = 256


class ConvBN(nn.Module):
    """Conv2d followed by BatchNorm2d (no bias: BN supplies the shift)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class ResidualBlock(nn.Module):
    """Basic two-conv residual block; a strided 1x1 conv projects the shortcut when shapes change."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = ConvBN(in_ch, out_ch, 1, stride) if stride != 1 or in_ch != out_ch else nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu1(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu2(y + self.shortcut(x))


class MnistCNN(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = ConvBN(1, 16, 3)
        self.stem_relu = nn.ReLU()
        self.block1 = ResidualBlock(16, 32, stride=2)
        self.block2 = ResidualBlock(32, 64, stride=2)
        self.block3 = ResidualBlock(64, 64)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.stem_relu(self.stem(image))
        x = self.block3(self.block2(self.block1(x)))
        x = x.mean(dim=(2, 3))  # global average pool -> (N, 64)
        return self.fc(x)


def load_weights(model: nn.Module, path: Path = WEIGHTS_PATH) -> None:
    """Load a state dict saved by the training script (safetensors or torch .pt), strictly."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)


def build_module() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Eval-mode model with the committed trained weights, plus an example input (1,1,28,28) float32."""
    model = MnistCNN()
    load_weights(model)
    model.eval()
    example = torch.from_numpy(proxy_feeds(1)["image"])
    return model, (example,)


def proxy_feeds(limit: int | None = None) -> dict[str, np.ndarray]:
    """Calibration/proxy samples from the TRAIN split: {"image": (N,1,28,28)}.

    ``limit`` defaults to 256. The train split is already shuffled with a fixed
    seed, so its first ``limit`` digits are deterministic and mix all classes.
    """
    limit = DEFAULT_PROXY_LIMIT if limit is None else limit
    images, _ = mnist_split("train")
    if not 1 <= limit <= len(images):
        raise ValueError(f"limit must be in 1..{len(images)}, got {limit}")
    return {INPUT_NAMES[0]: np.ascontiguousarray(images[:limit])}


def proxy_labels(limit: int | None = None) -> np.ndarray:
    """The digit labels of ``proxy_feeds(limit)``'s samples, int64."""
    limit = DEFAULT_PROXY_LIMIT if limit is None else limit
    return mnist_split("train")[1][:limit]


def eval_feeds() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The 1,000-digit TEST split as feeds, and its int64 labels."""
    images, labels = mnist_split("test")
    return {INPUT_NAMES[0]: images}, labels


def fidelity(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None) -> dict[str, float]:
    """Compare quantized logits against FP32 logits on ``eval_feeds()``.

    Accuracies and ``top1_agreement`` are fractions in [0, 1];
    ``accuracy_drop`` is ``reference_accuracy - accuracy`` in percentage points
    (positive when the candidate is worse). Without labels only
    ``top1_agreement`` is returned.
    """
    reference = np.asarray(reference)
    candidate = np.asarray(candidate)
    if reference.shape != candidate.shape or reference.ndim != 2:
        raise ValueError(f"expected matching (N, classes) logits, got {reference.shape} and {candidate.shape}")
    ref_top1 = reference.argmax(axis=1)
    cand_top1 = candidate.argmax(axis=1)
    result = {"top1_agreement": float(np.mean(ref_top1 == cand_top1))}
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if labels.shape[0] != reference.shape[0]:
            raise ValueError(f"{labels.shape[0]} labels for {reference.shape[0]} samples")
        ref_acc = float(np.mean(ref_top1 == labels))
        acc = float(np.mean(cand_top1 == labels))
        result.update(reference_accuracy=ref_acc, accuracy=acc, accuracy_drop=100.0 * (ref_acc - acc))
    return result
