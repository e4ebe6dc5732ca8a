"""Real English sentences for the ``minilm`` example, taken from Python's own docstrings.

The standard library ships thousands of hand-written English sentences in its
docstrings, so no text has to be downloaded. Sentences are extracted
deterministically: for each module in a fixed list, the module docstring and
the docstrings of the classes, functions and methods it defines (in sorted
name order) are split on sentence boundaries; code examples and reST
markup-heavy fragments are dropped, and only sentences of 6-40 words that look
like prose are kept.

The two splits draw on disjoint module lists (held-out sources), every
sentence appears at most once across both, and each split interleaves its
modules round-robin so that any prefix mixes all of them. The exact text
depends on the Python version's standard library, but is fixed for a given
interpreter.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re

PROXY_MODULES = (
    "argparse", "collections", "functools", "json", "logging", "pathlib",
    "subprocess", "threading", "unittest.case", "zipfile",
)  # fmt: skip
EVAL_MODULES = (
    "asyncio.events", "calendar", "configparser", "csv", "datetime", "difflib",
    "email.message", "ftplib", "http.client", "inspect", "shutil", "tarfile",
    "textwrap", "urllib.request",
)  # fmt: skip
SPLITS = {"proxy": PROXY_MODULES, "eval": EVAL_MODULES}
DEFAULT_COUNTS = {"proxy": 128, "eval": 256}

MIN_WORDS, MAX_WORDS = 6, 40

# A sentence ends at . ! or ? followed by whitespace and an upper-case letter.
_BOUNDARY = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_PROSE_CHARS = re.compile(r"[A-Za-z0-9 ,.;:'\"()?!-]")
# Lines that belong to examples, tables or reST directives rather than prose.
_CODE_LINE = re.compile(r"^\s*(>>>|\.\.\.|\.\. |[-=~*+|]{3,}|:\w+:)")


def _docstrings(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    docs = [module.__doc__ or ""]
    for name, obj in sorted(vars(module).items()):
        # Skip names imported from elsewhere: their text belongs to another module.
        if name.startswith("_") or getattr(obj, "__module__", None) != module_name:
            continue
        if inspect.isclass(obj):
            docs.append(obj.__doc__ or "")
            for attr, member in sorted(vars(obj).items()):
                if not attr.startswith("_") and inspect.isfunction(member):
                    docs.append(member.__doc__ or "")
        elif inspect.isfunction(obj):
            docs.append(obj.__doc__ or "")
    return docs


def _paragraphs(doc: str) -> list[str]:
    """Blank-line separated prose paragraphs of a docstring, each on one line."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        lines = block.splitlines()
        # Indented blocks are examples or argument tables, not running prose.
        if not lines or any(_CODE_LINE.match(line) or line.startswith("    ") for line in lines):
            continue
        paragraphs.append(" ".join(line.strip() for line in lines))
    return paragraphs


def _is_prose(sentence: str) -> bool:
    words = sentence.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        return False
    if not (sentence[0].isupper() and sentence[-1] in ".!?"):
        return False
    if any(mark in sentence for mark in ("``", "::", "=", "_", "[", "{", "*", "/", "\\")):
        return False
    if sentence.count("(") != sentence.count(")"):
        return False
    # Mostly ordinary characters and mostly alphabetic words.
    if len(_PROSE_CHARS.findall(sentence)) < len(sentence):
        return False
    return sum(word.strip(",.;:()'\"?!").isalpha() for word in words) >= 0.8 * len(words)


def module_sentences(module_name: str) -> list[str]:
    """Prose sentences from one module's docstrings, in document order, without duplicates."""
    found: dict[str, None] = {}
    for doc in _docstrings(module_name):
        for paragraph in _paragraphs(doc):
            for sentence in _BOUNDARY.split(paragraph):
                sentence = " ".join(sentence.split())
                if _is_prose(sentence):
                    found.setdefault(sentence)
    return list(found)


@functools.lru_cache(maxsize=None)
def _split_sentences(split: str) -> tuple[str, ...]:
    # Proxy text is claimed first; eval drops anything the proxy split already has.
    taken = set(_split_sentences("proxy")) if split == "eval" else set()
    per_module = [[s for s in module_sentences(name) if s not in taken] for name in SPLITS[split]]
    ordered: dict[str, None] = {}
    for rank in range(max(map(len, per_module))):
        for sentences_of_module in per_module:
            if rank < len(sentences_of_module):
                ordered.setdefault(sentences_of_module[rank])
    return tuple(ordered)


def sentences(split: str, count: int | None = None) -> list[str]:
    """The first ``count`` sentences of a split: "proxy" (default 128) or "eval" (default 256)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    count = DEFAULT_COUNTS[split] if count is None else count
    available = _split_sentences(split)
    if not 1 <= count <= len(available):
        raise ValueError(f"count must be in 1..{len(available)} for the {split} split, got {count}")
    return list(available[:count])
