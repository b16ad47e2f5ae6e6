"""The DPO family of preference losses, and KTO, as pure functions of sequence log-probabilities.

Inputs are ``[b]`` summed completion log-probabilities (``sequence_logps``) of the policy and the
reference on each pair's chosen and rejected completion, with the completion lengths; every loss
returns per-pair losses ``[b]`` in the inputs' dtype (float32 in training), and the objective
reduces them (TRL takes the batch mean). ``beta``, ``label_smoothing`` and ``gamma`` are Python
floats (static config values, checked by :func:`check_loss_options`).

With ``z`` the log-ratio margin ``(pi_c - pi_r) - (ref_c - ref_r)`` of summed log-probs and
``avg`` a log-prob divided by its completion length, ``loss_type`` (TRL's names and formulas):

- ``sigmoid``: ``-log sigma(beta z)`` (DPO, Rafailov et al. 2023, eq. 7); ``label_smoothing``
  ``eps > 0`` gives conservative DPO ``-(1-eps) log sigma(beta z) - eps log sigma(-beta z)``
  (cDPO, Mitchell 2023). TRL ``DPOTrainer`` ``loss_type="sigmoid"`` with ``label_smoothing``
  (TRL 0.x; TRL 1.x's ``sigmoid`` ignores ``label_smoothing``, read by ``robust`` instead).
- ``robust``: ``[-(1-eps) log sigma(beta z) + eps log sigma(-beta z)] / (1 - 2 eps)``, unbiased
  under labels flipped with probability ``eps`` (rDPO, Chowdhury et al. 2024). TRL ``"robust"``.
- ``hinge``: ``relu(1 - beta z)`` (SLiC-HF, Zhao et al. 2023; RSO, Liu et al. 2023). TRL ``"hinge"``.
- ``ipo``: ``(z_avg - 1/(2 beta))^2`` with ``z_avg = (pi_c - ref_c)/len_c - (pi_r - ref_r)/len_r``,
  the log-ratios averaged over completion tokens (IPO, Azar et al. 2023, eq. 17, ``tau = beta``;
  TRL ``"ipo"`` normalises by length, the form the IPO authors confirmed to TRL).
- ``sigmoid_norm``: ``-log sigma(beta z_avg)``, length-normalised DPO (TRL ``"sigmoid_norm"``,
  open-instruct's ``dpo_norm`` of Tulu 3 / OLMo).
- ``simpo``: reference-free, ``-log sigma(beta (avg_c - avg_r) - gamma)`` of the policy's
  length-averaged log-probs with target margin ``gamma`` (SimPO, Meng et al. 2024), label
  smoothing as cDPO. TRL ``CPOTrainer`` ``loss_type="simpo"``, ``simpo_gamma = gamma``; the SimPO
  repository's ``gamma_beta_ratio`` is ``gamma / beta``.
- ``orpo``: reference-free odds-ratio term ``-beta log sigma(log_odds)``, ``log_odds =
  log odds(avg_c) - log odds(avg_r)``, ``log odds(a) = a - log(1 - e^a)`` (ORPO, Hong et al.
  2024, eqs. 4 and 7; ``beta`` is the paper's ``lambda``; TRL ``ORPOTrainer``). The returned
  loss is only this term: the objective adds the chosen completion's NLL (TRL: token-mean
  cross-entropy over the batch's chosen tokens).
- ``kto``: unpaired, see :func:`kto_loss`.

Metrics (per pair ``[b]``, no gradient; TRL logs their batch means): ``rewards/chosen`` and
``rewards/rejected`` (the implicit reward ``beta (pi - ref)`` of summed log-probs; for the
reference-free ``simpo`` and ``orpo`` ``beta * avg``, as TRL's CPO/ORPO trainers),
``rewards/margins``, ``rewards/accuracies`` (1.0 where chosen's reward is higher),
``logps/chosen``, ``logps/rejected`` (the policy's summed log-probs); ``orpo`` adds
``log_odds_ratio`` (``log sigma(log_odds)``) and ``log_odds_chosen`` (``log_odds``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lmstack.config import ConfigError

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "sigmoid_norm", "simpo", "orpo", "kto")
REFERENCE_FREE = ("simpo", "orpo")
_SMOOTHED = ("sigmoid", "robust", "simpo")
_LENGTH_NORMALISED = ("ipo", "sigmoid_norm")

Metrics = dict[str, jax.Array]


def check_loss_options(loss_type: str, *, beta: float, label_smoothing: float = 0.0, gamma: float = 0.0) -> None:
    """Raise ConfigError (naming the ``objective.*`` key) for an unknown ``loss_type``, a
    non-positive ``beta``, ``label_smoothing`` outside ``[0, 0.5)`` or set for a loss that
    ignores it (all but sigmoid, robust, simpo), or ``gamma`` set for a loss other than simpo."""
    if loss_type not in LOSS_TYPES:
        raise ConfigError(f"objective.loss_type: {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    if not beta > 0:
        raise ConfigError(f"objective.beta={beta}: must be positive")
    if not 0 <= label_smoothing < 0.5:
        raise ConfigError(f"objective.label_smoothing={label_smoothing}: must be in [0, 0.5) (the probability "
                          f"that a preference label is flipped)")
    if label_smoothing and loss_type not in _SMOOTHED:
        raise ConfigError(f"objective.label_smoothing={label_smoothing} has no effect with objective.loss_type="
                          f"{loss_type}: set it to 0, or use one of {', '.join(_SMOOTHED)}")
    if gamma and loss_type != "simpo":
        raise ConfigError(f"objective.gamma={gamma} is SimPO's target margin and has no effect with "
                          f"objective.loss_type={loss_type}: set it to 0, or use simpo")


def sigmoid_loss(logits_b: jax.Array, *, beta: float, label_smoothing: float = 0.0) -> jax.Array:
    """``-(1-eps) log sigma(beta z) - eps log sigma(-beta z)`` per pair: DPO at ``eps = 0``
    (Rafailov et al. 2023, eq. 7), conservative DPO otherwise (Mitchell 2023); TRL ``sigmoid``."""
    x = beta * logits_b
    return -(1 - label_smoothing) * jax.nn.log_sigmoid(x) - label_smoothing * jax.nn.log_sigmoid(-x)


def robust_loss(logits_b: jax.Array, *, beta: float, label_smoothing: float) -> jax.Array:
    """``[-(1-eps) log sigma(beta z) + eps log sigma(-beta z)] / (1 - 2 eps)`` per pair
    (rDPO, Chowdhury et al. 2024; TRL ``robust``)."""
    x = beta * logits_b
    eps = label_smoothing
    return (-(1 - eps) * jax.nn.log_sigmoid(x) + eps * jax.nn.log_sigmoid(-x)) / (1 - 2 * eps)


def hinge_loss(logits_b: jax.Array, *, beta: float) -> jax.Array:
    """``relu(1 - beta z)`` per pair (SLiC-HF, Zhao et al. 2023; TRL ``hinge``)."""
    return jax.nn.relu(1 - beta * logits_b)


def ipo_loss(logits_b: jax.Array, *, beta: float) -> jax.Array:
    """``(z - 1/(2 beta))^2`` per pair (IPO, Azar et al. 2023, eq. 17 with ``tau = beta``); TRL
    passes the length-averaged margin, as :func:`preference_loss` does."""
    return (logits_b - 1 / (2 * beta)) ** 2


def simpo_loss(avg_chosen_b: jax.Array, avg_rejected_b: jax.Array, *, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> jax.Array:
    """``-log sigma(beta (avg_c - avg_r) - gamma)`` per pair from the policy's length-averaged
    log-probs (SimPO, Meng et al. 2024), smoothed as cDPO; TRL ``CPOTrainer`` ``simpo`` writes it
    as the sigmoid loss of ``avg_c - avg_r - simpo_gamma / beta``."""
    return sigmoid_loss(avg_chosen_b - avg_rejected_b - gamma / beta, beta=beta, label_smoothing=label_smoothing)


def _log1mexp(x: jax.Array) -> jax.Array:
    """``log(1 - e^x)`` for ``x < 0``, accurate near 0 and far below it (Maechler 2012)."""
    return jnp.where(x > -math.log(2), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def odds_ratio_loss(avg_chosen_b: jax.Array, avg_rejected_b: jax.Array, *, beta: float) -> tuple[jax.Array, jax.Array]:
    """``(-beta log sigma(log_odds), log_odds)`` per pair, ``log_odds = (avg_c - avg_r) -
    (log(1 - e^avg_c) - log(1 - e^avg_r))`` from the policy's length-averaged log-probs (ORPO,
    Hong et al. 2024, eqs. 4 and 7; TRL ``ORPOTrainer.odds_ratio_loss``, which returns the
    negative of this loss). Excludes ORPO's NLL term (see the module docstring)."""
    log_odds = (avg_chosen_b - avg_rejected_b) - (_log1mexp(avg_chosen_b) - _log1mexp(avg_rejected_b))
    return -beta * jax.nn.log_sigmoid(log_odds), log_odds


