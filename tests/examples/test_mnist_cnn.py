"""Tests for the bundled mnist-cnn example, its data splits and committed weights."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mpqc.data import mnist
from mpqc.examples import mnist_cnn as ex
from mpqc.frontend.torch_export import export_module

MIN_TEST_ACCURACY = 0.985
# The committed model scores ~0.94 on the re-rendered sklearn digits (chance is 0.10).
MIN_DIGITS_ACCURACY = 0.85


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    module, _ = ex.build_module()
    return module


@pytest.fixture(scope="module")
def record() -> dict:
    return json.loads(ex.RECORD_PATH.read_text())


def predict(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(images)).numpy()


def test_split_is_fixed_sized_and_disjoint():
    train_x, train_y = mnist.mnist_split("train")
    test_x, test_y = mnist.mnist_split("test")
    # Rebuild from scratch: the split must not depend on cached state.
    mnist._split_cache.cache_clear()
    train_x2, train_y2 = mnist.mnist_split("train")
    test_x2, test_y2 = mnist.mnist_split("test")
    np.testing.assert_array_equal(train_x, train_x2)
    np.testing.assert_array_equal(train_y, train_y2)
    np.testing.assert_array_equal(test_x, test_x2)
    np.testing.assert_array_equal(test_y, test_y2)

    assert train_x.shape == (4000, 1, 28, 28) and test_x.shape == (1000, 1, 28, 28)
    assert train_x.dtype == np.float32 and train_y.dtype == np.int64 and test_y.dtype == np.int64
    for labels, per_class in ((train_y, 400), (test_y, 100)):
        assert labels.min() == 0 and labels.max() == 9
        np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, per_class))

    train_rows = {row.tobytes() for row in train_x}
    assert len(train_rows) == 4000
    assert not any(row.tobytes() in train_rows for row in test_x)

    # Normalized with the documented constants: background pixels are exactly (0 - mean) / std.
    background = np.float32((0.0 - mnist.MNIST_MEAN) / mnist.MNIST_STD)
    assert train_x.min() == background
    assert abs(float(train_x.mean())) < 0.05 and abs(float(train_x.std()) - 1.0) < 0.05

    with pytest.raises(ValueError):
        mnist.mnist_split("validation")


def test_committed_weights_match_record_and_current_split(record):
    assert ex.WEIGHTS_PATH.stat().st_size < 1_000_000
    assert hashlib.sha256(ex.WEIGHTS_PATH.read_bytes()).hexdigest() == record["weights_sha256"]
    assert record["weights_file"] == ex.WEIGHTS_PATH.name
    # The weights were trained and scored on exactly the splits the code produces today.
    assert record["train_split_sha256"] == mnist.split_sha256("train")
    assert record["test_split_sha256"] == mnist.split_sha256("test")


def test_committed_weights_load_strictly_and_reach_target_accuracy(model, record):
    # build_module() loads strictly; also check nothing is missing or extra by name.
    committed = load_file(str(ex.WEIGHTS_PATH))
    assert committed.keys() == ex.MnistCNN().state_dict().keys()
    assert not model.training

    feeds, labels = ex.eval_feeds()
    logits = predict(model, feeds["image"])
    assert logits.shape == (1000, 10)
    accuracy = float(np.mean(logits.argmax(axis=1) == labels))
    assert accuracy >= MIN_TEST_ACCURACY
    # Allow a couple of borderline digits to flip across BLAS builds.
    assert abs(accuracy - record["final_test_accuracy"]) <= 0.002


def test_interface_feeds_and_fidelity():
    module, (example,) = ex.build_module()
    assert example.shape == (1, 1, 28, 28) and example.dtype == torch.float32
    assert module(example).shape == (1, 10)

    proxy = ex.proxy_feeds()
    assert set(proxy) == set(ex.INPUT_NAMES)
    train_x, _ = mnist.mnist_split("train")
    assert proxy["image"].shape == (256, 1, 28, 28) and proxy["image"].dtype == np.float32
    np.testing.assert_array_equal(proxy["image"], train_x[:256])
    np.testing.assert_array_equal(ex.proxy_feeds(16)["image"], proxy["image"][:16])
    with pytest.raises(ValueError):
        ex.proxy_feeds(0)

    reference = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])
    candidate = np.array([[2.0, 0.0], [1.0, 0.0], [3.0, 1.0], [5.0, 0.0]])
    labels = np.array([0, 1, 0, 0])
    result = ex.fidelity(reference, candidate, labels)
    assert result["reference_accuracy"] == pytest.approx(0.75)
    assert result["accuracy"] == pytest.approx(0.75)
    assert result["accuracy_drop"] == pytest.approx(0.0)
    assert result["top1_agreement"] == pytest.approx(0.5)
    assert ex.fidelity(reference, candidate, None) == {"top1_agreement": pytest.approx(0.5)}
    # A candidate that always answers class 1 gets 1/4 right: a 50-point drop.
    always_one = ex.fidelity(reference, np.tile([0.0, 1.0], (4, 1)), labels)
    assert always_one["accuracy"] == pytest.approx(0.25)
    assert always_one["accuracy_drop"] == pytest.approx(50.0)
    with pytest.raises(ValueError):
        ex.fidelity(reference, candidate[:3], labels)


def test_onnx_export_matches_torch(model, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    _, example_inputs = ex.build_module()
    path = tmp_path / "mnist_cnn.onnx"
    # mpqc's own frontend: dynamo exporter, opset 21, dynamic batch, layers named after modules.
    onnx.save(export_module(model, example_inputs, ex.INPUT_NAMES, ex.OUTPUT_NAMES), str(path))
    onnx.checker.check_model(onnx.load(str(path)))

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(ex.INPUT_NAMES)
    assert [o.name for o in session.get_outputs()] == list(ex.OUTPUT_NAMES)
    # A batch size other than the example's exercises the dynamic batch dimension.
    feeds, labels = ex.eval_feeds()
    ort_logits = session.run(None, feeds)[0]
    torch_logits = predict(model, feeds["image"])
    np.testing.assert_allclose(ort_logits, torch_logits, rtol=1e-4, atol=1e-4)
    assert ex.fidelity(torch_logits, ort_logits, labels)["top1_agreement"] == 1.0


def test_digits_28x28_is_mnist_like_and_recognized(model):
    images, labels = mnist.digits_28x28()
    assert images.shape == (1797, 1, 28, 28) and images.dtype == np.float32
    assert labels.dtype == np.int64 and set(np.unique(labels)) == set(range(10))
    low = (0.0 - mnist.MNIST_MEAN) / mnist.MNIST_STD
    high = (1.0 - mnist.MNIST_MEAN) / mnist.MNIST_STD
    assert images.min() == pytest.approx(low) and images.max() <= high + 1e-5
    pixels = images[:, 0] * mnist.MNIST_STD + mnist.MNIST_MEAN
    # Like MNIST, each digit fits a ~20x20 box (+1 px of interpolation spread)
    # centred on a black 28x28 canvas.
    ink = pixels > 0.05
    rows, cols = ink.any(axis=2), ink.any(axis=1)
    height = 28 - rows[:, ::-1].argmax(axis=1) - rows.argmax(axis=1)
    width = 28 - cols[:, ::-1].argmax(axis=1) - cols.argmax(axis=1)
    assert height.max() <= 21 and width.max() <= 21 and np.median(np.maximum(height, width)) >= 19
    centre_of_ink = (pixels * np.arange(28)[None, :, None]).sum(axis=(1, 2)) / pixels.sum(axis=(1, 2))
    assert np.all(np.abs(centre_of_ink - 13.5) < 0.5)
    # Same ink level as MNIST in [0, 1] pixel space (MNIST mean is ~0.13).
    assert 0.10 < float(pixels.mean()) < 0.16

    accuracy = float(np.mean(predict(model, images).argmax(axis=1) == labels))
    print(f"mnist-cnn accuracy on digits_28x28: {accuracy:.4f}")
    assert accuracy >= MIN_DIGITS_ACCURACY
