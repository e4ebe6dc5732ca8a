"""Disk cache of sensitivity scores, so a search rebuilt with another budget only solves the ILP again.

Scoring runs every layer at every candidate precision on the proxy data; it is by far the slowest
step of `--policy search`, and it depends on none of the budgets. One JSON file per key, where the
key hashes everything the scores depend on. The cache only ever saves time: a file that cannot be
read back exactly is scored again and overwritten, and a folder that cannot be written is skipped.
"""

from __future__ import annotations

import hashlib
import json
import math
import pathlib
from collections.abc import Mapping, Sequence

from mpqc.cache_folders import user_cache
from mpqc.files import write_atomically
from mpqc.targets import Target

# Part of the key: changing how scores are computed or stored must change this, not reuse old files.
_FORMAT = "mpqc.scores/2"  # 2: lowering folds conv affines and cuts ranges to live bounds


def default_dir() -> pathlib.Path:
    """The per-user cache folder (mpqc.cache_folders.user_cache): scores live beside the tables."""
    return user_cache()


def score_key(
    model_sha256: str, feeds_sha256: str, method: str, seed: int, target: Target, candidates: Mapping[str, Sequence[str]],
    settings: Mapping | None = None,
) -> str:
    """`settings`: whatever else the method's scores depend on (labels, training epochs, options)."""
    described = {
        "format": _FORMAT,
        "settings": dict(settings or {}),
        "model_sha256": model_sha256,
        "feeds_sha256": feeds_sha256,
        "method": method,
        "seed": seed,
        # The target's lowering settings change the numerics being scored, not just its name.
        "target": [target.name, target.activation_type, target.int4_block_size],
        "candidates": sorted((layer, sorted(names)) for layer, names in candidates.items()),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def load_scores(folder: pathlib.Path, key: str, candidates: Mapping[str, Sequence[str]]
                ) -> tuple[dict[tuple[str, str], float], dict] | None:
    """The cached scores for `key` and the method's record of them ({} where none was saved), or
    None when there are none or the file is not a complete, valid entry."""
    try:
        data = json.loads((folder / f"{key}.json").read_text())
        if data["format"] != _FORMAT or data["key"] != key:
            return None
        scores = {(layer, name): float(value) for layer, name, value in data["scores"]}
        details = data.get("details", {})
        if not isinstance(details, dict):
            return None
    except (OSError, ValueError, KeyError, TypeError):  # missing, truncated or hand-edited: score again
        return None
    wanted = {(layer, name) for layer, names in candidates.items() for name in names}
    if set(scores) != wanted or not all(math.isfinite(v) for v in scores.values()):
        return None
    return scores, details


def save_scores(folder: pathlib.Path, key: str, scores: Mapping[tuple[str, str], float], details: Mapping | None = None) -> None:
    """Write atomically, so a reader never sees half a file."""
    data = {"format": _FORMAT, "key": key, "scores": [[layer, name, float(v)] for (layer, name), v in sorted(scores.items())],
            "details": dict(details or {})}
    try:
        write_atomically(folder / f"{key}.json", json.dumps(data))
    except OSError:
        pass  # an unwritable cache or a full disk costs only the time of scoring again next build
