"""Labelled examples for sequence classification: one encoded text and its class per row,
batched with seeded, resumable shuffling (training) or in order with padding rows (held out).

Records come from the ``classification`` data format (:mod:`lmstack.data.formats`); the
objective (:mod:`lmstack.objectives.classify`) maps their labels to class indices and
encodes them (:func:`encode_labelled`).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Sequence

import grain
import numpy as np

from lmstack.data.sources import DataError
from lmstack.data.tokenizers import Tokenizer, with_bos

Batch = dict[str, np.ndarray]


def frame_text(text: str, tokenizer: Tokenizer, seq_len: int) -> list[int]:
    """The ids a classifier reads for ``text``, at most ``seq_len`` of them: as the Hugging Face
    tokenizer frames a single text (``tokenizer(text, truncation=True, max_length=seq_len)``)
    where the tokenizer is one (``[CLS] text [SEP]`` for BERT, the frame kept when the text is
    cut), otherwise ``[bos] + text`` (bos where the tokenizer adds one) cut to ``seq_len``.
    ``seq_len`` 0: not cut (the whole framed length)."""
    if hasattr(tokenizer, "encode_framed"):
        return tokenizer.encode_framed(text, seq_len)
    return (with_bos(tokenizer, []) + tokenizer.encode(text))[:seq_len or None]


def encode_labelled(texts: Sequence[str], labels: Sequence[int], tokenizer: Tokenizer,
                    seq_len: int) -> list[dict[str, np.ndarray]]:
    """One example per text: ``tokens`` int32 (:func:`frame_text`) and ``label``."""
    return [{"tokens": np.asarray(frame_text(t, tokenizer, seq_len), np.int32), "label": np.int32(y)}
            for t, y in zip(texts, labels)]


@dataclasses.dataclass(frozen=True)
class Examples:
    """Encoded examples, one per row: ``tokens`` int32 (n, seq_len) zero-padded, ``lengths``
    int32 (n,) and ``labels`` int32 (n,) (indices into the label set)."""

    tokens: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray

    @classmethod
    def stack(cls, examples: Sequence[dict[str, np.ndarray]], seq_len: int) -> "Examples":
        """The examples of :func:`encode_labelled` as arrays, zero-padded to ``seq_len``."""
        tokens = np.zeros((len(examples), seq_len), np.int32)
        lengths = np.array([len(e["tokens"]) for e in examples], np.int32)
        for r, e in enumerate(examples):
            tokens[r, :lengths[r]] = e["tokens"]
        return cls(tokens, lengths, np.array([e["label"] for e in examples], np.int32))

    def __len__(self) -> int:
        return len(self.labels)

    def rows(self, index: np.ndarray) -> Batch:
        """The batch of rows ``index``: ``tokens``, ``segment_ids`` (1 on tokens, 0 on padding), ``labels``."""
        seq_len = self.tokens.shape[1]
        segment_ids = (np.arange(seq_len) < self.lengths[index][:, None]).astype(np.int32)
        return {"tokens": self.tokens[index], "segment_ids": segment_ids, "labels": self.labels[index]}


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
