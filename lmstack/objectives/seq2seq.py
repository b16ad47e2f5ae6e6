"""Encoder-decoder objectives: a noising transform turns each window of raw tokens into
(inputs, targets); the loss is teacher-forced cross-entropy on the targets.

Subclasses say how long a raw window is and how to noise it (span corruption, BART
denoising, UL2); the windows, batching, determinism and the loss live here once.

Batches hold, each int32 ``(batch, length)``, ``inputs``, ``inputs_segment_ids``,
``inputs_positions``, ``targets``, ``targets_segment_ids`` and ``targets_positions`` (the
names of T5's packed features): segment ids number the window's documents (0: padding, no
loss), following ``lmstack.data.noise``'s rule, and positions count each document's tokens.
The encoder attends within a document, the decoder within a target document and, across,
from a target document to the same document's inputs only.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lmstack.data.pipeline import segment_positions
from lmstack.objectives.base import TransformedWindowObjective
from lmstack.objectives.causal_lm import token_cross_entropy


def shift_right(targets_bt: jax.Array, segment_ids_bt: jax.Array | None = None, start_id: int = 0) -> jax.Array:
    """Decoder inputs for teacher forcing: ``[start] + targets[:-1]`` (T5 starts with id 0),
    and with ``segment_ids`` each document's targets start anew (T5's packed
    ``autoregressive_inputs``): the first token of a segment reads ``start_id``."""
    shifted = jnp.concatenate([jnp.full_like(targets_bt[:, :1], start_id), targets_bt[:, :-1]], axis=1)
    if segment_ids_bt is None:
        return shifted
    starts = jnp.concatenate([jnp.ones_like(segment_ids_bt[:, :1], bool),
                              segment_ids_bt[:, 1:] != segment_ids_bt[:, :-1]], axis=1)
    return jnp.where(starts, start_id, shifted)


def seq2seq_features(inputs: np.ndarray, inputs_segment_ids: np.ndarray, targets: np.ndarray,
                     targets_segment_ids: np.ndarray, inputs_length: int, targets_length: int) -> dict[str, np.ndarray]:
    """One example's batch row: inputs and targets cut or zero-padded to their lengths (padding
    is segment 0), with positions counted per segment (:func:`segment_positions`)."""
    out = {}
    for name, x, seg, n in (("inputs", inputs, inputs_segment_ids, inputs_length),
                            ("targets", targets, targets_segment_ids, targets_length)):
        out[name] = _fixed(x, n)
        out[f"{name}_segment_ids"] = _fixed(seg, n)
        out[f"{name}_positions"] = segment_positions(out[f"{name}_segment_ids"])
    return out


def _fixed(x: np.ndarray, length: int) -> np.ndarray:
    out = np.zeros(length, np.int32)
    n = min(len(x), length)
    out[:n] = x[:n]
    return out


def sentinel_names(count: int) -> tuple[str, ...]:
    """T5's sentinel token names, ``<extra_id_0>`` first."""
    return tuple(f"<extra_id_{i}>" for i in range(count))


def sentinel_ids(special_ids: Mapping[str, int], count: int) -> np.ndarray:
    """The ids of ``<extra_id_0>`` ... ``<extra_id_{count-1}>`` in order (int32)."""
    return np.asarray([special_ids[name] for name in sentinel_names(count)], np.int32)


class Seq2SeqObjective(TransformedWindowObjective):
    """Transforms yield the six features above, fixed lengths (:func:`seq2seq_features`)."""

    def loss_fn(self, model: Any, batch: dict[str, jax.Array], rng: jax.Array | None):
        targets, targets_seg = batch["targets"], batch["targets_segment_ids"]
        logits = model(batch["inputs"], shift_right(targets, targets_seg),
                       input_segment_ids=batch["inputs_segment_ids"], input_positions=batch["inputs_positions"],
                       decoder_segment_ids=targets_seg, decoder_positions=batch["targets_positions"], rng=rng)
        aux = token_cross_entropy(logits, targets, targets_seg > 0)
        return aux.pop("loss"), aux
