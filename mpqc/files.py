"""Writing files and folders so that no reader, and no interrupted run, ever sees half of one."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile

from mpqc.errors import MpqcError


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


def read_text(path: pathlib.Path, what: str, remedy: str) -> str:
    """A UTF-8 text file's content: one MpqcError, naming `what` the file is, for a file that cannot be
    read (missing, a name too long, no permission) or is not UTF-8; `remedy` says what to do then."""
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise MpqcError(f"{what} '{path}' cannot be read ({exc.strerror or exc}); check the path and its permissions") from None
    except UnicodeDecodeError as exc:
        raise MpqcError(f"{what} '{path}' is not UTF-8 text (byte {exc.start}); {remedy}") from None


def check_output_folder(out: pathlib.Path, marker: str, made_by: str) -> None:
    """Refuse an output folder mpqc may not write, before any work starts.

    It may be new, empty, or an earlier output of the same command (it holds `marker`); never a
    file, a folder of something else, a path under a file, or a name the file system cannot hold.
    """
    for part in out.parts:
        if len(os.fsencode(part)) > 255:
            raise MpqcError(f"--out '{out}' has a name longer than 255 bytes; choose a shorter one")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise MpqcError(f"--out '{out}' lies under '{parent}', which is a file; choose a folder elsewhere")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / marker).is_file())):
        raise MpqcError(f"--out '{out}' exists and is not an {made_by} folder; choose a new or empty folder")


def replace_folder(out: pathlib.Path, fill) -> None:
    """Write a folder whole: `fill(staging)` writes the files into a temporary folder beside `out`,
    which then takes `out`'s place. An earlier `out` is moved aside first and deleted only once the
    new one is in place, so an interrupted run leaves the old folder or the new one, never neither
    and never a staging folder."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    old = None
    try:
        os.chmod(staging, 0o777 & ~_umask())  # an output folder, not a private temporary one
        fill(staging)
        if out.exists():
            old = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(staging, out)
    except BaseException:
        if old is not None and not out.exists():
            os.replace(old / out.name, out)  # put the earlier folder back
        _remove_tree(staging)
        if old is not None:
            _remove_tree(old)
        raise
    if old is not None:
        _remove_tree(old)


def _remove_tree(path: pathlib.Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
