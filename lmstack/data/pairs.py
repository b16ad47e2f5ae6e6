"""Paired examples for contrastive training: (query, document) with a group for splitting.

The embedded default is code search over the standard library: each documented function
gives a pair (its docstring's first paragraph, its source without the docstring), grouped
by module. Splitting by group keeps evaluation modules unseen in training. Pairs can also
come from a JSONL file with ``data.query_field`` / ``data.doc_field`` (and, optionally,
``data.group_field``).
"""

from __future__ import annotations

import ast
import dataclasses
import json
from typing import Any

import numpy as np

from lmstack.data.sources import DataError, resolve_paths, stdlib_sources
from lmstack.registry import register

_MIN_QUERY_CHARS = 20
_MAX_CODE_CHARS = 4000


@dataclasses.dataclass(frozen=True)
class Pair:
    query: str
    document: str
    group: str


def _without_docstring(lines: list[str], fn: ast.AST, doc_node: ast.AST) -> str:
    start, end = fn.lineno - 1, fn.end_lineno
    if getattr(fn, "decorator_list", None):
        start = min(d.lineno - 1 for d in fn.decorator_list)
    body = lines[start:end]
    a, b = doc_node.lineno - 1 - start, doc_node.end_lineno - start
    return "\n".join(body[:a] + body[b:])


def _module_pairs(module: str, text: str) -> list[Pair]:
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return []
    lines = text.splitlines()
    pairs = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        if not doc or not node.body or not isinstance(node.body[0], ast.Expr):
            continue
        query = doc.split("\n\n")[0].strip()
        code = _without_docstring(lines, node, node.body[0])
        if len(query) >= _MIN_QUERY_CHARS and len(code) <= _MAX_CODE_CHARS and code.count("\n") >= 2:
            pairs.append(Pair(query, code, module))
    return pairs


def stdlib_function_pairs() -> list[Pair]:
    """(docstring, code) pairs of the standard library's documented functions, by module."""
    pairs = []
    for relpath, text in stdlib_sources():
        pairs += _module_pairs(relpath.removesuffix(".py").replace("/", "."), text)
    return pairs


def jsonl_pairs(data_cfg: Any) -> list[Pair]:
    """Pairs from JSONL lines with ``data.query_field`` and ``data.doc_field`` (and an
    optional ``data.group_field``; without it every pair is its own group)."""
    q, d, g = data_cfg.query_field, data_cfg.doc_field, data_cfg.group_field
    pairs = []
    for path in resolve_paths(data_cfg.path, suffix=".jsonl"):
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"data.path: {path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}): "
                                f"fix or delete that line") from None
            for key, field in (("data.query_field", q), ("data.doc_field", d)):
                if not isinstance(row, dict) or not isinstance(row.get(field), str):
                    have = ", ".join(row) if isinstance(row, dict) else type(row).__name__
                    raise DataError(f"{key}: {path}:{lineno}: no text field {field!r} (fields: {have}): "
                                    f"set --config.{key}=NAME or fix the line")
            pairs.append(Pair(row[q], row[d], str(row.get(g, f"{path.name}:{lineno}")) if g else f"{lineno}"))
    if not pairs:
        raise DataError(f"data.path: {data_cfg.path!r} holds no pairs: point it at JSONL query/document lines")
    return pairs


def load_pairs(data_cfg: Any) -> list[Pair]:
    """The pairs ``data.source`` names: ``stdlib_pairs`` or ``pairs_jsonl``."""
    if data_cfg.source == "stdlib_pairs":
        return stdlib_function_pairs()
    if data_cfg.source == "pairs_jsonl":
        return jsonl_pairs(data_cfg)
    raise DataError(f"data.source: {data_cfg.source!r} has no pairs: use stdlib_pairs or pairs_jsonl")


def split_by_group(pairs: list[Pair], val_fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(train, val) with whole groups held out: a seeded permutation of the sorted group
    names puts the last ``val_fraction`` of the groups in validation."""
    groups = sorted({p.group for p in pairs})
    order = np.random.default_rng(seed).permutation(len(groups))
    n_val = int(round(len(groups) * val_fraction))
    val_groups = {groups[i] for i in order[len(groups) - n_val:]}
    return [p for p in pairs if p.group not in val_groups], [p for p in pairs if p.group in val_groups]


@register("data.stdlib_pairs")
def stdlib_pairs_documents(data_cfg: Any) -> list[str]:
    """The pairs' texts as documents (what the tokenizer is trained on)."""
    return [t for p in stdlib_function_pairs() for t in (p.query, p.document)]


@register("data.pairs_jsonl")
def jsonl_pairs_documents(data_cfg: Any) -> list[str]:
    return [t for p in jsonl_pairs(data_cfg) for t in (p.query, p.document)]
