"""The shared setting of the pre-training objective experiments: the standard library
corpus, one SentencePiece tokenizer, one batch and step budget, so that objectives differ
only in model family and objective (see tools/compare_objectives.py)."""

from __future__ import annotations

import ml_collections as mlc

from configs import smoke
from lmstack.config import parse_arg
from lmstack.configs.base import base_config


def stdlib_pretraining(arg: str | None, **variants) -> tuple[mlc.ConfigDict, dict]:
    """(config, parsed arg): d=128 models on the stdlib corpus, 400 steps of 16 x 128 tokens;
    ``smoke=True`` shrinks it (:func:`stdlib_smoke`) before the experiment derives its own
    values from the sizes. ``variants`` are the experiment's own arg keys with their defaults."""
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
        stdlib_smoke(c)
    return c, args


def stdlib_smoke(c: mlc.ConfigDict) -> mlc.ConfigDict:
    """:func:`configs.smoke.shrink` for this setting: d=32 two-layer models, 4 steps, a
    384-piece tokenizer trained on 200k characters. Returns ``c``."""
    smoke.shrink(c, steps=4, model=dict(d_model=32, n_layers=2, n_heads=2, scan_unroll=2), chars=200_000,
                 vocab_size=384, new_tokens=4)
    return c
