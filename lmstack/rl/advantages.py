"""Advantages without a critic (GRPO, Dr. GRPO, RLOO) and the masked whitening PPO applies to GAE.

Group layout: the G completions of one prompt are adjacent, ``rewards`` flat ``(B,)`` with
``B = num_groups * G`` (TRL GRPOTrainer's ``rewards.view(-1, num_generations)``) or already
``(num_groups, G)``. Everything is computed in float32.

Which standard deviation divides the centred reward (``objective.advantage_std``):

- ``unbiased``: Bessel-corrected sample std (ddof=1), ``(r - mean) / (std + eps)``: DeepSeekMath
  GRPO, TRL GRPOTrainer (``torch.std``, eps 1e-4), verl ``compute_grpo_outcome_advantage``
  (``torch.std``, eps 1e-6);
- ``population``: ddof=0, ``(r - mean) / (std + eps)``;
- ``none``: ``r - mean``, no division: Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like
  Training"), verl ``norm_adv_by_std_in_grpo=False``, TRL ``scale_rewards="none"``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lmstack.config import ConfigError

ADVANTAGE_STDS = ("unbiased", "population", "none")


def _grouped(rewards: jax.Array, group_size: int | None) -> jax.Array:
    """``rewards`` as ``(num_groups, G)`` float32; ConfigError for a group of one or a ragged batch."""
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim == 1 and group_size is None:
        raise ValueError("flat rewards (B,) need group_size, the completions per prompt (objective.num_generations)")
    if rewards.ndim not in (1, 2):
        raise ValueError(f"rewards must be (B,) or (num_groups, G), got shape {rewards.shape}")
    g = group_size if rewards.ndim == 1 else rewards.shape[1]
    if g < 2:
        raise ConfigError(f"objective.num_generations={g}: group-relative advantages need at least 2 completions "
                          f"per prompt (with 1 every advantage is 0): set objective.num_generations >= 2")
    if rewards.ndim == 1 and rewards.shape[0] % g:
        raise ConfigError(f"{rewards.shape[0]} rewards do not split into groups of objective.num_generations={g}: "
                          f"the rollout batch must hold num_generations completions per prompt")
    return rewards.reshape(-1, g)


def group_advantages(rewards: jax.Array, group_size: int | None = None, *, std: str = "unbiased",
                     eps: float = 1e-4) -> jax.Array:
    """GRPO's group-relative advantage of each completion, the same shape as ``rewards``.

    ``rewards``: ``(B,)`` with ``group_size`` = G (groups adjacent) or ``(num_groups, G)``.
    ``A_i = (r_i - mean_g) / (std_g + eps)`` with ``std`` ``unbiased`` (ddof=1) or ``population``
    (ddof=0), or ``A_i = r_i - mean_g`` for ``none`` (see the module docstring for who uses which;
    ``eps`` 1e-4 is TRL's, verl's is 1e-6). Returns float32. Raises ConfigError for G < 2, a batch
    that is not a whole number of groups, or an unknown ``std``."""
    if std not in ADVANTAGE_STDS:
        raise ConfigError(f"objective.advantage_std={std!r}: unknown; choose one of {', '.join(ADVANTAGE_STDS)}")
    r = _grouped(rewards, group_size)
    centred = r - r.mean(axis=1, keepdims=True)
    if std != "none":
        centred = centred / (r.std(axis=1, ddof=1 if std == "unbiased" else 0, keepdims=True) + eps)
    return centred.reshape(jnp.shape(rewards))


def rloo_advantages(rewards: jax.Array, group_size: int | None = None) -> jax.Array:
    """REINFORCE leave-one-out advantage (Ahmadian et al. 2024; verl ``compute_rloo_outcome_advantage``):
    ``A_i = r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean_g)``, the same shape as ``rewards``
    (``(B,)`` with ``group_size`` or ``(num_groups, G)``), float32. ConfigError for G < 2."""
    r = _grouped(rewards, group_size)
    g = r.shape[1]
    return (g / (g - 1) * (r - r.mean(axis=1, keepdims=True))).reshape(jnp.shape(rewards))


def whiten(x: jax.Array, mask: jax.Array, *, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
    """``x`` standardised over its masked entries: ``(x - mean) * rsqrt(var + eps)``, zero where
    ``mask`` is 0, float32, ``x``'s shape.

    Mean and variance are over all entries with ``mask`` 1 (the whole batch, as PPO whitens the
    GAE advantages); the variance is Bessel-corrected (``n / (n - 1)``), as TRL's and verl's
    ``masked_whiten``; ``shift_mean=False`` adds the mean back (TRL's reward whitening).
    OpenRLHF's ``masked_normalize`` differs only in using the population variance. Needs at
    least 2 masked entries (the Bessel factor is undefined for one)."""
    x = jnp.asarray(x, jnp.float32)
    m = jnp.asarray(mask, jnp.float32)
    n = m.sum()
    mean = (x * m).sum() / n
    var = (jnp.square(x - mean) * m).sum() / n * (n / (n - 1))
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m
