"""A trained reward model as the rollout objectives' reward (objective.reward_model): the
re-alignment of rollout rows against numpy, each row's reward equal to the reward model's own
score of that row alone, a short PPO run whose logged rewards are the reward model's scores
of the completions it sampled, and the bad settings as one line each, before anything is
written."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmstack.config import ConfigError, configure
from lmstack.configs.base import base_config
from lmstack.distributed import global_batch
from lmstack.metrics_log import read_metrics
from lmstack.objectives.rollout_data import RolloutObjective, sequences
from lmstack.rl.reward_model import left_aligned
from lmstack.run import Run
from lmstack.sharding import make_mesh
from lmstack.train import train
from tests.objectives.rl_builders import reward_model_workdir, rl_config

STOP = ",".join("abcdefghijklmnopqrstuvwxyz0123456789")  # one-byte stop tokens: some completions end early


def _numpy_left_aligned(prompt, prompt_lengths, completion, mask, pad_id):
    rows, width = prompt.shape[0], prompt.shape[1] + completion.shape[1]
    tokens, segments = np.full((rows, width), pad_id, np.int32), np.zeros((rows, width), np.int32)
    for r in range(rows):
        seq = list(prompt[r, prompt.shape[1] - prompt_lengths[r]:]) + list(completion[r, mask[r]])
        tokens[r, :len(seq)] = seq
        segments[r, :len(seq)] = 1
    return tokens, segments


def test_left_aligned_equals_numpy():
    """Random left-padded prompts (a full one, a one-token one) and completions cut after a stop
    (a full one, a one-token one): each row is its real tokens from position 0, then pad_id."""
    rng = np.random.default_rng(0)
    rows, p, n, pad = 6, 7, 5, 3
    prompt_lengths = np.array([7, 1, 3, 5, 2, 4], np.int32)
    completion_lengths = np.array([5, 1, 2, 4, 5, 3])
    prompt = rng.integers(10, 50, (rows, p)).astype(np.int32)
    prompt[np.arange(p)[None, :] < (p - prompt_lengths)[:, None]] = pad
    mask = np.arange(n)[None, :] < completion_lengths[:, None]
    completion = np.where(mask, rng.integers(10, 50, (rows, n)), pad).astype(np.int32)
    got = jax.jit(left_aligned)(jnp.asarray(prompt), jnp.asarray(prompt_lengths), jnp.asarray(completion),
                                jnp.asarray(mask), jnp.int32(pad))
    want = _numpy_left_aligned(prompt, prompt_lengths, completion, mask, pad)
    for g, w in zip(got, want):
        assert g.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(g), w)


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    """A gpt2-style reward model (learned positions: a row's score depends on where it starts)
    and, restored through its own run, the model that scores pairs in objective.reward_model."""
    workdir = reward_model_workdir(tmp_path_factory.mktemp("rm"), style="gpt2")
    rm_run = Run.open(workdir, mesh=make_mesh({"data": 1, "fsdp": 1, "tensor": 1}))
    model = rm_run.model(rm_run.restore())
    scored = nnx.jit(lambda m, tokens, segments: rm_run.objective.pair_rewards(m, {
        "chosen_tokens": tokens, "chosen_segment_ids": segments, "rejected_tokens": tokens,
        "rejected_segment_ids": segments})[0])
    return workdir, model, lambda tokens, segments: scored(model, tokens, segments)


def alone_scores(pair_rewards, prompt, prompt_lengths, completion, mask, pad_id=0):
    """Each row's score by the reward-model objective's own scoring path, one row at a time,
    its prompt's real tokens and its completion from position 0 and right-padded, as that
    objective's batches hold a sequence."""
    width = prompt.shape[1] + completion.shape[1]
    out = []
    for r in range(len(prompt)):
        seq = list(prompt[r, prompt.shape[1] - prompt_lengths[r]:]) + list(completion[r, mask[r]])
        tokens = np.full((1, width), pad_id, np.int32)
        tokens[0, :len(seq)] = seq
        out.append(float(pair_rewards(tokens, (tokens * 0 + (np.arange(width) < len(seq))).astype(np.int32))[0]))
    return np.array(out)


def test_each_rows_reward_is_the_reward_models_score_of_the_row_alone(reward_model, tmp_path):
    """GRPO's collect (the shared sampling step) with objective.reward_model: 4 prompts x 2
    completions of different lengths, on a 2 x 2 (data x fsdp) mesh; each row's reward is the
    reward model's score of that row alone, unsharded (fp32, rtol 1e-5), less
    missing_eos_penalty (0.5) where the row did not stop; the metric reward_model_score is the
    mean score. Scoring the left-padded rows as they lie gives other numbers (the learned
    positions): the re-alignment is what makes them equal."""
    workdir, model, pair_rewards = reward_model
    cfg = rl_config(tmp_path, "grpo", num_generations=2, stop=STOP, reward="", reward_model=str(workdir),
                    missing_eos_penalty=0.5)
    cfg.mesh.update(data=2, fsdp=2)  # the reward model's weights split over fsdp, its rows over both axes
    run, data = Run.for_training(cfg, tmp_path / "run")
    state = run.starting_state()
    with jax.set_mesh(run.mesh):
        batch = global_batch(next(run.objective.train_batches(data)), run.batch_sharding)
        rollout, rewards, metrics = run.objective.sample(run, state, batch, jax.random.key(2))
    ro = {k: np.asarray(jax.device_get(getattr(rollout, k))) for k in
          ("prompt_tokens", "prompt_lengths", "completion_tokens", "completion_mask", "stopped")}
    assert len(set(ro["prompt_lengths"])) > 1 and len(set(ro["completion_mask"].sum(1))) > 1
    assert ro["stopped"].any() and not ro["stopped"].all()
    want = alone_scores(pair_rewards, ro["prompt_tokens"], ro["prompt_lengths"], ro["completion_tokens"],
                        ro["completion_mask"])
    assert want.std() > 1e-2  # the rows score apart: a real check
    np.testing.assert_allclose(rewards, want - 0.5 * ~ro["stopped"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["reward_model_score"], want.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["reward"], rewards.mean(), rtol=1e-6)
    rows = {k: np.asarray(jax.device_get(v)) for k, v in sequences(rollout).items()}
    as_they_lie = np.asarray(model.classify(rows["tokens"], rows["segment_ids"])[:, 0])
    assert np.abs(as_they_lie - want)[ro["prompt_lengths"] < cfg.objective.max_prompt_len].min() > 1e-3


def test_a_ppo_run_logs_the_reward_models_scores_of_its_completions(reward_model, tmp_path, monkeypatch):
    """3 PPO steps from scratch scored by the reward model, then eval.rollout_reward on 3
    held-out prompts: every scored row's reward is the reward model's score of that row alone,
    each step's logged train/reward and train/reward_model_score are the mean of its rows'
    scores, and the held-out reward the mean of the greedy completions' scores. The reward
    model adds nothing to the train state (no parameter, no optimizer state, nothing
    checkpointed)."""
    workdir, _, pair_rewards = reward_model
    scored = []

    def recording(self, run, rollout, answers):
        out = original(self, run, rollout, answers)
        scored.append((rollout, out[0]))
        return out

    original = RolloutObjective.rewards
    monkeypatch.setattr(RolloutObjective, "rewards", recording)
    cfg = rl_config(tmp_path, "ppo", num_generations=2, stop=STOP, kl_coef=0.0, reward="",
                    reward_model=str(workdir))
    cfg.train.steps = 3
    cfg.data.val_fraction = 0.25
    cfg.eval.names = ("rollout_reward",)
    summary = train(cfg, tmp_path / "ppo")
    assert summary["step"] == 3 and len(scored) == 4  # 3 collects, 1 held-out batch
    want = []
    for rollout, rewards in scored:
        ro = {k: np.asarray(jax.device_get(getattr(rollout, k))) for k in
              ("prompt_tokens", "prompt_lengths", "completion_tokens", "completion_mask")}
        want.append(alone_scores(pair_rewards, ro["prompt_tokens"], ro["prompt_lengths"], ro["completion_tokens"],
                                 ro["completion_mask"]))
        assert want[-1].std() > 1e-2
        np.testing.assert_allclose(rewards, want[-1], rtol=1e-5, atol=1e-6)
    logged = [r for r in read_metrics(tmp_path / "ppo") if "train/reward" in r]
    assert [r["step"] for r in logged] == [1, 2, 3]
    for w, r in zip(want, logged):
        np.testing.assert_allclose(r["train/reward"], w.mean(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(r["train/reward_model_score"], w.mean(), rtol=1e-5, atol=1e-6)
    # the held-out batch: 3 prompts and a repeat that fills the batch of 4
    np.testing.assert_allclose(summary["eval"]["rollout_reward/reward"], want[3][:3].mean(), rtol=1e-5, atol=1e-6)
    with_function, _ = Run.for_training(rl_config(tmp_path, "ppo", kl_coef=0.0), tmp_path / "function")
    assert paths(Run.open(tmp_path / "ppo").abstract) == paths(with_function.abstract)


def paths(tree) -> list[str]:
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


# --- bad settings --------------------------------------------------------------------------


def test_reward_and_reward_model_are_one_choice():
    raw = base_config()
    raw.objective.name = "ppo"
    raw.data.source = "prompt_completion"
    with pytest.raises(ConfigError) as e:
        configure(raw, ["--config.objective.reward=exact_match", "--config.objective.reward_model=runs/rm"], "t", "t")
    assert ("objective.reward='exact_match' and objective.reward_model='runs/rm' both give the reward: keep one "
            "(--config.objective.reward= scores with the reward model alone)") in str(e.value)
    with pytest.raises(ConfigError) as e:
        configure(raw, ["--config.objective.missing_eos_penalty=-1"], "t", "t")
    msg = str(e.value)
    assert ("objective.name=ppo needs a reward: set --config.objective.reward to one of exact_match, ") in msg
    assert " or --config.objective.reward_model=WORKDIR (an objective.reward_model run)" in msg
    assert "objective.missing_eos_penalty=-1.0: must be >= 0 (it is subtracted)" in msg


def test_a_reward_model_that_cannot_score_the_policys_rows_is_refused_before_anything_is_written(tmp_path):
    """Another tokenizer (a char-level reward model for a byte-level policy), a workdir without
    a checkpoint, a model without a score head, an adapters-only reward model, a GGUF file and
    a step without a checkpoint: one line each, and the policy's workdir is never created."""
    char = reward_model_workdir(tmp_path, "char", tokenizer="char")
    untrained = reward_model_workdir(tmp_path, "untrained", save=False)
    lora = reward_model_workdir(tmp_path, "lora", peft="lora", save=False)
    (lora / "checkpoints" / "1").mkdir(parents=True)  # a checkpoint's directory: the check reads the config
    headless = tmp_path / "policy"
    Run.for_training(rl_config(tmp_path, "ppo", reward="exact_match"), headless)
    (headless / "checkpoints" / "1").mkdir(parents=True)
    (tmp_path / "w.gguf").write_bytes(b"")
    cases = {
        char: f"objective.reward_model={str(char)!r} has another tokenizer than the policy "
              f"(data.tokenizer.kind=byte): char tokenizer char-",
        untrained: f"objective.reward_model={str(untrained)!r} holds no checkpoint: train it first "
                   f"(lmstack train reward_model --workdir {untrained})",
        headless: f"objective.reward_model={str(headless)!r}: its model has model.num_labels=0, not the one score "
                  f"of a reward model: give the workdir of an objective.reward_model run",
        lora: f"objective.reward_model={str(lora)!r} was trained with peft.name=lora, whose checkpoints hold the "
              f"adapters alone: give a reward model trained with every weight (peft.name=none)",
        tmp_path / "w.gguf": f"objective.reward_model={str(tmp_path / 'w.gguf')!r} is a gguf source: give the "
                             f"workdir of an objective.reward_model run (W or W@STEP)",
    }
    cases[f"{char}@7"] = (f"objective.reward_model: no checkpoint for step 7 in {char / 'checkpoints'} (have: 1): "
                          f"pass WORKDIR@STEP with one of those")
    for path, message in cases.items():
        with pytest.raises((ConfigError, FileNotFoundError)) as e:
            Run.for_training(rl_config(tmp_path, "ppo", reward="", reward_model=str(path)), tmp_path / "ppo")
        assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)
        assert not (tmp_path / "ppo").exists()
        if path == char:
            assert " against byte tokenizer byte-v1 with 0 reserved ids, 259 ids; rollouts are scored as token " \
                   "ids, never re-tokenised: train the reward model from the policy's lineage (its init.from)" \
                   in str(e.value), str(e.value)
