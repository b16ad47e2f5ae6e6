"""GRPO (Shao et al. 2024, DeepSeekMath) and its relatives, with rollouts inside the trainer.

Prompts with their reference answers as :mod:`lmstack.objectives.rollout_data` reads them
(a prompt longer than ``objective.max_prompt_len`` tokens is a DataError naming the record).

Each training step (``train.batch_size`` prompts):

1. the collect phase (:meth:`GRPO.collect`, run by :meth:`lmstack.run.Run.collect`) samples
   ``objective.num_generations`` (G) completions of every prompt with the current policy
   (:func:`lmstack.rollout.sample_rollouts`: one prefill per prompt, ``max_new_tokens``,
   ``temperature`` / ``top_k`` / ``top_p``, ending at the tokenizer's eos or a token of
   ``objective.stop``), scores each with the registered reward ``objective.reward``
   (:mod:`lmstack.rl.rewards`) against the record's answer, or with a trained reward model
   ``objective.reward_model`` (:mod:`lmstack.rl.reward_model`), and turns the rewards into
   group-relative advantages (``objective.advantage_std``: ``unbiased`` as DeepSeekMath and
   TRL, ``population``, or ``none`` as Dr. GRPO; ``advantage_eps``);
2. the unchanged pure train step minimises the clipped surrogate (``epsilon_low`` /
   ``epsilon_high``, DAPO's clip-higher when they differ) plus ``beta`` times the per-token KL
   estimate ``kl_estimator`` (k1, k2, k3) to the reference policy
   (:mod:`lmstack.objectives.reference`), aggregated as ``loss_aggregation``
   (``seq_mean_token_mean`` as the GRPO paper, ``token_mean`` as DAPO, ``fixed_denominator``
   as Dr. GRPO with ``max_new_tokens`` as the constant; :mod:`lmstack.rl.aggregation`).

One update per rollout batch (TRL's ``num_iterations=1``): the old policy is the current one,
so the ratio is 1 in value and its gradient is the policy gradient; the clip matters once an
update reuses rollouts. Rollouts draw their randomness from ``(train.seed, step)`` and the
prompts come from the checkpointed iterator, so a resumed run collects exactly what the
uninterrupted one did.

Collected batches (``B * G`` rows, row ``r`` = sample ``r % G`` of prompt ``r // G``): the rows
of :func:`lmstack.objectives.rollout_data.sequences` and ``advantages`` (rows,).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lmstack.distributed import global_batch
from lmstack.objectives.rollout_data import ROLLOUT_DEFAULTS, RolloutObjective, completion_logps, sequences
from lmstack.registry import register
from lmstack.rl.advantages import ADVANTAGE_STDS, group_advantages
from lmstack.rl.aggregation import LOSS_AGGREGATIONS, aggregate
from lmstack.rl.kl import KL_ESTIMATORS, kl_estimate
from lmstack.rl.policy_loss import clipped_surrogate_loss, clipped_tokens


@register("objective.grpo")
class GRPO(RolloutObjective):
    """Group Relative Policy Optimisation on prompts with checkable answers (module docstring)."""

    config_defaults = dict(
        ROLLOUT_DEFAULTS,
        num_generations=4,  # G: completions sampled per prompt
        advantage_std="unbiased",  # unbiased (DeepSeekMath, TRL) | population | none (Dr. GRPO)
        advantage_eps=1e-4,  # TRL's; verl uses 1e-6
        loss_aggregation="seq_mean_token_mean",  # GRPO paper | token_mean (DAPO) | fixed_denominator (Dr. GRPO)
        epsilon_low=0.2,
        epsilon_high=0.2,  # DAPO's clip-higher: 0.28
        beta=0.0,  # KL coefficient to the reference policy (TRL's default 0.0; DeepSeekMath 0.04)
        kl_estimator="k3",  # k1 | k2 | k3 (Schulman's estimators; GRPO uses k3)
    )
    config_choices = {"advantage_std": ADVANTAGE_STDS, "loss_aggregation": LOSS_AGGREGATIONS,
                      "kl_estimator": KL_ESTIMATORS}

    @classmethod
    def config_problems(cls, cfg: Any) -> list[str]:
        """Settings this objective cannot train with, found at load time."""
        o, out = cfg.objective, RolloutObjective.config_problems(cfg)
        if o.num_generations < 2:
            out.append(f"objective.num_generations={o.num_generations}: group-relative advantages need at least 2 "
                       f"completions per prompt: set --config.objective.num_generations=2 or more")
        return out

    # --- the collect phase ---------------------------------------------------------

    def collect(self, run: Any, state: dict, batch: dict, rng: jax.Array) -> tuple[dict, dict[str, float]]:
        """Rollouts, rewards and advantages for a batch of prompts (module docstring)."""
        o = self.cfg.objective
        rollout, rewards, metrics = self.sample(run, state, batch, rng)
        advantages = group_advantages(jnp.asarray(rewards), o.num_generations, std=o.advantage_std,
                                      eps=o.advantage_eps)
        collected = {**sequences(rollout), "advantages": advantages}
        return global_batch(collected, run.batch_sharding), metrics

    # --- the loss ------------------------------------------------------------------

    def loss_fn(self, model: Any, batch: dict[str, jax.Array], rng: jax.Array | None):
        o = self.cfg.objective
        mask = batch["completion_mask"]
        logp = completion_logps(model, batch, rng, chunk=o.loss_chunk)
        per_token = clipped_surrogate_loss(logp, jax.lax.stop_gradient(logp), batch["advantages"],
                                           epsilon_low=o.epsilon_low, epsilon_high=o.epsilon_high)
        num, weight = aggregate(per_token, mask, o.loss_aggregation, max_tokens=o.max_new_tokens)
        clipped, _ = aggregate(clipped_tokens(logp, jax.lax.stop_gradient(logp), batch["advantages"],
                                              epsilon_low=o.epsilon_low, epsilon_high=o.epsilon_high),
                               mask, o.loss_aggregation, max_tokens=o.max_new_tokens)
        aux = {"weight": weight, "clip_fraction": clipped}
        if o.beta:
            ref_logp = completion_logps(self.reference.model(model), batch, None, chunk=o.loss_chunk)
            kl, _ = aggregate(kl_estimate(logp, ref_logp, o.kl_estimator), mask, o.loss_aggregation,
                              max_tokens=o.max_new_tokens)
            num = num + o.beta * kl
            aux["kl"] = kl
        aux["policy_loss"] = num
        return num, aux

    def attach(self, model: Any, trainable: Any) -> None:
        if self.cfg.objective.beta:
            self.reference.attach(model, trainable)

    def start(self, run: Any, state: dict) -> dict:
        return self.reference.start(run, state) if self.cfg.objective.beta else state

