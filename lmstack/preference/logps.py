"""Summed log-probabilities of completions, the quantity every preference loss compares."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lmstack.token_logps import chunked_token_logps, token_logps as label_logps


def sequence_logps(logits_btv: jax.Array, labels_bt: jax.Array, mask_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(sum_logps_b, lengths_b)``, both float32 ``[b]``: the sum of ``log p(labels[t])`` over
    the positions where ``mask`` is true (the completion tokens), and how many there are.

    ``logits_btv`` (any float dtype) at position ``t`` scores ``labels_bt[:, t]`` (int, ``[b, t]``):
    the caller shifts, as TRL's ``DPOTrainer`` does (``logits = model(tokens)[:, :-1]``,
    ``labels = tokens[:, 1:]``, ``mask`` = the chat template's completion mask shifted the same
    way). ``mask_bt`` is bool or 0/1; labels under a false mask may hold anything (TRL's -100).

    ``log p(y)`` in float32 (optax's cross-entropy, negated). To keep the ``[b, t, v]``
    logits from being held at all, compute them a chunk at a time with
    :func:`lmstack.token_logps.chunked_token_logps`.
    """
    return jnp.sum(token_logps(logits_btv, labels_bt, mask_bt), axis=-1), jnp.sum(mask_bt.astype(jnp.float32), axis=-1)


def token_logps(logits_btv: jax.Array, labels_bt: jax.Array, mask_bt: jax.Array) -> jax.Array:
    """float32 ``[b, t]``: ``log p(labels[t])`` where ``mask`` is true, 0 elsewhere (the
    per-token terms of :func:`sequence_logps`, same conventions; what PPO / GRPO ratios and
    KL estimates compare token by token), from :func:`lmstack.token_logps.token_logps`."""
    mask = mask_bt.astype(jnp.bool_)
    labels = jnp.where(mask, labels_bt, 0)  # out-of-range pad labels would gather NaN
    return jnp.where(mask, label_logps(logits_btv.astype(jnp.float32), labels).logp, 0.0)


def hidden_token_logps(model: Any, hidden_btd: jax.Array, labels_bt: jax.Array, mask_bt: jax.Array, *,
                       chunk: int = 0) -> jax.Array:
    """:func:`token_logps` of the logits of a decoder's final hidden states ``(b, t, d)``: the
    whole ``(b, t, vocab)`` logits at once (``chunk`` 0), or ``chunk`` positions at a time
    through the output head (:func:`lmstack.token_logps.chunked_token_logps`, the same values
    and gradients without ever holding the full logits; ``objective.loss_chunk``)."""
    if not chunk:
        return token_logps(model.logits(hidden_btd), labels_bt, mask_bt)
    mask = mask_bt.astype(jnp.bool_)
    logp = chunked_token_logps(hidden_btd, model.output_head(), jnp.where(mask, labels_bt, 0), chunk=chunk).logp
    return jnp.where(mask, logp, 0.0)
