"""Log-likelihood of continuations given contexts, the way lm-evaluation-harness scores them.

Conventions (lm-eval ``lm_eval.api.model.LM._encode_pair`` and
``lm_eval.models.huggingface.HFLM._loglikelihood_tokens``):

- Trailing spaces of the context move to the front of the continuation.
- The context plus continuation is encoded whole, the context alone too, and the
  continuation's tokens are the whole encoding's tokens after the context's encoding (so a
  token that straddles the boundary counts as continuation).
- Both encodings start with the tokenizer's bos where it starts documents with one
  (``add_bos``, as training saw them; lm-eval's ``add_bos_token=True``). An empty context is
  the single prefix token (bos, else eos), as lm-eval's ``prefix_token_id``.
- A request longer than ``max_length + 1`` tokens keeps its last ``max_length + 1``
  (contexts are cut from the left).
- ``is_greedy``: every continuation token is the argmax of the model's next-token logits.

Batches are right-padded to one fixed shape per call (the model is causal, so padding after
a row's tokens changes none of its logits), so scoring compiles once.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmstack.data.sources import DataError
from lmstack.data.tokenizers import Tokenizer, with_bos

TokenPair = tuple[Sequence[int], Sequence[int]]


def prefix_token(tokenizer: Tokenizer) -> int:
    """The token an empty context stands for: bos, else eos (lm-eval's ``prefix_token_id``).
    Raises DataError when the tokenizer has neither."""
    for tok in (tokenizer.bos_id, tokenizer.eos_id):
        if tok is not None:
            return int(tok)
    raise DataError(f"the {tokenizer.kind} tokenizer has no bos or eos token to stand for an empty context: "
                    "give every request a non-empty context")


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) by lm-eval's ``_encode_pair`` (see the module docstring)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
        return [prefix_token(tokenizer)], tokenizer.encode(continuation)
    whole = with_bos(tokenizer, tokenizer.encode(context + continuation))
    head = with_bos(tokenizer, tokenizer.encode(context))
    return head, whole[len(head):]


@functools.partial(jax.jit, static_argnames="graphdef")
def _target_logprobs(graphdef, state, tokens_bt, targets_bt):
    logits = nnx.merge(graphdef, state)(tokens_bt)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, targets_bt[..., None], axis=-1)[..., 0], jnp.argmax(logits, -1) == targets_bt


def token_continuation_logprobs(model: nnx.Module, requests: Sequence[TokenPair], *, batch_size: int,
                                max_length: int = 0) -> list[tuple[float, bool]]:
    """``(sum of log p(continuation token | everything before it), is_greedy)`` per
    ``(context ids, continuation ids)`` request, in order.

    Each row is ``(context + continuation)[-(max_length + 1):]`` (0: the model's
    ``max_seq_len``); batches are ``(batch_size, n)`` int32 with ``n`` the longest row rounded
    up to a power of two (at most ``max_length``), the same for every batch of the call.
    Raises DataError for an empty context or continuation, or a continuation longer than
    ``max_length``."""
    limit = max_length or int(model.cfg.max_seq_len)
    rows = []
    for i, (ctx, cont) in enumerate(requests):
        if not len(ctx) or not len(cont):
            what = "context" if not len(ctx) else "continuation"
            raise DataError(f"log-likelihood request {i} has an empty {what} (no tokens): every request needs a "
                            f"context and a continuation of at least one token")
        if len(cont) > limit:
            raise DataError(f"log-likelihood request {i}: its continuation has {len(cont)} tokens, more than the "
                            f"{limit} the model reads at once: shorten it or raise max_length")
        whole = [*ctx, *cont][-(limit + 1):]
        rows.append((whole, len(cont)))
    if not rows:
        return []
    longest = max(len(w) - 1 for w, _ in rows)
    width = min(limit, 1 << (longest - 1).bit_length())
    graphdef, state = nnx.split(model)
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        tokens = np.zeros((batch_size, width), np.int32)
        targets = np.zeros((batch_size, width), np.int32)
        for r, (whole, _) in enumerate(chunk):
            tokens[r, :len(whole) - 1], targets[r, :len(whole) - 1] = whole[:-1], whole[1:]
        lp, greedy = (np.asarray(a) for a in _target_logprobs(graphdef, state, tokens, targets))
        for r, (whole, n_cont) in enumerate(chunk):
            span = slice(len(whole) - 1 - n_cont, len(whole) - 1)
            out.append((float(np.sum(lp[r, span], dtype=np.float64)), bool(np.all(greedy[r, span]))))
    return out


def continuation_logprobs(model: nnx.Module, tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]], *,
                          batch_size: int, max_length: int = 0) -> list[tuple[float, bool]]:
    """``(sum_logprob, is_greedy)`` of each ``(context, continuation)`` string pair, encoded
    by :func:`encode_pair` and scored by :func:`token_continuation_logprobs` (lm-eval's
    ``loglikelihood``)."""
    return token_continuation_logprobs(model, [encode_pair(tokenizer, c, x) for c, x in pairs],
                                       batch_size=batch_size, max_length=max_length)


def rolling_windows(tokens: Sequence[int], prefix: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """Disjoint ``(context, continuation)`` windows that score every token of ``tokens`` once:
    the first conditions on ``prefix`` alone, later ones on up to ``max_length`` tokens
    (lm-eval ``get_rolling_token_windows(context_len=1)`` + ``make_disjoint_window``)."""
    tokens = list(tokens)
    out, done = [], 0
    while done < len(tokens):
        end = min(done + max_length, len(tokens))
        ctx = [prefix] if done == 0 else tokens[end - max_length - 1:done]
        out.append((ctx, tokens[done:end]))
        done = end
    return out


def rolling_loglikelihood(model: nnx.Module, tokenizer: Tokenizer, texts: Sequence[str], *, batch_size: int,
                          max_length: int = 0) -> list[float]:
    """Summed log-probability of each whole text, every token conditioned on at most
    ``max_length`` before it (lm-eval's ``loglikelihood_rolling``; the first token on the
    prefix token). Empty texts score 0."""
    limit = max_length or int(model.cfg.max_seq_len)
    windows: list[Any] = []
    owner = []
    for i, text in enumerate(texts):
        ids = tokenizer.encode(text)
        w = rolling_windows(ids, prefix_token(tokenizer), limit) if ids else []
        windows += w
        owner += [i] * len(w)
    sums = np.zeros(len(texts), np.float64)
    for i, (lp, _) in zip(owner, token_continuation_logprobs(model, windows, batch_size=batch_size,
                                                              max_length=limit)):
        sums[i] += lp
    return [float(s) for s in sums]
