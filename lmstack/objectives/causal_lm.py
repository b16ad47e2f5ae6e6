"""Causal language modelling: predict each token from the ones before it in its document."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from lmstack.objectives.base import WindowObjective
from lmstack.registry import register


def token_cross_entropy(logits_btv: jax.Array, targets_bt: jax.Array, mask_bt: jax.Array) -> dict[str, jax.Array]:
    """Summed cross-entropy and accuracy over the positions where ``mask`` is true."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_btv, targets_bt)
    mask = mask_bt.astype(jnp.float32)
    correct = (jnp.argmax(logits_btv, axis=-1) == targets_bt).astype(jnp.float32)
    return {"loss": jnp.sum(ce * mask), "accuracy": jnp.sum(correct * mask), "weight": jnp.sum(mask)}


@register("objective.causal_lm")
class CausalLM(WindowObjective):
    """Batches hold ``tokens``, ``segment_ids`` and ``positions`` of length ``seq_len + 1``;
    the model reads the first ``seq_len`` and predicts the last ``seq_len``. A target in
    another document than its input (or in padding, segment 0) carries no loss, nor does one
    whose ``loss_mask`` is 0 where the batch has that field (SFT's prompt tokens)."""

    def loss_fn(self, model: Any, batch: dict[str, jax.Array], rng: jax.Array | None):
        tokens, seg, pos = batch["tokens"], batch["segment_ids"], batch["positions"]
        logits = model(tokens[:, :-1], positions=pos[:, :-1], segment_ids=seg[:, :-1], rng=rng)
        mask = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
        if "loss_mask" in batch:
            mask &= batch["loss_mask"][:, 1:] > 0
        aux = token_cross_entropy(logits, tokens[:, 1:], mask)
        return aux.pop("loss"), aux
