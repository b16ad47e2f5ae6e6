"""Shared builders for the RL objective tests (objective.grpo, objective.ppo): a learnable test
reward, a file of short prompts and a tiny from-scratch byte-model config that trains on them."""

from __future__ import annotations

import json

from lmstack.config import compose
from lmstack.registry import register
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
    c.objective.update(chat_template="none", max_prompt_len=8, max_new_tokens=6, reward="test_ascii", **objective)
    c.optimizer.update(lr=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.0)
    c.train.update(progress=False, log_every=1)
    c.eval.every = 0
    c.checkpoint.every = 3
    c.log.tensorboard = False
    c.mesh.data = 1
    return c
