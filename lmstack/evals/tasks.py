"""Evaluation tasks read from local JSONL files, one JSON object per line (blank lines skipped).

- Multiple choice: ``{"query": str, "choices": [str, ...], "gold": int}`` (``"context"`` is
  accepted for ``"query"``; ``gold`` indexes ``choices`` from 0), as lm-eval's
  ``MultipleChoiceTask`` docs.
- Generation: ``{"question": str, "answer": str}`` (GSM8K's own files: the answer ends in
  ``#### <number>``).

Every reader raises DataError naming the file, the line and the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmstack.data.sources import DataError


def minimum_problems(section: str, settings: Any, minimums: dict[str, int]) -> list[str]:
    """Load-time errors for the integer keys of ``eval.<section>`` below their minimum."""
    return [f"eval.{section}.{key}={settings[key]} must be at least {low}: set --config.eval.{section}.{key}"
            for key, low in minimums.items() if settings[key] < low]


def read_jsonl(path: str | Path, key: str) -> list[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line of ``path``; ``key`` is the config
    key that named the file, for the error when it is missing."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{key}: no file {str(path)!r}: point --config.{key} at a JSONL file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not JSON ({e.msg}): write one JSON object per line") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{n}: a {type(obj).__name__}, not a JSON object: write one object per line")
            rows.append((n, obj))
    if not rows:
        raise DataError(f"{key}: {str(path)!r} holds no documents: add one JSON object per line")
    return rows


def _field(path: Path | str, n: int, obj: dict, name: str, kind: type) -> Any:
    if name not in obj:
        raise DataError(f"{path}:{n}: no field {name!r} (it has {', '.join(sorted(obj)) or 'none'})")
    if not isinstance(obj[name], kind) or isinstance(obj[name], bool):
        raise DataError(f"{path}:{n}: field {name!r} is a {type(obj[name]).__name__}, not a {kind.__name__}")
    return obj[name]


def multiple_choice_docs(path: str | Path, key: str) -> list[dict]:
    """``{"query", "choices", "gold"}`` documents from a multiple-choice JSONL file."""
    docs = []
    for n, obj in read_jsonl(path, key):
        query = _field(path, n, obj, "context" if "context" in obj else "query", str)
        choices = _field(path, n, obj, "choices", list)
        if len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise DataError(f"{path}:{n}: 'choices' must be a list of at least 2 non-empty strings")
        gold = _field(path, n, obj, "gold", int)
        if not 0 <= gold < len(choices):
            raise DataError(f"{path}:{n}: 'gold' is {gold}, not an index of its {len(choices)} choices "
                            f"(0..{len(choices) - 1})")
        docs.append({"query": query, "choices": choices, "gold": gold})
    return docs


def generation_docs(path: str | Path, key: str) -> list[dict]:
    """``{"question", "answer"}`` documents from a generation JSONL file (other fields kept)."""
    docs = []
    for n, obj in read_jsonl(path, key):
        _field(path, n, obj, "question", str)
        _field(path, n, obj, "answer", str)
        docs.append(obj)
    return docs


def render(template: str, doc: dict, key: str) -> str:
    """``template.format(**doc)`` (a prompt or target template over a document's fields);
    DataError naming the config ``key`` when the template is malformed or uses a field the
    document lacks."""
    try:
        return template.format(**doc)
    except KeyError as e:
        raise DataError(f"{key}={template!r} uses the field {e.args[0]!r}, which a document lacks (its fields: "
                        f"{', '.join(sorted(doc))}): change --config.{key}") from None
    except (IndexError, ValueError) as e:
        raise DataError(f"{key}={template!r} is not a str.format template ({e}): name fields as {{question}} and "
                        f"write literal braces as {{{{ }}}}") from None
