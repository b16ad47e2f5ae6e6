"""The held-out reward of an RL objective's policy: greedy completions of the held-out prompts
scored as the objective scores its rollouts (``objective.reward`` or ``objective.reward_model``,
less ``objective.missing_eos_penalty``). With a 0/1 reward such as ``exact_match`` or
``gsm8k_strict`` (and no penalty) the mean is the held-out accuracy."""

from __future__ import annotations

from typing import Any, Iterator

import jax
import numpy as np
from flax import nnx

from lmstack.registry import register
from lmstack.sharding import data_parallel_size


def _problems(cfg: Any) -> list[str]:
    if "reward" not in cfg.objective:
        return [f"eval.rollout_reward scores sampled completions with objective.reward, which "
                f"objective.{cfg.objective.name} has none of: use an RL objective (objective.name=grpo) or drop it "
                f"from eval.names"]
    return []


@register("eval.rollout_reward", config_problems=_problems)
def rollout_reward(ctx: Any) -> Iterator[tuple[str, float]]:
    """Yields ``reward`` (the mean over the held-out prompts, at most ``eval.batches`` batches of
    ``eval.batch_size``; 0: all), ``completion_length`` (tokens) and ``stopped`` (the fraction
    that ended with a stop token)."""
    objective, cfg = ctx.objective, ctx.cfg
    prompts, answers = objective.prompts.get("val"), objective.answers.get("val")
    if prompts is None or not len(prompts):
        return
    run = ctx.run
    size = cfg.eval.batch_size or cfg.train.batch_size
    size = -(-size // data_parallel_size(run.mesh)) * data_parallel_size(run.mesh)
    n = len(prompts) if not cfg.eval.batches else min(len(prompts), cfg.eval.batches * size)
    _, state = nnx.split(ctx.model())
    rewards, lengths, stopped = [], [], []
    for first in range(0, n, size):
        index = np.arange(first, first + size) % n  # the last batch filled with repeats, dropped below
        rows = prompts.rows(index)
        rollout = objective.rollouts(run, {"params": state, "frozen": nnx.State({})}, rows["prompt_tokens"],
                                     rows["prompt_lengths"], jax.random.key(0), n=1, temperature=0.0)
        keep = min(size, n - first)
        rewards += objective.rewards(run, rollout, [answers[i] for i in index])[0][:keep].tolist()
        lengths += np.asarray(jax.device_get(rollout.completion_lengths))[:keep].tolist()
        stopped += np.asarray(jax.device_get(rollout.stopped))[:keep].tolist()
    yield "reward", float(np.mean(rewards))
    yield "completion_length", float(np.mean(lengths))
    yield "stopped", float(np.mean(stopped))
