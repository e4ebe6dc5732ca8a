"""Where mpqc keeps what it measures on one machine: per-user folders, never the checkout or the
installed package, which may be shared, read-only, or copied to another machine."""

from __future__ import annotations

import os
import pathlib


def user_cache() -> pathlib.Path:
    """$XDG_CACHE_HOME/mpqc, or ~/.cache/mpqc where it is unset or empty (the XDG rule)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(pathlib.Path.home() / ".cache")
    return pathlib.Path(base) / "mpqc"


def measurements_folder(target_name: str) -> pathlib.Path:
    """The folder of a target's latency tables (and TensorRT timing caches) measured here:
    $MPQC_TABLES/<target>, else <user cache>/tables/<target>."""
    root = os.environ.get("MPQC_TABLES")
    return (pathlib.Path(root) if root else user_cache() / "tables") / target_name
