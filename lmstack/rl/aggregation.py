"""How per-token RL losses become one number, as the ``(loss_sum, weight)`` pair lmstack's
objectives return (``loss_fn -> (loss_sum, aux["weight"])``; the trainer sums both over
microbatches, and over data-parallel shards, then divides).

``objective.loss_aggregation`` (per-token loss ``l``, completion mask ``m``, ``n_i = sum_t m_it``):

- ``seq_mean_token_mean``: ``mean_i (sum_t l_it m_it / n_i)``, each completion's token mean,
  then the mean over completions. The DeepSeekMath GRPO objective; TRL GRPOTrainer
  ``loss_type="grpo"``, verl ``loss_agg_mode="seq-mean-token-mean"``, OpenRLHF
  ``token_level_loss=False``. Returned as ``(sum_i sum_t l m / n_i, #completions)``.
- ``token_mean``: ``sum_it l m / sum_it m``, one mean over every completion token of the whole
  batch, so long completions weigh more. DAPO (Yu et al. 2025, token-level policy-gradient
  loss); TRL ``loss_type="dapo"`` (``"bnpo"`` is the same per local batch), verl ``"token-mean"``,
  OpenRLHF ``token_level_loss=True``. Returned as ``(sum_it l m, #tokens)``.
- ``fixed_denominator``: ``sum_it l m / (#completions * max_tokens)``, a constant per-completion
  denominator with no length bias. Dr. GRPO (Liu et al. 2025, ``MAX_TOKENS``); TRL
  ``loss_type="dr_grpo"`` (``max_completion_length``). Returned as
  ``(sum_it l m / max_tokens, #completions)``.

Why this split is exact under accumulation: the trainer computes
``sum(loss_sum over microbatches) / sum(weight over microbatches)``. In every mode the numerator
is a sum of per-completion terms that need nothing outside their own completion, and the weight
counts completions or tokens, so the quotient is the full-batch value however the batch is
split; in particular ``token_mean`` gets the global token count (DAPO's denominator), not a mean
of per-microbatch means. The weight depends only on the mask and the mode: aggregate every term
of one loss (policy, KL, value) in the same mode and add the numerators, since they share one
weight. Completions with no tokens (padding rows) add nothing and are not counted.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lmstack.config import ConfigError

LOSS_AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "fixed_denominator")


def aggregate(per_token: jax.Array, mask: jax.Array, mode: str, *,
              max_tokens: int | None = None) -> tuple[jax.Array, jax.Array]:
    """``(numerator, weight)`` of ``per_token`` ``(B, T)`` over ``mask`` ``(B, T)`` (1 on completion
    tokens) in ``mode`` (see the module docstring); ``numerator / weight`` is the loss, both float32
    scalars. ``max_tokens`` (> 0) is the constant of ``fixed_denominator``. ConfigError naming
    ``objective.loss_aggregation`` for an unknown mode, or for ``fixed_denominator`` without
    ``max_tokens``."""
    if mode not in LOSS_AGGREGATIONS:
        raise ConfigError(f"objective.loss_aggregation={mode!r}: unknown; choose one of "
                          f"{', '.join(LOSS_AGGREGATIONS)}")
    if mode == "fixed_denominator" and not (max_tokens and max_tokens > 0):
        raise ConfigError(f"objective.loss_aggregation=fixed_denominator needs max_tokens > 0 (Dr. GRPO's constant "
                          f"denominator, the rollout's maximum completion length), got {max_tokens!r}")
    m = jnp.asarray(mask, jnp.float32)
    token_sums = (jnp.asarray(per_token, jnp.float32) * m).sum(axis=-1)
    n = m.sum(axis=-1)
    completions = (n > 0).sum().astype(jnp.float32)
    if mode == "token_mean":
        return token_sums.sum(), n.sum()
    if mode == "seq_mean_token_mean":
        return (token_sums / jnp.maximum(n, 1.0)).sum(), completions
    return token_sums.sum() / max_tokens, completions
