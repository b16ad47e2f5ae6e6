"""PPO on the one trainer: the collected per-token rewards, GAE advantages and returns equal a
plain-python reference, the value loss's gradient reaches the value head and the shared trunk
(and the head is trainable in an adapters-only run), a tiny model learns a reward from
scratch and a resumed run (at an epoch boundary) collects and trains exactly as the
uninterrupted one, adaptive KL coefficient included, and bad settings are one line each."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmstack.checkpoint import Checkpointer
from lmstack.config import ConfigError, configure
from lmstack.configs.base import base_config
from lmstack.distributed import global_batch
from lmstack.metrics_log import read_metrics
from lmstack.objectives.rollout_data import completion_hidden, completion_logps
from lmstack.run import Run
from lmstack.train import train
from tests.objectives.rl_builders import rl_config

STOP = ",".join("abcdefghijklmnopqrstuvwxyz0123456789")  # one-byte stop tokens: some completions end early


def ppo_config(tmp_path, **objective):
    return rl_config(tmp_path, "ppo", **objective)


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    """One collect of 4 prompts x 2 completions by a policy moved away from its reference."""
    tmp = tmp_path_factory.mktemp("ppo")
    cfg = ppo_config(tmp, num_generations=2, gamma=0.9, lam=0.8, kl_coef=0.1, stop=STOP)
    run, data = Run.for_training(cfg, tmp / "run")
    start = run.starting_state()
    leaves, treedef = jax.tree.flatten(start["params"])
    keys = jax.random.split(jax.random.key(3), len(leaves))
    moved = [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    state = {**start, "params": jax.tree.unflatten(treedef, moved)}
    with jax.set_mesh(run.mesh):
        batch = global_batch(next(run.objective.train_batches(data)), run.batch_sharding)
        out, metrics = run.collect(state, batch, 0)
    return run, start, state, {k: np.asarray(v) for k, v in out.items()}, metrics


def test_collected_rewards_gae_and_returns_equal_a_python_reference(collected):
    """Per-token reward -kl_coef * (logp - ref_logp) plus the score on the last token; GAE
    (gamma 0.9, lambda 0.8) by the textbook loop over each completion; returns = GAE + values;
    advantages whitened with the Bessel-corrected variance over every completion token."""
    run, start, _, b, metrics = collected
    o = run.cfg.objective
    mask = b["completion_mask"]
    lengths = mask.sum(1)
    assert lengths.min() < mask.shape[1] and all(mask[i, :n].all() for i, n in enumerate(lengths))
    rows = {k: jnp.asarray(b[k]) for k in ("tokens", "positions", "segment_ids", "completion_mask")}
    ref_model = nnx.merge(run.graphdef, start["params"], start["frozen"])
    ref = np.asarray(nnx.jit(lambda m, x: completion_logps(m, x, None))(ref_model, rows))
    raw = np.zeros(mask.shape)
    kls = []
    for i, n in enumerate(lengths):
        kl = b["old_logps"][i, :n] - ref[i, :n]
        kls.append(kl.sum())
        rewards = -o.kl_coef * kl
        rewards[-1] += b["scores"][i]
        np.testing.assert_allclose(b["rewards"][i, :n], rewards, rtol=1e-4, atol=1e-6)
        values, last = b["old_values"][i, :n], 0.0
        for t in reversed(range(n)):
            next_value = values[t + 1] if t + 1 < n else 0.0
            last = b["rewards"][i, t] + o.gamma * next_value - values[t] + o.gamma * o.lam * last
            raw[i, t] = last
    assert abs(np.mean(kls)) > 1e-3  # the policy differs from the reference
    np.testing.assert_allclose(metrics["kl"], np.mean(kls), rtol=1e-4)
    np.testing.assert_allclose(b["returns"], (raw + b["old_values"]) * mask, rtol=1e-5, atol=1e-6)
    m = mask.astype(bool)
    whitened = (raw[m] - raw[m].mean()) / np.sqrt(raw[m].var(ddof=1) + 1e-8)
    np.testing.assert_allclose(b["advantages"][m], whitened, rtol=1e-4, atol=1e-5)
    assert not b["advantages"][~m].any() and not b["rewards"][~m].any()


def test_value_loss_gradient_reaches_the_value_head_and_the_trunk(collected):
    """At the rollout's values (the clip inactive) the token-mean value loss 0.5 (V - R)^2 has
    gradient mean_t (V - R) for the head's bias and mean_t (V - R) h_t for its weight; it
    reaches the shared trunk and not the LM head."""
    run, _, state, b, _ = collected
    batch = {k: jnp.asarray(v) for k, v in b.items()}
    graphdef, frozen = run.graphdef, state["frozen"]

    @jax.jit
    def grads(params):
        def value_loss(p):
            _, aux = run.objective.loss_fn(nnx.merge(graphdef, p, frozen), batch, None)
            return aux["value_loss"] / aux["weight"]

        return jax.grad(value_loss)(params), completion_hidden(nnx.merge(graphdef, params, frozen), batch, None)

    g, hidden = grads(state["params"])
    g = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(g)}
    mask = b["completion_mask"]
    error = (b["old_values"] - b["returns"]) * mask / mask.sum()
    np.testing.assert_allclose(g["value_head.bias"], [error.sum()], rtol=1e-4)
    np.testing.assert_allclose(g["value_head.weight"][:, 0], np.einsum("btd,bt->d", np.asarray(hidden), error),
                               rtol=1e-4, atol=1e-7)
    for trunk in ("embed", "blocks.attn.q.weight", "blocks.mlp.down.weight"):
        assert np.abs(g[trunk]).max() > 1e-6, trunk
    if "lm_head" in g:
        assert not g["lm_head"].any()


def test_value_head_is_trainable_in_an_adapters_only_run(tmp_path):
    """LoRA trains its adapters and the value head; a train.trainable pattern keeps it too."""
    cfg = ppo_config(tmp_path)
    cfg.peft.name = "lora"
    run, _ = Run.for_training(cfg, tmp_path / "lora")
    paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(run.abstract["params"])}
    assert {"value_head.weight", "value_head.bias"} <= paths
    assert all(p.startswith("value_head.") or ".lora_" in p for p in paths), paths
    cfg = ppo_config(tmp_path, kl_coef=0.0)
    cfg.train.trainable = "embed"
    run, _ = Run.for_training(cfg, tmp_path / "embed")
    paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(run.abstract["params"])}
    assert paths == {"embed", "value_head.weight", "value_head.bias"}


def test_learns_a_reward_and_resumes_exactly_with_the_adaptive_kl_coefficient(tmp_path):
    """From scratch, 6 steps of 4 prompts x 4 completions with an adaptive KL coefficient: the
    mean reward rises. The run killed right after its step-3 checkpoint (the end of the first
    epoch; the later checkpoint and metrics removed) and resumed collects the same completions
    (rewards), uses the same KL coefficients and takes the same steps (losses)."""
    cfg = lambda: ppo_config(tmp_path, num_generations=4, kl_coef=0.05, kl_target=0.5, kl_horizon=40.0)  # noqa: E731
    whole = train(cfg(), tmp_path / "whole")
    assert whole["step"] == 6
    shutil.copytree(tmp_path / "whole", tmp_path / "killed")
    shutil.rmtree(tmp_path / "killed" / "checkpoints" / "6")
    metrics = tmp_path / "killed" / "metrics.jsonl"
    metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= 3))
    resumed = train(cfg(), tmp_path / "killed")
    assert resumed["start_step"] == 3
    a, b = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "killed")
    assert [r["step"] for r in b] == list(range(1, 7))
    for key in ("train/reward", "train/kl_coef", "train/kl", "train/loss", "train/value_loss", "train/policy_loss"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    coefs = [r["train/kl_coef"] for r in a]
    assert coefs[0] == 0.05 and len(set(coefs)) == 6, coefs  # adapted every step
    rewards = [r["train/reward"] for r in a]
    assert np.mean(rewards[3:]) > np.mean(rewards[:3]) + 0.05, rewards


@pytest.mark.interop
def test_the_export_is_the_policy_without_the_value_head(tmp_path):
    """`lmstack export --format hf` of a PPO run writes the decoder's tensors, not value_head."""
    pytest.importorskip("safetensors")
    from lmstack.interop.hf import read_safetensors
    from lmstack.interop.workdirs import export_workdir

    run, _ = Run.for_training(ppo_config(tmp_path, kl_coef=0.0), tmp_path / "run")
    ckpt = Checkpointer(tmp_path / "run", async_save=False)
    ckpt.save(1, run.starting_state(), None, run.cfg.to_dict())
    ckpt.close()
    names = set(read_safetensors(export_workdir(tmp_path / "run", "hf", tmp_path / "hf")))
    assert "model.embed_tokens.weight" in names and not any("value" in n for n in names), names


def test_bad_settings_are_one_line():
    raw = base_config()
    raw.objective.name = "ppo"
    raw.data.source = "prompt_completion"
    with pytest.raises(ConfigError) as e:
        configure(raw, ["--config.objective.kl_target=6", "--config.objective.kl_coef=0", "--config.objective.lam=1.5",
                        "--config.objective.reward=nope"], "t", "t")
    msg = str(e.value)
    assert ("objective.kl_target=6.0 adapts objective.kl_coef by factors, so it stays 0: set "
            "--config.objective.kl_coef > 0 (its starting value, e.g. 0.2) or kl_target=0") in msg
    assert "objective.lam=1.5: must be in [0, 1]" in msg
    assert "objective.reward='nope' is not a registered reward: choose one of exact_match, " in msg
