"""The smoke shrink: what ``smoke=True`` does to an experiment so that it runs in seconds
(the test suite smoke-runs every experiment this way)."""

from __future__ import annotations

from typing import Any

import ml_collections as mlc


def shrink(c: mlc.ConfigDict, *, steps: int = 6, model: dict[str, Any] | None = None, chars: int = 0,
           vocab_size: int = 0, new_tokens: int = 0) -> None:
    """Shrink ``c`` in place for a smoke run: batches of 8 sequences of 64 tokens, ``steps``
    steps logged every 2, warmup over a third of them, a checkpoint and an evaluation (of a
    third as many batches) at half; ``model`` keys replace the model's (its sizes), ``chars``
    caps the corpus and the tokenizer's training text, ``vocab_size`` the tokenizer's
    vocabulary, ``new_tokens`` the sample length (0 leaves each as it is)."""
    c.data.seq_len = 64
    c.train.batch_size = 8  # splits over the test suite's 8 devices
    c.train.steps = steps
    c.train.log_every = 2
    c.optimizer.warmup_steps = steps // 3
    c.checkpoint.every = c.eval.every = steps // 2
    c.eval.batches = steps // 3
    for key, value in (model or {}).items():
        c.model[key] = value
    if chars:
        c.data.max_chars = c.data.tokenizer.max_train_chars = chars
    if vocab_size:
        c.data.tokenizer.vocab_size = vocab_size
    if new_tokens:
        c.sample.max_new_tokens = new_tokens
