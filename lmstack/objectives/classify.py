"""Sequence classification: one labelled text per row, cross-entropy on the model's class logits.

Records ``{text, label}`` come from ``data.path`` in the format ``data.source`` names (``tsv``,
``csv`` or ``jsonl``; see :mod:`lmstack.data.labelled`), with the columns
``objective.text_field`` and ``objective.label_field`` and the label set ``objective.labels``.
The held-out split is ``objective.eval_path`` (same format and fields) or, when that is
empty, the last ``data.val_fraction`` of the records after a shuffle seeded by ``data.seed``.
``data.max_chars`` keeps the leading records of ``data.path`` whose texts hold at most that
many characters.

The model is a family with a classification head (``model.num_labels`` = the number of
labels): ``model.classify(tokens, segment_ids, rng) -> (b, num_labels)`` float32 logits.
Batches hold ``tokens`` and ``segment_ids`` (b, seq_len) (``[bos] + text``, truncated, 1 on
tokens and 0 on padding) and ``labels`` (b,) (-1 on the padding rows of the last held-out
batch). The loss is the summed cross-entropy, ``aux["weight"]`` the number of examples.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lmstack.data.labelled import (
    FORMATS,
    Examples,
    Record,
    encode_examples,
    ordered_batches,
    parse_labels,
    read_records,
    shuffled_batches,
)
from lmstack.data.pipeline import TokenStream
from lmstack.data.tokenizers import Tokenizer
from lmstack.registry import register


@dataclasses.dataclass
class LabelledData:
    """A classification run's data: :class:`lmstack.run.RunData`'s fields (the streams hold the
    examples' tokens back to back, for sizes and the data digest) and the encoded examples."""

    tokenizer: Tokenizer
    train: TokenStream
    val: TokenStream
    train_examples: Examples
    val_examples: Examples
    train_rows: slice | None = None  # this process's rows of each training batch (None: all)


def _cut_to_chars(records: list[Record], max_chars: int) -> list[Record]:
    """The leading records whose texts hold at most ``max_chars`` characters (0: all)."""
    if not max_chars:
        return records
    ends = np.cumsum([len(r.text) for r in records])
    return records[: int(np.searchsorted(ends, max_chars, side="right"))]


def split_records(cfg: Any) -> tuple[list[Record], list[Record]]:
    """(train, held-out) records of a config (see the module docstring)."""
    c, o = cfg.data, cfg.objective
    fields = dict(text_field=o.text_field, label_field=o.label_field, labels=parse_labels(o.labels))
    records = _cut_to_chars(read_records(c.path, c.source, **fields), c.max_chars)
    if o.eval_path:
        return records, read_records(o.eval_path, c.source, key="objective.eval_path", **fields)
    order = np.random.default_rng(c.seed).permutation(len(records))
    n_val = int(len(records) * c.val_fraction)
    return [records[i] for i in order[: len(records) - n_val]], [records[i] for i in order[len(records) - n_val:]]


@register("objective.classify")
class Classify:
    """Fine-tunes a model with a classification head on labelled texts (module docstring)."""

    exact_microbatches = True
    config_defaults = dict(
        text_field="text",  # the text's column (TSV/CSV header name or 0-based number) or JSONL key
        label_field="label",  # the label's column or key
        labels="",  # the label set, comma-separated as the data writes them: e.g. "negative,positive" or "0,1"
        eval_path="",  # held-out records (same format); "": the last data.val_fraction of data.path's
    )
    config_choices: dict[str, tuple] = {}

    def __init__(self, cfg: Any, special_ids: Mapping[str, int] | None = None):
        self.cfg = cfg

    @classmethod
    def special_tokens(cls, cfg: Any) -> tuple[str, ...]:
        return ()

    @classmethod
    def config_problems(cls, cfg: Any) -> list[str]:
        """Settings this objective cannot train with, found at load time."""
        out = []
        if cfg.data.source not in FORMATS:
            out.append(f"data.source={cfg.data.source!r}: objective.classify reads labelled records: set "
                       f"--config.data.source to one of {', '.join(FORMATS)} and --config.data.path to the file")
        labels = parse_labels(cfg.objective.labels)
        if len(labels) < 2 or len(set(labels)) != len(labels):
            out.append(f"objective.labels={cfg.objective.labels!r}: list two or more distinct labels as the data "
                       f"writes them, e.g. --config.objective.labels=negative,positive")
        if "num_labels" not in cfg.model:
            out.append(f"model.name={cfg.model.name!r} has no classification head: use model.decoder or "
                       f"model.encoder with --config.model.num_labels={len(labels)}")
        elif cfg.model.num_labels != len(labels):
            out.append(f"model.num_labels={cfg.model.num_labels} does not match the {len(labels)} labels of "
                       f"objective.labels={cfg.objective.labels!r}: set --config.model.num_labels={len(labels)}")
        return out

    @classmethod
    def documents(cls, cfg: Any) -> list[str]:
        """The training texts (what a fresh tokenizer is trained on)."""
        return [r.text for r in split_records(cfg)[0]]

    @classmethod
    def load_data(cls, cfg: Any, tokenizer: Tokenizer) -> LabelledData:
        """The encoded train and held-out examples (``[bos] + text``, truncated to ``data.seq_len``)."""
        train, val = (encode_examples(r, tokenizer, cfg.data.seq_len) for r in split_records(cfg))
        return LabelledData(tokenizer, train.stream("train"), val.stream("val"), train, val)

    @property
    def labels(self) -> tuple[str, ...]:
        """The label names, in class-index order."""
        return parse_labels(self.cfg.objective.labels)

    def train_batches(self, data: LabelledData) -> Iterator[dict]:
        c = self.cfg
        return shuffled_batches(data.train_examples, batch_size=c.train.batch_size, seed=c.data.seed,
                                rows=data.train_rows)

    def eval_batches(self, data: LabelledData) -> list[dict]:
        c = self.cfg
        return ordered_batches(data.val_examples, batch_size=c.eval.batch_size or c.train.batch_size,
                               max_batches=c.eval.batches)

    def loss_fn(self, model: Any, batch: dict[str, jax.Array], rng: jax.Array | None):
        logits = model.classify(batch["tokens"], batch["segment_ids"], rng=rng)
        return classification_loss(logits, batch["labels"])


def classification_loss(logits_bc: jax.Array, labels_b: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Summed softmax cross-entropy over the rows with a label (>= 0), and ``aux`` with
    ``weight`` (their count) and ``accuracy`` (summed argmax hits)."""
    real = (labels_b >= 0).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_bc, jnp.maximum(labels_b, 0))
    correct = (jnp.argmax(logits_bc, axis=-1) == labels_b).astype(jnp.float32)
    return jnp.sum(ce * real), {"weight": jnp.sum(real), "accuracy": jnp.sum(correct * real)}
