"""Labelled records for sequence classification: a text and a label per record, read from
TSV, CSV or JSONL files, encoded one example per row, and batched.

TSV and CSV files start with a header row naming the columns (TSV unquoted, as GLUE ships
SST-2; CSV with the csv module's quoting); JSONL holds one object per line. A field is a
column or key name, or (TSV/CSV) a 0-based column number, for files whose headers differ
(SST-2's ``train.tsv`` says ``sentence`` where ``dev.tsv`` says ``content``). Labels are
matched as strings against the configured label set (``objective.labels``, e.g.
``negative,positive`` or ``0,1``); JSON numbers and booleans as JSON writes them (``1``,
``true``). A label outside the set is a :class:`DataError` naming the file and line.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import pathlib
import sys
from typing import Sequence

import grain
import numpy as np

from lmstack.data.pipeline import TokenStream
from lmstack.data.sources import DataError, resolve_paths
from lmstack.data.tokenizers import Tokenizer, with_bos

FORMATS = ("tsv", "csv", "jsonl")
Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Record:
    text: str
    label: int  # index into the label set


def parse_labels(labels: str) -> tuple[str, ...]:
    """The label set of ``objective.labels``: comma-separated names, blanks around them dropped."""
    return tuple(s.strip() for s in labels.split(",") if s.strip())


def read_records(path: str, fmt: str, *, text_field: str, label_field: str, labels: Sequence[str],
                 key: str = "data.path") -> list[Record]:
    """Every record of the files ``path`` names (a file, a directory or a glob; see
    :func:`lmstack.data.sources.resolve_paths`), in file and line order. ``fmt`` is one of
    :data:`FORMATS`; ``key`` is the config key that gave ``path``, for errors. Raises
    DataError (one line: file, line, what to set) for a missing field, a label outside
    ``labels``, malformed JSON, or no records at all."""
    index = {name: i for i, name in enumerate(labels)}
    records = []
    for file in resolve_paths(path, suffix=f".{fmt}"):
        rows = _jsonl_rows(file, text_field, label_field) if fmt == "jsonl" else _table_rows(
            file, fmt, text_field, label_field)
        for where, text, label in rows:
            if label not in index:
                raise DataError(f"objective.labels: {where}: label {label!r} is not one of the configured labels "
                                f"({', '.join(labels)}): add it to --config.objective.labels or fix the line")
            records.append(Record(text, index[label]))
    if not records:
        raise DataError(f"{key}: {path!r} holds no records: point it at a {fmt} file with a text and a label per "
                        f"{'line' if fmt == 'jsonl' else 'row after the header'}")
    return records


def _table_rows(file: pathlib.Path, fmt: str, text_field: str, label_field: str):
    """(where, text, label) of each row of a TSV/CSV file with a header row."""
    with open(file, newline="", encoding="utf-8") as f:
        if fmt == "tsv":
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        else:
            reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return
        cols = [_column(header, field, key, file) for field, key in
                ((text_field, "objective.text_field"), (label_field, "objective.label_field"))]
        for row in reader:
            if not row:
                continue
            where = f"{file}:{reader.line_num}"
            if max(cols) >= len(row):
                raise DataError(f"data.path: {where}: {len(row)} columns, but the fields need column {max(cols)} "
                                f"(0-based; the header has {len(header)}): fix the line")
            yield where, row[cols[0]], row[cols[1]].strip()


def _column(header: list[str], field: str, key: str, file: pathlib.Path) -> int:
    if field in header:
        return header.index(field)
    if field.isdigit() and int(field) < len(header):
        return int(field)
    raise DataError(f"{key}: {file}:1: no column {field!r} in the header ({', '.join(header)}): "
                    f"set --config.{key} to a column name or a 0-based column number")


def _jsonl_rows(file: pathlib.Path, text_field: str, label_field: str):
    """(where, text, label) of each non-blank line of a JSONL file."""
    for lineno, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{file}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"data.path: {where}: not valid JSON ({e.msg} at column {e.colno}): "
                            f"fix or delete that line") from None
        if not isinstance(row, dict):
            raise DataError(f"data.path: {where}: expected a JSON object, got {type(row).__name__}: "
                            f"write one object per line")
        for field, key in ((text_field, "objective.text_field"), (label_field, "objective.label_field")):
            if field not in row:
                raise DataError(f"{key}: {where}: no field {field!r} (fields: {', '.join(row) or 'none'}): "
                                f"set --config.{key}=NAME")
        text, label = row[text_field], row[label_field]
        if not isinstance(text, str):
            raise DataError(f"objective.text_field: {where}: field {text_field!r} is {type(text).__name__}, not a "
                            f"string: set --config.objective.text_field to a text field")
        if isinstance(label, (bool, int)):
            label = json.dumps(label)  # as written: true, 1
        elif not isinstance(label, str):
            raise DataError(f"objective.label_field: {where}: field {label_field!r} is {type(label).__name__}, "
                            f"not a string, integer or boolean: point --config.objective.label_field at the label")
        yield where, text, label.strip()


@dataclasses.dataclass(frozen=True)
class Examples:
    """Encoded examples, one per row: ``tokens`` int32 (n, seq_len) zero-padded, ``lengths``
    int32 (n,) and ``labels`` int32 (n,) (indices into the label set)."""

    tokens: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def rows(self, index: np.ndarray) -> Batch:
        """The batch of rows ``index``: ``tokens``, ``segment_ids`` (1 on tokens, 0 on padding), ``labels``."""
        seq_len = self.tokens.shape[1]
        segment_ids = (np.arange(seq_len) < self.lengths[index][:, None]).astype(np.int32)
        return {"tokens": self.tokens[index], "segment_ids": segment_ids, "labels": self.labels[index]}

    def stream(self, name: str) -> TokenStream:
        """The examples' tokens back to back, one document each (sizes, the data digest)."""
        starts = np.cumsum(self.lengths, dtype=np.int64) - self.lengths
        tokens = self.tokens[np.arange(self.tokens.shape[1]) < self.lengths[:, None]]
        return TokenStream(tokens.astype(np.int32), starts[self.lengths > 0], name)


