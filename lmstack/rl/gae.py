"""Generalised advantage estimation (Schulman et al. 2016) over per-token rewards and values.

``delta_t = r_t + gamma * V_{t+1} - V_t``, ``A_t = delta_t + gamma * lambda * A_{t+1}``, returns
``R_t = A_t + V_t`` (the value head's regression target), computed right to left with one
``lax.scan``. Masked positions (``mask`` 0) are skipped: the recursion passes over them, taking
the next unmasked token's value and advantage, as verl's ``compute_gae_advantage_return`` does
(for right padding this equals TRL PPOTrainer's loop over zero-padded rewards and values); both
outputs are 0 there. PPO then whitens the advantages (:func:`lmstack.rl.advantages.whiten`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, *, gamma: float,
        lam: float) -> tuple[jax.Array, jax.Array]:
    """``(advantages, returns)``, float32 ``(B, T)`` each, from ``rewards``, ``values`` and
    ``mask`` ``(B, T)`` (tokens in time order; ``values`` the value head's estimates at the
    rollout; the value after the last token is 0). ``gamma`` is the discount, ``lam`` GAE's
    lambda (``lam=1``: Monte Carlo returns minus values; ``lam=0``: one-step TD errors)."""
    r, v = jnp.asarray(rewards, jnp.float32), jnp.asarray(values, jnp.float32)
    m = jnp.asarray(mask, jnp.float32)

    def step(carry, xs):
        next_value, next_adv = carry
        r_t, v_t, m_t = xs
        adv = r_t + gamma * next_value - v_t + gamma * lam * next_adv
        keep = m_t > 0
        return (jnp.where(keep, v_t, next_value), jnp.where(keep, adv, next_adv)), adv * m_t

    zeros = jnp.zeros(r.shape[:1], jnp.float32)
    _, adv_tb = jax.lax.scan(step, (zeros, zeros), (r.T, v.T, m.T), reverse=True)
    advantages = adv_tb.T
    return advantages, (advantages + v) * m
