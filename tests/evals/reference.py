"""References for the evaluator tests: log-probabilities and greedy continuations from a
plain full forward pass of the model over one sequence (no batching, no KV cache), with the
log-softmax in numpy. The sequence sits at the start of a fixed ``SEQ_LEN`` buffer so the
forward compiles once (the model is causal: what follows a prefix cannot change its logits)."""

from __future__ import annotations

import random

import jax
import numpy as np
from flax import nnx

SEQ_LEN = 64


class Reference:
    def __init__(self, model):
        graphdef, state = nnx.split(model)
        forward = jax.jit(lambda st, ids: nnx.merge(graphdef, st)(ids))
        self.forward = lambda ids: forward(state, ids)

    def log_softmax(self, ids: list[int]) -> np.ndarray:
        """(len(ids), V) float64 log-probabilities of the next token after each prefix of ``ids``."""
        buf = np.zeros((1, SEQ_LEN), np.int32)
        buf[0, :len(ids)] = ids
        logits = np.asarray(self.forward(buf)[0, :len(ids)], np.float64)
        logits -= logits.max(-1, keepdims=True)
        return logits - np.log(np.exp(logits).sum(-1, keepdims=True))

    def logprob(self, ctx: list[int], cont: list[int], max_length: int = SEQ_LEN) -> tuple[float, bool]:
        """Summed log p(continuation | context) and whether each continuation token is the
        argmax, over the last ``max_length + 1`` tokens (lm-eval's left truncation)."""
        whole = (ctx + cont)[-(max_length + 1):]
        lp = self.log_softmax(whole[:-1])
        rows = np.arange(len(whole) - 1 - len(cont), len(whole) - 1)
        targets = np.asarray(whole[1:])[rows]
        return float(lp[rows, targets].sum()), bool(np.all(lp[rows].argmax(-1) == targets))

    def greedy(self, ids: list[int], n: int) -> list[int]:
        """``n`` greedy tokens after ``ids``, the whole sequence recomputed for each."""
        ids = list(ids)
        for _ in range(n):
            ids.append(int(self.log_softmax(ids)[-1].argmax()))
        return ids[len(ids) - n:]


def lm_eval_contexts(docs, doc_to_text, doc_to_target, *, pool, n, seed, same_split, description=""):
    """lm-eval's ContextSampler, transcribed: one Random(seed) across the documents; n + 1
    candidates from the document's own split (n from another), the document dropped, n kept."""
    rnd = random.Random(seed)
    out = []
    for doc in docs:
        shots = rnd.sample(pool, n + 1 if same_split else n) if n else []
        shots = [x for x in shots if x != doc][:n]
        labeled = "".join(doc_to_text(x) + " " + doc_to_target(x) + "\n\n" for x in shots)
        out.append(description + labeled + doc_to_text(doc))
    return out
