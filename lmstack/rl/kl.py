"""Per-token estimators of KL(pi || pi_ref) from the log-probabilities of sampled tokens.

With ``log_ratio = logp - ref_logp`` for a token sampled from the policy pi (J. Schulman,
"Approximating KL Divergence", http://joschu.net/blog/kl-approx.html):

- ``k1 = log_ratio``: unbiased, high variance, negative for some tokens; OpenRLHF's default
  ``kl_estimator``, verl ``kl_penalty="kl"``, TRL PPOTrainer's ``kl_estimator="k1"``;
- ``k2 = 0.5 * log_ratio ** 2``: biased, low variance, never negative; OpenRLHF ``k2``, verl ``mse``;
- ``k3 = exp(-log_ratio) + log_ratio - 1 = exp(ref - logp) - (ref - logp) - 1``: unbiased, low
  variance, never negative; the DeepSeekMath GRPO paper's KL term, TRL GRPOTrainer's
  ``per_token_kl``, OpenRLHF ``k3``, verl ``low_var_kl`` (verl also clamps it to [-10, 10]; we do not).

All three are 0 where ``logp == ref_logp``; k2 and k3 also have zero gradient there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lmstack.config import ConfigError

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logp: jax.Array, ref_logp: jax.Array, kind: str) -> jax.Array:
    """Per-token estimate of KL(pi || pi_ref): ``logp`` and ``ref_logp`` are the policy's and the
    reference's log-probabilities of the sampled tokens, any matching shape (usually ``(B, T)``),
    any float dtype; returns float32 of that shape (padding positions are the caller's to mask).
    ``kind`` is ``k1``, ``k2`` or ``k3`` (formulas and users in the module docstring); ConfigError
    naming ``objective.kl_estimator`` for any other."""
    if kind not in KL_ESTIMATORS:
        raise ConfigError(f"objective.kl_estimator={kind!r}: unknown; choose one of {', '.join(KL_ESTIMATORS)}")
    log_ratio = jnp.asarray(logp, jnp.float32) - jnp.asarray(ref_logp, jnp.float32)
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * jnp.square(log_ratio)
    return jnp.expm1(-log_ratio) + log_ratio
