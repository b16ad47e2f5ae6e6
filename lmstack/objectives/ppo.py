"""PPO for language models (Ziegler et al. 2019; Ouyang et al. 2022), with rollouts inside the trainer.

Prompts with their reference answers as :mod:`lmstack.objectives.rollout_data` reads them.
The reward of a completion is a registered reward function ``objective.reward``
(:mod:`lmstack.rl.rewards`) or, as TRL's ``PPOTrainer`` takes its ``reward_model``, a trained
reward model, ``objective.reward_model`` = the workdir of an ``objective.reward_model`` run
(``W`` or ``W@STEP``; :mod:`lmstack.rl.reward_model`): the prompt and completion token ids,
moved to start at position 0, scored by its one-output head on the last real token (the
stop token, or the ``max_new_tokens``-th), frozen, outside the train state, with the
policy's tokenizer (another is refused before anything is written). Exactly one of the two
is set; ``missing_eos_penalty`` (TRL's) is subtracted from the reward of a completion that
ran to ``max_new_tokens`` without a stop token.
The critic is a value head on the policy's own trunk (shared trunk, as TRL's
``AutoModelForCausalLMWithValueHead``): ``value_head``, a Projection d_model -> 1 (with a
bias, as TRL's ``ValueHead``; weight drawn from N(0, 1/(d_model + 1)^2), OpenRLHF's
``init_value_head``) reading the final hidden state before each completion token, added by
:meth:`PPO.attach` and always trainable (its parameters are :class:`ValueHeadParam`, the
objective's ``trainable_types``), also in PEFT runs that train only adapters. A separate
critic model is not offered.

Each training step (``train.batch_size`` prompts):

1. the collect phase (:meth:`PPO.collect`) samples ``objective.num_generations`` completions
   of every prompt with the current policy, scores each (the reward function or model), and runs
   one compiled teacher-forced pass for the old log-probs and old values (and the reference
   policy's log-probs, :mod:`lmstack.objectives.reference`). The per-token reward is
   ``-kl_coef * KL_t`` (``kl_estimator``, k1 as TRL PPOTrainer) plus the score on the
   completion's last token (:func:`lmstack.rl.kl_penalty.kl_penalised_rewards`); GAE
   (``gamma``, ``lam``; :func:`lmstack.rl.gae.gae`) gives advantages and returns, and the
   advantages are whitened over the batch's completion tokens (``whiten_advantages``,
   :func:`lmstack.rl.advantages.whiten`, TRL's ``masked_whiten``);
2. the unchanged pure train step minimises the clipped surrogate (``epsilon_low`` /
   ``epsilon_high``) plus ``vf_coef`` times the clipped value loss (``cliprange_value``, 0:
   unclipped; :mod:`lmstack.rl.value_loss`), both aggregated as ``loss_aggregation``
   (``token_mean`` as TRL PPOTrainer's ``masked_mean``; :mod:`lmstack.rl.aggregation`).

The KL coefficient is fixed (``kl_target`` 0) or adaptive (``kl_target`` > 0: Ziegler et
al.'s controller over ``kl_horizon`` samples, updated after each collect with the batch's
mean per-completion KL and its number of completions, :mod:`lmstack.rl.kl_penalty`). The
adaptive value is state: it is saved with the prompt iterator's position in every
checkpoint's data item (:class:`WithKLCoefficient`), so a resumed run continues with exactly
the coefficient the uninterrupted one had (also for PEFT runs, whose checkpoints hold only
the adapters and the value head).

One update per rollout batch (no PPO epochs or minibatches over a rollout): the old policy and
the old values are the current ones, so the ratio is 1 (up to float rounding between the two
compiled programs) and neither clip is active; they matter once an update reuses rollouts.
Rollouts draw their randomness from ``(train.seed, step)`` and the prompts come from the
checkpointed iterator, so a resumed run collects exactly what the uninterrupted one did.

Collected batches (``B * num_generations`` rows): the rows of
:func:`lmstack.objectives.rollout_data.sequences`, ``scores`` (rows,) (the rewards)
and, float32 (rows, N) each,
``old_logps``, ``old_values``, ``rewards`` (per token, KL-penalised), ``advantages``
(whitened GAE) and ``returns`` (GAE advantages plus old values, before whitening).
"""

from __future__ import annotations

import time
from typing import Any, Iterator, Mapping

import grain
import jax
import jax.numpy as jnp
from flax import nnx

from lmstack.distributed import global_batch
from lmstack.models.projection import Projection
from lmstack.objectives.rollout_data import (ROLLOUT_DEFAULTS, RolloutObjective, completion_hidden, completion_logps,
                                             sequences)
from lmstack.registry import register
from lmstack.rl.advantages import whiten
from lmstack.rl.aggregation import LOSS_AGGREGATIONS, aggregate
from lmstack.rl.gae import gae
from lmstack.rl.kl import KL_ESTIMATORS, kl_estimate
from lmstack.rl.kl_penalty import AdaptiveKLController, FixedKLController, kl_penalised_rewards
from lmstack.rl.policy_loss import clipped_surrogate_loss, clipped_tokens
from lmstack.rl.value_loss import clipped_value_loss
from lmstack.sharding import replicated


