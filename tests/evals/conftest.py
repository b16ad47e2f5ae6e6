"""A tiny random decoder over the byte tokenizer, shared by the evaluator tests."""

from __future__ import annotations

import pytest

from lmstack.configs.base import base_config
from lmstack.data.tokenizers import ByteTokenizer
from tests.evals.reference import SEQ_LEN, Reference


@pytest.fixture(scope="session")
def tokenizer() -> ByteTokenizer:
    return ByteTokenizer()


@pytest.fixture(scope="session")
def model():
    """2 layers, d=32, vocab 259 (bytes + pad/bos/eos), 64 positions; init_std 0.5 makes the
    next-token distributions far from uniform, so greedy choices and rankings are decisive."""
    from lmstack.trainstate import model_factory

    c = base_config()
    c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.n_kv_heads = 32, 2, 4, 2
    c.model.init_std = 0.5
    c.data.seq_len = SEQ_LEN
    make, _ = model_factory(c, vocab_size=ByteTokenizer.vocab_size)
    return make()



@pytest.fixture(scope="session")
def reference(model) -> Reference:
    return Reference(model)
