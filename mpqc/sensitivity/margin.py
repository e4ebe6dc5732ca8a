"""SEAM's large-margin regularization (ACM MM 2023): quantized features stay compact per class and
classes stay apart by a margin, so the step sizes learn what separability costs each layer.

* Intra-class compactness: SEAM's -log p(y) N(g; mu_y, Sigma_y) in its usual practical form,
  mean ||g_i - mu_{y_i}||^2 over the penultimate features g, divided by the features' mean square
  so the term does not depend on the features' scale. Training uses the float model's class means
  over the whole proxy as mu (fixed): they exist for every class, including the many that appear
  once in a batch (1000 ImageNet classes at batch 16), where batch means would make the term
  vanish, and every DDP rank has the same ones without communication.
* Inter-class margin softmax on raw logits: -log(exp(h_y - m) / (exp(h_y - m) + sum_{k!=y} exp(h_k))),
  the cross entropy with the target logit lowered by m. Logits are log-probabilities up to a
  constant, so m is in nats (m = 1: the true class must win by a factor e more than plain cross
  entropy asks) and needs no scale; cosine logits would need one and would fight the float
  classifier, which was not trained on them.

Where the proxy's labels are classes the model does not output, a linear proxy head trained on
the float model's frozen penultimate features supplies the logits for the margin term.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from mpqc.sensitivity.defaults import SEAM_TERMS

MARGIN = SEAM_TERMS[0]
HEAD_STEPS = 200  # full-batch Adam steps: a linear head on a few hundred cached features is cheap
HEAD_LR = 1e-2


def margin_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, margin: float = MARGIN) -> torch.Tensor:
    """Mean of -log(exp(h_y - m) / (exp(h_y - m) + sum_{k != y} exp(h_k)))."""
    lowered = logits - margin * F.one_hot(labels, logits.shape[1]).to(logits.dtype)
    return F.cross_entropy(lowered, labels)


def class_means(features: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    """(classes, D) mean feature per class; zeros for classes without samples."""
    sums = torch.zeros(classes, features.shape[1], dtype=features.dtype).index_add_(0, labels, features)
    counts = torch.bincount(labels, minlength=classes).clamp(min=1).to(features.dtype)
    return sums / counts[:, None]


def compactness_loss(features: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor | None = None,
                     scale: float | torch.Tensor | None = None) -> torch.Tensor:
    """mean ||g_i - mu_{y_i}||^2 / scale; mu defaults to the batch's class means and scale to the
    batch's (detached) mean squared norm."""
    features = features.flatten(1)
    if centres is None:
        centres = class_means(features, labels, int(labels.max()) + 1)
    if scale is None:
        scale = features.detach().pow(2).sum(dim=1).mean()
    return (features - centres[labels]).pow(2).sum(dim=1).mean() / (scale + 1e-12)


def train_proxy_head(features: torch.Tensor, labels: torch.Tensor, classes: int,
                     steps: int = HEAD_STEPS, lr: float = HEAD_LR) -> nn.Linear:
    """A linear classifier of `labels` on frozen float features, returned frozen.

    Zero-initialised and trained full-batch, so it needs no random numbers and is the same on
    every rank; the problem is convex, so the start point does not matter.
    """
    head = nn.Linear(features.shape[1], classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    # Standardising inside the head keeps Adam's step size meaningful for features of any scale.
    mean, std = features.mean(dim=0), features.std(dim=0).clamp(min=1e-6)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    standardized = (features - mean) / std
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(head(standardized), labels).backward()
        optimizer.step()
    # Fold the standardisation into the weights: head(g) = W ((g - mean) / std) + b.
    with torch.no_grad():
        head.bias -= (head.weight * (mean / std)).sum(dim=1)
        head.weight /= std
    head.requires_grad_(False)
    return head


@dataclasses.dataclass
class MarginRegularizer:
    """Compactness + margin terms for one batch, given its quantized penultimate features and logits."""

    centres: torch.Tensor  # (classes, D) float class means over the proxy
    feature_scale: float  # the float features' mean squared norm
    head: nn.Linear | None = None  # the proxy head, when the labels are not the model's classes
    terms: tuple[float, float, float] = SEAM_TERMS  # (margin m, compactness weight, margin-softmax weight)

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, classes: int, proxy_head: bool,
            terms: tuple[float, float, float] = SEAM_TERMS) -> "MarginRegularizer":
        g = torch.from_numpy(features).float()
        y = torch.from_numpy(labels).long()
        head = train_proxy_head(g, y, classes) if proxy_head else None
        return cls(class_means(g, y, classes), float(g.pow(2).sum(dim=1).mean()), head, tuple(terms))

    def __call__(self, features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        margin, compactness_weight, margin_weight = self.terms
        loss = torch.zeros((), dtype=logits.dtype)
        if compactness_weight:
            loss = loss + compactness_weight * compactness_loss(features, labels, self.centres, self.feature_scale)
        if margin_weight:
            if self.head is not None:
                logits = self.head(features)
            loss = loss + margin_weight * margin_cross_entropy(logits, labels, margin)
        return loss
