"""The shared setting of the pre-training objective experiments: the standard library
corpus, one SentencePiece tokenizer, one batch and step budget, so that objectives differ
only in model family and objective (see tools/compare_objectives.py)."""

from __future__ import annotations

import ml_collections as mlc

from lmstack.config import parse_arg
from lmstack.configs.base import base_config


def stdlib_pretraining(arg: str | None, **variants) -> tuple[mlc.ConfigDict, dict]:
    """(config, parsed arg): d=128 models on the stdlib corpus, 400 steps of 16 x 128 tokens;
    ``smoke=True`` shrinks everything to run in seconds. ``variants`` are the experiment's
    own arg keys with their defaults."""
    args = parse_arg(arg, allowed={"smoke": False, **variants})
    c = base_config()
    c.model.d_model = 128
    c.model.n_layers = 4
    c.model.n_heads = 4
    c.model.scan_unroll = 4
    c.data.source = "stdlib"
    c.data.seq_len = 128
    c.data.tokenizer.kind = "sentencepiece"
    c.data.tokenizer.vocab_size = 4096
    c.train.batch_size = 16
    c.train.steps = 400
    c.train.log_every = 20
    c.optimizer.lr = 2e-3
    c.optimizer.warmup_steps = 40
    c.optimizer.b2 = 0.99
    c.checkpoint.every = 200
    c.eval.every = 200
    c.eval.batches = 8
    if args["smoke"]:
        shrink(c)
    return c, args


def shrink(c: mlc.ConfigDict) -> None:
    """The smoke-test version of a config: tiny data, model and step count."""
    c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.scan_unroll = 32, 2, 2, 2
    c.data.max_chars = 200_000
    c.data.seq_len = 64
    c.data.tokenizer.vocab_size = 384
    c.data.tokenizer.max_train_chars = 200_000
    c.train.batch_size = 8
    c.train.steps = 4
    c.train.log_every = 2
    c.optimizer.warmup_steps = 1
    c.checkpoint.every = 2
    c.eval.every = 2
    c.eval.batches = 1
    c.sample.max_new_tokens = 4
