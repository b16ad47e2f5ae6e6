"""Prefix language modelling on the decoder: the first ``P`` tokens of each window are a
prefix that attends to itself bidirectionally; the rest is causal, and only the tokens the
model cannot see (outside the prefix) carry loss.

``P`` is drawn per window in the data pipeline, uniform in ``[prefix_min, prefix_max] x
seq_len``, from the window's own rng (seeded by ``(data.seed, window index)``), so the
batch itself says what is prefix (``prefix_mask``): runs resume exactly and a batch split
into microbatches trains on the same tokens. Evaluation uses ``P = seq_len / 2``. The
prefix belongs to the window's first document (a window may start another after it).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lmstack.objectives.base import TransformedWindowObjective, WindowObjective
from lmstack.objectives.causal_lm import token_cross_entropy
from lmstack.registry import register


def prefix_mask(segment_ids: np.ndarray, prefix_length: int | np.ndarray) -> np.ndarray:
    """bool, shaped like ``segment_ids`` (``(..., n)``): True on the first ``prefix_length``
    tokens of each row (broadcast over the leading axes) that belong to the row's first
    document."""
    seg = np.asarray(segment_ids)
    first = np.arange(seg.shape[-1]) < np.asarray(prefix_length)[..., None]
    return first & (seg == seg[..., :1])


@register("objective.prefix_lm")
class PrefixLM(TransformedWindowObjective):
    """Batches hold the causal-LM windows (``tokens``, ``segment_ids``, ``positions``, int32
    ``(batch, seq_len + 1)``) and ``prefix_mask`` (bool, same shape)."""

    config_defaults = dict(
        prefix_min=0.1,  # the training prefix length is uniform in [prefix_min, prefix_max] x seq_len
        prefix_max=0.9,
    )

    def window_length(self) -> int:
        return self.cfg.data.seq_len + 1

    def prefix_range(self) -> tuple[int, int]:
        """The smallest and largest prefix length drawn for training."""
        n, o = self.cfg.data.seq_len, self.cfg.objective
        return max(1, int(o.prefix_min * n)), max(1, min(n - 1, int(o.prefix_max * n)))

    def transform(self, window: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        lo, hi = self.prefix_range()
        return {**window, "prefix_mask": prefix_mask(window["segment_ids"], int(rng.integers(lo, hi + 1)))}

    def eval_batches(self, data: Any) -> list[dict]:
        batches = WindowObjective.eval_batches(self, data)
        return [{**b, "prefix_mask": prefix_mask(b["segment_ids"], self.cfg.data.seq_len // 2)} for b in batches]

    def loss_fn(self, model: Any, batch: dict[str, jax.Array], rng: jax.Array | None):
        tokens, seg, pos, prefix = batch["tokens"], batch["segment_ids"], batch["positions"], batch["prefix_mask"]
        logits = model(tokens[:, :-1], positions=pos[:, :-1], segment_ids=seg[:, :-1], prefix_mask=prefix[:, :-1],
                       rng=rng)
        in_doc = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
        aux = token_cross_entropy(logits, tokens[:, 1:], in_doc & ~prefix[:, 1:].astype(jnp.bool_))
        return aux.pop("loss"), aux
