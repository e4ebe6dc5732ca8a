"""An exception from a library or a user's code, as the tail of one MpqcError line."""

from __future__ import annotations


def first_line(exc: BaseException, with_type: bool = False) -> str:
    """The first line of the message (C++ checkers and user code write several); the type name
    with it where that says more than the text (a user's factory raising RuntimeError)."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    line = text.splitlines()[0]
    return f"{type(exc).__name__}: {line}" if with_type else line
