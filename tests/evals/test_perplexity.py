"""Bits per byte and word perplexity (lm-eval's formulas) over the text the held-out windows score."""

import math
import re

import jax
import pytest
from flax import nnx

from lmstack.config import compose
from lmstack.configs.base import base_config
from lmstack.data.pipeline import eval_batches, tokenize_documents
from lmstack.data.tokenizers import CharTokenizer, SentencePieceTokenizer
from lmstack.evals.base import run_evaluators
from lmstack.evals.perplexity import scored_documents
from lmstack.objectives.causal_lm import CausalLM
from tests.evals.helpers import eval_context

DOCS = ["Naïve café — déjà vu, señor!", "plain ascii text\nwith two lines", "日本語のテキスト and emoji 🎉🎉",
        "x", "  spaces   between\twords  "]


def test_scored_text_is_every_document_whole(tokenizer):
    """Windows of 7 tokens cut documents and multi-byte characters; each comes back whole."""
    batches = eval_batches(tokenize_documents(DOCS, tokenizer, cache=False), seq_len=7, batch_size=4)
    assert scored_documents(batches, tokenizer) == DOCS
    # with max_batches, the scored prefix of the stream: the first document and 13 bytes of the second
    first = eval_batches(tokenize_documents(DOCS, tokenizer, cache=False), seq_len=7, batch_size=2, max_batches=3)
    n = len(DOCS[0].encode()) + 2  # bos, bytes, eos
    assert scored_documents(first, tokenizer) == [DOCS[0], DOCS[1][:42 - n]]


def test_without_bos_the_first_token_is_not_scored():
    tok = CharTokenizer.from_documents(DOCS)
    batches = eval_batches(tokenize_documents(DOCS, tok, cache=False), seq_len=5, batch_size=3)
    assert scored_documents(batches, tok) == [d[1:] for d in DOCS]


@pytest.mark.shared_data
def test_sentencepiece_spaces_are_counted_once(shared_data):
    tok = SentencePieceTokenizer.load(shared_data / "sentencepiece" / "test_model.model")
    docs = ["I saw a cat on the mat today.", "He said that it was very good of him to come here at all."]
    assert [tok.decode(tok.encode(d)) for d in docs] == docs  # the text round-trips
    batches = eval_batches(tokenize_documents(docs, tok, cache=False), seq_len=4, batch_size=2)
    assert scored_documents(batches, tok) == docs


def test_bits_per_byte_and_word_perplexity(model, tokenizer):
    batches = eval_batches(tokenize_documents(DOCS, tokenizer, cache=False), seq_len=16, batch_size=4)
    graphdef, state = nnx.split(model)
    objective = CausalLM(compose(base_config()))

    @jax.jit
    def loss_sums(st, batch):
        loss, aux = objective.loss_fn(nnx.merge(graphdef, st), batch, None)
        return {"loss": loss, **aux}

    ctx = eval_context(model, tokenizer, "perplexity", batches=batches, loss_sums=lambda b: loss_sums(state, b))
    got = run_evaluators(ctx)
    nll = got["loss"] * sum(float(loss_sums(state, b)["weight"]) for b in batches)
    n_bytes = sum(len(d.encode("utf-8")) for d in DOCS)
    n_words = sum(len(re.split(r"\s+", d)) for d in DOCS)
    assert got["bits_per_byte"] == pytest.approx(nll / (math.log(2) * n_bytes), rel=1e-6)
    assert got["byte_perplexity"] == pytest.approx(math.exp(nll / n_bytes), rel=1e-6)
    assert got["word_perplexity"] == pytest.approx(math.exp(nll / n_words), rel=1e-6)
    other = eval_context(model, tokenizer, "perplexity", batches=batches, loss_sums=lambda b: loss_sums(state, b),
                         objective="mlm")
    assert "bits_per_byte" not in run_evaluators(other)  # only a causal LM's loss is the text's NLL
