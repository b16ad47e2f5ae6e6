"""Where documents come from: the ``data.source`` plug-ins and the data layer's error type.

A source turns the ``data`` config section into a list of documents (strings) in a
deterministic order, so the same config always yields the same token stream.
"""

from __future__ import annotations

import glob
import json
import os
import pathlib
import sysconfig
from typing import Callable

import ml_collections as mlc

from lmstack.registry import UnknownNameError, lookup, register

# Test suites, the IDE and third-party code are not "the standard library" as a corpus.
_STDLIB_EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__"}
)
_GLOB_CHARS = frozenset("*?[")


class DataError(ValueError):
    """Bad input to the data layer: one line saying what, where, and what to do."""


def load_documents(data_cfg: mlc.ConfigDict) -> list[str]:
    """The documents of ``data_cfg.source``, cut to ``data_cfg.max_chars`` characters in total."""
    if data_cfg.max_chars < 0:
        raise DataError(
            f"data.max_chars: {data_cfg.max_chars} is negative: pass 0 (no limit) or a positive count"
        )
    try:
        source: Callable[[mlc.ConfigDict], list[str]] = lookup("data", data_cfg.source)
    except UnknownNameError as e:
        raise DataError(f"data.source: {e}: pass --config.data.source=NAME") from None
    documents = source(data_cfg)
    if not documents:
        raise DataError(
            f"data.source: {data_cfg.source!r} produced no documents: check data.path"
        )
    return cut_to_chars(documents, data_cfg.max_chars) if data_cfg.max_chars else documents


def cut_to_chars(documents: list[str], max_chars: int) -> list[str]:
    """The leading documents holding ``max_chars`` characters; the last one is cut short."""
    out, left = [], max_chars
    for doc in documents:
        if left <= 0:
            break
        out.append(doc[:left])
        left -= len(out[-1])
    return out


def stdlib_sources() -> list[tuple[str, str]]:
    """(relative path, source text) of the standard library's .py files, sorted by path."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_EXCLUDED_DIRS]
        paths += [pathlib.Path(dirpath, f) for f in filenames if f.endswith(".py")]
    sources = []
    for path in sorted(paths, key=lambda p: p.relative_to(root).as_posix()):
        try:
            sources.append((path.relative_to(root).as_posix(), path.read_text(encoding="utf-8")))
        except UnicodeDecodeError:
            continue  # a few legacy-encoded files; the corpus is UTF-8 by definition
    return sources


@register("data.stdlib")
def stdlib_documents(data_cfg: mlc.ConfigDict) -> list[str]:
    """The standard library's .py files (sorted by relative path), then the pydoc topics."""
    del data_cfg  # the corpus is whatever ships with this Python
    import pydoc_data.topics

    documents = [text for _, text in stdlib_sources()]
    topics = pydoc_data.topics.topics
    documents += [topics[key] for key in sorted(topics)]
    return documents


@register("data.text")
def text_documents(data_cfg: mlc.ConfigDict) -> list[str]:
    """Each text file one document: ``data.path`` is a file, a directory of .txt files or a glob."""
    documents = [read_utf8(path) for path in resolve_paths(data_cfg.path, suffix=".txt")]
    if not any(documents):
        raise DataError(
            f"data.path: {data_cfg.path!r} is empty: point --config.data.path at text with content"
        )
    return documents


@register("data.jsonl")
def jsonl_documents(data_cfg: mlc.ConfigDict) -> list[str]:
    """One document per JSON line, taken from the field ``data.field``; blank lines are skipped."""
    field = data_cfg.field
    documents = []
    for path in resolve_paths(data_cfg.path, suffix=".jsonl"):
        for lineno, line in enumerate(read_utf8(path).splitlines(), start=1):
            if line.strip():
                documents.append(_jsonl_field(line, field, f"{path}:{lineno}"))
    if not documents:
        raise DataError(
            f"data.path: {data_cfg.path!r} is empty: "
            "point --config.data.path at JSONL with one object per line"
        )
    return documents


def _jsonl_field(line: str, field: str, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"data.jsonl: {where}: not valid JSON ({e.msg} at column {e.colno}): fix or delete that line") from None
    if not isinstance(record, dict):
        raise DataError(
            f"data.jsonl: {where}: expected a JSON object, got {type(record).__name__}: "
            "write one object per line"
        )
    if field not in record:
        raise DataError(
            f"data.jsonl: {where}: no field {field!r} (fields: {', '.join(record) or 'none'}): "
            "set --config.data.field=NAME"
        )
    value = record[field]
    if not isinstance(value, str):
        raise DataError(
            f"data.jsonl: {where}: field {field!r} is {type(value).__name__}, not a string: "
            "set --config.data.field to a text field"
        )
    return value


def resolve_paths(path: str, *, suffix: str) -> list[pathlib.Path]:
    """The files named by a file path, a directory (every ``*suffix`` below it) or a glob."""
    hint = f"pass --config.data.path=FILE (a {suffix[1:]} file, a directory of {suffix} files, or a glob)"
    if not path:
        raise DataError(f"data.path: not set: {hint}")
    if _GLOB_CHARS & set(path):
        files = sorted(pathlib.Path(p) for p in glob.glob(path, recursive=True))
        files = [p for p in files if p.is_file()]
        if not files:
            raise DataError(f"data.path: no files match {path!r}: {hint}")
        return files
    p = pathlib.Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob(f"*{suffix}") if f.is_file())
        if not files:
            raise DataError(f"data.path: no {suffix} files under {path!r}: {hint}")
        return files
    if not p.is_file():
        raise DataError(f"data.path: no such file or directory {path!r}: {hint}")
    return [p]


def read_utf8(path: pathlib.Path) -> str:
    """The text of ``path``; DataError naming the line of the first byte that is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(
            f"data.path: {path}:{line}: not valid UTF-8 (byte {e.start}): convert the file to UTF-8"
        ) from None