class ValueHeadParam(nnx.Param):
    """A parameter of PPO's value head: always in the trainable set (``PPO.trainable_types``)."""


def value_head(d_model: int, dtype: str, seed: int) -> Projection:
    """The value head d_model -> 1 with a bias (module docstring), its parameters :class:`ValueHeadParam`."""
    head = Projection((d_model,), (1,), ("embed", "value"), std=1.0 / (d_model + 1), dtype=dtype, bias=True,
                      rngs=nnx.Rngs(params=jax.random.fold_in(jax.random.key(seed), _VALUE_HEAD_STREAM)))
    head.weight = ValueHeadParam(head.weight.get_value(), out_sharding=("embed", "value"))
    head.bias = ValueHeadParam(head.bias.get_value(), out_sharding=("value",))
    return head


def policy_and_values(model: Any, batch: dict[str, jax.Array], rng: jax.Array | None, *,
                      chunk: int = 0) -> tuple[jax.Array, jax.Array]:
    """float32 (rows, N) each: the completion tokens' log-probs and the value head's estimate
    before each token (0 where masked), from one teacher-forced pass of the shared trunk
    (``chunk``: as :func:`lmstack.objectives.rollout_data.completion_logps`)."""
    hidden = completion_hidden(model, batch, rng)
    values = model.value_head(hidden, out_dtype=jnp.float32)[..., 0]
    return completion_logps(model, batch, rng, hidden, chunk=chunk), values * batch["completion_mask"]


class WithKLCoefficient(grain.DatasetIterator):
    """The prompt iterator, with the PPO objective's current KL coefficient in its state: the
    checkpoint's data item then restores both (module docstring)."""

    def __init__(self, prompts: grain.DatasetIterator, objective: "PPO"):
        super().__init__(prompts)
        self.objective = objective

    def __next__(self) -> dict:
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return {"prompts": self._parent.get_state(), "kl_coef": self.objective.kl_coef}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["prompts"])
        self.objective.kl_coef = float(state["kl_coef"])


