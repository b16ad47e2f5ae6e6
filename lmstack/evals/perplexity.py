"""Held-out loss and perplexity: the objective's summed loss over a fixed set of batches.

For ``objective.causal_lm`` (whose loss is the negative log-likelihood of the text's tokens
in nats) it also reports lm-evaluation-harness's per-text perplexities
(``lm_eval/api/metrics.py``), over the text whose tokens are scored:

- ``bits_per_byte`` = total NLL / (ln 2 * UTF-8 bytes of the scored text);
- ``byte_perplexity`` = exp(total NLL / bytes);
- ``word_perplexity`` = exp(total NLL / words), words counted per document as
  ``len(re.split(r"\\s+", text))``.

The scored text is read back from the held-out windows themselves (:func:`scored_documents`).
The NLL is the objective's: it includes predicting each document's eos (zero bytes) and not
its first token, which has nothing before it in its document (lm-eval's rolling
log-likelihood scores the first token after a prefix token instead, and no eos).
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterator, Sequence

import numpy as np

from lmstack.data.tokenizers import Tokenizer
from lmstack.evals.base import EvalContext
from lmstack.registry import register


def scored_documents(batches: Sequence[dict[str, Any]], tokenizer: Tokenizer) -> list[str]:
    """The text of the tokens a causal LM is scored on, one string per document, from the
    consecutive held-out windows of :func:`lmstack.data.pipeline.eval_batches` (``tokens``
    and ``segment_ids``; segment 0 is padding), in order.

    Consecutive windows overlap by one token, so each window's first run of tokens continues
    the previous window's last document. A document's tokens are gathered across windows,
    decoded once without bos/eos/pad, and its unscored first token's text removed, so a
    multi-byte character or a space split across windows or tokens counts once."""
    specials = {t for t in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) if t is not None}
    docs: list[list[int]] = []
    for batch in batches:
        tokens, seg = np.asarray(batch["tokens"]), np.asarray(batch["segment_ids"])
        for r in range(len(tokens)):
            runs = np.split(np.arange(seg.shape[1]), np.flatnonzero(np.diff(seg[r])) + 1)
            for k, run in enumerate(runs):
                if seg[r, run[0]] == 0:
                    continue
                ids = tokens[r, run].tolist()
                if k == 0 and docs:
                    docs[-1].extend(ids[1:])
                else:
                    docs.append(ids)

    def text(ids: list[int]) -> str:
        return tokenizer.decode([i for i in ids if i not in specials])

    return [text(ids)[len(text(ids[:1])):] for ids in docs]


def text_perplexities(nll_nats: float, documents: Sequence[str]) -> dict[str, float]:
    """``bits_per_byte``, ``byte_perplexity`` and ``word_perplexity`` of a total NLL (nats)
    over ``documents`` (lm-eval's formulas; see the module docstring)."""
    n_bytes = sum(len(d.encode("utf-8")) for d in documents)
    n_words = sum(len(re.split(r"\s+", d)) for d in documents)
    if not n_bytes:
        return {}
    return {"bits_per_byte": nll_nats / (math.log(2) * n_bytes),
            "byte_perplexity": math.exp(min(nll_nats / n_bytes, 709.0)),  # 709: below float64 overflow
            "word_perplexity": math.exp(min(nll_nats / n_words, 709.0))}


@register("eval.perplexity")
def perplexity(ctx: EvalContext) -> Iterator[tuple[str, float]]:
    """Yields ``loss`` (per weighted unit, e.g. per token), ``perplexity`` and every other
    summed metric of the objective divided by the total weight, over the held-out batches;
    for ``causal_lm`` also ``bits_per_byte``, ``byte_perplexity`` and ``word_perplexity``."""
    totals: dict[str, float] = {}
    for batch in ctx.batches:
        for k, v in ctx.loss_sums(batch).items():
            totals[k] = totals.get(k, 0.0) + float(np.asarray(v))
    weight = totals.pop("weight", 0.0)
    if not weight:
        return
    nll = totals.pop("loss")
    loss = nll / weight
    yield "loss", loss
    yield "perplexity", math.exp(min(loss, 50.0))
    for k, v in totals.items():
        yield k, v / weight
    if ctx.cfg.objective.name == "causal_lm":
        yield from text_perplexities(nll, scored_documents(ctx.batches, ctx.data.tokenizer)).items()
