"""GRPO on the one trainer: the collected batch's teacher-forced log-probs equal the sampler's,
the loss's gradient is the group-relative policy gradient, a tiny model learns a reward from
scratch, a resumed run collects and trains exactly as the uninterrupted one (the resume at an
epoch boundary of the prompt iterator), and bad settings are one line each."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmstack.config import ConfigError, configure
from lmstack.configs.base import base_config
from lmstack.data.sources import DataError
from lmstack.metrics_log import read_metrics
from lmstack.objectives.rollout_data import completion_logps, sequences
from lmstack.rl.advantages import group_advantages
from lmstack.rollout import sample_rollouts
from lmstack.run import Run
from lmstack.train import train
from tests.objectives.rl_builders import rl_config


def grpo_config(tmp_path, **objective):
    return rl_config(tmp_path, "grpo", **{"num_generations": 4, **objective})


@pytest.fixture(scope="module")
def assembled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grpo")
    run, data = Run.for_training(grpo_config(tmp), tmp / "run")
    state = run.starting_state()
    batches = run.objective.train_batches(data)
    return run, data, state, batches


def test_trainer_log_probs_equal_the_samplers(assembled):
    """The collected rows (left-padded prompt + completion, positions from each row's first real
    token) give, teacher-forced, the log-probs the sampler reported (fp32, 1e-5)."""
    run, _, state, batches = assembled
    batch = next(batches)
    prompts = [row[len(row) - k:].tolist() for row, k in zip(batch["prompt_tokens"], batch["prompt_lengths"])]
    assert len({len(p) for p in prompts}) > 1  # prompts of different lengths: real left padding
    ro = sample_rollouts(run.graphdef, nnx.merge_state(state["params"], state["frozen"]), prompts, n=2,
                         max_new_tokens=6, max_prompt_len=8, rng=jax.random.key(1))
    model = run.model(state)
    logp = nnx.jit(lambda m, b: completion_logps(m, b, None))(model, sequences(ro))
    np.testing.assert_allclose(np.asarray(logp), np.asarray(ro.completion_logps), atol=1e-5)


def test_loss_gradient_is_the_group_relative_policy_gradient(assembled):
    """seq_mean_token_mean with one update per rollout: the gradient of the loss is
    -(1/R) sum_i A_i / n_i sum_t grad log pi(y_it), A the unbiased group-normalised rewards."""
    run, _, state, _ = assembled
    rng = np.random.default_rng(0)
    rows, p, n = 8, 8, 6
    tokens = jnp.asarray(rng.integers(0, 250, (rows, p + n)), jnp.int32)
    mask = np.ones((rows, n), np.int32)
    mask[::3, 4:] = 0  # completions of different lengths
    real = np.concatenate([np.arange(p)[None] >= rng.integers(1, 5, (rows, 1)), mask], 1).astype(np.int32)
    batch = {"tokens": tokens, "segment_ids": jnp.asarray(real), "completion_mask": jnp.asarray(mask),
             "positions": jnp.asarray(np.maximum(np.cumsum(real, 1) - 1, 0), jnp.int32),
             "advantages": group_advantages(jnp.asarray(rng.random(rows), jnp.float32), 4)}
    graphdef, params, frozen = run.graphdef, state["params"], state["frozen"]

    def loss(p_):
        num, aux = run.objective.loss_fn(nnx.merge(graphdef, p_, frozen), batch, None)
        return num / aux["weight"]

    def reference(p_):
        logp = completion_logps(nnx.merge(graphdef, p_, frozen), batch, None)
        per_row = jnp.sum(logp, 1) / jnp.sum(mask, 1)
        return -jnp.mean(batch["advantages"] * per_row)

    got, want = jax.grad(loss)(params), jax.grad(reference)(params)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-7)
    assert max(float(jnp.abs(w).max()) for w in jax.tree.leaves(want)) > 1e-4


def test_learns_a_reward_and_resumes_exactly(tmp_path):
    """From scratch, 6 steps of 4 prompts x 4 completions: the mean reward rises. The run killed
    right after its step-3 checkpoint (the end of the first epoch: 12 prompts / 4; the later
    checkpoint and metrics removed) and resumed collects the same completions (rewards) and
    takes the same steps (losses) as the uninterrupted run."""
    whole = train(grpo_config(tmp_path), tmp_path / "whole")
    assert whole["step"] == 6
    shutil.copytree(tmp_path / "whole", tmp_path / "killed")
    shutil.rmtree(tmp_path / "killed" / "checkpoints" / "6")
    metrics = tmp_path / "killed" / "metrics.jsonl"
    metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= 3))
    resumed = train(grpo_config(tmp_path), tmp_path / "killed")
    assert resumed["start_step"] == 3
    a, b = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "killed")
    assert [r["step"] for r in b] == list(range(1, 7))
    for key in ("train/reward", "train/loss", "train/completion_length"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    rewards = [r["train/reward"] for r in a]
    assert np.mean(rewards[3:]) > np.mean(rewards[:3]) + 0.05, rewards


def test_bad_settings_are_one_line(tmp_path):
    raw = base_config()
    raw.objective.name = "grpo"
    raw.data.source = "prompt_completion"
    with pytest.raises(ConfigError) as e:
        configure(raw, ["--config.objective.num_generations=1", "--config.objective.reward=nope"], "t", "t")
    msg = str(e.value)
    assert ("objective.num_generations=1: group-relative advantages need at least 2 completions per prompt: set "
            "--config.objective.num_generations=2 or more") in msg
    assert "objective.reward='nope' is not a registered reward: choose one of exact_match, " in msg
    cfg = grpo_config(tmp_path)
    cfg.objective.max_prompt_len = 3
    with pytest.raises(DataError, match=r"prompts.jsonl:2: the prompt has 4 tokens, more than the rollout budget "
                                        r"objective.max_prompt_len=3: raise it or shorten the prompt$"):
        Run.for_training(cfg, tmp_path / "long")
