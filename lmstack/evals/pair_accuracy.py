"""Held-out preference accuracy: how often the model's reward ranks the chosen reply of a pair
above the rejected one, and by how much on average.

The rewards come from the objective's ``pair_rewards(model, batch) -> (r_chosen, r_rejected)``
(float ``[b]`` each; ``objective.reward_model``: the score head on each sequence), over the
held-out pair batches; padding rows (segment 0) are left out. A tie counts as wrong, as TRL
``RewardTrainer``'s logged ``accuracy`` (see :func:`lmstack.preference.reward.pair_accuracy`).
"""

from __future__ import annotations

import functools
from typing import Any, Iterator

import jax
import numpy as np
from flax import nnx

from lmstack import registry
from lmstack.evals.base import EvalContext
from lmstack.preference.reward import pair_accuracy as pair_hits
from lmstack.registry import register


@functools.partial(jax.jit, static_argnames=("graphdef", "objective"))
def _rewards(graphdef: Any, state: Any, batch: dict, objective: Any) -> tuple[jax.Array, jax.Array]:
    """The objective's ``pair_rewards``, compiled once per run (every evaluation reuses it)."""
    return objective.pair_rewards(nnx.merge(graphdef, state), batch)


def held_out_rewards(ctx: EvalContext) -> tuple[np.ndarray, np.ndarray]:
    """``(r_chosen, r_rejected)`` float32 ``[n]`` of every held-out pair, in order."""
    graphdef, state = nnx.split(ctx.model())
    chosen, rejected = [], []
    for batch in ctx.batches:
        real = np.asarray(batch["chosen_segment_ids"])[:, 0] > 0
        r_c, r_r = _rewards(graphdef, state, batch, ctx.objective)
        chosen.append(np.asarray(r_c)[real])
        rejected.append(np.asarray(r_r)[real])
    return np.concatenate(chosen), np.concatenate(rejected)


def _problems(cfg: Any) -> list[str]:
    objective = registry.lookup("objective", cfg.objective.name, "objective.name")
    if not hasattr(objective, "pair_rewards"):
        return [f"eval.pair_accuracy ranks the rewards of preference pairs, which objective.{cfg.objective.name} "
                f"gives none of: use --config.objective.name=reward_model or drop pair_accuracy from eval.names"]
    return []


@register("eval.pair_accuracy", config_problems=_problems)
def pair_accuracy(ctx: EvalContext) -> Iterator[tuple[str, float]]:
    """Yields ``accuracy`` (the fraction of held-out pairs with ``r_c > r_r``), ``margin`` (the
    mean of ``r_c - r_r``), ``rewards/chosen`` and ``rewards/rejected`` (their means) and
    ``pairs`` (how many pairs were scored)."""
    if not ctx.batches:
        return
    chosen, rejected = held_out_rewards(ctx)
    yield "accuracy", float(np.mean(np.asarray(pair_hits(chosen, rejected))))
    yield "margin", float(np.mean(chosen - rejected))
    yield "rewards/chosen", float(np.mean(chosen))
    yield "rewards/rejected", float(np.mean(rejected))
    yield "pairs", float(len(chosen))
