"""PPO's KL penalty inside the reward and its coefficient (fixed or adaptive).

The per-token reward is ``-kl_coef * kl_t`` on every completion token plus the sequence's score
(reward model or reward function) on its last token (Ziegler et al. 2019; Stiennon et al. 2020;
TRL PPOTrainer ``rewards[actual_end] += scores`` over ``-kl_coef * kl``; OpenRLHF
``compute_reward``). The adaptive coefficient is Ziegler et al.'s proportional controller:
``e = clip(KL / target - 1, -0.2, 0.2)``, ``kl_coef <- kl_coef * (1 + e * n_steps / horizon)``
(the same update in TRL's and OpenRLHF's ``AdaptiveKLController`` and verl's). The coefficient is
a value the caller keeps (and checkpoints); the controllers hold only their settings.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


def kl_penalised_rewards(scores: jax.Array, kl: jax.Array, mask: jax.Array, kl_coef: float | jax.Array) -> jax.Array:
    """float32 ``(B, T)`` per-token rewards: ``-kl_coef * kl`` on tokens with ``mask`` 1, plus
    ``scores`` ``(B,)`` added at each row's last masked token, 0 on padding. ``kl``: a per-token
    estimate (:func:`lmstack.rl.kl.kl_estimate`, usually ``k1``) ``(B, T)``. A row with no
    completion tokens gets no score."""
    m = jnp.asarray(mask, jnp.float32)
    t = m.shape[-1]
    last = t - 1 - jnp.argmax(m[:, ::-1], axis=-1)
    at_last = (jnp.arange(t)[None, :] == last[:, None]) & (m > 0)
    return (-kl_coef * jnp.asarray(kl, jnp.float32) * m
            + at_last * jnp.asarray(scores, jnp.float32)[:, None])


@dataclasses.dataclass(frozen=True)
class FixedKLController:
    """A constant KL coefficient: :meth:`update` returns it unchanged."""

    def update(self, kl_coef: float | jax.Array, current_kl: float | jax.Array, n_steps: int) -> float | jax.Array:
        return kl_coef


@dataclasses.dataclass(frozen=True)
class AdaptiveKLController:
    """Ziegler et al. (2019) adaptive KL coefficient steering the measured KL towards ``target``
    over ``horizon`` samples (TRL's former PPOConfig defaults: init_kl_coef 0.2, target 6 nats,
    horizon 10000)."""

    target: float
    horizon: float

    def update(self, kl_coef: float | jax.Array, current_kl: float | jax.Array, n_steps: int) -> jax.Array:
        """The next coefficient after ``n_steps`` samples with mean per-sequence KL ``current_kl``:
        ``kl_coef * (1 + clip(current_kl / target - 1, -0.2, 0.2) * n_steps / horizon)``."""
        error = jnp.clip(jnp.asarray(current_kl, jnp.float32) / self.target - 1.0, -0.2, 0.2)
        return kl_coef * (1.0 + error * n_steps / self.horizon)