@register("objective.ppo")
class PPO(RolloutObjective):
    """Proximal Policy Optimisation with a value head and a KL-penalised reward (module docstring)."""

    trainable_types = (ValueHeadParam,)
    config_defaults = dict(
        ROLLOUT_DEFAULTS,
        num_generations=1,  # completions sampled per prompt
        gamma=1.0,  # GAE discount (TRL PPOConfig)
        lam=0.95,  # GAE lambda (TRL PPOConfig)
        whiten_advantages=True,
        kl_coef=0.05,  # the KL penalty's coefficient, or the adaptive one's start (TRL PPOConfig 0.05)
        kl_estimator="k1",  # k1 (TRL PPOTrainer, OpenRLHF) | k2 | k3
        kl_target=0.0,  # 0: fixed kl_coef; > 0: Ziegler et al.'s adaptive coefficient towards this KL (nats, e.g. 6)
        kl_horizon=10000.0,  # the adaptive controller's horizon in completions
        epsilon_low=0.2,  # the policy clip range (TRL cliprange)
        epsilon_high=0.2,
        cliprange_value=0.2,  # the value clip range (TRL); 0: unclipped
        vf_coef=0.1,  # TRL PPOConfig
        loss_aggregation="token_mean",  # TRL PPOTrainer's masked_mean | seq_mean_token_mean | fixed_denominator
    )
    config_choices = {"loss_aggregation": LOSS_AGGREGATIONS, "kl_estimator": KL_ESTIMATORS}

    def __init__(self, cfg: Any, special_ids: Mapping[str, int] | None = None):
        super().__init__(cfg, special_ids)
        o = cfg.objective
        self.kl_coef = float(o.kl_coef)  # the coefficient of the next collect (host state, checkpointed)
        self.controller = AdaptiveKLController(o.kl_target, o.kl_horizon) if o.kl_target > 0 else FixedKLController()
        self._prepare = None

    @property
    def uses_reference(self) -> bool:
        return self.cfg.objective.kl_coef > 0

    @classmethod
    def config_problems(cls, cfg: Any) -> list[str]:
        """Settings this objective cannot train with, found at load time."""
        o, out = cfg.objective, RolloutObjective.config_problems(cfg)
        if o.num_generations < 1:
            out.append(f"objective.num_generations={o.num_generations}: must be at least 1")
        for key in ("gamma", "lam"):
            if not 0 <= o[key] <= 1:
                out.append(f"objective.{key}={o[key]}: must be in [0, 1]")
        for key in ("kl_coef", "kl_target", "vf_coef", "cliprange_value"):
            if o[key] < 0:
                out.append(f"objective.{key}={o[key]}: must be at least 0")
        if o.kl_target > 0 and o.kl_coef <= 0:
            out.append(f"objective.kl_target={o.kl_target} adapts objective.kl_coef by factors, so it stays 0: "
                       f"set --config.objective.kl_coef > 0 (its starting value, e.g. 0.2) or kl_target=0")
        if o.kl_target > 0 and o.kl_horizon <= 0:
            out.append(f"objective.kl_horizon={o.kl_horizon}: the adaptive coefficient's horizon must be > 0")
        return out

    def train_batches(self, data: Any) -> Iterator[dict]:
        """The prompt batches; their iterator's state also holds the KL coefficient."""
        return WithKLCoefficient(super().train_batches(data), self)

    # --- the model ---------------------------------------------------------------------

    def attach(self, model: Any, trainable: Any) -> None:
        """The reference policy's copy (when ``kl_coef`` > 0, of the policy's trainable set) and the value head."""
        if self.uses_reference:
            self.reference.attach(model, trainable)
        model.value_head = value_head(model.cfg.d_model, model.cfg.dtype, self.cfg.train.seed)

    def start(self, run: Any, state: dict) -> dict:
        return self.reference.start(run, state) if self.uses_reference else state

    # --- the collect phase -------------------------------------------------------------

    def collect(self, run: Any, state: dict, batch: dict, rng: jax.Array) -> tuple[dict, dict[str, float]]:
        """Rollouts, rewards, old log-probs and values, GAE advantages and returns for a batch of
        prompts, then the adaptive KL coefficient's update (module docstring). Metrics: the
        sampling step's (:meth:`RolloutObjective.sample`), ``kl_coef``, :meth:`prepare`'s
        statistics and ``prepare_s`` (seconds of its teacher-forced pass)."""
        rollout, scores, sampled = self.sample(run, state, batch, rng)
        rows = global_batch({**sequences(rollout), "scores": scores}, run.batch_sharding)
        if self._prepare is None:
            self._prepare = jax.jit(lambda p, f, b, c: self.prepare(nnx.merge(run.graphdef, p, f), b, c),
                                    out_shardings=(run.batch_sharding, replicated(run.mesh)))
        kl_coef = self.kl_coef
        start = time.perf_counter()
        collected, stats = self._prepare(state["params"], state["frozen"], rows, jnp.float32(kl_coef))
        stats = {k: float(v) for k, v in jax.device_get(stats).items()}
        self.kl_coef = float(self.controller.update(kl_coef, stats["kl"], len(scores)))
        return collected, {**sampled, "kl_coef": kl_coef, **stats, "prepare_s": time.perf_counter() - start}

    def prepare(self, model: Any, rows: dict[str, jax.Array], kl_coef: jax.Array) -> tuple[dict, dict]:
        """The collected batch from the rollout ``rows`` (with their ``scores`` (rows,)) and the
        statistics ``kl`` (the mean per-completion KL to the reference), ``value`` and
        ``return`` (token means); runs compiled, inside :meth:`collect`."""
        o = self.cfg.objective
        scores, mask = rows["scores"], rows["completion_mask"]
        old_logps, old_values = policy_and_values(model, rows, None, chunk=o.loss_chunk)
        kl = jnp.zeros_like(old_logps)
        if self.uses_reference:
            ref_logps = completion_logps(self.reference.model(model), rows, None, chunk=o.loss_chunk)
            kl = kl_estimate(old_logps, ref_logps, o.kl_estimator) * mask
        rewards = kl_penalised_rewards(scores, kl, mask, kl_coef)
        advantages, returns = gae(rewards, old_values, mask, gamma=o.gamma, lam=o.lam)
        if o.whiten_advantages:
            advantages = whiten(advantages, mask)
        tokens = jnp.maximum(mask.sum(), 1)
        stats = {"kl": kl.sum(axis=1).mean(), "value": old_values.sum() / tokens, "return": returns.sum() / tokens}
        collected = {**rows, "old_logps": old_logps, "old_values": old_values, "rewards": rewards,
                     "advantages": advantages, "returns": returns}
        return collected, stats

    # --- the loss ----------------------------------------------------------------------

    def loss_fn(self, model: Any, batch: dict[str, jax.Array], rng: jax.Array | None):
        o = self.cfg.objective
        mask = batch["completion_mask"]
        logp, values = policy_and_values(model, batch, rng, chunk=o.loss_chunk)
        clip = dict(epsilon_low=o.epsilon_low, epsilon_high=o.epsilon_high)

        def mean(per_token: jax.Array) -> tuple[jax.Array, jax.Array]:
            return aggregate(per_token, mask, o.loss_aggregation, max_tokens=o.max_new_tokens)

        policy, weight = mean(clipped_surrogate_loss(logp, batch["old_logps"], batch["advantages"], **clip))
        value, _ = mean(clipped_value_loss(values, batch["old_values"], batch["returns"],
                                           clip_range=o.cliprange_value or None))
        clipped, _ = mean(clipped_tokens(logp, batch["old_logps"], batch["advantages"], **clip))
        aux = {"weight": weight, "policy_loss": policy, "value_loss": value, "clip_fraction": clipped}
        return policy + o.vf_coef * value, aux


_VALUE_HEAD_STREAM = 0x76616C75  # the value head's initialisation stream, apart from the model's (train.seed)
