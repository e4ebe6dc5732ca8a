"""Writing a file so that no reader, and no interrupted run, ever sees half of it."""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile


def write_atomically(path: str | os.PathLike, data: bytes | str) -> pathlib.Path:
    """Write `data` to a temporary file beside `path`, then rename it into place.

    The rename is atomic on one file system: `path` holds either its old content or all of the
    new. Text is written as UTF-8. The file is readable by all (0o644), as a shared latency table
    or a committed benchmark result should be, not private like a fresh temporary file.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data.encode() if isinstance(data, str) else data)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return path
