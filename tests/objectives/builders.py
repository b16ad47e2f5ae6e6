"""Shared builders for objective tests: a byte-level corpus of many short documents, and
an experiment's smoke config (its model family and objective) sized for that tokenizer."""

from __future__ import annotations

import numpy as np

from lmstack import registry
from lmstack.config import load_config
from lmstack.data.pipeline import split_stream, tokenize_documents
from lmstack.data.tokenizers import ByteTokenizer
from lmstack.run import RunData
from lmstack.runspec import fresh_spec


def words(rng: np.random.Generator, n_words: int) -> str:
    """Lowercase words, some ending a sentence with '.'."""
    return " ".join("".join(rng.choice(list("abcdefgh"), size=rng.integers(1, 8))) + rng.choice([".", "", ""])
                    for _ in range(n_words))


def documents_data(n_docs: int = 200, seed: int = 0) -> RunData:
    """Byte-tokenized documents of 3-40 words, each ``[bos] ... [eos]``, split 90/10: every
    window spans several documents."""
    rng = np.random.default_rng(seed)
    tok = ByteTokenizer()
    stream = tokenize_documents([words(rng, int(rng.integers(3, 40))) for _ in range(n_docs)], tok, cache=False)
    train, val = split_stream(stream, 0.1)
    return RunData(tok, train, val)


def smoke_config(experiment: str, **objective_keys):
    """``experiment``'s smoke config with the byte tokenizer's vocabulary (plus the ids the
    objective reserves) and ``objective_keys`` set."""
    cfg = load_config(f"{experiment}:smoke=True")
    cfg.objective.update(objective_keys)
    special = registry.lookup("objective", cfg.objective.name).special_tokens(cfg)
    cfg.model.vocab_size = ByteTokenizer.vocab_size + len(special)
    return cfg


def build_objective(cfg):
    """The config's objective with its reserved ids at the top of ``model.vocab_size``, as a
    fresh run's spec assigns them."""
    cls = registry.lookup("objective", cfg.objective.name)
    return cls(cfg, fresh_spec(cfg, ByteTokenizer(), cls.special_tokens(cfg)).special_ids)