def encode_examples(records: Sequence[Record], tokenizer: Tokenizer, seq_len: int) -> Examples:
    """``[bos] + text`` (bos where the tokenizer adds one, as Hugging Face tokenizers do for
    classification inputs), truncated to ``seq_len`` tokens, one row per record."""
    head = with_bos(tokenizer, [])
    tokens = np.zeros((len(records), seq_len), np.int32)
    lengths = np.zeros(len(records), np.int32)
    for r, rec in enumerate(records):
        ids = (head + tokenizer.encode(rec.text))[:seq_len]
        tokens[r, :len(ids)], lengths[r] = ids, len(ids)
    return Examples(tokens, lengths, np.asarray([rec.label for rec in records], np.int32))


class _ShuffledBatches:
    """Batch ``k`` of an endless sequence of seeded epochs over the examples (whole batches
    only; each epoch reshuffled), keeping ``rows`` of each batch."""

    def __init__(self, examples: Examples, batch_size: int, seed: int, rows: slice):
        self.examples, self.batch_size, self.seed, self.rows = examples, batch_size, seed, rows

    def __call__(self, k: int) -> Batch:
        epoch, offset = divmod(k, len(self.examples) // self.batch_size)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
        first = offset * self.batch_size
        return self.examples.rows(order[first + self.rows.start:first + self.rows.stop])


def shuffled_batches(examples: Examples, *, batch_size: int, seed: int, rows: slice | None = None
                   ) -> grain.DatasetIterator:
    """An endless, checkpointable grain iterator of shuffled batches of ``batch_size`` examples
    (:meth:`Examples.rows`); batch ``k`` depends only on ``(seed, k)``, so the iterator's state
    is the batch count. ``rows`` (default: all) keeps this process's rows of each batch.
    Raises DataError when there are fewer examples than one batch."""
    if len(examples) < batch_size:
        raise DataError(f"train.batch_size={batch_size} exceeds the {len(examples)} training examples: "
                        f"lower --config.train.batch_size or add data")
    fn = _ShuffledBatches(examples, batch_size, seed, slice(0, batch_size) if rows is None else rows)
    ds = grain.MapDataset.range(sys.maxsize).map(fn)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))


def ordered_batches(examples: Examples, *, batch_size: int, max_batches: int = 0) -> list[Batch]:
    """The examples in order in batches of ``batch_size`` (at most ``max_batches``; 0: all),
    the last filled with padding rows: no tokens (segment 0) and label -1."""
    n = len(examples) if not max_batches else min(len(examples), max_batches * batch_size)
    out = []
    for start in range(0, n, batch_size):
        index = np.arange(start, min(start + batch_size, n))
        batch = examples.rows(index)
        pad = batch_size - len(index)
        batch = {k: np.pad(v, [(0, pad)] + [(0, 0)] * (v.ndim - 1), constant_values=-1 if k == "labels" else 0)
                 for k, v in batch.items()}
        out.append(batch)
    return out