def _paired_metrics(reward_chosen: jax.Array, reward_rejected: jax.Array, policy_chosen: jax.Array,
                    policy_rejected: jax.Array) -> Metrics:
    reward_chosen, reward_rejected = jax.lax.stop_gradient((reward_chosen, reward_rejected))
    return {
        "rewards/chosen": reward_chosen,
        "rewards/rejected": reward_rejected,
        "rewards/margins": reward_chosen - reward_rejected,
        "rewards/accuracies": (reward_chosen > reward_rejected).astype(reward_chosen.dtype),
        "logps/chosen": jax.lax.stop_gradient(policy_chosen),
        "logps/rejected": jax.lax.stop_gradient(policy_rejected),
    }


def preference_loss(
    loss_type: str,
    policy_chosen: jax.Array,
    policy_rejected: jax.Array,
    ref_chosen: jax.Array | None,
    ref_rejected: jax.Array | None,
    *,
    chosen_lengths: jax.Array,
    rejected_lengths: jax.Array,
    beta: float,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
) -> tuple[jax.Array, Metrics]:
    """``(losses_b, metrics)`` of one paired ``loss_type`` (see the module docstring).

    ``policy_*``, ``ref_*``: summed completion log-probs ``[b]`` (``ref_*`` may be None for the
    ``REFERENCE_FREE`` losses, which ignore them); ``*_lengths``: completion token counts ``[b]``
    (clamped to at least 1, as TRL). Raises ConfigError as :func:`check_loss_options`;
    ValueError for ``kto`` (unpaired: :func:`kto_loss`) or a missing reference."""
    check_loss_options(loss_type, beta=beta, label_smoothing=label_smoothing, gamma=gamma)
    if loss_type == "kto":
        raise ValueError("loss_type kto is unpaired (one labelled completion per example): score it with kto_loss")
    len_c = jnp.maximum(chosen_lengths, 1).astype(policy_chosen.dtype)
    len_r = jnp.maximum(rejected_lengths, 1).astype(policy_rejected.dtype)
    if loss_type in REFERENCE_FREE:
        avg_c, avg_r = policy_chosen / len_c, policy_rejected / len_r
        extra = {}
        if loss_type == "simpo":
            losses = simpo_loss(avg_c, avg_r, beta=beta, gamma=gamma, label_smoothing=label_smoothing)
        else:
            losses, log_odds = odds_ratio_loss(avg_c, avg_r, beta=beta)
            log_odds = jax.lax.stop_gradient(log_odds)
            extra = {"log_odds_ratio": jax.nn.log_sigmoid(log_odds), "log_odds_chosen": log_odds}
        metrics = _paired_metrics(beta * avg_c, beta * avg_r, policy_chosen, policy_rejected)
        return losses, {**metrics, **extra}

    if ref_chosen is None or ref_rejected is None:
        raise ValueError(f"loss_type {loss_type} compares the policy with a reference: pass ref_chosen and ref_rejected")
    ratio_c, ratio_r = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    if loss_type in _LENGTH_NORMALISED:
        logits = ratio_c / len_c - ratio_r / len_r
    else:
        logits = ratio_c - ratio_r
    if loss_type == "sigmoid":
        losses = sigmoid_loss(logits, beta=beta, label_smoothing=label_smoothing)
    elif loss_type == "robust":
        losses = robust_loss(logits, beta=beta, label_smoothing=label_smoothing)
    elif loss_type == "hinge":
        losses = hinge_loss(logits, beta=beta)
    elif loss_type == "ipo":
        losses = ipo_loss(logits, beta=beta)
    else:  # sigmoid_norm
        losses = sigmoid_loss(logits, beta=beta)
    return losses, _paired_metrics(beta * ratio_c, beta * ratio_r, policy_chosen, policy_rejected)


