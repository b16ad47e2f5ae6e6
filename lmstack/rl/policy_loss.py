"""PPO's clipped surrogate policy loss per token, with DAPO's separate low and high clip ranges.

``ratio = exp(logp - old_logp)``, ``loss = -min(ratio * A, clip(ratio, 1 - epsilon_low,
1 + epsilon_high) * A)`` (Schulman et al. 2017 with one epsilon; DAPO's "clip-higher" raises
``epsilon_high``, 0.2/0.28 in the paper). The same per-token formula in TRL GRPOTrainer
(``epsilon``, ``epsilon_high``), verl (``clip_ratio_low``/``clip_ratio_high``) and OpenRLHF
(``clip_eps_low``/``clip_eps_high``). Aggregate the result with :mod:`lmstack.rl.aggregation`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _terms(logp, old_logp, advantages, epsilon_low, epsilon_high):
    ratio = jnp.exp(jnp.asarray(logp, jnp.float32) - jnp.asarray(old_logp, jnp.float32))
    a = jnp.asarray(advantages, jnp.float32)
    a = a[:, None] if a.ndim == 1 and ratio.ndim == 2 else a
    return ratio * a, jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high) * a


def clipped_surrogate_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, *,
                           epsilon_low: float = 0.2, epsilon_high: float = 0.2) -> jax.Array:
    """Per-token ``-min(ratio * A, clip(ratio, 1 - epsilon_low, 1 + epsilon_high) * A)``, float32 ``(B, T)``.

    ``logp``: the current policy's log-probabilities of the sampled tokens ``(B, T)``; ``old_logp``:
    the rollout policy's (no gradient flows through them); ``advantages``: ``(B, T)`` per token
    (GAE) or ``(B,)`` per completion (GRPO, broadcast over tokens). Unmasked: aggregate it."""
    unclipped, clipped = _terms(logp, old_logp, advantages, epsilon_low, epsilon_high)
    return -jnp.minimum(unclipped, clipped)


def clipped_tokens(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, *,
                   epsilon_low: float = 0.2, epsilon_high: float = 0.2) -> jax.Array:
    """float32 ``(B, T)``: 1 where the clipped term is the smaller, so the token's gradient is cut
    (``ratio > 1 + epsilon_high`` with ``A > 0`` or ``ratio < 1 - epsilon_low`` with ``A < 0``),
    else 0. Its masked token mean is the clip fraction metric (TRL ``clip_ratio/region_mean``,
    verl ``pg_clipfrac``, OpenRLHF ``clip_ratio``): ``aggregate(.., mask, "token_mean")``."""
    unclipped, clipped = _terms(jax.lax.stop_gradient(logp), old_logp, advantages, epsilon_low, epsilon_high)
    return (clipped < unclipped).astype(jnp.float32)
