"""The synthetic addition task (:mod:`lmstack.rl.tasks`) as a run's data, and the small
byte-level decoder that learns it: shared by ``experiments/sft_addition.py`` and
``experiments/grpo_addition.py`` so the GRPO run's model matches the SFT run it starts from."""

from __future__ import annotations

import ml_collections as mlc

from lmstack.rl.tasks import addition_files

# "12+345=" then the answer and a newline: the completion ends with "\n", one byte, which the
# GRPO rollouts stop at (objective.stop). Each rendering of fewer messages is a prefix of the
# whole, as SFT's assistant-only loss needs.
TEMPLATE = ("{% for message in messages %}{{ message['content'] }}"
            "{% if message['role'] == 'assistant' %}{{ '\\n' }}{% endif %}{% endfor %}")


def addition_data(c: mlc.ConfigDict, *, digits: int, n_train: int, n_test: int) -> None:
    """Point ``c.data`` at the task's train split and ``data.val_path`` at its held-out split
    (``prompt_completion`` JSONL written once to the lmstack cache by
    :func:`lmstack.rl.tasks.addition_files`), read with the byte tokenizer."""
    paths = addition_files(digits=digits, n_train=n_train, n_test=n_test)
    c.data.source = "prompt_completion"
    c.data.path = str(paths["train"])
    c.data.val_path = str(paths["test"])
    c.data.tokenizer.kind = "byte"


def addition_model(c: mlc.ConfigDict, *, smoke: bool) -> None:
    """A Llama-style decoder from scratch: 4 layers, d=128 (smoke: 2 layers, d=32)."""
    c.model.style = "llama"
    c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.n_kv_heads = (32, 2, 4, 2) if smoke else (128, 4, 4, 2)
    c.model.d_ff = 4 * c.model.d_model
    c.model.scan_unroll = c.model.n_layers
    c.model.max_seq_len = 64
