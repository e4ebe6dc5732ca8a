"""Progress for the stages that take seconds to minutes, on a terminal only.

A stage prints one line when it starts; a loop of known length gets a tqdm bar. Both go to stderr
and stay silent when stderr is not a terminal (a build step's log, a pipe) or when the command
prints JSON, so what a script reads is never interleaved with them.
"""

from __future__ import annotations

import contextlib
import sys
import time

from tqdm import tqdm

_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def shown() -> bool:
    return not _quiet and sys.stderr.isatty()


@contextlib.contextmanager
def stage(what: str):
    """`mpqc: what ...` when the stage starts and its duration when it ends."""
    if not shown():
        yield
        return
    print(f"mpqc: {what} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    yield
    print(f"mpqc: {what}: {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)


def bar(iterable, what: str, total: int | None = None, unit: str = "it"):
    return tqdm(iterable, desc=f"mpqc: {what}", total=total, unit=unit, disable=not shown(), leave=False, file=sys.stderr)


@contextlib.contextmanager
def counter(what: str, unit: str = "it"):
    """A bar of unknown length; the context gives the function that advances it by one."""
    with tqdm(desc=f"mpqc: {what}", unit=unit, disable=not shown(), leave=False, file=sys.stderr) as shown_bar:
        yield shown_bar.update
