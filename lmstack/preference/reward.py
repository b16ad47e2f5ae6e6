"""Bradley-Terry loss of a scalar reward model on (chosen, rejected) pairs."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def pair_accuracy(rewards_chosen: jax.Array, rewards_rejected: jax.Array) -> jax.Array:
    """1.0 where the chosen completion's reward is strictly higher, else 0.0 (float ``[b]``).
    A tie counts as wrong, as TRL ``RewardTrainer``'s logged ``accuracy`` (its eval-time
    ``compute_accuracy`` takes an argmax, which counts a tie as right, and warns)."""
    return (rewards_chosen > rewards_rejected).astype(jnp.result_type(rewards_chosen, jnp.float32))


def bradley_terry_loss(
    rewards_chosen: jax.Array,
    rewards_rejected: jax.Array,
    *,
    margin: jax.Array | None = None,
    center_rewards_coefficient: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``(losses_b, metrics)``: ``-log sigma(r_c - r_r - margin) + coef (r_c + r_r)^2`` per pair.

    ``rewards_*``: the reward head's scalar per completion, float ``[b]``; ``margin``: optional
    float ``[b]`` by which chosen must beat rejected (Llama 2's preference-strength margin,
    Touvron et al. 2023, eq. 2); ``center_rewards_coefficient``: weight of the term that pulls
    rewards towards zero mean (Eisenstein et al. 2023). The batch mean is TRL ``RewardTrainer``'s
    loss (its ``margin`` column and ``center_rewards_coefficient``, there ``None`` for 0).
    Metrics per pair, without gradient: ``accuracy`` (:func:`pair_accuracy`), ``margin``
    (``r_c - r_r``), ``rewards/chosen``, ``rewards/rejected``."""
    diff = rewards_chosen - rewards_rejected
    losses = -jax.nn.log_sigmoid(diff if margin is None else diff - margin)
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * (rewards_chosen + rewards_rejected) ** 2
    chosen, rejected = jax.lax.stop_gradient((rewards_chosen, rewards_rejected))
    metrics = {"accuracy": pair_accuracy(chosen, rejected), "margin": chosen - rejected,
               "rewards/chosen": chosen, "rewards/rejected": rejected}
    return losses, metrics
