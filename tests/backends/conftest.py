"""Shared by the TensorRT backend tests: a lowered mnist-cnn for trt-orin with every precision.

The INT4 conv tests call the kernels' torch reference, which lives in the Triton kernel module;
TRITON_INTERPRET must be set before triton is first imported, exactly as tests/kernels/conftest.py
sets it (without a GPU the kernels run under Triton's CPU interpreter), and these tests are
collected first.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One layer of each kind: INT8 convs, INT4 convs through the plugin (two of them reading one
# quantized tensor), a float conv, and INT4 weight-only on the fully connected layer.
MIXED_POLICY = {
    "stem.conv": "w8a8",
    "block1.conv1": "w4a8",
    "block1.conv2": "w8a8",
    "block1.shortcut.conv": "w4a8",
    "block2.conv1": "w8a8",
    "block2.conv2": "w4a8",
    "block2.shortcut.conv": "fp32",
    "block3.conv1": "w4a8",
    "block3.conv2": "w8a8",
    "fc": "w4a16",
}


@pytest.fixture(scope="session")
def lowered_mnist():
    """(QDQ model bytes, Policy, Analysis, eval images) of mnist-cnn lowered for trt-orin with MIXED_POLICY.

    The same Lowering `mpqc build` runs, without its engine step. The model is FLOAT16, trt-orin's
    float type.
    """
    return _lower_mnist(None)


@pytest.fixture(scope="session")
def lowered_mnist_float32():
    """lowered_mnist with FLOAT tensors throughout (a TensorRT target whose float_type is float32)."""
    return _lower_mnist("float32")


def _lower_mnist(float_type: str | None):
    import dataclasses

    from mpqc.data.proxy import proxy_feeds
    from mpqc.lower.lowering import Lowering
    from mpqc.passes.analysis import analyze
    from mpqc.pipeline.options import BuildOptions
    from mpqc.policy import Policy
    from mpqc.targets import load_target

    analysis = analyze("mnist-cnn")
    assert [layer.name for layer in analysis.layers] == list(MIXED_POLICY)
    target = load_target("trt-orin")
    if float_type is not None:
        target = dataclasses.replace(target, float_type=float_type)
    options = BuildOptions(model="mnist-cnn", target="trt-orin", measure=False)
    feeds, _ = proxy_feeds(options.proxy_source(), analysis.loaded)
    policy = Policy(tuple(MIXED_POLICY.items()), "test:mixed")
    model_bytes = Lowering.prepare(analysis, target, feeds, options.calibration_settings()).lower(policy)
    images = analysis.loaded.example.eval_feeds()[0]["image"][:16]
    return model_bytes, policy, analysis, images
