"""Bundled examples: real models with real data, addressed by name (`mpqc build mnist-cnn ...`).

Each example module exposes NAME, INPUT_NAMES, OUTPUT_NAMES, build_module(), proxy_feeds(limit),
eval_feeds() and fidelity(reference, candidate, labels).
"""

from __future__ import annotations

import importlib
import types

EXAMPLES = {
    "mnist-cnn": "mpqc.examples.mnist_cnn",
    "mnist-dsnet": "mpqc.examples.mnist_dsnet",
    "efficientnet-lite0": "mpqc.examples.efficientnet_lite0",
    "minilm": "mpqc.examples.minilm",
}


def load_example(name: str) -> types.ModuleType:
    return importlib.import_module(EXAMPLES[name])
