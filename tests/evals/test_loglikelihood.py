"""Continuation log-likelihoods (lm-eval's loglikelihood / loglikelihood_rolling) against
unpadded full forward passes with a numpy log-softmax."""

import numpy as np
import pytest

from lmstack.data.sources import DataError
from lmstack.data.tokenizers import CharTokenizer
from lmstack.evals import loglikelihood as ll
from lmstack.evals.loglikelihood import (
    continuation_logprobs,
    encode_pair,
    rolling_loglikelihood,
    rolling_windows,
    token_continuation_logprobs,
)


class MergingTokenizer(CharTokenizer):
    """Characters, plus one token for "ab": a token that can straddle a context/continuation cut."""

    def __init__(self):
        super().__init__(list("abcxyz :"))
        self.chars.append("ab")
        self.vocab_size = len(self.chars)

    def encode(self, text):
        out, i = [], 0
        while i < len(text):
            n = 2 if text.startswith("ab", i) else 1
            out.append(self.chars.index(text[i:i + n]))
            i += n
        return out


def test_encode_pair_follows_lm_eval(tokenizer):
    bos = tokenizer.bos_id
    # trailing spaces of the context move to the continuation; both encodings start with bos
    assert encode_pair(tokenizer, "Q: x  ", "y") == ([bos, *b"Q: x"], list(b"  y"))
    # an empty context is the prefix token alone
    assert encode_pair(tokenizer, "", "hi") == ([bos], list(b"hi"))
    # the whole string is encoded and split at the context's length: "xa"+"bc" -> x|ab|c, context x|a
    tok = MergingTokenizer()
    ctx, cont = encode_pair(tok, "xa", "bc")
    assert ctx == tok.encode("xa") and cont == [tok.chars.index("c")]
    assert ctx + cont != tok.encode("xabc")  # lm-eval's convention keeps the context's own tokens
    with pytest.raises(DataError) as e:
        encode_pair(tok, "", "ab")
    assert str(e.value) == ("the char tokenizer has no bos or eos token to stand for an empty context: give every "
                            "request a non-empty context")


def test_continuation_logprobs_match_a_full_forward_pass(model, tokenizer, reference):
    pairs = [("The cat", " sat"), ("", "hello"), ("a", "b"), ("Question: 2+2?\nAnswer:", " 4"),
             ("x" * 80, " tail")]  # the last is longer than the model's 64 positions: cut from the left
    requests = [encode_pair(tokenizer, c, x) for c, x in pairs]
    # a continuation that is the model's own greedy choice is greedy; with one token changed it is not
    ctx = [tokenizer.bos_id, *b"abc"]
    cont = reference.greedy(ctx, 5)
    requests += [(ctx, cont), (ctx, cont[:2] + [(cont[2] + 1) % 256] + cont[3:])]
    got = token_continuation_logprobs(model, requests, batch_size=3)  # 3 batches, two padding rows
    for (c, x), (lp, greedy) in zip(requests, got):
        ref_lp, ref_greedy = reference.logprob(c, x)
        assert lp == pytest.approx(ref_lp, abs=1e-4) and greedy == ref_greedy
    assert got[-2][1] and not got[-1][1]
    assert continuation_logprobs(model, tokenizer, pairs, batch_size=3) == got[:len(pairs)]


def test_scoring_compiles_once_per_width(model, tokenizer):
    pairs = [("x" * 70, f" choice {i}") for i in range(7)]  # all 64 wide
    continuation_logprobs(model, tokenizer, pairs[:1], batch_size=3)
    before = ll._target_logprobs._cache_size()
    continuation_logprobs(model, tokenizer, pairs, batch_size=3)  # 3 batches of the same shape
    assert ll._target_logprobs._cache_size() == before


def test_bad_requests_are_one_line_errors(model):
    with pytest.raises(DataError) as e:
        token_continuation_logprobs(model, [([1], [2]), ([1], [])], batch_size=2)
    assert str(e.value) == ("log-likelihood request 1 has an empty continuation (no tokens): every request needs a "
                            "context and a continuation of at least one token")
    with pytest.raises(DataError) as e:
        token_continuation_logprobs(model, [([1], [2] * 9)], batch_size=2, max_length=8)
    assert str(e.value) == ("log-likelihood request 0: its continuation has 9 tokens, more than the 8 the model "
                            "reads at once: shorten it or raise max_length")


def test_rolling_windows_score_every_token_once():
    tokens = list(range(100, 123))
    windows = rolling_windows(tokens, prefix=7, max_length=8)
    assert windows[0] == ([7], tokens[:8])
    assert [t for _, cont in windows for t in cont] == tokens
    for ctx, cont in windows[1:]:  # every later token sees max_length tokens (or all before it)
        assert len(ctx) + len(cont) == 9 and ctx + cont == tokens[tokens.index(cont[-1]) - 8:tokens.index(cont[-1]) + 1]


def test_rolling_loglikelihood_matches_a_full_forward_pass(model, tokenizer, reference):
    short, long = "a short text", "a text longer than the model's window of sixty-four tokens, " * 3
    got = rolling_loglikelihood(model, tokenizer, [short, long, ""], batch_size=3)
    lp = reference.log_softmax([tokenizer.bos_id, *short.encode()])
    ids = list(short.encode())
    assert got[0] == pytest.approx(float(lp[np.arange(len(ids)), ids].sum()), abs=1e-4)
    windows = rolling_windows(list(long.encode()), tokenizer.bos_id, 64)
    assert len(windows) == 3
    assert got[1] == pytest.approx(sum(reference.logprob(c, x)[0] for c, x in windows), abs=1e-4)
    assert got[2] == 0.0
