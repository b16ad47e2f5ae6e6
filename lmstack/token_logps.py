"""Per-token log-probabilities of given labels under a language model's output head, whole or
in sequence chunks that never hold the full ``(batch, seq, vocab)`` logits.

The cross-entropy of causal LM and SFT and the per-token log-probs that preference and RL
objectives sum over a reply all reduce each position's vocabulary row to a few numbers (the
label's log-prob, whether the label is the argmax, the entropy). :func:`chunked_token_logps`
computes the logits of ``chunk`` positions at a time from the final hidden states and the head
weight (``jax.lax.map`` over the chunks) and reduces them at once; the chunk body is wrapped in
``jax.checkpoint``, so the backward pass recomputes each chunk's logits instead of keeping
them. Live logits are ``batch x chunk x vocab`` float32 in both passes instead of ``batch x
seq x vocab``, and the gradients are those of the unchunked loss (the same formula per
position; the head's gradient is summed over the chunks in float32). The idea is Liger
Kernel's fused linear cross-entropy and MaxText's vocabulary tiling, here chunked over the
sequence axis so the batch axis keeps its sharding.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from lmstack.models.projection import dense
from lmstack.sharding import constrain

Array = jax.Array


class TokenLogps(NamedTuple):
    """Per-position results, each ``(batch, seq)``: ``logp`` (float32, log p(label)),
    ``correct`` (bool, the label's logit is the row's maximum: on a tie every maximal label
    counts) and ``entropy``
    (float32 entropy of the predicted distribution in nats; None unless asked for)."""

    logp: Array
    correct: Array
    entropy: Array | None = None


def token_logps(logits_btv: Array, labels_bt: Array, *, entropy: bool = False) -> TokenLogps:
    """:class:`TokenLogps` of int ``labels_bt`` under float32 ``logits_btv`` (``(b, t, v)``);
    log p is optax's ``softmax_cross_entropy_with_integer_labels`` negated. ``correct``
    compares the label's logit with the row's maximum rather than taking an argmax: XLA:CPU
    runs the (value, index) reduction of an argmax over the vocabulary slowly (the quickstart's
    step: 1062 -> 1002 ms without it, measured in one process, alternating)."""
    logp = -optax.softmax_cross_entropy_with_integer_labels(logits_btv, labels_bt)
    label_logit = jnp.take_along_axis(logits_btv, labels_bt[..., None], axis=-1)[..., 0]
    correct = jax.lax.stop_gradient(label_logit >= jnp.max(logits_btv, axis=-1))
    h = None
    if entropy:
        logq = jax.nn.log_softmax(logits_btv, axis=-1)
        h = -jnp.sum(jnp.exp(logq) * logq, axis=-1)
    return TokenLogps(logp, correct, h)


def chunked_token_logps(hidden_btd: Array, head_dv: Array, labels_bt: Array, *, chunk: int,
                        entropy: bool = False) -> TokenLogps:
    """:class:`TokenLogps` of ``labels_bt`` (int ``(b, t)``) under the logits
    ``hidden_btd @ head_dv`` (``(b, t, d)`` in the compute dtype, ``(d, v)`` float32; the
    product is taken as the decoder's own head does: head cast to the hidden dtype, float32
    accumulation), computed ``chunk`` positions at a time (see the module docstring). ``t``
    need not be a multiple of ``chunk``: the last chunk is padded and the padding dropped.
    Raises ValueError when ``chunk < 1``."""
    if chunk < 1:
        raise ValueError(f"chunked_token_logps: chunk={chunk}: must be >= 1 sequence positions")
    b, t, d = hidden_btd.shape
    chunk = min(chunk, t)
    n = -(-t // chunk)
    pad = n * chunk - t
    x_nbcd = jnp.pad(hidden_btd, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d).swapaxes(0, 1)
    y_nbc = jnp.pad(labels_bt, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)

    # The head stays float32 into the body and is cast there, so its cotangent is summed over
    # the chunks in float32; prevent_cse=False is safe (and faster) under lax.map's scan.
    @functools.partial(jax.checkpoint, prevent_cse=False)
    def one_chunk(x_bcd: Array, y_bc: Array, head: Array) -> TokenLogps:
        logits = dense(x_bcd, head.astype(x_bcd.dtype), out_dtype=jnp.float32)
        logits = constrain(logits, ("batch", "activation_length", "activation_vocab"))
        return token_logps(logits, y_bc, entropy=entropy)

    out = jax.lax.map(lambda xy: one_chunk(xy[0], xy[1], head_dv), (x_nbcd, y_nbc))

    def unchunk(a_nbc: Array | None) -> Array | None:
        return None if a_nbc is None else a_nbc.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]

    return TokenLogps(*(unchunk(a) for a in out))


def cross_entropy_sums(stats: TokenLogps, mask_bt: Array) -> dict[str, Array]:
    """Summed cross-entropy (``loss``), ``accuracy`` and token count (``weight``) over the
    positions where ``mask_bt`` is true: the ``aux`` sums of the objective contract."""
    mask = mask_bt.astype(jnp.float32)
    return {"loss": -jnp.sum(stats.logp * mask), "accuracy": jnp.sum(stats.correct.astype(jnp.float32) * mask),
            "weight": jnp.sum(mask)}


def chunked_cross_entropy(hidden_btd: Array, head_dv: Array, targets_bt: Array, mask_bt: Array, *,
                          chunk: int) -> dict[str, Array]:
    """:func:`cross_entropy_sums` of :func:`chunked_token_logps`: the causal LM loss sums
    without materialising the ``(b, t, v)`` logits."""
    return cross_entropy_sums(chunked_token_logps(hidden_btd, head_dv, targets_bt, chunk=chunk), mask_bt)
