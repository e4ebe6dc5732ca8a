"""Proxy data: the calibration and search samples of a model, from `--proxy` or a bundled example."""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import numpy as np
import onnx

from mpqc.data.feeds import check_feeds, load_npz
from mpqc.errors import MpqcError


class ModelWithData(Protocol):
    """What proxy loading reads of a loaded model (mpqc.frontend.resolve.LoadedModel has it)."""

    spec: str
    model: onnx.ModelProto
    example: Any  # a bundled example module (its own proxy data and labels), or None


@dataclasses.dataclass(frozen=True)
class ProxySource:
    path: str | None = None  # .npz keyed by input name; bundled examples bring their own
    limit: int | None = None  # use only the first N samples


def proxy_feeds(source: ProxySource, loaded: ModelWithData) -> tuple[dict[str, np.ndarray], str]:
    if source.path is not None:
        feeds, origin = load_npz(source.path), source.path
    elif loaded.example is not None:
        feeds, origin = loaded.example.proxy_feeds(source.limit), f"example:{loaded.spec}"
    else:
        raise MpqcError("this model needs proxy data for calibration: pass --proxy DATA.npz (arrays keyed by input name)")
    feeds = check_feeds(feeds, loaded.model, origin)
    if source.limit is not None:
        feeds = {name: array[: source.limit] for name, array in feeds.items()}
    return feeds, origin


def proxy_labels(source: ProxySource, loaded: ModelWithData, count: int) -> np.ndarray | None:
    """Labels for the trained sensitivity methods: a "labels" array in --proxy's .npz, or the bundled
    example's own; None lets them label samples with the float model's predictions."""
    if source.path is not None:
        labels = load_npz(source.path, only="labels").get("labels")
    elif loaded.example is not None and hasattr(loaded.example, "proxy_labels"):
        labels = loaded.example.proxy_labels(count)
    else:
        return None
    if labels is None:
        return None
    labels = np.asarray(labels)
    if labels.shape != (count,) or not np.issubdtype(labels.dtype, np.integer) or (labels < 0).any():
        raise MpqcError(f"proxy labels must be {count} non-negative integers (one per sample), got {labels.dtype} {labels.shape}")
    return labels.astype(np.int64)
