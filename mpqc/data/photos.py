"""Real colour photographs for the ``efficientnet-lite0`` example, from inside scikit-image.

``skimage.data`` ships a handful of colour photographs in the wheel itself
(others in that module need a network download and are not used here). They
are split by *source photograph*, so proxy (calibration) crops and evaluation
crops never come from the same picture:

* proxy: astronaut, coffee, hubble_deep_field, immunohistochemistry
* eval:  chelsea (a cat), rocket, stereo_motorcycle (left view), retina

``skimage.data.cat`` is the same picture as ``chelsea`` and the right view of
``stereo_motorcycle`` is the same scene as the left, so neither is used.

Each crop is a random-resized-crop-like window (fixed numpy seed per split and
crop index) with an optional horizontal flip, resized to 224x224 and
normalized the way the EfficientNet-Lite weights were trained: [0, 255] is
mapped to [-1, 1] with mean 127.5 / std 127.5 per channel.
"""

from __future__ import annotations

import functools
import math
import pathlib

import numpy as np

IMAGE_SIZE = 224
MEAN = 127.5
STD = 127.5

PROXY_PHOTOS = ("astronaut", "coffee", "hubble_deep_field", "immunohistochemistry")
EVAL_PHOTOS = ("chelsea", "rocket", "stereo_motorcycle", "retina")
SPLITS = {"proxy": PROXY_PHOTOS, "eval": EVAL_PHOTOS}
DEFAULT_COUNTS = {"proxy": 64, "eval": 128}

# Large sources are downscaled once so that crops are cheap to resize; 640 px
# still leaves every crop at or above the 224 px model resolution.
_MAX_SIDE = 640
# Crop side as a fraction of the photo's shorter side, and aspect-ratio range.
_SCALE = (0.35, 1.0)
_RATIO = (3 / 4, 4 / 3)
_SPLIT_IDS = {"proxy": 0, "eval": 1}


def normalize(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) or (N, H, W, 3) RGB in [0, 255] -> channels-first float32 in [-1, 1]."""
    x = (np.asarray(rgb, dtype=np.float32) - MEAN) / STD
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))


@functools.lru_cache(maxsize=None)
def load_photo(name: str) -> np.ndarray:
    """One bundled photograph as (H, W, 3) float64 in [0, 255], longer side <= 640 px."""
    from skimage import data, transform

    image = getattr(data, name)()
    if name == "stereo_motorcycle":
        image = image[0]  # (left, right, disparity): keep the left view only
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"skimage.data.{name} is not an RGB photograph: shape {image.shape}")
    scale = _MAX_SIDE / max(image.shape[:2])
    image = image.astype(np.float64)
    if scale < 1:
        image = transform.rescale(image, scale, order=1, channel_axis=2, anti_aliasing=True, preserve_range=True)
    image.setflags(write=False)
    return image


def resize_rgb(image: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """Bilinear, anti-aliased resize of an (H, W, 3) image to (size, size, 3), keeping [0, 255]."""
    from skimage import transform

    return transform.resize(image, (size, size), order=1, anti_aliasing=True, preserve_range=True)


def center_crop(image: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """Largest centred square of a photo, resized and normalized to (3, size, size) float32."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return normalize(resize_rgb(image[top : top + side, left : left + side], size))


def _crop_box(rng: np.random.Generator, h: int, w: int) -> tuple[int, int, int, int]:
    base = min(h, w) * rng.uniform(*_SCALE)
    ratio = math.exp(rng.uniform(math.log(_RATIO[0]), math.log(_RATIO[1])))
    ch = min(h, max(1, round(base / math.sqrt(ratio))))
    cw = min(w, max(1, round(base * math.sqrt(ratio))))
    top = int(rng.integers(0, h - ch + 1))
    left = int(rng.integers(0, w - cw + 1))
    return top, left, ch, cw


def _one_crop(split: str, index: int, seed: int) -> np.ndarray:
    photos = SPLITS[split]
    image = load_photo(photos[index % len(photos)])
    # Seeding per (seed, split, crop index) makes every crop independent of
    # ``count``, so a smaller request is an exact prefix of a larger one.
    return _random_crop(image, np.random.default_rng((seed, _SPLIT_IDS[split], index)))


def _random_crop(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    top, left, ch, cw = _crop_box(rng, *image.shape[:2])
    crop = image[top : top + ch, left : left + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return resize_rgb(crop)


def photo_crops(split: str, count: int | None = None, seed: int = 0) -> np.ndarray:
    """``count`` deterministic crops of the split's photos: (N, 3, 224, 224) float32, normalized.

    ``split`` is "proxy" (default 64 crops) or "eval" (default 128). Crops cycle
    through the split's photographs in order, so any prefix covers all of them.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    count = DEFAULT_COUNTS[split] if count is None else count
    if count < 1:
        raise ValueError(f"count must be positive, got {count}")
    return _cached_crops(split, count, seed).copy()


@functools.lru_cache(maxsize=8)
def _cached_crops(split: str, count: int, seed: int) -> np.ndarray:
    crops = np.stack([_one_crop(split, i, seed) for i in range(count)])
    return normalize(crops)


# Not one of the splits above: a different source of photographs (scikit-learn ships two), used
# as a cross-dataset proxy for searches whose target is the skimage photographs.
_OTHER_DATASET_ID = 2


def sample_image_crops(count: int, seed: int = 0) -> np.ndarray:
    """``count`` crops of scikit-learn's two sample photographs (china, flower), made like ``photo_crops``."""
    if count < 1:
        raise ValueError(f"count must be positive, got {count}")
    from sklearn.datasets import load_sample_images

    images = [np.asarray(image, dtype=np.float64) for image in load_sample_images().images]
    crops = [_random_crop(images[i % len(images)], np.random.default_rng((seed, _OTHER_DATASET_ID, i))) for i in range(count)]
    return normalize(np.stack(crops))


# matplotlib ships one more colour photograph (its other sample pictures are drawings, plots or
# 128-px icons): with EVAL_PHOTOS, a fifth held-out source for studies that need more crops.
MATPLOTLIB_PHOTOS = ("grace_hopper.jpg",)
_STUDY_ID = 3


@functools.lru_cache(maxsize=None)
def _matplotlib_photo(name: str) -> np.ndarray:
    import matplotlib
    from skimage import io

    image = io.imread(pathlib.Path(matplotlib.get_data_path()) / "sample_data" / name).astype(np.float64)
    image.setflags(write=False)
    return image


def heldout_study_crops(per_photo: int, seed: int = 0) -> tuple[np.ndarray, tuple[str, ...]]:
    """``per_photo`` crops of each held-out photograph (EVAL_PHOTOS and MATPLOTLIB_PHOTOS), made like
    ``photo_crops``, and the source photograph of every crop (for intervals clustered by photograph)."""
    if per_photo < 1:
        raise ValueError(f"per_photo must be positive, got {per_photo}")
    sources = [(name, load_photo(name)) for name in EVAL_PHOTOS] + [(name, _matplotlib_photo(name)) for name in MATPLOTLIB_PHOTOS]
    crops, names = [], []
    for index, (name, image) in enumerate(sources):
        for i in range(per_photo):
            crops.append(_random_crop(image, np.random.default_rng((seed, _STUDY_ID, index, i))))
            names.append(name if name in EVAL_PHOTOS else f"matplotlib:{name}")
    return normalize(np.stack(crops)), tuple(names)
