"""Shared builders for the RL objective tests (objective.grpo, objective.ppo): a learnable test
reward, a file of short prompts, a tiny from-scratch byte-model config that trains on them,
and a tiny reward model's workdir."""

from __future__ import annotations

import json

from lmstack.checkpoint import Checkpointer
from lmstack.config import compose
from lmstack.configs.base import base_config
from lmstack.registry import register
from lmstack.run import Run
from tests.helpers import tiny_config


@register("reward.test_ascii")
def ascii_share(completion: str, answer: str) -> float:
    """The fraction of the completion's characters that are ASCII: about half of a random byte
    model's, so rewards differ from the start and the policy can learn to raise it."""
    del answer
    return sum(ch < "\x80" for ch in completion) / max(len(completion), 1)


def prompts_file(tmp_path, n=12):
    """``n`` prompt/completion records of 3-6 byte-tokens prompts (different lengths: real left padding)."""
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{'x' * (i % 4)}{i}:", "completion": "aaaa"}) + "\n" for i in range(n)))
    return path


def rl_config(tmp_path, name, **objective):
    """A 6-step run of ``objective.name=name`` on 12 prompts in batches of 4 (an epoch every 3
    steps), a checkpoint every 3, rollouts of 6 new tokens with the ``test_ascii`` reward."""
    c = tiny_config(steps=6, batch_size=4)
    c.model.update(vocab_size=0, n_heads=4, n_kv_heads=2)
    c.data.update(source="prompt_completion", path=str(prompts_file(tmp_path)), val_fraction=0.0, seq_len=16)
    c.data.tokenizer.kind = "byte"
    c.objective.name = name
    c.eval.names = ()
    c = compose(c)
    c.objective.update(**{"chat_template": "none", "max_prompt_len": 8, "max_new_tokens": 6, "reward": "test_ascii",
                          **objective})
    c.optimizer.update(lr=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.0)
    c.train.update(progress=False, log_every=1)
    c.eval.every = 0
    c.checkpoint.every = 3
    c.log.tensorboard = False
    c.mesh.data = 1
    return c


def reward_model_workdir(tmp_path, name="rm", *, style="llama", tokenizer="byte", peft="none", save=True):
    """The workdir of an ``objective.reward_model`` run (d=32, 2 layers, ``style``; score head and
    weights drawn with std 0.2, so rows score apart) on a few byte-level preference pairs, its
    starting weights saved as the step-1 checkpoint (``save``): no step is trained."""
    pairs = tmp_path / f"{name}_pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"q{i}:", "chosen": "aa", "rejected": "zz"}) + "\n"
                             for i in range(8)))
    c = base_config()
    c.model.update(style=style, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2 if style == "llama" else 0, d_ff=64,
                   num_labels=1, init_std=0.2)
    c.data.update(source="preference", path=str(pairs), val_fraction=0.0, seq_len=32)
    c.data.tokenizer.kind = tokenizer
    c.objective.name = "reward_model"
    c.peft.name = peft
    c.eval.names = ()
    c.train.update(batch_size=4, progress=False)
    c.log.tensorboard = False
    c.mesh.data = 1
    c = compose(c)
    c.objective.chat_template = "none"
    workdir = tmp_path / name
    run, _ = Run.for_training(c, workdir)
    if save:
        ckpt = Checkpointer(workdir, async_save=False)
        ckpt.save(1, run.starting_state(), None, run.cfg.to_dict())
        ckpt.close()
    return workdir