def kto_loss(
    policy_logps: jax.Array,
    ref_logps: jax.Array,
    desirable_b: jax.Array,
    kl_policy: jax.Array,
    kl_ref: jax.Array,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    valid_b: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """``(losses_b, metrics)`` of KTO (Ethayarajh et al. 2024; TRL ``KTOTrainer``
    ``loss_type="kto"``) on unpaired examples.

    ``policy_logps``, ``ref_logps``: summed completion log-probs ``[b]``; ``desirable_b``: bool
    ``[b]``, the example's label; ``kl_policy``, ``kl_ref``: summed log-probs ``[k]`` of
    mismatched completions (each prompt with another example's completion, TRL's KL dataset).
    The reference point ``z = max(0, mean(kl_policy - kl_ref))`` carries no gradient and is
    taken over the whole (global) batch given, one microbatch under accumulation; ``valid_b``
    (bool ``[b]``, default all): the rows that count, the others (a batch's padding) left out of
    ``z`` (then ``kl_*`` are ``[b]``, row-aligned), the sums and the counts. With
    ``r = policy - ref``, a desirable example's loss is ``desirable_weight * (1 - sigma(beta (r -
    z)))``, an undesirable one's ``undesirable_weight * (1 - sigma(beta (z - r)))``.

    Metrics (scalars, summed so microbatches add up exactly; TRL's names): ``kl`` (z),
    ``rewards/chosen_sum``, ``rewards/rejected_sum`` (of ``beta r`` over desirable and
    undesirable examples), ``logps/chosen_sum``, ``logps/rejected_sum``, ``count/chosen``,
    ``count/rejected``. Raises ConfigError for a non-positive beta or weight."""
    for key, value in (("beta", beta), ("desirable_weight", desirable_weight),
                       ("undesirable_weight", undesirable_weight)):
        if not value > 0:
            raise ConfigError(f"objective.{key}={value}: must be positive")
    desirable = desirable_b.astype(jnp.bool_)
    if valid_b is None:
        kl_mean = jnp.mean(kl_policy - kl_ref)
        valid = jnp.ones_like(desirable)
    else:
        valid = valid_b.astype(jnp.bool_)
        kl_mean = jnp.sum(jnp.where(valid, kl_policy - kl_ref, 0.0)) / jnp.maximum(jnp.sum(valid), 1)
    z = jax.lax.stop_gradient(jnp.maximum(kl_mean, 0.0))
    ratio = policy_logps - ref_logps
    losses = jnp.where(desirable,
                       desirable_weight * (1 - jax.nn.sigmoid(beta * (ratio - z))),
                       undesirable_weight * (1 - jax.nn.sigmoid(beta * (z - ratio))))
    rewards, logps = jax.lax.stop_gradient((beta * ratio, policy_logps))
    zero = jnp.zeros_like(rewards)
    chosen, rejected = valid & desirable, valid & ~desirable
    metrics = {
        "kl": z,
        "rewards/chosen_sum": jnp.sum(jnp.where(chosen, rewards, zero)),
        "rewards/rejected_sum": jnp.sum(jnp.where(rejected, rewards, zero)),
        "logps/chosen_sum": jnp.sum(jnp.where(chosen, logps, zero)),
        "logps/rejected_sum": jnp.sum(jnp.where(rejected, logps, zero)),
        "count/chosen": jnp.sum(chosen).astype(rewards.dtype),
        "count/rejected": jnp.sum(rejected).astype(rewards.dtype),
    }
    return losses, metrics
