"""Sequence classification: one labelled text per row, cross-entropy on the model's class logits.

Records ``{text, label}`` come from the ``classification`` data format (``data.source``:
TSV, CSV or JSONL at ``data.path``, columns ``data.field`` and ``data.label_field``); the
held-out records are ``data.val_path`` or a seeded ``data.val_fraction`` of them, and
``data.max_records`` keeps the first N (see :func:`lmstack.run.encode_records`). Labels are
matched as strings against the label set ``objective.labels`` (e.g. ``negative,positive`` or
``0,1``; JSON numbers and booleans as JSON writes them); a label outside it is a DataError
naming the record.

The model is a family with a classification head (``model.num_labels`` = the number of
labels): ``model.classify(tokens, segment_ids, rng) -> (b, num_labels)`` float32 logits.
Batches hold ``tokens`` and ``segment_ids`` (b, seq_len) (the text framed as the Hugging Face
tokenizer frames it, ``[CLS] text [SEP]`` for BERT, else ``[bos] + text``; truncated; 1 on
tokens and 0 on padding) and ``labels`` (b,) (-1 on the padding rows of the last held-out
batch). The loss is the summed cross-entropy, ``aux["weight"]`` the number of examples.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from lmstack.data.formats import Labelled, source_problems
from lmstack.data.labelled import Examples, encode_labelled, frame_text, ordered_batches, shuffled_batches
from lmstack.data.sources import DataError
from lmstack.data.tokenizers import Tokenizer
from lmstack.registry import register


def parse_labels(labels: str) -> tuple[str, ...]:
    """The label set of ``objective.labels``: comma-separated names, blanks around them dropped."""
    return tuple(s.strip() for s in labels.split(",") if s.strip())


@register("objective.classify")
class Classify:
    """Fine-tunes a model with a classification head on labelled texts (module docstring)."""

    exact_microbatches = True
    config_defaults = dict(
        labels="",  # the label set, comma-separated as the data writes them: e.g. "negative,positive" or "0,1"
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
        out = source_problems(cfg.data, Labelled, "objective.classify", "labelled records")
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
    def encode_records(cls, cfg: Any, tokenizer: Tokenizer, records: Sequence[Labelled],
                       split: str) -> tuple[list[dict], list[str]]:
        """Each record framed (:func:`lmstack.data.labelled.frame_text`: ``[CLS] text [SEP]`` with a
        BERT tokenizer, ``[bos] + text`` otherwise) in ``data.seq_len`` tokens with its class index,
        and a printout line with the counts. Raises DataError (the record, the label set) for
        a label outside ``objective.labels``."""
        labels = parse_labels(cfg.objective.labels)
        index = {name: i for i, name in enumerate(labels)}
        for r in records:
            if r.label not in index:
                raise DataError(f"objective.labels: {r.where}: label {r.label!r} is not one of the configured labels "
                                f"({', '.join(labels)}): add it to --config.objective.labels or fix the record")
        examples = encode_labelled([r.text for r in records], [index[r.label] for r in records], tokenizer,
                                   cfg.data.seq_len)
        cut = sum(len(frame_text(r.text, tokenizer, 0)) > cfg.data.seq_len for r in records)
        counts = ", ".join(f"{name} {sum(r.label == name for r in records):,}" for name in labels)
        return examples, [f"{split}: {len(records):,} labelled texts ({counts}); {cut:,} cut to "
                          f"data.seq_len = {cfg.data.seq_len} tokens"]

    @property
    def labels(self) -> tuple[str, ...]:
        """The label names, in class-index order."""
        return parse_labels(self.cfg.objective.labels)

    def train_batches(self, data: Any) -> Iterator[dict]:
        c = self.cfg
        return shuffled_batches(Examples.stack(data.train_examples, c.data.seq_len), batch_size=c.train.batch_size,
                                seed=c.data.seed, rows=data.train_rows)

    def eval_batches(self, data: Any) -> list[dict]:
        c = self.cfg
        return ordered_batches(Examples.stack(data.val_examples, c.data.seq_len),
                               batch_size=c.eval.batch_size or c.train.batch_size, max_batches=c.eval.batches)

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
