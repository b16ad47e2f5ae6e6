"""Encoder-decoder objectives: a noising transform turns each window of raw tokens into
(inputs, targets); the loss is teacher-forced cross-entropy on the targets.

Subclasses say how long a raw window is and how to noise it (span corruption, BART
denoising, UL2); the windows, batching, determinism and the loss live here once.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lmstack.objectives.base import TransformedWindowObjective
from lmstack.objectives.causal_lm import token_cross_entropy


def shift_right(targets_bt: jax.Array, start_id: int = 0) -> jax.Array:
    """Decoder inputs for teacher forcing: ``[start] + targets[:-1]`` (T5 starts with id 0)."""
    return jnp.concatenate([jnp.full_like(targets_bt[:, :1], start_id), targets_bt[:, :-1]], axis=1)


def fixed(x: np.ndarray, length: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``x`` cut or padded to ``length``, and the mask of real tokens."""
    out = np.full(length, pad_id, np.int32)
    n = min(len(x), length)
    out[:n] = x[:n]
    return out, np.arange(length) < n


def sentinel_names(count: int) -> tuple[str, ...]:
    """T5's sentinel token names, ``<extra_id_0>`` first."""
    return tuple(f"<extra_id_{i}>" for i in range(count))


def sentinel_ids(special_ids: Mapping[str, int], count: int) -> np.ndarray:
    """The ids of ``<extra_id_0>`` ... ``<extra_id_{count-1}>`` in order (int32)."""
    return np.asarray([special_ids[name] for name in sentinel_names(count)], np.int32)


class Seq2SeqObjective(TransformedWindowObjective):
    """Transforms yield ``inputs``/``inputs_mask``/``targets``/``targets_mask`` (fixed lengths)."""

    def loss_fn(self, model: Any, batch: dict[str, jax.Array], rng: jax.Array | None):
        targets = batch["targets"]
        logits = model(batch["inputs"], shift_right(targets), input_segment_ids=batch["inputs_mask"].astype(jnp.int32),
                       rng=rng)
        aux = token_cross_entropy(logits, targets, batch["targets_mask"])
        return aux.pop("loss"), aux
