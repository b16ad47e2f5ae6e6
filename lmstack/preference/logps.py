"""Summed log-probabilities of completions, the quantity every preference loss compares."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sequence_logps(logits_btv: jax.Array, labels_bt: jax.Array, mask_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(sum_logps_b, lengths_b)``, both float32 ``[b]``: the sum of ``log p(labels[t])`` over
    the positions where ``mask`` is true (the completion tokens), and how many there are.

    ``logits_btv`` (any float dtype) at position ``t`` scores ``labels_bt[:, t]`` (int, ``[b, t]``):
    the caller shifts, as TRL's ``DPOTrainer`` does (``logits = model(tokens)[:, :-1]``,
    ``labels = tokens[:, 1:]``, ``mask`` = the chat template's completion mask shifted the same
    way). ``mask_bt`` is bool or 0/1; labels under a false mask may hold anything (TRL's -100).

    ``log p(y) = logit_y - logsumexp(logits)`` in float32: the outputs kept are the ``[b, t]``
    label logits and normalisers, never a ``[b, t, v]`` log-softmax. Whether XLA also fuses
    the float32 cast and ``exp`` into the reduction is the backend's choice (XLA:CPU does for
    float32 logits with its own defaults; with lmstack's CPU defaults, no YNN fusions, it keeps
    one float32 ``[b, t, v]`` temporary, as a log-softmax would).
    """
    return jnp.sum(token_logps(logits_btv, labels_bt, mask_bt), axis=-1), jnp.sum(mask_bt.astype(jnp.float32), axis=-1)


def token_logps(logits_btv: jax.Array, labels_bt: jax.Array, mask_bt: jax.Array) -> jax.Array:
    """float32 ``[b, t]``: ``log p(labels[t])`` where ``mask`` is true, 0 elsewhere (the
    per-token terms of :func:`sequence_logps`, same conventions; what PPO / GRPO ratios and
    KL estimates compare token by token)."""
    mask = mask_bt.astype(jnp.bool_)
    labels = jnp.where(mask, labels_bt, 0)  # out-of-range pad labels would gather NaN
    label_logits = jnp.take_along_axis(logits_btv, labels[..., None], axis=-1)[..., 0].astype(jnp.float32)
    normaliser = jax.nn.logsumexp(logits_btv.astype(jnp.float32), axis=-1)
    return jnp.where(mask, label_logits - normaliser, 0.0)
