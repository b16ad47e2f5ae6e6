"""PPO's clipped value loss per token.

``0.5 * max((V - R)^2, (V_old + clip(V - V_old, -clip_range, clip_range) - R)^2)``: the new value
``V`` may not profit from moving more than ``clip_range`` from the rollout's ``V_old``. The 0.5
factor and the max of the unclipped and clipped squared errors are TRL PPOTrainer's
(``0.5 * masked_mean(max(vf_losses1, vf_losses2))``), verl's ``compute_value_loss`` and OpenRLHF's
``ValueLoss`` (``clip_eps=None`` there is the plain ``0.5 * (V - R)^2``, as ``clip_range=None`` here).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def clipped_value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, *,
                       clip_range: float | None = 0.2) -> jax.Array:
    """Per-token value loss, float32 ``(B, T)``, unmasked (aggregate it like the policy loss):
    ``values`` the value head now, ``old_values`` at the rollout, ``returns`` the GAE returns
    (:func:`lmstack.rl.gae.gae`), all ``(B, T)``; formula and sources in the module docstring."""
    v, r = jnp.asarray(values, jnp.float32), jnp.asarray(returns, jnp.float32)
    loss = jnp.square(v - r)
    if clip_range is not None:
        old = jnp.asarray(old_values, jnp.float32)
        loss = jnp.maximum(loss, jnp.square(old + jnp.clip(v - old, -clip_range, clip_range) - r))
    return 0.5 * loss
